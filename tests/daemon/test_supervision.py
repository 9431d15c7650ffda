"""Background failures of the daemon core, on the host-process stand-in, with a
store that fails on demand (tests.faults.FailingStore, a test double): a
failing refill is logged and retried while the daemon keeps serving; a failing
lease reaper is logged and stops the daemon cleanly; nothing is left behind."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from tests.daemon.conftest import ME, POOL, standin_config, standin_hypervisor, standins, started, until
from tests.faults import FailingStore
from vmfactory.daemon.core import DaemonState, VmRequest
from vmfactory.daemon.events import EventKind
from vmfactory.errors import BackgroundFailure, PoolEmpty, StoreError
from vmfactory.hypervisor.base import VmState
from vmfactory.hypervisor.process import ProcessHypervisor, ProcessVm
from vmfactory.store import open_store


def failing_store(root: Path) -> FailingStore:
    return FailingStore(open_store(f"file://{root / 'store'}"))


async def test_refills_failing_on_the_store_are_logged_and_retried(
        root: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = failing_store(root)
    store.fail = {"save"}
    daemon = await started(standin_config(root), store=store)
    pool = daemon.pools["p"]
    try:
        await until(lambda: daemon.events.counts.get(EventKind.REFILL_FAILED, 0) >= 2)
        assert "pool p: refill failed: injected failure: store save refused" in caplog.text
        # Still serving: a request gets an answer (no VM could be pooled), not a hang.
        assert daemon.state is DaemonState.SERVING
        with pytest.raises(PoolEmpty):
            await daemon.get_vm(VmRequest(), time.monotonic() + 0.2, ME)
        # The VMs whose record failed were stopped: any live one is a refill in flight.
        assert not pool.ready and len(standins(root)) <= pool.refilling
        store.fail = set()
        await until(lambda: len(pool.ready) == 2, timeout=40, what="refill after the fault")
        lease = await daemon.get_vm(VmRequest(), time.monotonic() + 10, ME)
        await daemon.release(lease.id, ME)
    finally:
        await daemon.shutdown()
    assert not standins(root)


async def test_a_lease_that_cannot_be_recorded_stops_its_vm(root: Path) -> None:
    store = failing_store(root)
    daemon = await started(standin_config(root), store=store)
    pool = daemon.pools["p"]
    try:
        await until(lambda: len(pool.ready) == 2)
        vm = pool.ready[0]
        store.fail = {"save"}
        with pytest.raises(StoreError):
            await daemon.get_vm(VmRequest(), time.monotonic() + 10, ME)
        assert vm.state is VmState.STOPPED and not daemon.leases.values()
    finally:
        store.fail = set()
        await daemon.shutdown()
    assert not standins(root)


async def test_a_failing_lease_reaper_stops_the_daemon_cleanly(
        root: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = failing_store(root)
    daemon = await started(standin_config(root), store=store)
    try:
        lease = await daemon.get_vm(VmRequest(lease_ttl_s=0.3), time.monotonic() + 30, ME)
        store.fail = {"delete"}  # the expired lease's record cannot be dropped
        await asyncio.wait_for(daemon.wait_stopped(), 10)
        assert daemon.failure is not None and daemon.failure.task == "daemon:lease-reaper"
        assert "background task lease-reaper failed" in caplog.text
        assert "stopping the daemon" in caplog.text
        assert lease.vm.state is VmState.STOPPED
    finally:
        with pytest.raises(BackgroundFailure, match="lease-reaper failed: StoreError"):
            await daemon.shutdown()
    # The teardown ran to its end although every record deletion failed.
    assert daemon.state is DaemonState.STOPPED and store.closed
    assert not standins(root)
    assert not (root / "run").exists() or not any((root / "run").iterdir())


class FlakyVm(ProcessVm):
    """A stand-in whose liveness check raises once (a bug in the health loop)."""

    broken = True

    @property
    def alive(self) -> bool:
        if FlakyVm.broken:
            FlakyVm.broken = False
            raise RuntimeError("health check bug")
        return super().alive


class FlakyHypervisor(ProcessHypervisor):
    vm_class = FlakyVm


async def test_a_crashing_health_loop_is_restarted(root: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    config = standin_config(root)
    daemon = await started(config, hypervisor=standin_hypervisor(config, FlakyHypervisor))
    pool = daemon.pools["p"]
    try:
        await until(lambda: "restarting health" in caplog.text, what="health restarted")
        assert "background task health failed" in caplog.text
        assert "RuntimeError: health check bug" in caplog.text  # the traceback
        # The restarted loop still does its job.
        await until(lambda: len(pool.ready) == 2)
        victim = pool.ready[0]
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        await until(lambda: pool.replaced == 1, what="replacement by the restarted loop")
        assert daemon.state is DaemonState.SERVING
    finally:
        await daemon.shutdown()


async def test_closing_a_pool_stops_every_vm_even_when_stops_fail(root: Path) -> None:
    store = failing_store(root)
    daemon = await started(standin_config(root, [{**POOL, "min_size": 3, "max_size": 3}]),
                           store=store)
    pool = daemon.pools["p"]
    await until(lambda: len(pool.ready) == 3)
    vms = list(pool.ready)
    store.fail = {"delete"}
    with pytest.raises(StoreError):
        await pool.close()
    assert all(vm.state is VmState.STOPPED for vm in vms) and not pool.ready
    store.fail = set()
    await daemon.shutdown()
    assert not standins(root)
