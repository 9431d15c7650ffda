"""ttrpc without an event loop: a blocking client (one call at a time per
client, which is what a short-lived command needs) and a server that serves
each connection in a thread (unary methods)."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

from vmfactory.proto import ttrpc_pb2 as pb
from vmfactory.ttrpc import frames as f
from vmfactory.ttrpc.frames import ConnectionLost, ProtocolError, RpcError

logger = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
SyncUnary = Callable[[bytes], bytes]


class Client:
    """Blocking unary calls over one connected socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._decoder = f.Decoder()
        self._next = 1
        self._lock = threading.Lock()

    @classmethod
    def connect_unix(cls, path: str, timeout: float = 10.0) -> Client:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        return cls(sock)

    def call(self, service: str, method: str, payload: bytes, *,
             timeout: float | None = None) -> bytes:
        """The reply payload, or RpcError / ConnectionLost / TimeoutError."""
        with self._lock:
            stream_id, self._next = self._next, self._next + 2
            req = pb.Request(service=service, method=method, payload=payload,
                             timeout_nano=int(timeout * 1e9) if timeout else 0)
            self._sock.settimeout(timeout)
            self._sock.sendall(f.encode(stream_id, f.REQUEST, 0, req.SerializeToString()))
            frame = self._read_until(stream_id)
        resp = pb.Response()
        resp.ParseFromString(frame.data)
        if resp.status.code != f.OK:
            raise RpcError(resp.status.code, resp.status.message, f.details_of(resp.status))
        return resp.payload

    def _read_until(self, stream_id: int) -> f.Frame:
        """One call at a time: any other frame is a late answer to one that timed out."""
        while True:
            try:
                chunk = self._sock.recv(READ_CHUNK)
            except socket.timeout:
                raise TimeoutError(f"no response on stream {stream_id}") from None
            if not chunk:
                raise ConnectionLost("the server closed the connection")
            for frame in self._decoder.feed(chunk):
                if frame.stream_id == stream_id and frame.type == f.RESPONSE:
                    return frame

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Server:
    """Unary methods, each connection served by a thread of its own."""

    def __init__(self) -> None:
        self._methods: dict[tuple[str, str], SyncUnary] = {}

    def register(self, service: str, method: str, handler: SyncUnary) -> None:
        self._methods[(service, method)] = handler

    def serve_connection(self, sock: socket.socket) -> None:
        """Serve ``sock`` until the peer leaves or breaks the framing; closes it."""
        decoder = f.Decoder()
        try:
            while chunk := sock.recv(READ_CHUNK):
                for frame in decoder.feed(chunk):
                    sock.sendall(self._answer(frame))
        except ProtocolError as exc:
            logger.warning("ttrpc: closing a connection: %s", exc)
        except OSError as exc:
            logger.info("ttrpc: connection lost: %s", exc)
        finally:
            sock.close()

    def _answer(self, frame: f.Frame) -> bytes:
        if frame.type != f.REQUEST or frame.stream_id % 2 == 0:
            raise ProtocolError(f"stream {frame.stream_id}: unexpected frame type {frame.type}")
        if frame.flags & (f.FLAG_REMOTE_OPEN | f.FLAG_REMOTE_CLOSED):
            return _response(frame.stream_id, f.UNIMPLEMENTED, "streaming calls need aio.Server")
        req = pb.Request()
        try:
            req.ParseFromString(frame.data)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
            return _response(frame.stream_id, f.INVALID_ARGUMENT, "undecodable request")
        handler = self._methods.get((req.service, req.method))
        if handler is None:
            return _response(frame.stream_id, f.UNIMPLEMENTED,
                             f"{req.service[:100]}/{req.method[:100]} is not served")
        try:
            return _response(frame.stream_id, f.OK, "", handler(req.payload))
        except RpcError as exc:
            return _response(frame.stream_id, exc.code, exc.message, details=exc.details)
        except Exception as exc:  # noqa: BLE001 - a handler's bug is the caller's UNKNOWN
            logger.exception("ttrpc: %s/%s failed", req.service, req.method)
            return _response(frame.stream_id, f.UNKNOWN, f"{type(exc).__name__}: {exc}"[:200])

    def serve_unix(self, path: str, stop: threading.Event,
                   ready: threading.Event | None = None) -> None:
        """Accept on ``path`` until ``stop`` is set (checked every 0.2 s); ``ready``
        is set once connections are accepted."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen()
        listener.settimeout(0.2)
        if ready is not None:
            ready.set()
        try:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except socket.timeout:
                    continue
                conn.settimeout(None)
                threading.Thread(target=self.serve_connection, args=(conn,),
                                 daemon=True).start()
        finally:
            listener.close()


def _response(stream_id: int, code: int, message: str, payload: bytes = b"", *,
              details: dict[str, str] | None = None) -> bytes:
    status = pb.Status(code=code, message=message)
    for key, value in (details or {}).items():
        status.details.add(type_url=f.DETAIL_TYPE + key, value=value.encode())
    resp = pb.Response(status=status, payload=payload)
    return f.encode(stream_id, f.RESPONSE, 0, resp.SerializeToString())
