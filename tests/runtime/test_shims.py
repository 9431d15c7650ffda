"""Shim modes (runtime_client.shims: builtin, standalone, iorelay, process) against a test double of the
agent's Containers service that runs processes on the host: no QEMU."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import pytest_asyncio

from runtime_client.errors import ClientError
from vmfactory.agent.client import AgentClient
from runtime_client.shims import (BuiltinShim, NoopShim, Shim, StandaloneShim, canonical_shim,
                                  make_shim)
from tests.runtime.fake_containers import FakeAgentServer

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
ONE_MIB = 1024 * 1024
CID = "c1"


@pytest_asyncio.fixture
async def agent() -> AsyncIterator[FakeAgentServer]:
    server = FakeAgentServer()
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture
async def conn(agent: FakeAgentServer) -> AsyncIterator[AgentClient]:
    connection = AgentClient(agent.address, call_timeout=5.0, wait_for_ready=True)
    yield connection
    await connection.close()


class Drain:
    """A pipe whose read end a thread drains until EOF; the test hands out the
    write end."""

    def __init__(self) -> None:
        self.read_fd, self.fd = os.pipe()
        self.data = bytearray()
        self.got_data = threading.Event()
        self._writer_open = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while chunk := os.read(self.read_fd, 65536):
            self.data += chunk
            self.got_data.set()

    def close_writer(self) -> None:
        if self._writer_open:
            self._writer_open = False
            os.close(self.fd)

    def result(self) -> bytes:
        """Everything written, once the write end is closed here."""
        self.close_writer()
        self._thread.join(10)
        assert not self._thread.is_alive(), "pipe never reached EOF"
        os.close(self.read_fd)
        return bytes(self.data)


class Feed:
    """A pipe a thread fills with ``data`` and then closes; the test hands out the
    read end as a process's stdin."""

    def __init__(self, data: bytes) -> None:
        self.fd, self._write_fd = os.pipe()
        self._thread = threading.Thread(target=self._run, args=(data,), daemon=True)
        self._thread.start()

    def _run(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._write_fd, view):]
        except BrokenPipeError:
            pass  # the process exited without reading everything
        finally:
            os.close(self._write_fd)

    def close(self) -> None:
        join_stdin_reader(self.fd)
        os.close(self.fd)
        self._thread.join(10)
        assert not self._thread.is_alive()


def join_stdin_reader(fd: int) -> None:
    """Wait for the relay's thread reading ``fd`` (it stops within moments once the
    relay returned, or at EOF): closing ``fd`` under it could let it read from a
    reused descriptor number."""
    for thread in threading.enumerate():
        if thread.name == f"stdin-relay-{fd}":
            thread.join(5)
            assert not thread.is_alive(), f"stdin reader of fd {fd} still runs"


async def run_shim(shim: Shim, conn: AgentClient, agent: FakeAgentServer,
                   argv: Sequence[str], *, stdin_data: bytes | None = None,
                   exec_id: str = "", **kwargs: object) -> tuple[int, bytes, bytes]:
    """Register ``argv``, run ``shim`` on it with pipes; (exit code, stdout, stderr)."""
    await agent.containers.register(CID, exec_id, argv)
    out, err = Drain(), Drain()
    feed = Feed(stdin_data) if stdin_data is not None else None
    try:
        code = await asyncio.wait_for(shim.run(
            conn, CID, exec_id, terminal=False, stdin=feed.fd if feed else None,
            stdout=out.fd, stderr=err.fd, **kwargs), 30)  # type: ignore[arg-type]
    finally:
        if feed is not None:
            feed.close()
        out_data, err_data = out.result(), err.result()
    return code, out_data, err_data


def shim_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


# --- names -----------------------------------------------------------------


def test_ccshim_is_a_deprecated_alias(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="runtime_client.shims"):
        assert canonical_shim("ccshim") == "katashim"
    assert "deprecated" in caplog.text
    assert isinstance(make_shim("ccshim"), StandaloneShim)


def test_canonical_names_pass_through() -> None:
    for name, cls in [("noopshim", NoopShim), ("katashim", StandaloneShim),
                      ("katashimbuiltin", BuiltinShim)]:
        assert canonical_shim(name) == name
        shim = make_shim(name)
        assert type(shim) is cls and shim.name == name
    assert not NoopShim.relays_io and BuiltinShim.relays_io and StandaloneShim.relays_io
    assert StandaloneShim.needs_shared_agent and not BuiltinShim.needs_shared_agent
    assert not NoopShim.needs_shared_agent


