"""The agent proxy (runtime_client.proxies, a ttrpc multiplexer), against the
host-process stand-in of the agent and against a small raw-bytes ttrpc upstream
for the call kinds the agent lacks."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio

from runtime_client.errors import ClientError
from runtime_client.errors import ProxyError
from runtime_client.proxies.forwarder import AgentProxy
from runtime_client.proxies.process import spawn_proxy, stop_proxy
from vmfactory import __version__
from vmfactory.agent import AgentClient
from vmfactory.errors import AgentError
from vmfactory.hypervisor.process import ProcessHypervisor, ProcessVm
from vmfactory.proto import agent_pb2 as pb
from vmfactory.ttrpc import aio as ttrpc
from vmfactory.ttrpc import frames as f
from vmfactory.ttrpc.frames import RpcError

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

AGENT = "vmfactory.agent.v1.Agent"


class Upstream:
    """Echo methods of each call kind, plus ones that fail or never answer, and the
    agent's Ping (the proxy checks a new upstream connection with it)."""

    def __init__(self) -> None:
        self.deadlines: list[float | None] = []
        self.metadata: list[dict[str, list[str]]] = []
        self.hang_started = asyncio.Event()
        self.hang_cancelled = asyncio.Event()
        self.server = ttrpc.Server()
        for name, handler in (("Unary", self.unary), ("Fail", self.fail), ("Hang", self.hang)):
            self.server.register("test.Echo", name, handler)
        for name, handler in (("Repeat", self.repeat), ("Count", self.count),
                              ("Chat", self.chat)):
            self.server.register("test.Echo", name, handler, streaming=True)
        self.server.register(AGENT, "Ping", self.ping)

    async def ping(self, request: bytes, ctx: ttrpc.CallContext) -> bytes:
        return request  # a PingReply has the PingRequest's token field

    async def unary(self, request: bytes, ctx: ttrpc.CallContext) -> bytes:
        self.deadlines.append(ctx.timeout)
        self.metadata.append(ctx.metadata)
        return b"echo:" + request

    async def fail(self, request: bytes, ctx: ttrpc.CallContext) -> bytes:
        raise RpcError(f.FAILED_PRECONDITION, "upstream says no: " + request.decode(),
                       {"why": "because"})

    async def hang(self, request: bytes, ctx: ttrpc.CallContext) -> bytes:
        self.hang_started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.hang_cancelled.set()
            raise
        return b""

    async def repeat(self, stream: ttrpc.ServerStream, ctx: ttrpc.CallContext) -> None:
        count = int(await stream.recv() or b"0")
        for i in range(count):
            await stream.send(str(i).encode())

    async def count(self, stream: ttrpc.ServerStream, ctx: ttrpc.CallContext) -> bytes:
        n = 0
        while await stream.recv() is not None:
            n += 1
        return str(n).encode()

    async def chat(self, stream: ttrpc.ServerStream, ctx: ttrpc.CallContext) -> None:
        while (message := await stream.recv()) is not None:
            await stream.send(message.upper())


@pytest_asyncio.fixture(loop_scope="session")
async def upstream(run_root: Path) -> AsyncIterator[tuple[Upstream, AgentProxy]]:
    """A raw upstream server and a started proxy in front of it."""
    handler = Upstream()
    up_path = socket_path(run_root)
    listener = await handler.server.start_unix_server(str(up_path))
    forwarder = AgentProxy(f"unix:{up_path}", socket_path(run_root))
    await forwarder.start()
    yield handler, forwarder
    await forwarder.stop()
    listener.close()
    await handler.server.close()


async def connect(address: str) -> ttrpc.Client:
    return await ttrpc.Client.connect_unix(address.removeprefix("unix:"),
                                           first_stream_id=secrets.randbits(31) | 1)


async def ping(client: ttrpc.Client, token: int, timeout: float | None = 5) -> pb.PingReply:
    data = await client.call(AGENT, "Ping", pb.PingRequest(token=token).SerializeToString(),
                             timeout=timeout)
    return pb.PingReply.FromString(data)


# --- the agent through the in-process proxy ---------------------------------------------

