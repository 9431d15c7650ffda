"""Metadata records of live VMs: what a restarted daemon needs to take them back.

``vms/<id>`` holds the VM's spec, pid, size, role (pooled or leased) and, for a
leased VM, its lease.  A record is written when a VM enters a pool or a lease
and dropped when the VM stops.  Writes from the event loop go through
:meth:`VmRecords.commit`, a group commit: the records committed while one
synced write is in flight share the next one, so a burst of handouts costs a
few syncs, not one each.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from typing import Any

from vmfactory.hypervisor.base import Vm, VmState
from vmfactory.store import CorruptRecord, RecordNotFound, Store

logger = logging.getLogger(__name__)


class Role(enum.StrEnum):
    """Who a recorded VM belongs to."""

    POOLED = "pooled"
    LEASED = "leased"


class VmRecords:
    """``vms/<id>`` records in the metadata store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._queue: list[tuple[str, bytes, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    @staticmethod
    def _encode(vm: Vm, role: Role, pool: str, lease: dict[str, Any] | None) -> bytes:
        record = {"vm_id": vm.id, "pid": vm.pid, "spec": vm.spec.to_record(),
                  "cpus": vm.cpus, "memory_mib": vm.memory_mib, "role": role.value, "pool": pool,
                  "lease": lease, "paused": vm.state is VmState.PAUSED}
        return json.dumps(record, sort_keys=True, separators=(",", ":"),
                          allow_nan=False).encode()

    def save(self, vm: Vm, role: Role, pool: str = "",
             lease: dict[str, Any] | None = None) -> None:
        """(Re)write ``vm``'s record and drop it automatically when the VM stops."""
        self._store.save(f"vms/{vm.id}", self._encode(vm, role, pool, lease))
        self._drop_on_stop(vm)

    async def commit(self, vm: Vm, role: Role, pool: str = "",
                     lease: dict[str, Any] | None = None) -> None:
        """:meth:`save`, off the event loop and grouped with the records other
        callers commit meanwhile.  The record is read now; once this returns it
        is synced.  A caller cancelled meanwhile does not stop the write."""
        done = asyncio.get_running_loop().create_future()
        self._queue.append((f"vms/{vm.id}", self._encode(vm, role, pool, lease), done))
        if self._writer is None:
            # Its outcome reaches every committer through their futures, which
            # is where a failure is raised and logged.
            self._writer = asyncio.ensure_future(self._write_groups())
        await asyncio.shield(done)
        self._drop_on_stop(vm)

    async def _write_groups(self) -> None:
        """Write what is queued, one group per synced write, until nothing is."""
        group: list[tuple[str, bytes, asyncio.Future[None]]] = []
        try:
            while self._queue:
                group, self._queue = self._queue, []
                try:
                    await asyncio.to_thread(self._store.save_many,
                                            [(key, value) for key, value, _ in group])
                except Exception as exc:
                    for _, _, done in group:
                        done.set_exception(exc)
                    continue
                for _, _, done in group:
                    done.set_result(None)
        finally:
            self._writer = None
            for _, _, done in group + self._queue:  # cancelled: the loop is closing
                if not done.done():
                    done.cancel()

    def _drop_on_stop(self, vm: Vm) -> None:
        if self._drop not in vm.stop_callbacks:
            vm.stop_callbacks.append(self._drop)

    def _drop(self, vm: Vm) -> None:
        self.delete(vm.id)

    def delete(self, vm_id: str) -> None:
        try:
            self._store.delete(f"vms/{vm_id}")
        except RecordNotFound:
            pass

    def load_all(self) -> dict[str, dict[str, Any]]:
        """Every readable record by the VM id its key names; corrupt ones are set
        aside by the store."""
        out = {}
        for key in self._store.list("vms/"):
            try:
                out[key.split("/", 1)[1]] = self._store.load_json(key)
            except CorruptRecord as exc:
                logger.error("skipping corrupt record %s: %s", key, exc)
        return out
