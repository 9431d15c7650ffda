"""The daemon's status as one caller may see it: every pool and VM, and the
lease id of a leased VM only for its owner (and root)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import psutil

from vmfactory import __version__
from vmfactory.daemon.callers import Caller
from vmfactory.daemon.leases import Lease, VmSource
from vmfactory.daemon.pools import Pool
from vmfactory.daemon.recovery import RecoveryReport
from vmfactory.errors import VmFactoryError
from vmfactory.hypervisor.base import Vm

# psutil.Process objects by pid: cpu_percent() measures since the previous call.
_PROCS: dict[int, psutil.Process] = {}


def vm_status(vm: Vm, pool: str, lease: Lease | None, source: VmSource,
              caller: Caller) -> dict[str, Any]:
    mine = lease is not None and caller.owns(lease.owner_uid)
    out: dict[str, Any] = {
        "vm_id": vm.id, "pid": vm.pid or 0, "state": vm.state.value, "pool": pool,
        "lease_id": lease.id if lease is not None and mine else "",
        "owner_uid": lease.owner_uid if lease is not None else 0,
        "tenant": lease.tenant if lease is not None else "",
        "cpus": vm.cpus, "memory_mib": vm.memory_mib, "source": source.value,
        "age_s": time.monotonic() - vm.created_at, "cpu_percent": 0.0,
        "rss_mib": 0.0, "pss_mib": 0.0}
    if vm.pid:
        try:
            proc = _PROCS.setdefault(vm.pid, psutil.Process(vm.pid))
            out["cpu_percent"] = proc.cpu_percent(None)
            mem = vm.memory()
            out["rss_mib"], out["pss_mib"] = mem.rss_mib, mem.pss_mib
        except (psutil.Error, OSError, VmFactoryError):
            pass  # it is going away: its numbers stay 0
    return out


def daemon_status(pools: Iterable[Pool], leases: Iterable[Lease], recovery: RecoveryReport,
                  started_at: float, caller: Caller, standby: Iterable[Vm] = ()
                  ) -> dict[str, Any]:
    """Pools, and every VM process the daemon runs: pooled, leased, and the
    templates' ``standby`` QEMUs (so each QEMU on the node is accounted for)."""
    pools = list(pools)
    vms = [vm_status(vm, p.name, None, VmSource.POOL, caller)
           for p in pools for vm in list(p.ready)]
    vms += [vm_status(le.vm, le.pool, le, le.source, caller) for le in leases]
    vms += [vm_status(vm, "", None, VmSource.STANDBY, caller) for vm in standby]
    live = {v["pid"] for v in vms}
    for pid in [pid for pid in _PROCS if pid not in live]:
        del _PROCS[pid]
    return {"pid": os.getpid(), "uptime_s": time.time() - started_at,
            "recovered": recovery.adopted, "recovery_s": recovery.seconds,
            "version": __version__, "pools": [p.status() for p in pools], "vms": vms}
