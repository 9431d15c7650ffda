"""ttrpc on asyncio: a server that serves any stream connection, and a client.

Many calls share one connection, each on its own stream id (odd, from the
client).  Unary calls are a Request and its Response.  Streaming calls (ttrpc
1.2): a Request flagged ``remote open`` is followed by the client's data
frames, the last one flagged ``remote closed``; the server's messages come as
data frames and the call ends with a Response carrying the status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from vmfactory.proto import ttrpc_pb2 as pb
from vmfactory.ttrpc import frames as f
from vmfactory.ttrpc.channels import READ_CHUNK, Channel, StreamChannel
from vmfactory.ttrpc.frames import ConnectionLost, ProtocolError, RpcError

logger = logging.getLogger(__name__)

MAX_STREAMS = 256  # calls in flight on one connection
STREAM_QUEUE = 64  # messages buffered per stream before the connection's reader waits
DRAIN_ABOVE = 256 * 1024


@dataclass
class CallContext:
    """What a handler knows of its call."""

    service: str
    method: str
    metadata: dict[str, list[str]]
    timeout: float | None


class ServerStream:
    """A streaming call as its handler sees it."""

    def __init__(self, conn: _ServerConnection, stream_id: int, first: bytes | None,
                 open_: bool) -> None:
        self._conn, self._id = conn, stream_id
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue(STREAM_QUEUE)
        if first is not None:
            self._inbox.put_nowait(first)
        if not open_:
            self._inbox.put_nowait(None)

    async def recv(self) -> bytes | None:
        """The client's next message, or None once it closed its side."""
        return await self._inbox.get()

    async def send(self, message: bytes) -> None:
        await self._conn.write(self._id, f.DATA, 0, message)


Unary = Callable[[bytes, CallContext], Awaitable[bytes]]
Streaming = Callable[[ServerStream, CallContext], Awaitable[bytes | None]]


@dataclass
class _Method:
    handler: Unary | Streaming
    streaming: bool


