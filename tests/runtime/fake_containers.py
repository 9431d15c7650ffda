"""A TEST DOUBLE of the guest agent's ``Containers`` service (plus ``Agent.Ping``).

It is not the agent: there is no VM, no container, no namespace.  Processes run
on the HOST with asyncio subprocesses (pipes for stdin/stdout/stderr) and are
registered by (container_id, exec_id) before a test relays them; each starts at
registration, and its output is buffered until an ``IoStream`` attaches.  Only
IoStream, WaitProcess, SignalProcess and ResizeTty (which just records the size)
are implemented, with the agent's conventions: exit code 128+N for a death by
signal N, the reply stream of IoStream ends after both outputs reached EOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmfactory.proto import agent_pb2 as pb
from vmfactory.ttrpc import aio
from vmfactory.ttrpc import frames as f
from vmfactory.ttrpc.services import add_service

_CHUNK = 64 * 1024
# (stream name, data); data None is that stream's EOF.
OutputItem = tuple[str, bytes | None]


@dataclass
class HostProcess:
    """One registered process and what the double observed of it."""

    argv: tuple[str, ...]
    proc: asyncio.subprocess.Process
    output: asyncio.Queue[OutputItem] = field(default_factory=asyncio.Queue)
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    signals: list[int] = field(default_factory=list)
    stdin_bytes: int = 0
    stdin_closed: bool = False

    async def exit_code(self) -> int:
        returncode = await self.proc.wait()
        return 128 - returncode if returncode < 0 else returncode


class FakeContainers:
    """The double's servicers and its process table."""

    def __init__(self) -> None:
        self.processes: dict[tuple[str, str], HostProcess] = {}

    async def register(self, container_id: str, exec_id: str,
                       argv: Sequence[str]) -> HostProcess:
        """Start ``argv`` on the host as process (container_id, exec_id)."""
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        host = HostProcess(tuple(argv), proc)
        assert proc.stdout is not None and proc.stderr is not None
        host.readers = [asyncio.create_task(_pump(proc.stdout, "stdout", host.output)),
                        asyncio.create_task(_pump(proc.stderr, "stderr", host.output))]
        self.processes[(container_id, exec_id)] = host
        return host

    async def close(self) -> None:
        """Kill what still runs and stop the output readers."""
        for host in self.processes.values():
            if host.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    host.proc.kill()
            await host.proc.wait()
            for task in host.readers:
                task.cancel()
            await asyncio.gather(*host.readers, return_exceptions=True)

    async def _lookup(self, container_id: str, exec_id: str,
                      context: aio.CallContext) -> HostProcess:
        host = self.processes.get((container_id, exec_id))
        if host is None:
            raise f.RpcError(f.NOT_FOUND, f"no process {container_id!r}/{exec_id!r}")
        return host

    async def Ping(self, request: pb.PingRequest,
                   context: aio.CallContext) -> pb.PingReply:
        return pb.PingReply(token=request.token, agent_version="fake-containers")

    async def WaitProcess(self, request: pb.WaitProcessRequest,
                          context: aio.CallContext) -> pb.WaitProcessReply:
        host = await self._lookup(request.container_id, request.exec_id, context)
        return pb.WaitProcessReply(exit_code=await host.exit_code())

    async def SignalProcess(self, request: pb.SignalProcessRequest,
                            context: aio.CallContext) -> pb.SignalProcessReply:
        host = await self._lookup(request.container_id, request.exec_id, context)
        host.signals.append(request.signal)
        with contextlib.suppress(ProcessLookupError):
            host.proc.send_signal(signal.Signals(request.signal))
        return pb.SignalProcessReply()

    async def ResizeTty(self, request: pb.ResizeTtyRequest,
                        context: aio.CallContext) -> pb.ResizeTtyReply:
        host = await self._lookup(request.container_id, request.exec_id, context)
        host.sizes.append((request.rows, request.cols))
        return pb.ResizeTtyReply()

    async def IoStream(self, request_iterator: AsyncIterator[pb.IoInput],
                       context: aio.CallContext) -> AsyncIterator[pb.IoOutput]:
        first = await anext(request_iterator)
        host = await self._lookup(first.container_id, first.exec_id, context)
        feeder = asyncio.create_task(_feed_stdin(request_iterator, host))
        try:
            open_streams = 2
            while open_streams:
                name, data = await host.output.get()
                if data is None:
                    open_streams -= 1
                else:
                    yield pb.IoOutput(**{name: data})
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)


async def _pump(reader: asyncio.StreamReader, name: str,
                queue: asyncio.Queue[OutputItem]) -> None:
    while data := await reader.read(_CHUNK):
        await queue.put((name, data))
    await queue.put((name, None))


async def _feed_stdin(requests: AsyncIterator[pb.IoInput], host: HostProcess) -> None:
    stdin = host.proc.stdin
    assert stdin is not None
    try:
        async for request in requests:
            if request.stdin:
                stdin.write(request.stdin)
                host.stdin_bytes += len(request.stdin)
                await stdin.drain()
            if request.close_stdin:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass  # the process exited without reading all of its stdin
    finally:
        # Also when the client half-closed without close_stdin: it sends no more.
        host.stdin_closed = True
        stdin.close()


class FakeAgentServer:
    """The double served on a unix socket under a short /tmp directory."""

    def __init__(self) -> None:
        self.containers = FakeContainers()
        self.dir = Path(tempfile.mkdtemp(prefix="vmf-", dir="/tmp"))
        self.socket = self.dir / "agent.sock"
        assert len(str(self.socket).encode()) <= 107
        self.address = f"unix:{self.socket}"
        self._server = aio.Server()
        for service in ("Containers", "Agent"):
            add_service(self._server, pb.DESCRIPTOR.services_by_name[service], self.containers,
                        partial=True)
        self._listener: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._listener = await self._server.start_unix_server(str(self.socket))

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        await self._server.close()
        await self.containers.close()
        shutil.rmtree(self.dir, ignore_errors=True)
