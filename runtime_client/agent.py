"""The runtime client's connection to one VM's guest agent (Agent + Containers).

Every call has a deadline; failures become :mod:`runtime_client.errors` types.
The address is the VM's agent socket (noProxy) or a proxy's socket.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from runtime_client.errors import ClientError, SandboxError, from_rpc_error
from vmfactory.agent.client import CHANNEL_OPTIONS  # the agent channel's reconnect policy
from vmfactory.proto import agent_pb2 as pb
from vmfactory.proto import agent_pb2_grpc as pb_grpc

T = TypeVar("T")

@dataclass(frozen=True)
class ProcessRequest:
    """A process to run: what an OCI bundle's ``process`` says, after overrides."""

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

    def message(self) -> pb.Process:
        return pb.Process(args=self.args, env=self.env, cwd=self.cwd,
                          user=pb.User(uid=self.uid, gid=self.gid, additional_gids=self.groups),
                          terminal=self.terminal, stdio=self.stdio, rows=self.rows,
                          cols=self.cols)


class AgentConnection:
    """One gRPC channel to an agent; methods raise ClientError subclasses."""

    def __init__(self, address: str, call_timeout: float) -> None:
        self.address = address
        self.call_timeout = call_timeout
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.agent = pb_grpc.AgentStub(self._channel)
        self.containers = pb_grpc.ContainersStub(self._channel)

    async def _call(self, fn: Callable[..., Awaitable[T]], request: Any,
                    timeout: float | None = None) -> T:
        try:
            return await fn(request, timeout=timeout or self.call_timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "agent") from exc
        except grpc.aio.UsageError as exc:
            raise SandboxError("agent connection is closed") from exc

    async def ping(self, timeout: float | None = None) -> None:
        token = int.from_bytes(os.urandom(8), "little")
        reply = await self._call(self.agent.Ping, pb.PingRequest(token=token), timeout)
        if reply.token != token:
            raise ClientError("agent answered a ping with the wrong token")

    async def create_container(self, container_id: str, serial: str, hostname: str,
                               process: ProcessRequest, disk_timeout: float) -> int:
        request = pb.CreateContainerRequest(
            container_id=container_id, disk_serial=serial, hostname=hostname,
            process=process.message(), disk_timeout_s=disk_timeout)
        reply = await self._call(self.containers.CreateContainer, request,
                                 self.call_timeout + disk_timeout)
        return reply.pid

    async def start_container(self, container_id: str) -> None:
        await self._call(self.containers.StartContainer,
                         pb.StartContainerRequest(container_id=container_id))

    async def remove_container(self, container_id: str, force: bool = False) -> None:
        await self._call(self.containers.RemoveContainer,
                         pb.RemoveContainerRequest(container_id=container_id, force=force))

    async def exec_process(self, container_id: str, exec_id: str,
                           process: ProcessRequest) -> int:
        request = pb.ExecProcessRequest(container_id=container_id, exec_id=exec_id,
                                        process=process.message())
        return (await self._call(self.containers.ExecProcess, request)).pid

    async def signal(self, container_id: str, exec_id: str, sig: int, all: bool = False) -> None:
        await self._call(self.containers.SignalProcess, pb.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=sig, all=all))

    async def wait(self, container_id: str, exec_id: str = "",
                   timeout: float | None = None) -> int:
        """The process's exit code; ``timeout`` None waits as long as it runs."""
        request = pb.WaitProcessRequest(container_id=container_id, exec_id=exec_id)
        try:
            reply = await self.containers.WaitProcess(request, timeout=timeout,
                                                      wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "agent") from exc
        return reply.exit_code

    async def resize(self, container_id: str, exec_id: str, rows: int, cols: int) -> None:
        await self._call(self.containers.ResizeTty, pb.ResizeTtyRequest(
            container_id=container_id, exec_id=exec_id, rows=rows, cols=cols))

    async def list_containers(self) -> list[pb.ContainerInfo]:
        return list((await self._call(self.containers.ListContainers,
                                      pb.ListContainersRequest())).containers)

    async def list_processes(self, container_id: str) -> list[pb.ProcessInfo]:
        return list((await self._call(self.containers.ListProcesses,
                                      pb.ListProcessesRequest(container_id=container_id))).processes)

    def io_stream(self, container_id: str, exec_id: str,
                  inputs: AsyncIterator[pb.IoInput]) -> AsyncIterator[pb.IoOutput]:
        """Open the process's IoStream; ``inputs`` must start with nothing: the
        naming message is sent first here."""
        async def requests() -> AsyncIterator[pb.IoInput]:
            yield pb.IoInput(container_id=container_id, exec_id=exec_id)
            async for item in inputs:
                yield item
        return _stream_outputs(self.containers.IoStream(requests(), wait_for_ready=True))

    async def close(self) -> None:
        await self._channel.close()


async def _stream_outputs(call: Any) -> AsyncIterator[pb.IoOutput]:
    try:
        async for item in call:
            yield item
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc, "agent") from exc
    finally:
        call.cancel()
