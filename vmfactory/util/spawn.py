"""``vmfactory init`` as a child process, for tests and benchmarks that need a
real daemon on a real socket."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from vmfactory.util.sockets import socket_accepts

SPAWN_POLL_S = 0.05
REPO = Path(__file__).resolve().parents[2]


def init_command(config: Path) -> list[str]:
    """The argv of ``vmfactory --config CONFIG init`` (from this source tree)."""
    return [sys.executable, "-m", "vmfactory.cli", "--config", str(config), "init"]


def spawn_daemon(config: Path, socket: Path, log: Path, *, timeout: float = 60.0,
                 command: Sequence[str] | None = None) -> subprocess.Popen[bytes]:
    """Run ``command`` (default: ``vmfactory init`` on ``config``) with its output
    appended to ``log``; return once ``socket`` accepts (a killed daemon's stale
    socket file does not count).  A daemon that exits first or misses
    ``timeout`` is killed, and the RuntimeError carries the end of its log."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(command or init_command(config)), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + timeout
    while not socket_accepts(socket):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"daemon did not start (exit {proc.returncode}); {log}:\n{tail}")
        time.sleep(SPAWN_POLL_S)
    return proc
