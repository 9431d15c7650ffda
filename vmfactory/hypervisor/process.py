"""A host-process stand-in for a VM: FOR TESTS ONLY.

The guest agent runs as an ordinary host process on a unix socket, with its
clock and RNG operations simulated (``--standin``).  Pause/resume are
SIGSTOP/SIGCONT.  It lets the layers above (factory, pools, daemon) be tested in
milliseconds; it is never used on the product's path.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
from typing import Any

from vmfactory.agent import AgentClient
from vmfactory.errors import HypervisorError
from vmfactory.hypervisor.base import Hypervisor, Vm, VmState
from vmfactory.hypervisor.proc import ChildProcess


class ProcessVm(Vm):
    """The agent as a host process, standing in for a VM."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._proc: ChildProcess | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    async def start(self) -> None:
        self._require("start", VmState.CREATED)
        self.state = VmState.STARTING
        t0 = time.monotonic()
        try:
            self.run_dir.mkdir(mode=0o700, parents=True)
            self._proc = ChildProcess(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "vmfactory.guest.agent", "--standin",
                "--listen", f"unix:{self.agent_socket}",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL, start_new_session=True))
            self.timings.qemu_start_ms = (time.monotonic() - t0) * 1000
            self.agent = AgentClient(f"unix:{self.agent_socket}", self.timeouts.agent_call)
            try:
                await self.agent.wait_ready(self.timeouts.agent_ready)
            except Exception as exc:
                raise HypervisorError("agent-ready", str(exc)) from exc
            self.timings.agent_ready_ms = (time.monotonic() - t0) * 1000
        except BaseException:
            self.state = VmState.FAILED
            await self._teardown()
            raise
        self.state = VmState.RUNNING

    async def pause(self) -> None:
        self._require("pause", VmState.RUNNING)
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGSTOP)
        self.state = VmState.PAUSED

    async def resume(self) -> None:
        self._require("resume", VmState.PAUSED)
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGCONT)
        self.state = VmState.RUNNING

    async def stop(self) -> None:
        if self.state in (VmState.CREATED, VmState.STOPPED, VmState.FAILED):
            if self.state == VmState.CREATED:
                self.state = VmState.STOPPED
            return
        self.state = VmState.STOPPING
        try:
            await self._teardown()
        finally:
            self.state = VmState.STOPPED
            self._stopped()

    async def _teardown(self) -> None:
        await self.disconnect_agent()
        if self._proc is not None:
            await self._proc.kill()
        shutil.rmtree(self.run_dir, ignore_errors=True)


class ProcessHypervisor(Hypervisor):
    """Creates :class:`ProcessVm` stand-ins (tests only)."""

    name = "process-standin"
    vm_class = ProcessVm
