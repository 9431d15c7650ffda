"""The Containers service: converts messages and delegates to the manager."""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from vmfactory.guest.agent import staging
from vmfactory.guest.agent.confine import CAP_NUMBERS
from vmfactory.guest.agent.containers import ContainerManager
from vmfactory.guest.agent.errors import BadRequest
from vmfactory.guest.agent.launch import ProcessPlan
from vmfactory.guest.agent.process import GuestProcess, read_chunks
from vmfactory.proto import agent_pb2 as pb
from vmfactory.ttrpc.aio import CallContext

logger = logging.getLogger(__name__)

MAX_ARG_BYTES = 128 * 1024
MAX_RLIMITS = 16
OUT_QUEUE = 16


def process_plan(msg: pb.Process) -> ProcessPlan:
    if not msg.args:
        raise BadRequest("process.args must not be empty")
    size = sum(len(a) for a in (*msg.args, *msg.env, msg.cwd))
    if size > MAX_ARG_BYTES or any("\0" in a for a in (*msg.args, *msg.env, msg.cwd)):
        raise BadRequest("process args/env/cwd too long or contain NUL")
    env = {}
    for entry in msg.env:
        key, sep, value = entry.partition("=")
        if not key or not sep:
            raise BadRequest(f"env entry {entry!r} is not KEY=VALUE")
        env[key] = value
    cwd = msg.cwd or "/"
    if not cwd.startswith("/"):
        raise BadRequest(f"cwd {cwd!r} must be absolute")
    return ProcessPlan(args=list(msg.args), env=env, cwd=cwd, uid=msg.user.uid,
                       gid=msg.user.gid, groups=list(msg.user.additional_gids),
                       terminal=msg.terminal, rlimits=_rlimits(msg),
                       capabilities=_capabilities(msg), no_new_privileges=msg.no_new_privileges,
                       oom_score_adj=msg.oom_score_adj if msg.HasField("oom_score_adj")
                       else None)


def _rlimits(msg: pb.Process) -> list[list[Any]]:
    if len(msg.rlimits) > MAX_RLIMITS:
        raise BadRequest(f"more than {MAX_RLIMITS} rlimits")
    out = []
    for r in msg.rlimits:
        if not r.type.startswith("RLIMIT_") or not hasattr(resource, r.type) or r.soft > r.hard:
            raise BadRequest(f"rlimit {r.type[:40]!r}: unknown, or soft above hard")
        out.append([r.type, r.soft, r.hard])
    return out


def _capabilities(msg: pb.Process) -> dict[str, list[str]] | None:
    if not msg.HasField("capabilities"):
        return None
    c = msg.capabilities
    sets = {"bounding": c.bounding, "effective": c.effective, "permitted": c.permitted,
            "inheritable": c.inheritable, "ambient": c.ambient}
    if any(len(v) > len(CAP_NUMBERS) * 2 or any(len(n) > 40 for n in v) for v in sets.values()):
        raise BadRequest("capabilities: too many, or names too long")
    return {k: list(v) for k, v in sets.items()}


