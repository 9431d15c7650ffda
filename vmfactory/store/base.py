"""The abstract metadata store.

This is vmfactory's take on Kata Containers' metadata storage plugin API
(``Save(key, value)``, ``Load(key)``, ``Delete(key)``), plus ``list``,
``save_many`` (group commit) and an explicit lifecycle.  :class:`Store` owns everything the backends share: key
validation, value type checks, the open/closed state and the JSON helpers.
Backends implement the ``_save`` / ``_load`` / ``_delete`` / ``_list`` /
``_close`` hooks and may assume the key is valid and the store is open.
"""

from __future__ import annotations

import enum
import json
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

from vmfactory.store.errors import RecordFormatError, StoreClosed
from vmfactory.store.keys import key_in_prefix, validate_key, validate_prefix
from vmfactory.util.states import Lifecycle, require

__all__ = ["Store", "StoreState"]

logger = logging.getLogger(__name__)


class StoreState(enum.Enum):
    """Lifecycle of a :class:`Store`: born OPEN, ends CLOSED, never reopens."""

    OPEN = "open"
    CLOSED = "closed"


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"store values must be bytes, not {type(value).__name__}")


class Store(Lifecycle[StoreState], ABC):
    """A key/value store for vmfactory metadata.

    Keys follow :mod:`vmfactory.store.keys`; values are opaque bytes.  Every
    public method raises :class:`~vmfactory.store.errors.StoreClosed` once the
    store is closed and :class:`~vmfactory.store.errors.InvalidKey` for a bad
    key.  Instances are safe to share between threads; closing while other
    threads still use the store is the caller's problem.
    """

    def __init__(self, location: str) -> None:
        self._location = location
        self._state_lock = threading.Lock()
        self._set_state(StoreState.OPEN)

    # -- lifecycle ---------------------------------------------------------

    @property
    def location(self) -> str:
        """Where the store lives (a filesystem path for both backends)."""
        return self._location

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self.state is StoreState.CLOSED

    def _lifecycle_name(self) -> str:
        return f"{type(self).__name__} at {self._location}"

    def _state_error(self, operation: str) -> Exception:
        return StoreClosed(f"{type(self).__name__} at {self._location} is closed")

    def close(self) -> None:
        """Release the store's resources.  Calling it again does nothing."""
        with self._state_lock:
            if self.state is StoreState.CLOSED:
                return
            self._set_state(StoreState.CLOSED)
            self._close()

    @require(StoreState.OPEN, operation="open")
    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._location} {self.state.value}>"

    # -- the plugin API ----------------------------------------------------

    @require(StoreState.OPEN)
    def save(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` durably, replacing any previous value.

        When this returns the record survives a crash or power loss.
        """
        validate_key(key)
        self._save(key, _as_bytes(value))

    @require(StoreState.OPEN)
    def save_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """:meth:`save` for each ``(key, value)`` in order (a key given twice keeps
        its last value), sharing the backend's synced writes (group commit).

        When this returns every record survives a crash; a failure part way may
        leave the earlier records saved and the later ones not.  Every key is
        checked before anything is written.
        """
        checked = []
        for key, value in items:
            validate_key(key)
            checked.append((key, _as_bytes(value)))
        if checked:
            self._save_many(checked)

    @require(StoreState.OPEN)
    def load(self, key: str) -> bytes:
        """Return the value stored under ``key``.

        Raises :class:`~vmfactory.store.errors.RecordNotFound` if there is none,
        and :class:`~vmfactory.store.errors.CorruptRecord` if the stored bytes
        fail their checksum (they are moved aside first, so the key then reads
        as missing).
        """
        validate_key(key)
        return self._load(key)

    @require(StoreState.OPEN)
    def delete(self, key: str) -> None:
        """Remove the record under ``key``.

        Raises :class:`~vmfactory.store.errors.RecordNotFound` if there is none.
        """
        validate_key(key)
        self._delete(key)

    @require(StoreState.OPEN)
    def list(self, prefix: str = "") -> list[str]:
        """Return the sorted keys selected by ``prefix``.

        Prefixes work on part boundaries: ``""`` selects all keys, ``"vms/"``
        selects keys under ``vms`` (``vms/a``, ``vms/b/c``), and ``"vms"``
        selects ``vms`` itself plus keys under it, never ``vmsx``.
        """
        validate_prefix(prefix)
        return sorted(k for k in self._list(prefix) if key_in_prefix(k, prefix))

    # -- conveniences ------------------------------------------------------

    def save_json(self, key: str, obj: Any) -> None:
        """Save ``obj`` as compact, key-sorted UTF-8 JSON.

        Raises ``TypeError`` / ``ValueError`` if ``obj`` is not serializable.
        """
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
        self.save(key, text.encode("utf-8"))

    def load_json(self, key: str) -> Any:
        """Load a record written by :meth:`save_json`.

        Raises :class:`~vmfactory.store.errors.RecordFormatError` if the record
        is intact but does not hold UTF-8 JSON.
        """
        raw = self.load(key)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RecordFormatError(key, f"not UTF-8 JSON ({exc})") from None

    # -- backend hooks -----------------------------------------------------

    @abstractmethod
    def _save(self, key: str, value: bytes) -> None:
        """Durably store ``value`` under the already validated ``key``."""

    def _save_many(self, items: list[tuple[str, bytes]]) -> None:
        """Durably store each validated ``(key, value)``; backends that can share
        one synced write among them override this."""
        for key, value in items:
            self._save(key, value)

    @abstractmethod
    def _load(self, key: str) -> bytes:
        """Return the payload under ``key`` or raise RecordNotFound/CorruptRecord."""

    @abstractmethod
    def _delete(self, key: str) -> None:
        """Delete ``key`` or raise RecordNotFound."""

    @abstractmethod
    def _list(self, prefix: str) -> list[str]:
        """Return keys that may match ``prefix`` (a superset is fine; the base
        filters on part boundaries and sorts)."""

    @abstractmethod
    def _close(self) -> None:
        """Release resources; called exactly once."""
