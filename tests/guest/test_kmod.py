"""Kernel module metadata (.modinfo), load ordering and vmlinux extraction."""

from __future__ import annotations

import lzma
import struct
import subprocess
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmfactory.errors import ImageError
from vmfactory.guest import kmod

EHDR = "<16sHHIQQQIHHHHHH"
SHDR = "<IIQQQQIIQQ"
SHT_PROGBITS, SHT_STRTAB = 1, 3


def build_elf(sections: list[tuple[str, bytes]], *, shstrtab_first: bool = False,
              elf_class: int = 2) -> bytes:
    """A minimal 64-bit little-endian ELF relocatable with the given sections.

    Layout: ELF header, section contents, then the section header table
    (null section, the given sections and ``.shstrtab``).
    """
    named = list(sections)
    strtab_entry = (".shstrtab", b"")
    if shstrtab_first:
        named.insert(0, strtab_entry)
    else:
        named.append(strtab_entry)
    shstrtab = b"\0"
    name_offsets = []
    for name, _ in named:
        name_offsets.append(len(shstrtab))
        shstrtab += name.encode() + b"\0"
    body = b""
    offset = struct.calcsize(EHDR)
    headers = [struct.pack(SHDR, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)]
    shstrndx = 0
    for i, ((name, content), name_off) in enumerate(zip(named, name_offsets), start=1):
        if name == ".shstrtab":
            content, kind, shstrndx = shstrtab, SHT_STRTAB, i
        else:
            kind = SHT_PROGBITS
        headers.append(struct.pack(SHDR, name_off, kind, 0, 0, offset + len(body), len(content),
                                   0, 0, 1, 0))
        body += content
    body += b"\0" * (-len(body) % 8)
    shoff = struct.calcsize(EHDR) + len(body)
    ident = b"\x7fELF" + bytes([elf_class, 1, 1, 0]) + b"\0" * 8
    header = struct.pack(EHDR, ident, 1, 62, 1, 0, 0, shoff, 0, struct.calcsize(EHDR), 0, 0,
                         struct.calcsize(SHDR), len(headers), shstrndx)
    return header + body + b"".join(headers)


def modinfo_blob(**fields: str) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in fields.items())


