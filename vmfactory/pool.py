"""A warm pool of VMs of one configuration (CreateFromCache).

Pooled VMs are made by a base (template clone or cold boot), warmed (their
agent has answered), and paused so they cost no CPU while they wait.  A
handout resumes one, checks that its agent answers (a dead VM is replaced,
never handed out), runs the get-VM sequence and triggers a refill.  Refills run
in the background, bounded by a shared semaphore, and pause while the host's
available memory is under the configured floor.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque

import psutil

from vmfactory.config import PoolConfig, VmConfig
from vmfactory.errors import FactoryError, VmFactoryError
from vmfactory.events import EventBus, PoolEvent
from vmfactory.factory.base import FactoryBase
from vmfactory.factory.sequence import prepare_vm
from vmfactory.factory.warmup import warm_container_path
from vmfactory.hypervisor.base import Vm, VmState
from vmfactory.records import VmRecords
from vmfactory.tasks import TaskOwner

logger = logging.getLogger(__name__)

MEMORY_RECHECK_S = 1.0
REFILL_BACKOFF_S = (0.5, 30.0)


class PoolState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    CLOSED = "closed"


class PoolEmpty(FactoryError):
    """No VM became ready before the caller's deadline."""


class Pool:
    """Keeps ``min_size`` ready VMs of ``config``.

    ``max_size`` bounds the VMs the pool holds or is making (ready + refilling);
    handed-out VMs belong to their leases and are not counted.
    """

    def __init__(self, config: PoolConfig, vm_config: VmConfig, base: FactoryBase,
                 events: EventBus, refill_slots: asyncio.Semaphore, mem_floor_mib: int,
                 health_interval_s: float, records: VmRecords | None = None) -> None:
        self.config = config
        self.vm_config = vm_config
        self.base = base
        self.events = events
        self._slots = refill_slots
        self._mem_floor_mib = mem_floor_mib
        self._health_interval_s = health_interval_s
        self._records = records
        self.ready: deque[Vm] = deque()
        self.refilling = 0
        self.handouts = self.misses = self.replaced = self.failures = 0
        self.warmup_failures = 0
        self.state = PoolState.CREATED
        self._changed = asyncio.Condition()
        self._kick_event = asyncio.Event()
        self._tasks = TaskOwner(f"pool-{config.name}")

    @property
    def name(self) -> str:
        return self.config.name

    def _emit(self, kind: str, vm_id: str = "", detail: str = "") -> None:
        self.events.publish(PoolEvent(self.name, kind, vm_id, detail))

    def accepts(self, vm: Vm) -> bool:
        """Whether ``vm`` has this pool's size (crash recovery re-pools only those)."""
        return (vm.cpus, vm.memory_mib) == (self.vm_config.cpus, self.vm_config.memory_mib)

    def adopt(self, vm: Vm) -> None:
        """Take a recovered VM into the ready list (before :meth:`start`)."""
        if self.state is not PoolState.CREATED:
            raise FactoryError(f"pool {self.name} is {self.state.value}")
        self.ready.append(vm)

    async def start(self) -> None:
        if self.state is not PoolState.CREATED:
            raise FactoryError(f"pool {self.name} is {self.state.value}")
        self.state = PoolState.RUNNING
        await self._tasks.start()
        self._tasks.spawn(self._refill_loop(), "refill")
        self._tasks.spawn(self._health_loop(), "health")

    # -- handout -----------------------------------------------------------
    async def get(self, deadline: float) -> tuple[Vm, str]:
        """A ready VM and where it came from (``pool``, or the base's on a miss)."""
        while True:
            if self.state is not PoolState.RUNNING:
                raise FactoryError(f"pool {self.name} is {self.state.value}")
            vm = self.ready.popleft() if self.ready else None
            if vm is None:
                vm, source = await self._miss(deadline)
                if source != "pool":
                    return vm, source
            try:
                await self._activate(vm)
            except (VmFactoryError, OSError) as exc:
                await self._replace(vm, f"failed at handout: {exc}")
                continue
            except BaseException:
                # The caller gave up (deadline, cancellation): the VM is half handed
                # out, so it is not pooled again; stop it rather than lose it.
                await asyncio.shield(self._replace(vm, "handout cancelled"))
                raise
            # Refill after the handout, not during it: a clone being made competes
            # with the handout for the host's CPUs.
            self._kick()
            self.handouts += 1
            self._emit("handout", vm.id)
            return vm, "pool"

    async def _miss(self, deadline: float) -> tuple[Vm, str]:
        self.misses += 1
        self._emit("miss")
        if self.config.empty == "fallback":
            vm = await self.base.get_vm(self.vm_config)
            return vm, "clone" if vm.spec.incoming is not None else "boot"
        async with self._changed:
            while not self.ready:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.state is not PoolState.RUNNING:
                    raise PoolEmpty(f"pool {self.name} had no ready VM before the deadline")
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except asyncio.TimeoutError:
                    continue
            return self.ready.popleft(), "pool"

    async def _activate(self, vm: Vm) -> None:
        if vm.pid is None:
            raise FactoryError(f"vm {vm.id} has no process")
        # Resume and set the clock; the agent answering proves it alive.  The RNG
        # was reseeded when the VM entered the pool (see _refill_one).
        await prepare_vm(vm, reseed=False)

    async def _replace(self, vm: Vm, why: str) -> None:
        self.replaced += 1
        self._emit("replaced", vm.id, why)
        logger.warning("pool %s: replacing vm %s (%s)", self.name, vm.id, why)
        await vm.stop()
        self._kick()

    # -- refill ------------------------------------------------------------
    def _kick(self) -> None:
        """Wake the refill loop: the pool may be short."""
        self._kick_event.set()

    def _deficit(self) -> int:
        want = self.config.min_size - len(self.ready) - self.refilling
        room = self.config.max_size - len(self.ready) - self.refilling
        return max(0, min(want, room))

    async def _refill_loop(self) -> None:
        backoff = REFILL_BACKOFF_S[0]
        while True:
            while self._deficit() > 0:
                if not self._memory_ok():
                    await asyncio.sleep(MEMORY_RECHECK_S)
                    continue
                self.refilling += 1
                self._tasks.spawn(self._refill_one(), "refill-one")
            self._kick_event.clear()
            if self.failures:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, REFILL_BACKOFF_S[1])
                self.failures = 0
            else:
                backoff = REFILL_BACKOFF_S[0]
                await self._kick_event.wait()

    def _memory_ok(self) -> bool:
        available = psutil.virtual_memory().available >> 20
        if available >= self._mem_floor_mib:
            return True
        self._emit("refill-paused", detail=f"{available} MiB available < floor "
                                           f"{self._mem_floor_mib} MiB")
        return False

    async def _warm(self, vm: Vm) -> None:
        """Translate the container path ahead of the lessee (see factory/warmup).  A
        failure costs the speed-up, not the VM: it passed every other check."""
        try:
            ms = await warm_container_path(vm)
        except VmFactoryError as exc:
            self.warmup_failures += 1
            self._emit("warmup-failed", vm.id, str(exc))
            logger.warning("pool %s: container warm-up of vm %s failed: %s", self.name, vm.id, exc)
            return
        logger.debug("pool %s: vm %s container path warmed in %.0f ms", self.name, vm.id, ms)

    async def _refill_one(self) -> None:
        # ``refilling`` drops only once the VM is in ``ready`` (or failed): in
        # between, the refill loop would count the pool short and make one more.
        try:
            vm = await self._make_one()
            if vm is not None:
                await self._add_ready(vm)
        finally:
            self.refilling -= 1
            self._kick()

    async def _make_one(self) -> Vm | None:
        """A VM for the pool, ready to hand out; None (counted, reported) on failure."""
        try:
            async with self._slots:
                vm = await self.base.get_vm(self.vm_config)
            try:
                # The base ran the get-VM sequence (reseeded: clones share their
                # template's RNG state until then).  Run the handout path and a gRPC
                # call once more, so their guest code is already in TCG's
                # translation cache when the handout comes.
                await prepare_vm(vm, reseed=False)
                if vm.agent is not None:
                    await vm.agent.wait_ready(vm.timeouts.agent_call)
                if self.config.warm_containers:
                    await self._warm(vm)
                if not self.config.keep_running:
                    await vm.pause()
            except BaseException:
                await vm.stop()
                raise
        except VmFactoryError as exc:
            self.failures += 1
            self._emit("refill-failed", detail=str(exc))
            logger.error("pool %s: refill failed: %s", self.name, exc)
            return None
        return vm

    async def _add_ready(self, vm: Vm) -> None:
        if self.state is not PoolState.RUNNING:
            await vm.stop()
            return
        if self._records is not None:
            try:
                await asyncio.to_thread(self._records.save, vm, "pooled", self.name)
            except BaseException:
                await asyncio.shield(vm.stop())
                raise
        async with self._changed:
            self.ready.append(vm)
            self._changed.notify()
        self._emit("ready", vm.id)

    # -- health ------------------------------------------------------------
    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval_s)
            for vm in list(self.ready):
                if vm.pid is None or vm.state not in (VmState.RUNNING, VmState.PAUSED):
                    try:
                        self.ready.remove(vm)
                    except ValueError:
                        continue  # handed out meanwhile; the handout checks it
                    await self._replace(vm, "QEMU process is gone")

    # -- lifecycle ---------------------------------------------------------
    def status(self) -> dict[str, object]:
        return {"name": self.name, "base": self.config.base, "min_size": self.config.min_size,
                "max_size": self.config.max_size, "ready": len(self.ready),
                "refilling": self.refilling, "handouts": self.handouts, "misses": self.misses,
                "replaced": self.replaced, "keep_running": self.config.keep_running}

    async def close(self) -> None:
        """Stop refilling and stop every pooled VM; idempotent."""
        if self.state is PoolState.CLOSED:
            return
        self.state = PoolState.CLOSED
        async with self._changed:
            self._changed.notify_all()
        await self._tasks.close()
        while self.ready:
            await self.ready.popleft().stop()
