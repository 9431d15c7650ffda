"""The disk policy (vmfactory.daemon.disks) on real files, for a caller that is
not root: what it may plug into its VM, and that what was checked is what is
opened, even while the path is being swapped."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmfactory.daemon.callers import Caller
from vmfactory.daemon.disks import open_disk
from vmfactory.errors import InvalidRequest, NotFound, PermissionDenied

USER, OTHER = 4242, 4343
CALLER = Caller(USER, USER, os.getpid(), frozenset({USER}))


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    disk_root = tmp_path / "images"
    mine = disk_root / str(USER)
    mine.mkdir(parents=True)
    os.chmod(tmp_path, 0o755)
    os.chmod(disk_root, 0o1777)
    os.chown(mine, USER, USER)
    yield disk_root


def make(path: Path, uid: int, mode: int, data: bytes = b"disk") -> Path:
    path.write_bytes(data)
    os.chown(path, uid, uid)
    os.chmod(path, mode)
    return path


def test_the_callers_own_image_opens_read_only_or_writable(root: Path) -> None:
    image = make(root / str(USER) / "a.ext4", USER, 0o600)
    disk = open_disk(str(image), [root], CALLER, writable=False)
    try:
        assert os.read(disk.fd, 4) == b"disk" and not disk.writable
        with pytest.raises(OSError):
            os.write(disk.fd, b"x")  # opened read-only
    finally:
        disk.close()
    disk = open_disk(str(image), [root], CALLER, writable=True)
    try:
        assert os.write(disk.fd, b"x") == 1
    finally:
        disk.close()


def test_a_shared_root_owned_image_is_read_only(root: Path) -> None:
    image = make(root / "shared.ext4", 0, 0o644)
    open_disk(str(image), [root], CALLER, writable=False).close()
    with pytest.raises(PermissionDenied, match="writable"):
        open_disk(str(image), [root], CALLER, writable=True)


@pytest.mark.parametrize("name, error, match", [
    ("/etc/shadow", PermissionDenied, "not under a disk root"),
    ("relative.ext4", InvalidRequest, "absolute and normal"),
    ("{root}/../../etc/shadow", InvalidRequest, "absolute and normal"),
    ("{root}//x", InvalidRequest, "absolute and normal"),
    ("{root}/missing.ext4", NotFound, "no disk image"),
    ("{root}/" + "x" * 5000, InvalidRequest, "too long"),
    ("{root}/nul\0byte", InvalidRequest, "NUL"),
])
def test_bad_paths_are_refused(root: Path, name: str, error: type[Exception],
                               match: str) -> None:
    with pytest.raises(error, match=match):
        open_disk(name.format(root=root), [root], CALLER, writable=False)


def test_what_the_caller_may_not_use_is_refused(root: Path) -> None:
    mine = root / str(USER)
    os.symlink("/etc/shadow", mine / "link.ext4")
    os.symlink(mine, root / "linked-dir")
    make(mine / "in-linked-dir.ext4", USER, 0o600)
    others = make(root / "others.ext4", OTHER, 0o644)
    secret = make(root / "secret.ext4", 0, 0o600)
    (root / "closed").mkdir(mode=0o700)
    make(root / "closed" / "inside.ext4", 0, 0o644)
    os.mkfifo(mine / "fifo")
    os.mknod(mine / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    cases = {
        mine / "link.ext4": (PermissionDenied, "symlink"),
        root / "linked-dir" / "in-linked-dir.ext4": (PermissionDenied, "symlink"),
        others: (PermissionDenied, "belongs to uid 4343"),
        secret: (PermissionDenied, "may not read"),
        root / "closed" / "inside.ext4": (PermissionDenied, "may not enter"),
        mine: (InvalidRequest, "not a regular file"),
        mine / "fifo": (InvalidRequest, "not a regular file"),
        mine / "null": (InvalidRequest, "not a regular file"),
    }
    for path, (error, match) in cases.items():
        with pytest.raises(error, match=match):
            open_disk(str(path), [root], CALLER, writable=False)


def test_root_may_use_any_regular_file_under_a_root(root: Path) -> None:
    secret = make(root / "secret.ext4", OTHER, 0o600)
    me = Caller(0, 0, os.getpid(), frozenset({0}))
    open_disk(str(secret), [root], me, writable=True).close()
    with pytest.raises(PermissionDenied):
        open_disk("/etc/shadow", [root], me, writable=False)


def test_a_path_swapped_for_a_symlink_never_opens_what_it_points_to(root: Path) -> None:
    """While another thread flips the path between a real image and a symlink to
    /etc/shadow, every open that succeeds has the real image."""
    mine = root / str(USER)
    good = make(mine / "good.ext4", USER, 0o600)
    target = mine / "flip.ext4"
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            for step in range(2):
                tmp = mine / f".tmp{step}"
                if step:
                    os.symlink("/etc/shadow", tmp)
                else:
                    os.link(good, tmp)
                os.replace(tmp, target)

    flipper = threading.Thread(target=flip)
    flipper.start()
    opened = refused = 0
    try:
        for _ in range(2000):
            try:
                disk = open_disk(str(target), [root], CALLER, writable=False)
            except (PermissionDenied, NotFound):
                refused += 1
                continue
            try:
                assert os.fstat(disk.fd).st_ino == good.stat().st_ino
                opened += 1
            finally:
                disk.close()
    finally:
        stop.set()
        flipper.join()
    assert opened and refused  # both sides of the race were seen
