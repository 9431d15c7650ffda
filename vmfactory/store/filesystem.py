"""Filesystem backend: one checksummed file per key.

Layout under the store root::

    LOCK                  flock(2) target serializing writers across processes
    data/                 the records
        vms.d/            key part "vms" used as a directory
            a.rec         record for key "vms/a"
        vms.rec           record for key "vms" (coexists with vms.d/)
        .a.rec.<id>.tmp   a writer's temp file (removed on open if left over)
    corrupt/              records that failed their checksum, same layout,
                          named "<part>.rec.<utc-time>.<id>.bad"

Directory names always end in ``.d`` and record names in ``.rec``, so a key
and its children never collide, and temp files (``.tmp``) are never mistaken
for records.  Writes go to a temp file in the target directory, are fsynced,
renamed over the record and the directory is fsynced (once for all the records
of one ``save_many``), all under an exclusive ``flock`` on ``LOCK``.  Reads take no lock: a rename is atomic, so a reader sees
the old or the new record, never a mix.  Directories are created 0700 and files
0600, set explicitly so the umask does not matter.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from vmfactory.errors import StoreError
from vmfactory.store.base import Store, StoreState
from vmfactory.store.errors import CorruptRecord, RecordNotFound
from vmfactory.store.keys import PART_PATTERN, validate_key
from vmfactory.store.record import EnvelopeError, decode_record, encode_record

__all__ = ["FilesystemStore"]

logger = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
DIR_SUFFIX = ".d"
RECORD_SUFFIX = ".rec"
TEMP_SUFFIX = ".tmp"
LOCK_NAME = "LOCK"
DATA_DIR = "data"
CORRUPT_DIR = "corrupt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dir(path: Path) -> bool:
    """Create ``path`` with mode 0700 if missing; return True if created."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise StoreError(f"{path} exists and is not a directory") from None
        return False
    os.chmod(path, DIR_MODE)
    return True


def _make_dirs(base: Path, names: list[str]) -> Path:
    """Create ``base/names[0]/names[1]/...`` (0700 each); fsync new entries."""
    current = base
    for name in names:
        child = current / name
        if _make_dir(child):
            _fsync_dir(current)
        current = child
    return current