def write_ko(path: Path, modinfo: bytes | None = None, **fields: str) -> Path:
    blob = modinfo if modinfo is not None else modinfo_blob(**fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(build_elf([(".text", b"\x90" * 13), (".modinfo", blob),
                                (".data", b"\1\2\3")]))
    return path


def make_modules(root: Path, deps: dict[str, list[str]]) -> dict[str, Path]:
    """One .ko per name; the file name keeps any '-' so folding is exercised."""
    out = {}
    for name, needs in deps.items():
        path = write_ko(root / "kernel" / f"{name}.ko", license="GPL", depends=",".join(needs),
                        name=name.replace("-", "_"))
        out[name.replace("-", "_")] = path
    return out


# --- the ELF helper itself -------------------------------------------------------

@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf not installed")
def test_helper_builds_an_elf_readelf_accepts(tmp_path: Path) -> None:
    ko = write_ko(tmp_path / "x.ko", license="GPL")
    out = subprocess.run(["readelf", "-W", "-S", str(ko)], capture_output=True, text=True,
                         check=True).stdout
    assert ".modinfo" in out and ".shstrtab" in out and ".text" in out


# --- modinfo ----------------------------------------------------------------------

def test_modinfo_parses_pairs(tmp_path: Path) -> None:
    ko = write_ko(tmp_path / "x.ko", modinfo=b"license=GPL\0depends=a,b\0name=x\0"
                                           b"vermagic=6.1.0 SMP mod_unload \0")
    info = kmod.modinfo(ko)
    assert info == {"license": "GPL", "depends": "a,b", "name": "x",
                    "vermagic": "6.1.0 SMP mod_unload "}


def test_modinfo_first_value_wins_and_odd_entries_are_skipped(tmp_path: Path) -> None:
    # Real .modinfo sections hold repeated keys (alias=) and padding NULs.
    ko = write_ko(tmp_path / "x.ko", modinfo=b"\0\0alias=pci:v1\0alias=pci:v2\0noequals\0"
                                           b"depends=\0parm=a:b=c\0\0")
    info = kmod.modinfo(ko)
    assert info["alias"] == "pci:v1"
    assert info["depends"] == ""
    assert info["parm"] == "a:b=c"
    assert "noequals" not in info


def test_modinfo_finds_section_when_shstrtab_is_first(tmp_path: Path) -> None:
    ko = tmp_path / "x.ko"
    ko.write_bytes(build_elf([(".modinfo", b"name=first\0")], shstrtab_first=True))
    assert kmod.modinfo(ko) == {"name": "first"}


def test_modinfo_rejects_non_elf(tmp_path: Path) -> None:
    ko = tmp_path / "bogus.ko"
    ko.write_bytes(b"#!/bin/sh\necho not a module\n")
    with pytest.raises(ImageError, match=r"bogus\.ko is not a 64-bit little-endian ELF"):
        kmod.modinfo(ko)


def test_modinfo_rejects_32_bit_elf(tmp_path: Path) -> None:
    ko = tmp_path / "m32.ko"
    ko.write_bytes(build_elf([(".modinfo", b"name=x\0")], elf_class=1))
    with pytest.raises(ImageError, match="64-bit"):
        kmod.modinfo(ko)


def test_modinfo_without_section_is_an_error(tmp_path: Path) -> None:
    ko = tmp_path / "plain.ko"
    ko.write_bytes(build_elf([(".text", b"\xc3"), (".modinfo.not", b"name=x\0")]))
    with pytest.raises(ImageError, match=r"plain\.ko has no \.modinfo"):
        kmod.modinfo(ko)


# --- index_modules ----------------------------------------------------------------

def test_index_modules_folds_dashes_and_ignores_other_files(tmp_path: Path) -> None:
    a = write_ko(tmp_path / "kernel/drivers/virtio/virtio-pci.ko", name="virtio_pci")
    b = write_ko(tmp_path / "kernel/fs/ext4/ext4.ko", name="ext4")
    (tmp_path / "modules.builtin").write_text("kernel/fs/foo.ko\n")
    (tmp_path / "kernel/fs/ext4/ext4.ko.xz").write_bytes(b"x")
    assert kmod.index_modules(tmp_path) == {"virtio_pci": a, "ext4": b}


# --- load_order -------------------------------------------------------------------

def assert_valid_order(order: list[str], wanted: list[str], deps: dict[str, list[str]]) -> None:
    assert len(order) == len(set(order)), f"duplicates in {order}"
    pos = {name: i for i, name in enumerate(order)}
    for name in wanted:
        assert name in pos
    for name in order:
        for dep in deps[name]:
            assert pos[dep] < pos[name], f"{dep} must load before {name}: {order}"


def test_load_order_puts_deps_first_and_shares_them(tmp_path: Path) -> None:
    deps = {"ext4": ["mbcache", "jbd2", "crc16"], "jbd2": ["crc32c_generic"],
            "mbcache": [], "crc16": [], "crc32c_generic": [],
            "virtio_blk": ["virtio_ring"], "virtio_ring": [], "unused": []}
    available = make_modules(tmp_path, deps)
    order = kmod.load_order(["virtio_blk", "ext4", "crc32c_generic"], available)
    assert_valid_order(order, ["virtio_blk", "ext4", "crc32c_generic"], deps)
    assert "unused" not in order
    assert set(order) == set(deps) - {"unused"}
    assert order[:2] == ["virtio_ring", "virtio_blk"]


def test_load_order_diamond_lists_shared_dep_once(tmp_path: Path) -> None:
    deps = {"top": ["left", "right"], "left": ["base"], "right": ["base"], "base": []}
    order = kmod.load_order(["top", "left"], make_modules(tmp_path, deps))
    assert order.count("base") == 1
    assert order == ["base", "left", "right", "top"]


def test_load_order_folds_dashes_in_depends(tmp_path: Path) -> None:
    # Files named with '-' and depends= spelled with '-' both resolve to '_' names.
    deps = {"virtio-pci": ["virtio-pci-modern-dev", "virtio"], "virtio-pci-modern-dev": [],
            "virtio": []}
    available = make_modules(tmp_path, deps)
    assert set(available) == {"virtio_pci", "virtio_pci_modern_dev", "virtio"}
    order = kmod.load_order(["virtio_pci"], available)
    assert order == ["virtio_pci_modern_dev", "virtio", "virtio_pci"]


def test_load_order_wanted_duplicates_once(tmp_path: Path) -> None:
    available = make_modules(tmp_path, {"a": ["b"], "b": []})
    assert kmod.load_order(["a", "b", "a"], available) == ["b", "a"]


def test_load_order_missing_dep_names_both(tmp_path: Path) -> None:
    available = make_modules(tmp_path, {"ext4": ["jbd2"], "jbd2": ["crc32c"]})
    with pytest.raises(ImageError) as info:
        kmod.load_order(["ext4"], available)
    message = str(info.value)
    assert "crc32c" in message and "needed by jbd2" in message
    assert "not in the kernel package" in message


def test_load_order_missing_wanted_module(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"kernel module overlay is not in") as info:
        kmod.load_order(["overlay"], make_modules(tmp_path, {"ext4": []}))
    assert "needed by" not in str(info.value)


@pytest.mark.parametrize("deps", [
    {"a": ["b"], "b": ["a"]},
    {"a": ["b"], "b": ["c"], "c": ["a"]},
    {"self": ["self"]},
], ids=["two", "three", "self"])
def test_load_order_detects_cycles(tmp_path: Path, deps: dict[str, list[str]]) -> None:
    with pytest.raises(ImageError, match="dependency cycle"):
        kmod.load_order([next(iter(deps))], make_modules(tmp_path, deps))


def test_load_order_propagates_bad_module_file(tmp_path: Path) -> None:
    available = make_modules(tmp_path, {"a": ["b"], "b": []})
    available["b"].write_bytes(b"garbage")
    with pytest.raises(ImageError, match="not a 64-bit little-endian ELF"):
        kmod.load_order(["a"], available)


@st.composite
def dags(draw: st.DrawFn) -> tuple[dict[str, list[str]], list[str]]:
    n = draw(st.integers(1, 9))
    names = [f"m{i}" for i in range(n)]
    deps = {names[i]: draw(st.lists(st.sampled_from(names[:i]), unique=True)) if i else []
            for i in range(n)}
    wanted = draw(st.lists(st.sampled_from(names), min_size=1, max_size=4))
    return deps, wanted


@settings(max_examples=40, deadline=None)
@given(dags())
def test_load_order_property(case: tuple[dict[str, list[str]], list[str]]) -> None:
    deps, wanted = case
    with tempfile.TemporaryDirectory() as tmp:
        order = kmod.load_order(wanted, make_modules(Path(tmp), deps))
    assert_valid_order(order, wanted, deps)
    # Exactly the transitive closure of what was asked for.
    closure: set[str] = set()
    stack = list(wanted)
    while stack:
        name = stack.pop()
        if name not in closure:
            closure.add(name)
            stack.extend(deps[name])
    assert set(order) == closure


# --- extract_vmlinux --------------------------------------------------------------

FAKE_ELF = b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 64


def xz(data: bytes, **kwargs: object) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, **kwargs)  # type: ignore[arg-type]


