"""Refill benchmark: does a pool's refill slow the VM just handed out?

A/B in one run, rounds alternating between two daemons (real QEMU, TCG; a pool
of ``--take`` VMs with the container warm-up): ``daemon.refill_nice`` 0
(refills compete) against 19 (the default: refills yield).  Each round waits
until the pool is full, takes all its VMs (which starts as many refills,
``refill_concurrency`` at once: a clone and its warm-up container, 1-2 s of CPU
each), times agent round trips (Ping over gRPC, after the client's usual
wait_ready) on the first VM while the refills run, then releases them.
Reported per setting: the ping latency (median/p90), the first call, GetVM, and
the nice values of the leased VM's threads (all 0 if the handout restored them).

Progress goes to stderr; a table (or one JSON object with --json) to stdout;
benchmarks/results/refill.json and refill.png (or under --out DIR) are saved.

    python benchmarks/refill.py [-n 8] [--pings 20] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.daemon import DaemonRun, wait_full  # noqa: E402
from benchmarks.lib.host import (  # noqa: E402
    cancel_on_sigterm, host_end, host_start, interrupted_exit)
from benchmarks.lib.output import (  # noqa: E402
    add_out_option, progress, publish, pyplot, save_figure, table)
from benchmarks.lib.stats import stats  # noqa: E402
from vmfactory.agent.client import AgentClient  # noqa: E402

PREFIX = "refill:"
SETTINGS = {"nice 0 (competing)": 0, "nice 19 (yielding)": 19}
CALL_TIMEOUT_S = 30.0


async def one_round(d: DaemonRun, pings: int, take: int) -> dict[str, Any]:
    async with d.client() as ctl:
        await wait_full(ctl, d.label, prefix=PREFIX)
        t = time.perf_counter()
        h = await ctl.get_vm(timeout=60)
        get_ms = (time.perf_counter() - t) * 1000
        others = [await ctl.get_vm(timeout=60) for _ in range(take - 1)]  # more refills
        agent = AgentClient(f"unix:{h.agent_socket}", CALL_TIMEOUT_S)
        try:
            t = time.perf_counter()
            await agent.wait_ready(CALL_TIMEOUT_S)  # as every client's first call does
            first_ms = (time.perf_counter() - t) * 1000
            samples = []
            for _ in range(pings):  # while the refill the handout started runs
                t = time.perf_counter()
                await agent.ping()
                samples.append((time.perf_counter() - t) * 1000)
            nices = sorted(set(_nices(h.pid)))
        finally:
            await agent.close()
            for lease in (h, *others):
                await ctl.release(lease.lease_id)
        t = time.perf_counter()
        await wait_full(ctl, d.label, prefix=PREFIX)
        return {"get_ms": get_ms, "first_ms": first_ms, "ping_ms": samples,
                "leased_nice": nices,
                "refill_rest_s": time.perf_counter() - t}


def _nices(pid: int) -> list[int]:
    """The nice value of every thread of ``pid`` (field 19 of /proc/PID/task/TID/stat)."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            out.append(int(f.read().rsplit(")", 1)[1].split()[16]))
    return out


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    pings_all = [p for r in rounds for p in r["ping_ms"]]
    return {"ping_ms": stats(pings_all), "get_ms": stats([r["get_ms"] for r in rounds]),
            "first_call_ms": stats([r["first_ms"] for r in rounds]),
            "leased_nice": sorted({n for r in rounds for n in r["leased_nice"]}),
            "samples_ms": [round(p, 2) for p in pings_all]}


async def alternate(daemons: dict[str, DaemonRun], args: argparse.Namespace) -> dict[str, Any]:
    """Rounds alternate between the settings (ABBA...), so both see the same machine."""
    rounds: dict[str, list[dict[str, Any]]] = {label: [] for label in daemons}
    for i in range(args.n):
        order = list(daemons) if i % 2 == 0 else list(daemons)[::-1]
        for label in order:
            rounds[label].append(await one_round(daemons[label], args.pings, args.take))
        progress(f"{PREFIX} [{i + 1}/{args.n}] " + ", ".join(
            f"{label}: ping median {stats(r[-1]['ping_ms'])['median']:.1f} ms"
            for label, r in rounds.items()))
    return {label: summarize(r) for label, r in rounds.items()}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    host = host_start()
    daemons = {label: DaemonRun(f"nice-{nice}", min_size=args.take, max_size=args.take,
                                prefix=PREFIX, daemon={"refill_nice": nice})
               for label, nice in SETTINGS.items()}
    stops: dict[str, Any] = {}
    try:
        for d in daemons.values():
            await d.start()
        out = await alternate(daemons, args)
    finally:
        for label, d in daemons.items():
            stops[label] = await asyncio.to_thread(d.stop)
    return {"benchmark": "refill", "n": args.n, "pings": args.pings, "take": args.take,
            "accel": "tcg",
            "settings": out, "daemons": stops, "host": {**host, **host_end()}}


def report(r: dict[str, Any]) -> str:
    rows = []
    for label, s in r["settings"].items():
        if "ping_ms" not in s:
            rows.append([label, "error", "", "", s.get("error", "")[:60]])
            continue
        rows.append([label, s["ping_ms"]["median"], s["ping_ms"]["p90"],
                     s["first_call_ms"]["median"], s["get_ms"]["median"]])
    return table(["setting", "ping median ms", "ping p90 ms", "first call ms",
                  "GetVM median ms"], rows)


def plot(r: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [k for k, s in r["settings"].items() if "samples_ms" in s]
    ax.boxplot([r["settings"][k]["samples_ms"] for k in labels], showfliers=True)
    ax.set_xticks(range(1, len(labels) + 1), labels)
    ax.set_ylabel("agent ping on the leased VM, ms")
    ax.set_title(f"while its pool refills {r['take']} VMs (n={r['n']} x {r['pings']} pings, TCG)")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=8, help="rounds per setting")
    p.add_argument("--pings", type=int, default=20, help="pings per round")
    p.add_argument("--take", type=int, default=2,
                   help="VMs taken per round (the pool's size): refills running at once")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_out_option(p)
    args = p.parse_args()
    if not (1 <= args.n <= 1000 and 1 <= args.pings <= 10000 and 1 <= args.take <= 8):
        p.error("-n: 1..1000, --pings: 1..10000, --take: 1..8")
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
