"""The agent's ttrpc server: its two services, and the edge where a guest error
becomes a status (the table is ``errors.WIRE``; the class name and errno travel
as status details, so the host raises the same class again)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

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
    """``servicer`` with every RPC method's errors translated at this edge."""

    def __init__(self, servicer: object) -> None:
        self._servicer = servicer

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._servicer, name)
        if inspect.isasyncgenfunction(method):
            async def streaming(*args: Any) -> AsyncIterator[Any]:
                with _translated():
                    async for item in method(*args):
                        yield item
            return streaming

        async def unary(*args: Any) -> Any:
            with _translated():
                return await method(*args)
        return unary


def build_server(agent: object, containers: object | None) -> aio.Server:
    """A ttrpc server for the Agent servicer (and the Containers one, if given)."""
    server = aio.Server()
    add_service(server, AGENT, _Translating(agent))
    if containers is not None:
        add_service(server, CONTAINERS, _Translating(containers))
    return server
