"""A host-process stand-in for a VM: FOR TESTS ONLY.

The guest agent runs as an ordinary host process on a unix socket, with its
clock and RNG operations simulated (``--standin``).  Pause/resume are
SIGSTOP/SIGCONT; the process leads its own session, so like QEMU it outlives a
killed daemon and can be adopted again.  It lets the layers above (factory,
pools, leases, recovery, the daemon) be tested in milliseconds; it is never
used on the product's path.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

import psutil

from vmfactory.agent import AgentClient
from vmfactory.errors import HypervisorError
from vmfactory.hypervisor.base import VM_UMASK, Hypervisor, Vm, VmState, make_run_dir
from vmfactory.hypervisor.proc import AdoptedProcess, ChildProcess, ProcessHandle
from vmfactory.util.states import require

AGENT_MODULE = "vmfactory.guest.agent"


class ProcessVm(Vm):
    """The agent as a host process, standing in for a VM."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._proc: ProcessHandle | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    @require(VmState.CREATED)
    async def start(self) -> None:
        await self._starting(self._spawn())
        self._set_state(VmState.RUNNING)

    async def _spawn(self) -> None:
        t0 = time.monotonic()
        make_run_dir(self.run_dir, fresh=True)
        self._proc = ChildProcess(await asyncio.create_subprocess_exec(
            sys.executable, "-m", AGENT_MODULE, "--standin",
            "--listen", f"unix:{self.agent_socket}",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True, umask=VM_UMASK))
        self.timings.qemu_start_ms = (time.monotonic() - t0) * 1000
        await self._connect_agent()
        self.timings.agent_ready_ms = (time.monotonic() - t0) * 1000

    @require(VmState.CREATED)
    async def adopt(self, pid: int) -> None:
        paused = await self._starting(self._take_over(pid))
        self._set_state(VmState.PAUSED if paused else VmState.RUNNING)

    async def _take_over(self, pid: int) -> bool:
        self._proc, paused = self._adoptable(pid)
        if paused:
            os.kill(pid, signal.SIGCONT)  # the agent answers only while it runs
        await self._connect_agent()
        if paused:
            os.kill(pid, signal.SIGSTOP)
        return paused

    def _adoptable(self, pid: int) -> tuple[AdoptedProcess, bool]:
        """The stand-in process ``pid`` of this VM, and whether it is stopped."""
        try:
            proc = psutil.Process(pid)
            cmdline, status = " ".join(proc.cmdline()), proc.status()
            handle = AdoptedProcess(pid)
        except psutil.Error as exc:
            raise HypervisorError("adopt", f"no process {pid}: {exc}") from exc
        if str(self.agent_socket) not in cmdline or handle.returncode is not None:
            raise HypervisorError("adopt", f"process {pid} is not the stand-in of {self.run_dir}")
        return handle, status == psutil.STATUS_STOPPED

    async def _connect_agent(self) -> None:
        self.agent = AgentClient(f"unix:{self.agent_socket}", self.timeouts.agent_call)
        try:
            await self.agent.wait_ready(self.timeouts.agent_ready)
        except Exception as exc:
            raise HypervisorError("agent-ready", str(exc)) from exc

    @require(VmState.RUNNING)
    async def pause(self) -> None:
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGSTOP)
        self._set_state(VmState.PAUSED)

    @require(VmState.PAUSED)
    async def resume(self) -> None:
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGCONT)
        self._set_state(VmState.RUNNING)

    async def _teardown(self, graceful: bool) -> None:
        await self.disconnect_agent()
        if self._proc is not None:
            await self._proc.kill()
        self._remove_run_dir()


class ProcessHypervisor(Hypervisor):
    """Creates :class:`ProcessVm` stand-ins (tests only)."""

    name = "process-standin"
    vm_class = ProcessVm
    process_marker = AGENT_MODULE
