"""Pool benchmark (CreateFromCache): get latency from warm pools, misses, churn, sizing.

Every phase runs its own daemon (``python -m vmfactory.cli --config FILE init``)
with a config in a fresh short /tmp/vmfb-XXXX directory (run dir, template dir,
socket and store all inside it, TCG), talks to it only through the runtime
client, stops it with SIGTERM, and then counts what it left behind (QEMU
processes naming the directory, entries in its run/, mounts under it) as leaked.

1. warm: a paused pool (keep_running = false) bigger than the burst; C clients
   (one FactoryClient each) ask at once; client-side latency per get, hit
   fraction; the pool is refilled between rounds.  Also the idle CPU of the
   full paused pool.
2. hot: the same with keep_running = true, and the idle CPU of the running pool.
3. comparison: a get that misses every pool: a template clone hot-plugged to
   384 MiB (source "clone") and a cold boot (base "direct", source "boot").
4. cycles: N get/release cycles from 32 clients against a pool of 8..16 that
   makes callers wait (a generous deadline, so an error is a real failure).
5. sweep: Poisson arrivals at several rates x pool sizes, each request holding
   its VM for an exponential time (mean 2 s); misses fall back to a clone.

Progress goes to stderr; a table (or one JSON object with --json) to stdout;
benchmarks/results/pool.json and pool.png (or under --out DIR) are saved.

    python benchmarks/pool.py [--json] [--quick] [--cycles 1000] [--log-dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.host import (  # noqa: E402
    LOW_WATER_MIB, MemoryGuard, MemoryLow, available_mib, check_room, host_end, host_start)
from benchmarks.lib.leaks import kill_processes, mounts_under, settled_qemu, unmount  # noqa: E402
from benchmarks.lib.output import (  # noqa: E402
    add_out_option, fmt, progress, publish, pyplot, save_figure, table, verdict)
from benchmarks.lib.stats import percentile, stats, summarize  # noqa: E402
from vmfactory.util.spawn import spawn_daemon  # noqa: E402

from vmfactory.server.client import FactoryClient  # noqa: E402
from vmfactory.config import scratch_config  # noqa: E402
from vmfactory.hypervisor.proc import processes_under  # noqa: E402

PREFIX = "pool:"
# The daemons' refills pause under this (daemon.mem_floor_mib), before LOW_WATER_MIB.
MEM_FLOOR_MIB = 3072
# Host memory per VM, with a margin, for the checks before a phase starts.
CLONE_MIB = 160          # a paused or idle clone (measured ~110 MiB PSS)
DIRECT_MIB = 450         # a cold-booted VM (~406 MiB PSS)
TEMPLATE_MIB = 700       # the template VM while it is built, then its RAM file on tmpfs

DAEMON_START_S = 60.0    # spawn -> socket
DAEMON_STOP_S = 180.0    # SIGTERM -> exit (grace + stopping every VM)
FILL_TIMEOUT_S = 900.0   # a pool (re)filling, template build included
GET_TIMEOUT_S = 120.0    # a get that should be a hit, or a clone
BOOT_TIMEOUT_S = 300.0   # a cold boot under TCG on a loaded host
CYCLE_TIMEOUT_S = 300.0  # a cycle's get, waiting for the pool to refill
STATUS_POLL_S = 0.5
IDLE_WINDOW_S = 3.0

TARGET_WARM_MEDIAN_MS = 10.0
TARGET_WARM_P99_MS = 50.0
TARGET_HOT_MEDIAN_MS = 3.0
TARGET_CONCURRENCY = 32
TARGET_CYCLES = 1000

SWEEP_SEED = 20240601
SWEEP_HOLD_MEAN_S = 2.0
SWEEP_HOLD_MAX_S = 10.0
SWEEP_MAX_INFLIGHT = 24
SWEEP_CLIENTS = 8

# --log-dir: where each daemon's log is copied before its directory is removed.
LOG_DIR: Path | None = None


# -- small helpers -----------------------------------------------------------

async def connect(clients: list[FactoryClient]) -> None:
    """Open every client's channel (a cheap RPC) so no measured call pays for it."""
    await asyncio.gather(*(c.config() for c in clients))


