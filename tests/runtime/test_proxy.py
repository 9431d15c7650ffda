"""The agent proxy (runtime_client.proxies), against the host-process stand-in of the
agent and against a small raw-bytes upstream for the call kinds the agent lacks."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import psutil
import pytest
import pytest_asyncio

from runtime_client.errors import ClientError
from runtime_client.errors import ProxyError
from runtime_client.proxies.forwarder import AgentProxy
from runtime_client.proxies.process import spawn_proxy, stop_proxy
from vmfactory import __version__
from vmfactory.hypervisor.process import ProcessHypervisor, ProcessVm
from vmfactory.proto import agent_pb2 as pb
from vmfactory.proto import agent_pb2_grpc as pb_grpc

from tests import standin
from tests.standin import SPEC, processes_under

pytestmark = pytest.mark.timeout(60)

# The stand-in VM's fixtures, used here by name.
run_root, hypervisor, vm = standin.run_root, standin.hypervisor, standin.vm

PROXY_MODULE = "runtime_client.proxies"


def proxy_processes(listen: Path) -> list[psutil.Process]:
    return [p for p in processes_under(listen.parent) if PROXY_MODULE in p.cmdline()
            and str(listen) in p.cmdline()]


def agent_address(machine: ProcessVm) -> str:
    return f"unix:{machine.agent_socket}"


_counter = iter(range(10**6))


def socket_path(root: Path) -> Path:
    return root / f"p{next(_counter)}.sock"


@pytest_asyncio.fixture(loop_scope="session")
async def proxy(vm: ProcessVm, run_root: Path) -> AsyncIterator[AgentProxy]:
    """A started in-process proxy to the shared stand-in agent."""
    forwarder = AgentProxy(agent_address(vm), socket_path(run_root))
    await forwarder.start()
    yield forwarder
    await forwarder.stop()


# --- a raw-bytes upstream with every call kind ------------------------------------------

class Upstream(grpc.GenericRpcHandler):
    """Echo methods of each call kind, plus ones that fail or never answer."""

    def __init__(self) -> None:
        self.deadlines: list[float | None] = []
        self.metadata: list[dict[str, str | bytes]] = []
        self.hang_started = asyncio.Event()
        self.hang_cancelled = asyncio.Event()

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        name = details.method.rsplit("/", 1)[-1]
        return {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Hang": grpc.unary_unary_rpc_method_handler(self.hang),
            "Repeat": grpc.unary_stream_rpc_method_handler(self.repeat),
            "Count": grpc.stream_unary_rpc_method_handler(self.count),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
        }.get(name)

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.deadlines.append(context.time_remaining())
        self.metadata.append(dict(context.invocation_metadata()))
        await context.send_initial_metadata((("x-initial", "hello"),))
        context.set_trailing_metadata((("x-trailer", "bye"), ("x-blob-bin", b"\0\1")))
        return b"echo:" + request

    async def fail(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "upstream says no: " +
                            request.decode(), (("x-why", "because"),))
        raise AssertionError("abort returned")

    async def hang(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.hang_started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.hang_cancelled.set()
            raise
        return b""

    async def repeat(self, request: bytes,
                     context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()

    async def count(self, requests: AsyncIterator[bytes],
                    context: grpc.aio.ServicerContext) -> bytes:
        return str(sum([1 async for _ in requests])).encode()

    async def chat(self, requests: AsyncIterator[bytes],
                   context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message.upper()


@pytest_asyncio.fixture(loop_scope="session")
async def upstream(run_root: Path) -> AsyncIterator[tuple[Upstream, AgentProxy]]:
    """A raw upstream server and a started proxy in front of it."""
    handler = Upstream()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    up_path = socket_path(run_root)
    server.add_insecure_port(f"unix:{up_path}")
    await server.start()
    forwarder = AgentProxy(f"unix:{up_path}", socket_path(run_root))
    await forwarder.start()
    yield handler, forwarder
    await forwarder.stop()
    await server.stop(None)


# --- the agent through the in-process proxy ---------------------------------------------

async def test_agent_answers_through_proxy(proxy: AgentProxy) -> None:
    assert proxy.address == f"unix:{proxy.listen}"
    assert stat.S_IMODE(proxy.listen.stat().st_mode) == 0o600
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        stub = pb_grpc.AgentStub(channel)
        reply = await stub.Ping(pb.PingRequest(token=0xDEADBEEF12345), timeout=5)
        assert reply.token == 0xDEADBEEF12345
        assert reply.agent_version == __version__
        info = await stub.GetInfo(pb.GetInfoRequest(random_bytes=32), timeout=5)
        assert info.platform == "host-standin"
        assert len(info.random) == 32
        assert info.agent_version == __version__
    assert proxy.calls == 2


def agent_connections(machine: ProcessVm) -> int:
    """Unix sockets the agent holds on its socket path: the listener and accepted ones."""
    assert machine.pid is not None
    return sum(1 for conn in psutil.Process(machine.pid).net_connections(kind="unix")
               if conn.laddr == str(machine.agent_socket))


async def wait_connections(machine: ProcessVm, count: int, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while agent_connections(machine) != count:
        assert time.monotonic() < deadline, f"agent holds {agent_connections(machine)} sockets"
        await asyncio.sleep(0.05)


async def test_many_clients_share_one_upstream_connection(
        hypervisor: ProcessHypervisor, run_root: Path) -> None:
    machine = hypervisor.create_vm(SPEC)
    await machine.start()
    forwarder = AgentProxy(agent_address(machine), socket_path(run_root))
    try:
        await machine.disconnect_agent()
        await wait_connections(machine, 1)  # only the listening socket is left
        await forwarder.start()
        channels = [grpc.aio.insecure_channel(forwarder.address) for _ in range(3)]
        try:
            stubs = [pb_grpc.AgentStub(channel) for channel in channels]
            replies = await asyncio.gather(*(
                stub.Ping(pb.PingRequest(token=1000 * c + i), timeout=10)
                for c, stub in enumerate(stubs) for i in range(20)))
        finally:
            for channel in channels:
                await channel.close()
        assert [r.token for r in replies] == [1000 * c + i for c in range(3) for i in range(20)]
        assert forwarder.calls == 60
        assert agent_connections(machine) == 2  # the listener and the proxy's one
        assert isinstance(forwarder._channel, grpc.aio.Channel)
    finally:
        await forwarder.stop()
        await machine.stop()


async def test_agent_error_status_arrives_unchanged(vm: ProcessVm, proxy: AgentProxy) -> None:
    async def details_via(address: str) -> tuple[grpc.StatusCode, str]:
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.AgentStub(channel).GetInfo(
                    pb.GetInfoRequest(random_bytes=1000), timeout=5)
        return info.value.code(), info.value.details()

    direct = await details_via(agent_address(vm))
    proxied = await details_via(proxy.address)
    assert proxied == direct == (grpc.StatusCode.INVALID_ARGUMENT,
                                 "random_bytes must be at most 256")


async def ping_soon(stub: pb_grpc.AgentStub, within: float) -> pb.PingReply:
    """Ping until it answers (the upstream channel may sit in reconnect backoff)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await stub.Ping(pb.PingRequest(token=7), timeout=1)
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_short_deadline_on_a_paused_agent(vm: ProcessVm, proxy: AgentProxy) -> None:
    async with grpc.aio.insecure_channel(proxy.address) as channel:
        stub = pb_grpc.AgentStub(channel)
        await stub.Ping(pb.PingRequest(token=1), timeout=5)
        await vm.pause()  # SIGSTOP: the agent never answers
        try:
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Ping(pb.PingRequest(token=2), timeout=0.5)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - t0 < 3
        finally:
            await vm.resume()
        assert (await ping_soon(stub, within=5)).token == 7


