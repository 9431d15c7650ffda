"""Async client of the guest agent (vmfactory.agent.v1.Agent).

Every call has a deadline; gRPC failures become :class:`AgentError` naming the
call, so callers above never see grpc types.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from vmfactory.errors import AgentError
from vmfactory.proto import agent_pb2 as pb
from vmfactory.proto import agent_pb2_grpc as pb_grpc

T = TypeVar("T")

# Reconnect quickly: the agent channel is a local socket, and a VM's agent comes
# up (or a clone resumes) within seconds.  Not grpc.min_reconnect_backoff_ms: grpc
# also uses it as the connect timeout, and a first handshake with a TCG guest
# takes hundreds of milliseconds.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.enable_retries", 0),
]

RETRYABLE_ON_CONNECT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN,
                                  grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED})
CONNECT_RETRY_S = 0.02


class AgentClient:
    """Talks to one VM's agent at ``address`` (``unix:/path``)."""

    def __init__(self, address: str, call_timeout: float) -> None:
        self.address = address
        self.call_timeout = call_timeout
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.AgentStub(self._channel)
        self.containers = pb_grpc.ContainersStub(self._channel)

    async def call(self, name: str, fn: Callable[..., Awaitable[T]], request: object,
                   timeout: float | None = None) -> T:
        """Any RPC on this channel (e.g. on :attr:`containers`), errors as AgentError."""
        return await self._call(name, fn, request, timeout)

    async def _call(self, name: str, fn: Callable[..., Awaitable[T]], request: object,
                    timeout: float | None = None, wait: bool = False) -> T:
        try:
            return await fn(request, timeout=timeout or self.call_timeout, wait_for_ready=wait)
        except grpc.aio.AioRpcError as exc:
            raise AgentError(name, f"{exc.code().name}: {exc.details()}") from exc
        except grpc.aio.UsageError as exc:
            raise AgentError(name, "client is closed") from exc

    async def wait_ready(self, timeout: float) -> float:
        """Ping until the agent answers or ``timeout`` passes; return seconds waited.

        Call this first on every new client.  A connection made right after
        another host client left can fail once while the guest side tells the
        two sessions apart; the next attempt starts a clean session.
        """
        start = time.monotonic()
        deadline = start + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentError("wait-ready", f"no answer within {timeout:g} s")
            token = int.from_bytes(os.urandom(8), "little")
            try:
                reply = await self._stub.Ping(pb.PingRequest(token=token), timeout=remaining,
                                              wait_for_ready=True)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE_ON_CONNECT:
                    raise AgentError("wait-ready", f"{exc.code().name}: {exc.details()}") from exc
                await asyncio.sleep(CONNECT_RETRY_S)
                continue
            if reply.token != token:
                raise AgentError("wait-ready", "ping answered with the wrong token")
            return time.monotonic() - start

    async def ping(self) -> pb.PingReply:
        token = int.from_bytes(os.urandom(8), "little")
        reply = await self._call("ping", self._stub.Ping, pb.PingRequest(token=token))
        if reply.token != token:
            raise AgentError("ping", "answered with the wrong token")
        return reply

    async def info(self, random_bytes: int = 16) -> pb.GuestInfo:
        return await self._call("info", self._stub.GetInfo,
                                pb.GetInfoRequest(random_bytes=random_bytes))

    async def set_time(self, unix_ns: int | None = None) -> pb.SetTimeReply:
        """Set the guest clock to ``unix_ns`` (default: the host's clock now)."""
        request = pb.SetTimeRequest(time_unix_ns=unix_ns or time.time_ns())
        return await self._call("set-time", self._stub.SetTime, request)

    async def reseed(self, entropy: bytes | None = None) -> pb.ReseedReply:
        """Mix host entropy (default: 64 bytes from os.urandom) into the guest RNG."""
        data = entropy if entropy is not None else os.urandom(64)
        request = pb.ReseedRequest(entropy=data, credit_bits=8 * len(data))
        return await self._call("reseed", self._stub.Reseed, request)

    async def online_resources(self) -> pb.OnlineResourcesReply:
        """Online hot-plugged CPUs and memory in the guest; report the totals."""
        return await self._call("online-resources", self._stub.OnlineResources,
                                pb.OnlineResourcesRequest())

    async def close(self) -> None:
        await self._channel.close()