async def close_all(clients: list[FactoryClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# -- one daemon process ------------------------------------------------------

class DaemonRun:
    """A daemon process with one pool, in its own /tmp/vmfb-XXXX directory."""

    def __init__(self, label: str, *, min_size: int, max_size: int,
                 keep_running: bool = False, empty: str = "wait") -> None:
        self.label = label
        self.min_size, self.max_size = min_size, max_size
        self.keep_running, self.empty = keep_running, empty
        self.root = Path(tempfile.mkdtemp(prefix="vmfb-", dir="/tmp"))
        self.socket = self.root / "factory.sock"
        self.log_path = self.root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.config = scratch_config(self.root, {
            "vm": {"accel": "tcg"}, "daemon": {"mem_floor_mib": MEM_FLOOR_MIB},
            "store": {"url": f"leveldb://{self.root / 'store.ldb'}"},
            "pools": [{"name": "bench", "min_size": min_size, "max_size": max_size,
                       "keep_running": keep_running, "empty": empty}]})

    def describe(self) -> dict[str, Any]:
        return {"min_size": self.min_size, "max_size": self.max_size,
                "keep_running": self.keep_running, "empty": self.empty}

    async def start(self) -> None:
        self.log_path.unlink(missing_ok=True)
        try:
            self.proc = await asyncio.to_thread(spawn_daemon, self.config, self.socket,
                                                self.log_path, timeout=DAEMON_START_S)
        except RuntimeError as exc:  # its message ends with the daemon log's tail
            raise RuntimeError(f"{self.label}: {exc}") from exc
        progress(f"{PREFIX} {self.label}: daemon pid {self.proc.pid} serving on {self.socket} "
                 f"(pool {self.min_size}..{self.max_size}, keep_running="
                 f"{str(self.keep_running).lower()}, empty={self.empty})")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_findings(self) -> dict[str, Any]:
        """WARNING/ERROR lines, tracebacks, gRPC core messages and slow VM starts in the log."""
        lines = self.log().splitlines()
        warnings = [ln for ln in lines if ln.startswith("WARNING")]
        errors = [ln for ln in lines if ln.startswith(("ERROR", "CRITICAL"))]
        tracebacks = sum(ln.startswith("Traceback") for ln in lines)
        grpc_core = [ln for ln in lines if re.match(r"[IWEF]\d{4} ", ln)]
        kinds = Counter(re.sub(r"[0-9a-f]{8,}|\d+(\.\d+)?", "#", ln)[:160]
                        for ln in warnings + errors)
        # "vm X running (pid P, agent ready in N ms)"; a line followed by "template ... ready"
        # is the template's own cold boot, not a clone.
        starts = []
        for i, ln in enumerate(lines):
            m = re.search(r"vm (\w+) running \(pid \d+, agent ready in (\d+) ms\)", ln)
            if m:
                template = i + 1 < len(lines) and "factory.template: template" in lines[i + 1]
                starts.append({"vm": m.group(1), "agent_ready_ms": int(m.group(2)),
                               "template_boot": template})
        others = [s["agent_ready_ms"] for s in starts if not s["template_boot"]]
        return {"warnings": len(warnings), "errors": len(errors), "tracebacks": tracebacks,
                "kinds": dict(kinds.most_common(8)),
                "samples": (errors + warnings)[:6],
                "grpc_core": len(grpc_core), "grpc_core_samples": grpc_core[:4],
                "vm_starts": len(others),
                "vm_start_ms_median": float(statistics.median(others)) if others else None,
                "vm_start_ms_max": float(max(others)) if others else None,
                "slow_vm_starts": [s for s in starts
                                   if not s["template_boot"] and s["agent_ready_ms"] > 10000]}

    def stop(self) -> dict[str, Any]:
        """SIGTERM, wait, count leftovers, then clean up whatever was left (blocking)."""
        info: dict[str, Any] = {"root": str(self.root)}
        t = time.monotonic()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                info["exit_code"] = self.proc.wait(timeout=DAEMON_STOP_S)
            except subprocess.TimeoutExpired:
                info["exit_code"] = None
                info["stop_timed_out"] = True
                self.proc.kill()
                self.proc.wait(timeout=30)
        info["stop_s"] = round(time.monotonic() - t, 2)
        procs = settled_qemu(self.root)
        pids = [p.info["pid"] for p in procs]
        run = self.root / "run"
        run_entries = sorted(p.name for p in run.iterdir()) if run.is_dir() else []
        mounts = mounts_under(self.root)
        templates = self.root / "templates"
        info.update({
            "leftover_qemu": pids, "leftover_run_entries": run_entries,
            "leftover_mounts": mounts,
            "leaked": len(pids) + len(run_entries) + len(mounts),
            "socket_left": self.socket.exists(),
            "template_entries_left": (sorted(p.name for p in templates.iterdir())
                                      if templates.is_dir() else []),
            "log": self.log_findings()})
        if info["leaked"] or info.get("exit_code") not in (0, None) or info["socket_left"]:
            progress(f"{PREFIX} {self.label}: after stop: exit code {info.get('exit_code')}, "
                     f"{len(pids)} QEMU left, run/ {run_entries}, mounts {mounts}, "
                     f"socket left {info['socket_left']}")
            tail = self.log()[-1500:]
            info["log_tail"] = tail
        else:
            progress(f"{PREFIX} {self.label}: daemon stopped in {info['stop_s']:.1f} s, "
                     f"nothing left behind")
        if LOG_DIR is not None:
            LOG_DIR.mkdir(parents=True, exist_ok=True)
            kept = LOG_DIR / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', self.label)}.log"
            shutil.copyfile(self.log_path, kept)
            info["log_copy"] = str(kept)
        self.cleanup(procs, mounts)
        return info

    def cleanup(self, procs: list[psutil.Process], mounts: list[str]) -> None:
        kill_processes(procs)
        unmount(mounts)
        shutil.rmtree(self.root, ignore_errors=True)


async def run_phase(label: str, daemon: DaemonRun, need_mib: float,
                    body: Callable[[DaemonRun], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
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
        progress(f"{PREFIX} {label}: stopped early: {exc}")
    except Exception as exc:  # noqa: BLE001 - recorded, the other phases still run
        out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        progress(f"{PREFIX} {label}: FAILED: {out['error'][:500]}")
    finally:
        out["daemon"] = daemon.stop()
        out["phase_s"] = round(time.monotonic() - t, 1)
    return out


# -- pool state ----------------------------------------------------------------

async def wait_full(ctl: FactoryClient, label: str,
                    timeout: float = FILL_TIMEOUT_S) -> float:
    """Wait until the pool holds min_size ready VMs and nothing is refilling; seconds waited."""
    t = time.monotonic()
    deadline = t + timeout
    last = ""
    while True:
        st = await ctl.status()
        p = st.pools[0]
        if p.ready >= p.min_size and p.refilling == 0:
            return time.monotonic() - t
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"{label}: pool not full after {timeout:.0f} s "
                               f"(ready {p.ready}/{p.min_size}, refilling {p.refilling})")
        line = f"ready {p.ready}/{p.min_size}, refilling {p.refilling}"
        if line != last and now - t > 5:
            progress(f"{PREFIX} {label}: waiting for the pool: {line}")
            last = line
        await asyncio.sleep(STATUS_POLL_S)


async def pool_counters(ctl: FactoryClient) -> dict[str, int]:
    p = (await ctl.status()).pools[0]
    return {"handouts": p.handouts, "misses": p.misses, "replaced": p.replaced}


async def idle_cpu(ctl: FactoryClient) -> dict[str, Any]:
    """CPU% (100 = one core) of the pooled VMs' QEMU processes over IDLE_WINDOW_S, idle."""
    st = await ctl.status()
    procs = []
    for v in st.vms:
        if v.pid and not v.lease_id:
            try:
                procs.append(psutil.Process(v.pid))
            except psutil.Error:
                pass

    def cpu(p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
            return t.user + t.system
        except psutil.Error:
            return math.nan

    before = [cpu(p) for p in procs]
    host_before = psutil.cpu_times()
    t = time.monotonic()
    await asyncio.sleep(IDLE_WINDOW_S)
    elapsed = time.monotonic() - t
    after = [cpu(p) for p in procs]
    host_after = psutil.cpu_times()
    deltas = [b - a for a, b in zip(before, after) if not (math.isnan(a) or math.isnan(b))]
    total = 100 * sum(deltas) / elapsed
    host_busy = ((host_after.user + host_after.system + host_after.nice)
                 - (host_before.user + host_before.system + host_before.nice))
    return {"vms": len(deltas), "window_s": round(elapsed, 2),
            "total_percent": round(total, 2),
            "per_vm_percent": round(total / len(deltas), 3) if deltas else None,
            "max_vm_percent": round(100 * max(deltas) / elapsed, 2) if deltas else None,
            "host_busy_percent": round(100 * host_busy / elapsed, 1)}


# -- phases 1 and 2: concurrent gets from a full pool -------------------------

async def burst(clients: list[FactoryClient]) -> list[dict[str, Any]]:
    """Every client asks at once; all VMs are released afterwards."""
    go = asyncio.Event()

    async def one(client: FactoryClient) -> dict[str, Any]:
        await go.wait()
        t = time.perf_counter()
        try:
            h = await client.get_vm(timeout=GET_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - counted
            return {"error": f"{type(exc).__name__}: {exc}"[:300],
                    "ms": (time.perf_counter() - t) * 1000}
        return {"ms": (time.perf_counter() - t) * 1000, "server_ms": h.get_ms,
                "source": h.source, "lease_id": h.lease_id}

    tasks = [asyncio.create_task(one(c)) for c in clients]
    try:
        await asyncio.sleep(0)  # every task is now waiting on ``go``
        go.set()
        results = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    released = await asyncio.gather(
        *(c.release(r["lease_id"]) for c, r in zip(clients, results) if "lease_id" in r),
        return_exceptions=True)
    for r in results:
        r.pop("lease_id", None)
    failures = [x for x in released if isinstance(x, BaseException)]
    if failures:
        results.append({"error": f"release: {failures[0]!r}"[:300], "ms": 0.0,
                        "release_errors": len(failures)})
    return results


def latency_body(concurrencies: list[int], rounds_for: Callable[[int], int],
                 label: str) -> Callable[[DaemonRun], Awaitable[dict[str, Any]]]:
    async def body(d: DaemonRun) -> dict[str, Any]:
        out: dict[str, Any] = {"concurrency": {}}
        async with FactoryClient(str(d.socket)) as ctl:
            fill_s = await wait_full(ctl, label)
            out["fill_s"] = round(fill_s, 1)
            progress(f"{PREFIX} {label}: pool of {d.min_size} full after {fill_s:.1f} s; "
                     f"measuring idle CPU for {IDLE_WINDOW_S:g} s")
            out["idle_cpu"] = await idle_cpu(ctl)
            ic = out["idle_cpu"]
            progress(f"{PREFIX} {label}: idle CPU of {ic['vms']} pooled VMs: "
                     f"{ic['total_percent']:.1f}% total, {ic['per_vm_percent']}% per VM "
                     f"(host busy {ic['host_busy_percent']:.0f}%)")
            out["samples"] = {}
            for c in concurrencies:
                clients = [FactoryClient(str(d.socket)) for _ in range(c)]
                samples: list[dict[str, Any]] = []
                try:
                    await connect(clients)
                    rounds = rounds_for(c)
                    for r in range(rounds):
                        await wait_full(ctl, label)
                        res = await burst(clients)
                        samples += res
                        ok = [x["ms"] for x in res if "error" not in x]
                        hits = sum(x.get("source") == "pool" for x in res)
                        progress(f"{PREFIX} {label}: C={c} round {r + 1}/{rounds}: "
                                 f"median {statistics.median(ok) if ok else math.nan:.1f} ms, "
                                 f"max {max(ok) if ok else math.nan:.1f} ms, "
                                 f"{hits}/{c} hits, {len(res) - len(ok)} errors")
                finally:
                    await close_all(clients)
                out["concurrency"][str(c)] = summarize(samples)
                out["samples"][str(c)] = [round(s["ms"], 3) for s in samples if "error" not in s]
            out["pool_counters"] = await pool_counters(ctl)
        return out
    return body


# -- phase 3: gets that miss every pool ------------------------------------------

def comparison_body(n: int) -> Callable[[DaemonRun], Awaitable[dict[str, Any]]]:
    async def body(d: DaemonRun) -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with FactoryClient(str(d.socket)) as ctl:
            fill_s = await wait_full(ctl, "comparison")  # the template is built by now
            out["fill_s"] = round(fill_s, 1)
            for key, kwargs, timeout, want in (
                    ("clone_hotplug", {"cpus": 1, "memory_mib": 384}, GET_TIMEOUT_S, "clone"),
                    ("cold_boot", {"base": "direct"}, BOOT_TIMEOUT_S, "boot")):
                samples = []
                for i in range(n):
                    check_room(DIRECT_MIB, label="comparison")
                    t = time.perf_counter()
                    try:
                        h = await ctl.get_vm(**kwargs, timeout=timeout)
                    except Exception as exc:  # noqa: BLE001 - counted
                        samples.append({"error": f"{type(exc).__name__}: {exc}"[:300]})
                        progress(f"{PREFIX} comparison: {key} [{i + 1}/{n}] failed: {exc}")
                        continue
                    ms = (time.perf_counter() - t) * 1000
                    samples.append({"ms": ms, "server_ms": h.get_ms, "source": h.source,
                                    "memory_mib": h.memory_mib})
                    progress(f"{PREFIX} comparison: {key} [{i + 1}/{n}]: {ms:.0f} ms "
                             f"(source {h.source}, {h.cpus} vCPU, {h.memory_mib} MiB)")
                    if h.source != want:
                        progress(f"{PREFIX} comparison: warning: expected source {want!r}, "
                                 f"got {h.source!r}")
                    await ctl.release(h.lease_id)
                out[key] = summarize(samples)
                out[key]["memory_mib"] = sorted({s["memory_mib"] for s in samples if "ms" in s})
            out["pool_counters"] = await pool_counters(ctl)
        return out
    return body


# -- phase 4: get/release cycles ------------------------------------------------------

def cycles_body(n: int, concurrency: int) -> Callable[[DaemonRun], Awaitable[dict[str, Any]]]:
    async def body(d: DaemonRun) -> dict[str, Any]:
        out: dict[str, Any] = {"requested": n, "concurrency": concurrency}
        every = 50 if n >= 200 else 10
        async with FactoryClient(str(d.socket)) as ctl:
            out["fill_s"] = round(await wait_full(ctl, "cycles"), 1)
            clients = [FactoryClient(str(d.socket)) for _ in range(concurrency)]
            started = done = 0
            errors: list[str] = []
            latencies: list[float] = []
            sources: Counter[str] = Counter()
            budget_s = 300 + 10 * n  # bound: far above ~1-2 s per cycle at 2 refills at once
            t0 = time.monotonic()
            deadline = t0 + budget_s

            async def worker(client: FactoryClient) -> None:
                nonlocal started, done
                while started < n and time.monotonic() < deadline:
                    started += 1
                    t = time.perf_counter()
                    try:
                        h = await client.get_vm(timeout=CYCLE_TIMEOUT_S)
                        latencies.append((time.perf_counter() - t) * 1000)
                        sources[h.source] += 1
                        await client.release(h.lease_id)
                    except Exception as exc:  # noqa: BLE001 - every exception is an error
                        errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    done += 1
                    if done % every == 0 or done == n:
                        el = time.monotonic() - t0
                        progress(f"{PREFIX} cycles: {done}/{n} in {el:.0f} s "
                                 f"({done / el:.2f}/s), {len(errors)} errors, "
                                 f"{available_mib():.0f} MiB available")

            try:
                await connect(clients)
                t0 = time.monotonic()
                deadline = t0 + budget_s
                await asyncio.gather(*(worker(c) for c in clients))
            finally:
                await close_all(clients)
            wall = time.monotonic() - t0
            out.update({"count": done, "errors": len(errors), "wall_s": round(wall, 1),
                        "throughput_per_s": round(done / wall, 3) if wall > 0 else None,
                        "sources": dict(sources),
                        "error_kinds": dict(Counter(re.sub(r"[0-9a-f]{8,}|\d+(\.\d+)?", "#", e)
                                                    for e in errors).most_common(5)),
                        "get_ms": stats(latencies) if latencies else None})
            if done < n:
                out["stopped_early"] = f"time budget of {budget_s} s spent after {done} cycles"
            # Settle, then compare what runs with what the daemon knows about.
            try:
                await wait_full(ctl, "cycles", timeout=300)
            except TimeoutError as exc:
                out["settle_error"] = str(exc)
            st = await ctl.status()
            known = {v.pid for v in st.vms if v.pid}
            running = {p.info["pid"] for p in processes_under(d.root / "run")}
            out["untracked_qemu_before_stop"] = sorted(running - known)
            out["leases_left"] = sum(1 for v in st.vms if v.lease_id)
            out["pool_counters"] = await pool_counters(ctl)
        return out
    return body


# -- phase 5: pool-size x arrival-rate sweep ----------------------------------------

async def sweep_cell(d: DaemonRun, ctl: FactoryClient, clients: list[FactoryClient],
                     rate: float, duration: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    samples: list[dict[str, Any]] = []
    inflight: set[asyncio.Task[None]] = set()
    dropped = 0
    before = await pool_counters(ctl)

    async def request(client: FactoryClient, hold: float) -> None:
        t = time.perf_counter()
        try:
            h = await client.get_vm(timeout=GET_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - counted
            samples.append({"error": f"{type(exc).__name__}: {exc}"[:300]})
            return
        samples.append({"ms": (time.perf_counter() - t) * 1000, "server_ms": h.get_ms,
                        "source": h.source})
        try:
            await asyncio.sleep(hold)
        finally:
            try:
                await client.release(h.lease_id)
            except Exception as exc:  # noqa: BLE001 - counted
                samples.append({"error": f"release: {type(exc).__name__}: {exc}"[:300]})

    t0 = time.monotonic()
    end = t0 + duration
    at = t0 + rng.expovariate(rate)
    i = 0
    try:
        while at < end:
            hold = min(rng.expovariate(1 / SWEEP_HOLD_MEAN_S), SWEEP_HOLD_MAX_S)
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            if len(inflight) >= SWEEP_MAX_INFLIGHT or available_mib() < LOW_WATER_MIB + 1024:
                dropped += 1
            else:
                task = asyncio.create_task(request(clients[i % len(clients)], hold))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                i += 1
            at += rng.expovariate(rate)
        if inflight:
            await asyncio.wait(set(inflight), timeout=GET_TIMEOUT_S + SWEEP_HOLD_MAX_S + 30)
    finally:
        for task in list(inflight):
            task.cancel()
    after = await pool_counters(ctl)
    ok = [s for s in samples if "ms" in s]
    ms = [s["ms"] for s in ok]
    hits = [s["ms"] for s in ok if s["source"] == "pool"]
    misses = [s["ms"] for s in ok if s["source"] != "pool"]
    return {"rate_per_s": rate, "pool_size": d.min_size, "duration_s": duration,
            "requests": len(ok), "errors": len(samples) - len(ok), "dropped": dropped,
            "hits": len(hits), "hit_ratio": round(len(hits) / len(ok), 4) if ok else None,
            "median_ms": round(statistics.median(ms), 3) if ms else None,
            "p90_ms": round(percentile(ms, 90), 3) if ms else None,
            "hit_median_ms": round(statistics.median(hits), 3) if hits else None,
            "miss_median_ms": round(statistics.median(misses), 3) if misses else None,
            "pool_misses": after["misses"] - before["misses"]}


def sweep_body(rates: list[float], duration: float,
               seed: int) -> Callable[[DaemonRun], Awaitable[dict[str, Any]]]:
    async def body(d: DaemonRun) -> dict[str, Any]:
        cells = []
        label = f"sweep size {d.min_size}"
        async with FactoryClient(str(d.socket)) as ctl:
            fill_s = await wait_full(ctl, label)
            progress(f"{PREFIX} {label}: pool full after {fill_s:.1f} s")
            clients = [FactoryClient(str(d.socket)) for _ in range(SWEEP_CLIENTS)]
            try:
                await connect(clients)
                for rate in rates:
                    await wait_full(ctl, label)
                    cell = await sweep_cell(d, ctl, clients, rate, duration,
                                            seed * 1000 + d.min_size * 100 + int(rate * 10))
                    cells.append(cell)
                    progress(f"{PREFIX} {label}: rate {rate:g}/s: {cell['requests']} requests, "
                             f"hit ratio {cell['hit_ratio']}, median {cell['median_ms']} ms, "
                             f"p90 {cell['p90_ms']} ms, {cell['errors']} errors, "
                             f"{cell['dropped']} dropped")
            finally:
                await close_all(clients)
        return {"fill_s": round(fill_s, 1), "cells": cells}
    return body


# -- the run -------------------------------------------------------------------------

def plan(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        return {"concurrencies": [1, 4], "rounds": lambda c: 1, "hot_concurrencies": [1, 4],
                "comparison_n": 1, "cycles": args.cycles or 50,
                "rates": [0.2, 0.5, 1.0], "sizes": [1, 2, 4], "duration": 10.0}
    return {"concurrencies": [1, 8, 32], "rounds": lambda c: 10 if c == 1 else 3 if c <= 8 else 2,
            "hot_concurrencies": [1, 32], "comparison_n": 3, "cycles": args.cycles or 1000,
            "rates": [0.2, 0.5, 1.0], "sizes": [1, 2, 4], "duration": 40.0}


def fit_concurrencies(label: str, wanted: list[int]) -> list[int]:
    """Drop concurrencies whose pool (C+2 paused) plus refills (C) would not fit in memory."""
    kept = []
    for c in wanted:
        need = (2 * c + 2) * CLONE_MIB + TEMPLATE_MIB
        if available_mib() - need >= LOW_WATER_MIB:
            kept.append(c)
        else:
            progress(f"{PREFIX} {label}: skipping C={c}: needs ~{need} MiB, "
                     f"{available_mib():.0f} MiB available")
    return kept


async def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    p = plan(args)
    # No phase daemon runs now: every QEMU process on the host is another's.
    host: dict[str, Any] = {**host_start(), "available_mib_start": round(available_mib())}
    progress(f"{PREFIX} {'quick' if args.quick else 'full'} run; host: {host['cpus']} CPUs, "
             f"load {host['loadavg_start'][0]}, {host['other_qemu_start']} other QEMU processes, "
             f"{host['available_mib_start']} MiB available")
    phases: dict[str, Any] = {}

    # 1. warm (paused) pool
    conc = fit_concurrencies("warm", p["concurrencies"])
    size = max(conc) + 2 if conc else 1
    progress(f"{PREFIX} phase 1/5 warm: paused pool of {size}, concurrency {conc}")
    phases["warm"] = await run_phase(
        "warm", DaemonRun("warm", min_size=size, max_size=size), (2 * size) * CLONE_MIB,
        latency_body(conc, p["rounds"], "warm"))

    # 2. hot (running) pool
    hconc = fit_concurrencies("hot", p["hot_concurrencies"])
    hsize = max(hconc) + 2 if hconc else 1
    progress(f"{PREFIX} phase 2/5 hot: running pool of {hsize}, concurrency {hconc}")
    phases["hot"] = await run_phase(
        "hot", DaemonRun("hot", min_size=hsize, max_size=hsize, keep_running=True),
        (2 * hsize) * CLONE_MIB, latency_body(hconc, p["rounds"], "hot"))

    # 3. misses: clone + hot-plug, cold boot
    progress(f"{PREFIX} phase 3/5 comparison: {p['comparison_n']} clone(s) hot-plugged to "
             f"384 MiB and {p['comparison_n']} cold boot(s)")
    phases["comparison"] = await run_phase(
        "comparison", DaemonRun("comparison", min_size=1, max_size=1),
        TEMPLATE_MIB + DIRECT_MIB + 2 * CLONE_MIB, comparison_body(p["comparison_n"]))

    # 4. cycles
    progress(f"{PREFIX} phase 4/5 cycles: {p['cycles']} get/release cycles at concurrency "
             f"{TARGET_CONCURRENCY}, pool 8..16, empty=wait")
    phases["cycles"] = await run_phase(
        "cycles", DaemonRun("cycles", min_size=8, max_size=16, empty="wait"),
        TEMPLATE_MIB + (16 + TARGET_CONCURRENCY) * CLONE_MIB,
        cycles_body(p["cycles"], TARGET_CONCURRENCY))

    # 5. sweep
    progress(f"{PREFIX} phase 5/5 sweep: rates {p['rates']} /s x pool sizes {p['sizes']}, "
             f"{p['duration']:g} s per cell, empty=fallback")
    sweep_phases = {}
    for s in p["sizes"]:
        sweep_phases[str(s)] = await run_phase(
            f"sweep size {s}", DaemonRun(f"sweep size {s}", min_size=s, max_size=s,
                                         empty="fallback"),
            TEMPLATE_MIB + (s + SWEEP_MAX_INFLIGHT) * CLONE_MIB,
            sweep_body(p["rates"], p["duration"], SWEEP_SEED))
    phases["sweep"] = sweep_phases

    host.update({**host_end(), "available_mib_min": MemoryGuard.lowest()})
    result = assemble(args, p, phases, host)
    result["runtime_s"] = round(time.monotonic() - t_start, 1)
    return result


def assemble(args: argparse.Namespace, p: dict[str, Any], phases: dict[str, Any],
             host: dict[str, Any]) -> dict[str, Any]:
    warm, hot, comp, cyc = (phases[k] for k in ("warm", "hot", "comparison", "cycles"))
    cycles_leaked = None
    if "daemon" in cyc:
        untracked = set(cyc.get("untracked_qemu_before_stop", []))
        after = set(cyc["daemon"]["leftover_qemu"])
        cycles_leaked = (len(untracked | after) + len(cyc["daemon"]["leftover_run_entries"])
                         + len(cyc["daemon"]["leftover_mounts"]) + cyc.get("leases_left", 0))
    sweep_cells = [c for ph in phases["sweep"].values() for c in ph.get("cells", [])]
    all_phases = [warm, hot, comp, cyc, *phases["sweep"].values()]
    result: dict[str, Any] = {
        "benchmark": "pool", "quick": args.quick, "accel": "tcg",
        "refill_concurrency": 2, "mem_floor_mib": MEM_FLOOR_MIB,
        "warm_get_ms": warm.get("concurrency", {}),
        "hot_get_ms": hot.get("concurrency", {}),
        "idle_cpu_percent": {"paused": warm.get("idle_cpu"), "running": hot.get("idle_cpu")},
        "comparison_ms": {
            "pool_hit_paused": warm.get("concurrency", {}).get("1"),
            "pool_hit_running": hot.get("concurrency", {}).get("1"),
            "clone_hotplug_384": comp.get("clone_hotplug"),
            "cold_boot": comp.get("cold_boot")},
        "cycles": {"count": cyc.get("count", 0), "requested": p["cycles"],
                   "concurrency": TARGET_CONCURRENCY, "errors": cyc.get("errors"),
                   "leaked": cycles_leaked, "wall_s": cyc.get("wall_s"),
                   "throughput_per_s": cyc.get("throughput_per_s"),
                   "get_ms": cyc.get("get_ms"), "sources": cyc.get("sources"),
                   "error_kinds": cyc.get("error_kinds"),
                   "leases_left": cyc.get("leases_left"),
                   "untracked_qemu_before_stop": cyc.get("untracked_qemu_before_stop"),
                   "pool_counters": cyc.get("pool_counters"),
                   "stopped_early": cyc.get("stopped_early")},
        "sweep": {"rates": p["rates"], "sizes": p["sizes"], "duration_s": p["duration"],
                  "hold_mean_s": SWEEP_HOLD_MEAN_S, "seed": SWEEP_SEED, "cells": sweep_cells},
        "leaked_total": sum(ph["daemon"]["leaked"] for ph in all_phases if "daemon" in ph),
        "phases": {k: {kk: vv for kk, vv in v.items() if kk not in ("concurrency", "samples",
                                                                   "cells")}
                   for k, v in phases.items() if k != "sweep"}
        | {f"sweep_size_{k}": {kk: vv for kk, vv in v.items() if kk != "cells"}
           for k, v in phases["sweep"].items()},
        "host": host,
        "samples_ms": {"warm": warm.get("samples", {}), "hot": hot.get("samples", {})},
    }
    if "error" in cyc and "cycles" in result:
        result["cycles"]["phase_error"] = cyc["error"]
    result["targets"] = evaluate_targets(result, p)
    return result


def target(description: str, value: Any, ok: bool | None, goal: str) -> dict[str, Any]:
    return {"description": description, "value": value, "goal": goal, "pass": ok}


def evaluate_targets(result: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
    def at_top(d: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
        keys = sorted((k for k, v in d.items() if v and "median" in v), key=int)
        return (keys[-1], d[keys[-1]]) if keys else (None, None)

    def scope(c: str | None) -> str:
        return "" if c == str(TARGET_CONCURRENCY) else f" [measured at C={c}, not 32]"

    wc, w = at_top(result["warm_get_ms"])
    hc, h = at_top(result["hot_get_ms"])
    cy = result["cycles"]
    n_ok = (cy["count"] == cy["requested"] and cy["errors"] == 0 and cy["leaked"] == 0
            if cy["errors"] is not None and cy["leaked"] is not None else None)
    cycles_scope = "" if cy["requested"] >= TARGET_CYCLES else \
        f" [{cy['requested']} cycles, not {TARGET_CYCLES}]"
    return {
        "warm_median": target(f"warm get median at {TARGET_CONCURRENCY} clients{scope(wc)}",
                              w and w["median"], w and w["median"] < TARGET_WARM_MEDIAN_MS,
                              f"< {TARGET_WARM_MEDIAN_MS:g} ms"),
        "warm_p99": target(f"warm get p99 at {TARGET_CONCURRENCY} clients{scope(wc)}",
                           w and w["p99"], w and w["p99"] < TARGET_WARM_P99_MS,
                           f"< {TARGET_WARM_P99_MS:g} ms"),
        "hot_median": target(f"hot (keep_running) get median at {TARGET_CONCURRENCY} "
                             f"clients{scope(hc)}",
                             h and h["median"], h and h["median"] < TARGET_HOT_MEDIAN_MS,
                             f"< {TARGET_HOT_MEDIAN_MS:g} ms"),
        "cycles": target(f"{TARGET_CYCLES} cycles at concurrency {TARGET_CONCURRENCY}"
                         f"{cycles_scope}",
                         f"{cy['count']}/{cy['requested']} done, {cy['errors']} errors, "
                         f"{cy['leaked']} leaked", n_ok, "all done, 0 errors, 0 leaked"),
    }


# -- output -------------------------------------------------------------------------------

def report(result: dict[str, Any]) -> str:
    out = [f"pool benchmark ({'quick' if result['quick'] else 'full'} run), accel tcg, "
           f"refill_concurrency {result['refill_concurrency']}"]
    rows = []
    for kind, key in (("warm (paused)", "warm_get_ms"), ("hot (running)", "hot_get_ms")):
        for c, s in sorted(result[key].items(), key=lambda kv: int(kv[0])):
            if not s or "median" not in s:
                rows.append([kind, c, "n/a", "n/a", "n/a", "n/a", "n/a", s and s.get("errors")])
                continue
            rows.append([kind, c, s["n"], fmt(s["median"], 2), fmt(s["p99"], 2),
                         fmt(s["server_median"], 2), f"{100 * s['hit_fraction']:.0f}%",
                         s["errors"]])
    out.append("get latency from a full pool (client side, ms)")
    out.append(table(["pool", "C", "n", "median", "p99", "daemon median", "hits", "errors"],
                     rows))
    idle = result["idle_cpu_percent"]
    irows = [[k, v["vms"], fmt(v["total_percent"]), fmt(v["per_vm_percent"], 2),
              fmt(v["host_busy_percent"])]
             for k, v in idle.items() if v]
    out.append("")
    out.append(f"idle CPU of the full pool over {IDLE_WINDOW_S:g} s (100% = one core)")
    out.append(table(["pool", "VMs", "total %", "per VM %", "host busy %"], irows))
    out.append("")
    crow = []
    for label, key in (("pool hit (paused, C=1)", "pool_hit_paused"),
                       ("pool hit (running, C=1)", "pool_hit_running"),
                       ("template clone + hot-plug 384 MiB", "clone_hotplug_384"),
                       ("cold boot (base=direct)", "cold_boot")):
        s = result["comparison_ms"].get(key)
        if s and "median" in s:
            crow.append([label, s["n"], fmt(s["median"], 2), fmt(s["min"], 2), fmt(s["max"], 2),
                         ",".join(f"{k}:{v}" for k, v in s["sources"].items())])
        else:
            crow.append([label, 0, "n/a", "n/a", "n/a", ""])
    out.append("a get: pool hit vs miss (client side, ms)")
    out.append(table(["get", "n", "median", "min", "max", "source"], crow))
    out.append("")
    cy = result["cycles"]
    out.append(f"cycles: {cy['count']}/{cy['requested']} get/release cycles at concurrency "
               f"{cy['concurrency']} (pool 8..16, empty=wait) in {fmt(cy['wall_s'])} s = "
               f"{fmt(cy['throughput_per_s'], 2)} cycles/s; {cy['errors']} errors, "
               f"{cy['leaked']} leaked; get median "
               f"{fmt(cy['get_ms'] and cy['get_ms']['median'])} ms, "
               f"p90 {fmt(cy['get_ms'] and cy['get_ms']['p90'])} ms; sources {cy['sources']}")
    if cy.get("error_kinds"):
        out.append(f"  errors: {cy['error_kinds']}")
    if cy.get("phase_error"):
        out.append(f"  phase failed: {cy['phase_error'][:300]}")
    out.append("")
    sw = result["sweep"]
    srows = [[c["pool_size"], f"{c['rate_per_s']:g}", c["requests"],
              "n/a" if c["hit_ratio"] is None else f"{100 * c['hit_ratio']:.0f}%",
              fmt(c["median_ms"]), fmt(c["p90_ms"]), fmt(c["hit_median_ms"]),
              fmt(c["miss_median_ms"]), c["errors"], c["dropped"]]
             for c in sw["cells"]]
    out.append(f"sweep: Poisson arrivals, hold ~exp(mean {sw['hold_mean_s']:g} s), "
               f"{sw['duration_s']:g} s per cell, empty=fallback (latency in ms)")
    out.append(table(["pool", "rate/s", "reqs", "hit ratio", "median", "p90", "hit med",
                      "miss med", "errors", "dropped"], srows))
    out.append("")
    prow = []
    for name, ph in result["phases"].items():
        dd = ph.get("daemon", {})
        lg = dd.get("log", {})
        prow.append([name, fmt(ph.get("phase_s")), fmt(ph.get("fill_s")),
                     dd.get("exit_code"), fmt(dd.get("stop_s")), dd.get("leaked"),
                     lg.get("warnings"), lg.get("errors"), lg.get("grpc_core"),
                     lg.get("vm_starts"), fmt(lg.get("vm_start_ms_median")),
                     fmt(lg.get("vm_start_ms_max")), len(lg.get("slow_vm_starts", [])),
                     (ph.get("error") or ph.get("stopped_early") or "")[:60]])
    out.append("phases (one daemon each; VM starts = clones/boots from the daemon log, "
               "agent ready ms; slow = over 10 s, cold boots included)")
    out.append(table(["phase", "wall s", "fill s", "exit", "stop s", "leaked", "log warn",
                      "log err", "grpc core", "VM starts", "median", "max", "slow",
                      "problem"], prow))
    out.append("")
    out.append("targets")
    out.append(table(["target", "measured", "goal", "result"],
                     [[t["description"], fmt(t["value"], 2), t["goal"], verdict(t)]
                      for t in result["targets"].values()]))
    host = result["host"]
    out.append(f"host: load {host['loadavg_start'][0]} -> {host['loadavg_end'][0]}, other QEMU "
               f"processes {host['other_qemu_start']} -> {host['other_qemu_end']}, lowest "
               f"available memory {host['available_mib_min']} MiB")
    rt = result["runtime_s"]
    out.append(f"runtime {int(rt // 60)} min {rt % 60:.0f} s")
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path) -> None:
    fig, (ax1, ax2, ax3) = pyplot().subplots(1, 3, figsize=(17, 5))
    for key, label, color, dx in (("warm_get_ms", "warm (paused)", "C0", 0.97),
                                  ("hot_get_ms", "hot (running)", "C1", 1.03)):
        items = sorted(((int(c), s) for c, s in result[key].items() if s and "median" in s))
        if not items:
            continue
        xs = [c * dx for c, _ in items]
        ax1.plot(xs, [s["median"] for _, s in items], marker="o", color=color,
                 label=f"{label} median")
        ax1.scatter(xs, [s["p99"] for _, s in items], marker="v", color=color, s=60,
                    label=f"{label} p99")
        for x, (_, s) in zip(xs, items):
            ax1.vlines(x, s["median"], s["p99"], color=color, alpha=0.4)
    ax1.axhline(TARGET_WARM_MEDIAN_MS, color="C0", ls=":", lw=1, label="warm median target")
    ax1.axhline(TARGET_WARM_P99_MS, color="C0", ls="--", lw=1, label="warm p99 target")
    ax1.axhline(TARGET_HOT_MEDIAN_MS, color="C1", ls=":", lw=1, label="hot median target")
    ax1.set_xscale("log", base=2)
    ticks = sorted({int(c) for key in ("warm_get_ms", "hot_get_ms") for c in result[key]})
    if ticks:
        ax1.set_xticks(ticks, [str(t) for t in ticks])
        ax1.set_xticks([], minor=True)
    ax1.set_yscale("log")
    ax1.set(xlabel="concurrent clients", ylabel="client-side get latency (ms)",
            title="Get from a full pool")
    ax1.legend(fontsize=7)

    labels, values, colors = [], [], []
    for label, key, color in (("pool hit\n(paused)", "pool_hit_paused", "C0"),
                              ("pool hit\n(running)", "pool_hit_running", "C1"),
                              ("clone +\nhot-plug", "clone_hotplug_384", "C2"),
                              ("cold boot", "cold_boot", "C3")):
        s = result["comparison_ms"].get(key)
        if s and "median" in s:
            labels.append(label)
            values.append(s["median"])
            colors.append(color)
    bars = ax2.bar(labels, values, color=colors)
    for b, v in zip(bars, values):
        ax2.text(b.get_x() + b.get_width() / 2, v * 1.1, f"{v:.1f} ms" if v < 1000 else
                 f"{v / 1000:.1f} s", ha="center", fontsize=8)
    ax2.set_yscale("log")
    ax2.set(ylabel="client-side latency, median (ms)", title="A get: pool hit vs miss (C=1)")

    sw = result["sweep"]
    rates, sizes = sw["rates"], sw["sizes"]
    grid = [[math.nan] * len(rates) for _ in sizes]
    notes = [[""] * len(rates) for _ in sizes]
    for c in sw["cells"]:
        if c["pool_size"] in sizes and c["rate_per_s"] in rates and c["hit_ratio"] is not None:
            i, j = sizes.index(c["pool_size"]), rates.index(c["rate_per_s"])
            grid[i][j] = c["hit_ratio"]
            notes[i][j] = f"{100 * c['hit_ratio']:.0f}%\nmed {c['median_ms']:.0f} ms\n" \
                          f"n={c['requests']}"
    im = ax3.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, origin="lower", aspect="auto")
    for i in range(len(sizes)):
        for j in range(len(rates)):
            if notes[i][j]:
                ax3.text(j, i, notes[i][j], ha="center", va="center", fontsize=8)
    ax3.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
    ax3.set_yticks(range(len(sizes)), [str(s) for s in sizes])
    ax3.set(xlabel="arrival rate (requests/s)", ylabel="pool size",
            title=f"Hit ratio (Poisson arrivals, hold ~{sw['hold_mean_s']:g} s)")
    fig.colorbar(im, ax=ax3, label="hit ratio")
    fig.suptitle(f"vmfactory pools (TCG{', quick run' if result['quick'] else ''})")
    save_figure(fig, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of a few minutes (fewer rounds, C=1,4, 50 cycles, 10 s cells)")
    p.add_argument("--cycles", type=int, default=None,
                   help="get/release cycles in phase 4 (default 1000, --quick 50)")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="copy each phase's daemon log into this directory")
    add_out_option(p)
    args = p.parse_args()
    if args.cycles is not None and args.cycles < 1:
        p.error("--cycles must be at least 1")
    global LOG_DIR
    LOG_DIR = args.log_dir

    async def guarded() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)  # stop the daemons on SIGTERM too
        try:
            return await run(args)
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        result = asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        progress(f"{PREFIX} interrupted ({type(exc).__name__}): the running phase's daemon was "
                 f"stopped and its directory removed; no results saved")
        return 130 if isinstance(exc, KeyboardInterrupt) else 128 + signal.SIGTERM

    publish("pool", result, args.out, as_json=args.json, report=report, plot=plot,
            omit="samples_ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
