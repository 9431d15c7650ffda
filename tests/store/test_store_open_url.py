"""open_store: URL parsing and backend selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmfactory.errors import StoreError
from vmfactory.store import FilesystemStore, InvalidStoreUrl, LevelDbStore, open_store


def test_file_url_opens_filesystem_store(tmp_path: Path) -> None:
    with open_store(f"file://{tmp_path}/fs") as store:
        assert isinstance(store, FilesystemStore)
        assert store.location == str(tmp_path / "fs")
        store.save("k", b"v")
    assert (tmp_path / "fs" / "data" / "k.rec").is_file()


def test_leveldb_url_opens_leveldb_store(tmp_path: Path) -> None:
    with open_store(f"leveldb://{tmp_path}/meta.ldb") as store:
        assert isinstance(store, LevelDbStore)
        assert store.location == str(tmp_path / "meta.ldb")
        store.save("k", b"v")
    with LevelDbStore(tmp_path / "meta.ldb") as again:
        assert again.load("k") == b"v"


def test_percent_encoded_path(tmp_path: Path) -> None:
    with open_store(f"file://{tmp_path}/with%20space") as store:
        assert store.location == str(tmp_path / "with space")


@pytest.mark.parametrize(
    "url",
    [
        "",
        "/abs/path",
        "relative/path",
        "file://relative/path",
        "file:relative/path",
        "leveldb:relative",
        "leveldb://host/abs",
        "file:///",
        "file://",
        "s3:///bucket/x",
        "http://example.com/x",
        "memory://",
        "sqlite:///tmp/x.db",
        "file:///tmp/x?mode=ro",
        "file:///tmp/x#frag",
    ],
)
def test_bad_urls_raise_invalid_store_url(url: str) -> None:
    with pytest.raises(InvalidStoreUrl) as info:
        open_store(url)
    assert isinstance(info.value, StoreError)
    assert repr(url) in str(info.value)
    assert "file:///" in str(info.value)
