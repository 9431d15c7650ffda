"""The host a benchmark runs on: its CPUs and load, the QEMU processes that are
not the benchmark's own (they share the CPUs), and guards on available memory."""

from __future__ import annotations

import asyncio
import math
import os
import signal
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import psutil

from vmfactory.hypervisor.proc import processes_under

# A benchmark stops (a phase, or booting more VMs) when available memory would drop under this.
LOW_WATER_MIB = 2048
MEMORY_POLL_S = 0.5

T = TypeVar("T")


class MemoryLow(Exception):
    """The host's available memory dropped (or would drop) under LOW_WATER_MIB."""


def available_mib() -> float:
    return psutil.virtual_memory().available / (1 << 20)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def other_qemu_count(own_root: Path | None = None) -> int:
    """QEMU processes on the host minus those under ``own_root`` (the benchmark's own)."""
    ours = {p.info["pid"] for p in processes_under(own_root)} if own_root is not None else set()
    return sum(1 for p in processes_under(None) if p.info["pid"] not in ours)


def host_start(own_root: Path | None = None) -> dict[str, Any]:
    """CPUs, load and other QEMU processes as a benchmark starts."""
    return {"cpus": os.cpu_count(), "loadavg_start": loadavg(),
            "other_qemu_start": other_qemu_count(own_root)}


def host_end(own_root: Path | None = None) -> dict[str, Any]:
    """Load and other QEMU processes as a benchmark ends."""
    return {"loadavg_end": loadavg(), "other_qemu_end": other_qemu_count(own_root)}


def check_room(need_mib: float, *, what: str = "the phase", label: str | None = None) -> None:
    """Raise MemoryLow unless ``need_mib`` more leaves LOW_WATER_MIB available."""
    avail = available_mib()
    if avail - need_mib < LOW_WATER_MIB:
        raise MemoryLow(f"{label + ': ' if label else ''}{avail:.0f} MiB available, {what} "
                        f"needs ~{need_mib:.0f} MiB and {LOW_WATER_MIB} MiB must stay free")


class MemoryGuard:
    """Cancels the phase (raising MemoryLow) if available memory drops under LOW_WATER_MIB."""

    lowest_mib = math.inf

    def __init__(self, label: str) -> None:
        self.label = label
        self.tripped: str | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def lowest(cls) -> int | None:
        """The lowest available memory any guard saw (MiB), None if none watched."""
        return round(cls.lowest_mib) if cls.lowest_mib < math.inf else None

    async def __aenter__(self) -> MemoryGuard:
        target = asyncio.current_task()
        assert target is not None
        self._task = asyncio.create_task(self._watch(target))
        return self

    async def _watch(self, target: asyncio.Task[Any]) -> None:
        while True:
            avail = available_mib()
            MemoryGuard.lowest_mib = min(MemoryGuard.lowest_mib, avail)
            if avail < LOW_WATER_MIB:
                self.tripped = (f"{self.label}: available memory {avail:.0f} MiB < "
                                f"{LOW_WATER_MIB} MiB")
                target.cancel()
                return
            await asyncio.sleep(MEMORY_POLL_S)

    async def __aexit__(self, et: Any, exc: Any, tb: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        if self.tripped and et is asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            raise MemoryLow(self.tripped)


async def cancel_on_sigterm(work: Awaitable[T]) -> T:
    """Await ``work`` with SIGTERM cancelling it (as Ctrl-C does), so its cleanup runs."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await work
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def interrupted_exit(exc: BaseException) -> int:
    """The exit code after Ctrl-C (130) or SIGTERM (143)."""
    return 130 if isinstance(exc, KeyboardInterrupt) else 128 + signal.SIGTERM
