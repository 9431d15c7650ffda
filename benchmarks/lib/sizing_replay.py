"""The sizing benchmark's replay: one trace against one daemon's pool.

Each arrival gets its VM (a miss falls back to a clone: the pool is
``empty = "fallback"``), holds it, releases it.  Meanwhile the pool is sampled
every SAMPLE_S through gRPC Status (ready, refilling, target), so idle
VM-seconds are the integral of ``ready`` over the measured span."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from benchmarks.lib.daemon import DaemonRun, wait_full
from benchmarks.lib.output import progress
from benchmarks.lib.pool_phases import GET_TIMEOUT_S, close_all, connect, error_text
from benchmarks.lib.stats import median_or_none, percentile
from benchmarks.lib.traces import HOLD_MAX_S, Arrival, Trace
from vmfactory.server.client import FactoryClient

PREFIX = "sizing:"
SAMPLE_S = 0.5
PROGRESS_S = 30.0
CLIENTS = 8
DRAIN_TIMEOUT_S = GET_TIMEOUT_S + HOLD_MAX_S + 30


class Replay:
    """``trace`` against the pool behind ``clients``; samples and the pool's series."""

    def __init__(self, trace: Trace, clients: list[FactoryClient], ctl: FactoryClient) -> None:
        self.trace, self.clients, self.ctl = trace, clients, ctl
        self.samples: list[dict[str, Any]] = []
        self.series: list[tuple[float, int, int, int]] = []  # (t, ready, refilling, target)
        self.t0 = 0.0

    async def request(self, i: int, arrival: Arrival) -> None:
        client = self.clients[i % len(self.clients)]
        t = time.perf_counter()
        try:
            h = await client.get_vm(timeout=GET_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - counted
            self.samples.append({"at": arrival.at, "error": error_text(exc)})
            return
        self.samples.append({"at": arrival.at, "ms": (time.perf_counter() - t) * 1000,
                             "source": h.source})
        try:
            await asyncio.sleep(arrival.hold)
        finally:
            try:
                await client.release(h.lease_id)
            except Exception as exc:  # noqa: BLE001 - counted
                self.samples.append({"at": arrival.at, "error": error_text(exc, "release: ")})

    async def sample(self) -> None:
        told = 0.0
        while True:
            p = (await self.ctl.status()).pools[0]
            t = time.monotonic() - self.t0
            self.series.append((round(t, 2), p.ready, p.refilling, p.target))
            if t - told >= PROGRESS_S:
                told = t
                done = [s for s in self.samples if "ms" in s]
                progress(f"{PREFIX} {self.trace.name}: {t:.0f}/{self.trace.duration_s:.0f} s, "
                         f"{len(done)} VMs handed out ({sum(s['source'] == 'pool' for s in done)}"
                         f" from the pool), ready {p.ready}, target {p.target}")
            await asyncio.sleep(SAMPLE_S)

    async def run(self) -> None:
        self.t0 = time.monotonic()
        sampler = asyncio.create_task(self.sample())
        tasks: list[asyncio.Task[None]] = []
        try:
            for i, arrival in enumerate(self.trace.arrivals):
                await asyncio.sleep(max(0.0, self.t0 + arrival.at - time.monotonic()))
                tasks.append(asyncio.create_task(self.request(i, arrival)))
            await asyncio.sleep(max(0.0, self.t0 + self.trace.duration_s - time.monotonic()))
            sampler.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
        finally:
            for task in [sampler, *tasks]:
                task.cancel()
            await asyncio.gather(sampler, *tasks, return_exceptions=True)

    def idle_vm_s(self) -> float:
        """Ready VMs integrated over the measured span (each sample holds until the next)."""
        start, end = self.trace.warmup_s, self.trace.duration_s
        total = 0.0
        for (t, ready, _, _), (t_next, *_) in zip(self.series, self.series[1:]):
            lo, hi = max(t, start), min(t_next, end)
            if hi > lo:
                total += ready * (hi - lo)
        return round(total, 1)

    def summary(self) -> dict[str, Any]:
        measured = [s for s in self.samples if s["at"] >= self.trace.warmup_s]
        ok = [s for s in measured if "ms" in s]
        ms = [s["ms"] for s in ok]
        hits = sum(s["source"] == "pool" for s in ok)
        span = [row for row in self.series if row[0] >= self.trace.warmup_s]
        targets = [row[3] for row in span]
        return {"requests": len(ok), "errors": len(measured) - len(ok), "hits": hits,
                "hit_ratio": round(hits / len(ok), 4) if ok else None,
                "p50_ms": median_or_none(ms),
                "p99_ms": round(percentile(ms, 99), 3) if ms else None,
                "idle_vm_s": self.idle_vm_s(),
                "mean_target": round(sum(targets) / len(targets), 2) if targets else None,
                "target_changes": sum(a != b for a, b in zip(targets, targets[1:])),
                "series": self.series}


async def replay(d: DaemonRun, trace: Trace) -> dict[str, Any]:
    """Wait for a full pool, replay ``trace`` against it; the trace's summary."""
    label = d.label
    async with d.client() as ctl:
        fill_s = await wait_full(ctl, label, prefix=PREFIX)
        clients = [d.client() for _ in range(CLIENTS)]
        try:
            await connect(clients)
            progress(f"{PREFIX} {label}: {len(trace.arrivals)} arrivals over "
                     f"{trace.duration_s:.0f} s ({trace.warmup_s:.0f} s warm-up)")
            run = Replay(trace, clients, ctl)
            await run.run()
        finally:
            await close_all(clients)
    out = {"fill_s": round(fill_s, 1), **run.summary()}
    progress(f"{PREFIX} {label}: hit ratio {out['hit_ratio']}, p50 {out['p50_ms']} ms, "
             f"p99 {out['p99_ms']} ms, idle {out['idle_vm_s']} VM-s, mean target "
             f"{out['mean_target']}, {out['errors']} errors")
    return out
