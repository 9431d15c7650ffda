"""LevelDB backend (via plyvel): one database per store path.

Records live under the raw key ``b"rec:" + key``; values carry the same
checksum envelope as the filesystem backend (:mod:`vmfactory.store.record`).
A value that fails its checksum is moved, in one synced write batch, to
``b"corrupt:" + key + b"#" + <utc-time>.<id>`` which :meth:`list` never shows.
Every write uses ``sync=True``.  LevelDB itself allows one open handle per
database, so a second opener (another process, or another handle in this one)
gets :class:`~vmfactory.store.errors.StoreLocked`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator

import plyvel

from vmfactory.errors import StoreError
from vmfactory.store.base import Store
from vmfactory.store.errors import CorruptRecord, RecordNotFound, StoreClosed, StoreLocked
from vmfactory.store.record import EnvelopeError, decode_record, encode_record

__all__ = ["CORRUPT_PREFIX", "RECORD_PREFIX", "LevelDbStore", "db_key"]

logger = logging.getLogger(__name__)

RECORD_PREFIX = b"rec:"
"""Raw-key prefix of live records."""

CORRUPT_PREFIX = b"corrupt:"
"""Raw-key prefix of quarantined (corrupt) values; hidden from :meth:`list`."""

DIR_MODE = 0o700


def db_key(key: str) -> bytes:
    """The raw LevelDB key a store key is kept under (``key`` must be valid)."""
    return RECORD_PREFIX + key.encode("ascii")


def _plyvel_message(exc: BaseException) -> str:
    arg = exc.args[0] if exc.args else exc
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


class LevelDbStore(Store):
    """A :class:`~vmfactory.store.base.Store` backed by one LevelDB database."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = os.path.abspath(os.fspath(path))
        self._write_mutex = threading.Lock()
        self._db = self._open_db(self._path)
        super().__init__(self._path)
        logger.info("opened leveldb store at %s", self._path)

    @staticmethod
    def _open_db(path: str) -> plyvel.DB:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not os.path.isdir(path):
                os.mkdir(path, DIR_MODE)
                os.chmod(path, DIR_MODE)
        except OSError as exc:
            raise StoreError(f"cannot create leveldb store directory {path}: {exc}") from exc
        try:
            return plyvel.DB(path, create_if_missing=True)
        except plyvel.IOError as exc:
            message = _plyvel_message(exc)
            if "lock" in message.lower():
                raise StoreLocked(path, message) from None
            raise StoreError(f"cannot open leveldb store at {path}: {message}") from exc
        except plyvel.Error as exc:
            message = _plyvel_message(exc)
            raise StoreError(f"cannot open leveldb store at {path}: {message}") from exc

    @property
    def path(self) -> str:
        """The database directory."""
        return self._path

    @contextlib.contextmanager
    def _db_errors(self, action: str) -> Iterator[None]:
        """Translate plyvel failures into store errors."""
        try:
            yield
        except plyvel.Error as exc:
            raise StoreError(f"leveldb {action} at {self._path} failed: "
                             f"{_plyvel_message(exc)}") from exc
        except RuntimeError as exc:
            if self._db.closed:
                raise StoreClosed(f"LevelDbStore at {self._path} is closed") from exc
            raise

    # -- hooks -------------------------------------------------------------

    def _save(self, key: str, value: bytes) -> None:
        with self._write_mutex, self._db_errors(f"save of {key!r}"):
            self._db.put(db_key(key), encode_record(value), sync=True)
        logger.debug("saved %s (%d bytes)", key, len(value))

    def _save_many(self, items: list[tuple[str, bytes]]) -> None:
        # One synced batch: the records of one group commit cost one log sync.
        with self._write_mutex, self._db_errors(f"save of {len(items)} records"):
            with self._db.write_batch(sync=True) as batch:
                for key, value in items:
                    batch.put(db_key(key), encode_record(value))
        logger.debug("saved %d records in one batch", len(items))

    def _get(self, key: str) -> bytes:
        with self._db_errors(f"load of {key!r}"):
            raw = self._db.get(db_key(key))
        if raw is None:
            raise RecordNotFound(key)
        return raw

    def _load(self, key: str) -> bytes:
        raw = self._get(key)
        try:
            return decode_record(raw)
        except EnvelopeError:
            return self._recover(key)

    def _recover(self, key: str) -> bytes:
        """Re-check a bad value under the write mutex; quarantine it if still bad."""
        with self._write_mutex:
            raw = self._get(key)
            try:
                return decode_record(raw)
            except EnvelopeError as exc:
                reason = str(exc)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            aside = b"%s%s#%s.%s" % (CORRUPT_PREFIX, key.encode("ascii"), stamp.encode(),
                                     secrets.token_hex(4).encode())
            with self._db_errors(f"quarantine of {key!r}"):
                with self._db.write_batch(sync=True) as batch:
                    batch.put(aside, raw)
                    batch.delete(db_key(key))
        moved_to = aside.decode("ascii")
        logger.error("record %s is corrupt (%s); moved to raw key %s", key, reason, moved_to)
        raise CorruptRecord(key, reason, f"{self._path} raw key {moved_to}")

    def _delete(self, key: str) -> None:
        with self._write_mutex:
            self._get(key)
            with self._db_errors(f"delete of {key!r}"):
                self._db.delete(db_key(key), sync=True)
        logger.debug("deleted %s", key)

    def _list(self, prefix: str) -> list[str]:
        base = prefix[:-1] if prefix.endswith("/") else prefix
        start = RECORD_PREFIX + base.encode("ascii")
        skip = len(RECORD_PREFIX)
        with self._db_errors("list"):
            raw_keys = list(self._db.iterator(prefix=start, include_value=False))
        return [raw[skip:].decode("ascii", "replace") for raw in raw_keys]

    def _close(self) -> None:
        with self._write_mutex:
            self._db.close()
        logger.info("closed leveldb store at %s", self._path)
