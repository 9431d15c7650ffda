"""Which host files a caller may hot-plug into its VM, opened by the daemon.

A disk image is accepted only under one of the configured roots
(``daemon.disk_roots``), named by a normal absolute path, reached without
following a single symlink (each component is opened ``O_NOFOLLOW`` relative
to the one before), a regular file owned by root or by the caller (root may
use any), in directories the caller may enter, and readable (writable, if it
asks for a writable disk, which also needs the caller to own the file) by the
caller.  The
file is opened first as an ``O_PATH`` handle (no side effects, whatever it
is), checked with ``fstat`` on that handle, then reopened through it: what was
checked is what QEMU gets, a swap between check and use changes nothing.
"""

from __future__ import annotations

import errno
import grp
import os
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from vmfactory.daemon.callers import Caller
from vmfactory.errors import DaemonError, InvalidRequest, NotFound, PermissionDenied, quote
from vmfactory.hypervisor.base import DiskImage

MAX_PATH_BYTES = 4096
O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def prepare_default_root(root: Path, group: str) -> None:
    """The runtime clients' image cache, the default disk root: root's; with a
    socket group, its members may make their own directory in it (mode 1770:
    nobody removes another's)."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise DaemonError(f"daemon.socket_group: no group {quote(group)}") from None
        os.chown(root, 0, gid)
        os.chmod(root, 0o1770)
    else:
        os.chmod(root, 0o700)


def _parts(path: str) -> tuple[str, ...]:
    """The components of a normal absolute path; InvalidRequest for anything else."""
    if not path or "\0" in path or len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise InvalidRequest(f"disk path {quote(path)} is empty, too long or has a NUL byte")
    parts = path.split("/")
    if parts[0] != "" or any(p in ("", ".", "..") for p in parts[1:]):
        raise InvalidRequest(f"disk path {quote(path)} must be absolute and normal "
                             "(no '.', '..' or '//')")
    return tuple(parts[1:])


def _under(parts: tuple[str, ...], roots: Sequence[Path]) -> tuple[Path, tuple[str, ...]]:
    """The root ``parts`` lies under, and the rest of the path below it."""
    for root in roots:
        top = PurePosixPath(root).parts[1:]
        if len(parts) > len(top) and parts[:len(top)] == top:
            return root, parts[len(top):]
    raise PermissionDenied(f"disk path {quote('/' + '/'.join(parts))} is not under a disk "
                           f"root ({', '.join(map(str, roots)) or 'none configured'})")


def _may(caller: Caller, st: os.stat_result, want: int) -> bool:
    """Whether ``caller`` has the ``want`` bits (r=4, w=2, x=1) on a file with ``st``."""
    if caller.is_root:
        return True
    if st.st_uid == caller.uid:
        return bool(st.st_mode >> 6 & want == want)
    if st.st_gid in caller.groups or st.st_gid == caller.gid:
        return bool(st.st_mode >> 3 & want == want)
    return bool(st.st_mode & want == want)


def _walk(root: Path, below: tuple[str, ...], caller: Caller, shown: str) -> int:
    """An O_PATH handle on the file ``below`` names under ``root``; no symlink is
    followed, and the caller must be able to enter every directory on the way."""
    fd = os.open(root, O_PATH_DIR)
    try:
        for i, name in enumerate(below):
            if not _may(caller, os.fstat(fd), 1):
                raise PermissionDenied(f"{caller} may not enter the directories of {shown}")
            last = i == len(below) - 1
            flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC if last else O_PATH_DIR
            parent, fd = fd, -1
            try:
                fd = os.open(name, flags, dir_fd=parent)
            finally:
                os.close(parent)
        return fd
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        if isinstance(exc, OSError):
            raise _refusal(exc, shown) from None
        raise


def _refusal(exc: OSError, shown: str) -> Exception:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return PermissionDenied(f"disk path {shown} goes through a symlink or a non-directory")
    if exc.errno == errno.ENOENT:
        return NotFound(f"no disk image {shown}")
    return PermissionDenied(f"disk path {shown}: {exc.strerror}")


def _check(st: os.stat_result, caller: Caller, writable: bool, shown: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise PermissionDenied(f"disk path {shown} is a symlink")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidRequest(f"disk image {shown} is not a regular file")
    if not caller.is_root and st.st_uid not in (0, caller.uid):
        raise PermissionDenied(f"disk image {shown} belongs to uid {st.st_uid}, not to "
                               f"root or {caller}")
    if not _may(caller, st, 4):
        raise PermissionDenied(f"{caller} may not read disk image {shown}")
    if writable and (not caller.owns(st.st_uid) or not _may(caller, st, 2)
                     or (st.st_uid == 0 and not caller.is_root)):
        raise PermissionDenied(f"a writable disk must be a file {caller} owns and may write; "
                               f"{shown} is not")


def open_disk(path: str, roots: Sequence[Path], caller: Caller, writable: bool) -> DiskImage:
    """The image at ``path`` opened for ``caller``'s VM, if the policy allows it."""
    shown = quote(path)
    root, below = _under(_parts(path), roots)
    handle = _walk(root, below, caller, shown)
    try:
        _check(os.fstat(handle), caller, writable, shown)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY
        fd = os.open(f"/proc/self/fd/{handle}", flags)
    except OSError as exc:
        raise _refusal(exc, shown) from None
    finally:
        os.close(handle)
    return DiskImage(Path(path), fd, writable)
