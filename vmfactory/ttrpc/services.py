"""Protobuf services over ttrpc: serve a servicer object, call through a stub.

A service is its protobuf ``ServiceDescriptor``; on the wire a method is
("<package>.<Service>", "<Method>"), as containerd's ttrpc names them.  A
servicer has one async method per RPC, named as in the .proto:

* unary: ``async def Ping(self, request, context) -> reply``;
* streaming (ttrpc 1.2 streams): ``def IoStream(self, requests, context)``, an
  async generator over the async iterator ``requests``.

A handler refuses a call by raising :class:`~vmfactory.ttrpc.RpcError`; a
request that does not decode is answered INVALID_ARGUMENT before it runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from vmfactory.ttrpc import aio
from vmfactory.ttrpc import frames as f
from vmfactory.ttrpc.frames import RpcError


def _decode(cls: type[Message], data: bytes, what: str) -> Any:
    try:
        return cls.FromString(data)
    except DecodeError:
        raise RpcError(f.INVALID_ARGUMENT, f"undecodable {what}") from None


def add_service(server: aio.Server, service: ServiceDescriptor, servicer: object, *,
                partial: bool = False) -> None:
    """Register every method of ``service`` with ``servicer``'s method of that name
    (``partial``: methods it lacks are not served, their calls are UNIMPLEMENTED)."""
    for method in service.methods:
        if partial and not hasattr(servicer, method.name):
            continue
        handler = getattr(servicer, method.name)
        if method.client_streaming or method.server_streaming:
            server.register(service.full_name, method.name, _streaming(method, handler),
                            streaming=True)
        else:
            server.register(service.full_name, method.name, _unary(method, handler))


def _unary(method: MethodDescriptor, handler: Callable[..., Any]) -> aio.Unary:
    request_cls = GetMessageClass(method.input_type)

    async def unary(payload: bytes, ctx: aio.CallContext) -> bytes:
        reply = await handler(_decode(request_cls, payload, method.input_type.name), ctx)
        return reply.SerializeToString()
    return unary


def _streaming(method: MethodDescriptor, handler: Callable[..., Any]) -> aio.Streaming:
    request_cls = GetMessageClass(method.input_type)

    async def streaming(stream: aio.ServerStream, ctx: aio.CallContext) -> bytes:
        async def requests() -> AsyncIterator[Any]:
            while (data := await stream.recv()) is not None:
                yield _decode(request_cls, data, method.input_type.name)
        async for reply in handler(requests(), ctx):
            await stream.send(reply.SerializeToString())
        return b""
    return streaming


@dataclass(frozen=True)
class Method:
    """One RPC as a client calls it."""

    service: str
    name: str
    reply: type[Message]


def methods(service: ServiceDescriptor) -> dict[str, Method]:
    """Every method of ``service`` by name."""
    return {m.name: Method(service.full_name, m.name, GetMessageClass(m.output_type))
            for m in service.methods}