class Server:
    """Methods registered by "service/method"; serves connections handed to it."""

    def __init__(self, *, max_data: int = f.MAX_DATA) -> None:
        self._methods: dict[tuple[str, str], _Method] = {}
        self._max_data = max_data
        self._connections: set[asyncio.Task[None]] = set()

    def register(self, service: str, method: str, handler: Unary | Streaming, *,
                 streaming: bool = False) -> None:
        self._methods[(service, method)] = _Method(handler, streaming)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one stream connection until the peer leaves or breaks the framing."""
        await self.serve_channel(StreamChannel(reader, writer))

    async def serve_channel(self, channel: Channel, *,
                            frame_timeout: float | None = None) -> bytes | None:
        """Serve any byte channel (a virtio-serial port, say) until it ends: None when
        the peer left; when the peer broke the framing, the bytes read and not decoded
        yet (a caller that can resynchronise goes on from them).  ``frame_timeout``:
        a frame still incomplete that long after its header came breaks the framing
        (on a channel shared by peers one after another, a frame one of them left
        half sent would otherwise swallow the next one's bytes)."""
        conn = _ServerConnection(self, channel, frame_timeout)
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            return await conn.run()
        finally:
            if task is not None:
                self._connections.discard(task)

    @property
    def services(self) -> frozenset[str]:
        """The names of the services with at least one method registered."""
        return frozenset(service for service, _ in self._methods)

    async def start_unix_server(self, path: str) -> asyncio.AbstractServer:
        return await asyncio.start_unix_server(self.serve, path=path)

    async def close(self) -> None:
        """End every connection (their calls are cancelled); idempotent."""
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _ServerConnection:
    def __init__(self, server: Server, channel: Channel,
                 frame_timeout: float | None = None) -> None:
        self.server, self.channel = server, channel
        self.frame_timeout = frame_timeout
        self._partial_since = 0.0
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.streams: dict[int, ServerStream] = {}
        self._write_lock = asyncio.Lock()

    async def run(self) -> bytes | None:
        decoder = f.Decoder(self.server._max_data)
        try:
            while chunk := await self._read(decoder):
                before = decoder.pending
                for frame in decoder.feed(chunk):
                    await self._dispatch(frame)
                if not before or decoder.pending < before + len(chunk):
                    self._partial_since = asyncio.get_running_loop().time()
            if decoder.pending:
                logger.info("ttrpc: peer left in the middle of a frame (%d bytes)",
                            decoder.pending)
        except ProtocolError as exc:
            logger.warning("ttrpc: closing a connection: %s", exc)
            return decoder.take()
        except (ConnectionError, OSError) as exc:
            logger.info("ttrpc: connection lost: %s", exc)
        finally:
            await self._shutdown()
        return None

    async def _read(self, decoder: f.Decoder) -> bytes:
        """The channel's next bytes, within the frame timeout while a frame is partial."""
        if self.frame_timeout is None or not decoder.pending:
            return await self.channel.read()
        deadline = self._partial_since + self.frame_timeout
        try:
            async with asyncio.timeout_at(deadline):
                return await self.channel.read()
        except TimeoutError:
            raise ProtocolError(f"a frame stayed incomplete for {self.frame_timeout:g} s "
                                f"({decoder.pending} bytes)") from None

    async def _shutdown(self) -> None:
        calls = list(self.calls.values())
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await self.channel.close()

    async def _dispatch(self, frame: f.Frame) -> None:
        if frame.stream_id % 2 == 0:
            raise ProtocolError(f"stream {frame.stream_id}: clients use odd stream ids")
        if frame.type == f.REQUEST:
            self._start(frame)
        elif frame.type == f.DATA:
            stream = self.streams.get(frame.stream_id)
            if stream is None:
                return  # a call that ended (or timed out) meanwhile: late data is dropped
            if not frame.flags & f.FLAG_NO_DATA:
                await stream._inbox.put(frame.data)
            if frame.flags & f.FLAG_REMOTE_CLOSED:
                await stream._inbox.put(None)
        elif frame.type == f.CANCEL:
            task = self.calls.get(frame.stream_id)
            if task is not None:
                task.cancel()
        else:  # a response from a client is not a thing
            raise ProtocolError(f"stream {frame.stream_id}: unexpected frame type {frame.type}")

    def _start(self, frame: f.Frame) -> None:
        """Parse and route now (a streaming call's data may follow at once); run later."""
        sid = frame.stream_id
        if sid in self.calls:
            raise ProtocolError(f"stream {sid} is already in use")
        if len(self.calls) >= MAX_STREAMS:
            self._spawn(sid, self.respond(sid, f.RESOURCE_EXHAUSTED,
                                          f"more than {MAX_STREAMS} calls", b""))
            return
        req = pb.Request()
        try:
            req.ParseFromString(frame.data)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
            self._spawn(sid, self.respond(sid, f.INVALID_ARGUMENT, "undecodable request", b""))
            return
        method = self.server._methods.get((req.service, req.method))
        if method is None:
            self._spawn(sid, self.respond(sid, f.UNIMPLEMENTED, f"{req.service[:100]}/"
                                          f"{req.method[:100]} is not served", b""))
            return
        stream = None
        if method.streaming:
            open_ = bool(frame.flags & f.FLAG_REMOTE_OPEN)
            first = req.payload if not open_ or req.payload else None
            stream = self.streams[sid] = ServerStream(self, sid, first, open_)
        self._spawn(sid, self._call(sid, req, method, stream))

    def _spawn(self, stream_id: int, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.calls[stream_id] = task
        task.add_done_callback(lambda _t: self._forget(stream_id))

    def _forget(self, stream_id: int) -> None:
        self.calls.pop(stream_id, None)
        self.streams.pop(stream_id, None)

    async def _call(self, sid: int, req: pb.Request, method: _Method,
                    stream: ServerStream | None) -> None:
        ctx = _context(req)
        try:
            async with asyncio.timeout(ctx.timeout):
                if stream is not None:
                    out = await method.handler(stream, ctx)  # type: ignore[arg-type]
                else:
                    out = await method.handler(req.payload, ctx)  # type: ignore[arg-type]
            code, message, payload = f.OK, "", out or b""
        except RpcError as exc:
            await self.respond(sid, exc.code, exc.message, b"", exc.details)
            return
        except TimeoutError:
            code, message, payload = f.DEADLINE_EXCEEDED, "deadline exceeded", b""
        except Exception as exc:  # noqa: BLE001 - a handler's bug is the caller's UNKNOWN
            logger.exception("ttrpc: %s/%s failed", ctx.service, ctx.method)
            code, message, payload = f.UNKNOWN, f"{type(exc).__name__}: {exc}"[:200], b""
        await self.respond(sid, code, message, payload)

    async def respond(self, stream_id: int, code: int, message: str, payload: bytes,
                      details: dict[str, str] | None = None) -> None:
        status = pb.Status(code=code, message=message)
        for key, value in (details or {}).items():
            status.details.add(type_url=f.DETAIL_TYPE + key, value=value.encode())
        resp = pb.Response(status=status, payload=payload)
        await self.write(stream_id, f.RESPONSE, 0, resp.SerializeToString())

    async def write(self, stream_id: int, type_: int, flags: int, data: bytes) -> None:
        frame = f.encode(stream_id, type_, flags, data)
        async with self._write_lock:
            self.channel.write(frame)
            if self.channel.buffered() > DRAIN_ABOVE:
                await self.channel.drain()


def _context(req: pb.Request) -> CallContext:
    metadata: dict[str, list[str]] = {}
    for kv in req.metadata:
        metadata.setdefault(kv.key, []).append(kv.value)
    timeout = req.timeout_nano / 1e9 if req.timeout_nano > 0 else None
    return CallContext(req.service, req.method, metadata, timeout)


# --- the client -----------------------------------------------------------------------

@dataclass
class _Pending:
    response: asyncio.Future[pb.Response]
    inbox: asyncio.Queue[bytes] | None = None  # streaming calls: the server's messages


class ClientStream:
    """A streaming call from the client's side."""

    def __init__(self, client: Client, stream_id: int, pending: _Pending) -> None:
        self._client, self._id, self._pending = client, stream_id, pending
        self._closed = False

    async def send(self, message: bytes) -> None:
        if self._closed:
            raise f.TtrpcError("send after close_send")
        await self._client._write(self._id, f.DATA, 0, message)

    async def close_send(self) -> None:
        if not self._closed:
            self._closed = True
            await self._client._write(self._id, f.DATA, f.FLAG_REMOTE_CLOSED | f.FLAG_NO_DATA,
                                      b"")

    def cancel(self) -> None:
        """Give the call up: the server's handler is cancelled, late messages dropped."""
        if not self._pending.response.done():
            self._pending.response.cancel()
            self._client.cancel_soon(self._id)

    async def recv(self) -> bytes | None:
        """The server's next message; None when the call ended well; RpcError if not."""
        inbox = self._pending.inbox
        assert inbox is not None
        get = asyncio.ensure_future(inbox.get())
        done, _ = await asyncio.wait({get, self._pending.response},
                                     return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        if not inbox.empty():  # data that came before the response
            return inbox.get_nowait()
        _check(self._pending.response.result())
        return None


class Client:
    """Calls over one connection; a background reader routes the server's frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 max_data: int = f.MAX_DATA, first_stream_id: int = 1) -> None:
        if first_stream_id % 2 == 0 or not 0 < first_stream_id < 1 << 32:
            raise ValueError("stream ids are odd 32-bit numbers")
        self._reader, self._writer = reader, writer
        self._pending: dict[int, _Pending] = {}
        self._next = first_stream_id
        self._write_lock = asyncio.Lock()
        self._max_data = max_data
        self._lost: BaseException | None = None
        self._task = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def connect_unix(cls, path: str, timeout: float = 10.0, *,
                           first_stream_id: int = 1) -> Client:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path, limit=READ_CHUNK)
        return cls(reader, writer, first_stream_id=first_stream_id)

    async def call(self, service: str, method: str, payload: bytes, *,
                   timeout: float | None = None,
                   metadata: dict[str, str] | None = None) -> bytes:
        """A unary call; its reply payload, or RpcError/ConnectionLost/TimeoutError.
        A call given up (timeout, cancellation) is cancelled on the server too."""
        stream_id, pending = self._open(streaming=False)
        try:
            await self._request(stream_id, service, method, payload, timeout, metadata, 0)
            async with asyncio.timeout(timeout):
                resp = await asyncio.shield(pending.response)
            return _check(resp)
        finally:
            if self._pending.pop(stream_id, None) is not None and not pending.response.done():
                self.cancel_soon(stream_id)

    def cancel_soon(self, stream_id: int) -> None:
        """Tell the server, best effort and without waiting, that ``stream_id`` is
        given up (the CANCEL extension; see ``frames``)."""
        if self._lost is None and not self._writer.is_closing():
            self._writer.write(f.encode(stream_id, f.CANCEL, 0, b""))

    async def stream(self, service: str, method: str, payload: bytes | None = None, *,
                     timeout: float | None = None,
                     metadata: dict[str, str] | None = None) -> ClientStream:
        """A streaming call: ``payload`` given, the client sends nothing more (the
        server streams); None, the client goes on with send() and close_send()."""
        stream_id, pending = self._open(streaming=True)
        flags = f.FLAG_REMOTE_CLOSED if payload is not None else f.FLAG_REMOTE_OPEN
        await self._request(stream_id, service, method, payload or b"", timeout, metadata,
                            flags)
        pending.response.add_done_callback(lambda _r: self._pending.pop(stream_id, None))
        return ClientStream(self, stream_id, pending)

    def _open(self, streaming: bool) -> tuple[int, _Pending]:
        if self._lost is not None:
            raise ConnectionLost(f"connection lost: {self._lost}")
        stream_id, self._next = self._next, (self._next + 2) % (1 << 32)
        pending = _Pending(asyncio.get_running_loop().create_future(),
                           asyncio.Queue() if streaming else None)
        self._pending[stream_id] = pending
        return stream_id, pending

    async def _request(self, stream_id: int, service: str, method: str, payload: bytes,
                       timeout: float | None, metadata: dict[str, str] | None,
                       flags: int) -> None:
        req = pb.Request(service=service, method=method, payload=payload,
                         timeout_nano=int(timeout * 1e9) if timeout else 0,
                         metadata=[pb.KeyValue(key=k, value=v)
                                   for k, v in (metadata or {}).items()])
        await self._write(stream_id, f.REQUEST, flags, req.SerializeToString())

    async def _write(self, stream_id: int, type_: int, flags: int, data: bytes) -> None:
        if self._lost is not None:
            raise ConnectionLost(f"connection lost: {self._lost}")
        frame = f.encode(stream_id, type_, flags, data)
        async with self._write_lock:
            self._writer.write(frame)
            await self._writer.drain()

    async def _read_loop(self) -> None:
        decoder = f.Decoder(self._max_data)
        reason: BaseException = ConnectionLost("the server closed the connection")
        try:
            while chunk := await self._reader.read(READ_CHUNK):
                for frame in decoder.feed(chunk):
                    await self._route(frame)
        except (ProtocolError, ConnectionError, OSError) as exc:
            reason = exc
            logger.warning("ttrpc client: connection failed: %s", exc)
        except asyncio.CancelledError:
            reason = ConnectionLost("the client was closed")
            raise
        finally:
            self._fail_all(reason)

    async def _route(self, frame: f.Frame) -> None:
        pending = self._pending.get(frame.stream_id)
        if pending is None or pending.response.done():
            return  # a call that gave up (timeout, cancellation): its late answer is dropped
        if frame.type == f.RESPONSE:
            resp = pb.Response()
            try:
                resp.ParseFromString(frame.data)
            except Exception as exc:  # noqa: BLE001
                raise ProtocolError(f"stream {frame.stream_id}: undecodable response") from exc
            pending.response.set_result(resp)
        elif frame.type == f.DATA and pending.inbox is not None:
            if not frame.flags & f.FLAG_NO_DATA:
                await pending.inbox.put(frame.data)
        else:
            raise ProtocolError(f"stream {frame.stream_id}: unexpected frame type {frame.type}")

    def _fail_all(self, reason: BaseException) -> None:
        self._lost = reason
        for pending in self._pending.values():
            if not pending.response.done():
                pending.response.set_exception(ConnectionLost(f"connection lost: {reason}"))
                pending.response.exception()  # retrieved: nobody may be waiting any more
        self._pending.clear()

    async def close(self) -> None:
        """Close the connection; outstanding calls fail with ConnectionLost (and are
        cancelled on the server: a server on a shared channel cannot tell). Idempotent."""
        for stream_id, pending in list(self._pending.items()):
            if not pending.response.done():
                self.cancel_soon(stream_id)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.shield(self._writer.wait_closed())

    @property
    def lost(self) -> bool:
        """Whether the connection ended (every later call fails with ConnectionLost)."""
        return self._lost is not None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _check(resp: pb.Response) -> bytes:
    if resp.status.code != f.OK:
        raise RpcError(resp.status.code, resp.status.message, f.details_of(resp.status))
    return resp.payload
