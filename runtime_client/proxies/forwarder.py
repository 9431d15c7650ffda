"""A gRPC forwarder to a VM's guest agent: Kata's ``kataProxy`` / ``kataProxyBuiltin``.

A VM's agent is reachable from the host through one unix socket (a QEMU
virtio-serial chardev) that accepts ONE connection at a time.  :class:`AgentProxy`
owns that connection and serves any number of host clients on its own socket,
forwarding every call, whatever its service and method, as raw bytes.  Embedded in
a client process it is the builtin proxy; ``runtime_client.proxies.process`` runs
it as a standalone process that outlives the process that started it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import grpc

from runtime_client.errors import ProxyError
from runtime_client.proxies.sockets import prepare_socket_path
from vmfactory.agent.client import CHANNEL_OPTIONS, ended_during_write

logger = logging.getLogger(__name__)

# Transport-level headers the gRPC stack sets itself; passing them on as call
# metadata is rejected or would lie about the proxy's own connection.
_RESERVED_METADATA = frozenset({"user-agent", "content-type", "te", "host", "authority"})

Metadata = tuple[tuple[str, str | bytes], ...]


def _forwardable(metadata: Sequence[tuple[str, str | bytes]] | None) -> Metadata:
    """``metadata`` minus pseudo-headers and keys reserved to the gRPC transport."""
    return tuple((key, value) for key, value in (metadata or ())
                 if not key.startswith((":", "grpc-")) and key not in _RESERVED_METADATA)


class _ForwardEverything(grpc.GenericRpcHandler):
    """Answers every method with one bidi handler working on raw bytes: on the wire a
    unary call is a stream of one message, so it serves all four call kinds."""

    def __init__(self, forward: Callable[[str, AsyncIterator[bytes],
                                          grpc.aio.ServicerContext], Awaitable[None]]) -> None:
        self._forward = forward

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method

        async def behavior(requests: AsyncIterator[bytes],
                           context: grpc.aio.ServicerContext) -> None:
            await self._forward(method, requests, context)

        return grpc.stream_stream_rpc_method_handler(behavior)


class AgentProxy:
    """Serves ``listen`` (a unix socket path) and forwards every gRPC call, whatever its
    service and method, over ONE channel to ``upstream`` (e.g. "unix:/run/.../agent.sock").

    A call waits for the upstream connection for at most its own deadline, or
    ``connect_timeout`` seconds if it has none (then it fails with UNAVAILABLE).
    """

    def __init__(self, upstream: str, listen: Path, *, connect_timeout: float = 10.0) -> None:
        self.upstream = upstream
        self.listen = Path(listen)
        self.connect_timeout = connect_timeout
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self._started = False
        self._stopped = False
        self._calls = 0

    @property
    def address(self) -> str:
        """The gRPC target clients use to reach the proxy: ``unix:<listen>``."""
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
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_ForwardEverything(self._forward),))
        try:
            if server.add_insecure_port(self.address) == 0:
                raise RuntimeError(f"failed to bind to {self.address}")
            # grpc binds in add_insecure_port; restrict the socket before serving.
            os.chmod(self.listen, 0o600)
            await server.start()
        except (RuntimeError, OSError) as exc:
            await server.stop(None)
            self.listen.unlink(missing_ok=True)
            raise ProxyError(f"cannot serve {self.listen}: {exc}") from exc
        self._server = server
        self._channel = grpc.aio.insecure_channel(self.upstream, options=CHANNEL_OPTIONS)
        # Start the handshake now so the first call does not pay for it.
        self._channel.get_state(try_to_connect=True)
        logger.info("proxy serving %s for %s", self.listen, self.upstream)

    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving (calls in flight get ``grace`` seconds), close the upstream
        channel and remove the socket file.  Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        server, self._server = self._server, None
        channel, self._channel = self._channel, None
        try:
            if server is not None:
                await server.stop(grace)
        finally:
            if channel is not None:
                await channel.close()
            if server is not None:
                self.listen.unlink(missing_ok=True)
                logger.info("proxy on %s stopped after %d calls", self.listen, self._calls)

    async def _forward(self, method: str, requests: AsyncIterator[bytes],
                       context: grpc.aio.ServicerContext) -> None:
        """Relay one call of any kind to the upstream and its outcome back."""
        self._calls += 1
        channel = self._channel
        if channel is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "proxy is stopping")
            return
        await self._await_upstream(channel, context, context.time_remaining())
        call = channel.stream_stream(method)(
            timeout=context.time_remaining(), metadata=_forwardable(context.invocation_metadata()),
            wait_for_ready=True)
        # Requests and responses flow at the same time: stdin/stdout relays need both.
        pump = asyncio.create_task(_pump_requests(method, requests, call))
        try:
            await _relay_responses(call, context)
        except grpc.aio.AioRpcError as exc:
            if ended_during_write(exc):
                # Every response was relayed and the upstream ended OK; grpc only
                # misreported it because our request write raced with that end.
                logger.debug("%s: upstream ended as a request was written", method)
                return
            logger.debug("%s: upstream ended with %s", method, exc.code().name)
            await context.abort(exc.code(), exc.details() or "",
                                _forwardable(exc.trailing_metadata()))
        finally:
            # A no-op when the call is done; otherwise the caller went away.
            call.cancel()
            pump.cancel()
            await asyncio.wait([pump])

    async def _await_upstream(self, channel: grpc.aio.Channel,
                              context: grpc.aio.ServicerContext, timeout: float | None) -> None:
        """Wait until the upstream connection is up, within the call's time."""
        if channel.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY:
            return
        limit = self.connect_timeout if timeout is None else min(timeout, self.connect_timeout)
        try:
            await asyncio.wait_for(channel.channel_ready(), limit)
        except TimeoutError:
            code = grpc.StatusCode.UNAVAILABLE
            if timeout is not None and timeout <= self.connect_timeout:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            logger.warning("upstream %s not reachable within %.3g s", self.upstream, limit)
            await context.abort(code, f"upstream {self.upstream} not reachable "
                                      f"within {limit:.3g} s")


async def _pump_requests(method: str, requests: AsyncIterator[bytes],
                         call: grpc.aio.StreamStreamCall) -> None:
    """Copy the caller's request stream to the upstream call, then half-close it."""
    try:
        async for message in requests:
            await call.write(message)
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
        # The upstream call ended first; its status reaches the caller on the
        # response side.
        logger.debug("%s: upstream finished before the caller's requests", method)
    except Exception:
        logger.warning("%s: relaying requests failed", method, exc_info=True)
        call.cancel()


async def _relay_responses(call: grpc.aio.StreamStreamCall,
                           context: grpc.aio.ServicerContext) -> None:
    """Copy the upstream's metadata and responses to the caller; raises the
    upstream's error status as AioRpcError."""
    initial = _forwardable(await call.initial_metadata())
    if initial:
        await context.send_initial_metadata(initial)
    async for message in call:
        await context.write(message)
    trailing = _forwardable(await call.trailing_metadata())
    if trailing:
        context.set_trailing_metadata(trailing)
