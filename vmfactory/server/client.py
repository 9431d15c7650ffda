"""Async client of the daemon's Factory service, beside the server it talks to.

Errors come back as the vmfactory classes the daemon raised (the server's
table in ``server.errors``, inverted); no daemon on the socket is
:class:`DaemonUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from vmfactory.errors import DeadlineExceeded, VmFactoryError
from vmfactory.proto import factory_pb2 as pb
from vmfactory.proto import factory_pb2_grpc as pb_grpc
from vmfactory.server.errors import error_from_rpc
from vmfactory.util.tasks import Supervisor

logger = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/vmfactory/factory.sock"
WITHDRAW_TIMEOUT_S = 5.0


class FactoryClient:
    """One channel to the daemon; methods raise vmfactory errors."""

    def __init__(self, socket: str | Path = DEFAULT_SOCKET, timeout: float = 60.0, *,
                 tcp: str = "", token: str = "") -> None:
        """Talk to the daemon on its unix ``socket``, or on its loopback ``tcp``
        listener (``HOST:PORT``) presenting ``token`` (the daemon's token file)."""
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if tcp else ()
        self._channel = grpc.aio.insecure_channel(tcp or f"unix:{socket}")
        self._stub = pb_grpc.FactoryStub(self._channel)
        self._tasks = Supervisor("factory-client")

    async def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(request, timeout=timeout or self.timeout,
                                metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc

    async def get_vm(self, cpus: int = 0, memory_mib: int = 0, *, base: str = "",
                     image: str = "", lease_ttl_s: float = 0.0, client: str = "",
                     tenant: str = "", timeout: float | None = None) -> pb.VMHandle:
        """A leased, ready VM; ``timeout`` is also how long an empty pool may make us wait.

        A call that gives up (its deadline, or the caller cancelled it) withdraws its
        request in the background: a VM leased as the reply was lost goes back."""
        request = pb.GetVMRequest(
            config=pb.VMConfig(cpus=cpus, memory_mib=memory_mib, base=base, image=image),
            lease_ttl_s=lease_ttl_s, client=client, tenant=tenant,
            request_id=secrets.token_hex(8))
        try:
            return await self._call(self._stub.GetVM, request, timeout)
        except (asyncio.CancelledError, DeadlineExceeded):
            self._tasks.spawn(f"withdraw-{request.request_id}", self._withdraw,
                              request.request_id)
            raise

    async def _withdraw(self, request_id: str) -> None:
        try:
            await self._call(self._stub.ReleaseVM, pb.ReleaseVMRequest(request_id=request_id),
                             WITHDRAW_TIMEOUT_S)
        except VmFactoryError as exc:  # the daemon's TTL (if any) ends the lease then
            logger.warning("withdrawing GetVM %s: %s", request_id, exc)

    async def release(self, lease_id: str) -> None:
        await self._call(self._stub.ReleaseVM, pb.ReleaseVMRequest(lease_id=lease_id))

    async def renew(self, lease_id: str, ttl_s: float) -> None:
        """The lease now ends ``ttl_s`` from now."""
        await self._call(self._stub.RenewLease, pb.RenewLeaseRequest(lease_id=lease_id,
                                                                     ttl_s=ttl_s))

    async def attach_disk(self, lease_id: str, path: Path, serial: str, *,
                          writable: bool = False) -> str:
        """Hot-plug a disk image into the leased VM (read-only unless ``writable``)."""
        request = pb.AttachDiskRequest(lease_id=lease_id, path=str(path), serial=serial,
                                       writable=writable)
        return (await self._call(self._stub.AttachDisk, request)).device_id

    async def detach_disk(self, lease_id: str, serial: str) -> None:
        await self._call(self._stub.DetachDisk,
                         pb.DetachDiskRequest(lease_id=lease_id, serial=serial))

    async def status(self) -> pb.StatusReply:
        return await self._call(self._stub.Status, pb.StatusRequest())

    async def config(self) -> str:
        return (await self._call(self._stub.Config, pb.ConfigRequest())).toml

    async def quit(self) -> None:
        await self._call(self._stub.Quit, pb.QuitRequest())

    async def watch(self) -> AsyncIterator[pb.PoolEvent]:
        call = self._stub.Watch(pb.WatchRequest(), metadata=self._metadata)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc

    async def close(self) -> None:
        """Wait for withdrawals still on their way, then close the channel."""
        await self._tasks.close_when_done(WITHDRAW_TIMEOUT_S)
        await self._channel.close()

    async def __aenter__(self) -> FactoryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
