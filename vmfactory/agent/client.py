"""Async client of the guest agent's API (services ``Agent`` and ``Containers``),
over ttrpc on the VM's agent socket (or a proxy's).

The one host-side client of the agent: the hypervisor plugins, the factory's
warm-up and the runtime client all use it.  Every call has a deadline; a
refusal comes back as the agent's own error class (the table of
``vmfactory.guest.agent.errors``, inverted), and an agent that did not answer
as an :class:`AgentError` naming the call and the status (UNAVAILABLE,
DEADLINE_EXCEEDED), so callers above never see ttrpc types.

A client connects on its first call and again after its connection is lost.
Its stream ids start at a random odd number: a host that reaches the guest
before the guest saw the previous host leave may be sent that host's last
answers, and must not take them for its own (see ``guest/agent/port``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError, Message

from vmfactory.errors import AgentError
from vmfactory.guest.agent.clock import HOST_TIME_KEY
from vmfactory.guest.agent.errors import from_status
from vmfactory.proto import agent_pb2 as pb
from vmfactory.ttrpc import aio
from vmfactory.ttrpc.frames import CODE_NAMES, ConnectionLost, RpcError, TtrpcError
from vmfactory.ttrpc.services import Method, methods

logger = logging.getLogger(__name__)


def _host_time() -> dict[str, str]:
    """Every call's metadata: the host clock, which the guest's follows (see
    ``guest/agent/clock``), so no handout has to set it."""
    return {HOST_TIME_KEY: str(time.time_ns())}

AGENT = methods(pb.DESCRIPTOR.services_by_name["Agent"])
CONTAINERS = methods(pb.DESCRIPTOR.services_by_name["Containers"])
CONNECT_RETRY_S = 0.02
# wait_ready's first ping waits this long before it reconnects (doubling, up to
# the cap): a session the guest could not decode is only left by reconnecting.
FIRST_ATTEMPT_S = 0.5
MAX_ATTEMPT_S = 4.0


def _failed(call: str, code: str, text: str) -> AgentError:
    error = AgentError(call, f"{code}: {text}")
    error.code = code
    return error


def agent_error(call: str, exc: BaseException) -> AgentError:
    """The error for a failed call: the agent's own class, or the status."""
    if isinstance(exc, RpcError):
        return from_status(call, CODE_NAMES.get(exc.code, str(exc.code)), exc.message,
                           exc.details)
    if isinstance(exc, TimeoutError):
        return _failed(call, "DEADLINE_EXCEEDED", "no answer in time")
    if isinstance(exc, DecodeError):
        return _failed(call, "INTERNAL", "undecodable reply")
    return _failed(call, "UNAVAILABLE", str(exc) or type(exc).__name__)


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


