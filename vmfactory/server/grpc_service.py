"""The Factory gRPC service: identifies the caller, converts messages and
delegates to the Daemon."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator

import grpc

from vmfactory.daemon.callers import Caller
from vmfactory.daemon.core import Daemon
from vmfactory.daemon.leases import Lease
from vmfactory.daemon.requests import VmRequest
from vmfactory.errors import DeadlineExceeded, PermissionDenied
from vmfactory.proto import factory_pb2 as pb
from vmfactory.proto import factory_pb2_grpc as pb_grpc
from vmfactory.server.peers import PeerGate

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Factory"].full_name
# A request without a deadline waits at most this long for an empty pool.
DEFAULT_WAIT_S = 60.0
TOKEN_KEY = "authorization"


class Callers:
    """Who is behind a call: a connection through the gate, by its peer
    credentials; one on the TCP listener, by the token it presents (the token
    file is root's, so its holder is treated as root)."""

    def __init__(self, gate: PeerGate, token: str = "") -> None:
        self.gate = gate
        self.token = token

    def of(self, context: grpc.aio.ServicerContext) -> Caller:
        peer = context.peer() or ""
        caller = self.gate.caller(peer)
        if caller is not None:
            return caller
        if self.token and peer.startswith(("ipv4:127.", "ipv6:[::1]")):
            presented = dict(context.invocation_metadata() or ()).get(TOKEN_KEY, "")
            if isinstance(presented, str) and hmac.compare_digest(
                    presented.encode(), f"Bearer {self.token}".encode()):
                return Caller(0, 0, 0, frozenset({0}), "tcp")
            raise PermissionDenied("the TCP listener needs the daemon's token")
        raise PermissionDenied("unknown caller: connect through the daemon's socket")


def _handle(lease: Lease, get_ms: float) -> pb.VMHandle:
    vm = lease.vm
    return pb.VMHandle(vm_id=vm.id, lease_id=lease.id, agent_socket=str(vm.agent_socket),
                       cpus=vm.cpus, memory_mib=vm.memory_mib, source=lease.source.value,
                       get_ms=get_ms, pid=vm.pid or 0, lease_ttl_s=lease.ttl_s)


class FactoryService(pb_grpc.FactoryServicer):
    """Thin adapter: every method identifies the caller, converts and calls one
    Daemon method."""

    def __init__(self, daemon: Daemon, callers: Callers, config_toml: str) -> None:
        self.daemon = daemon
        self.callers = callers
        self.config_toml = config_toml

    async def GetVM(self, request: pb.GetVMRequest,
                    context: grpc.aio.ServicerContext) -> pb.VMHandle:
        caller = self.callers.of(context)
        start = time.monotonic()
        remaining = context.time_remaining()
        deadline = start + (DEFAULT_WAIT_S if remaining is None else remaining)
        c = request.config
        lease = await self.daemon.get_vm(
            VmRequest(cpus=c.cpus, memory_mib=c.memory_mib, image=c.image, base=c.base,
                      lease_ttl_s=request.lease_ttl_s, client=request.client,
                      tenant=request.tenant, request_id=request.request_id), deadline, caller)
        if remaining is not None and (context.time_remaining() or 0) <= 0:
            # The caller is gone (its deadline passed as the VM was leased): nobody
            # would ever learn the lease id, so the lease ends here.
            await self.daemon.release(lease.id, caller)
            raise DeadlineExceeded("the deadline passed while the VM was handed out")
        # If the reply never reaches the caller (it gave up as it was sent), the
        # lease has no holder: it ends when the call ends cancelled.
        context.add_done_callback(lambda done: done.cancelled() and self.daemon.abandon(lease))
        return _handle(lease, (time.monotonic() - start) * 1000)

    async def ReleaseVM(self, request: pb.ReleaseVMRequest,
                        context: grpc.aio.ServicerContext) -> pb.ReleaseVMReply:
        caller = self.callers.of(context)
        if request.request_id and not request.lease_id:
            await self.daemon.withdraw(request.request_id, caller)
        else:
            await self.daemon.release(request.lease_id, caller)
        return pb.ReleaseVMReply()

    async def RenewLease(self, request: pb.RenewLeaseRequest,
                         context: grpc.aio.ServicerContext) -> pb.RenewLeaseReply:
        await self.daemon.renew(request.lease_id, request.ttl_s, self.callers.of(context))
        return pb.RenewLeaseReply()

    async def Status(self, request: pb.StatusRequest,
                     context: grpc.aio.ServicerContext) -> pb.StatusReply:
        s = self.daemon.status(self.callers.of(context))
        return pb.StatusReply(pid=s["pid"], uptime_s=s["uptime_s"], version=s["version"],
                              recovered=s["recovered"], recovery_s=s["recovery_s"],
                              pools=[pb.PoolStatus(**p) for p in s["pools"]],
                              vms=[pb.VMStatus(**v) for v in s["vms"]])

    async def Config(self, request: pb.ConfigRequest,
                     context: grpc.aio.ServicerContext) -> pb.ConfigReply:
        self.callers.of(context)
        return pb.ConfigReply(toml=self.config_toml)

    async def Watch(self, request: pb.WatchRequest,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PoolEvent]:
        self.callers.of(context)
        async for e in self.daemon.events.watch():
            yield pb.PoolEvent(time=e.time, pool=e.pool, kind=e.kind.value, vm_id=e.vm_id,
                               detail=e.detail)

    async def Quit(self, request: pb.QuitRequest,
                   context: grpc.aio.ServicerContext) -> pb.QuitReply:
        self.daemon.quit(self.callers.of(context))
        return pb.QuitReply()

    async def AttachDisk(self, request: pb.AttachDiskRequest,
                         context: grpc.aio.ServicerContext) -> pb.AttachDiskReply:
        device = await self.daemon.attach_disk(request.lease_id, request.path, request.serial,
                                               request.writable, self.callers.of(context))
        return pb.AttachDiskReply(device_id=device)

    async def DetachDisk(self, request: pb.DetachDiskRequest,
                         context: grpc.aio.ServicerContext) -> pb.DetachDiskReply:
        await self.daemon.detach_disk(request.lease_id, request.serial,
                                      self.callers.of(context))
        return pb.DetachDiskReply()
