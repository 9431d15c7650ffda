"""kmod.trim_elf_zeros: the kernel ELF without the zeros its last segment stores
(its .bss); the bytes a loader puts in memory are the same."""

from __future__ import annotations

import struct

from vmfactory.guest.kmod import trim_elf_zeros

PHOFF, PHENT = 64, 56


def elf(segments: list[tuple[int, bytes, int]]) -> bytes:
    """An ELF64 LE file with PT_LOAD (offset, data, memsz) segments."""
    head = bytearray(64)
    head[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", head, 0x20, PHOFF)
    struct.pack_into("<Q", head, 0x28, 999)  # section headers "somewhere"
    struct.pack_into("<HH", head, 0x36, PHENT, len(segments))
    struct.pack_into("<HHH", head, 0x3A, 64, 3, 2)
    out = bytearray(head) + bytes(PHENT * len(segments))
    for i, (offset, data, memsz) in enumerate(segments):
        struct.pack_into("<IIQQQQQQ", out, PHOFF + i * PHENT, 1, 7, offset, 0, 0,
                         len(data), memsz, 0x1000)
        out += bytes(max(0, offset + len(data) - len(out)))
        out[offset:offset + len(data)] = data
    return bytes(out)


def loaded(image: bytes) -> list[bytes]:
    """What a loader puts in memory for each PT_LOAD: file bytes, then zeros."""
    phnum, = struct.unpack_from("<H", image, 0x38)
    out = []
    for i in range(phnum):
        _, _, offset, _, _, filesz, memsz, _ = struct.unpack_from("<IIQQQQQQ", image,
                                                                PHOFF + i * PHENT)
        out.append(image[offset:offset + filesz] + bytes(memsz - filesz))
    return out


def test_the_stored_bss_goes_and_memory_stays_the_same() -> None:
    original = elf([(0x200, b"text" * 10, 40), (0x400, b"data" + bytes(5000), 8000)])
    trimmed = trim_elf_zeros(original)
    assert len(trimmed) == 0x400 + 4
    assert loaded(trimmed) == loaded(original)
    assert struct.unpack_from("<QHHH", trimmed, 0x28)[0] == 0  # no section headers left


def test_files_it_does_not_understand_are_left_alone() -> None:
    assert trim_elf_zeros(b"MZ not an elf") == b"MZ not an elf"
    # The zero-ended segment is not the file's last: nothing may move.
    tangled = elf([(0x800, b"late", 4), (0x400, b"data" + bytes(100), 200)])
    assert trim_elf_zeros(tangled) == tangled
