"""Handles on a VM's host process: one we spawned, or one we adopted after a
daemon restart (QEMU runs in its own session and outlives a crashed daemon)."""

from __future__ import annotations

import asyncio
import os
import signal
from abc import ABC, abstractmethod

import psutil

ADOPTED_POLL_S = 0.05


class ProcessHandle(ABC):
    pid: int

    @property
    @abstractmethod
    def returncode(self) -> int | None:
        """None while the process runs."""

    @abstractmethod
    async def wait(self) -> int:
        """Wait for the process to end; its exit code (-1 when unknown)."""

    async def kill(self) -> None:
        """SIGKILL the process group (the process leads its own session) and wait."""
        if self.returncode is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await self.wait()


class ChildProcess(ProcessHandle):
    """A process this daemon started."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self.pid = proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        return await self._proc.wait()


class AdoptedProcess(ProcessHandle):
    """A process an earlier daemon started; watched by polling (it is not our child)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._proc = psutil.Process(pid)

    @property
    def returncode(self) -> int | None:
        try:
            if self._proc.is_running() and self._proc.status() != psutil.STATUS_ZOMBIE:
                return None
        except psutil.Error:
            pass
        return -1

    async def wait(self) -> int:
        while self.returncode is None:
            await asyncio.sleep(ADOPTED_POLL_S)
        return -1
