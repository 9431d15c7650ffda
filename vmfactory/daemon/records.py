"""Metadata records of live VMs: what a restarted daemon needs to take them back.

``vms/<id>`` holds the VM's spec, pid, size, role (pooled or leased) and, for a
leased VM, its lease.  A record is written when a VM enters a pool or a lease
(one synced write per handout) and dropped when the VM stops.
"""

from __future__ import annotations

import enum
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

    def save(self, vm: Vm, role: Role, pool: str = "",
             lease: dict[str, Any] | None = None) -> None:
        """(Re)write ``vm``'s record and drop it automatically when the VM stops."""
        record = {"vm_id": vm.id, "pid": vm.pid, "spec": vm.spec.to_record(),
                  "cpus": vm.cpus, "memory_mib": vm.memory_mib, "role": role.value, "pool": pool,
                  "lease": lease, "paused": vm.state is VmState.PAUSED}
        self._store.save_json(f"vms/{vm.id}", record)
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
