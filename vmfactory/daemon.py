"""The factory daemon's core: config -> store -> factory bases -> pools -> leases.

Transports (``server/``) convert messages and call these methods; nothing here
knows about gRPC.  ``run()`` owns the background tasks; ``shutdown()`` is the one
idempotent teardown, undoing ``start()`` in reverse.
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
from vmfactory.errors import ConfigError, DaemonError, InvalidRequest
from vmfactory.events import EventBus, PoolEvent
from vmfactory.factory.base import FactoryBase
from vmfactory.factory.direct import DirectFactory
from vmfactory.factory.template_factory import TemplateFactory
from vmfactory.hypervisor.base import Vm
from vmfactory.hypervisor.qemu import SERIAL_RE, QemuHypervisor
from vmfactory.leases import Lease, LeaseTable
from vmfactory.pool import Pool
from vmfactory.records import VmRecords
from vmfactory.recovery import Recovery, RecoveryReport
from vmfactory.store import Store, open_store
from vmfactory.tasks import TaskOwner

logger = logging.getLogger(__name__)

LEASE_CHECK_S = 0.5


def _check_serial(serial: str) -> None:
    """The hypervisor's rule for disk serials, as a request error."""
    if not SERIAL_RE.match(serial):
        raise InvalidRequest(f"serial {serial!r} must be 1-20 of [A-Za-z0-9-]")


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


class Daemon:
    """One node's VM factory."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = DaemonState.CREATED
        self.events = EventBus()
        self.started_at = time.time()
        self.store: Store | None = None
        self.hypervisor = QemuHypervisor(config.paths.run_dir, config.timeouts)
        self.direct = DirectFactory(config, self.hypervisor)
        self.template = TemplateFactory(config, self.hypervisor, self.direct)
        self.pools: dict[str, Pool] = {}
        self.leases: LeaseTable | None = None
        self.records: VmRecords | None = None
        self.recovery = RecoveryReport()
        self._tasks = TaskOwner("daemon")
        self._stop = asyncio.Event()
        self._procs: dict[int, psutil.Process] = {}

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        if self.state is not DaemonState.CREATED:
            raise DaemonError(f"daemon is {self.state.value}")
        self.state = DaemonState.STARTING
        self.store = open_store(self.config.store.url)
        self.records = VmRecords(self.store)
        self.leases = LeaseTable(self.records)
        await self._tasks.start()
        await self.template.start()
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
        self._tasks.spawn(self._reclaim_loop(), "lease-reclaim")
        self.state = DaemonState.SERVING
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

    async def shutdown(self) -> None:
        """Stop pools, leased VMs, templates and the store, in reverse; idempotent."""
        if self.state in (DaemonState.STOPPING, DaemonState.STOPPED):
            return
        self.state = DaemonState.STOPPING
        self._stop.set()
        self.events.close()
        await self._tasks.close()
        for pool in self.pools.values():
            await pool.close()
        if self.leases is not None:
            for lease in self.leases.values():
                self.leases.pop(lease.id)
                await self._end_lease(lease, "daemon stopping")
        await self.template.close()
        await self.template.template.destroy()
        if self.store is not None:
            self.store.close()
        self.state = DaemonState.STOPPED
        logger.info("daemon stopped")

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

    async def get_vm(self, req: VmRequest, deadline: float) -> Lease:
        """A ready, leased VM; ``deadline`` is a time.monotonic() value."""
        if self.state is not DaemonState.SERVING:
            raise DaemonError(f"daemon is {self.state.value}")
        if deadline <= time.monotonic():
            raise InvalidRequest("the request's deadline has already passed")
        vm_config = self._vm_config(req)
        pool = self._pool_for(vm_config, req.base)
        if pool is not None:
            vm, source = await pool.get(deadline)
            pool_name = pool.name
        else:
            base = self._base(req.base or "template")
            vm = await base.get_vm(vm_config)
            source, pool_name = ("clone" if vm.spec.incoming else "boot"), ""
        assert self.leases is not None
        try:
            await vm.hand_over_agent()
            return await self.leases.add(vm, pool_name, source, req.client, req.lease_ttl_s)
        except BaseException:
            await asyncio.shield(vm.stop())  # not leased, so nobody would ever stop it
            raise

    def _leased_vm(self, lease_id: str) -> Vm:
        assert self.leases is not None
        return self.leases.get(lease_id).vm

    async def attach_disk(self, lease_id: str, path: str, serial: str, read_only: bool) -> str:
        """Hot-plug a host image into a leased VM (the client's container root)."""
        vm = self._leased_vm(lease_id)
        image = Path(path)
        if not image.is_absolute() or not image.is_file():
            raise InvalidRequest(f"disk image must be an existing file given by absolute path: "
                                 f"{path!r}")
        _check_serial(serial)
        return await vm.attach_disk(image, serial, read_only)

    async def detach_disk(self, lease_id: str, serial: str) -> None:
        _check_serial(serial)
        await self._leased_vm(lease_id).detach_disk(serial)

    async def release(self, lease_id: str) -> None:
        assert self.leases is not None
        lease = self.leases.pop(lease_id)
        await self._end_lease(lease, "released")

    async def _end_lease(self, lease: Lease, why: str) -> None:
        await lease.vm.stop()
        kind = "released" if why == "released" else "reclaimed"
        self.events.publish(PoolEvent(lease.pool, kind, lease.vm.id, why))

    async def _reclaim_loop(self) -> None:
        assert self.leases is not None
        while True:
            await asyncio.sleep(LEASE_CHECK_S)
            for lease in self.leases.expired():
                self.leases.pop(lease.id)
                logger.info("lease %s expired: reclaiming vm %s", lease.id, lease.vm.id)
                await self._end_lease(lease, f"TTL of {lease.ttl_s:g} s ended")

    # -- status ------------------------------------------------------------
    def _vm_status(self, vm: Vm, pool: str, lease: Lease | None, source: str) -> dict[str, Any]:
        out: dict[str, Any] = {"vm_id": vm.id, "pid": vm.pid or 0, "state": vm.state.value,
                               "pool": pool, "lease_id": lease.id if lease else "",
                               "cpus": vm.cpus, "memory_mib": vm.memory_mib, "source": source,
                               "age_s": time.monotonic() - vm.created_at, "cpu_percent": 0.0,
                               "rss_mib": 0.0, "pss_mib": 0.0}
        if vm.pid:
            try:
                proc = self._procs.setdefault(vm.pid, psutil.Process(vm.pid))
                out["cpu_percent"] = proc.cpu_percent(None)
                mem = vm.memory()
                out["rss_mib"], out["pss_mib"] = mem.rss_mib, mem.pss_mib
            except (psutil.Error, OSError):
                pass
        return out

    def status(self) -> dict[str, Any]:
        vms = [self._vm_status(vm, p.name, None, "pool")
               for p in self.pools.values() for vm in list(p.ready)]
        if self.leases is not None:
            vms += [self._vm_status(le.vm, le.pool, le, le.source) for le in self.leases.values()]
        live = {v["pid"] for v in vms}
        self._procs = {pid: p for pid, p in self._procs.items() if pid in live}
        return {"pid": os.getpid(), "uptime_s": time.time() - self.started_at,
                "recovered": self.recovery.adopted, "recovery_s": self.recovery.seconds,
                "version": __version__, "pools": [p.status() for p in self.pools.values()],
                "vms": vms, "template": self.template.status()}
