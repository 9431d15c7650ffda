"""Clone processes started ahead (CreateFromTemplate's fast path).

Under TCG a QEMU process costs 50-70 ms of start-up before it can take a
template's device state.  A template keeps ``count`` QEMUs of its device set
waiting in ``-incoming defer`` (VmState.STANDBY), so a clone costs only the
restore.  They wait at idle CPU priority (a clone's restore or a lessee's
container comes first); one background task, owned here, tops them up after
each clone (a template's first clone starts the first: a template that is never
cloned, as ``vmfactory template create`` makes, runs no QEMU).  Closing stops every waiting QEMU: they map the template's memory
file, which cannot be removed while they do.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from vmfactory.errors import VmFactoryError
from vmfactory.hypervisor.base import Vm, VmState
from vmfactory.util.tasks import Supervisor, Teardown, finish

logger = logging.getLogger(__name__)

STANDBY_NICE = 19


class StandbyClones:
    """Up to ``count`` clone VMs in STANDBY, made by ``make`` (a CREATED clone)."""

    def __init__(self, name: str, make: Callable[[], Vm], count: int) -> None:
        self.name = name
        self.count = count
        self._make = make
        self._waiting: deque[Vm] = deque()
        self._tasks = Supervisor(f"standby-{name}")
        self._filling: asyncio.Task[None] | None = None
        self._starting: Vm | None = None
        self.failures = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def vms(self) -> list[Vm]:
        """The waiting VMs and the one being started, if any (for status)."""
        return [*self._waiting, *([self._starting] if self._starting is not None else [])]

    def take(self) -> Vm | None:
        """A waiting clone whose QEMU still runs (at its own priority again), or None."""
        while self._waiting:
            vm = self._waiting.popleft()
            if vm.state is VmState.STANDBY and vm.pid is not None:
                vm.set_priority(0)
                return vm
            logger.warning("standby %s: vm %s is gone (%s)", self.name, vm.id, vm.state.value)
            self._tasks.spawn(f"stop-{vm.id}", vm.stop)
        return None

    def replenish(self) -> None:
        """Top the waiting clones up to ``count``, in the background."""
        if len(self._waiting) < self.count and not self._tasks.running("fill"):
            self._filling = self._tasks.spawn("fill", self._fill)

    async def settled(self) -> None:
        """Wait until a fill in progress has ended (benchmarks measure the steady
        state: a clone with a QEMU waiting for it).  Cancelling the wait leaves the
        fill running."""
        if self._filling is not None and not self._filling.done():
            await asyncio.wait([self._filling])

    async def _fill(self) -> None:
        while len(self._waiting) < self.count:
            vm = self._starting = self._make()
            try:
                await vm.stand_by()
                vm.set_priority(STANDBY_NICE)
            except VmFactoryError as exc:
                # stand_by tore its VM down; a clone then starts its own QEMU.
                self.failures += 1
                logger.warning("standby %s: cannot start a QEMU ahead: %s", self.name, exc)
                return
            except BaseException:
                await finish(vm.stop())
                raise
            finally:
                self._starting = None
            self._waiting.append(vm)

    def status(self) -> dict[str, int]:
        return {"standby": self.count, "waiting": len(self._waiting), "failures": self.failures}

    async def close(self) -> None:
        """Stop the fill and every waiting QEMU; idempotent.  Raises the first
        failure once all were stopped."""
        await self._tasks.close()
        teardown = Teardown(f"standby clones of {self.name}")
        while self._waiting:
            vm = self._waiting.popleft()
            await teardown.step(f"stopping vm {vm.id}", vm.stop())
        teardown.done()