def test_extract_vmlinux_finds_xz_payload() -> None:
    assert kmod.extract_vmlinux(b"junk" + xz(FAKE_ELF)) == FAKE_ELF


def test_extract_vmlinux_ignores_trailing_bytes() -> None:
    # A real bzImage continues after the compressed payload (size word, padding).
    setup = b"MZ" + b"\0" * 510 + b"HdrS" + b"\x11" * 1000
    assert kmod.extract_vmlinux(setup + xz(FAKE_ELF) + b"\x00\x10\x00\x00" * 8) == FAKE_ELF


def test_extract_vmlinux_with_x86_bcj_filter() -> None:
    # Linux compresses x86 kernels with the x86 BCJ filter in front of LZMA2.
    filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 6}]
    assert kmod.extract_vmlinux(b"junk" + xz(FAKE_ELF, check=lzma.CHECK_CRC32,
                                             filters=filters)) == FAKE_ELF


@pytest.mark.parametrize("blob", [
    b"junk without any compressed stream",
    b"",
    b"junk" + xz(b"not an ELF payload" * 10),
    b"junk" + kmod.XZ_MAGIC + b"\xff" * 64,  # magic but garbage after it
    b"junk" + lzma.compress(FAKE_ELF, format=lzma.FORMAT_ALONE),  # lzma, not xz
], ids=["no-stream", "empty", "not-elf", "corrupt", "lzma-alone"])
def test_extract_vmlinux_returns_none(blob: bytes) -> None:
    assert kmod.extract_vmlinux(blob) is None


def test_extract_vmlinux_rejects_truncated_stream() -> None:
    stream = xz(FAKE_ELF + bytes(200_000))
    assert kmod.extract_vmlinux(b"junk" + stream[:len(stream) // 2]) is None
