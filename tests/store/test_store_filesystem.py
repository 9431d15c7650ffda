"""Filesystem-backend specifics: layout, permissions, temp-file hygiene."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfactory.errors import StoreError
from vmfactory.store import FilesystemStore, InvalidKey
from vmfactory.store.record import MAGIC, decode_record


@pytest.fixture(params=[0o000, 0o277], ids=["umask-000", "umask-277"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run with a permissive umask (catches default modes) and a hostile one
    (catches modes that rely on the umask instead of being set explicitly)."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask")
def test_modes_are_private_whatever_the_umask(tmp_path: Path) -> None:
    root = tmp_path / "parent" / "store"
    with FilesystemStore(root) as store:
        store.save("vms/vm-1/config", b"secret")
        store.save("top", b"x")
        store.save("top", b"overwritten")
        dirs = [root, *[p for p in root.rglob("*") if p.is_dir()]]
        files = [p for p in root.rglob("*") if p.is_file()]
    assert {d.name for d in dirs} >= {"store", "data", "vms.d", "vm-1.d"}
    for directory in dirs:
        assert _mode(directory) == 0o700, directory
    assert {f.name for f in files} == {"LOCK", "config.rec", "top.rec"}
    for file in files:
        assert _mode(file) == 0o600, file


def test_layout_and_record_format(tmp_path: Path) -> None:
    with FilesystemStore(tmp_path / "s") as store:
        store.save("vms/a", b"payload")
        store.save("vms", b"parent")
        path = store.record_path("vms/a")
        assert path == tmp_path / "s" / "data" / "vms.d" / "a.rec"
        assert store.record_path("vms") == tmp_path / "s" / "data" / "vms.rec"
        raw = path.read_bytes()
        assert raw.startswith(MAGIC)
        assert decode_record(raw) == b"payload"
        with pytest.raises(InvalidKey):
            store.record_path("../escape")


def test_list_ignores_temp_files_and_junk(tmp_path: Path) -> None:
    with FilesystemStore(tmp_path / "s") as store:
        store.save("vms/a", b"1")
        data = tmp_path / "s" / "data"
        (data / "vms.d" / ".a.rec.123-abcd.tmp").write_bytes(b"half written")
        (data / "README").write_text("not a record")
        (data / "bad name.rec").write_bytes(b"x")
        (data / "junkdir").mkdir()
        (data / "junkdir" / "z.rec").write_bytes(b"x")
        (tmp_path / "s" / "corrupt").mkdir()
        (tmp_path / "s" / "corrupt" / "q.rec").write_bytes(b"x")
        assert store.list() == ["vms/a"]
        assert store.list("vms/") == ["vms/a"]


def test_leftover_temp_files_are_removed_on_open(tmp_path: Path) -> None:
    with FilesystemStore(tmp_path / "s") as store:
        store.save("vms/a", b"kept")
        store.save("x.tmp", b"a key that looks like a temp file")
        store.save("d.tmp/y", b"under a directory that looks like one")
    leftovers = [
        tmp_path / "s" / "data" / "vms.d" / ".a.rec.999-dead.tmp",
        tmp_path / "s" / "data" / ".b.rec.999-beef.tmp",
    ]
    for leftover in leftovers:
        leftover.write_bytes(b"crashed mid-write")
    unrelated = tmp_path / "s" / "data" / "vms.d" / "notes.txt"
    unrelated.write_text("left alone")
    with FilesystemStore(tmp_path / "s") as store:
        assert not any(p.exists() for p in leftovers)
        assert unrelated.exists()
        assert store.load("vms/a") == b"kept"
        assert store.load("x.tmp") == b"a key that looks like a temp file"
        assert store.list() == ["d.tmp/y", "vms/a", "x.tmp"]


def test_delete_prunes_empty_directories(tmp_path: Path) -> None:
    with FilesystemStore(tmp_path / "s") as store:
        store.save("a/b/c", b"1")
        store.save("a/x", b"2")
        store.delete("a/b/c")
        data = tmp_path / "s" / "data"
        assert not (data / "a.d" / "b.d").exists()
        assert (data / "a.d" / "x.rec").exists()
        store.delete("a/x")
        assert list(data.iterdir()) == []


def test_failed_write_leaves_old_record_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FilesystemStore(tmp_path / "s") as store:
        store.save("k", b"old")

        def no_space(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", no_space)
        with pytest.raises(StoreError) as info:
            store.save("k", b"new")
        assert "'k'" in str(info.value)
        monkeypatch.undo()
        assert store.load("k") == b"old"
        assert [p.name for p in (tmp_path / "s" / "data").iterdir()] == ["k.rec"]


def test_two_handles_in_one_process_share_the_store(tmp_path: Path) -> None:
    with FilesystemStore(tmp_path / "s") as one, FilesystemStore(tmp_path / "s") as two:
        one.save("k", b"from one")
        assert two.load("k") == b"from one"
        two.delete("k")
        assert one.list() == []


def test_root_that_is_a_file_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError) as info:
        FilesystemStore(tmp_path / "file")
    assert str(tmp_path / "file") in str(info.value)


def test_save_many_syncs_each_file_and_each_directory_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FilesystemStore(tmp_path / "s") as store:
        store.save("vms/seed", b"0")  # the directories exist: only the group's syncs count
        synced: list[str] = []
        real_fsync = os.fsync

        def counting(fd: int) -> None:
            synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", counting)
        store.save_many([(f"vms/{i}", b"x") for i in range(8)] + [("top", b"y")])
        assert synced.count("file") == 9
        assert synced.count("dir") == 2  # data/vms.d and data, not one per record
        assert len(store.list("vms/")) == 9


def test_save_many_failing_part_way_names_the_key_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FilesystemStore(tmp_path / "s") as store:
        store.save("k2", b"old")
        calls: list[int] = []
        real_fsync = os.fsync

        def second_fails(fd: int) -> None:
            calls.append(fd)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", second_fails)
        with pytest.raises(StoreError) as info:
            store.save_many([("k1", b"1"), ("k2", b"new"), ("k3", b"3")])
        assert "'k2'" in str(info.value)
        monkeypatch.undo()
        assert store.load("k1") == b"1" and store.load("k2") == b"old"
        assert sorted(p.name for p in (tmp_path / "s" / "data").iterdir()) == ["k1.rec",
                                                                              "k2.rec"]
