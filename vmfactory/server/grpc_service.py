"""The Factory gRPC service: converts messages and delegates to the Daemon."""

from __future__ import annotations

import grp
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vmfactory.daemon.core import Daemon, VmRequest
from vmfactory.errors import DaemonError
from vmfactory.daemon.leases import Lease
from vmfactory.proto import factory_pb2 as pb
from vmfactory.proto import factory_pb2_grpc as pb_grpc
from vmfactory.server.errors import ErrorInterceptor
from vmfactory.util.sockets import socket_accepts

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Factory"].full_name
# A request without a deadline waits at most this long for an empty pool.
DEFAULT_WAIT_S = 60.0


def _handle(lease: Lease, get_ms: float) -> pb.VMHandle:
    vm = lease.vm
    return pb.VMHandle(vm_id=vm.id, lease_id=lease.id, agent_socket=str(vm.agent_socket),
                       qmp_socket=str(vm.run_dir / "qmp.sock"), cpus=vm.cpus,
                       memory_mib=vm.memory_mib, source=lease.source.value, get_ms=get_ms,
                       pid=vm.pid or 0)


class FactoryService(pb_grpc.FactoryServicer):
    """Thin adapter: every method converts and calls one Daemon method."""

    def __init__(self, daemon: Daemon, config_toml: str) -> None:
        self.daemon = daemon
        self.config_toml = config_toml

    async def GetVM(self, request: pb.GetVMRequest, context: grpc.aio.ServicerContext) -> pb.VMHandle:
        start = time.monotonic()
        remaining = context.time_remaining()
        deadline = start + (DEFAULT_WAIT_S if remaining is None else remaining)
        c = request.config
        lease = await self.daemon.get_vm(
            VmRequest(cpus=c.cpus, memory_mib=c.memory_mib, image=c.image, base=c.base,
                      lease_ttl_s=request.lease_ttl_s, client=request.client), deadline)
        return _handle(lease, (time.monotonic() - start) * 1000)

    async def ReleaseVM(self, request: pb.ReleaseVMRequest,
                        context: grpc.aio.ServicerContext) -> pb.ReleaseVMReply:
        await self.daemon.release(request.lease_id)
        return pb.ReleaseVMReply()

    async def Status(self, request: pb.StatusRequest,
                     context: grpc.aio.ServicerContext) -> pb.StatusReply:
        s = self.daemon.status()
        return pb.StatusReply(pid=s["pid"], uptime_s=s["uptime_s"], version=s["version"],
                              recovered=s["recovered"], recovery_s=s["recovery_s"],
                              pools=[pb.PoolStatus(**p) for p in s["pools"]],
                              vms=[pb.VMStatus(**v) for v in s["vms"]])

    async def Config(self, request: pb.ConfigRequest,
                     context: grpc.aio.ServicerContext) -> pb.ConfigReply:
        return pb.ConfigReply(toml=self.config_toml)

    async def Watch(self, request: pb.WatchRequest,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PoolEvent]:
        async for e in self.daemon.events.watch():
            yield pb.PoolEvent(time=e.time, pool=e.pool, kind=e.kind.value, vm_id=e.vm_id,
                               detail=e.detail)

    async def Quit(self, request: pb.QuitRequest, context: grpc.aio.ServicerContext) -> pb.QuitReply:
        self.daemon.request_stop()
        return pb.QuitReply()

    async def AttachDisk(self, request: pb.AttachDiskRequest,
                         context: grpc.aio.ServicerContext) -> pb.AttachDiskReply:
        device = await self.daemon.attach_disk(request.lease_id, request.path, request.serial,
                                               request.read_only)
        return pb.AttachDiskReply(device_id=device)

    async def DetachDisk(self, request: pb.DetachDiskRequest,
                         context: grpc.aio.ServicerContext) -> pb.DetachDiskReply:
        await self.daemon.detach_disk(request.lease_id, request.serial)
        return pb.DetachDiskReply()


def claim_socket(path: Path) -> None:
    """Refuse a socket another daemon answers on; remove a stale one (a killed
    daemon's)."""
    if not path.exists() and not path.is_symlink():
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        return
    if socket_accepts(path):
        raise DaemonError(f"another daemon is serving on {path}")
    logger.info("removing stale socket %s", path)
    path.unlink()


def secure_socket(path: Path, mode: str, group: str) -> None:
    os.chmod(path, int(mode, 8))
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise DaemonError(f"daemon.socket_group: no group {group!r}") from None
        os.chown(path, -1, gid)


async def start_server(daemon: Daemon, config_toml: str) -> grpc.aio.Server:
    """Serve the Factory API (+ health, reflection) on the configured endpoints."""
    cfg = daemon.config.daemon
    claim_socket(cfg.socket)
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    pb_grpc.add_FactoryServicer_to_server(FactoryService(daemon, config_toml), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    server.add_insecure_port(f"unix:{cfg.socket}")
    if cfg.tcp:
        if server.add_insecure_port(cfg.tcp) == 0:
            raise DaemonError(f"daemon.tcp: cannot listen on {cfg.tcp}")
    await server.start()
    secure_socket(cfg.socket, cfg.socket_mode, cfg.socket_group)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    logger.info("serving on unix:%s%s", cfg.socket, f" and {cfg.tcp}" if cfg.tcp else "")
    return server
