"""Handles on a VM's host process: one we spawned, or one we adopted after a
daemon restart (QEMU runs in its own session and outlives a crashed daemon);
and the one scan for VM processes under a directory."""

from __future__ import annotations

import asyncio
import os
import signal
from abc import ABC, abstractmethod
from pathlib import Path

import psutil

ADOPTED_POLL_S = 0.05
QEMU_MARKER = "qemu-system"


def processes_under(root: Path | None, marker: str = QEMU_MARKER) -> list[psutil.Process]:
    """Live processes whose command line holds ``marker`` (QEMU by default) and a
    path under ``root`` (any path when None): what recovery reaps, what leak
    checks look for.  Each has ``info["pid"]`` and ``info["cmdline"]``."""
    under = f"{root}/" if root is not None else ""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(proc.info["cmdline"] or [])
        if marker in cmdline and under in cmdline:
            found.append(proc)
    return found


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