class AgentClient:
    """Talks to one VM's agent at ``address`` (``unix:/path``: the VM's agent
    socket, or a proxy's).  ``wait_for_ready``: a call waits (within its
    deadline) for the socket to accept instead of failing at once."""

    def __init__(self, address: str, call_timeout: float, *,
                 wait_for_ready: bool = False) -> None:
        self.address = address
        self.call_timeout = call_timeout
        self._path = address.removeprefix("unix:")
        self._wait = wait_for_ready
        self._client: aio.Client | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def _connection(self) -> aio.Client:
        """The live connection, made now if there is none (within the caller's deadline)."""
        async with self._lock:
            if self._closed:
                raise ConnectionLost("client is closed")
            if self._client is not None and not self._client.lost:
                return self._client
            await self._drop()
            while True:
                try:
                    self._client = await aio.Client.connect_unix(
                        self._path, first_stream_id=secrets.randbits(31) | 1)
                    return self._client
                except (FileNotFoundError, ConnectionRefusedError):
                    if not self._wait:
                        raise
                await asyncio.sleep(CONNECT_RETRY_S)

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def _call(self, name: str, method: Method, request: Message,
                    timeout: float | None = None) -> Any:
        """One RPC; ``timeout`` None is the call timeout, ``math.inf`` no deadline."""
        deadline = timeout or self.call_timeout
        limit = None if deadline == float("inf") else deadline
        try:
            async with asyncio.timeout(limit):
                client = await self._connection()
                data = await client.call(method.service, method.name,
                                         request.SerializeToString(), timeout=limit,
                                         metadata=_host_time())
            return method.reply.FromString(data)
        except (TtrpcError, TimeoutError, OSError, DecodeError) as exc:
            raise agent_error(name, exc) from exc

    # -- the Agent service ---------------------------------------------------
    async def wait_ready(self, timeout: float) -> float:
        """Ping until the agent answers or ``timeout`` passes; return seconds waited.

        Call this first on every new client: a ping not answered soon is sent
        again on a new connection, which leaves a session the guest could not
        decode (a previous host killed mid-frame) behind.
        """
        start = time.monotonic()
        deadline = start + timeout
        attempt = FIRST_ATTEMPT_S
        while (remaining := deadline - time.monotonic()) > 0:
            token = int.from_bytes(os.urandom(8), "little")
            try:
                reply = await self._ping_once(token, min(attempt, remaining))
            except (TimeoutError, ConnectionLost, OSError):
                await self._reset()
                attempt = min(2 * attempt, MAX_ATTEMPT_S)
                continue
            except (TtrpcError, DecodeError) as exc:
                raise agent_error("wait-ready", exc) from exc
            if reply.token != token:
                raise AgentError("wait-ready", "ping answered with the wrong token")
            return time.monotonic() - start
        raise AgentError("wait-ready", f"no answer within {timeout:g} s")

    async def _ping_once(self, token: int, timeout: float) -> pb.PingReply:
        method = AGENT["Ping"]
        async with asyncio.timeout(timeout):
            try:
                client = await self._connection()
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(CONNECT_RETRY_S)  # not up yet: a retry, not a reset
                raise TimeoutError from None
            data = await client.call(method.service, method.name,
                                     pb.PingRequest(token=token).SerializeToString(),
                                     timeout=timeout, metadata=_host_time())
        return pb.PingReply.FromString(data)

    async def _reset(self) -> None:
        async with self._lock:
            await self._drop()

    async def ping(self, timeout: float | None = None) -> pb.PingReply:
        token = int.from_bytes(os.urandom(8), "little")
        reply = await self._call("ping", AGENT["Ping"], pb.PingRequest(token=token), timeout)
        if reply.token != token:
            raise AgentError("ping", "answered with the wrong token")
        return reply

    async def info(self, random_bytes: int = 16) -> pb.GuestInfo:
        return await self._call("info", AGENT["GetInfo"],
                                pb.GetInfoRequest(random_bytes=random_bytes))

    async def set_time(self, unix_ns: int | None = None) -> pb.SetTimeReply:
        """Set the guest clock to ``unix_ns`` (default: the host's clock now)."""
        request = pb.SetTimeRequest(time_unix_ns=unix_ns or time.time_ns())
        return await self._call("set-time", AGENT["SetTime"], request)

    async def reseed(self, entropy: bytes | None = None) -> pb.ReseedReply:
        """Mix host entropy (default: 64 bytes from os.urandom) into the guest RNG."""
        data = entropy if entropy is not None else os.urandom(64)
        request = pb.ReseedRequest(entropy=data, credit_bits=8 * len(data))
        return await self._call("reseed", AGENT["Reseed"], request)

    async def online_resources(self) -> pb.OnlineResourcesReply:
        """Online hot-plugged CPUs and memory in the guest; report the totals."""
        return await self._call("online-resources", AGENT["OnlineResources"],
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
        reply = await self._call("create-container", CONTAINERS["CreateContainer"], request,
                                 self.call_timeout + disk_timeout)
        return reply.pid

    async def start_container(self, container_id: str) -> None:
        await self._call("start-container", CONTAINERS["StartContainer"],
                         pb.StartContainerRequest(container_id=container_id))

    async def remove_container(self, container_id: str, force: bool = False) -> None:
        await self._call("remove-container", CONTAINERS["RemoveContainer"],
                         pb.RemoveContainerRequest(container_id=container_id, force=force))

    async def exec_process(self, container_id: str, exec_id: str,
                           process: ProcessRequest) -> int:
        request = pb.ExecProcessRequest(container_id=container_id, exec_id=exec_id,
                                        process=process.message())
        return (await self._call("exec-process", CONTAINERS["ExecProcess"], request)).pid

    async def signal(self, container_id: str, exec_id: str, sig: int, all: bool = False) -> None:
        await self._call("signal-process", CONTAINERS["SignalProcess"],
                         pb.SignalProcessRequest(container_id=container_id, exec_id=exec_id,
                                                 signal=sig, all=all))

    async def wait(self, container_id: str, exec_id: str = "",
                   timeout: float | None = None) -> int:
        """The process's exit code; ``timeout`` None waits as long as it runs."""
        request = pb.WaitProcessRequest(container_id=container_id, exec_id=exec_id)
        reply = await self._call("wait-process", CONTAINERS["WaitProcess"], request,
                                 float("inf") if timeout is None else timeout)
        return reply.exit_code

    async def resize(self, container_id: str, exec_id: str, rows: int, cols: int) -> None:
        await self._call("resize-tty", CONTAINERS["ResizeTty"], pb.ResizeTtyRequest(
            container_id=container_id, exec_id=exec_id, rows=rows, cols=cols))

    async def list_containers(self) -> list[pb.ContainerInfo]:
        reply = await self._call("list-containers", CONTAINERS["ListContainers"],
                                 pb.ListContainersRequest())
        return list(reply.containers)

    async def list_processes(self, container_id: str) -> list[pb.ProcessInfo]:
        reply = await self._call("list-processes", CONTAINERS["ListProcesses"],
                                 pb.ListProcessesRequest(container_id=container_id))
        return list(reply.processes)

    async def io_stream(self, container_id: str, exec_id: str,
                        inputs: AsyncIterator[pb.IoInput],
                        timeout: float | None = None) -> AsyncIterator[pb.IoOutput]:
        """The process's output until both its stdout and stderr reached EOF, while
        ``inputs`` (which must not name the process: that message is sent first
        here) feeds its stdin.  ``timeout`` None: no deadline."""
        method = CONTAINERS["IoStream"]
        try:
            async with asyncio.timeout(timeout):
                client = await self._connection()
            stream = await client.stream(method.service, method.name, timeout=timeout,
                                         metadata=_host_time())
            await stream.send(pb.IoInput(container_id=container_id,
                                         exec_id=exec_id).SerializeToString())
        except (TtrpcError, TimeoutError, OSError) as exc:
            raise agent_error("io-stream", exc) from exc
        feeder = asyncio.ensure_future(_feed(stream, inputs))
        try:
            async with asyncio.timeout(timeout):
                while (data := await stream.recv()) is not None:
                    yield pb.IoOutput.FromString(data)
        except (TtrpcError, TimeoutError, DecodeError) as exc:
            raise agent_error("io-stream", exc) from exc
        finally:
            stream.cancel()  # a no-op once the call ended
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)

    async def close(self) -> None:
        self._closed = True
        await self._reset()


async def _feed(stream: aio.ClientStream, inputs: AsyncIterator[pb.IoInput]) -> None:
    """Send ``inputs`` on ``stream``, then close the sending side."""
    try:
        async for item in inputs:
            await stream.send(item.SerializeToString())
        await stream.close_send()
    except TtrpcError as exc:  # the call ended: its reader reports why
        logger.debug("io-stream input stopped: %s", exc)