# --- every call kind, metadata, deadlines, cancellation ---------------------------------

async def test_unary_metadata_and_deadline(upstream: tuple[Upstream, AgentProxy]) -> None:
    handler, forwarder = upstream
    async with grpc.aio.insecure_channel(forwarder.address) as channel:
        call = channel.unary_unary("/test.Echo/Unary")(
            b"hi", timeout=4, metadata=(("x-client", "c1"), ("x-data-bin", b"\xff\0")))
        assert await call == b"echo:hi"
        assert ("x-initial", "hello") in tuple(await call.initial_metadata())
        trailing = tuple(await call.trailing_metadata())
        assert ("x-trailer", "bye") in trailing and ("x-blob-bin", b"\0\1") in trailing
        assert await channel.unary_unary("/test.Echo/Unary")(b"no deadline") == b"echo:no deadline"
    seen = handler.metadata[0]
    assert seen["x-client"] == "c1" and seen["x-data-bin"] == b"\xff\0"
    deadline, none = handler.deadlines
    # grpc rounds the timeout header up a little
    assert deadline is not None and 2 < deadline < 4.5
    assert none is None


async def test_streaming_call_kinds(upstream: tuple[Upstream, AgentProxy]) -> None:
    _, forwarder = upstream
    async with grpc.aio.insecure_channel(forwarder.address) as channel:
        repeat = channel.unary_stream("/test.Echo/Repeat")(b"50", timeout=5)
        assert [m async for m in repeat] == [str(i).encode() for i in range(50)]
        count = channel.stream_unary("/test.Echo/Count")(timeout=5)
        for _ in range(30):
            await count.write(b"x")
        await count.done_writing()
        assert await count == b"30"
        # Lock-step: each answer comes before the next request is sent, which only
        # works if the proxy relays both directions at once.
        chat = channel.stream_stream("/test.Echo/Chat")(timeout=5)
        for word in (b"one", b"two", b"three"):
            await chat.write(word)
            assert await chat.read() == word.upper()
        await chat.done_writing()
        assert await chat.read() == grpc.aio.EOF
        assert await chat.code() == grpc.StatusCode.OK
    assert forwarder.calls == 3