def _ns_pid(guest_pid: int) -> tuple[int, int, str, str]:
    """(PID in the innermost namespace, parent PID there, state, command line)."""
    status = Path(f"/proc/{guest_pid}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    ns_pid = int(fields["NSpid"].split()[-1])
    cmdline = Path(f"/proc/{guest_pid}/cmdline").read_bytes().replace(b"\0", b" ").strip()
    return ns_pid, int(fields["PPid"]), fields["State"].split()[0], cmdline.decode(errors="replace")


class ContainerService:
    """Implements vmfactory.agent.v1.Containers (errors: ``rpc.translated``)."""

    def __init__(self, manager: ContainerManager) -> None:
        self.manager = manager

    async def CreateContainer(self, request: pb.CreateContainerRequest,
                              context: CallContext) -> pb.CreateContainerReply:
        p = request.process
        container = await self.manager.create(
            request.container_id, request.disk_serial, request.hostname, process_plan(p),
            p.stdio, p.rows, p.cols, request.disk_timeout_s, staging.setup_of(request))
        assert container.init is not None
        return pb.CreateContainerReply(pid=container.init.pid)

    async def StartContainer(self, request: pb.StartContainerRequest,
                             context: CallContext) -> pb.StartContainerReply:
        await self.manager.start(request.container_id)
        return pb.StartContainerReply()

    async def RemoveContainer(self, request: pb.RemoveContainerRequest,
                              context: CallContext) -> pb.RemoveContainerReply:
        await self.manager.remove(request.container_id, request.force)
        return pb.RemoveContainerReply()

    async def ExecProcess(self, request: pb.ExecProcessRequest,
                          context: CallContext) -> pb.ExecProcessReply:
        p = request.process
        proc = await self.manager.exec(request.container_id, request.exec_id,
                                       process_plan(p), p.stdio, p.rows, p.cols)
        return pb.ExecProcessReply(pid=proc.pid)

    def _process(self, container_id: str, exec_id: str) -> GuestProcess:
        return self.manager.get(container_id).process(exec_id)

    async def SignalProcess(self, request: pb.SignalProcessRequest,
                            context: CallContext) -> pb.SignalProcessReply:
        self.manager.signal(request.container_id, request.exec_id, request.signal, request.all)
        return pb.SignalProcessReply()

    async def WaitProcess(self, request: pb.WaitProcessRequest,
                          context: CallContext) -> pb.WaitProcessReply:
        proc = self._process(request.container_id, request.exec_id)
        code = await asyncio.shield(proc.exited)
        return pb.WaitProcessReply(exit_code=code)

    async def ResizeTty(self, request: pb.ResizeTtyRequest,
                        context: CallContext) -> pb.ResizeTtyReply:
        if not (0 < request.rows < 65536 and 0 < request.cols < 65536):
            raise BadRequest("rows and cols must be 1-65535")
        self._process(request.container_id, request.exec_id).resize(request.rows, request.cols)
        return pb.ResizeTtyReply()

    async def ListContainers(self, request: pb.ListContainersRequest,
                             context: CallContext) -> pb.ListContainersReply:
        out = []
        for c in self.manager.containers.values():
            init = c.init
            out.append(pb.ContainerInfo(
                container_id=c.id, state=c.state.value, pid=init.pid if init else 0,
                exit_code=(init.exit_code if init and init.exit_code is not None else -1),
                exec_ids=sorted(c.execs)))
        return pb.ListContainersReply(containers=out)

    async def ListProcesses(self, request: pb.ListProcessesRequest,
                            context: CallContext) -> pb.ListProcessesReply:
        container = self.manager.get(request.container_id)
        out = []
        for guest_pid in self.manager.guest_pids(container):
            try:
                pid, ppid, state, cmd = _ns_pid(guest_pid)
            except (OSError, KeyError, ValueError):
                continue  # exited while we looked
            out.append(pb.ProcessInfo(pid=pid, guest_pid=guest_pid, ppid=ppid, state=state,
                                      cmdline=cmd))
        out.sort(key=lambda p: p.pid)
        return pb.ListProcessesReply(processes=out)

    async def IoStream(self, requests: AsyncIterator[pb.IoInput],
                       context: CallContext) -> AsyncIterator[pb.IoOutput]:
        first = await anext(aiter(requests), None)
        if first is None:
            return
        proc = self._process(first.container_id, first.exec_id)
        stdio = proc.claim_io()
        feeder = asyncio.ensure_future(self._feed(proc, first, requests))
        try:
            async for item in _merge(stdio.stdout, stdio.stderr):
                yield item
        finally:
            if not feeder.done():
                feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)

    @staticmethod
    async def _feed(proc: GuestProcess, first: pb.IoInput,
                    requests: AsyncIterator[pb.IoInput]) -> None:
        msg: pb.IoInput | None = first
        while msg is not None:
            if msg.stdin:
                await proc.feed_stdin(msg.stdin)
            if msg.close_stdin:
                proc.close_stdin()
            msg = await anext(requests, None)


async def _merge(stdout: int | None, stderr: int | None) -> AsyncIterator[pb.IoOutput]:
    """stdout and stderr chunks as they come, until both reach EOF."""
    queue: asyncio.Queue[pb.IoOutput | None] = asyncio.Queue(OUT_QUEUE)

    async def pump(fd: int, field: str) -> None:
        try:
            async for chunk in read_chunks(fd):
                await queue.put(pb.IoOutput(**{field: chunk}))
        except OSError as exc:
            logger.warning("%s relay failed: %s", field, exc)
        await queue.put(None)  # not on cancellation: then nobody reads the queue

    tasks = [asyncio.ensure_future(pump(fd, name))
             for fd, name in ((stdout, "stdout"), (stderr, "stderr")) if fd is not None]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
