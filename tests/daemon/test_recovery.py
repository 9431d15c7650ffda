"""Crash recovery of the daemon core, on the host-process stand-in: a daemon
that dies without its teardown leaves its VMs running; the next one takes
back what its records account for and reaps the rest."""

from __future__ import annotations

import time
from pathlib import Path

from tests.daemon.conftest import ME, standin_config, standin_hypervisor, standins, started, until
from vmfactory.config import Config
from vmfactory.daemon.core import Daemon, VmRequest
from vmfactory.daemon.leases import VmSource
from vmfactory.daemon.records import Role
from vmfactory.hypervisor.base import Vm, VmSpec, VmState


async def crash(daemon: Daemon) -> None:
    """What SIGKILL leaves: the VM processes (own sessions) and the store's files.
    The background tasks end and the store is let go, nothing is stopped."""
    await daemon._tasks.close()
    for pool in daemon.pools.values():
        await pool._tasks.close()
    for pool in daemon.pools.values():
        for vm in pool.ready:
            await vm.disconnect_agent()
    for lease in daemon.leases.values():
        await lease.vm.disconnect_agent()
    daemon.store.close()


async def leftovers(config: Config, first: Daemon, spec: VmSpec) -> tuple[Vm, Vm]:
    """A VM process no record accounts for (made between a spawn and its record),
    and a record whose VM is gone."""
    stray = standin_hypervisor(config).create_vm(spec)
    await stray.start()
    gone = standin_hypervisor(config).create_vm(spec)
    await gone.start()
    first.records.save(gone, Role.POOLED, "p")
    gone.stop_callbacks.clear()  # it "dies" with its record left behind
    await gone.stop()
    return stray, gone


async def test_a_restarted_daemon_takes_back_pooled_and_leased_vms(root: Path) -> None:
    config = standin_config(root)
    first = await started(config)
    pool = first.pools["p"]
    await until(lambda: len(pool.ready) == 2)
    lease = await first.get_vm(VmRequest(client="c", lease_ttl_s=600), time.monotonic() + 10, ME)
    await until(lambda: len(pool.ready) == 2 and pool.refilling == 0)
    pooled = {vm.id: vm.pid for vm in pool.ready}
    stray, gone = await leftovers(config, first, lease.vm.spec)
    await crash(first)

    second = await started(config)
    try:
        report = second.recovery
        assert sorted(report.pooled) == sorted(pooled) and report.leased == [lease.vm.id]
        assert gone.id in report.dropped and not second.store.list("vms/" + gone.id)
        assert report.reaped_pids  # the stray: no record knew it
        await until(lambda: stray.pid is None, what="the stray VM reaped")
        again = second.leases.get(lease.id)
        assert (again.vm.pid, again.source, again.client, again.ttl_s) == (
            lease.vm.pid, VmSource.POOL, "c", 600)
        assert {vm.id: vm.pid for vm in second.pools["p"].ready} == pooled
        assert all(vm.state is VmState.PAUSED for vm in second.pools["p"].ready)
        # Taken back for real: handed out and answering.
        served = await second.get_vm(VmRequest(), time.monotonic() + 10, ME)
        assert served.vm.id in pooled and served.vm.alive
        await second.release(served.id, ME)
        await second.release(lease.id, ME)
    finally:
        await second.shutdown()
        await stray.stop()
    assert not standins(root)


async def test_records_that_lie_are_dropped_not_trusted(root: Path) -> None:
    config = standin_config(root, pools=[])
    first = await started(config)
    store = first.store
    store.save_json("vms/evil", {"vm_id": "../../etc", "pid": 1})
    store.save_json("vms/aaaa", {"vm_id": "aaaa", "pid": 1, "spec": "x", "role": "pooled"})
    victim = standin_hypervisor(config).create_vm(await first.direct.spec_for(config.vm))
    await victim.start()
    # pid 1 is not this VM's process: adopting it must fail, not signal it.
    store.save_json(f"vms/{victim.id}", {"vm_id": victim.id, "pid": 1,
                                         "spec": victim.spec.to_record(), "cpus": 1,
                                         "memory_mib": 256, "role": "pooled", "pool": "p"})
    await crash(first)
    second = await started(config)
    try:
        assert second.recovery.adopted == 0
        assert {"evil", "aaaa", victim.id} <= set(second.recovery.dropped)
        assert not second.store.list("vms/")  # every lying record is gone
        await until(lambda: victim.pid is None, what="unaccounted process reaped")
    finally:
        await second.shutdown()
        await victim.stop()