def _read_file(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _unique_suffix() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


class FilesystemStore(Store):
    """A :class:`~vmfactory.store.base.Store` keeping one file per key.

    Several processes may open the same root at once; their writes are
    serialized with ``flock`` on the ``LOCK`` file.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(os.path.abspath(os.fspath(root)))
        self._data = self._root / DATA_DIR
        self._corrupt = self._root / CORRUPT_DIR
        self._thread_lock = threading.Lock()
        try:
            self._root.parent.mkdir(parents=True, exist_ok=True)
            if _make_dir(self._root):
                _fsync_dir(self._root.parent)
            if _make_dir(self._data):
                _fsync_dir(self._root)
            self._lock_fd = os.open(self._root / LOCK_NAME, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as exc:
            raise StoreError(f"cannot open filesystem store at {self._root}: {exc}") from exc
        super().__init__(str(self._root))
        try:
            os.fchmod(self._lock_fd, FILE_MODE)
            self._clean_temp_files()
        except OSError as exc:
            self.close()
            raise StoreError(f"cannot open filesystem store at {self._root}: {exc}") from exc
        except BaseException:
            self.close()
            raise
        logger.info("opened filesystem store at %s", self._root)

    @property
    def root(self) -> Path:
        """The store's root directory."""
        return self._root

    def record_path(self, key: str) -> Path:
        """The file that holds ``key`` (whether or not it exists).

        For diagnostics and tests.  Raises :class:`InvalidKey` for a bad key.
        """
        validate_key(key)
        *dirs, leaf = key.split("/")
        return self._data.joinpath(*(d + DIR_SUFFIX for d in dirs), leaf + RECORD_SUFFIX)

    # -- locking -------------------------------------------------------------

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """Exclusive across threads (``threading.Lock``) and processes (``flock``)."""
        with self._thread_lock:
            self._check_state("write", (StoreState.OPEN,))  # closed while we waited?
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _clean_temp_files(self) -> None:
        """Remove temp files a crashed writer left behind.

        Runs under the write lock, so no live writer has a temp file in flight.
        """
        with self._write_lock():
            for dirpath, dirnames, filenames in os.walk(self._data):
                dirnames[:] = [d for d in dirnames if d.endswith(DIR_SUFFIX)]
                for name in filenames:
                    if name.endswith(TEMP_SUFFIX):
                        stale = Path(dirpath, name)
                        logger.warning("removing leftover temp file %s", stale)
                        stale.unlink(missing_ok=True)

    # -- hooks -----------------------------------------------------------------

    def _save(self, key: str, value: bytes) -> None:
        self._save_many([(key, value)])
        logger.debug("saved %s (%d bytes)", key, len(value))

    def _save_many(self, items: list[tuple[str, bytes]]) -> None:
        # Each record is its own fsynced file renamed into place; the renames of
        # one group share one fsync per directory.
        dirs: dict[Path, None] = {}
        with self._write_lock():
            for key, value in items:
                target = self.record_path(key)
                try:
                    _make_dirs(self._data, list(target.parent.relative_to(self._data).parts))
                    self._write_file(target, encode_record(value))
                except OSError as exc:
                    raise StoreError(f"saving {key!r} to {target} failed: {exc}") from exc
                dirs[target.parent] = None
            for directory in dirs:
                try:
                    _fsync_dir(directory)
                except OSError as exc:
                    raise StoreError(f"syncing {directory} failed: {exc}") from exc

    def _write_file(self, target: Path, data: bytes) -> None:
        """Replace ``target`` by a synced temp file (its directory is not synced)."""
        tmp = target.with_name(f".{target.name}.{_unique_suffix()}{TEMP_SUFFIX}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            try:
                os.fchmod(fd, FILE_MODE)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _load(self, key: str) -> bytes:
        path = self.record_path(key)
        data = self._read_record(key, path)
        try:
            return decode_record(data)
        except EnvelopeError:
            return self._recover(key, path)

    @staticmethod
    def _read_record(key: str, path: Path) -> bytes:
        try:
            return _read_file(path)
        except (FileNotFoundError, NotADirectoryError):
            raise RecordNotFound(key) from None
        except OSError as exc:
            raise StoreError(f"reading {key!r} from {path} failed: {exc}") from exc

    def _recover(self, key: str, path: Path) -> bytes:
        """Re-check a record that failed its checksum, under the write lock.

        A writer may have replaced it since we read it; if it is now valid we
        return it.  If it is still bad we move it into ``corrupt/`` and raise.
        """
        with self._write_lock():
            data = self._read_record(key, path)
            try:
                return decode_record(data)
            except EnvelopeError as exc:
                reason = str(exc)
            try:
                moved_to = self._quarantine(path)
            except OSError as exc:
                raise StoreError(f"cannot move corrupt record {key!r} aside: {exc}") from exc
        logger.error("record %s is corrupt (%s); moved to %s", key, reason, moved_to)
        raise CorruptRecord(key, reason, str(moved_to))

    def _quarantine(self, path: Path) -> Path:
        rel = path.relative_to(self._data)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        _make_dir(self._corrupt)
        dest_dir = _make_dirs(self._corrupt, list(rel.parent.parts))
        dest = dest_dir / f"{rel.name}.{stamp}.{_unique_suffix()}.bad"
        os.rename(path, dest)
        _fsync_dir(dest_dir)
        _fsync_dir(path.parent)
        return dest

    def _delete(self, key: str) -> None:
        path = self.record_path(key)
        with self._write_lock():
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                raise RecordNotFound(key) from None
            except OSError as exc:
                raise StoreError(f"deleting {key!r} ({path}) failed: {exc}") from exc
            _fsync_dir(path.parent)
            self._prune_empty_dirs(path.parent)
        logger.debug("deleted %s", key)

    def _prune_empty_dirs(self, directory: Path) -> None:
        """Remove now-empty key directories up to (not including) ``data/``."""
        while directory != self._data:
            try:
                directory.rmdir()
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    return
                raise StoreError(f"cannot remove empty directory {directory}: {exc}") from exc
            _fsync_dir(directory.parent)
            directory = directory.parent

    def _list(self, prefix: str) -> list[str]:
        base = prefix[:-1] if prefix.endswith("/") else prefix
        if not base:
            return list(self._walk(self._data, []))
        keys: list[str] = []
        if not prefix.endswith("/") and self.record_path(base).is_file():
            keys.append(base)
        parts = base.split("/")
        start = self._data.joinpath(*(p + DIR_SUFFIX for p in parts))
        keys.extend(self._walk(start, parts))
        return keys

    def _walk(self, start: Path, parts: list[str]) -> Iterator[str]:
        """Yield the keys of all records at or below directory ``start``."""
        for dirpath, dirnames, filenames in os.walk(start):
            rel = Path(dirpath).relative_to(start).parts
            key_dirs = parts + [d[: -len(DIR_SUFFIX)] for d in rel]
            dirnames[:] = [d for d in dirnames if _part_of(d, DIR_SUFFIX)]
            for name in filenames:
                if _part_of(name, RECORD_SUFFIX):
                    yield "/".join(key_dirs + [name[: -len(RECORD_SUFFIX)]])

    def _close(self) -> None:
        with self._thread_lock:
            os.close(self._lock_fd)
        logger.info("closed filesystem store at %s", self._root)


def _part_of(name: str, suffix: str) -> bool:
    """True if ``name`` is a key part plus ``suffix`` (skips temp files, junk)."""
    if not name.endswith(suffix):
        return False
    part = name[: -len(suffix)]
    return part not in (".", "..") and PART_PATTERN.fullmatch(part) is not None

