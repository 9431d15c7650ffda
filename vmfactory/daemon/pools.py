"""A warm pool of VMs of one configuration (CreateFromCache).

Pooled VMs are made by a base (template clone or cold boot), warmed (their
agent has answered), and paused so they cost no CPU while they wait.  A
handout is thin: it resumes one whose QEMU lives (a dead VM is replaced, never
handed out) without waiting on the guest, and triggers a refill.  Refills run
in the background, bounded by a shared semaphore, and pause while the host's
available memory is under the configured floor.

Background work and what its failure does: the refill loop and the health loop
are restarted with backoff (the pool keeps serving what it has; ``status()``
counts the failures); one refill's failure is counted and backs the refill loop
off.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections import deque
from collections.abc import Callable

import psutil

from vmfactory.config import PoolConfig, VmConfig
from vmfactory.daemon.events import EventBus, EventKind, PoolEvent
from vmfactory.daemon.leases import VmSource
from vmfactory.daemon.records import Role, VmRecords
from vmfactory.daemon.sizing import Sizer
from vmfactory.errors import FactoryError, PoolEmpty, VmFactoryError
from vmfactory.factory.base import FactoryBase
from vmfactory.factory.warmup import warm_container_path
from vmfactory.hypervisor.base import Vm, VmState
from vmfactory.util.states import Lifecycle, require
from vmfactory.util.tasks import Policy, Supervisor, Teardown, finish

logger = logging.getLogger(__name__)

MEMORY_RECHECK_S = 1.0
SIZING_TICK_S = 1.0
REFILL_BACKOFF_S = (0.5, 30.0)


class PoolState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    CLOSED = "closed"


@dataclasses.dataclass(frozen=True)
class RefillPolicy:
    """How refills yield to handouts (see DaemonConfig.refill_*); the default
    yields nothing, for callers that do not care."""

    nice: int = 0
    quiet_s: float = 0.0
    low_water: int = 0


class Pool(Lifecycle[PoolState]):
    """Keeps ``min_size`` ready VMs of ``config``.

    ``max_size`` bounds the VMs the pool holds or is making (ready + refilling);
    handed-out VMs belong to their leases and are not counted.
    """

    def __init__(self, config: PoolConfig, vm_config: VmConfig, base: FactoryBase,
                 events: EventBus, refill_slots: asyncio.Semaphore, mem_floor_mib: int,
                 health_interval_s: float, records: VmRecords,
                 on_refill: Callable[[str, float], None] | None = None,
                 refill_concurrency: int = 1, refill: RefillPolicy | None = None) -> None:
        self.config = config
        self._refill = refill or RefillPolicy()
        self._last_handout = 0.0
        self.sizer = Sizer(config, refill_concurrency=refill_concurrency)
        self._on_refill = on_refill
        self.vm_config = vm_config
        self.base = base
        self.events = events
        self._slots = refill_slots
        self._mem_floor_mib = mem_floor_mib
        self._health_interval_s = health_interval_s
        self._records = records
        self.ready: deque[Vm] = deque()
        # Requests waiting for a VM (empty = "wait"), served first come, first served.
        self._waiters: deque[asyncio.Future[Vm]] = deque()
        self.refilling = 0
        self.handouts = self.misses = self.replaced = self.failures = 0
        self.refill_failures = 0
        self.warmup_failures = 0
        self._kick_event = asyncio.Event()
        self._tasks = Supervisor(f"pool-{config.name}")
        self._set_state(PoolState.CREATED)

    @property
    def name(self) -> str:
        return self.config.name

    def _state_error(self, operation: str) -> Exception:
        return FactoryError(f"pool {self.name} is {self.state.value}")

    def _emit(self, kind: EventKind, vm_id: str = "", detail: str = "") -> None:
        self.events.publish(PoolEvent(self.name, kind, vm_id, detail))

    def accepts(self, vm: Vm) -> bool:
        """Whether ``vm`` has this pool's size (crash recovery re-pools only those)."""
        return (vm.cpus, vm.memory_mib) == (self.vm_config.cpus, self.vm_config.memory_mib)

    @require(PoolState.CREATED)
    def adopt(self, vm: Vm) -> None:
        """Take a recovered VM into the ready list (before :meth:`start`)."""
        self.ready.append(vm)

    @require(PoolState.CREATED)
    async def start(self) -> None:
        self._set_state(PoolState.RUNNING)
        self._tasks.spawn("refill", self._refill_loop, policy=Policy.RESTART)
        self._tasks.spawn("health", self._health_loop, policy=Policy.RESTART)
        self._tasks.spawn("sizing", self._sizing_loop, policy=Policy.RESTART)

    # -- handout -----------------------------------------------------------
    async def get(self, deadline: float) -> tuple[Vm, VmSource]:
        """A ready VM and where it came from (the pool, or the base's on a miss)."""
        self.sizer.request()
        while True:
            self._check_state("get", (PoolState.RUNNING,))
            vm = self.ready.popleft() if self.ready else None
            if vm is None:
                vm, source = await self._miss(deadline)
                if source is not VmSource.POOL:
                    return vm, source
            try:
                await self._activate(vm)
            except (VmFactoryError, OSError) as exc:
                await self._replace(vm, f"failed at handout: {exc}")
                continue
            except BaseException:
                # The caller gave up (deadline, cancellation): the VM is half handed
                # out, so it is not pooled again; stop it rather than lose it.
                await finish(self._replace(vm, "handout cancelled"))
                raise
            # Refill after the handout, not during it: a clone being made competes
            # with the handout for the host's CPUs.
            self._kick()
            self._last_handout = time.monotonic()
            self.handouts += 1
            self._emit(EventKind.HANDOUT, vm.id)
            return vm, VmSource.POOL

    async def _miss(self, deadline: float) -> tuple[Vm, VmSource]:
        self.misses += 1
        self._emit(EventKind.MISS)
        if self.config.empty == "fallback":
            vm = await self.base.get_vm(self.vm_config)
            return vm, VmSource.made(vm)
        return await self._wait_ready(deadline), VmSource.POOL

    async def _wait_ready(self, deadline: float) -> Vm:
        """The next VM that becomes ready, handed straight to us; PoolEmpty at the deadline.

        The waiter is a future nobody else cancels: whether it was served is
        decided by looking at it, so a VM handed over as the caller gives up goes
        back to the pool instead of being lost."""
        waiter: asyncio.Future[Vm] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait({waiter}, timeout=max(0.0, deadline - time.monotonic()))
        except BaseException:
            self._withdraw(waiter)
            raise
        if not waiter.done():
            self._withdraw(waiter)
            raise PoolEmpty(f"pool {self.name} had no ready VM before the deadline")
        return waiter.result()  # an exception here means the pool closed

    def _withdraw(self, waiter: asyncio.Future[Vm]) -> None:
        """A request stops waiting: unserved, it leaves the queue; served as it gave
        up, its VM goes back to the front of the pool."""
        if not waiter.done():
            waiter.cancel()
            self._waiters.remove(waiter)
        elif not waiter.cancelled() and waiter.exception() is None:
            self.ready.appendleft(waiter.result())

    async def _activate(self, vm: Vm) -> None:
        """The thin handout: no guest round trip while the caller waits.

        A paused VM ran nothing since its agent last answered (in _make_one), so
        its live QEMU proves it alive; its RNG was reseeded when it was made, and
        its clock follows the lessee's first agent call (guest/agent/clock).  A
        running VM (keep_running) may have failed meanwhile: one control-channel
        ping, ~1 ms, checks it."""
        if vm.pid is None or not vm.alive:
            raise FactoryError(f"vm {vm.id} has no process")
        vm.set_priority(0)  # its own priority back, before it runs for the lessee
        if vm.state is VmState.PAUSED:
            await vm.resume()
        elif vm.control is not None:
            await vm.control.ping()

    async def _replace(self, vm: Vm, why: str) -> None:
        self.replaced += 1
        self._emit(EventKind.REPLACED, vm.id, why)
        logger.warning("pool %s: replacing vm %s (%s)", self.name, vm.id, why)
        self._kick()
        await finish(vm.stop())

    # -- refill ------------------------------------------------------------
    def _kick(self) -> None:
        """Wake the refill loop: the pool may be short."""
        self._kick_event.set()

    def _deficit(self) -> int:
        want = self.sizer.target() - len(self.ready) - self.refilling
        room = self.config.max_size - len(self.ready) - self.refilling
        return max(0, min(want, room))

    async def _refill_loop(self) -> None:
        backoff = REFILL_BACKOFF_S[0]
        while True:
            while self._deficit() > 0:
                if not self._memory_ok():
                    await asyncio.sleep(MEMORY_RECHECK_S)
                    continue
                if (wait := self._until_quiet()) > 0:
                    await self._wait_kick(wait)  # a handout meanwhile may empty the pool
                    continue
                self.refilling += 1
                if self._tasks.spawn("refill-one", self._refill_one) is None:
                    self.refilling -= 1  # closing
                    return
            self._kick_event.clear()
            if self.failures:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, REFILL_BACKOFF_S[1])
                self.failures = 0
            else:
                backoff = REFILL_BACKOFF_S[0]
                await self._kick_event.wait()

    async def _wait_kick(self, seconds: float) -> None:
        self._kick_event.clear()
        try:
            async with asyncio.timeout(seconds):
                await self._kick_event.wait()
        except TimeoutError:
            pass  # quiet long enough

    def _until_quiet(self) -> float:
        """Seconds until a refill may start: 0 once no VM was handed out for
        refill_quiet_s, or at once while the pool is under its low-water mark."""
        if len(self.ready) < self._refill.low_water:
            return 0.0
        return max(0.0, self._last_handout + self._refill.quiet_s - time.monotonic())

    def _memory_ok(self) -> bool:
        available = psutil.virtual_memory().available >> 20
        if available >= self._mem_floor_mib:
            return True
        self._emit(EventKind.REFILL_PAUSED, detail=f"{available} MiB available < floor "
                                                   f"{self._mem_floor_mib} MiB")
        return False

    async def _refill_one(self) -> None:
        # ``refilling`` drops only once the VM is in ``ready`` (or failed): in
        # between, the refill loop would count the pool short and make one more.
        started = time.monotonic()
        try:
            vm = await self._make_one()
            self._refilled(time.monotonic() - started)
            await self._add_ready(vm)
        except VmFactoryError as exc:
            self._refill_failed(exc)
            logger.error("pool %s: refill failed: %s", self.name, exc)
        except Exception as exc:
            self._refill_failed(exc)
            raise  # not a known failure: the supervisor logs its traceback
        finally:
            self.refilling -= 1
            self._kick()

    def _refilled(self, seconds: float) -> None:
        self.sizer.refilled(seconds)
        if self._on_refill is not None:
            self._on_refill(self.name, seconds)

    def _refill_failed(self, exc: Exception) -> None:
        self.failures += 1
        self.refill_failures += 1
        self._emit(EventKind.REFILL_FAILED, detail=f"{type(exc).__name__}: {exc}")

    async def _make_one(self) -> Vm:
        """A VM for the pool, ready to hand out; made at idle CPU priority, within
        a refill slot (the warm-up too: it is most of a refill's CPU)."""
        async with self._slots:
            vm = await self.base.get_vm(self.vm_config)
            try:
                vm.set_priority(self._refill.nice)
                # The base ran the get-VM sequence (reseeded: clones share their
                # template's RNG state until then).  One agent call, so its guest
                # code is already in TCG's translation cache when the lessee's
                # first call comes; it also proves the agent alive before pausing.
                if vm.agent is not None:
                    await vm.agent.wait_ready(vm.timeouts.agent_call)
                if self.config.warm_containers:
                    await self._warm(vm)
                if not self.config.keep_running:
                    await vm.pause()
            except BaseException:
                await finish(vm.stop())
                raise
        return vm

    async def _warm(self, vm: Vm) -> None:
        """Translate the container path ahead of the lessee (see factory/warmup).  A
        failure costs the speed-up, not the VM: it passed every other check."""
        try:
            ms = await warm_container_path(vm)
        except VmFactoryError as exc:
            self.warmup_failures += 1
            self._emit(EventKind.WARMUP_FAILED, vm.id, str(exc))
            logger.warning("pool %s: container warm-up of vm %s failed: %s", self.name, vm.id, exc)
            return
        logger.debug("pool %s: vm %s container path warmed in %.0f ms", self.name, vm.id, ms)

    async def _add_ready(self, vm: Vm) -> None:
        """Record ``vm`` and hand it to the first waiting request, or pool it."""
        if self.state is not PoolState.RUNNING:
            await finish(vm.stop())  # closed while it was made
            return
        try:
            await self._records.commit(vm, Role.POOLED, self.name)
        except BaseException:
            await finish(vm.stop())
            raise
        self._emit(EventKind.READY, vm.id)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(vm)
                return
        self.ready.append(vm)

    # -- sizing ------------------------------------------------------------
    async def _sizing_loop(self) -> None:
        """Follow the target: wake the refill when it rose; when the pool holds more
        than it keeps (an adaptive target that fell, a lowered max_size), give back
        one ready VM a tick."""
        last = self.sizer.target()
        while True:
            await asyncio.sleep(SIZING_TICK_S)
            target = self.sizer.target()
            if target != last:
                r = self.sizer.report()
                logger.info("pool %s: target %d -> %d (rate %.3f/s, refill %.2f s, burst %d)",
                            self.name, last, target, r["rate_per_s"], r["refill_s"],
                            r["burst_peak"])
            if target > last:
                self._kick()
            last = target
            keep = target if self.config.sizing == "adaptive" else self.config.max_size
            if len(self.ready) > keep and not self._waiters:
                vm = self.ready.pop()  # the youngest: the oldest has waited warm longest
                logger.info("pool %s: %d ready, keeping %d: stopping vm %s", self.name,
                            len(self.ready) + 1, keep, vm.id)
                await finish(vm.stop())

    def reconfigure(self, **changes: object) -> None:
        """New sizes, keep_running or sizing policy, effective at once (not saved:
        a restarted daemon reads its config file).  ConfigError for bad values."""
        self.config = dataclasses.replace(self.config, **changes)  # validated
        self.sizer.configure(self.config)
        self._kick()

    async def drain(self) -> int:
        """Stop every ready VM now (the refill makes fresh ones up to the target);
        how many were stopped."""
        vms = list(self.ready)
        self.ready.clear()
        for vm in vms:
            await finish(vm.stop())
        self._kick()
        return len(vms)

    # -- health ------------------------------------------------------------
    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval_s)
            for vm in [vm for vm in self.ready if not vm.alive]:
                try:
                    self.ready.remove(vm)
                except ValueError:
                    continue  # handed out meanwhile; the handout checks it
                await self._replace(vm, "its process is gone")

    # -- lifecycle ---------------------------------------------------------
    def status(self) -> dict[str, object]:
        return {"name": self.name, "base": self.config.base, "min_size": self.config.min_size,
                "target": self.sizer.target(), "sizing": self.config.sizing,
                "max_size": self.config.max_size, "ready": len(self.ready),
                "refilling": self.refilling, "handouts": self.handouts, "misses": self.misses,
                "replaced": self.replaced, "keep_running": self.config.keep_running,
                "tenant": self.config.tenant}

    async def close(self) -> None:
        """Stop refilling, fail waiting requests and stop every pooled VM, all of
        them even if some fail; idempotent.  Raises the first failure at the end."""
        if self.state is PoolState.CLOSED:
            return
        self._set_state(PoolState.CLOSED)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(FactoryError(f"pool {self.name} is closed"))
        await self._tasks.close()
        teardown = Teardown(f"pool {self.name}")
        while self.ready:
            vm = self.ready.popleft()
            await teardown.step(f"stopping vm {vm.id}", vm.stop())
        teardown.done()
