"""Async client of the guest agent's API (services ``Agent`` and ``Containers``).

The one host-side client of the agent: the hypervisor plugins, the factory's
warm-up and the runtime client all use it.  Every call has a deadline; a
refusal comes back as the agent's own error class (the table of
``vmfactory.guest.agent.errors``, inverted), and an agent that did not answer
as an :class:`AgentError` naming the call and the status, so callers above
never see grpc types.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from vmfactory.errors import AgentError
from vmfactory.guest.agent.errors import from_status
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


@dataclass(frozen=True)
class ProcessRequest:
    """A process to run in a container: what an OCI bundle's ``process`` says."""

    args: tuple[str, ...]
    env: tuple[str, ...] = ()
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    terminal: bool = False
    stdio: bool = True
    rows: int = 0
    cols: int = 0
    rlimits: tuple[tuple[str, int, int], ...] = ()  # (RLIMIT_..., soft, hard)
    capabilities: Mapping[str, Sequence[str]] | None = None  # None: every capability
    no_new_privileges: bool = False
    oom_score_adj: int | None = None

    def message(self) -> pb.Process:
        msg = pb.Process(args=self.args, env=self.env, cwd=self.cwd,
                         user=pb.User(uid=self.uid, gid=self.gid, additional_gids=self.groups),
                         terminal=self.terminal, stdio=self.stdio, rows=self.rows,
                         cols=self.cols, no_new_privileges=self.no_new_privileges,
                         rlimits=[pb.Rlimit(type=t, soft=s, hard=h) for t, s, h in self.rlimits])
        if self.capabilities is not None:
            msg.capabilities.CopyFrom(pb.Capabilities(**{k: list(v) for k, v in
                                                         self.capabilities.items()}))
        if self.oom_score_adj is not None:
            msg.oom_score_adj = self.oom_score_adj
        return msg


@dataclass(frozen=True)
class MountRequest:
    """One mount the guest makes for a container (see agent.proto's Mount)."""

    type: str
    destination: str
    options: tuple[str, ...] = ()
    data: bytes = b""
    mode: int = 0
    disk_serial: str = ""


@dataclass(frozen=True)
class ContainerSetup:
    """An OCI bundle's confinement; ``mounts`` None: the guest's default mounts."""

    mounts: tuple[MountRequest, ...] | None = None
    masked_paths: tuple[str, ...] = ()
    readonly_paths: tuple[str, ...] = ()
    sysctl: tuple[tuple[str, str], ...] = ()
    resources: tuple[int, int, int, int] | None = None  # memory, cpu quota, period, pids

    def fill(self, request: pb.CreateContainerRequest) -> None:
        if self.mounts is not None:
            request.oci_mounts = True
            request.mounts.extend(pb.Mount(type=m.type, destination=m.destination,
                                           options=m.options, data=m.data, mode=m.mode,
                                           disk_serial=m.disk_serial) for m in self.mounts)
        request.masked_paths.extend(self.masked_paths)
        request.readonly_paths.extend(self.readonly_paths)
        request.sysctl.update(dict(self.sysctl))
        if self.resources is not None:
            memory, quota, period, pids = self.resources
            request.resources.CopyFrom(pb.Resources(memory_limit=memory, cpu_quota=quota,
                                                    cpu_period=period, pids_limit=pids))


def ended_during_write(exc: grpc.aio.AioRpcError) -> bool:
    """Whether ``exc`` is grpc aio's report of a request write that raced with the
    normal end of a bidirectional call (e.g. stdin sent as the process exited):
    grpc then overwrites the server's OK with INTERNAL (grpc/grpc#36066).  It is
    raised only after the response stream reached its end: no response is lost."""
    return (exc.code() == grpc.StatusCode.INTERNAL
            and "SendMessageOperation" in (exc.debug_error_string() or ""))


def agent_error(call: str, exc: grpc.aio.AioRpcError) -> AgentError:
    """The error for a failed call: the agent's own class, or the status."""
    metadata = {k: v for k, v in (exc.trailing_metadata() or ()) if isinstance(v, str)}
    return from_status(call, exc.code().name, exc.details() or "", metadata)


