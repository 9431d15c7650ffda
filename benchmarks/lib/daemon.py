"""A daemon process per benchmark phase: ``DaemonRun`` starts one with one pool in
a fresh short /tmp/vmfb-XXXX directory, waits for the pool, stops the daemon and
counts what it left behind; ``run_phase`` runs a phase's body against it."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

from benchmarks.lib.host import MemoryGuard, MemoryLow, check_room
from benchmarks.lib.leaks import kill_processes, mounts_under, settled_qemu, unmount
from benchmarks.lib.output import progress
from benchmarks.lib.stats import count_kinds
from vmfactory.config import scratch_config
from vmfactory.server.client import FactoryClient
from vmfactory.util.spawn import spawn_daemon

PREFIX = "pool:"         # progress lines' default prefix (the pool benchmark's)
# The daemons' refills pause under this (daemon.mem_floor_mib), before LOW_WATER_MIB.
MEM_FLOOR_MIB = 3072
DAEMON_START_S = 60.0    # spawn -> socket
DAEMON_STOP_S = 180.0    # SIGTERM -> exit (grace + stopping every VM)
KILL_WAIT_S = 30.0       # SIGKILL -> exit
FILL_TIMEOUT_S = 900.0   # a pool (re)filling, template build included
STATUS_POLL_S = 0.5
SLOW_VM_START_MS = 10000
VM_RUNNING = re.compile(r"vm (\w+) running \(pid \d+, agent ready in (\d+) ms\)")


def stop_daemon(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """SIGTERM ``proc`` and wait up to ``timeout`` s, then SIGKILL it; its exit code,
    None when it had to be killed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=KILL_WAIT_S)
        return None


def vm_starts(lines: list[str]) -> list[dict[str, Any]]:
    """The log's ``vm X running (pid P, agent ready in N ms)`` lines; one followed by
    ``template ... ready`` is the template's own cold boot, not a clone."""
    starts = []
    for i, ln in enumerate(lines):
        m = VM_RUNNING.search(ln)
        if m:
            template = i + 1 < len(lines) and "factory.template: template" in lines[i + 1]
            starts.append({"vm": m.group(1), "agent_ready_ms": int(m.group(2)),
                           "template_boot": template})
    return starts


def log_findings(text: str) -> dict[str, Any]:
    """WARNING/ERROR lines, tracebacks, gRPC core messages and slow VM starts in a log."""
    lines = text.splitlines()
    warnings = [ln for ln in lines if ln.startswith("WARNING")]
    errors = [ln for ln in lines if ln.startswith(("ERROR", "CRITICAL"))]
    grpc_core = [ln for ln in lines if re.match(r"[IWEF]\d{4} ", ln)]
    clones = [s for s in vm_starts(lines) if not s["template_boot"]]
    others = [s["agent_ready_ms"] for s in clones]
    return {"warnings": len(warnings), "errors": len(errors),
            "tracebacks": sum(ln.startswith("Traceback") for ln in lines),
            "kinds": count_kinds(warnings + errors, 8, width=160),
            "samples": (errors + warnings)[:6],
            "grpc_core": len(grpc_core), "grpc_core_samples": grpc_core[:4],
            "vm_starts": len(others),
            "vm_start_ms_median": float(statistics.median(others)) if others else None,
            "vm_start_ms_max": float(max(others)) if others else None,
            "slow_vm_starts": [s for s in clones if s["agent_ready_ms"] > SLOW_VM_START_MS]}


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


