"""VM records' group commit: concurrent commits share synced writes.

The VMs here are a test double (only what a record reads); the store is a real
FilesystemStore whose save_many is slowed down, so commits pile up behind it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vmfactory.daemon.records import Role, VmRecords
from vmfactory.errors import StoreError
from vmfactory.hypervisor.base import VmState
from vmfactory.store import FilesystemStore


@dataclass
class _Spec:
    def to_record(self) -> dict[str, Any]:
        return {"kind": "test"}


@dataclass
class _RecordedVm:
    """A test double: the attributes VmRecords reads."""

    id: str
    pid: int = 1
    cpus: int = 1
    memory_mib: int = 128
    state: VmState = VmState.RUNNING
    spec: _Spec = field(default_factory=_Spec)
    stop_callbacks: list[Any] = field(default_factory=list)


class _SlowStore(FilesystemStore):
    """A real filesystem store whose group writes take ``delay`` seconds each."""

    def __init__(self, root: Path, delay: float = 0.05) -> None:
        super().__init__(root)
        self.delay = delay
        self.groups: list[list[str]] = []
        self.fail: Exception | None = None
        self._lock = threading.Lock()

    def _save_many(self, items: list[tuple[str, bytes]]) -> None:
        with self._lock:
            self.groups.append([key for key, _ in items])
            fail = self.fail
        time.sleep(self.delay)
        if fail is not None:
            raise fail
        super()._save_many(items)


async def test_concurrent_commits_share_synced_writes(tmp_path: Path) -> None:
    store = _SlowStore(tmp_path / "s")
    records = VmRecords(store)
    vms = [_RecordedVm(f"vm{i}") for i in range(30)]

    def commit(vm: _RecordedVm) -> asyncio.Future[None]:
        return asyncio.ensure_future(records.commit(vm, Role.LEASED, "p",  # type: ignore[arg-type]
                                                    {"id": vm.id}))
    # Ten in the same tick share one write; one more, then 19 queued while it is
    # in flight share the next.
    await asyncio.gather(*(commit(vm) for vm in vms[:10]))
    first = commit(vms[10])
    await asyncio.sleep(0.01)
    await asyncio.gather(first, *(commit(vm) for vm in vms[11:]))
    assert [len(g) for g in store.groups] == [10, 1, 19]
    loaded = records.load_all()
    assert sorted(loaded) == sorted(vm.id for vm in vms)
    assert loaded["vm17"]["lease"] == {"id": "vm17"} and loaded["vm17"]["role"] == "leased"
    assert all(records._drop in vm.stop_callbacks for vm in vms)
    store.close()


async def test_a_failed_group_write_fails_each_of_its_commits_and_the_next_group_writes(
        tmp_path: Path) -> None:
    store = _SlowStore(tmp_path / "s")
    records = VmRecords(store)
    store.fail = StoreError("disk full")
    first = asyncio.ensure_future(records.commit(_RecordedVm("a"), Role.POOLED))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)  # "a" is being written: the next two queue behind it
    store.fail = None
    rest = [asyncio.ensure_future(records.commit(_RecordedVm(n), Role.POOLED))  # type: ignore[arg-type]
            for n in ("b", "c")]
    with pytest.raises(StoreError, match="disk full"):
        await first
    await asyncio.gather(*rest)
    assert sorted(records.load_all()) == ["b", "c"]
    store.close()


async def test_a_cancelled_committer_does_not_stop_the_write(tmp_path: Path) -> None:
    store = _SlowStore(tmp_path / "s", delay=0.1)
    records = VmRecords(store)
    task = asyncio.ensure_future(records.commit(_RecordedVm("a"), Role.POOLED))  # type: ignore[arg-type]
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)
    assert list(records.load_all()) == ["a"]
    store.close()
