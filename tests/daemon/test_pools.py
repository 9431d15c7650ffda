"""Pools and leases of the daemon core, on the host-process stand-in."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.daemon.conftest import ME, POOL, standin_config, standin_hypervisor, standins, started, until
from vmfactory.daemon.core import VmRequest
from vmfactory.daemon.events import EventKind
from vmfactory.daemon.leases import VmSource
from vmfactory.errors import DaemonError, DeadlineExceeded, LeaseNotFound, PoolEmpty
from vmfactory.hypervisor.base import VmState
from vmfactory.hypervisor.process import ProcessHypervisor, ProcessVm


def soon(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


async def test_handout_refill_and_release(root: Path) -> None:
    daemon = await started(standin_config(root))
    pool = daemon.pools["p"]
    try:
        await until(lambda: len(pool.ready) == 2, what="pool full")
        assert all(vm.state is VmState.PAUSED for vm in pool.ready)
        lease = await daemon.get_vm(VmRequest(client="t"), soon(), ME)
        assert lease.source is VmSource.POOL and lease.vm.state is VmState.RUNNING
        assert pool.handouts == 1 and pool.misses == 0
        # The handout triggered a refill: the pool is full again, the lease kept.
        await until(lambda: len(pool.ready) == 2 and pool.refilling == 0, what="refill")
        assert lease.id in daemon.leases and lease.vm not in pool.ready
        pid = lease.vm.pid
        await daemon.release(lease.id, ME)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        with pytest.raises(LeaseNotFound):
            await daemon.release(lease.id, ME)
        status = daemon.status(ME)
        assert [p["ready"] for p in status["pools"]] == [2]
        assert not any(v["lease_id"] for v in status["vms"])
    finally:
        await daemon.shutdown()
    assert not standins(root)
    assert not (root / "run").exists() or not any((root / "run").iterdir())


async def test_miss_waits_for_the_refill(root: Path) -> None:
    daemon = await started(standin_config(root, [{**POOL, "min_size": 1, "max_size": 1}]))
    try:
        # Asked at once: the pool's first VM is still being made; the request waits.
        lease = await daemon.get_vm(VmRequest(), soon(30), ME)
        assert lease.source is VmSource.POOL
        assert daemon.pools["p"].misses == 1
        await daemon.release(lease.id, ME)
    finally:
        await daemon.shutdown()


async def test_miss_past_the_deadline_is_pool_empty(root: Path) -> None:
    daemon = await started(standin_config(root, [{**POOL, "min_size": 0, "max_size": 1}]))
    try:
        start = time.monotonic()
        with pytest.raises(PoolEmpty):
            await daemon.get_vm(VmRequest(), time.monotonic() + 0.3, ME)
        assert 0.25 < time.monotonic() - start < 5
        with pytest.raises(DeadlineExceeded, match="deadline passed before"):
            await daemon.get_vm(VmRequest(), time.monotonic() - 1, ME)
        assert not daemon.leases.values() and not standins(root)
    finally:
        await daemon.shutdown()


async def test_miss_with_fallback_boots_one(root: Path) -> None:
    daemon = await started(standin_config(
        root, [{**POOL, "min_size": 0, "max_size": 1, "empty": "fallback"}]))
    try:
        lease = await daemon.get_vm(VmRequest(), soon(), ME)
        assert lease.source is VmSource.BOOT and lease.pool == "p"
        assert daemon.pools["p"].misses == 1 and daemon.direct.booted == 1
        await daemon.release(lease.id, ME)
    finally:
        await daemon.shutdown()
    assert not standins(root)


async def test_dead_pooled_vm_is_replaced_not_handed_out(root: Path) -> None:
    daemon = await started(standin_config(root))
    pool = daemon.pools["p"]
    try:
        await until(lambda: len(pool.ready) == 2)
        victim = pool.ready[0]
        os.kill(victim.pid, signal.SIGKILL)
        await until(lambda: pool.replaced == 1 and len(pool.ready) == 2
                    and victim not in pool.ready, what="replacement")
        leases = [await daemon.get_vm(VmRequest(), soon(), ME) for _ in range(2)]
        assert victim not in [lease.vm for lease in leases]
        assert daemon.events.counts[EventKind.REPLACED] == 1
        for lease in leases:
            await daemon.release(lease.id, ME)
    finally:
        await daemon.shutdown()


async def test_lease_ttl_reclaims_the_vm(root: Path) -> None:
    daemon = await started(standin_config(root))
    try:
        lease = await daemon.get_vm(VmRequest(lease_ttl_s=0.2), soon(30), ME)
        kept = await daemon.get_vm(VmRequest(), soon(30), ME)
        await until(lambda: lease.id not in daemon.leases, what="TTL")
        await until(lambda: lease.vm.state is VmState.STOPPED)
        assert kept.id in daemon.leases and kept.vm.alive
        assert daemon.events.counts[EventKind.RECLAIMED] == 1
        with pytest.raises(LeaseNotFound):
            await daemon.release(lease.id, ME)
        await daemon.release(kept.id, ME)
    finally:
        await daemon.shutdown()


async def test_memory_floor_pauses_refills(root: Path) -> None:
    daemon = await started(standin_config(root, mem_floor_mib=1 << 20))
    try:
        await until(lambda: daemon.events.counts.get(EventKind.REFILL_PAUSED, 0) >= 1)
        await asyncio.sleep(0.3)
        assert not daemon.pools["p"].ready and daemon.pools["p"].refilling == 0
        assert not standins(root)
    finally:
        await daemon.shutdown()


class SlowResumeVm(ProcessVm):
    """A stand-in whose resume blocks until the test lets it go."""

    gate = asyncio.Event()

    async def resume(self) -> None:
        await self.gate.wait()
        await super().resume()


class SlowResumeHypervisor(ProcessHypervisor):
    vm_class = SlowResumeVm


async def test_cancelled_mid_handout_leaves_no_vm_and_no_lease(root: Path) -> None:
    config = standin_config(root)
    daemon = await started(config, hypervisor=standin_hypervisor(config, SlowResumeHypervisor))
    pool = daemon.pools["p"]
    try:
        await until(lambda: len(pool.ready) == 2)
        vm = pool.ready[0]
        request = asyncio.ensure_future(daemon.get_vm(VmRequest(), soon(), ME))
        await until(lambda: vm not in pool.ready, what="handout started")
        await asyncio.sleep(0.05)  # blocked in resume
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        assert vm.state is VmState.STOPPED and not daemon.leases.values()
        assert pool.replaced == 1
        await until(lambda: len(pool.ready) == 2, what="refill after the cancelled handout")
    finally:
        SlowResumeVm.gate.set()
        await daemon.shutdown()
    assert not standins(root)


async def test_vm_served_as_its_waiter_gives_up_goes_back_to_the_pool(root: Path) -> None:
    daemon = await started(standin_config(root, [{**POOL, "min_size": 1, "max_size": 1}]))
    pool = daemon.pools["p"]
    try:
        request = asyncio.ensure_future(daemon.get_vm(VmRequest(), soon(30), ME))
        await until(lambda: len(pool._waiters) == 1, what="a waiting request")
        # Cancel the request in the same loop turn as the refill hands it its VM.
        pool._waiters[0].add_done_callback(lambda _: request.cancel())
        with pytest.raises(asyncio.CancelledError):
            await request
        assert len(pool.ready) == 1 and pool.ready[0].alive
        assert not daemon.leases.values()
    finally:
        await daemon.shutdown()


async def test_requests_on_a_stopping_daemon_are_refused(root: Path) -> None:
    daemon = await started(standin_config(root, [{**POOL, "min_size": 0, "max_size": 1}]))
    await daemon.shutdown()
    await daemon.shutdown()  # idempotent
    with pytest.raises(DaemonError, match="stopped"):
        await daemon.get_vm(VmRequest(), soon(), ME)
    with pytest.raises(DaemonError):
        await daemon.release("x", ME)


async def test_a_request_cancelled_at_any_point_leaves_nothing_unaccounted(root: Path) -> None:
    """Cancel a GetVM after 0, 1, 2 ... loop turns, until one completes: at every
    point the pool keeps no lock, no lease is left, and each VM process is either
    pooled or a refill in flight (none is lost)."""
    daemon = await started(standin_config(root, [{**POOL, "min_size": 2, "max_size": 4}]))
    pool = daemon.pools["p"]
    cancelled = 0
    try:
        for turns in range(10_000):
            await until(lambda: len(pool.ready) >= 1, what="a ready VM")
            request = asyncio.ensure_future(daemon.get_vm(VmRequest(), soon(), ME))
            for _ in range(turns):
                await asyncio.sleep(0)
            if request.done():
                await daemon.release(request.result().id, ME)
                break
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            cancelled += 1
            assert not daemon.leases.values()
            assert len(standins(root)) <= len(pool.ready) + pool.refilling
        assert cancelled >= 5  # a handout spans several turns: each was cut once
        await until(lambda: len(pool.ready) == 2 and pool.refilling == 0, what="pool refilled")
        lease = await daemon.get_vm(VmRequest(), soon(), ME)  # and it still serves
        await daemon.release(lease.id, ME)
    finally:
        await daemon.shutdown()
    assert not standins(root)


async def test_pooled_vms_wait_at_idle_priority_and_a_handout_gets_its_own_back(
        root: Path) -> None:
    daemon = await started(standin_config(root, refill_nice=19))
    pool = daemon.pools["p"]
    try:
        await until(lambda: len(pool.ready) == 2, what="pool full")
        assert [os.getpriority(os.PRIO_PROCESS, vm.pid) for vm in pool.ready] == [19, 19]
        lease = await daemon.get_vm(VmRequest(), soon(), ME)
        assert lease.vm.pid is not None
        threads = os.listdir(f"/proc/{lease.vm.pid}/task")
        assert {os.getpriority(os.PRIO_PROCESS, int(t)) for t in threads} == {0}
        await daemon.release(lease.id, ME)
    finally:
        await daemon.shutdown()


async def test_refills_wait_for_a_quiet_gap_unless_the_pool_runs_low(root: Path) -> None:
    daemon = await started(standin_config(root, [{**POOL, "min_size": 2, "max_size": 2}],
                                          refill_quiet_s=5.0, refill_low_water=1))
    pool = daemon.pools["p"]
    try:
        await until(lambda: len(pool.ready) == 2 and pool.refilling == 0, what="pool full")
        first = await daemon.get_vm(VmRequest(), soon(), ME)
        await asyncio.sleep(0.5)
        assert pool.refilling == 0 and len(pool.ready) == 1  # one left: the burst goes first
        second = await daemon.get_vm(VmRequest(), soon(), ME)
        # None left, under the low-water mark: refilled without waiting for quiet.
        await until(lambda: pool.refilling > 0 or len(pool.ready) > 0, timeout=4.0,
                    what="a refill under the low-water mark")
        for lease in (first, second):
            await daemon.release(lease.id, ME)
    finally:
        await daemon.shutdown()
    assert not standins(root)


class _SilentGuest:
    """A test double for a pooled VM's agent and control channels: the thin
    handout must not call the guest, so any call but close() fails the test."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)

        async def call(*args: Any, **kwargs: Any) -> None:
            if name != "close":
                raise AssertionError(f"the handout called the guest: {name}")
        return call


async def test_a_paused_handout_makes_no_guest_round_trip(root: Path) -> None:
    daemon = await started(standin_config(root))
    pool = daemon.pools["p"]
    try:
        await until(lambda: len(pool.ready) == 2, what="pool full")
        real = {vm.id: (vm.agent, vm.control) for vm in pool.ready}
        silent = _SilentGuest()
        for vm in pool.ready:
            vm.agent, vm.control = silent, silent  # type: ignore[assignment]
        lease = await daemon.get_vm(VmRequest(), soon(), ME)
        assert lease.vm.state is VmState.RUNNING and lease.source is VmSource.POOL
        assert silent.calls == ["close"]  # hand_over_agent: the host's connection only
        for vm in [lease.vm, *pool.ready]:
            agent, control = real.get(vm.id, (None, None))
            vm.agent, vm.control = agent, control
        for agent, _ in real.values():
            if agent is not None:
                await agent.close()
        await daemon.release(lease.id, ME)
    finally:
        await daemon.shutdown()
    assert not standins(root)
