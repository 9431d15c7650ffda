"""The pool benchmark's phases 4 and 5: get/release cycles from many clients against
a pool that makes callers wait, and Poisson arrivals at several rates against pools
of several sizes (a miss falls back to a clone)."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.lib.daemon import PREFIX, Body, DaemonRun, pool_counters, wait_full
from benchmarks.lib.host import LOW_WATER_MIB, available_mib
from benchmarks.lib.output import progress
from benchmarks.lib.pool_phases import GET_TIMEOUT_S, close_all, connect, error_text
from benchmarks.lib.stats import count_kinds, median_or_none, percentile, stats
from benchmarks.lib.workers import Worker, start_workers, stop_workers
from vmfactory.hypervisor.proc import processes_under
from vmfactory.server.client import FactoryClient

CYCLE_TIMEOUT_S = 300.0  # a cycle's get, waiting for the pool to refill
SETTLE_TIMEOUT_S = 300.0

SWEEP_SEED = 20240601
SWEEP_HOLD_MEAN_S = 2.0
SWEEP_HOLD_MAX_S = 10.0
SWEEP_MAX_INFLIGHT = 24
SWEEP_CLIENTS = 8
SWEEP_SPARE_MIB = 1024   # an arrival is dropped when available memory is this close to LOW_WATER


# -- phase 4: get/release cycles ------------------------------------------------------

class Cycles:
    """``n`` get/release cycles shared by concurrent workers, within a time budget."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.started = self.done = 0
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.server_ms: list[float] = []
        self.sources: Counter[str] = Counter()
        self.every = 50 if n >= 200 else 10
        self.budget_s = 300 + 10 * n  # bound: far above ~1-2 s per cycle at 2 refills at once
        self.t0 = time.monotonic()
        self.deadline = self.t0 + self.budget_s

    async def run(self, socket: Path, concurrency: int) -> float:
        """Every client process works until the cycles or the budget are spent; the wall
        time."""
        workers = await start_workers(socket, concurrency)
        try:
            self.t0 = time.monotonic()
            self.deadline = self.t0 + self.budget_s
            await asyncio.gather(*(self.worker(w) for w in workers))
        finally:
            await stop_workers(workers)
        return time.monotonic() - self.t0

    async def worker(self, worker: Worker) -> None:
        while self.started < self.n and time.monotonic() < self.deadline:
            self.started += 1
            await self.cycle(worker)
            self.done += 1
            if self.done % self.every == 0 or self.done == self.n:
                el = time.monotonic() - self.t0
                progress(f"{PREFIX} cycles: {self.done}/{self.n} in {el:.0f} s "
                         f"({self.done / el:.2f}/s), {len(self.errors)} errors, "
                         f"{available_mib():.0f} MiB available")

    async def cycle(self, worker: Worker) -> None:
        got = await worker.get(CYCLE_TIMEOUT_S)
        if "error" in got:
            self.errors.append(got["error"])
            return
        self.latencies.append(got["ms"])
        self.server_ms.append(got["server_ms"])
        self.sources[got["source"]] += 1
        released = await worker.release()
        if "error" in released:
            self.errors.append(released["error"])

    def summary(self, wall: float) -> dict[str, Any]:
        out = {"count": self.done, "errors": len(self.errors), "wall_s": round(wall, 1),
               "throughput_per_s": round(self.done / wall, 3) if wall > 0 else None,
               "sources": dict(self.sources), "error_kinds": count_kinds(self.errors, 5),
               "get_ms": stats(self.latencies) if self.latencies else None,
               "server_get_ms": stats(self.server_ms) if self.server_ms else None}
        if self.done < self.n:
            out["stopped_early"] = (f"time budget of {self.budget_s} s spent after "
                                    f"{self.done} cycles")
        return out


async def settle(d: DaemonRun, ctl: FactoryClient) -> dict[str, Any]:
    """Let the pool refill, then compare what runs with what the daemon knows about."""
    out: dict[str, Any] = {}
    try:
        await wait_full(ctl, "cycles", timeout=SETTLE_TIMEOUT_S)
    except TimeoutError as exc:
        out["settle_error"] = str(exc)
    st = await ctl.status()
    known = {v.pid for v in st.vms if v.pid}
    running = {p.info["pid"] for p in processes_under(d.root / "run")}
    out["untracked_qemu_before_stop"] = sorted(running - known)
    out["leases_left"] = sum(1 for v in st.vms if v.lease_id)
    out["pool_counters"] = await pool_counters(ctl)
    return out


def cycles_body(n: int, concurrency: int) -> Body:
    async def body(d: DaemonRun) -> dict[str, Any]:
        out: dict[str, Any] = {"requested": n, "concurrency": concurrency}
        async with d.client() as ctl:
            out["fill_s"] = round(await wait_full(ctl, "cycles"), 1)
            cycles = Cycles(n)
            wall = await cycles.run(d.socket, concurrency)
            out.update(cycles.summary(wall))
            out.update(await settle(d, ctl))
        return out
    return body


