"""Metadata storage plugins: a small durable key/value store with two backends.

Open one with :func:`open_store`::

    store = open_store("file:///var/lib/vmfactory/store")
    store = open_store("leveldb:///var/lib/vmfactory/meta.ldb")

``LevelDbStore`` is imported lazily so the filesystem backend works even where
plyvel cannot be imported.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from vmfactory.errors import StoreError
from vmfactory.store.base import Store, StoreState
from vmfactory.store.errors import (
    CorruptRecord,
    InvalidKey,
    InvalidStoreUrl,
    RecordFormatError,
    RecordNotFound,
    StoreClosed,
    StoreLocked,
)
from vmfactory.store.filesystem import FilesystemStore
from vmfactory.store.keys import validate_key

if TYPE_CHECKING:
    from vmfactory.store.leveldb import LevelDbStore

__all__ = [
    "CorruptRecord",
    "FilesystemStore",
    "InvalidKey",
    "InvalidStoreUrl",
    "LevelDbStore",
    "RecordFormatError",
    "RecordNotFound",
    "Store",
    "StoreClosed",
    "StoreError",
    "StoreLocked",
    "StoreState",
    "open_store",
    "validate_key",
]

SCHEMES = ("file", "leveldb")


def _url_path(url: str) -> tuple[str, str]:
    """Split a store URL into (scheme, absolute path) or raise InvalidStoreUrl."""
    if not isinstance(url, str) or not url:
        raise InvalidStoreUrl(str(url), "empty or not a string")
    parts = urlsplit(url)
    if not parts.scheme:
        raise InvalidStoreUrl(url, "no scheme")
    if parts.scheme not in SCHEMES:
        raise InvalidStoreUrl(url, f"unknown scheme {parts.scheme!r}")
    if parts.netloc:
        raise InvalidStoreUrl(url, f"host {parts.netloc!r} given; paths must be absolute")
    if parts.query or parts.fragment:
        raise InvalidStoreUrl(url, "query strings and fragments are not supported")
    path = unquote(parts.path)
    if not path.startswith("/") or path == "/":
        raise InvalidStoreUrl(url, "the path must be absolute and not the root directory")
    if "\0" in path:
        raise InvalidStoreUrl(url, "NUL byte in the path")
    return parts.scheme, os.path.normpath(path)


def open_store(url: str) -> Store:
    """Open the store named by ``url``.

    ``file:///abs/path`` opens a :class:`FilesystemStore` rooted at the path,
    ``leveldb:///abs/path`` a :class:`LevelDbStore`.  Anything else raises
    :class:`InvalidStoreUrl`.
    """
    scheme, path = _url_path(url)
    if scheme == "file":
        return FilesystemStore(path)
    from vmfactory.store.leveldb import LevelDbStore

    return LevelDbStore(path)


def __getattr__(name: str) -> Any:
    if name == "LevelDbStore":
        from vmfactory.store.leveldb import LevelDbStore

        return LevelDbStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
