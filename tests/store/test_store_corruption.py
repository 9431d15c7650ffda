"""Corrupt records are detected, moved aside and reported, never fatal."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import plyvel
import pytest

from vmfactory.store import CorruptRecord, FilesystemStore, LevelDbStore, RecordNotFound
from vmfactory.store.leveldb import CORRUPT_PREFIX, RECORD_PREFIX, db_key
from vmfactory.store.record import HEADER_SIZE, MAGIC, EnvelopeError, decode_record, encode_record

PAYLOAD = b'{"id":"vm-1","state":"ready"}' * 4


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1:]


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda d: d[: len(d) // 2],
    "truncated-header": lambda d: d[:10],
    "empty": lambda d: b"",
    "payload-byte-flipped": lambda d: _flip(d, len(d) - 3),
    "magic-garbled": lambda d: _flip(d, 0),
    "length-garbled": lambda d: _flip(d, 12),
    "crc-garbled": lambda d: _flip(d, 17),
    "extra-bytes": lambda d: d + b"junk",
    "plain-garbage": lambda d: b"this is not a record at all",
}


# -- the envelope itself -------------------------------------------------------


def test_envelope_round_trip() -> None:
    for payload in (b"", b"x", PAYLOAD, bytes(range(256))):
        data = encode_record(payload)
        assert data.startswith(MAGIC)
        assert len(data) == HEADER_SIZE + len(payload)
        assert decode_record(data) == payload


def test_envelope_detects_every_truncation() -> None:
    data = encode_record(PAYLOAD)
    for length in range(len(data)):
        with pytest.raises(EnvelopeError):
            decode_record(data[:length])


def test_envelope_detects_every_flipped_byte() -> None:
    data = encode_record(PAYLOAD)
    for index in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            damaged = data[:index] + bytes([data[index] ^ mask]) + data[index + 1:]
            with pytest.raises(EnvelopeError):
                decode_record(damaged)


# -- filesystem backend ----------------------------------------------------------


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_filesystem_corrupt_record_is_moved_aside(tmp_path: Path, damage: str) -> None:
    with FilesystemStore(tmp_path / "s") as store:
        store.save("vms/a", PAYLOAD)
        store.save("vms/b", b"other")
        path = store.record_path("vms/a")
        bad = DAMAGE[damage](path.read_bytes())
        path.write_bytes(bad)

        with pytest.raises(CorruptRecord) as info:
            store.load("vms/a")
        assert info.value.key == "vms/a"
        assert "vms/a" in str(info.value)

        assert not path.exists()
        assert store.list() == ["vms/b"]
        assert store.load("vms/b") == b"other"
        with pytest.raises(RecordNotFound):
            store.load("vms/a")
        aside = sorted((tmp_path / "s" / "corrupt").rglob("*.bad"))
        assert len(aside) == 1
        assert aside[0].read_bytes() == bad
        assert info.value.moved_to == str(aside[0])

        store.save("vms/a", b"fresh")
        assert store.load("vms/a") == b"fresh"


def test_filesystem_repeated_corruption_keeps_every_copy(tmp_path: Path) -> None:
    with FilesystemStore(tmp_path / "s") as store:
        seen = []
        for round_ in range(3):
            store.save("k", PAYLOAD)
            bad = f"garbage {round_}".encode()
            store.record_path("k").write_bytes(bad)
            seen.append(bad)
            with pytest.raises(CorruptRecord):
                store.load("k")
        aside = list((tmp_path / "s" / "corrupt").rglob("*.bad"))
        assert sorted(p.read_bytes() for p in aside) == sorted(seen)
        assert store.list() == []


def test_filesystem_corrupt_record_survives_reopen(tmp_path: Path) -> None:
    with FilesystemStore(tmp_path / "s") as store:
        store.save("k", PAYLOAD)
        store.record_path("k").write_bytes(b"bad")
    with FilesystemStore(tmp_path / "s") as store:
        assert store.list() == ["k"]  # not yet known to be bad
        with pytest.raises(CorruptRecord):
            store.load("k")
        assert store.list() == []


def test_filesystem_record_fixed_by_a_writer_is_not_quarantined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that saw a bad record re-checks under the lock and may find it fixed."""
    with FilesystemStore(tmp_path / "s") as store:
        store.save("k", b"good")
        real = FilesystemStore._read_record
        calls = []

        def first_read_is_bad(key: str, path: Path) -> bytes:
            calls.append(key)
            return b"torn" if len(calls) == 1 else real(key, path)

        monkeypatch.setattr(FilesystemStore, "_read_record", staticmethod(first_read_is_bad))
        assert store.load("k") == b"good"
        assert len(calls) == 2
        assert not (tmp_path / "s" / "corrupt").exists()


# -- leveldb backend ------------------------------------------------------------


def _raw_items(path: Path) -> dict[bytes, bytes]:
    db = plyvel.DB(str(path))
    try:
        return dict(db.iterator())
    finally:
        db.close()


def _put_raw(path: Path, key: bytes, value: bytes) -> None:
    db = plyvel.DB(str(path))
    try:
        db.put(key, value, sync=True)
    finally:
        db.close()


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_leveldb_corrupt_value_is_moved_aside(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "db"
    with LevelDbStore(path) as store:
        store.save("vms/a", PAYLOAD)
        store.save("vms/b", b"other")
    bad = DAMAGE[damage](_raw_items(path)[db_key("vms/a")])
    _put_raw(path, db_key("vms/a"), bad)

    with LevelDbStore(path) as store:
        with pytest.raises(CorruptRecord) as info:
            store.load("vms/a")
        assert info.value.key == "vms/a"
        assert "vms/a" in str(info.value)
        assert store.list() == ["vms/b"]
        assert store.load("vms/b") == b"other"
        with pytest.raises(RecordNotFound):
            store.load("vms/a")

    raw = _raw_items(path)
    assert db_key("vms/a") not in raw
    aside = {k: v for k, v in raw.items() if k.startswith(CORRUPT_PREFIX)}
    assert list(aside.values()) == [bad]
    (aside_key,) = aside
    assert aside_key.startswith(CORRUPT_PREFIX + b"vms/a#")
    assert aside_key.decode() in str(info.value.moved_to)
    assert all(k.startswith((RECORD_PREFIX, CORRUPT_PREFIX)) for k in raw)


def test_leveldb_value_fixed_by_a_writer_is_not_quarantined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with LevelDbStore(tmp_path / "db") as store:
        store.save("k", b"good")
        real = LevelDbStore._get
        calls = []

        def first_get_is_bad(self: LevelDbStore, key: str) -> bytes:
            calls.append(key)
            return b"torn" if len(calls) == 1 else real(self, key)

        monkeypatch.setattr(LevelDbStore, "_get", first_get_is_bad)
        assert store.load("k") == b"good"
        assert len(calls) == 2
    assert not any(k.startswith(CORRUPT_PREFIX) for k in _raw_items(tmp_path / "db"))


def test_corrupt_area_is_private(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with FilesystemStore(tmp_path / "s") as store:
            store.save("a/b", PAYLOAD)
            store.record_path("a/b").write_bytes(b"bad")
            with pytest.raises(CorruptRecord) as info:
                store.load("a/b")
    finally:
        os.umask(old)
    corrupt = tmp_path / "s" / "corrupt"
    for directory in (corrupt, *[p for p in corrupt.rglob("*") if p.is_dir()]):
        assert directory.stat().st_mode & 0o777 == 0o700, directory
    assert Path(info.value.moved_to).parent != corrupt  # mirrors the key's layout
