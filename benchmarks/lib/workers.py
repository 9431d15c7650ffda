"""Client processes for the pool benchmark (``get_worker``): one per concurrent
client, started once per phase and told what to do over a pipe."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0  # an interpreter start and a first RPC on a loaded host
EXIT_TIMEOUT_S = 10.0


class Worker:
    """One client process; its answers are the worker's JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def ask(self, op: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(op) + "\n").encode())
        await self.proc.stdin.drain()
        line = await self.proc.stdout.readline()
        if not line:
            return {"error": f"client process exited ({self.proc.returncode})", "ms": 0.0}
        return json.loads(line)

    async def get(self, timeout: float) -> dict[str, Any]:
        return await self.ask({"op": "get", "timeout": timeout})

    async def release(self) -> dict[str, Any]:
        return await self.ask({"op": "release"})


async def start_workers(socket: Path, count: int) -> list[Worker]:
    """``count`` client processes, each with its channel to the daemon up."""
    procs = await asyncio.gather(*(asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.lib.get_worker", str(socket), cwd=REPO,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE) for _ in range(count)))
    workers = [Worker(p) for p in procs]
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            for w in workers:
                assert w.proc.stdout is not None
                if json.loads(await w.proc.stdout.readline() or b"{}").get("ready") is not True:
                    raise RuntimeError("a client process did not start")
    except BaseException:
        await stop_workers(workers)
        raise
    return workers


async def stop_workers(workers: list[Worker]) -> None:
    """Close their pipes (each gives back what it holds and exits); kill stragglers."""
    for w in workers:
        if w.proc.stdin is not None:
            w.proc.stdin.close()
    for w in workers:
        try:
            await asyncio.wait_for(w.proc.wait(), EXIT_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
            await w.proc.wait()