# -- phase 5: pool-size x arrival-rate sweep ----------------------------------------

class SweepCell:
    """Poisson arrivals at ``rate``/s, each holding its VM ~exp(SWEEP_HOLD_MEAN_S)."""

    def __init__(self, clients: list[FactoryClient], rate: float, seed: int) -> None:
        self.clients, self.rate = clients, rate
        self.rng = random.Random(seed)
        self.samples: list[dict[str, Any]] = []
        self.inflight: set[asyncio.Task[None]] = set()
        self.dropped = 0

    async def request(self, client: FactoryClient, hold: float) -> None:
        t = time.perf_counter()
        try:
            h = await client.get_vm(timeout=GET_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - counted
            self.samples.append({"error": error_text(exc)})
            return
        self.samples.append({"ms": (time.perf_counter() - t) * 1000, "server_ms": h.get_ms,
                             "source": h.source})
        try:
            await asyncio.sleep(hold)
        finally:
            try:
                await client.release(h.lease_id)
            except Exception as exc:  # noqa: BLE001 - counted
                self.samples.append({"error": error_text(exc, "release: ")})

    def arrive(self, i: int, hold: float) -> bool:
        """Start request ``i``, or drop it (too many in flight, memory low); started?"""
        if len(self.inflight) >= SWEEP_MAX_INFLIGHT or \
                available_mib() < LOW_WATER_MIB + SWEEP_SPARE_MIB:
            self.dropped += 1
            return False
        task = asyncio.create_task(self.request(self.clients[i % len(self.clients)], hold))
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)
        return True

    async def run(self, duration: float) -> None:
        t0 = time.monotonic()
        end = t0 + duration
        at = t0 + self.rng.expovariate(self.rate)
        i = 0
        try:
            while at < end:
                hold = min(self.rng.expovariate(1 / SWEEP_HOLD_MEAN_S), SWEEP_HOLD_MAX_S)
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                if self.arrive(i, hold):
                    i += 1
                at += self.rng.expovariate(self.rate)
            if self.inflight:
                await asyncio.wait(set(self.inflight),
                                   timeout=GET_TIMEOUT_S + SWEEP_HOLD_MAX_S + 30)
        finally:
            for task in list(self.inflight):
                task.cancel()

    def summary(self) -> dict[str, Any]:
        ok = [s for s in self.samples if "ms" in s]
        ms = [s["ms"] for s in ok]
        hits = [s["ms"] for s in ok if s["source"] == "pool"]
        misses = [s["ms"] for s in ok if s["source"] != "pool"]
        return {"requests": len(ok), "errors": len(self.samples) - len(ok),
                "dropped": self.dropped, "hits": len(hits),
                "hit_ratio": round(len(hits) / len(ok), 4) if ok else None,
                "median_ms": median_or_none(ms),
                "p90_ms": round(percentile(ms, 90), 3) if ms else None,
                "hit_median_ms": median_or_none(hits), "miss_median_ms": median_or_none(misses)}


async def sweep_cell(d: DaemonRun, ctl: FactoryClient, clients: list[FactoryClient],
                     rate: float, duration: float, seed: int) -> dict[str, Any]:
    cell = SweepCell(clients, rate, seed)
    before = await pool_counters(ctl)
    await cell.run(duration)
    after = await pool_counters(ctl)
    return {"rate_per_s": rate, "pool_size": d.min_size, "duration_s": duration,
            **cell.summary(), "pool_misses": after["misses"] - before["misses"]}


def report_cell(label: str, rate: float, cell: dict[str, Any]) -> None:
    progress(f"{PREFIX} {label}: rate {rate:g}/s: {cell['requests']} requests, "
             f"hit ratio {cell['hit_ratio']}, median {cell['median_ms']} ms, "
             f"p90 {cell['p90_ms']} ms, {cell['errors']} errors, {cell['dropped']} dropped")


def sweep_body(rates: list[float], duration: float, seed: int) -> Body:
    async def body(d: DaemonRun) -> dict[str, Any]:
        cells = []
        label = f"sweep size {d.min_size}"
        async with d.client() as ctl:
            fill_s = await wait_full(ctl, label)
            progress(f"{PREFIX} {label}: pool full after {fill_s:.1f} s")
            clients = [d.client() for _ in range(SWEEP_CLIENTS)]
            try:
                await connect(clients)
                for rate in rates:
                    await wait_full(ctl, label)
                    cell = await sweep_cell(d, ctl, clients, rate, duration,
                                            seed * 1000 + d.min_size * 100 + int(rate * 10))
                    cells.append(cell)
                    report_cell(label, rate, cell)
            finally:
                await close_all(clients)
        return {"fill_s": round(fill_s, 1), "cells": cells}
    return body
