"""Packing a bundle's rootfs into a read-only ext4 block image for the guest,
without mounting anything; images are cached by a signature of the tree."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime_client.errors import BundleError

logger = logging.getLogger(__name__)

# The file system builder; a module constant so tests can swap in a failing command.
MKFS = "mkfs.ext4"
IMAGE_LABEL = "ctr-root"
# Bump when the image recipe (mkfs options) changes, so stale cached images are not reused.
SIGNATURE_VERSION = b"ctr-root-ext4-v1\0"
STALE_TEMP_SECONDS = 3600

_BLOCK = 4096
_MIB = 1 << 20



@dataclass(frozen=True)
class _Scan:
    signature: str
    data_bytes: int  # file sizes rounded up to blocks, plus a block per inode
    inodes: int


def scan_tree(rootfs: Path) -> _Scan:
    """Hash the tree's metadata (not contents: stat is enough and cheap) in sorted order."""
    digest = hashlib.sha256(SIGNATURE_VERSION)
    data = inodes = 0
    for rel, st, target in _walk(rootfs):
        rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
        meta = (f"{stat.S_IFMT(st.st_mode)}:{stat.S_IMODE(st.st_mode)}:{st.st_uid}:{st.st_gid}"
                f":{st.st_size}:{st.st_mtime_ns}:{rdev}")
        # NUL cannot appear in names or link targets, so the records are unambiguous.
        digest.update(os.fsencode(rel) + b"\0" + meta.encode() + b"\0"
                      + os.fsencode(target) + b"\0")
        inodes += 1
        data += _BLOCK
        if stat.S_ISREG(st.st_mode):
            data += -(-st.st_size // _BLOCK) * _BLOCK
    return _Scan(digest.hexdigest(), data, inodes)


def _walk(rootfs: Path) -> Iterator[tuple[str, os.stat_result, str]]:
    """(relative path, lstat, symlink target or "") for the root and everything below,
    depth first in name order; an explicit stack so deep trees cannot hit the
    recursion limit."""
    yield ".", os.lstat(rootfs), ""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(rootfs / rel_dir if rel_dir else rootfs) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            st = entry.stat(follow_symlinks=False)
            target = os.readlink(entry.path) if stat.S_ISLNK(st.st_mode) else ""
            yield rel, st, target
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(rel)
        stack.extend(reversed(subdirs))


def image_size_mib(data_bytes: int) -> int:
    """30% headroom over the estimate, plus slack for ext4 metadata; at least 16 MiB."""
    return max(16, -(-data_bytes * 13 // 10 // _MIB) + 8)


class ImageCache:
    """Read-only ext4 images of bundle root filesystems, cached by content signature under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def image_for(self, rootfs: Path) -> Path:
        """Return the path of an ext4 image of ``rootfs``, building it unless cached.

        Concurrent callers (threads or processes) for the same tree build it once.  A
        tree modified while its image is being built may yield a stale image: the
        signature is taken before the build starts.
        """
        rootfs = Path(rootfs)
        if not rootfs.is_dir():
            raise BundleError(f"rootfs directory missing: {rootfs}")
        try:
            scan = scan_tree(rootfs)
        except OSError as exc:
            raise BundleError(f"cannot read rootfs {rootfs}: {exc}") from None
        self._ensure_directory()
        image = self.directory / f"{scan.signature[:24]}.ext4"
        with self._locked(image, blocking=True):
            if image.exists():
                os.utime(image)  # prune() evicts by mtime: mark it recently used
                return image
            self._build(rootfs, image, scan)
        return image

    def prune(self, keep: int = 16) -> int:
        """Remove least-recently-used images beyond ``keep``; return how many were removed.

        Images locked by a concurrent image_for() are skipped.  A path image_for()
        already returned may still be removed before its caller opens it; run prune
        when it cannot matter, or keep enough images.
        """
        if keep < 0:
            raise ValueError(f"keep must be >= 0, not {keep}")
        if not self.directory.is_dir():
            return 0
        self._remove_stale_temps()
        images = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(".ext4") and not entry.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    images.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
        images.sort(reverse=True)
        return sum(self._evict(self.directory / name, mtime) for mtime, name in images[keep:])

    def _evict(self, image: Path, seen_mtime_ns: int) -> bool:
        with self._locked(image, blocking=False) as held:
            if not held:
                return False  # being built or reused right now
            try:
                if image.stat().st_mtime_ns != seen_mtime_ns:
                    return False  # reused since we listed it: no longer least recent
                image.unlink()
            except FileNotFoundError:
                return False
            # A waiter on this lock file re-checks for the image after it gets the
            # lock, so unlinking it while held at worst duplicates a build.
            self._lock_path(image).unlink(missing_ok=True)
        logger.info("pruned image %s", image.name)
        return True

    def _remove_stale_temps(self) -> None:
        # Left by a builder that was killed; mkfs keeps writing a live one.
        cutoff = time.time() - STALE_TEMP_SECONDS
        for entry in os.scandir(self.directory):
            if entry.name.startswith(".build-"):
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)

    def _ensure_directory(self) -> None:
        """The cache directory, ours alone: made private if new, and refused if
        another uid made it (it could swap our images) or others may write in it."""
        try:
            self.directory.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass
        except OSError as exc:
            raise BundleError(f"image cache {self.directory}: {exc.strerror} (its parent must "
                              "exist and be writable: runtime.image_dir)") from None
        else:
            # mkdir's mode is filtered by the umask; the cache should be private regardless.
            os.chmod(self.directory, 0o700)
        st = self.directory.lstat()
        if not stat.S_ISDIR(st.st_mode):
            raise BundleError(f"image cache {self.directory} is not a directory")
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise BundleError(f"image cache {self.directory} belongs to uid {st.st_uid} or "
                              "others may write in it: refusing to use it")

    @staticmethod
    def _lock_path(image: Path) -> Path:
        return image.with_name(f".{image.stem}.lock")

    @contextlib.contextmanager
    def _locked(self, image: Path, *, blocking: bool) -> Iterator[bool]:
        """Hold the per-image flock; yields False if not blocking and someone else has it."""
        fd = os.open(self._lock_path(image), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing releases the flock

    def _build(self, rootfs: Path, image: Path, scan: _Scan) -> None:
        size_mib = image_size_mib(scan.data_bytes)
        start = time.monotonic()
        fd, tmp_name = tempfile.mkstemp(prefix=".build-", suffix=".ext4", dir=self.directory)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            run_mkfs(rootfs, tmp, size_mib, scan.inodes)
            # Read-only before it becomes visible under its final name.
            os.chmod(tmp, 0o444)
            os.rename(tmp, image)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        logger.info("built image %s of %s: %d MiB in %d ms", image.name, rootfs, size_mib,
                 (time.monotonic() - start) * 1000)


def run_mkfs(rootfs: Path, target: Path, size_mib: int, inodes: int) -> None:
    """Write an ext4 file system holding a copy of ``rootfs`` into ``target``."""
    # mkfs.ext4 lives in sbin, which a non-root PATH often lacks.
    search = os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin"
    binary = shutil.which(MKFS, path=search)
    if binary is None:
        raise BundleError(f"{MKFS} is not installed (apt-get install e2fsprogs)")
    # -N: the default bytes-per-inode ratio of large file systems runs out of inodes
    # on trees of many small files; ask for what the tree needs plus lost+found etc.
    argv = [binary, "-q", "-F", "-L", IMAGE_LABEL, "-O", "^has_journal",
            "-E", "root_owner=0:0", "-N", str(inodes * 5 // 4 + 256),
            "-d", str(rootfs), str(target), f"{size_mib}M"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              check=False)
    except FileNotFoundError:
        raise BundleError(f"{MKFS} is not installed (apt-get install e2fsprogs)") from None
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise BundleError(f"{MKFS} failed for {rootfs}: {reason}")
