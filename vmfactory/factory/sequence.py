"""The get-VM sequence every base runs before handing a VM out.

Resume it if paused, reseed the guest RNG from host entropy (clones share the
template's RNG state until they do), set the guest clock (a clone's clock
resumes from the template's save time).  Any failure stops the VM and names
the step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from vmfactory.config import VmConfig
from vmfactory.errors import FactoryError, VmFactoryError
from vmfactory.hypervisor.base import Vm, VmState
from vmfactory.util.tasks import finish

logger = logging.getLogger(__name__)

RESEED_BYTES = 64
ONLINE_POLL_S = 0.05


async def prepare_vm(vm: Vm, want: VmConfig | None = None, *,
                     reseed: bool = True) -> dict[str, float]:
    """Run the sequence on ``vm`` (grown to ``want`` if given); return step durations in ms.

    ``reseed=False`` sets only the clock: for a pooled VM, which was reseeded when
    it entered the pool, so its RNG already differs from every other clone's.  A
    CRNG reseed costs ~20 ms of emulated CPU under TCG; the clock alone ~1 ms.
    """
    steps: dict[str, float] = {}
    step = "resume"
    try:
        t = time.monotonic()
        if vm.state is VmState.PAUSED:
            await vm.resume()
        steps[step] = (time.monotonic() - t) * 1000
        if vm.agent is None:
            raise FactoryError(f"vm {vm.id} has no agent channel")
        step = "activate"
        if vm.control is not None:
            # One control-channel round trip: proves the agent is alive, reseeds, sets the clock.
            t = time.monotonic()
            entropy = os.urandom(RESEED_BYTES) if reseed else b""
            if not await vm.control.activate(entropy) and reseed:
                logger.warning("vm %s: the guest RNG was not reseeded", vm.id)
            steps[step] = (time.monotonic() - t) * 1000
        else:
            await _activate_over_rpc(vm, steps, reseed)
        if want is not None and (want.cpus > vm.cpus or want.memory_mib > vm.memory_mib):
            step = "hot-plug"
            t = time.monotonic()
            await _grow(vm, want)
            steps[step] = (time.monotonic() - t) * 1000
    except (VmFactoryError, OSError) as exc:
        await finish(vm.stop())
        raise FactoryError(f"get-vm step {step} failed for vm {vm.id}: {exc}") from exc
    except BaseException:
        await finish(vm.stop())  # cancelled: nobody will get this VM
        raise
    return steps


async def _grow(vm: Vm, want: VmConfig) -> None:
    """Hot-plug up to ``want`` and wait until the guest has onlined it all."""
    assert vm.agent is not None
    await vm.hotplug(max(want.cpus, vm.cpus), max(want.memory_mib, vm.memory_mib))
    # ACPI delivers the new devices asynchronously: poll until the guest sees them.
    deadline = time.monotonic() + vm.timeouts.agent_call
    while True:
        reply = await vm.agent.online_resources()
        if reply.cpus_online >= vm.cpus and reply.mem_total_kib >= _expected_kib(vm):
            return
        if time.monotonic() > deadline:
            raise FactoryError(f"guest sees {reply.cpus_online} vCPUs and "
                               f"{reply.mem_total_kib >> 10} MiB after hot-plug to "
                               f"{vm.cpus} vCPUs / {vm.memory_mib} MiB")
        await asyncio.sleep(ONLINE_POLL_S)


def _expected_kib(vm: Vm) -> int:
    """MemTotal the guest should reach: what it had at boot plus what was plugged,
    less the ~1.6% the kernel keeps for the new memory's page structures."""
    plugged_kib = (vm.memory_mib - vm.spec.vm.memory_mib) * 1024
    return vm.boot_mem_total_kib + int(plugged_kib * 0.95)


async def _activate_over_rpc(vm: Vm, steps: dict[str, float], reseed: bool) -> None:
    """The same as the control channel's activate, in agent RPCs (stand-in VMs)."""
    assert vm.agent is not None
    if reseed:
        t = time.monotonic()
        reply = await vm.agent.reseed(os.urandom(RESEED_BYTES))
        if not reply.reseeded:
            logger.warning("vm %s: the guest RNG was not reseeded", vm.id)
        steps["reseed"] = (time.monotonic() - t) * 1000
    t = time.monotonic()
    await vm.agent.set_time()
    steps["set-clock"] = (time.monotonic() - t) * 1000
