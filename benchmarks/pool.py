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

Concurrent clients (phases 1, 2 and 4) are separate processes (benchmarks/lib/get_worker.py).

    python benchmarks/pool.py [--json] [--quick] [--cycles 1000] [--phases warm,cycles]
                              [--log-dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.daemon import PREFIX, DaemonRun, run_phase  # noqa: E402
from benchmarks.lib.host import (  # noqa: E402
    LOW_WATER_MIB, MemoryGuard, available_mib, cancel_on_sigterm, host_end, host_start,
    interrupted_exit)
from benchmarks.lib.output import add_out_option, progress, publish  # noqa: E402
from benchmarks.lib.pool_phases import (  # noqa: E402
    CLONE_MIB, DIRECT_MIB, TEMPLATE_MIB, comparison_body, latency_body)
from benchmarks.lib.pool_plot import plot  # noqa: E402
from benchmarks.lib.pool_report import TARGET_CONCURRENCY, assemble, report  # noqa: E402
from benchmarks.lib.pool_traffic import (  # noqa: E402
    SWEEP_MAX_INFLIGHT, SWEEP_SEED, cycles_body, sweep_body)


PHASES = ("warm", "hot", "comparison", "cycles", "sweep")


def plan(quick: bool, cycles: int | None) -> dict[str, Any]:
    """What each phase measures: concurrencies and rounds, comparison gets, cycles, sweep."""
    if quick:
        return {"concurrencies": [1, 4], "rounds": lambda c: 1, "hot_concurrencies": [1, 4],
                "comparison_n": 1, "cycles": cycles or 50,
                "rates": [0.2, 0.5, 1.0], "sizes": [1, 2, 4], "duration": 10.0}
    return {"concurrencies": [1, 8, 32], "rounds": lambda c: 10 if c == 1 else 3 if c <= 8 else 2,
            "hot_concurrencies": [1, 32], "comparison_n": 3, "cycles": cycles or 1000,
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


# -- the five phases, one daemon each ---------------------------------------------

async def latency_phase(kind: str, p: dict[str, Any], log_dir: Path | None) -> dict[str, Any]:
    """Phase 1 (warm: a paused pool) or 2 (hot: keep_running): gets from a full pool."""
    hot = kind == "hot"
    conc = fit_concurrencies(kind, p["hot_concurrencies" if hot else "concurrencies"])
    size = max(conc) + 2 if conc else 1
    progress(f"{PREFIX} phase {2 if hot else 1}/5 {kind}: {'running' if hot else 'paused'} "
             f"pool of {size}, concurrency {conc}")
    return await run_phase(
        kind, DaemonRun(kind, min_size=size, max_size=size, keep_running=hot, log_dir=log_dir),
        (2 * size) * CLONE_MIB, latency_body(conc, p["rounds"], kind))


async def comparison_phase(p: dict[str, Any], log_dir: Path | None) -> dict[str, Any]:
    n = p["comparison_n"]
    progress(f"{PREFIX} phase 3/5 comparison: {n} clone(s) hot-plugged to 384 MiB and "
             f"{n} cold boot(s)")
    return await run_phase(
        "comparison", DaemonRun("comparison", min_size=1, max_size=1, log_dir=log_dir),
        TEMPLATE_MIB + DIRECT_MIB + 2 * CLONE_MIB, comparison_body(n))


async def cycles_phase(p: dict[str, Any], log_dir: Path | None) -> dict[str, Any]:
    progress(f"{PREFIX} phase 4/5 cycles: {p['cycles']} get/release cycles at concurrency "
             f"{TARGET_CONCURRENCY}, pool 8..16, empty=wait")
    return await run_phase(
        "cycles", DaemonRun("cycles", min_size=8, max_size=16, empty="wait", log_dir=log_dir),
        TEMPLATE_MIB + (16 + TARGET_CONCURRENCY) * CLONE_MIB,
        cycles_body(p["cycles"], TARGET_CONCURRENCY))


async def sweep_phases(p: dict[str, Any], log_dir: Path | None) -> dict[str, Any]:
    """Phase 5: one daemon per pool size, each swept over every rate."""
    progress(f"{PREFIX} phase 5/5 sweep: rates {p['rates']} /s x pool sizes {p['sizes']}, "
             f"{p['duration']:g} s per cell, empty=fallback")
    out = {}
    for s in p["sizes"]:
        label = f"sweep size {s}"
        out[str(s)] = await run_phase(
            label, DaemonRun(label, min_size=s, max_size=s, empty="fallback", log_dir=log_dir),
            TEMPLATE_MIB + (s + SWEEP_MAX_INFLIGHT) * CLONE_MIB,
            sweep_body(p["rates"], p["duration"], SWEEP_SEED))
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    p = plan(args.quick, args.cycles)
    # No phase daemon runs now: every QEMU process on the host is another's.
    host: dict[str, Any] = {**host_start(), "available_mib_start": round(available_mib())}
    progress(f"{PREFIX} {'quick' if args.quick else 'full'} run; host: {host['cpus']} CPUs, "
             f"load {host['loadavg_start'][0]}, {host['other_qemu_start']} other QEMU processes, "
             f"{host['available_mib_start']} MiB available")
    runs = {"warm": lambda: latency_phase("warm", p, args.log_dir),
            "hot": lambda: latency_phase("hot", p, args.log_dir),
            "comparison": lambda: comparison_phase(p, args.log_dir),
            "cycles": lambda: cycles_phase(p, args.log_dir),
            "sweep": lambda: sweep_phases(p, args.log_dir)}
    phases: dict[str, Any] = {}
    for name, phase in runs.items():
        skipped: dict[str, Any] = {} if name == "sweep" else {"skipped": True}
        phases[name] = await phase() if name in args.phases else skipped
    host.update({**host_end(), "available_mib_min": MemoryGuard.lowest()})
    result = assemble(args.quick, p, phases, host)
    result["runtime_s"] = round(time.monotonic() - t_start, 1)
    return result


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of a few minutes (fewer rounds, C=1,4, 50 cycles, 10 s cells)")
    p.add_argument("--cycles", type=int, default=None,
                   help="get/release cycles in phase 4 (default 1000, --quick 50)")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="copy each phase's daemon log into this directory")
    p.add_argument("--phases", type=lambda v: v.split(","), default=list(PHASES),
                   help=f"comma-separated phases to run (default all: {','.join(PHASES)})")
    add_out_option(p)
    args = p.parse_args()
    if not set(args.phases) <= set(PHASES):
        p.error(f"--phases takes some of {','.join(PHASES)}")
    if args.cycles is not None and args.cycles < 1:
        p.error("--cycles must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    try:
        result = asyncio.run(cancel_on_sigterm(run(args)))  # SIGTERM stops the daemons too
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        progress(f"{PREFIX} interrupted ({type(exc).__name__}): the running phase's daemon was "
                 f"stopped and its directory removed; no results saved")
        return interrupted_exit(exc)
    publish("pool", result, args.out, as_json=args.json, report=report, plot=plot,
            omit="samples_ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
