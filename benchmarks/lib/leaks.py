"""What a benchmark run can leave behind under its directory (QEMU processes,
mounts), and removing it.  The one scan for QEMU processes is the product's
:func:`vmfactory.hypervisor.proc.processes_under`."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil

from vmfactory.hypervisor.proc import processes_under

SETTLE_TRIES = 10
SETTLE_PAUSE_S = 0.2
KILL_WAIT_S = 5.0
PR_SET_CHILD_SUBREAPER = 36


def settled_qemu(root: Path) -> list[psutil.Process]:
    """QEMU processes under ``root`` still there after a moment to vanish from /proc
    (a daemon that just reaped them)."""
    procs = processes_under(root)
    for _ in range(SETTLE_TRIES - 1):
        if not procs:
            break
        time.sleep(SETTLE_PAUSE_S)
        procs = processes_under(root)
    return procs


def kill_processes(procs: list[psutil.Process]) -> list[int]:
    """SIGKILL each process (its whole group when it leads one: QEMU runs in its own
    session, with its helpers) and wait for it; the pids."""
    for proc in procs:
        try:
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait(timeout=KILL_WAIT_S)
        except (psutil.Error, OSError):
            pass
    return [proc.pid for proc in procs]


def mounts_under(root: Path) -> list[str]:
    """Mount points at or under ``root``."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return []
    points = [ln.split()[1] for ln in lines if len(ln.split()) > 1]
    return [p for p in points if p == str(root) or p.startswith(f"{root}/")]


def unmount(points: list[str]) -> None:
    """Lazily unmount ``points``, the deepest first."""
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def remove_tree(root: Path) -> list[int]:
    """Kill the QEMU processes under ``root``, unmount what is mounted under it and
    remove it; the pids of the processes that were still running."""
    killed = kill_processes(processes_under(root))
    unmount(mounts_under(root))
    shutil.rmtree(root, ignore_errors=True)
    return killed


def adopt_orphans() -> None:
    """Make this process a child subreaper: processes orphaned below it (the QEMU
    processes of a daemon killed with SIGKILL) become its children, for
    reap_orphans(), instead of zombies left to PID 1 after the run."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap_orphans() -> list[int]:
    """Reap every child that has exited (once the children this process started
    were waited for); their pids."""
    reaped = []
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        reaped.append(pid)
    return reaped
