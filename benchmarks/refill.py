"""Refill benchmark: does a pool's refill slow the VM just handed out?

A/B in one run, one daemon each (real QEMU, TCG; a pool of 2 with the container
warm-up): ``daemon.refill_nice`` 0 (refills compete) against 19 (the default:
refills yield).  Each round waits until the pool is full, takes a VM (which
starts a refill: a clone and its warm-up container, 1-2 s of CPU), and times
agent round trips (Ping over gRPC) on the leased VM while the refill runs, then
releases it.  Reported: the leased VM's ping latency (median/p90) and the GetVM
latency, per setting, and the refill's duration.

Progress goes to stderr; a table (or one JSON object with --json) to stdout;
benchmarks/results/refill.json and refill.png (or under --out DIR) are saved.

    python benchmarks/refill.py [-n 8] [--pings 20] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.daemon import Body, DaemonRun, run_phase, wait_full  # noqa: E402
from benchmarks.lib.host import cancel_on_sigterm, host_end, host_start, interrupted_exit  # noqa: E402
from benchmarks.lib.output import (  # noqa: E402
    add_out_option, progress, publish, pyplot, save_figure, table)
from benchmarks.lib.stats import stats  # noqa: E402
from vmfactory.agent.client import AgentClient  # noqa: E402

PREFIX = "refill:"
SETTINGS = {"nice 0 (competing)": 0, "nice 19 (yielding)": 19}
CALL_TIMEOUT_S = 30.0


async def one_round(d: DaemonRun, pings: int) -> dict[str, Any]:
    async with d.client() as ctl:
        await wait_full(ctl, d.label, prefix=PREFIX)
        t = time.perf_counter()
        h = await ctl.get_vm(timeout=60)
        get_ms = (time.perf_counter() - t) * 1000
        agent = AgentClient(f"unix:{h.agent_socket}", CALL_TIMEOUT_S)
        try:
            samples = []
            for _ in range(pings):  # while the refill the handout started runs
                t = time.perf_counter()
                await agent.ping()
                samples.append((time.perf_counter() - t) * 1000)
        finally:
            await agent.close()
            await ctl.release(h.lease_id)
        t = time.perf_counter()
        await wait_full(ctl, d.label, prefix=PREFIX)
        return {"get_ms": get_ms, "ping_ms": samples,
                "refill_rest_s": time.perf_counter() - t}


def body(n: int, pings: int) -> Body:
    async def run(d: DaemonRun) -> dict[str, Any]:
        rounds = []
        for i in range(n):
            rounds.append(await one_round(d, pings))
            progress(f"{PREFIX} {d.label} [{i + 1}/{n}] ping median "
                     f"{stats(rounds[-1]['ping_ms'])['median']:.1f} ms")
        pings_all = [p for r in rounds for p in r["ping_ms"]]
        return {"ping_ms": stats(pings_all), "get_ms": stats([r["get_ms"] for r in rounds]),
                "first_ping_ms": stats([r["ping_ms"][0] for r in rounds]),
                "samples_ms": [round(p, 2) for p in pings_all]}
    return run


async def run(args: argparse.Namespace) -> dict[str, Any]:
    host = host_start()
    out = {}
    for label, nice in SETTINGS.items():
        d = DaemonRun(f"nice-{nice}", min_size=2, max_size=2, prefix=PREFIX,
                      daemon={"refill_nice": nice})
        out[label] = await run_phase(label, d, 2048, body(args.n, args.pings))
    return {"benchmark": "refill", "n": args.n, "pings": args.pings, "accel": "tcg",
            "settings": out, "host": {**host, **host_end()}}


def report(r: dict[str, Any]) -> str:
    rows = []
    for label, s in r["settings"].items():
        if "ping_ms" not in s:
            rows.append([label, "error", "", "", s.get("error", "")[:60]])
            continue
        rows.append([label, s["ping_ms"]["median"], s["ping_ms"]["p90"],
                     s["first_ping_ms"]["median"], s["get_ms"]["median"]])
    return table(["setting", "ping median ms", "ping p90 ms", "first ping ms",
                  "GetVM median ms"], rows)


def plot(r: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [k for k, s in r["settings"].items() if "samples_ms" in s]
    ax.boxplot([r["settings"][k]["samples_ms"] for k in labels], showfliers=True)
    ax.set_xticks(range(1, len(labels) + 1), labels)
    ax.set_ylabel("agent ping on the leased VM, ms")
    ax.set_title(f"while its pool refills (n={r['n']} rounds x {r['pings']} pings, TCG)")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=8, help="rounds per setting")
    p.add_argument("--pings", type=int, default=20, help="pings per round")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_out_option(p)
    args = p.parse_args()
    if not (1 <= args.n <= 1000 and 1 <= args.pings <= 10000):
        p.error("-n: 1..1000, --pings: 1..10000")
    try:
        result = asyncio.run(cancel_on_sigterm(run(args)))
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        progress(f"{PREFIX} interrupted ({type(exc).__name__}); no results saved")
        return interrupted_exit(exc)
    publish("refill", result, args.out, as_json=args.json, report=report, plot=plot,
            omit="none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
