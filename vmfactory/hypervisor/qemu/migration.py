"""Saving and restoring a VM's device state (templates and their clones).

Guest RAM lives in a memory file that a template shares and its clones map
copy-on-write, so migration moves device state only (``x-ignore-shared``):
a few hundred KiB, written through ``exec:cat`` to a file.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vmfactory.errors import HypervisorError

MIGRATE_POLL_S = 0.002

Qmp = Callable[..., Awaitable[Any]]


async def migration_done(qmp: Qmp, step: str, exit_reason: Callable[[], str]) -> None:
    """Poll until the migration completes; HypervisorError naming ``step`` if it fails."""
    while True:
        status = (await qmp("query-migrate")).get("status", "none")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise HypervisorError(step, f"migration {status}: {exit_reason()}")
        await asyncio.sleep(MIGRATE_POLL_S)


async def restore(qmp: Qmp, state: Path, exit_reason: Callable[[], str]) -> None:
    """Load device state into a QEMU started with ``-incoming defer -S``, then run it."""
    if not state.is_file() or state.stat().st_size == 0:
        raise HypervisorError("restore", f"device state file missing or empty: {state}")
    await qmp("migrate-set-capabilities",
              capabilities=[{"capability": "x-ignore-shared", "state": True}])
    await qmp("migrate-incoming", uri=f"exec:cat {shlex.quote(str(state))}")
    await migration_done(qmp, "restore", exit_reason)
    await qmp("cont")


async def save(qmp: Qmp, state: Path, timeout: float, exit_reason: Callable[[], str]) -> None:
    """Write a paused VM's device state to ``state`` within ``timeout``."""
    await qmp("migrate-set-capabilities",
              capabilities=[{"capability": "x-ignore-shared", "state": True}])
    await qmp("migrate", uri=f"exec:cat > {shlex.quote(str(state))}")
    try:
        await asyncio.wait_for(migration_done(qmp, "save", exit_reason), timeout)
    except asyncio.TimeoutError as exc:
        raise HypervisorError("save", f"migration did not finish within {timeout:g} s") from exc
