"""The Agent service: thin handlers over the platform.

Its refusals are plain statuses (no error class travels with them): the host
sees an AgentError whose code says INVALID_ARGUMENT or INTERNAL."""

from __future__ import annotations

import logging
import os
import platform as _platform

from vmfactory import __version__
from vmfactory.guest.agent.platform import (
    Platform, cpus_online, read_boot_id, read_entropy_avail, read_meminfo, read_uptime,
)
from vmfactory.proto import agent_pb2 as pb
from vmfactory.ttrpc import frames as f
from vmfactory.ttrpc.aio import CallContext
from vmfactory.ttrpc.frames import RpcError

logger = logging.getLogger(__name__)

MAX_RANDOM_BYTES = 256
MIN_ENTROPY_BYTES = 16
MAX_ENTROPY_BYTES = 512


class AgentService:
    """Implements vmfactory.agent.v1.Agent."""

    def __init__(self, platform: Platform, boot: pb.BootTimings) -> None:
        self._platform = platform
        self._boot = boot

    async def Ping(self, request: pb.PingRequest, context: CallContext) -> pb.PingReply:
        return pb.PingReply(token=request.token, agent_version=__version__)

    async def GetInfo(self, request: pb.GetInfoRequest, context: CallContext) -> pb.GuestInfo:
        if request.random_bytes > MAX_RANDOM_BYTES:
            raise RpcError(f.INVALID_ARGUMENT, f"random_bytes must be at most {MAX_RANDOM_BYTES}")
        mem = read_meminfo()
        return pb.GuestInfo(
            kernel_release=_platform.release(),
            uptime_s=read_uptime(),
            mem_total_kib=mem.get("MemTotal", 0),
            mem_available_kib=mem.get("MemAvailable", 0),
            random=os.urandom(request.random_bytes),
            boot_id=read_boot_id(),
            time_unix_ns=self._platform.now_ns(),
            cpus_online=cpus_online(),
            boot=self._boot,
            agent_version=__version__,
            platform=self._platform.name,
            entropy_avail=read_entropy_avail(),
        )

    async def SetTime(self, request: pb.SetTimeRequest, context: CallContext) -> pb.SetTimeReply:
        if request.time_unix_ns <= 0:
            raise RpcError(f.INVALID_ARGUMENT, "time_unix_ns must be positive")
        try:
            self._platform.set_time(request.time_unix_ns)
        except OSError as exc:
            raise RpcError(f.INTERNAL, f"clock_settime failed: {exc}") from exc
        return pb.SetTimeReply(skew_ns=self._platform.now_ns() - request.time_unix_ns)

    async def Reseed(self, request: pb.ReseedRequest, context: CallContext) -> pb.ReseedReply:
        n = len(request.entropy)
        if not MIN_ENTROPY_BYTES <= n <= MAX_ENTROPY_BYTES:
            raise RpcError(
                f.INVALID_ARGUMENT, f"entropy must be {MIN_ENTROPY_BYTES}-{MAX_ENTROPY_BYTES} bytes, got {n}")
        if request.credit_bits > 8 * n:
            raise RpcError(f.INVALID_ARGUMENT, "credit_bits exceeds 8 bits per entropy byte")
        try:
            result = self._platform.reseed(request.entropy, request.credit_bits)
        except OSError as exc:
            raise RpcError(f.INTERNAL, f"RNG ioctl failed: {exc}") from exc
        logger.info("reseeded RNG with %d host bytes", n)
        return pb.ReseedReply(added=result.added, reseeded=result.reseeded,
                              entropy_avail=result.entropy_avail)

    async def OnlineResources(self, request: pb.OnlineResourcesRequest,
                              context: CallContext) -> pb.OnlineResourcesReply:
        cpus, blocks = self._platform.online_resources()
        if cpus or blocks:
            logger.info("onlined %d CPUs and %d memory blocks", cpus, blocks)
        return pb.OnlineResourcesReply(cpus_online=cpus_online(),
                                       mem_total_kib=read_meminfo().get("MemTotal", 0),
                                       cpus_onlined=cpus, memory_blocks_onlined=blocks)