def test_unknown_shim_lists_the_valid_names() -> None:
    with pytest.raises(ClientError) as info:
        canonical_shim("kata")
    for name in ("noopshim", "katashim", "katashimbuiltin", "ccshim"):
        assert name in str(info.value)
    with pytest.raises(ClientError):
        make_shim("")


# --- builtin -----------------------------------------------------------------


async def test_builtin_relays_stdout(conn: AgentClient, agent: FakeAgentServer) -> None:
    code, out, err = await run_shim(BuiltinShim(), conn, agent, ["echo", "hello"])
    assert (code, out, err) == (0, b"hello\n", b"")


async def test_builtin_keeps_stderr_separate(conn: AgentClient,
                                             agent: FakeAgentServer) -> None:
    code, out, err = await run_shim(BuiltinShim(), conn, agent,
                                    ["sh", "-c", "echo out; echo err >&2"])
    assert (code, out, err) == (0, b"out\n", b"err\n")


async def test_builtin_one_mib_round_trip_is_byte_exact(conn: AgentClient,
                                                        agent: FakeAgentServer) -> None:
    data = os.urandom(ONE_MIB)
    code, out, _ = await run_shim(BuiltinShim(), conn, agent, ["cat"], stdin_data=data)
    assert code == 0
    assert len(out) == ONE_MIB
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(data).hexdigest()
    host = agent.containers.processes[(CID, "")]
    assert host.stdin_bytes == ONE_MIB and host.stdin_closed


@pytest.mark.parametrize("stdin_data", [b"abc", b"", None], ids=["data", "empty", "none"])
async def test_builtin_stdin_eof_ends_cat(conn: AgentClient, agent: FakeAgentServer,
                                          stdin_data: bytes | None) -> None:
    code, out, _ = await run_shim(BuiltinShim(), conn, agent, ["cat"], stdin_data=stdin_data)
    assert code == 0
    assert out == (stdin_data or b"")


async def test_builtin_exit_code_propagates(conn: AgentClient,
                                            agent: FakeAgentServer) -> None:
    code, out, _ = await run_shim(BuiltinShim(), conn, agent,
                                  ["sh", "-c", "echo bye; exit 3"], exec_id="e1")
    assert (code, out) == (3, b"bye\n")


async def test_builtin_calls_on_first_output_once(conn: AgentClient,
                                                  agent: FakeAgentServer) -> None:
    calls: list[int] = []
    code, out, err = await run_shim(
        BuiltinShim(), conn, agent, ["sh", "-c", "echo a; echo b >&2; sleep 0.1; echo c"],
        on_first_output=lambda: calls.append(1))
    assert code == 0 and out == b"a\nc\n" and err == b"b\n"
    assert calls == [1]


async def test_builtin_survives_a_closed_host_stdout(conn: AgentClient,
                                                     agent: FakeAgentServer) -> None:
    """EPIPE on stdout: stop writing it, but keep relaying stderr to the end."""
    await agent.containers.register(CID, "", ["sh", "-c", "head -c 300000 /dev/zero; "
                                                          "echo err >&2; exit 5"])
    out_r, out_w = os.pipe()
    os.close(out_r)
    err = Drain()
    try:
        code = await asyncio.wait_for(BuiltinShim().run(
            conn, CID, "", terminal=False, stdin=None, stdout=out_w, stderr=err.fd), 30)
    finally:
        os.close(out_w)
    assert code == 5
    assert err.result() == b"err\n"


