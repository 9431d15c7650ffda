"""The resident's control socket: one JSON line per request, one per reply.

    {"op": "start"} | {"op": "signal", "signal": N, "all": B} | {"op": "pause"}
    {"op": "resume"} | {"op": "ps"} | {"op": "delete"}
    {"op": "exec", "process": {...}}   with the caller's fds 0, 1, 2 (SCM_RIGHTS);
        then {"ok": true}, later {"exit_code": N}; meanwhile the caller may send
        {"signal": N} and {"resize": [rows, cols]} lines for the exec'd process.

Only the resident's own uid (root) may connect (SO_PEERCRED); the socket is
0600 in a 0700 directory anyway.  Requests are bounded (MAX_LINE) and must
arrive within FIRST_LINE_S; operations are serialised.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import struct
from typing import Any, Protocol

from runtime_client.bundles import parse_process
from runtime_client.container import Container
from runtime_client.oci.state import ContainerDir, OciError, socket_path
from runtime_client.shims.iorelay import host_terminal_size, relay_io
from vmfactory.errors import VmFactoryError

logger = logging.getLogger(__name__)

MAX_LINE = 1 << 16
FIRST_LINE_S = 30.0
REPLY_GRACE_S = 1.0
HARMLESS = {signal.SIGCHLD, signal.SIGWINCH, signal.SIGURG, signal.SIGCONT}


class Resident(Protocol):
    """What the control socket serves (runtime_client.oci.resident.Resident)."""

    cdir: ContainerDir
    state: dict[str, Any]
    container: Container | None

    async def start(self) -> None: ...

    def end(self, code: int) -> None: ...

    def set_status(self, status: str, **fields: Any) -> None: ...


class _Conn:
    """A non-blocking unix connection read line by line on the loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.loop = asyncio.get_running_loop()

    async def line(self, with_fds: bool = False) -> tuple[dict[str, Any] | None, list[int]]:
        """The next JSON object line (None at EOF) and any descriptors that came with it."""
        fds: list[int] = []
        while b"\n" not in self.buffer:
            await self._readable()
            try:
                if with_fds:
                    chunk, new, _, _ = socket.recv_fds(self.sock, MAX_LINE, 3)
                    fds += new
                else:
                    chunk = self.sock.recv(MAX_LINE)
            except (BlockingIOError, InterruptedError):
                continue
            if not chunk:
                _close_all(fds)
                return None, []
            self.buffer += chunk
            if len(self.buffer) > MAX_LINE:
                _close_all(fds)
                raise OciError("request too long")
        line, _, self.buffer = self.buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            _close_all(fds)
            raise OciError("malformed request")
        return message, fds

    async def _readable(self) -> None:
        ready = self.loop.create_future()
        fd = self.sock.fileno()
        self.loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            self.loop.remove_reader(fd)

    async def send(self, message: dict[str, Any]) -> None:
        await self.loop.sock_sendall(self.sock, json.dumps(message).encode() + b"\n")


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class ControlServer:
    """Serves the resident's control socket; :meth:`stop` is idempotent."""

    def __init__(self, resident: Resident) -> None:
        self.resident = resident
        self.listener: socket.socket | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.lock = asyncio.Lock()
        self.accepting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        path = self.resident.cdir.control
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with socket_path(path) as address:
            listener.bind(address)
        os.chmod(path, 0o600)
        listener.listen(16)
        listener.setblocking(False)
        self.listener = listener
        self.accepting = asyncio.ensure_future(self._accept())

    async def stop(self) -> None:
        if self.accepting is not None:
            self.accepting.cancel()
            await asyncio.gather(self.accepting, return_exceptions=True)
            self.accepting = None
        if self.tasks:  # a reply being written (to a delete, say) still goes out
            await asyncio.wait(list(self.tasks), timeout=REPLY_GRACE_S)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            self.resident.cdir.control.unlink(missing_ok=True)

    async def _accept(self) -> None:
        assert self.listener is not None
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self.listener)
            sock.setblocking(False)
            task = asyncio.ensure_future(self._serve(sock))
            self.tasks.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("control connection failed: %r", task.exception())

    async def _serve(self, sock: socket.socket) -> None:
        conn = _Conn(sock)
        fds: list[int] = []
        try:
            uid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      12))[1]
            if uid != os.getuid():
                await conn.send({"ok": False, "error": "permission denied"})
                return
            request, fds = await asyncio.wait_for(conn.line(with_fds=True), FIRST_LINE_S)
            if request is None:
                return
            if request.get("op") == "exec":
                await self._exec(conn, request, fds)
                fds = []  # the exec owns them now
            else:
                async with self.lock:
                    reply = await self._op(request)
                await conn.send({"ok": True, **reply})
        except (OciError, VmFactoryError) as exc:
            await _try_send(conn, {"ok": False, "error": str(exc)[:1000]})
        except (asyncio.TimeoutError, OSError) as exc:
            logger.info("control connection dropped: %r", exc)
        finally:
            _close_all(fds)
            sock.close()

    async def _op(self, request: dict[str, Any]) -> dict[str, Any]:
        r = self.resident
        op, status = request.get("op"), r.state["status"]
        container = r.container
        assert container is not None
        if op == "start":
            if status != "created":
                raise OciError(f"cannot start a container in the {status} state")
            await r.start()
        elif op == "signal":
            number = request.get("signal")
            if not isinstance(number, int) or not 0 < number < signal.NSIG:
                raise OciError("bad signal")
            if status == "created":
                if number not in HARMLESS:
                    r.end(128 + number)  # as an init killed before it ran
            else:
                await container.signal(number, all=bool(request.get("all")))
        elif op in ("pause", "resume"):
            if status != ("running" if op == "pause" else "paused"):
                raise OciError(f"container not {'running' if op == 'pause' else 'paused'}")
            await container.signal(signal.SIGSTOP if op == "pause" else signal.SIGCONT,
                                   all=True)
            r.set_status("paused" if op == "pause" else "running")
        elif op == "ps":
            return {"processes": [{"pid": p.guest_pid, "ppid": p.ppid, "state": p.state,
                                   "cmdline": p.cmdline} for p in await container.processes()]}
        elif op == "delete":
            r.end(137 if status in ("running", "paused") else 0)
        else:
            raise OciError(f"unknown operation {str(op)[:40]!r}")
        return {}

    async def _exec(self, conn: _Conn, request: dict[str, Any], fds: list[int]) -> None:
        r = self.resident
        container = r.container
        if len(fds) != 3:
            raise OciError("exec needs the caller's stdin, stdout and stderr")
        if r.state["status"] != "running" or container is None:
            raise OciError("cannot exec in a stopped container")
        spec = parse_process(request.get("process"))
        size = host_terminal_size(fds[0], fds[1]) if spec.terminal else None
        async with self.lock:
            exec_id = await container.exec(list(spec.args), terminal=spec.terminal, spec=spec,
                                           rows=size.lines if size else 0,
                                           cols=size.columns if size else 0)
        await conn.send({"ok": True, "exec_id": exec_id})
        agent = await container.host.connect()
        listening = asyncio.ensure_future(self._exec_requests(conn, exec_id))
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(relay_io(agent, container.name, exec_id, stdin=fds[0],
                                           stdout=fds[1], stderr=fds[2],
                                           terminal=spec.terminal))
                waited = group.create_task(agent.wait(container.name, exec_id))
            await _try_send(conn, {"exit_code": waited.result()})
        except ExceptionGroup as group:
            logger.error("exec %s: relay failed: %r", exec_id, group.exceptions[0])
            await _try_send(conn, {"exit_code": 255})
        finally:
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)
            _close_all(fds)

    async def _exec_requests(self, conn: _Conn, exec_id: str) -> None:
        """Signals and resizes the exec's caller forwards, until it hangs up."""
        container = self.resident.container
        assert container is not None
        while True:
            message, _ = await conn.line()
            if message is None:
                return
            try:
                if isinstance(message.get("signal"), int):
                    await container.signal(message["signal"], exec_id=exec_id)
                elif isinstance(message.get("resize"), list) and len(message["resize"]) == 2:
                    rows, cols = (int(v) for v in message["resize"])
                    await container.resize(rows, cols, exec_id)
            except (VmFactoryError, ValueError, TypeError) as exc:
                logger.info("exec %s: %s", exec_id, exc)


async def _try_send(conn: _Conn, message: dict[str, Any]) -> None:
    try:
        await conn.send(message)
    except OSError:
        pass  # the caller is gone
