"""The pool benchmark's phases 1 to 3: concurrent gets from a full pool (warm =
paused, hot = running) with the full pool's idle CPU, and gets that miss every
pool (a template clone hot-plugged to 384 MiB, a cold boot).  Concurrent clients
are separate processes (``workers``): the daemon is measured, not one client's
event loop; every sample has the client's time and the daemon's own (get_ms)."""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import psutil

from benchmarks.lib.daemon import PREFIX, Body, DaemonRun, pool_counters, wait_full
from benchmarks.lib.host import check_room
from benchmarks.lib.output import progress
from benchmarks.lib.stats import summarize
from benchmarks.lib.workers import Worker, start_workers, stop_workers
from vmfactory.server.client import FactoryClient

# Host memory per VM, with a margin, for the checks before a phase starts.
CLONE_MIB = 160          # a paused or idle clone (measured ~110 MiB PSS)
DIRECT_MIB = 450         # a cold-booted VM (~406 MiB PSS)
TEMPLATE_MIB = 700       # the template VM while it is built, then its RAM file on tmpfs

GET_TIMEOUT_S = 120.0    # a get that should be a hit, or a clone
BOOT_TIMEOUT_S = 300.0   # a cold boot under TCG on a loaded host
IDLE_WINDOW_S = 3.0
# The comparison's misses: (result key, get_vm arguments, timeout, expected source).
MISSES: tuple[tuple[str, dict[str, Any], float, str], ...] = (
    ("clone_hotplug", {"cpus": 1, "memory_mib": 384}, GET_TIMEOUT_S, "clone"),
    ("cold_boot", {"base": "direct"}, BOOT_TIMEOUT_S, "boot"))


async def connect(clients: list[FactoryClient]) -> None:
    """Open every client's channel (a cheap RPC) so no measured call pays for it."""
    await asyncio.gather(*(c.config() for c in clients))


