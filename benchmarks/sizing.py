"""Sizing benchmark: the adaptive pool-size policy against fixed pool sizes.

Every policy and trace gets its own daemon (real QEMU, TCG; nothing learnt on
one trace carries over to the next) with one pool, ``empty = "fallback"`` (a
miss is served by a template clone): fixed sizes (min = max = k) and ``sizing =
"adaptive"`` between 1 and 8.  Each replays the same three arrival traces
(benchmarks/lib/traces.py: steady Poisson, bursty, diurnal), each request
holding its VM ~exp(2 s).  Over each trace's measured
span (after a warm-up): hit ratio (the VM came from the pool), p50/p99 GetVM
latency on the client, idle VM-seconds (ready VMs integrated over time, from
gRPC Status every 0.5 s) and the adaptive pool's mean target.

Acceptance (bursty trace): adaptive reaches at least the hit ratio of the best
fixed size, with fewer idle VM-seconds.

Progress goes to stderr; a table (or one JSON object with --json) to stdout;
benchmarks/results/sizing.json and sizing.png (or under --out DIR) are saved.

    python benchmarks/sizing.py [--json] [--quick] [--seed N] [--log-dir DIR] [--out DIR]
                                [--traces bursty,...] [--sizes 4,8]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.daemon import DaemonRun, run_phase  # noqa: E402
from benchmarks.lib.host import (  # noqa: E402
    MemoryGuard, available_mib, cancel_on_sigterm, host_end, host_start, interrupted_exit)
from benchmarks.lib.output import add_out_option, progress, publish  # noqa: E402
from benchmarks.lib.pool_phases import CLONE_MIB, TEMPLATE_MIB  # noqa: E402
from benchmarks.lib.sizing_replay import CLIENTS, PREFIX, replay  # noqa: E402
from benchmarks.lib.sizing_report import ADAPTIVE, bursty_target, plot, report  # noqa: E402
from benchmarks.lib.traces import Trace, traces  # noqa: E402

SEED = 20261203
ADAPTIVE_MAX = 8


def plan(quick: bool) -> dict[str, Any]:
    """Fixed sizes, the warm-up and each trace's measured span (seconds)."""
    if quick:
        return {"sizes": [1, 4], "warmup_s": 10.0,
                "measured_s": {"steady": 30.0, "bursty": 40.0, "diurnal": 40.0}}
    return {"sizes": [1, 2, 4, 8], "warmup_s": 30.0,
            "measured_s": {"steady": 120.0, "bursty": 160.0, "diurnal": 180.0}}


def policy_run(label: str, log_dir: Path | None) -> DaemonRun:
    name = label.rsplit("-", 1)[0]
    if name == ADAPTIVE:
        return DaemonRun(label, min_size=1, max_size=ADAPTIVE_MAX, empty="fallback",
                         sizing="adaptive", log_dir=log_dir, prefix=PREFIX)
    size = int(name.removeprefix("fixed-"))
    return DaemonRun(label, min_size=size, max_size=size, empty="fallback", log_dir=log_dir,
                     prefix=PREFIX)


async def policy_phase(name: str, all_traces: list[Trace], log_dir: Path | None,
                       step: str) -> dict[str, Any]:
    """A fresh daemon per trace; the per-trace summaries, each with its daemon's stop."""
    size = ADAPTIVE_MAX if name == ADAPTIVE else int(name.removeprefix("fixed-"))
    need = TEMPLATE_MIB + (2 * size + 2 * CLIENTS) * CLONE_MIB
    out = {}
    for trace in all_traces:
        async def body(d: DaemonRun, trace: Trace = trace) -> dict[str, Any]:
            return await replay(d, trace)
        progress(f"{PREFIX} {step} {name}: {trace.name} ({trace.shape})")
        out[trace.name] = await run_phase(f"{name} {trace.name}",
                                          policy_run(f"{name}-{trace.name}", log_dir),
                                          need, body)
    return out


def by_trace(phases: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """traces[trace][policy] = summary (the pool's series kept for adaptive only)."""
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    for policy, runs in phases.items():
        for n in names:
            cell = dict(runs.get(n) or {"error": "not run"})
            cell.pop("daemon", None)
            if policy != ADAPTIVE:
                cell.pop("series", None)
            out[n][policy] = cell
    return out


def daemons(phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each daemon's stop: exit code, leftovers, its log's findings."""
    return {f"{policy} {n}": run.get("daemon") for policy, runs in phases.items()
            for n, run in runs.items()}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    p = plan(args.quick)
    if args.sizes:
        p["sizes"] = args.sizes
    all_traces = [t for t in traces(args.seed, p["warmup_s"], p["measured_s"])
                  if not args.traces or t.name in args.traces]
    host: dict[str, Any] = {**host_start(), "available_mib_start": round(available_mib())}
    policies = [f"fixed-{s}" for s in p["sizes"]] + [ADAPTIVE]
    progress(f"{PREFIX} {'quick' if args.quick else 'full'} run: policies {policies}, "
             f"{sum(t.duration_s for t in all_traces):.0f} s of traces each")
    phases = {}
    for i, name in enumerate(policies):
        phases[name] = await policy_phase(name, all_traces, args.log_dir,
                                          f"[{i + 1}/{len(policies)}]")
    host.update({**host_end(), "available_mib_min": MemoryGuard.lowest()})
    cells = by_trace(phases, [t.name for t in all_traces])
    return {"benchmark": "sizing", "quick": args.quick, "accel": "tcg", "seed": args.seed,
            "plan": p, "adaptive": {"min_size": 1, "max_size": ADAPTIVE_MAX},
            "trace_shapes": {t.name: {"shape": t.shape, "warmup_s": t.warmup_s,
                                      "measured_s": t.measured_s,
                                      "arrivals_at": [round(a.at, 2) for a in t.arrivals]}
                             for t in all_traces},
            "traces": cells, "target": bursty_target(cells.get("bursty", {})),
            "daemons": daemons(phases),
            "leaked_total": sum((d or {}).get("leaked", 0) for d in daemons(phases).values()),
            "host": host, "runtime_s": round(time.monotonic() - t_start, 1)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of a few minutes (fixed sizes 1 and 4, short traces)")
    p.add_argument("--seed", type=int, default=SEED, help="the traces' seed")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="copy each policy's daemon log into this directory")
    p.add_argument("--traces", type=lambda v: v.split(","), default=None,
                   help="only these traces (comma-separated: steady,bursty,diurnal)")
    p.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   help="fixed sizes to compare (default 1,2,4,8; quick 1,4)")
    add_out_option(p)
    args = p.parse_args()
    known = {"steady", "bursty", "diurnal"}
    if args.traces and not set(args.traces) <= known:
        p.error(f"--traces: one of {sorted(known)}")
    if args.sizes and not all(1 <= s <= 32 for s in args.sizes):
        p.error("--sizes: each in 1..32")
    return args


def main() -> int:
    args = parse_args()
    try:
        result = asyncio.run(cancel_on_sigterm(run(args)))  # SIGTERM stops the daemons too
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        progress(f"{PREFIX} interrupted ({type(exc).__name__}): the running policy's daemon "
                 f"was stopped and its directory removed; no results saved")
        return interrupted_exit(exc)
    publish("sizing", result, args.out, as_json=args.json, report=report, plot=plot,
            omit="trace_shapes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
