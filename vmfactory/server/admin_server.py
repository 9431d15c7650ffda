"""The admin API served by uvicorn inside the daemon, on the daemon's event loop.

Two listeners, one app: the unix socket (``admin.socket``, mode 0600: only root
connects, and is root), and optionally a loopback TCP port (``admin.tcp``)
where anyone local may read (the status page, ``/metrics``) and only a caller
presenting the token of ``admin.tcp_token_file`` may change anything.  Each
listener marks its requests with the :class:`Caller` they count as.  Bodies
are bounded (MAX_BODY, 413 beyond) and so are connections (MAX_CONNECTIONS, 503
beyond).  The servers start after the gRPC listener and stop before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import uvicorn

from vmfactory.config import AdminConfig
from vmfactory.daemon.callers import Caller
from vmfactory.daemon.core import Daemon
from vmfactory.errors import DaemonError
from vmfactory.server.admin import CALLER_KEY, make_app
from vmfactory.server.listen import claim_socket, read_token
from vmfactory.util.tasks import Supervisor, finish

logger = logging.getLogger(__name__)

ADMIN = Caller(0, 0, 0, frozenset({0}), "admin")
READER = Caller(65534, 65534, 0, frozenset(), "admin-tcp")  # nobody: sees, changes nothing
STARTUP_S = 10.0
# Every body this API takes is a few hundred bytes; anything local may reach the
# TCP port, so nothing bigger is ever buffered.
MAX_BODY = 64 * 1024
MAX_CONNECTIONS = 64  # beyond it uvicorn answers 503 at once
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


class _Embedded(uvicorn.Server):
    """A uvicorn server that leaves the process's signals to the daemon."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _as(app: ASGIApp, caller_of: Callable[[Scope], Caller]) -> ASGIApp:
    """``app`` with each request's scope marked with the caller it counts as."""
    async def marked(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scope[CALLER_KEY] = caller_of(scope)
        await app(scope, receive, send)
    return marked


def _bounded(app: ASGIApp) -> ASGIApp:
    """``app`` fed only bodies of at most MAX_BODY bytes, read before it runs (so
    a token check or validation never waits on a slow or endless body); bigger
    ones get 413 whether they declare their length or not."""
    async def bounded(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > MAX_BODY:
            return await _too_large(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY:
                return await _too_large(send)
            more = message.get("more_body", False)
        body: dict[str, Any] | None = {"type": "http.request", "body": b"".join(chunks),
                                       "more_body": False}

        async def replay() -> Any:
            nonlocal body
            if body is None:
                return await receive()  # only a disconnect can follow
            message, body = body, None
            return message
        return await app(scope, replay, send)
    return bounded


async def _too_large(send: Any) -> None:
    payload = json.dumps({"error": "PayloadTooLarge",
                          "message": f"request bodies are at most {MAX_BODY} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


def _token_caller(token: str) -> Callable[[Scope], Caller]:
    wanted = f"Bearer {token}".encode()

    def caller_of(scope: Scope) -> Caller:
        presented = dict(scope.get("headers", ())).get(b"authorization", b"")
        return ADMIN if token and hmac.compare_digest(presented, wanted) else READER
    return caller_of


class AdminServer:
    """Serve the admin API while the daemon runs; :meth:`stop` is idempotent."""

    def __init__(self, daemon: Daemon, config: AdminConfig) -> None:
        self.daemon = daemon
        self.config = config
        self._servers: list[_Embedded] = []
        self._tasks = Supervisor("admin")

    async def start(self) -> None:
        app = make_app(self.daemon)
        claim_socket(self.config.socket)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(str(self.config.socket))
        os.chmod(self.config.socket, 0o600)
        await self._serve(_as(app, lambda scope: ADMIN), unix)
        if self.config.tcp:
            token = read_token(self.config.tcp_token_file) if self.config.tcp_token_file else ""
            host, _, port = self.config.tcp.rpartition(":")
            tcp = socket.create_server((host.strip("[]"), int(port)), reuse_port=False)
            await self._serve(_as(app, _token_caller(token)), tcp)
        logger.info("admin API on unix:%s%s", self.config.socket,
                    f" and http://{self.config.tcp}" if self.config.tcp else "")

    async def _serve(self, app: ASGIApp, sock: socket.socket) -> None:
        server = _Embedded(uvicorn.Config(_bounded(app), lifespan="off", log_config=None,
                                          access_log=False, timeout_graceful_shutdown=2,
                                          limit_concurrency=MAX_CONNECTIONS))
        self._servers.append(server)
        task = self._tasks.spawn(f"uvicorn-{len(self._servers)}", server.serve, [sock])
        deadline = asyncio.get_running_loop().time() + STARTUP_S
        while not server.started:
            if task is None or task.done() or asyncio.get_running_loop().time() > deadline:
                raise DaemonError(f"the admin API did not start on {sock.getsockname()!r}")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        for server in self._servers:
            server.should_exit = True
        await finish(self._tasks.close_when_done(5.0))
        self._servers.clear()
        self.config.socket.unlink(missing_ok=True)
