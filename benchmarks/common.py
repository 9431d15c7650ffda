"""Helpers shared by the benchmarks: statistics, output files, progress, daemons."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vmfactory.util.sockets import socket_accepts

RESULTS = Path(__file__).resolve().parent / "results"


def stats(values: list[float]) -> dict[str, float]:
    """median/min/max/mean/p90 of ``values``, rounded for printing."""
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    out = {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
           "mean": statistics.fmean(ordered), "p90": p90, "n": len(ordered)}
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def save_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[f"{c:.1f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)



def spawn_daemon(config: Path, socket: Path, log: Path,
                 timeout: float = 60.0) -> subprocess.Popen[bytes]:
    """``vmfactory init`` on ``config`` as a child process, its output appended to
    ``log``; returns once ``socket`` accepts (a killed daemon's stale socket file
    does not count).  A daemon that exits or misses ``timeout`` is killed, and the
    RuntimeError names its log."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmfactory.cli", "--config", str(config), "init"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=str(Path(__file__).resolve().parent.parent))
    deadline = time.monotonic() + timeout
    while not socket_accepts(socket):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"daemon did not start; see {log}")
        time.sleep(0.05)
    return proc