async def test_agent_answers_through_proxy(proxy: AgentProxy) -> None:
    assert proxy.address == f"unix:{proxy.listen}"
    assert stat.S_IMODE(proxy.listen.stat().st_mode) == 0o600
    before = proxy.calls
    async with await connect(proxy.address) as client:
        reply = await ping(client, 0xDEADBEEF12345)
        assert reply.token == 0xDEADBEEF12345
        assert reply.agent_version == __version__
        info = pb.GuestInfo.FromString(await client.call(
            AGENT, "GetInfo", pb.GetInfoRequest(random_bytes=32).SerializeToString(),
            timeout=5))
        assert info.platform == "host-standin"
        assert len(info.random) == 32
        assert info.agent_version == __version__
    assert proxy.calls - before == 2


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
        clients = [await connect(forwarder.address) for _ in range(3)]
        try:
            replies = await asyncio.gather(*(
                ping(client, 1000 * c + i, timeout=10)
                for c, client in enumerate(clients) for i in range(20)))
        finally:
            for client in clients:
                await client.close()
        assert [r.token for r in replies] == [1000 * c + i for c in range(3) for i in range(20)]
        assert forwarder.calls == 60
        assert agent_connections(machine) == 2  # the listener and the proxy's one
    finally:
        await forwarder.stop()
        await machine.stop()


async def test_agent_error_status_arrives_unchanged(vm: ProcessVm, proxy: AgentProxy) -> None:
    async def details_via(address: str) -> tuple[int, str]:
        async with await connect(address) as client:
            with pytest.raises(RpcError) as info:
                await client.call(AGENT, "GetInfo", pb.GetInfoRequest(
                    random_bytes=1000).SerializeToString(), timeout=5)
        return info.value.code, info.value.message

    proxied = await details_via(proxy.address)
    assert proxied == (f.INVALID_ARGUMENT, "random_bytes must be at most 256")


async def test_agent_errors_keep_their_class_through_the_proxy(proxy: AgentProxy) -> None:
    client = AgentClient(proxy.address, call_timeout=5)
    try:
        await client.wait_ready(5)
        with pytest.raises(AgentError, match="INVALID_ARGUMENT"):
            await client.info(random_bytes=1000)
    finally:
        await client.close()


async def test_short_deadline_on_a_paused_agent(vm: ProcessVm, proxy: AgentProxy) -> None:
    async with await connect(proxy.address) as client:
        await ping(client, 1)
        await vm.pause()  # SIGSTOP: the agent never answers
        try:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await ping(client, 2, timeout=0.5)
            assert time.monotonic() - t0 < 3
        finally:
            await vm.resume()
        assert (await ping(client, 7)).token == 7


# --- every call kind, metadata, deadlines, cancellation ---------------------------------

async def test_unary_metadata_and_deadline(upstream: tuple[Upstream, AgentProxy]) -> None:
    handler, forwarder = upstream
    async with await connect(forwarder.address) as client:
        assert await client.call("test.Echo", "Unary", b"hi", timeout=4,
                                 metadata={"x-client": "c1"}) == b"echo:hi"
        assert await client.call("test.Echo", "Unary", b"no deadline") == b"echo:no deadline"
    assert handler.metadata[0]["x-client"] == ["c1"]
    deadline, none = handler.deadlines
    assert deadline == 4.0
    assert none is None


async def test_streaming_call_kinds(upstream: tuple[Upstream, AgentProxy]) -> None:
    _, forwarder = upstream
    async with await connect(forwarder.address) as client:
        repeat = await client.stream("test.Echo", "Repeat", b"50", timeout=5)
        got = []
        while (message := await repeat.recv()) is not None:
            got.append(message)
        assert got == [str(i).encode() for i in range(50)]
        count = await client.stream("test.Echo", "Count", timeout=5)
        for _ in range(30):
            await count.send(b"x")
        await count.close_send()
        assert await count.recv() is None  # the count is the response's payload
        # Lock-step: each answer comes before the next request is sent, which only
        # works if the proxy relays both directions at once.
        chat = await client.stream("test.Echo", "Chat", timeout=5)
        for word in (b"one", b"two", b"three"):
            await chat.send(word)
            assert await chat.recv() == word.upper()
        await chat.close_send()
        assert await chat.recv() is None
    assert forwarder.calls == 3


