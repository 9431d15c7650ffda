"""The agent's ttrpc server: its two services, and the edge where a guest error
becomes a status (the table is ``errors.WIRE``; the class name and errno travel
as status details, so the host raises the same class again).  Every call first
lets the guest clock follow the host time it carries (see ``clock``)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from vmfactory.guest.agent.clock import ClockFollower
from vmfactory.guest.agent.errors import GuestError, status_of, trailers
from vmfactory.proto import agent_pb2 as pb
from vmfactory.ttrpc import aio
from vmfactory.ttrpc import frames as f
from vmfactory.ttrpc.frames import RpcError
from vmfactory.ttrpc.services import add_service

CODES = {name: number for number, name in f.CODE_NAMES.items()}
AGENT = pb.DESCRIPTOR.services_by_name["Agent"]
CONTAINERS = pb.DESCRIPTOR.services_by_name["Containers"]


def to_rpc(exc: GuestError) -> RpcError:
    """The status the agent answers ``exc`` with."""
    return RpcError(CODES[status_of(exc)], str(exc), dict(trailers(exc)))


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except GuestError as exc:
        raise to_rpc(exc) from exc
    except OSError as exc:
        raise RpcError(f.INTERNAL, str(exc)[:200]) from exc


class _Translating:
    """``servicer`` with every RPC method's errors translated at this edge, and
    ``clock`` following each call's host time before the method runs."""

    def __init__(self, servicer: object, clock: ClockFollower | None) -> None:
        self._servicer = servicer
        self._clock = clock

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._servicer, name)
        clock = self._clock
        if inspect.isasyncgenfunction(method):
            async def streaming(requests: Any, ctx: aio.CallContext) -> AsyncIterator[Any]:
                if clock is not None:
                    clock.follow(ctx.metadata)
                with _translated():
                    async for item in method(requests, ctx):
                        yield item
            return streaming

        async def unary(request: Any, ctx: aio.CallContext) -> Any:
            if clock is not None:
                clock.follow(ctx.metadata)
            with _translated():
                return await method(request, ctx)
        return unary


def build_server(agent: object, containers: object | None,
                 clock: ClockFollower | None = None) -> aio.Server:
    """A ttrpc server for the Agent servicer (and the Containers one, if given)."""
    server = aio.Server()
    add_service(server, AGENT, _Translating(agent, clock))
    if containers is not None:
        add_service(server, CONTAINERS, _Translating(containers, clock))
    return server
