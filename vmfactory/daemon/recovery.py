"""Crash recovery: a restarted daemon takes back what its predecessor left running.

QEMU runs in its own session, so a daemon killed with SIGKILL leaves its VMs
alive.  On start, every ``vms/<id>`` record is checked: a VM whose QEMU still
runs, answers QMP and whose agent answers is re-adopted, back into its pool
(if the pool still has that size) or under its lease (if the lease record is
there).  Anything else is reaped: dead or unknown QEMU processes, run
directories no record accounts for, and records of VMs that are gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from vmfactory.daemon.leases import Lease, LeaseTable
from vmfactory.daemon.pools import Pool
from vmfactory.daemon.records import Role, VmRecords
from vmfactory.errors import VmFactoryError
from vmfactory.hypervisor.base import Hypervisor, Vm, VmSpec, VmState

logger = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    pooled: list[str] = field(default_factory=list)
    leased: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    reaped_pids: list[int] = field(default_factory=list)
    removed_dirs: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def adopted(self) -> int:
        return len(self.pooled) + len(self.leased)


class Recovery:
    """One recovery pass; run once, before the pools start."""

    def __init__(self, records: VmRecords, leases: LeaseTable,
                 hypervisor: Hypervisor, pools: dict[str, Pool]) -> None:
        self.records = records
        self.leases = leases
        self.hypervisor = hypervisor
        self.pools = pools
        self.report = RecoveryReport()

    async def run(self) -> RecoveryReport:
        start = time.monotonic()
        vm_records = self.records.load_all()
        results = await asyncio.gather(*(self._adopt(i, r) for i, r in vm_records.items()))
        kept = {vm.id: vm for vm in results if vm is not None}
        for vm in kept.values():
            try:
                await self._place(vm, vm_records[vm.id])
            except (VmFactoryError, KeyError, TypeError, ValueError) as exc:
                logger.warning("recovery: vm %s not placed (%r): stopping it", vm.id, exc)
                await self._drop(vm)
        self._reap({vm.id for vm in kept.values() if vm.state is not VmState.STOPPED})
        self.report.seconds = time.monotonic() - start
        logger.info("recovery: %d pooled and %d leased VMs adopted, %d records dropped, "
                    "%d processes and %d run directories reaped in %.2f s",
                    len(self.report.pooled), len(self.report.leased), len(self.report.dropped),
                    len(self.report.reaped_pids), len(self.report.removed_dirs),
                    self.report.seconds)
        return self.report

    async def _adopt(self, vm_id: str, record: dict[str, Any]) -> Vm | None:
        """The recorded VM ``vm_id`` (its key's name, not what the record says) if
        its process still runs, is that VM's and its agent answers."""
        try:
            if record.get("vm_id") != vm_id:
                raise ValueError(f"the record names vm {str(record.get('vm_id'))[:80]!r}")
            vm = self.hypervisor.create_vm(VmSpec.from_record(record["spec"]), vm_id)
            vm.cpus, vm.memory_mib = int(record["cpus"]), int(record["memory_mib"])
            await vm.adopt(int(record.get("pid") or 0))
        except (VmFactoryError, KeyError, TypeError, ValueError, AttributeError) as exc:
            logger.warning("recovery: vm %s not adopted: %s", vm_id, exc)
            self.report.dropped.append(vm_id)
            self.records.delete(vm_id)
            return None
        return vm

    async def _drop(self, vm: Vm) -> None:
        self.report.dropped.append(vm.id)
        await vm.stop()
        self.records.delete(vm.id)

    async def _place(self, vm: Vm, record: dict[str, Any]) -> None:
        lease = record.get("lease")
        if record["role"] == Role.LEASED and lease:
            await self.leases.restore(Lease.from_record(vm, lease))
            self.report.leased.append(vm.id)
            return
        pool = self.pools.get(record["pool"])
        if record["role"] == Role.POOLED and pool is not None and pool.accepts(vm):
            if vm.state is VmState.RUNNING and not pool.config.keep_running:
                await vm.pause()
            pool.adopt(vm)
            await self.records.commit(vm, Role.POOLED, pool.name)
            self.report.pooled.append(vm.id)
            return
        logger.info("recovery: vm %s has no pool or lease any more: stopping it", vm.id)
        await self._drop(vm)

    def _reap(self, adopted: set[str]) -> None:
        run_dir = self.hypervisor.run_dir
        for pid, vm_id in self.hypervisor.vm_processes().items():
            if vm_id not in adopted:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    continue
                self.report.reaped_pids.append(pid)
        if run_dir.is_dir():
            for entry in run_dir.iterdir():
                if entry.is_dir() and entry.name not in adopted:
                    shutil.rmtree(entry, ignore_errors=True)
                    self.report.removed_dirs.append(entry.name)