async def close_all(clients: list[FactoryClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def error_text(exc: BaseException, prefix: str = "") -> str:
    return f"{prefix}{type(exc).__name__}: {exc}"[:300]


# -- idle CPU of a full pool --------------------------------------------------

def cpu_seconds(p: psutil.Process) -> float:
    try:
        t = p.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return math.nan


def host_busy_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.system + t.nice


async def pooled_processes(ctl: FactoryClient) -> list[psutil.Process]:
    """The QEMU processes of the pooled (not leased) VMs."""
    procs = []
    for v in (await ctl.status()).vms:
        if v.pid and not v.lease_id:
            try:
                procs.append(psutil.Process(v.pid))
            except psutil.Error:
                pass
    return procs


async def idle_cpu(ctl: FactoryClient) -> dict[str, Any]:
    """CPU% (100 = one core) of the pooled VMs' QEMU processes over IDLE_WINDOW_S, idle."""
    procs = await pooled_processes(ctl)
    before = [cpu_seconds(p) for p in procs]
    host_before = host_busy_seconds()
    t = time.monotonic()
    await asyncio.sleep(IDLE_WINDOW_S)
    elapsed = time.monotonic() - t
    after = [cpu_seconds(p) for p in procs]
    host_busy = host_busy_seconds() - host_before
    deltas = [b - a for a, b in zip(before, after) if not (math.isnan(a) or math.isnan(b))]
    total = 100 * sum(deltas) / elapsed
    return {"vms": len(deltas), "window_s": round(elapsed, 2),
            "total_percent": round(total, 2),
            "per_vm_percent": round(total / len(deltas), 3) if deltas else None,
            "max_vm_percent": round(100 * max(deltas) / elapsed, 2) if deltas else None,
            "host_busy_percent": round(100 * host_busy / elapsed, 1)}


# -- phases 1 and 2: concurrent gets from a full pool -------------------------

async def release_all(workers: list[Worker], results: list[dict[str, Any]]) -> None:
    """Every worker gives back what its get leased; a failed release is an error sample."""
    released = await asyncio.gather(*(w.release() for w in workers))
    failures = [x["error"] for x in released if "error" in x]
    if failures:
        results.append({"error": failures[0], "ms": 0.0, "release_errors": len(failures)})


async def burst(workers: list[Worker]) -> list[dict[str, Any]]:
    """Every client process asks at once; all VMs are released afterwards."""
    results = list(await asyncio.gather(*(w.get(GET_TIMEOUT_S) for w in workers)))
    await release_all(workers, results)
    return results


async def fill_and_idle(ctl: FactoryClient, d: DaemonRun, label: str) -> dict[str, Any]:
    """Wait for the full pool, then measure its idle CPU."""
    fill_s = await wait_full(ctl, label)
    progress(f"{PREFIX} {label}: pool of {d.min_size} full after {fill_s:.1f} s; "
             f"measuring idle CPU for {IDLE_WINDOW_S:g} s")
    ic = await idle_cpu(ctl)
    progress(f"{PREFIX} {label}: idle CPU of {ic['vms']} pooled VMs: "
             f"{ic['total_percent']:.1f}% total, {ic['per_vm_percent']}% per VM "
             f"(host busy {ic['host_busy_percent']:.0f}%)")
    return {"fill_s": round(fill_s, 1), "idle_cpu": ic}


def report_round(label: str, c: int, r: int, rounds: int, res: list[dict[str, Any]]) -> None:
    ok = [x["ms"] for x in res if "error" not in x]
    hits = sum(x.get("source") == "pool" for x in res)
    progress(f"{PREFIX} {label}: C={c} round {r + 1}/{rounds}: "
             f"median {statistics.median(ok) if ok else math.nan:.1f} ms, "
             f"max {max(ok) if ok else math.nan:.1f} ms, "
             f"{hits}/{c} hits, {len(res) - len(ok)} errors")


async def at_concurrency(d: DaemonRun, ctl: FactoryClient, label: str, c: int,
                         rounds: int) -> list[dict[str, Any]]:
    """``rounds`` bursts of ``c`` client processes, each from a full pool; every sample."""
    workers = await start_workers(d.socket, c)
    samples: list[dict[str, Any]] = []
    try:
        for r in range(rounds):
            await wait_full(ctl, label)
            res = await burst(workers)
            samples += res
            report_round(label, c, r, rounds, res)
    finally:
        await stop_workers(workers)
    return samples


def latency_body(concurrencies: list[int], rounds_for: Callable[[int], int],
                 label: str) -> Body:
    async def body(d: DaemonRun) -> dict[str, Any]:
        out: dict[str, Any] = {"concurrency": {}}
        async with d.client() as ctl:
            out.update(await fill_and_idle(ctl, d, label))
            out["samples"] = {}
            for c in concurrencies:
                samples = await at_concurrency(d, ctl, label, c, rounds_for(c))
                out["concurrency"][str(c)] = summarize(samples)
                out["samples"][str(c)] = [round(s["ms"], 3) for s in samples if "error" not in s]
            out["pool_counters"] = await pool_counters(ctl)
        return out
    return body


# -- phase 3: gets that miss every pool ------------------------------------------

async def miss_get(ctl: FactoryClient, key: str, kwargs: dict[str, Any], timeout: float,
                   want: str, step: str) -> dict[str, Any]:
    """One get that misses the pool, released at once; its sample."""
    check_room(DIRECT_MIB, label="comparison")
    t = time.perf_counter()
    try:
        h = await ctl.get_vm(**kwargs, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - counted
        progress(f"{PREFIX} comparison: {key} {step} failed: {exc}")
        return {"error": error_text(exc)}
    ms = (time.perf_counter() - t) * 1000
    progress(f"{PREFIX} comparison: {key} {step}: {ms:.0f} ms "
             f"(source {h.source}, {h.cpus} vCPU, {h.memory_mib} MiB)")
    if h.source != want:
        progress(f"{PREFIX} comparison: warning: expected source {want!r}, got {h.source!r}")
    await ctl.release(h.lease_id)
    return {"ms": ms, "server_ms": h.get_ms, "source": h.source, "memory_mib": h.memory_mib}


def comparison_body(n: int) -> Body:
    async def body(d: DaemonRun) -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with d.client() as ctl:
            out["fill_s"] = round(await wait_full(ctl, "comparison"), 1)  # the template is built
            for key, kwargs, timeout, want in MISSES:
                samples = [await miss_get(ctl, key, kwargs, timeout, want, f"[{i + 1}/{n}]")
                           for i in range(n)]
                out[key] = summarize(samples)
                out[key]["memory_mib"] = sorted({s["memory_mib"] for s in samples if "ms" in s})
            out["pool_counters"] = await pool_counters(ctl)
        return out
    return body
