"""Fixtures shared by the store tests: one fresh store per backend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmfactory.store import FilesystemStore, LevelDbStore, Store

BACKENDS = ("filesystem", "leveldb")


def make_store(backend: str, path: Path) -> Store:
    """Open a store of kind ``backend`` at ``path``."""
    if backend == "filesystem":
        return FilesystemStore(path)
    if backend == "leveldb":
        return LevelDbStore(path)
    raise AssertionError(f"unknown backend {backend}")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store_path(tmp_path: Path, backend: str) -> Path:
    return tmp_path / f"{backend}-store"


@pytest.fixture
def open_backend(backend: str, store_path: Path) -> Iterator[Callable[[], Store]]:
    """A callable opening (again) the test's store; everything is closed at teardown."""
    opened: list[Store] = []

    def _open() -> Store:
        store = make_store(backend, store_path)
        opened.append(store)
        return store

    yield _open
    for store in opened:
        store.close()


@pytest.fixture
def store(open_backend: Callable[[], Store]) -> Store:
    return open_backend()