async def test_builtin_process_exiting_while_stdin_is_sent(conn: AgentClient,
                                                            agent: FakeAgentServer) -> None:
    """The agent ends the stream while stdin is still being written: grpc aio then
    reports INTERNAL for the write (grpc/grpc#36066), which is no failure."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        for i in range(30):
            await agent.containers.register(CID, f"q{i}", ["sh", "-c", "exit 3"])
            assert await BuiltinShim().run(conn, CID, f"q{i}", terminal=False,
                                           stdin=devnull, stdout=1, stderr=2) == 3
    finally:
        os.close(devnull)
    code, out, _ = await run_shim(BuiltinShim(), conn, agent, ["head", "-c", "10"],
                                  stdin_data=os.urandom(ONE_MIB))
    assert (code, len(out)) == (0, 10)


async def test_builtin_open_stdin_leaves_no_task_behind(conn: AgentClient,
                                                        agent: FakeAgentServer) -> None:
    """Host stdin never reaches EOF (like a terminal): once the process ended,
    nothing keeps consuming it."""
    await agent.containers.register(CID, "", ["echo", "done"])
    stdin_r, stdin_w = os.pipe()
    out = Drain()
    try:
        code = await asyncio.wait_for(BuiltinShim().run(
            conn, CID, "", terminal=False, stdin=stdin_r, stdout=out.fd, stderr=2), 10)
        for _ in range(5):
            await asyncio.sleep(0)
        lingering = [t for t in asyncio.all_tasks()
                     if "_consume_request_iterator" in repr(t.get_coro())]
    finally:
        os.close(stdin_w)  # EOF lets the daemon reader thread finish
        join_stdin_reader(stdin_r)
        os.close(stdin_r)
    assert code == 0 and out.result() == b"done\n"
    assert lingering == []


class _Recorder:
    """A Python-level signal handler standing in for whatever the client had."""

    def __init__(self) -> None:
        self.received: list[int] = []

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)


@pytest.mark.parametrize("shim_cls", [BuiltinShim, NoopShim])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
async def test_signals_to_the_client_are_forwarded(conn: AgentClient, agent: FakeAgentServer,
                                                   shim_cls: type[Shim],
                                                   signum: signal.Signals) -> None:
    host = await agent.containers.register(CID, "", ["sleep", "30"])
    recorder = _Recorder()
    original = signal.signal(signum, recorder)
    try:
        asyncio.get_running_loop().call_later(0.3, os.kill, os.getpid(), signum)
        code = await asyncio.wait_for(shim_cls().run(
            conn, CID, "", terminal=False, stdin=None, stdout=1, stderr=2), 10)
        restored = signal.getsignal(signum)
    finally:
        signal.signal(signum, original)
    assert recorder.received == [], "the signal reached the client's own handler"
    assert restored is recorder, "the previous handler was not restored"
    assert code == 128 + signum
    assert host.signals == [signum]


async def test_builtin_default_handler_is_restored(conn: AgentClient,
                                                   agent: FakeAgentServer) -> None:
    before = signal.getsignal(signal.SIGTERM)
    await agent.containers.register(CID, "", ["sleep", "30"])
    asyncio.get_running_loop().call_later(0.3, os.kill, os.getpid(), signal.SIGTERM)
    code = await asyncio.wait_for(BuiltinShim().run(
        conn, CID, "", terminal=False, stdin=None, stdout=1, stderr=2), 10)
    assert code == 143
    assert signal.getsignal(signal.SIGTERM) == before


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


async def test_builtin_terminal_raw_mode_and_resizes(conn: AgentClient,
                                                     agent: FakeAgentServer) -> None:
    """A tty on the host: raw while relaying and restored after; the initial size
    and a SIGWINCH resize reach the agent."""
    master, slave = pty.openpty()
    _set_winsize(slave, 40, 100)
    host = await agent.containers.register(CID, "", ["sh", "-c", "echo hi; sleep 0.6"])
    before = termios.tcgetattr(slave)
    during: list[list[Any]] = []
    loop = asyncio.get_running_loop()

    def first_output() -> None:
        during.append(termios.tcgetattr(slave))
        _set_winsize(slave, 50, 120)
        loop.call_later(0.1, os.kill, os.getpid(), signal.SIGWINCH)

    try:
        code = await asyncio.wait_for(BuiltinShim().run(
            conn, CID, "", terminal=True, stdin=slave, stdout=slave, stderr=slave,
            on_first_output=first_output), 10)
        after = termios.tcgetattr(slave)
        echoed = os.read(master, 1024)
    finally:
        os.close(master)  # wakes the stdin reader thread (EIO)
        join_stdin_reader(slave)
        os.close(slave)
    assert code == 0
    assert b"hi" in echoed
    assert during and not during[0][3] & termios.ECHO and not during[0][3] & termios.ICANON
    assert after == before
    assert host.sizes == [(40, 100), (50, 120)]


async def test_builtin_without_a_tty_sends_no_resize(conn: AgentClient,
                                                     agent: FakeAgentServer) -> None:
    await agent.containers.register(CID, "", ["true"])
    out, err = Drain(), Drain()
    code = await BuiltinShim().run(conn, CID, "", terminal=True, stdin=None, stdout=out.fd,
                                   stderr=err.fd)
    out.result(), err.result()
    assert code == 0
    assert agent.containers.processes[(CID, "")].sizes == []


# --- noop --------------------------------------------------------------------


async def test_noop_relays_nothing_but_returns_the_exit_code(conn: AgentClient,
                                                             agent: FakeAgentServer) -> None:
    code, out, err = await run_shim(NoopShim(), conn, agent,
                                    ["sh", "-c", "echo hello; echo oops >&2; exit 4"])
    assert (code, out, err) == (4, b"", b"")


# --- standalone ----------------------------------------------------------------


async def test_standalone_relays_stdout(conn: AgentClient, agent: FakeAgentServer) -> None:
    code, out, err = await run_shim(StandaloneShim(), conn, agent,
                                    ["sh", "-c", "echo hello; echo err >&2"],
                                    shim_address=agent.address)
    assert (code, out, err) == (0, b"hello\n", b"err\n")


async def test_standalone_one_mib_round_trip_is_byte_exact(conn: AgentClient,
                                                           agent: FakeAgentServer) -> None:
    data = os.urandom(ONE_MIB)
    code, out, _ = await run_shim(StandaloneShim(), conn, agent, ["cat"], stdin_data=data,
                                  shim_address=agent.address)
    assert code == 0
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(data).hexdigest()


async def test_standalone_exit_code_propagates(conn: AgentClient,
                                               agent: FakeAgentServer) -> None:
    code, _, _ = await run_shim(StandaloneShim(), conn, agent, ["sh", "-c", "exit 3"],
                                exec_id="e3", shim_address=agent.address)
    assert code == 3


async def test_standalone_forwards_the_clients_signals(conn: AgentClient,
                                                       agent: FakeAgentServer) -> None:
    """SIGTERM to the client -> the shim process -> the agent -> the process."""
    host = await agent.containers.register(CID, "", ["sh", "-c", "echo ready; exec sleep 30"])
    out = Drain()

    async def signal_when_ready() -> None:
        assert await asyncio.to_thread(out.got_data.wait, 20), "shim never relayed output"
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    sender = asyncio.create_task(signal_when_ready())
    try:
        code = await asyncio.wait_for(StandaloneShim().run(
            conn, CID, "", terminal=False, stdin=None, stdout=out.fd, stderr=2,
            shim_address=agent.address), 30)
    finally:
        await sender
        data = out.result()
    assert data == b"ready\n"
    assert code == 143
    assert host.signals == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) == before


async def test_standalone_without_a_shared_address_is_refused(conn: AgentClient) -> None:
    with pytest.raises(ClientError, match="kataProxy"):
        await StandaloneShim().run(conn, CID, "", terminal=False)


# --- the shim process ------------------------------------------------------------


async def spawn_shim_process(args: Sequence[str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runtime_client.shims", *args, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=shim_env())


async def test_shim_process_forwards_its_signals(agent: FakeAgentServer) -> None:
    host = await agent.containers.register(CID, "x", ["sh", "-c", "echo ready; exec sleep 30"])
    proc = await spawn_shim_process(["--address", agent.address, "--container", CID,
                                     "--exec", "x"])
    assert proc.stdout is not None and proc.stderr is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert line == b"ready\n"
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 10) == 143  # exited, not killed (-15)
    assert host.signals == [signal.SIGTERM]
    assert await host.exit_code() == 143
    assert await proc.stderr.read() == b""


async def test_shim_process_exit_code_and_output(agent: FakeAgentServer) -> None:
    await agent.containers.register(CID, "", ["sh", "-c", "echo out; echo err >&2; exit 3"])
    proc = await spawn_shim_process(["--address", agent.address, "--container", CID])
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 20)
    assert (proc.returncode, stdout, stderr) == (3, b"out\n", b"err\n")


async def test_shim_process_unreachable_agent_exits_125(agent: FakeAgentServer) -> None:
    address = f"unix:{agent.dir / 'nobody.sock'}"
    proc = await spawn_shim_process(["--address", address, "--container", CID,
                                     "--timeout", "1"])
    _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 125
    lines = stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("katashim: "), lines
    assert "unreachable" in lines[0]


async def test_shim_process_unknown_process_exits_125(agent: FakeAgentServer) -> None:
    proc = await spawn_shim_process(["--address", agent.address, "--container", "nope"])
    _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 125
    lines = stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("katashim: "), lines


@pytest.mark.parametrize("args", [[], ["--address", "unix:/x"],
                                  ["--address", "unix:/x", "--container", "c", "--timeout", "0"]])
async def test_shim_process_bad_arguments_exit_2(args: list[str]) -> None:
    proc = await spawn_shim_process(args)
    _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert len(stderr.decode().splitlines()) == 1, stderr