async def test_upstream_error_with_trailers(upstream: tuple[Upstream, AgentProxy]) -> None:
    _, forwarder = upstream
    async with grpc.aio.insecure_channel(forwarder.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/test.Echo/Fail")(b"nope", timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await channel.unary_unary("/test.Nothing/Here")(b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == "upstream says no: nope"
    assert ("x-why", "because") in tuple(info.value.trailing_metadata())
    assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_caller_cancel_and_deadline_reach_upstream(
        upstream: tuple[Upstream, AgentProxy]) -> None:
    handler, forwarder = upstream
    async with grpc.aio.insecure_channel(forwarder.address) as channel:
        call = channel.unary_unary("/test.Echo/Hang")(b"", timeout=30)
        await asyncio.wait_for(handler.hang_started.wait(), 5)
        call.cancel()
        await asyncio.wait_for(handler.hang_cancelled.wait(), 5)
        assert await call.code() == grpc.StatusCode.CANCELLED

        handler.hang_started.clear()
        handler.hang_cancelled.clear()
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/test.Echo/Hang")(b"", timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 3
        await asyncio.wait_for(handler.hang_cancelled.wait(), 5)


# --- upstream down, lifecycle -------------------------------------------------------------

async def test_upstream_down_fails_within_the_deadline(run_root: Path) -> None:
    nobody = f"unix:{run_root / 'nobody.sock'}"
    forwarder = AgentProxy(nobody, socket_path(run_root), connect_timeout=0.5)
    await forwarder.start()
    try:
        async with grpc.aio.insecure_channel(forwarder.address) as channel:
            stub = pb_grpc.AgentStub(channel)
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Ping(pb.PingRequest(token=1), timeout=1)
            assert info.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                         grpc.StatusCode.DEADLINE_EXCEEDED)
            assert time.monotonic() - t0 < 2
            # Without a deadline of its own, a call waits at most connect_timeout.
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Ping(pb.PingRequest(token=1))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "not reachable" in (info.value.details() or "")
            assert time.monotonic() - t0 < 2
    finally:
        await forwarder.stop()


async def test_stop_is_idempotent_and_removes_the_socket(vm: ProcessVm, run_root: Path) -> None:
    forwarder = AgentProxy(agent_address(vm), socket_path(run_root))
    await forwarder.stop()  # never started: nothing to do
    forwarder = AgentProxy(agent_address(vm), socket_path(run_root))
    await forwarder.start()
    assert forwarder.listen.is_socket()
    with pytest.raises(ProxyError):
        await forwarder.start()
    await forwarder.stop()
    assert not forwarder.listen.exists()
    await forwarder.stop()
    async with grpc.aio.insecure_channel(forwarder.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.AgentStub(channel).Ping(pb.PingRequest(), timeout=1)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_start_replaces_stale_socket_but_not_a_live_one(
        vm: ProcessVm, proxy: AgentProxy, run_root: Path) -> None:
    stale = socket_path(run_root)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(stale))  # closed without unlinking: a crashed proxy's leftover
    forwarder = AgentProxy(agent_address(vm), stale)
    await forwarder.start()
    try:
        async with grpc.aio.insecure_channel(forwarder.address) as channel:
            assert (await pb_grpc.AgentStub(channel).Ping(pb.PingRequest(token=3),
                                                          timeout=5)).token == 3
    finally:
        await forwarder.stop()
    with pytest.raises(ProxyError, match="already served"):
        await AgentProxy(agent_address(vm), proxy.listen).start()
    assert proxy.listen.is_socket()
    regular = run_root / "regular.file"
    regular.write_text("x")
    with pytest.raises(ProxyError, match="not a socket"):
        await AgentProxy(agent_address(vm), regular).start()
    assert regular.read_text() == "x"
    with pytest.raises(ProxyError) as info:
        await AgentProxy(agent_address(vm), run_root / "missing" / "p.sock").start()
    assert isinstance(info.value, ClientError)


