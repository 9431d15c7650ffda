"""The factory daemon's core: store -> factory bases -> pools -> leases.

Transports (``vmfactory.server``) convert messages and call these methods with
the :class:`Caller` behind each request; nothing here knows about gRPC.  The
composition root (``vmfactory.app``) builds the hypervisor, the store and the
bases and passes them in.

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
import time
from pathlib import Path
from typing import Any

from vmfactory.config import Config, PoolConfig, VmConfig
from vmfactory.daemon.callers import Caller
from vmfactory.daemon.disks import open_disk, prepare_default_root
from vmfactory.daemon.events import EventBus, EventKind, PoolEvent
from vmfactory.daemon.leases import Lease, LeaseTable, VmSource, new_lease_id
from vmfactory.daemon.metrics import DaemonMetrics
from vmfactory.daemon.pools import Pool, RefillPolicy
from vmfactory.daemon.records import VmRecords
from vmfactory.daemon.recovery import Recovery, RecoveryReport
from vmfactory.daemon.requests import (
    MAX_LEASE_ID, VmRequest, check_lease_id, check_seconds, check_text,
)
from vmfactory.daemon.status import daemon_status
from vmfactory.errors import (
    BackgroundFailure, ConfigError, DaemonError, DeadlineExceeded, InvalidRequest, NotFound,
    PermissionDenied, quote,
)
from vmfactory.factory.base import FactoryBase
from vmfactory.factory.direct import DirectFactory
from vmfactory.factory.template_factory import TemplateFactory
from vmfactory.hypervisor.base import Hypervisor, check_serial
from vmfactory.store import Store
from vmfactory.util.states import Lifecycle, require
from vmfactory.util.tasks import Policy, Supervisor, Teardown, finish

logger = logging.getLogger(__name__)

LEASE_CHECK_S = 0.5
BASES = ("", "template", "direct")


class DaemonState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    SERVING = "serving"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Daemon(Lifecycle[DaemonState]):
    """One node's VM factory; owns ``store`` from here on.  ``templates`` has the
    shared template factory under "" and one per tenant of the pools."""

    def __init__(self, config: Config, hypervisor: Hypervisor, store: Store,
                 direct: DirectFactory, templates: dict[str, TemplateFactory]) -> None:
        self.config = config
        self.hypervisor = hypervisor
        self.store = store
        self.direct = direct
        self.templates = templates
        self.template = templates[""]
        self.events = EventBus()
        self.started_at = time.time()
        self.records = VmRecords(store)
        self.leases = LeaseTable(self.records)
        self.pools: dict[str, Pool] = {}
        self.recovery = RecoveryReport()
        self.failure: BackgroundFailure | None = None
        self.disk_roots = [Path(r) for r in config.daemon.disk_roots] or [
            config.paths.state_dir / "bundle-images"]
        self._tasks = Supervisor("daemon", on_fatal=self._fatal)
        self._stop = asyncio.Event()
        self.metrics = DaemonMetrics()
        self.metrics.watch(self)
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
        if not self.config.daemon.disk_roots:
            prepare_default_root(self.disk_roots[0], self.config.daemon.socket_group)
        slots = asyncio.Semaphore(self.config.daemon.refill_concurrency)
        for pc in self.config.pools:
            self.pools[pc.name] = Pool(
                pc, self._pool_vm_config(pc), self._base(pc.base, pc.tenant), self.events,
                slots, self.config.daemon.mem_floor_mib, self.config.daemon.health_interval_s,
                self.records, self.metrics.observe_refill,
                refill_concurrency=self.config.daemon.refill_concurrency,
                refill=RefillPolicy(self.config.daemon.refill_nice,
                                    self.config.daemon.refill_quiet_s,
                                    self.config.daemon.refill_low_water))
        self.recovery = await Recovery(self.records, self.leases, self.hypervisor,
                                       self.pools).run()
        for pool in self.pools.values():
            await pool.start()
        self._tasks.spawn("lease-reaper", self._reclaim_loop, policy=Policy.FATAL)
        self._set_state(DaemonState.SERVING)
        logger.info("daemon serving with %d pools", len(self.pools))

    def _pool_vm_config(self, pc: PoolConfig) -> VmConfig:
        return dataclasses.replace(self.config.vm, cpus=pc.cpus, memory_mib=pc.memory_mib)

    def _base(self, name: str, tenant: str) -> FactoryBase:
        """The base that makes VMs for ``tenant``: its own template, never another's."""
        if name == "direct" or tenant not in self.templates:
            return self.direct
        return self.templates[tenant]

    def request_stop(self) -> None:
        """Ask ``wait_stopped`` to return (signals; Quit goes through :meth:`quit`)."""
        self._stop.set()

    def quit(self, caller: Caller) -> None:
        """The Quit request: root's alone."""
        caller.require_root("stopping the daemon")
        logger.info("stop requested by %s", caller)
        self.request_stop()

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
        for tenant, factory in self.templates.items():
            await teardown.step(f"template factory {tenant!r}", factory.close())
            await teardown.step(f"template {tenant!r}", factory.template.destroy())
        teardown.sync_step("store", self.store.close)
        teardown.sync_step("run directory", self.hypervisor.close)
        self._set_state(DaemonState.STOPPED)
        logger.info("daemon stopped")
        if self.failure is not None:
            raise self.failure
        teardown.done()

    # -- requests ----------------------------------------------------------
    def _vm_config(self, req: VmRequest) -> VmConfig:
        if req.image not in ("", "default"):
            raise InvalidRequest(f"unknown image {quote(req.image)} (only 'default' is served)")
        if req.base not in BASES:
            raise InvalidRequest(f"unknown base {quote(req.base)}: use template or direct")
        vm = self.config.vm
        if req.cpus > vm.max_cpus:
            raise InvalidRequest(f"cpus {req.cpus} exceeds this node's maximum of {vm.max_cpus}")
        if req.memory_mib > vm.max_memory_mib:
            raise InvalidRequest(f"memory_mib {req.memory_mib} exceeds this node's maximum of "
                                 f"{vm.max_memory_mib}")
        try:
            return dataclasses.replace(vm, cpus=req.cpus or vm.cpus,
                                       memory_mib=req.memory_mib or vm.memory_mib)
        except ConfigError as exc:
            raise InvalidRequest(str(exc).replace("config vm.", "")) from exc

    def _lease_ttl(self, asked: float, caller: Caller) -> float:
        """The TTL a lease gets: root's as asked (0: none); anyone else's bounded,
        and a default for none, so no caller can hold a VM it forgot."""
        if caller.is_root:
            return check_seconds("lease_ttl_s", asked, 10**9, zero=True)
        limit = self.config.daemon.max_lease_ttl_s
        return check_seconds("lease_ttl_s", asked, limit, zero=True) or min(
            self.config.daemon.default_lease_ttl_s, limit)

    def _pool_for(self, vm: VmConfig, base: str, tenant: str) -> Pool | None:
        for pool in self.pools.values():
            pc = pool.config
            if ((pc.cpus, pc.memory_mib) == (vm.cpus, vm.memory_mib) and base in ("", pc.base)
                    and pc.tenant == tenant):
                return pool
        return None

    @require(DaemonState.SERVING)
    async def get_vm(self, req: VmRequest, deadline: float, caller: Caller) -> Lease:
        """A ready VM leased to ``caller``; ``deadline`` is a time.monotonic() value."""
        started = time.monotonic()
        req = req.checked()
        if req.tenant:
            caller.require_group(req.tenant)
        ttl = self._lease_ttl(req.lease_ttl_s, caller)
        if deadline <= time.monotonic():
            raise DeadlineExceeded("the request's deadline passed before it was served")
        vm_config = self._vm_config(req)
        pool = self._pool_for(vm_config, req.base, req.tenant)
        if pool is not None:
            vm, source = await pool.get(deadline)
        else:
            vm = await self._base(req.base or "template", req.tenant).get_vm(vm_config)
            source = VmSource.made(vm)
        lease = Lease(new_lease_id(), vm, pool.name if pool else "", source, req.client, ttl,
                      caller.uid, req.tenant, request_id=req.request_id)
        try:
            await vm.hand_over_agent()
            vm.grant(caller.uid)
            await self.leases.add(lease)
        except BaseException:
            await finish(vm.stop())  # not leased, so nobody would ever stop it
            raise
        if self.leases.was_withdrawn(lease):  # while it was being handed out
            self.leases.pop(lease.id)
            await self._end_lease(lease, EventKind.RECLAIMED, "withdrawn by its caller")
            raise DeadlineExceeded("the request was withdrawn before its VM was ready")
        self.metrics.getvm.labels(source.value, lease.pool).observe(time.monotonic() - started)
        return lease

    @require(DaemonState.SERVING)
    async def renew(self, lease_id: str, ttl_s: float, caller: Caller) -> None:
        """The lease now ends ``ttl_s`` from now."""
        lease = self.leases.owned(check_lease_id(lease_id), caller)
        if not ttl_s:
            raise InvalidRequest("ttl_s must be more than 0")
        await self.leases.renew(lease, self._lease_ttl(ttl_s, caller))

    @require(DaemonState.SERVING)
    async def attach_disk(self, lease_id: str, path: str, serial: str, writable: bool,
                          caller: Caller) -> str:
        """Hot-plug a host image into a leased VM (the client's container root),
        if the disk policy lets ``caller`` use it (see ``disks``)."""
        lease = self.leases.owned(check_lease_id(lease_id), caller)
        check_serial(serial)
        disk = await asyncio.to_thread(open_disk, path, self.disk_roots, caller, writable)
        try:
            return await lease.vm.attach_disk(disk, serial)
        finally:
            disk.close()  # QEMU holds its own copy

    @require(DaemonState.SERVING)
    async def detach_disk(self, lease_id: str, serial: str, caller: Caller) -> None:
        lease = self.leases.owned(check_lease_id(lease_id), caller)
        check_serial(serial)
        await lease.vm.detach_disk(serial)

    @require(DaemonState.SERVING)
    async def release(self, lease_id: str, caller: Caller) -> None:
        self.leases.owned(check_lease_id(lease_id), caller)
        lease = self.leases.pop(lease_id)
        await self._end_lease(lease, EventKind.RELEASED, f"released by {caller}")

    @require(DaemonState.SERVING)
    async def withdraw(self, request_id: str, caller: Caller) -> None:
        """The caller gave up on its GetVM ``request_id``: the lease it made (or
        will make) ends; nothing happens for an id nobody used."""
        lease = self.leases.withdraw(check_text("request_id", request_id, MAX_LEASE_ID),
                                     caller)
        if lease is not None:
            await self._end_lease(lease, EventKind.RECLAIMED, "withdrawn by its caller")

    def abandon(self, lease: Lease) -> None:
        """The caller never learnt of ``lease`` (its call ended before the reply
        reached it): end it in the background."""
        if lease.id in self.leases:
            logger.info("lease %s was never delivered: reclaiming vm %s", lease.id, lease.vm.id)
            self.leases.pop(lease.id)
            self._tasks.spawn(f"abandon-{lease.id}", self._end_lease, lease, EventKind.RECLAIMED,
                              "the caller left before its reply")

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

    # -- operations (the admin API) -------------------------------------------
    def pool(self, name: str) -> Pool:
        try:
            return self.pools[name]
        except KeyError:
            raise NotFound(f"no pool {quote(name)}") from None

    def pool_view(self, name: str) -> dict[str, Any]:
        """A pool's status, its configuration and what its sizing policy chose."""
        pool = self.pool(name)
        return {**pool.status(), "config": dataclasses.asdict(pool.config),
                "sizing_report": pool.sizer.report()}

    def reconfigure_pool(self, name: str, changes: dict[str, Any], caller: Caller) -> None:
        """New sizes, keep_running or sizing for a running pool (root's)."""
        caller.require_root("reconfiguring a pool")
        try:
            self.pool(name).reconfigure(**changes)
        except ConfigError as exc:
            raise InvalidRequest(str(exc).replace("config ", "", 1)) from exc
        logger.info("pool %s reconfigured by %s: %s", name, caller, changes)

    async def drain_pool(self, name: str, caller: Caller) -> int:
        caller.require_root("draining a pool")
        return await self.pool(name).drain()

    async def rotate_template(self, name: str, caller: Caller) -> None:
        """Build the next generation of template ``name`` now and swap it in."""
        caller.require_root("rotating a template")
        factory = next((f for f in self.templates.values() if f.name == name), None)
        if factory is None:
            raise NotFound(f"no template {quote(name)}")
        await factory.rotate_now()

    def templates_status(self) -> list[dict[str, Any]]:
        return [{"name": f.name, "tenant": tenant, **f.status()}
                for tenant, f in self.templates.items()]

    def unready(self) -> list[str]:
        """Why the daemon is not ready: each pool under its minimum (empty: ready)."""
        why = [f"daemon is {self.state.value}"] if self.state is not DaemonState.SERVING else []
        return why + [f"pool {p.name}: {len(p.ready)} ready, minimum {p.config.min_size}"
                      for p in self.pools.values() if len(p.ready) < p.config.min_size]

    def leases_view(self, caller: Caller) -> list[dict[str, Any]]:
        """Every lease; the id and agent socket only to its owner (and root)."""
        return [{"lease_id": le.id if caller.owns(le.owner_uid) else "", "vm_id": le.vm.id,
                 "pool": le.pool, "source": le.source.value, "owner_uid": le.owner_uid,
                 "client": le.client, "tenant": le.tenant, "ttl_s": le.ttl_s,
                 "expires_in_s": (le.expires - time.time()) if le.expires else None,
                 "age_s": time.time() - le.created} for le in self.leases.values()]

    # -- status ------------------------------------------------------------
    def status(self, caller: Caller) -> dict[str, Any]:
        """Pools and VMs; leases of others without their ids."""
        standby = [vm for f in self.templates.values() for vm in f.template.standby.vms()]
        return {**daemon_status(self.pools.values(), self.leases.values(), self.recovery,
                                self.started_at, caller, standby),
                "template": self.template.status()}


__all__ = ["Daemon", "DaemonState", "PermissionDenied", "VmRequest"]
