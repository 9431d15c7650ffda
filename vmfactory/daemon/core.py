"""The factory daemon's core: store -> factory bases -> pools -> leases.

Transports (``vmfactory.server``) convert messages and call these methods;
nothing here knows about gRPC.  The composition root (``vmfactory.app``)
builds the hypervisor, the store and the bases and passes them in.

Background work and what its failure does: each pool's refill and health
loops are restarted with backoff (see ``pools``); the lease reaper is fatal:
leases whose TTL nobody enforces would keep VMs forever, so its failure is
logged and turns into a deliberate shutdown, and ``shutdown()`` re-raises it
(as :class:`BackgroundFailure`) once everything is torn down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from vmfactory import __version__
from vmfactory.config import Config, PoolConfig, VmConfig
from vmfactory.daemon.events import EventBus, EventKind, PoolEvent
from vmfactory.daemon.leases import Lease, LeaseTable, VmSource
from vmfactory.daemon.pools import Pool
from vmfactory.daemon.records import VmRecords
from vmfactory.daemon.recovery import Recovery, RecoveryReport
from vmfactory.errors import (
    BackgroundFailure, ConfigError, DaemonError, InvalidRequest, VmFactoryError,
)
from vmfactory.factory.base import FactoryBase
from vmfactory.factory.direct import DirectFactory
from vmfactory.factory.template_factory import TemplateFactory
from vmfactory.hypervisor.base import Hypervisor, Vm, check_serial
from vmfactory.store import Store
from vmfactory.util.states import Lifecycle, require
from vmfactory.util.tasks import Policy, Supervisor, Teardown, finish

logger = logging.getLogger(__name__)

LEASE_CHECK_S = 0.5


class DaemonState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    SERVING = "serving"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class VmRequest:
    """A GetVM request after conversion; 0 / "" mean the defaults."""

    cpus: int = 0
    memory_mib: int = 0
    image: str = ""
    base: str = ""
    lease_ttl_s: float = 0.0
    client: str = ""


class Daemon(Lifecycle[DaemonState]):
    """One node's VM factory; owns ``store`` from here on."""

    def __init__(self, config: Config, hypervisor: Hypervisor, store: Store,
                 direct: DirectFactory, template: TemplateFactory) -> None:
        self.config = config
        self.hypervisor = hypervisor
        self.store = store
        self.direct = direct
        self.template = template
        self.events = EventBus()
        self.started_at = time.time()
        self.records = VmRecords(store)
        self.leases = LeaseTable(self.records)
        self.pools: dict[str, Pool] = {}
        self.recovery = RecoveryReport()
        self.failure: BackgroundFailure | None = None
        self._tasks = Supervisor("daemon", on_fatal=self._fatal)
        self._stop = asyncio.Event()
        self._procs: dict[int, psutil.Process] = {}
        self._set_state(DaemonState.CREATED)

    def _state_error(self, operation: str) -> Exception:
        return DaemonError(f"daemon is {self.state.value}")

    def _lifecycle_name(self) -> str:
        return "daemon"

    # -- lifecycle ---------------------------------------------------------
    @require(DaemonState.CREATED)
    async def start(self) -> None:
        """Recover what an earlier daemon left, start the pools and the reaper."""
        self._set_state(DaemonState.STARTING)
        slots = asyncio.Semaphore(self.config.daemon.refill_concurrency)
        for pc in self.config.pools:
            self.pools[pc.name] = Pool(
                pc, self._pool_vm_config(pc), self._base(pc.base), self.events, slots,
                self.config.daemon.mem_floor_mib, self.config.daemon.health_interval_s,
                self.records)
        self.recovery = await Recovery(self.records, self.leases, self.hypervisor,
                                       self.pools).run()
        for pool in self.pools.values():
            await pool.start()
        self._tasks.spawn("lease-reaper", self._reclaim_loop, policy=Policy.FATAL)
        self._set_state(DaemonState.SERVING)
        logger.info("daemon serving with %d pools", len(self.pools))

    def _pool_vm_config(self, pc: PoolConfig) -> VmConfig:
        return dataclasses.replace(self.config.vm, cpus=pc.cpus, memory_mib=pc.memory_mib)

    def _base(self, name: str) -> FactoryBase:
        return self.template if name == "template" else self.direct

    def request_stop(self) -> None:
        """Ask ``wait_stopped`` to return (Quit RPC, signals)."""
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    def _fatal(self, task: str, exc: BaseException) -> None:
        """A loop the daemon cannot run without failed: stop, and say why at the end."""
        if self.failure is None:
            self.failure = BackgroundFailure(task, exc)
            logger.critical("stopping the daemon: %s", self.failure)
        self.request_stop()

    async def shutdown(self) -> None:
        """Stop background tasks, pools, leased VMs, templates and the store, in
        reverse of setup, every step even if one fails; idempotent.  Then raise
        the background failure that stopped the daemon, if one did, else the
        first teardown failure."""
        if self.state in (DaemonState.STOPPING, DaemonState.STOPPED):
            return
        self._set_state(DaemonState.STOPPING)
        self._stop.set()
        self.events.close()
        teardown = Teardown("daemon shutdown")
        await teardown.step("background tasks", self._tasks.close())
        for pool in self.pools.values():
            await teardown.step(f"pool {pool.name}", pool.close())
        for lease in self.leases.values():
            self.leases.pop(lease.id)
            await teardown.step(f"lease {lease.id}",
                                self._end_lease(lease, EventKind.RECLAIMED, "daemon stopping"))
        await teardown.step("template factory", self.template.close())
        await teardown.step("template", self.template.template.destroy())
        teardown.sync_step("store", self.store.close)
        self._set_state(DaemonState.STOPPED)
        logger.info("daemon stopped")
        if self.failure is not None:
            raise self.failure
        teardown.done()

    # -- requests ----------------------------------------------------------
    def _vm_config(self, req: VmRequest) -> VmConfig:
        if req.image not in ("", "default"):
            raise InvalidRequest(f"unknown image {req.image!r} (only 'default' is served)")
        if req.base not in ("", "template", "direct"):
            raise InvalidRequest(f"unknown base {req.base!r}: use template or direct")
        if req.lease_ttl_s < 0:
            raise InvalidRequest(f"lease_ttl_s must not be negative, got {req.lease_ttl_s}")
        vm = self.config.vm
        if req.cpus > vm.max_cpus:
            raise InvalidRequest(f"cpus {req.cpus} exceeds this node's maximum of {vm.max_cpus}")
        if req.memory_mib > vm.max_memory_mib:
            raise InvalidRequest(f"memory_mib {req.memory_mib} exceeds this node's maximum of "
                                 f"{vm.max_memory_mib}")
        try:
            return dataclasses.replace(self.config.vm, cpus=req.cpus or self.config.vm.cpus,
                                       memory_mib=req.memory_mib or self.config.vm.memory_mib)
        except ConfigError as exc:
            raise InvalidRequest(str(exc).replace("config vm.", "")) from exc

    def _pool_for(self, vm: VmConfig, base: str) -> Pool | None:
        for pool in self.pools.values():
            pc = pool.config
            if (pc.cpus, pc.memory_mib) == (vm.cpus, vm.memory_mib) and base in ("", pc.base):
                return pool
        return None

    @require(DaemonState.SERVING)
    async def get_vm(self, req: VmRequest, deadline: float) -> Lease:
        """A ready, leased VM; ``deadline`` is a time.monotonic() value."""
        if deadline <= time.monotonic():
            raise InvalidRequest("the request's deadline has already passed")
        vm_config = self._vm_config(req)
        pool = self._pool_for(vm_config, req.base)
        if pool is not None:
            vm, source = await pool.get(deadline)
            pool_name = pool.name
        else:
            vm = await self._base(req.base or "template").get_vm(vm_config)
            source, pool_name = VmSource.made(vm), ""
        try:
            await vm.hand_over_agent()
            return await self.leases.add(vm, pool_name, source, req.client, req.lease_ttl_s)
        except BaseException:
            await finish(vm.stop())  # not leased, so nobody would ever stop it
            raise

    def _leased_vm(self, lease_id: str) -> Vm:
        return self.leases.get(lease_id).vm

    @require(DaemonState.SERVING)
    async def attach_disk(self, lease_id: str, path: str, serial: str, read_only: bool) -> str:
        """Hot-plug a host image into a leased VM (the client's container root)."""
        vm = self._leased_vm(lease_id)
        image = Path(path)
        if not image.is_absolute() or not image.is_file():
            raise InvalidRequest(f"disk image must be an existing file given by absolute path: "
                                 f"{path!r}")
        check_serial(serial)
        return await vm.attach_disk(image, serial, read_only)

    @require(DaemonState.SERVING)
    async def detach_disk(self, lease_id: str, serial: str) -> None:
        check_serial(serial)
        await self._leased_vm(lease_id).detach_disk(serial)

    @require(DaemonState.SERVING)
    async def release(self, lease_id: str) -> None:
        lease = self.leases.pop(lease_id)
        await self._end_lease(lease, EventKind.RELEASED, "released")

    async def _end_lease(self, lease: Lease, kind: EventKind, why: str) -> None:
        self.events.publish(PoolEvent(lease.pool, kind, lease.vm.id, why))
        await finish(lease.vm.stop())

    async def _reclaim_loop(self) -> None:
        while True:
            await asyncio.sleep(LEASE_CHECK_S)
            for lease in self.leases.expired():
                if lease.id not in self.leases:
                    continue  # released while an earlier expired lease was stopped
                self.leases.pop(lease.id)
                logger.info("lease %s expired: reclaiming vm %s", lease.id, lease.vm.id)
                await self._end_lease(lease, EventKind.RECLAIMED,
                                      f"TTL of {lease.ttl_s:g} s ended")

    # -- status ------------------------------------------------------------
    def _vm_status(self, vm: Vm, pool: str, lease: Lease | None,
                   source: VmSource) -> dict[str, Any]:
        out: dict[str, Any] = {"vm_id": vm.id, "pid": vm.pid or 0, "state": vm.state.value,
                               "pool": pool, "lease_id": lease.id if lease else "",
                               "cpus": vm.cpus, "memory_mib": vm.memory_mib,
                               "source": source.value, "cpu_percent": 0.0,
                               "age_s": time.monotonic() - vm.created_at,
                               "rss_mib": 0.0, "pss_mib": 0.0}
        if vm.pid:
            try:
                proc = self._procs.setdefault(vm.pid, psutil.Process(vm.pid))
                out["cpu_percent"] = proc.cpu_percent(None)
                mem = vm.memory()
                out["rss_mib"], out["pss_mib"] = mem.rss_mib, mem.pss_mib
            except (psutil.Error, OSError, VmFactoryError):
                pass  # it is going away: its numbers stay 0
        return out

    def status(self) -> dict[str, Any]:
        vms = [self._vm_status(vm, p.name, None, VmSource.POOL)
               for p in self.pools.values() for vm in list(p.ready)]
        vms += [self._vm_status(le.vm, le.pool, le, le.source) for le in self.leases.values()]
        live = {v["pid"] for v in vms}
        self._procs = {pid: p for pid, p in self._procs.items() if pid in live}
        return {"pid": os.getpid(), "uptime_s": time.time() - self.started_at,
                "recovered": self.recovery.adopted, "recovery_s": self.recovery.seconds,
                "version": __version__, "pools": [p.status() for p in self.pools.values()],
                "vms": vms, "template": self.template.status()}