# --- the standalone process ---------------------------------------------------------------

async def test_spawned_proxy_serves_and_stops(vm: ProcessVm, run_root: Path) -> None:
    listen = socket_path(run_root)
    log = run_root / "proxy.log"
    pid = await spawn_proxy(agent_address(vm), listen, timeout=20, log=log)
    try:
        assert os.getsid(pid) == pid  # its own session: it may outlive us
        assert listen.is_socket()
        assert stat.S_IMODE(listen.stat().st_mode) == 0o600
        async with grpc.aio.insecure_channel(f"unix:{listen}") as channel:
            stub = pb_grpc.AgentStub(channel)
            assert (await stub.Ping(pb.PingRequest(token=99), timeout=5)).token == 99
            info = await stub.GetInfo(pb.GetInfoRequest(random_bytes=8), timeout=5)
            assert info.platform == "host-standin"
    finally:
        stop_proxy(pid, listen)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert proxy_processes(listen) == []
    assert not listen.exists()
    stop_proxy(pid, listen)  # idempotent
    assert "serving" in log.read_text()


async def test_spawn_with_unbindable_listen_fails_fast(vm: ProcessVm, run_root: Path) -> None:
    listen = run_root / "no-such-dir" / "p.sock"
    t0 = time.monotonic()
    with pytest.raises(ProxyError) as info:
        await spawn_proxy(agent_address(vm), listen, timeout=20)
    assert time.monotonic() - t0 < 10
    assert "cannot start" in str(info.value)
    assert str(listen) in str(info.value)
    assert proxy_processes(listen) == []


async def test_spawn_times_out_and_kills(vm: ProcessVm, run_root: Path) -> None:
    listen = socket_path(run_root)
    with pytest.raises(ProxyError, match="not ready within"):
        await spawn_proxy(agent_address(vm), listen, timeout=0.01)
    assert proxy_processes(listen) == []


async def test_stop_proxy_never_signals_another_process(run_root: Path) -> None:
    listen = socket_path(run_root)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        stop_proxy(sleeper.pid, listen, timeout=0.5)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
    stop_proxy(sleeper.pid, listen)  # a pid that is gone: nothing to do


@pytest.mark.parametrize("args", [
    ["--listen", "/tmp/x.sock"],
    ["--upstream", "unix:/tmp/a.sock", "--listen", "/tmp/x.sock", "--ready-fd", "987"],
    ["--upstream", "", "--listen", "/tmp/x.sock"],
])
def test_bad_arguments_exit_2_with_one_line(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", PROXY_MODULE, *args],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "error" in done.stderr


def test_start_failure_exits_1_with_one_line(run_root: Path) -> None:
    listen = run_root / "no-such-dir" / "p.sock"
    done = subprocess.run([sys.executable, "-m", PROXY_MODULE, "--upstream", "unix:/x.sock",
                           "--listen", str(listen)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "cannot start" in done.stderr and str(listen) in done.stderr


async def test_process_stops_cleanly_on_sigint(vm: ProcessVm, run_root: Path) -> None:
    listen = socket_path(run_root)
    child = subprocess.Popen([sys.executable, "-m", PROXY_MODULE, "--upstream",
                              agent_address(vm), "--listen", str(listen)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not listen.is_socket():
            assert child.poll() is None and time.monotonic() < deadline
            await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(f"unix:{listen}") as channel:
            assert (await pb_grpc.AgentStub(channel).Ping(pb.PingRequest(token=4),
                                                          timeout=5)).token == 4
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=10) == 0
        assert not listen.exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
