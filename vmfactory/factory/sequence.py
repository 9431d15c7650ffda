"""The get-VM sequence every base runs before handing a VM out.

Resume it if paused, reseed the guest RNG from host entropy (clones share the
template's RNG state until they do), set the guest clock (a clone's clock
resumes from the template's save time).  Any failure stops the VM and names
the step.
"""

from __future__ import annotations

import logging
import os
import time

from vmfactory.errors import FactoryError, VmFactoryError
from vmfactory.hypervisor.base import Vm, VmState

logger = logging.getLogger(__name__)

RESEED_BYTES = 64


async def prepare_vm(vm: Vm) -> dict[str, float]:
    """Run the sequence on ``vm``; return each step's duration in ms."""
    steps: dict[str, float] = {}
    step = "resume"
    try:
        t = time.monotonic()
        if vm.state is VmState.PAUSED:
            await vm.resume()
        steps[step] = (time.monotonic() - t) * 1000
        if vm.agent is None:
            raise FactoryError(f"vm {vm.id} has no agent channel")
        step = "reseed"
        t = time.monotonic()
        reply = await vm.agent.reseed(os.urandom(RESEED_BYTES))
        if not reply.reseeded:
            logger.warning("vm %s: the guest RNG was not reseeded", vm.id)
        steps[step] = (time.monotonic() - t) * 1000
        step = "set-clock"
        t = time.monotonic()
        await vm.agent.set_time()
        steps[step] = (time.monotonic() - t) * 1000
    except (VmFactoryError, OSError) as exc:
        await vm.stop()
        raise FactoryError(f"get-vm step {step} failed for vm {vm.id}: {exc}") from exc
    return steps
