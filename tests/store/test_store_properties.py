"""Property-based tests: arbitrary valid keys and byte values round-trip."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmfactory.store import FilesystemStore, InvalidKey, LevelDbStore, validate_key
from vmfactory.store.keys import key_in_prefix

BACKENDS = {"filesystem": FilesystemStore, "leveldb": LevelDbStore}

PART_CHARS = "abcAZ09._@:+=-"

parts = st.one_of(
    st.sampled_from(["a", "b", "vms", "a.rec", "a.d", "x.tmp", "...", ".h", "-"]),
    st.text(alphabet=PART_CHARS, min_size=1, max_size=12),
    st.from_regex(r"[A-Za-z0-9._@:+=-]{1,40}", fullmatch=True),
).filter(lambda p: p not in (".", ".."))

keys = st.lists(parts, min_size=1, max_size=4).map("/".join).filter(lambda k: len(k) <= 512)

records = st.dictionaries(keys, st.binary(max_size=2048), max_size=8)


@pytest.mark.parametrize("backend_name", sorted(BACKENDS))
@settings(max_examples=40, deadline=None)
@given(records=records, data=st.data())
def test_round_trip_property(backend_name, tmp_path_factory, records, data):
    path = tmp_path_factory.mktemp(backend_name) / "store"
    with BACKENDS[backend_name](path) as store:
        for key, value in records.items():
            store.save(key, value)
        for key, value in records.items():
            assert store.load(key) == value
        assert store.list() == sorted(records)
        if records:
            key = data.draw(st.sampled_from(sorted(records)), label="prefix source")
            key_parts = key.split("/")
            cut = data.draw(st.integers(1, len(key_parts)), label="prefix parts")
            prefix = "/".join(key_parts[:cut]) + data.draw(st.sampled_from(["", "/"]))
            expected = sorted(k for k in records if key_in_prefix(k, prefix))
            assert store.list(prefix) == expected
            assert key in store.list("/".join(key_parts[:cut]))
    with BACKENDS[backend_name](path) as store:
        assert {k: store.load(k) for k in store.list()} == records
        for key in records:
            store.delete(key)
        assert store.list() == []


REFERENCE = re.compile(r"[A-Za-z0-9._@:+=-]{1,200}(/[A-Za-z0-9._@:+=-]{1,200})*")


def _reference_valid(key: str) -> bool:
    return (
        REFERENCE.fullmatch(key) is not None
        and len(key) <= 512
        and not any(p in (".", "..") for p in key.split("/"))
    )


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="ab./ \\\0\u00e9-", max_size=12))
def test_key_validation_matches_the_rules(key):
    try:
        validate_key(key)
    except InvalidKey as exc:
        assert not _reference_valid(key), key
        assert repr(key) in str(exc)
    else:
        assert _reference_valid(key), key
