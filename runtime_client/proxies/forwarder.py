"""A ttrpc multiplexer in front of a VM's guest agent: Kata's ``kataProxy`` /
``kataProxyBuiltin`` (what Kata's proxy did with Yamux, by ttrpc stream id).

A VM's agent is reachable from the host through one unix socket (a QEMU
virtio-serial chardev) that accepts ONE connection at a time.  :class:`AgentProxy`
owns that connection and serves any number of host clients on its own socket:
each client's frames go upstream with the client's stream id swapped for one of
the proxy's, and the answers come back with it swapped again.  Frames are relayed
as they are, whatever their service and method.  A client that leaves has its
calls cancelled upstream (the CANCEL extension, ``vmfactory.ttrpc.frames``).
Embedded in a client process it is the builtin proxy;
``runtime_client.proxies.process`` runs it as a standalone process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from runtime_client.errors import ProxyError
from runtime_client.proxies.sockets import prepare_socket_path
from vmfactory.proto import agent_pb2
from vmfactory.proto import ttrpc_pb2 as tpb
from vmfactory.ttrpc import frames as f
from vmfactory.ttrpc.frames import ProtocolError

logger = logging.getLogger(__name__)

CHUNK = 64 * 1024
DRAIN_ABOVE = 256 * 1024
# A client that lets this much of its answers pile up is not reading: dropped.
MAX_CLIENT_BUFFER = 16 << 20
FIRST_PING_S = 0.5  # the upstream check's first wait, doubled per retry
PING = ("vmfactory.agent.v1.Agent", "Ping")


@dataclass(eq=False)
class _Client:
    writer: asyncio.StreamWriter
    streams: dict[int, int] = field(default_factory=dict)  # client id -> upstream id

    def send(self, frame: bytes) -> None:
        if self.writer.is_closing():
            return
        self.writer.write(frame)
        if self.writer.transport.get_write_buffer_size() > MAX_CLIENT_BUFFER:
            logger.warning("proxy: a client does not read its answers: dropped")
            self.writer.transport.abort()


@dataclass
class _Upstream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    decoder: f.Decoder
    task: asyncio.Task[None] | None = None


def _response(stream_id: int, code: int, message: str) -> bytes:
    resp = tpb.Response(status=tpb.Status(code=code, message=message))
    return f.encode(stream_id, f.RESPONSE, 0, resp.SerializeToString())


def _timeout_of(data: bytes) -> float | None:
    with contextlib.suppress(Exception):
        nanos = tpb.Request.FromString(data).timeout_nano
        return nanos / 1e9 if nanos > 0 else None
    return None


class AgentProxy:
    """Serves ``listen`` (a unix socket path) and relays every ttrpc call over ONE
    connection to ``upstream`` (e.g. "unix:/run/.../agent.sock").

    A call waits for the upstream connection for at most its own deadline, or
    ``connect_timeout`` seconds if it has none (then it fails with UNAVAILABLE).
    """

    def __init__(self, upstream: str, listen: Path, *, connect_timeout: float = 10.0) -> None:
        self.upstream = upstream
        self.listen = Path(listen)
        self.connect_timeout = connect_timeout
        self._server: asyncio.AbstractServer | None = None
        self._up: _Upstream | None = None
        self._up_lock = asyncio.Lock()
        self._routes: dict[int, tuple[_Client, int]] = {}  # upstream id -> client, its id
        self._clients: set[asyncio.Task[None]] = set()
        self._next = secrets.randbits(31) | 1
        self._started = self._stopped = False
        self._calls = 0
        self._warm: asyncio.Future[None] | None = None

    @property
    def address(self) -> str:
        """The address clients use to reach the proxy: ``unix:<listen>``."""
        return f"unix:{self.listen}"

    @property
    def calls(self) -> int:
        """Calls forwarded so far (counted when they arrive, whatever their outcome)."""
        return self._calls

    async def start(self) -> None:
        """Bind ``listen`` (mode 0600; a stale socket file is removed first) and serve.

        Raises :class:`ProxyError` if the socket cannot be bound, or if another
        process serves it already.
        """
        if self._started:
            raise ProxyError(f"proxy on {self.listen} was already started")
        self._started = True
        prepare_socket_path(self.listen)
        old = os.umask(0o177)  # the socket is 0600 from the moment it exists
        try:
            self._server = await asyncio.start_unix_server(self._serve_client,
                                                           path=str(self.listen))
        except OSError as exc:
            self.listen.unlink(missing_ok=True)
            raise ProxyError(f"cannot serve {self.listen}: {exc}") from exc
        finally:
            os.umask(old)
        # Connect now so the first call does not pay for it.
        self._warm = asyncio.ensure_future(self._warm_up())
        logger.info("proxy serving %s for %s", self.listen, self.upstream)

    async def _warm_up(self) -> None:
        try:
            await self._connected(self.connect_timeout)
        except (TimeoutError, OSError) as exc:  # the first call tries again
            logger.info("proxy: upstream %s not up yet: %r", self.upstream, exc)

    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving (calls in flight get ``grace`` seconds), close the upstream
        connection and remove the socket file.  Idempotent."""
        if self._stopped or self._server is None:
            self._stopped = True
            return
        self._stopped = True
        self._server.close()
        if self._warm is not None:
            self._warm.cancel()
            await asyncio.gather(self._warm, return_exceptions=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self._routes and loop.time() < deadline:
            await asyncio.sleep(0.02)
        clients = list(self._clients)
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await self._close_upstream()
        self.listen.unlink(missing_ok=True)
        logger.info("proxy on %s stopped after %d calls", self.listen, self._calls)

    # -- clients -------------------------------------------------------------
    async def _serve_client(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        client = _Client(writer)
        decoder = f.Decoder()
        try:
            while chunk := await reader.read(CHUNK):
                for frame in decoder.feed(chunk):
                    await self._from_client(client, frame)
        except ProtocolError as exc:
            logger.warning("proxy: dropping a client: %s", exc)
        except (ConnectionError, OSError) as exc:
            logger.info("proxy: a client's connection failed: %s", exc)
        finally:
            self._clients.discard(task)
            self._client_gone(client)
            writer.close()

    async def _from_client(self, client: _Client, frame: f.Frame) -> None:
        if frame.stream_id % 2 == 0 or frame.type == f.RESPONSE:
            raise ProtocolError(f"stream {frame.stream_id}: not a client's frame")
        if frame.type == f.REQUEST:
            await self._request(client, frame)
            return
        up_id = client.streams.get(frame.stream_id)
        if up_id is None or self._up is None:
            return  # a call that ended meanwhile: late data is dropped
        if frame.type == f.CANCEL:
            self._forget(up_id)
        await self._send_up(f.encode(up_id, frame.type, frame.flags, frame.data))

    async def _request(self, client: _Client, frame: f.Frame) -> None:
        sid = frame.stream_id
        if sid in client.streams:
            raise ProtocolError(f"stream {sid} is already in use")
        self._calls += 1
        timeout = _timeout_of(frame.data)
        limit = self.connect_timeout if timeout is None else min(timeout, self.connect_timeout)
        try:
            await self._connected(limit)
        except (TimeoutError, OSError):
            code = f.DEADLINE_EXCEEDED if limit == timeout else f.UNAVAILABLE
            logger.warning("upstream %s not reachable within %.3g s", self.upstream, limit)
            client.send(_response(sid, code, f"upstream {self.upstream} not reachable "
                                             f"within {limit:.3g} s"))
            return
        up_id = self._alloc()
        self._routes[up_id] = (client, sid)
        client.streams[sid] = up_id
        await self._send_up(f.encode(up_id, f.REQUEST, frame.flags, frame.data))

    def _client_gone(self, client: _Client) -> None:
        """Cancel upstream what the client left running (best effort, no waiting)."""
        for up_id in list(client.streams.values()):
            self._forget(up_id)
            if self._up is not None and not self._up.writer.is_closing():
                self._up.writer.write(f.encode(up_id, f.CANCEL, 0, b""))

    def _forget(self, up_id: int) -> None:
        route = self._routes.pop(up_id, None)
        if route is not None:
            route[0].streams.pop(route[1], None)

    def _alloc(self) -> int:
        up_id = self._next
        self._next = (self._next + 2) % (1 << 32)
        return up_id

    # -- the upstream ----------------------------------------------------------
    async def _send_up(self, frame: bytes) -> None:
        up = self._up
        if up is None or up.writer.is_closing():
            return
        up.writer.write(frame)
        if up.writer.transport.get_write_buffer_size() > DRAIN_ABOVE:
            with contextlib.suppress(ConnectionError):
                await up.writer.drain()

    async def _connected(self, limit: float) -> None:
        """Make sure there is a checked upstream connection, within ``limit`` seconds."""
        if self._up is not None:
            return
        async with asyncio.timeout(limit), self._up_lock:
            if self._up is None:
                self._up = await self._connect()
                self._up.task = asyncio.ensure_future(self._read_upstream(self._up))

    async def _connect(self) -> _Upstream:
        """Connect and ping until the agent answers (a session the guest cannot
        decode is left by reconnecting, as ``AgentClient.wait_ready`` does)."""
        path, attempt = self.upstream.removeprefix("unix:"), FIRST_PING_S
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=CHUNK)
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(0.02)
                continue
            up = _Upstream(reader, writer, f.Decoder())
            try:
                async with asyncio.timeout(attempt):
                    await self._ping(up)
                return up
            except (TimeoutError, ProtocolError, ConnectionError):
                writer.close()
                attempt = min(2 * attempt, 4.0)

    async def _ping(self, up: _Upstream) -> None:
        sid, token = self._alloc(), secrets.randbits(63)
        req = tpb.Request(service=PING[0], method=PING[1],
                          payload=agent_pb2.PingRequest(token=token).SerializeToString())
        up.writer.write(f.encode(sid, f.REQUEST, 0, req.SerializeToString()))
        while chunk := await up.reader.read(CHUNK):
            for frame in up.decoder.feed(chunk):
                if frame.stream_id == sid and frame.type == f.RESPONSE:
                    reply = agent_pb2.PingReply.FromString(tpb.Response.FromString(
                        frame.data).payload)
                    if reply.token == token:
                        return
        raise ConnectionError("the agent socket closed")

    async def _read_upstream(self, up: _Upstream) -> None:
        try:
            while chunk := await up.reader.read(CHUNK):
                for frame in up.decoder.feed(chunk):
                    self._from_upstream(frame)
            why = "the agent socket closed"
        except (ProtocolError, ConnectionError, OSError) as exc:
            why = str(exc)
        logger.warning("proxy: upstream %s lost: %s", self.upstream, why)
        self._upstream_lost(up, why)

    def _from_upstream(self, frame: f.Frame) -> None:
        route = self._routes.get(frame.stream_id)
        if route is None:
            return  # an answer to a call its client gave up
        client, sid = route
        if frame.type == f.RESPONSE:
            self._forget(frame.stream_id)
        client.send(f.encode(sid, frame.type, frame.flags, frame.data))

    def _upstream_lost(self, up: _Upstream, why: str) -> None:
        if self._up is up:
            self._up = None
        up.writer.close()
        for up_id, (client, sid) in list(self._routes.items()):
            self._forget(up_id)
            client.send(_response(sid, f.UNAVAILABLE, f"agent connection lost: {why}"))

    async def _close_upstream(self) -> None:
        up, self._up = self._up, None
        if up is None:
            return
        if up.task is not None:
            up.task.cancel()
            await asyncio.gather(up.task, return_exceptions=True)
        up.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.shield(up.writer.wait_closed())
