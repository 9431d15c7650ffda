"""The guest agent, run as a host process by the stand-in hypervisor (no QEMU)."""

from __future__ import annotations

import asyncio
import os
import platform as host_platform
import time
from pathlib import Path

import psutil
import pytest

from tests import standin
from tests.standin import SPEC, processes_under
from vmfactory import __version__
from vmfactory.agent import AgentClient
from vmfactory.config import TimeoutsConfig
from vmfactory.errors import AgentError, HypervisorError, VmStateError
from vmfactory.hypervisor.base import VmState
from vmfactory.hypervisor.process import ProcessHypervisor, ProcessVm
from vmfactory.proto import agent_pb2 as pb
from vmfactory.ttrpc import aio as ttrpc
from vmfactory.ttrpc import frames as f
from vmfactory.ttrpc.frames import RpcError

pytestmark = pytest.mark.timeout(60)

# The stand-in VM's fixtures, used here by name.
run_root, hypervisor, vm = standin.run_root, standin.hypervisor, standin.vm

HOUR_NS = 3600 * 10**9


def address(machine: ProcessVm) -> str:
    return f"unix:{machine.agent_socket}"


# --- a running agent ----------------------------------------------------------------

async def test_started_vm_is_running(vm: ProcessVm) -> None:
    assert vm.state is VmState.RUNNING
    assert vm.pid is not None and psutil.pid_exists(vm.pid)
    assert vm.agent_socket.is_socket()
    assert len(str(vm.agent_socket)) < 108
    assert vm.timings.agent_ready_ms >= vm.timings.qemu_start_ms > 0
    assert vm.memory().rss_mib > 1


async def test_ping_echoes_and_reports_version(vm: ProcessVm) -> None:
    assert vm.agent is not None
    reply = await vm.agent.ping()
    assert reply.agent_version == __version__


async def test_info_describes_the_stand_in(vm: ProcessVm) -> None:
    assert vm.agent is not None
    before = time.time_ns()
    info = await vm.agent.info(16)
    after = time.time_ns()
    assert info.platform == "host-standin"
    assert len(info.random) == 16
    assert info.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert info.kernel_release == host_platform.release()
    assert info.cpus_online >= 1
    assert info.mem_total_kib > 0 and 0 < info.mem_available_kib <= info.mem_total_kib
    assert before - 10**9 <= info.time_unix_ns <= after + 10**9
    assert info.uptime_s > 0
    assert info.agent_version == __version__
    assert info.boot.agent_ready_s >= info.boot.agent_start_s > 0


async def test_info_random_bytes_are_fresh(vm: ProcessVm) -> None:
    assert vm.agent is not None
    first, second = await vm.agent.info(16), await vm.agent.info(16)
    assert first.random != second.random
    assert first.boot_id == second.boot_id
    assert (await vm.agent.info(0)).random == b""
    assert len((await vm.agent.info(256)).random) == 256


@pytest.mark.parametrize("count", [257, 1000])
async def test_info_rejects_too_many_random_bytes(vm: ProcessVm, count: int) -> None:
    assert vm.agent is not None
    with pytest.raises(AgentError, match="INVALID_ARGUMENT") as info:
        await vm.agent.info(random_bytes=count)
    assert info.value.call == "info"
    assert "256" in str(info.value)


async def test_set_time_is_simulated(vm: ProcessVm) -> None:
    assert vm.agent is not None
    host_before = time.time()
    mono_before = time.monotonic()
    try:
        reply = await vm.agent.set_time(time.time_ns() + HOUR_NS)
        assert abs(reply.skew_ns) < 10**9
        info = await vm.agent.info()
        ahead = info.time_unix_ns - time.time_ns()
        assert abs(ahead - HOUR_NS) < 5 * 10**9, f"guest is {ahead / 1e9:.1f} s ahead"
        # The host clock must not have moved (the stand-in only keeps an offset).
        elapsed = time.monotonic() - mono_before
        assert abs((time.time() - host_before) - elapsed) < 5.0
    finally:
        await vm.agent.set_time()  # back to the host's clock
    assert abs((await vm.agent.info()).time_unix_ns - time.time_ns()) < 5 * 10**9


async def test_set_time_rejects_negative(vm: ProcessVm) -> None:
    assert vm.agent is not None
    with pytest.raises(AgentError, match="INVALID_ARGUMENT"):
        await vm.agent.set_time(-5)


async def test_reseed_on_stand_in(vm: ProcessVm) -> None:
    assert vm.agent is not None
    reply = await vm.agent.reseed()
    assert reply.added is True
    assert reply.reseeded is False
    for size in (16, 512):
        assert (await vm.agent.reseed(os.urandom(size))).added


@pytest.mark.parametrize("size", [0, 4, 15, 513])
async def test_reseed_rejects_bad_sizes(vm: ProcessVm, size: int) -> None:
    assert vm.agent is not None
    with pytest.raises(AgentError, match="INVALID_ARGUMENT") as info:
        await vm.agent.reseed(b"\1" * size)
    assert info.value.call == "reseed"
    assert f"got {size}" in str(info.value)