class DaemonRun:
    """A daemon process with one pool, in its own /tmp/vmfb-XXXX directory; its log
    is copied into ``log_dir`` (if given) before the directory is removed."""

    def __init__(self, label: str, *, min_size: int, max_size: int, keep_running: bool = False,
                 empty: str = "wait", sizing: str = "fixed", log_dir: Path | None = None,
                 prefix: str = PREFIX, daemon: dict[str, Any] | None = None) -> None:
        self.label, self.prefix = label, prefix
        self.min_size, self.max_size = min_size, max_size
        self.keep_running, self.empty, self.sizing = keep_running, empty, sizing
        self.log_dir = log_dir
        self.root = Path(tempfile.mkdtemp(prefix="vmfb-", dir="/tmp"))
        self.socket = self.root / "factory.sock"
        self.log_path = self.root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = scratch_config(self.root, {
            "vm": {"accel": "tcg"}, "daemon": {"mem_floor_mib": MEM_FLOOR_MIB, **(daemon or {})},
            "store": {"url": f"leveldb://{self.root / 'store.ldb'}"},
            "pools": [{"name": "bench", "min_size": min_size, "max_size": max_size,
                       "keep_running": keep_running, "empty": empty, "sizing": sizing}]})

    def describe(self) -> dict[str, Any]:
        return {"min_size": self.min_size, "max_size": self.max_size,
                "keep_running": self.keep_running, "empty": self.empty, "sizing": self.sizing}

    def client(self) -> FactoryClient:
        return FactoryClient(str(self.socket))

    async def start(self) -> None:
        self.log_path.unlink(missing_ok=True)
        try:
            self.proc = await asyncio.to_thread(spawn_daemon, self.config, self.socket,
                                                self.log_path, timeout=DAEMON_START_S)
        except RuntimeError as exc:  # its message ends with the daemon log's tail
            raise RuntimeError(f"{self.label}: {exc}") from exc
        progress(f"{self.prefix} {self.label}: daemon pid {self.proc.pid} serving on {self.socket} "
                 f"(pool {self.min_size}..{self.max_size}, keep_running="
                 f"{str(self.keep_running).lower()}, empty={self.empty}, sizing={self.sizing})")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> dict[str, Any]:
        """SIGTERM, wait, count leftovers, then clean up whatever was left (blocking)."""
        info: dict[str, Any] = {"root": str(self.root)}
        t = time.monotonic()
        if self.proc is not None:
            info["exit_code"] = stop_daemon(self.proc, DAEMON_STOP_S)
            if info["exit_code"] is None:
                info["stop_timed_out"] = True
        info["stop_s"] = round(time.monotonic() - t, 2)
        procs = settled_qemu(self.root)
        info.update(self.leftovers(procs))
        self.report_stop(info)
        self.keep_log(info)
        self.cleanup(procs, info["leftover_mounts"])
        return info

    def leftovers(self, procs: list[psutil.Process]) -> dict[str, Any]:
        """What the stopped daemon left: QEMU processes, run/ entries, mounts, its socket."""
        pids = [p.info["pid"] for p in procs]
        run_entries = entries(self.root / "run")
        mounts = mounts_under(self.root)
        return {"leftover_qemu": pids, "leftover_run_entries": run_entries,
                "leftover_mounts": mounts,
                "leaked": len(pids) + len(run_entries) + len(mounts),
                "socket_left": self.socket.exists(),
                "template_entries_left": entries(self.root / "templates"),
                "log": log_findings(self.log())}

    def report_stop(self, info: dict[str, Any]) -> None:
        """One progress line; a daemon that left something or failed also gets its log tail."""
        if info["leaked"] or info.get("exit_code") not in (0, None) or info["socket_left"]:
            progress(f"{self.prefix} {self.label}: after stop: exit code {info.get('exit_code')}, "
                     f"{len(info['leftover_qemu'])} QEMU left, run/ "
                     f"{info['leftover_run_entries']}, mounts {info['leftover_mounts']}, "
                     f"socket left {info['socket_left']}")
            info["log_tail"] = self.log()[-1500:]
        else:
            progress(f"{self.prefix} {self.label}: daemon stopped in {info['stop_s']:.1f} s, "
                     f"nothing left behind")

    def keep_log(self, info: dict[str, Any]) -> None:
        if self.log_dir is None or not self.log_path.exists():
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        kept = self.log_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', self.label)}.log"
        shutil.copyfile(self.log_path, kept)
        info["log_copy"] = str(kept)

    def cleanup(self, procs: list[psutil.Process], mounts: list[str]) -> None:
        kill_processes(procs)
        unmount(mounts)
        shutil.rmtree(self.root, ignore_errors=True)


Body = Callable[[DaemonRun], Awaitable[dict[str, Any]]]


async def run_phase(label: str, daemon: DaemonRun, need_mib: float, body: Body) -> dict[str, Any]:
    """Start the daemon, run ``body``, always stop it; errors end only this phase."""
    out: dict[str, Any] = {"pool": daemon.describe()}
    t = time.monotonic()
    try:
        check_room(need_mib, label=label)
        await daemon.start()
        async with MemoryGuard(label):
            out.update(await body(daemon))
    except MemoryLow as exc:
        out["stopped_early"] = str(exc)
        progress(f"{daemon.prefix} {label}: stopped early: {exc}")
    except Exception as exc:  # noqa: BLE001 - recorded, the other phases still run
        out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        progress(f"{daemon.prefix} {label}: FAILED: {out['error'][:500]}")
    finally:
        out["daemon"] = daemon.stop()
        out["phase_s"] = round(time.monotonic() - t, 1)
    return out


async def wait_full(ctl: FactoryClient, label: str, timeout: float = FILL_TIMEOUT_S,
                    prefix: str = PREFIX) -> float:
    """Wait until the pool holds min_size ready VMs and nothing is refilling; seconds waited."""
    t = time.monotonic()
    deadline = t + timeout
    last = ""
    while True:
        p = (await ctl.status()).pools[0]
        if p.ready >= p.min_size and p.refilling == 0:
            return time.monotonic() - t
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"{label}: pool not full after {timeout:.0f} s "
                               f"(ready {p.ready}/{p.min_size}, refilling {p.refilling})")
        line = f"ready {p.ready}/{p.min_size}, refilling {p.refilling}"
        if line != last and now - t > 5:
            progress(f"{prefix} {label}: waiting for the pool: {line}")
            last = line
        await asyncio.sleep(STATUS_POLL_S)


async def pool_counters(ctl: FactoryClient) -> dict[str, int]:
    p = (await ctl.status()).pools[0]
    return {"handouts": p.handouts, "misses": p.misses, "replaced": p.replaced}
