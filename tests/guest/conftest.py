"""Fixtures shared by the guest tests: an independent reader for newc cpio archives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

NEWC_MAGIC = b"070701"
NEWC_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
               "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check")
HEADER_LEN = 6 + 8 * len(NEWC_FIELDS)  # 110


@dataclass(frozen=True)
class NewcEntry:
    name: str
    fields: dict[str, int]
    data: bytes
    header_offset: int

    @property
    def mode(self) -> int:
        return self.fields["mode"]


def parse_newc(blob: bytes) -> list[NewcEntry]:
    """Parse a whole newc archive, checking magic, alignment and the trailer.

    Written from the format description (cpio(5)), independently of CpioWriter.
    """
    entries: list[NewcEntry] = []
    pos = 0
    while True:
        assert pos % 4 == 0, f"entry at {pos} is not 4-byte aligned"
        header = blob[pos:pos + HEADER_LEN]
        assert len(header) == HEADER_LEN, f"truncated header at {pos}"
        assert header[:6] == NEWC_MAGIC, f"bad magic {header[:6]!r} at {pos}"
        raw = header[6:]
        fields = {}
        for i, name in enumerate(NEWC_FIELDS):
            text = raw[8 * i:8 * i + 8]
            assert all(c in b"0123456789abcdefABCDEF" for c in text), (name, text)
            fields[name] = int(text, 16)
        name_start = pos + HEADER_LEN
        name_bytes = blob[name_start:name_start + fields["namesize"]]
        assert name_bytes.endswith(b"\0"), "name is not NUL-terminated"
        assert b"\0" not in name_bytes[:-1], "NUL inside name"
        name = name_bytes[:-1].decode()
        data_start = name_start + fields["namesize"]
        pad = -data_start % 4
        assert blob[data_start:data_start + pad] == b"\0" * pad, "name padding is not NULs"
        data_start += pad
        data = blob[data_start:data_start + fields["filesize"]]
        assert len(data) == fields["filesize"], f"truncated data of {name}"
        end = data_start + fields["filesize"]
        pad = -end % 4
        assert blob[end:end + pad] == b"\0" * pad, f"data padding of {name} is not NULs"
        entries.append(NewcEntry(name, fields, data, pos))
        pos = end + pad
        if name == "TRAILER!!!":
            break
    assert pos == len(blob), f"{len(blob) - pos} bytes after the trailer"
    return entries


@pytest.fixture(scope="session")
def read_newc() -> Callable[[bytes], list[NewcEntry]]:
    return parse_newc