async def test_raw_requests_the_client_never_sends(vm: ProcessVm) -> None:
    # Over-credited entropy and a zero time are validated by the agent itself.
    service = "vmfactory.agent.v1.Agent"
    async with await ttrpc.Client.connect_unix(str(vm.agent_socket)) as client:
        with pytest.raises(RpcError) as info:
            await client.call(service, "Reseed", pb.ReseedRequest(
                entropy=b"\1" * 16, credit_bits=129).SerializeToString(), timeout=5)
        assert info.value.code == f.INVALID_ARGUMENT
        with pytest.raises(RpcError) as info:
            await client.call(service, "SetTime",
                              pb.SetTimeRequest(time_unix_ns=0).SerializeToString(), timeout=5)
        assert info.value.code == f.INVALID_ARGUMENT
        with pytest.raises(RpcError) as info:
            await client.call(service, "GetInfo", b"\xff\xff\xff", timeout=5)
        assert info.value.code == f.INVALID_ARGUMENT
        ok = pb.ReseedReply.FromString(await client.call(service, "Reseed", pb.ReseedRequest(
            entropy=b"\1" * 16, credit_bits=128).SerializeToString(), timeout=5))
        assert ok.added


async def ping_soon(client: AgentClient, within: float) -> pb.PingReply:
    """Ping until it answers (a channel may sit in reconnect backoff for a moment)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await client.ping()
        except AgentError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_pause_blocks_calls_until_resume(vm: ProcessVm) -> None:
    assert vm.agent is not None
    short = AgentClient(address(vm), call_timeout=0.5)
    try:
        await short.ping()
        await vm.pause()
        try:
            assert vm.state is VmState.PAUSED
            with pytest.raises(VmStateError):
                await vm.pause()
            t0 = time.monotonic()
            with pytest.raises(AgentError, match="DEADLINE_EXCEEDED"):
                await short.ping()
            assert time.monotonic() - t0 < 3
            assert psutil.Process(vm.pid).status() == psutil.STATUS_STOPPED
        finally:
            await vm.resume()
        assert vm.state is VmState.RUNNING
        with pytest.raises(VmStateError):
            await vm.resume()
        await ping_soon(short, within=5)
        await vm.agent.ping()
    finally:
        await short.close()


async def test_new_client_after_close_reconnects(vm: ProcessVm) -> None:
    first = AgentClient(address(vm), call_timeout=5)
    await first.ping()
    await first.close()
    second = AgentClient(address(vm), call_timeout=5)
    try:
        assert (await second.ping()).agent_version == __version__
        assert (await second.info(8)).platform == "host-standin"
    finally:
        await second.close()
    assert vm.agent is not None
    await vm.agent.ping()  # the VM's own client is unaffected


async def test_concurrent_calls(vm: ProcessVm) -> None:
    assert vm.agent is not None
    infos = await asyncio.gather(*(vm.agent.info(32) for _ in range(20)))
    assert len({i.random for i in infos}) == 20


# --- lifecycle (own VMs) ---------------------------------------------------------------

async def test_full_lifecycle_and_idempotent_stop(hypervisor: ProcessHypervisor) -> None:
    machine = hypervisor.create_vm(SPEC, vm_id="life0001")
    assert machine.id == "life0001"
    assert machine.state is VmState.CREATED and machine.pid is None
    assert not machine.run_dir.exists()
    with pytest.raises(VmStateError):
        await machine.pause()
    await machine.start()
    pid = machine.pid
    assert pid is not None and machine.run_dir.is_dir()
    with pytest.raises(VmStateError):
        await machine.start()
    await machine.stop()
    assert machine.state is VmState.STOPPED
    await machine.stop()
    assert machine.state is VmState.STOPPED
    assert machine.pid is None and machine.agent is None
    assert not machine.run_dir.exists()
    gone = not psutil.pid_exists(pid)
    if not gone:  # the pid may have been reused; then it is not our agent
        gone = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE or \
            str(machine.run_dir) not in " ".join(psutil.Process(pid).cmdline())
    assert gone
    with pytest.raises(VmStateError):
        machine.memory()
    with pytest.raises(VmStateError):
        await machine.resume()
    with pytest.raises(AgentError):
        await AgentClient(f"unix:{machine.agent_socket}", call_timeout=0.3).ping()


async def test_stop_while_paused(hypervisor: ProcessHypervisor) -> None:
    machine = hypervisor.create_vm(SPEC)
    await machine.start()
    pid = machine.pid
    await machine.pause()
    await machine.stop()
    assert machine.state is VmState.STOPPED
    assert not machine.run_dir.exists()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_stop_before_start(hypervisor: ProcessHypervisor) -> None:
    machine = hypervisor.create_vm(SPEC)
    await machine.stop()
    assert machine.state is VmState.STOPPED
    with pytest.raises(VmStateError):
        await machine.start()


async def test_failed_start_cleans_up(run_root: Path) -> None:
    hv = ProcessHypervisor(run_root, TimeoutsConfig(agent_ready=0.01, agent_call=1.0))
    machine = hv.create_vm(SPEC)
    with pytest.raises(HypervisorError) as info:
        await machine.start()
    assert info.value.step == "agent-ready"
    assert machine.state is VmState.FAILED
    assert machine.pid is None and machine.agent is None
    assert not machine.run_dir.exists()
    assert processes_under(machine.run_dir) == []
    await machine.stop()  # still fine, nothing left to undo
    assert not machine.run_dir.exists()


async def test_call_on_closed_client_is_an_agent_error(vm: ProcessVm) -> None:
    client = AgentClient(address(vm), call_timeout=1)
    await client.ping()
    await client.close()
    with pytest.raises(AgentError):
        await client.ping()