async def test_upstream_error_with_details(upstream: tuple[Upstream, AgentProxy]) -> None:
    _, forwarder = upstream
    async with await connect(forwarder.address) as client:
        with pytest.raises(RpcError) as info:
            await client.call("test.Echo", "Fail", b"nope", timeout=5)
        with pytest.raises(RpcError) as missing:
            await client.call("test.Nothing", "Here", b"", timeout=5)
    assert info.value.code == f.FAILED_PRECONDITION
    assert info.value.message == "upstream says no: nope"
    assert info.value.details == {"why": "because"}
    assert missing.value.code == f.UNIMPLEMENTED


async def test_caller_cancel_deadline_and_departure_reach_upstream(
        upstream: tuple[Upstream, AgentProxy]) -> None:
    handler, forwarder = upstream
    async with await connect(forwarder.address) as client:
        call = asyncio.ensure_future(client.call("test.Echo", "Hang", b"", timeout=30))
        await asyncio.wait_for(handler.hang_started.wait(), 5)
        call.cancel()
        await asyncio.wait_for(handler.hang_cancelled.wait(), 5)

        handler.hang_started.clear()
        handler.hang_cancelled.clear()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await client.call("test.Echo", "Hang", b"", timeout=0.5)
        assert time.monotonic() - t0 < 3
        await asyncio.wait_for(handler.hang_cancelled.wait(), 5)

        handler.hang_started.clear()
        handler.hang_cancelled.clear()
        other = await connect(forwarder.address)
        left = asyncio.ensure_future(other.call("test.Echo", "Hang", b""))
        await asyncio.wait_for(handler.hang_started.wait(), 5)
        other._writer.transport.abort()  # the client dies: its call must not linger
        await asyncio.wait_for(handler.hang_cancelled.wait(), 5)
        with pytest.raises(f.ConnectionLost):
            await left
        await other.close()
        assert await client.call("test.Echo", "Unary", b"still", timeout=5) == b"echo:still"


# --- upstream down, lifecycle -------------------------------------------------------------

async def test_upstream_down_fails_within_the_deadline(run_root: Path) -> None:
    nobody = f"unix:{run_root / 'nobody.sock'}"
    forwarder = AgentProxy(nobody, socket_path(run_root), connect_timeout=0.5)
    await forwarder.start()
    try:
        async with await connect(forwarder.address) as client:
            t0 = time.monotonic()
            with pytest.raises((RpcError, TimeoutError)) as info:
                await ping(client, 1, timeout=1)
            if isinstance(info.value, RpcError):
                assert info.value.code in (f.UNAVAILABLE, f.DEADLINE_EXCEEDED)
            assert time.monotonic() - t0 < 2
            # Without a deadline of its own, a call waits at most connect_timeout.
            t0 = time.monotonic()
            with pytest.raises(RpcError) as err:
                await ping(client, 1, timeout=None)
            assert err.value.code == f.UNAVAILABLE
            assert "not reachable" in err.value.message
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
    with pytest.raises(FileNotFoundError):
        await connect(forwarder.address)


async def test_start_replaces_stale_socket_but_not_a_live_one(
        vm: ProcessVm, proxy: AgentProxy, run_root: Path) -> None:
    stale = socket_path(run_root)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(stale))  # closed without unlinking: a crashed proxy's leftover
    forwarder = AgentProxy(agent_address(vm), stale)
    await forwarder.start()
    try:
        async with await connect(forwarder.address) as client:
            assert (await ping(client, 3)).token == 3
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
        async with await connect(f"unix:{listen}") as client:
            assert (await ping(client, 99)).token == 99
            info = pb.GuestInfo.FromString(await client.call(
                AGENT, "GetInfo", pb.GetInfoRequest(random_bytes=8).SerializeToString(),
                timeout=5))
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
        async with await connect(f"unix:{listen}") as client:
            assert (await ping(client, 4)).token == 4
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=10) == 0
        assert not listen.exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
