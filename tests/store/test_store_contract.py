"""The Store contract, run against every backend."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from vmfactory.errors import StoreError, VmFactoryError
from vmfactory.store import (
    CorruptRecord,
    InvalidKey,
    InvalidStoreUrl,
    RecordFormatError,
    RecordNotFound,
    Store,
    StoreClosed,
    StoreLocked,
    StoreState,
)

BAD_KEYS = [
    "",
    "/a",
    "a/",
    "a//b",
    "../x",
    "a/../b",
    "a/./b",
    ".",
    "a b",
    "a\\b",
    "a\0b",
    "a\nb",
    "caf\u00e9",
    "a/*",
    "x" * 600,
    "x" * 201,
    "/".join(["y" * 100] * 6),  # parts fine, 605 characters in all
]


@pytest.mark.parametrize(
    "value",
    [b"", b"x", b"\x00\xff" * 1000, bytes(range(256)), b"VMFR" + b"\0" * 20, b"z" * 300_000],
    ids=["empty", "one", "binary", "all-bytes", "looks-like-header", "large"],
)
def test_round_trip(store: Store, value: bytes) -> None:
    store.save("vms/vm-1/config", value)
    assert store.load("vms/vm-1/config") == value


def test_accepts_bytes_like_values_and_rejects_others(store: Store) -> None:
    store.save("a", bytearray(b"ba"))
    assert store.load("a") == b"ba"
    store.save("b", memoryview(b"mv"))
    assert store.load("b") == b"mv"
    with pytest.raises(TypeError):
        store.save("c", "text")  # type: ignore[arg-type]
    with pytest.raises(RecordNotFound):
        store.load("c")


def test_overwrite_replaces_value(store: Store) -> None:
    store.save("k", b"first")
    store.save("k", b"second, longer value")
    store.save("k", b"3")
    assert store.load("k") == b"3"
    assert store.list() == ["k"]


def test_load_missing_raises_record_not_found(store: Store) -> None:
    with pytest.raises(RecordNotFound) as info:
        store.load("vms/nope")
    assert info.value.key == "vms/nope"
    assert "vms/nope" in str(info.value)


def test_delete(store: Store) -> None:
    store.save("vms/a", b"1")
    store.save("vms/b", b"2")
    store.delete("vms/a")
    with pytest.raises(RecordNotFound):
        store.load("vms/a")
    assert store.load("vms/b") == b"2"
    assert store.list() == ["vms/b"]
    with pytest.raises(RecordNotFound) as info:
        store.delete("vms/a")
    assert info.value.key == "vms/a"


def test_delete_missing_raises_record_not_found(store: Store) -> None:
    with pytest.raises(RecordNotFound):
        store.delete("never/saved")


def test_list_prefixes_on_part_boundaries(store: Store) -> None:
    keys = ["vm", "vms", "vms/a", "vms/b/c", "vmsx/y", "vms.old/q", "other/z"]
    for key in keys:
        store.save(key, key.encode())
    assert store.list() == sorted(keys)
    assert store.list("") == sorted(keys)
    assert store.list("vms/") == ["vms/a", "vms/b/c"]
    assert store.list("vms") == ["vms", "vms/a", "vms/b/c"]
    assert store.list("vm") == ["vm"]
    assert store.list("vm/") == []
    assert store.list("vms/b/") == ["vms/b/c"]
    assert store.list("vms/b") == ["vms/b/c"]
    assert store.list("vms/b/c") == ["vms/b/c"]
    assert store.list("nothing/") == []
    assert store.list("other/") == ["other/z"]


def test_list_on_empty_store(store: Store) -> None:
    assert store.list() == []
    assert store.list("a/") == []


@pytest.mark.parametrize("prefix", ["/", "a//", "../", "a b/", "a/../", "//", "a\\b"])
def test_list_rejects_bad_prefix(store: Store, prefix: str) -> None:
    with pytest.raises(InvalidKey):
        store.list(prefix)


def test_key_and_children_coexist(store: Store) -> None:
    pairs = {
        "a": b"parent",
        "a/b": b"child",
        "a/b/c": b"grandchild",
        "foo": b"foo",
        "foo.rec/bar": b"looks like a record file name",
        "foo.d": b"looks like a directory name",
        "foo.d/x": b"inside",
        "x.tmp": b"looks like a temp file",
    }
    for key, value in pairs.items():
        store.save(key, value)
    assert store.list() == sorted(pairs)
    for key, value in pairs.items():
        assert store.load(key) == value
    store.delete("a")
    assert store.load("a/b") == b"child"
    store.delete("a/b/c")
    assert store.load("a/b") == b"child"
    assert store.list("a") == ["a/b"]


@pytest.mark.parametrize(
    "key",
    ["a.b", "A-Z_0:9@x+y=z", "...", ".hidden", "a..b", "-", "v/1.0/x", "=/+/@"],
)
def test_unusual_valid_keys(store: Store, key: str) -> None:
    store.save(key, key.encode())
    assert store.load(key) == key.encode()
    assert store.list() == [key]


def test_longest_key(store: Store) -> None:
    key = "/".join(["a" * 200, "b" * 200, "c" * 110])
    assert len(key) == 512
    store.save(key, b"long")
    assert store.load(key) == b"long"
    assert store.list() == [key]
    with pytest.raises(InvalidKey):
        store.save(key + "c", b"too long")


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda k: repr(k)[:30])
def test_invalid_keys_raise_invalid_key(store: Store, key: str) -> None:
    for call in (lambda: store.save(key, b"v"), lambda: store.load(key), lambda: store.delete(key)):
        with pytest.raises(InvalidKey) as info:
            call()
        assert repr(key) in str(info.value)
        assert info.value.key == key
    assert store.list() == []


@pytest.mark.parametrize("key", [None, b"a", 3])
def test_non_string_keys_raise_invalid_key(store: Store, key: object) -> None:
    with pytest.raises(InvalidKey):
        store.save(key, b"v")  # type: ignore[arg-type]


def test_closed_store_raises_store_closed(store: Store) -> None:
    store.save("k", b"v")
    assert store.state is StoreState.OPEN
    store.close()
    assert store.state is StoreState.CLOSED
    assert store.closed
    calls: list[Callable[[], object]] = [
        lambda: store.save("k", b"v"),
        lambda: store.load("k"),
        lambda: store.delete("k"),
        lambda: store.list(),
        lambda: store.save_json("j", {}),
        lambda: store.load_json("k"),
        lambda: store.__enter__(),
    ]
    for call in calls:
        with pytest.raises(StoreClosed):
            call()


def test_close_is_idempotent(store: Store) -> None:
    store.close()
    store.close()
    assert store.state is StoreState.CLOSED


def test_context_manager_closes(open_backend: Callable[[], Store]) -> None:
    with open_backend() as store:
        store.save("k", b"v")
        assert store.state is StoreState.OPEN
    assert store.state is StoreState.CLOSED
    with pytest.raises(StoreClosed):
        store.load("k")


def test_data_persists_across_reopen(open_backend: Callable[[], Store]) -> None:
    first = open_backend()
    first.save("vms/a", b"alpha")
    first.save("vms/b/c", b"gamma")
    first.save("gone", b"x")
    first.delete("gone")
    first.close()
    second = open_backend()
    assert second.list() == ["vms/a", "vms/b/c"]
    assert second.load("vms/a") == b"alpha"
    assert second.load("vms/b/c") == b"gamma"
    with pytest.raises(RecordNotFound):
        second.load("gone")


def test_json_round_trip(store: Store) -> None:
    doc = {"id": "vm-1", "cpus": 2, "tags": ["a", "b"], "ok": True, "none": None}
    store.save_json("vms/vm-1", doc)
    assert store.load_json("vms/vm-1") == doc
    assert store.load("vms/vm-1") == (
        b'{"cpus":2,"id":"vm-1","none":null,"ok":true,"tags":["a","b"]}'
    )


def test_load_json_of_non_json_raises_record_format_error(store: Store) -> None:
    store.save("raw", b"\xff not json")
    with pytest.raises(RecordFormatError) as info:
        store.load_json("raw")
    assert info.value.key == "raw"
    assert store.load("raw") == b"\xff not json"


def test_save_json_rejects_unserializable(store: Store) -> None:
    with pytest.raises(TypeError):
        store.save_json("k", {"x": object()})
    with pytest.raises(ValueError):
        store.save_json("k", float("nan"))
    with pytest.raises(RecordNotFound):
        store.load("k")


def test_errors_derive_from_store_error() -> None:
    for cls in (InvalidKey, RecordNotFound, CorruptRecord, StoreLocked, StoreClosed,
                InvalidStoreUrl, RecordFormatError):
        assert issubclass(cls, StoreError)
        assert issubclass(cls, VmFactoryError)


def test_save_many_saves_every_record_last_value_wins(open_backend: Callable[[], Store]) -> None:
    store = open_backend()
    store.save("vms/a", b"old")
    store.save_many([("vms/a", b"1"), ("vms/b", b"2"), ("other", b"3"), ("vms/a", b"4")])
    assert [store.load(k) for k in ("vms/a", "vms/b", "other")] == [b"4", b"2", b"3"]
    store.close()
    store = open_backend()  # durable: a new handle reads the same
    assert store.list() == ["other", "vms/a", "vms/b"] and store.load("vms/a") == b"4"
    store.save_many([])  # nothing to write is fine


def test_save_many_checks_every_key_before_writing(store: Store) -> None:
    with pytest.raises(InvalidKey):
        store.save_many([("vms/a", b"1"), ("../escape", b"2")])
    with pytest.raises(TypeError):
        store.save_many([("vms/a", b"1"), ("vms/b", "text")])  # type: ignore[list-item]
    assert store.list() == []
    store.close()
    with pytest.raises(StoreClosed):
        store.save_many([("vms/a", b"1")])
