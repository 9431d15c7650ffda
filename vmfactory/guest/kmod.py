"""Kernel module selection: read each module's dependencies and order the loads.

Debian's kernel package ships no modules.dep (depmod runs at install time), so
the dependencies come from each module's ``.modinfo`` ELF section.
"""

from __future__ import annotations

import struct
from pathlib import Path

from vmfactory.errors import ImageError


def modinfo(path: Path) -> dict[str, str]:
    """Return the key=value pairs of a .ko file's ``.modinfo`` section."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ImageError(f"kernel module {path} is not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        name, = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    for i in range(shnum):
        name_off, offset, size = section(i)
        name = data[str_off + name_off:data.index(b"\0", str_off + name_off)]
        if name == b".modinfo":
            pairs = data[offset:offset + size].split(b"\0")
            out: dict[str, str] = {}
            for pair in pairs:
                key, sep, value = pair.decode(errors="replace").partition("=")
                if sep:
                    out.setdefault(key, value)
            return out
    raise ImageError(f"kernel module {path} has no .modinfo section")


def index_modules(root: Path) -> dict[str, Path]:
    """Map module names (``-`` folded to ``_``) to their .ko files under ``root``."""
    return {p.name[:-3].replace("-", "_"): p for p in root.rglob("*.ko")}


def load_order(wanted: list[str], available: dict[str, Path]) -> list[str]:
    """Names of ``wanted`` plus their dependencies, each after what it needs."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, needed_by: str | None) -> None:
        if name in order:
            return
        if name not in available:
            who = f" (needed by {needed_by})" if needed_by else ""
            raise ImageError(f"kernel module {name}{who} is not in the kernel package")
        if name in visiting:
            raise ImageError(f"kernel module dependency cycle at {name}")
        visiting.add(name)
        deps = modinfo(available[name]).get("depends", "")
        for dep in filter(None, deps.split(",")):
            visit(dep.replace("-", "_"), name)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name.replace("-", "_"), None)
    return order


XZ_MAGIC = b"\xfd7zXZ\x00"


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside an xz-compressed bzImage, or None.

    QEMU boots such an ELF directly through its PVH entry point, which skips
    the in-guest decompression: about 5 s of a cold boot under TCG.
    """
    import lzma

    start = bzimage.find(XZ_MAGIC)
    if start < 0:
        return None
    decompressor = lzma.LZMADecompressor()
    try:
        elf = decompressor.decompress(bzimage[start:])
    except lzma.LZMAError:
        return None
    # A cut-off stream decompresses "fine" into a cut-off kernel.
    return elf if decompressor.eof and elf[:4] == b"\x7fELF" else None


def trim_elf_zeros(elf: bytes) -> bytes:
    """``elf`` (a 64-bit little-endian ELF kernel) without the zero bytes that end its
    last loadable segment (its .bss, stored in the file) and without section headers
    and symbols: a loader zero-fills a segment's memory beyond its file size, so
    the kernel QEMU loads is the same."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return elf
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    loads = []
    for i in range(phnum):
        at = phoff + i * phentsize
        p_type, _flags, offset = struct.unpack_from("<IIQ", elf, at)
        filesz, = struct.unpack_from("<Q", elf, at + 32)
        if p_type == 1:  # PT_LOAD
            loads.append((offset + filesz, at, offset, filesz))
    if not loads:
        return elf
    end, at, offset, filesz = max(loads)
    if any(e > offset for e, a, _, _ in loads if a != at):
        return elf  # another segment's bytes lie after it: leave the file alone
    last = len(elf[offset:end].rstrip(b"\0"))
    if last == filesz:
        return elf  # nothing stored to drop
    out = bytearray(elf[:offset + last])
    struct.pack_into("<Q", out, at + 32, last)
    struct.pack_into("<Q", out, 0x28, 0)          # e_shoff
    struct.pack_into("<HHH", out, 0x3A, 0, 0, 0)  # e_shentsize, e_shnum, e_shstrndx
    return bytes(out)