class AgentClient:
    """Talks to one VM's agent at ``address`` (``unix:/path``: the VM's agent
    socket, or a proxy's).  ``wait_for_ready``: a call waits (within its
    deadline) for the channel to connect instead of failing at once."""

    def __init__(self, address: str, call_timeout: float, *,
                 wait_for_ready: bool = False) -> None:
        self.address = address
        self.call_timeout = call_timeout
        self._wait = wait_for_ready
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._agent = pb_grpc.AgentStub(self._channel)
        self._containers = pb_grpc.ContainersStub(self._channel)

    async def _call(self, name: str, fn: Callable[..., Awaitable[T]], request: object,
                    timeout: float | None = None) -> T:
        """One RPC; ``timeout`` None is the call timeout, ``math.inf`` no deadline."""
        deadline = timeout or self.call_timeout
        try:
            return await fn(request, timeout=None if deadline == float("inf") else deadline,
                            wait_for_ready=self._wait)
        except grpc.aio.AioRpcError as exc:
            raise agent_error(name, exc) from exc
        except grpc.aio.UsageError as exc:
            raise AgentError(name, "client is closed") from exc

    # -- the Agent service ---------------------------------------------------
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
                reply = await self._agent.Ping(pb.PingRequest(token=token), timeout=remaining,
                                               wait_for_ready=True)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE_ON_CONNECT:
                    raise agent_error("wait-ready", exc) from exc
                await asyncio.sleep(CONNECT_RETRY_S)
                continue
            if reply.token != token:
                raise AgentError("wait-ready", "ping answered with the wrong token")
            return time.monotonic() - start

    async def ping(self, timeout: float | None = None) -> pb.PingReply:
        token = int.from_bytes(os.urandom(8), "little")
        reply = await self._call("ping", self._agent.Ping, pb.PingRequest(token=token), timeout)
        if reply.token != token:
            raise AgentError("ping", "answered with the wrong token")
        return reply

    async def info(self, random_bytes: int = 16) -> pb.GuestInfo:
        return await self._call("info", self._agent.GetInfo,
                                pb.GetInfoRequest(random_bytes=random_bytes))

    async def set_time(self, unix_ns: int | None = None) -> pb.SetTimeReply:
        """Set the guest clock to ``unix_ns`` (default: the host's clock now)."""
        request = pb.SetTimeRequest(time_unix_ns=unix_ns or time.time_ns())
        return await self._call("set-time", self._agent.SetTime, request)

    async def reseed(self, entropy: bytes | None = None) -> pb.ReseedReply:
        """Mix host entropy (default: 64 bytes from os.urandom) into the guest RNG."""
        data = entropy if entropy is not None else os.urandom(64)
        request = pb.ReseedRequest(entropy=data, credit_bits=8 * len(data))
        return await self._call("reseed", self._agent.Reseed, request)

    async def online_resources(self) -> pb.OnlineResourcesReply:
        """Online hot-plugged CPUs and memory in the guest; report the totals."""
        return await self._call("online-resources", self._agent.OnlineResources,
                                pb.OnlineResourcesRequest())

    # -- the Containers service ----------------------------------------------
    async def create_container(self, container_id: str, serial: str, hostname: str,
                               process: ProcessRequest, disk_timeout: float,
                               setup: ContainerSetup | None = None) -> int:
        """Create a container rooted on the disk with ``serial``; its init's pid."""
        request = pb.CreateContainerRequest(
            container_id=container_id, disk_serial=serial, hostname=hostname,
            process=process.message(), disk_timeout_s=disk_timeout)
        if setup is not None:
            setup.fill(request)
        reply = await self._call("create-container", self._containers.CreateContainer, request,
                                 self.call_timeout + disk_timeout)
        return reply.pid

    async def start_container(self, container_id: str) -> None:
        await self._call("start-container", self._containers.StartContainer,
                         pb.StartContainerRequest(container_id=container_id))

    async def remove_container(self, container_id: str, force: bool = False) -> None:
        await self._call("remove-container", self._containers.RemoveContainer,
                         pb.RemoveContainerRequest(container_id=container_id, force=force))

    async def exec_process(self, container_id: str, exec_id: str,
                           process: ProcessRequest) -> int:
        request = pb.ExecProcessRequest(container_id=container_id, exec_id=exec_id,
                                        process=process.message())
        return (await self._call("exec-process", self._containers.ExecProcess, request)).pid

    async def signal(self, container_id: str, exec_id: str, sig: int, all: bool = False) -> None:
        await self._call("signal-process", self._containers.SignalProcess,
                         pb.SignalProcessRequest(container_id=container_id, exec_id=exec_id,
                                                 signal=sig, all=all))

    async def wait(self, container_id: str, exec_id: str = "",
                   timeout: float | None = None) -> int:
        """The process's exit code; ``timeout`` None waits as long as it runs."""
        request = pb.WaitProcessRequest(container_id=container_id, exec_id=exec_id)
        reply = await self._call("wait-process", self._containers.WaitProcess, request,
                                 float("inf") if timeout is None else timeout)
        return reply.exit_code

    async def resize(self, container_id: str, exec_id: str, rows: int, cols: int) -> None:
        await self._call("resize-tty", self._containers.ResizeTty, pb.ResizeTtyRequest(
            container_id=container_id, exec_id=exec_id, rows=rows, cols=cols))

    async def list_containers(self) -> list[pb.ContainerInfo]:
        reply = await self._call("list-containers", self._containers.ListContainers,
                                 pb.ListContainersRequest())
        return list(reply.containers)

    async def list_processes(self, container_id: str) -> list[pb.ProcessInfo]:
        reply = await self._call("list-processes", self._containers.ListProcesses,
                                 pb.ListProcessesRequest(container_id=container_id))
        return list(reply.processes)

    def io_stream(self, container_id: str, exec_id: str,
                  inputs: AsyncIterator[pb.IoInput],
                  timeout: float | None = None) -> AsyncIterator[pb.IoOutput]:
        """The process's output until both its stdout and stderr reached EOF, while
        ``inputs`` (which must not name the process: that message is sent first
        here) feeds its stdin.  ``timeout`` None: no deadline."""
        async def requests() -> AsyncIterator[pb.IoInput]:
            yield pb.IoInput(container_id=container_id, exec_id=exec_id)
            async for item in inputs:
                yield item
        call = self._containers.IoStream(requests(), timeout=timeout,
                                         wait_for_ready=self._wait)
        return _outputs(call)

    async def close(self) -> None:
        await self._channel.close()


async def _outputs(call: Any) -> AsyncIterator[pb.IoOutput]:
    try:
        async for item in call:
            yield item
    except grpc.aio.AioRpcError as exc:
        if not ended_during_write(exc):
            raise agent_error("io-stream", exc) from exc
        # Every output was relayed and the stream ended normally (see above).
    finally:
        call.cancel()
