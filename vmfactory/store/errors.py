"""Errors raised by the metadata store layer.

All of them derive from :class:`vmfactory.errors.StoreError`, so callers that
only care about "the store failed" can catch that one class.
"""

from __future__ import annotations

from vmfactory.errors import StoreError

__all__ = [
    "CorruptRecord",
    "InvalidKey",
    "InvalidStoreUrl",
    "RecordFormatError",
    "RecordNotFound",
    "StoreClosed",
    "StoreError",
    "StoreLocked",
]


class InvalidKey(StoreError, ValueError):
    """A key (or list prefix) does not follow the store key rules."""

    def __init__(self, key: object, reason: str) -> None:
        super().__init__(f"invalid store key {key!r}: {reason}")
        self.key = key
        self.reason = reason


class RecordNotFound(StoreError, KeyError):
    """No record exists under ``key``."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the single argument; keep a sentence.
        return f"no record under key {self.key!r}"


class CorruptRecord(StoreError):
    """The record under ``key`` failed its integrity check.

    The bad bytes were moved aside (``moved_to`` says where, when known) so the
    key reads as missing afterwards; nothing is deleted silently.
    """

    def __init__(self, key: str, reason: str, moved_to: str | None = None) -> None:
        where = f"; bad bytes kept at {moved_to}" if moved_to else ""
        super().__init__(f"record {key!r} is corrupt: {reason}{where}")
        self.key = key
        self.reason = reason
        self.moved_to = moved_to


class RecordFormatError(StoreError):
    """A record is intact but does not hold the expected format (e.g. JSON)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"record {key!r} has an unexpected format: {reason}")
        self.key = key
        self.reason = reason


class StoreLocked(StoreError):
    """Another process (or another handle) holds the store at ``path``."""

    def __init__(self, path: str, detail: str = "") -> None:
        extra = f" ({detail})" if detail else ""
        super().__init__(f"store at {path} is locked by another process or handle{extra}")
        self.path = path


class StoreClosed(StoreError):
    """An operation was attempted on a store that has been closed."""


class InvalidStoreUrl(StoreError, ValueError):
    """A store URL names an unknown scheme or is not an absolute path."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            f"invalid store url {url!r}: {reason} "
            "(expected file:///absolute/path or leveldb:///absolute/path)"
        )
        self.url = url
        self.reason = reason
