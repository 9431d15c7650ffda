"""Engines benchmark: ``podman run --rm IMAGE CMD`` with runc and with vmfactory-oci.

One daemon (real QEMU, TCG) with a warm pool; one podman (its own vfs storage,
the README's containers.conf) with two runtimes: ``runc`` (the reference) and
``vmfactory`` (vmfactory-oci).  Both are called through the same small shell
wrapper that appends each runtime call's start, end and argv to a trace, so the
wrapper costs both the same and the trace says where the time goes: the
runtime's own verbs (create, start, state, kill, delete) and, the rest of the
wall time, podman and conmon.  For each of ``true`` and ``echo hello``, runs
alternate between the runtimes (A/B in one process); before each vmfactory run
the pool is full again (a warm-pool start, not a miss).  One untimed warm-up
run each.

Target: vmfactory-oci's median within 300 ms of runc's, per command.

Prints a table (or one JSON object with --json; progress goes to stderr) and
saves benchmarks/results/engines.json and engines.png (or under --out DIR).

    python benchmarks/engines.py [-n 10] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.daemon import DaemonRun, run_phase, wait_full  # noqa: E402
from benchmarks.lib.host import (  # noqa: E402
    cancel_on_sigterm, host_end, host_start, interrupted_exit)
from benchmarks.lib.output import (  # noqa: E402
    add_out_option, fmt, progress, publish, pyplot, save_figure, table)
from benchmarks.lib.podman import IMAGE, Podman, traced_script  # noqa: E402
from benchmarks.lib.stats import stats  # noqa: E402
from runtime_client.bundles.busybox import make_busybox_bundle  # noqa: E402

PREFIX = "engines:"
RUNTIMES = ("runc", "vmfactory")
COMMANDS = {"true": ["true"], "echo": ["echo", "hello"]}
VERBS = ("create", "start", "state", "kill", "delete")
TARGET_MS = 300.0
POOL_SIZE = 2
RUNC = "/usr/sbin/runc"


def parse_trace(lines: list[str]) -> list[tuple[str, float]]:
    """(verb, ms) of each runtime call in a trace's lines ("start_ns end_ns rc argv...")."""
    calls = []
    for line in lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        verb = next((f for f in fields[3:] if f in VERBS), "other")
        calls.append((verb, (int(fields[1]) - int(fields[0])) / 1e6))
    return calls


class Bench:
    """The podman of one daemon, with a traced runc beside vmfactory-oci."""

    def __init__(self, d: DaemonRun, rootfs: Path) -> None:
        self.d = d
        self.trace = d.root / "trace"
        self.pm = Podman(d.config, trace=self.trace)
        runc = self.pm.work / "runc-traced"
        runc.write_text(traced_script(RUNC, self.trace))
        runc.chmod(0o755)
        conf = self.pm.work / "containers.conf"
        conf.write_text(conf.read_text().replace(
            "[engine.runtimes]\n", f"[engine.runtimes]\nrunc = [\"{runc}\"]\n"))
        self.pm.import_rootfs(rootfs)

    async def one(self, runtime: str, command: str) -> dict[str, Any]:
        """One timed ``podman run --rm``: wall ms and the runtime calls it made."""
        if runtime == "vmfactory":
            await wait_full(self.d.client(), self.d.label, prefix=PREFIX)
        self.trace.write_text("")
        t = time.monotonic()
        out = await asyncio.to_thread(self.pm, "--runtime", runtime, "run", "--rm", IMAGE,
                                      *COMMANDS[command])
        wall = (time.monotonic() - t) * 1000
        if out.returncode != 0:
            raise RuntimeError(f"{runtime} {command}: exit {out.returncode}: "
                               f"{out.stderr.decode(errors='replace')[-300:]}")
        calls = parse_trace(self.trace.read_text().splitlines())
        return {"wall_ms": round(wall, 1), "calls": calls}

    def close(self) -> list[str]:
        return self.pm.close()


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Wall stats, and the median ms per verb (summed over a run's calls of it)."""
    per_verb: dict[str, list[float]] = {v: [] for v in (*VERBS, "other")}
    engine = []
    for r in runs:
        sums = {v: 0.0 for v in per_verb}
        for verb, ms in r["calls"]:
            sums[verb] += ms
        for v, ms in sums.items():
            per_verb[v].append(ms)
        engine.append(r["wall_ms"] - sum(sums.values()))
    return {"wall_ms": stats([r["wall_ms"] for r in runs]),
            "verbs_ms": {v: stats(ms)["median"] for v, ms in per_verb.items() if any(ms)},
            "calls": {v: sum(1 for r in runs for c in r["calls"] if c[0] == v) / len(runs)
                      for v in per_verb},
            "podman_conmon_ms": stats(engine)["median"]}


async def measure(bench: Bench, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for command in COMMANDS:
        for runtime in RUNTIMES:
            await bench.one(runtime, command)  # warm-up: caches, podman's first run
        runs: dict[str, list[dict[str, Any]]] = {r: [] for r in RUNTIMES}
        for i in range(n):
            for runtime in RUNTIMES if i % 2 == 0 else RUNTIMES[::-1]:
                runs[runtime].append(await bench.one(runtime, command))
            progress(f"{PREFIX} {command} [{i + 1}/{n}] runc "
                     f"{runs['runc'][-1]['wall_ms']:.0f} ms, vmfactory "
                     f"{runs['vmfactory'][-1]['wall_ms']:.0f} ms")
        out[command] = {r: {**summarize(v), "samples_ms": [x["wall_ms"] for x in v]}
                        for r, v in runs.items()}
    return out


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for command, by in results.items():
        gap = by["vmfactory"]["wall_ms"]["median"] - by["runc"]["wall_ms"]["median"]
        out[command] = {"gap_ms": round(gap, 1), "pass": gap <= TARGET_MS}
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    host = host_start()
    base = Path(tempfile.mkdtemp(prefix="vmfb-engines-", dir="/tmp"))
    try:
        rootfs = make_busybox_bundle(base / "bundle") / "rootfs"
        d = DaemonRun("engines", min_size=POOL_SIZE, max_size=POOL_SIZE, prefix=PREFIX)

        async def body(d: DaemonRun) -> dict[str, Any]:
            await wait_full(d.client(), d.label, prefix=PREFIX)
            bench = Bench(d, rootfs)
            try:
                return {"commands": await measure(bench, args.n)}
            finally:
                left = await asyncio.to_thread(bench.close)
                if left:
                    progress(f"{PREFIX} containers left in podman (removed): {left}")
        phase = await run_phase("engines", d, 2048, body)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results = phase.get("commands", {})
    return {"benchmark": "engines", "n": args.n, "accel": "tcg", "pool_size": POOL_SIZE,
            "target_gap_ms": TARGET_MS, "commands": results,
            "target": verdicts(results) if results else None,
            "error": phase.get("error"), "daemon": phase.get("daemon"),
            "host": {**host, **host_end()}}


def report(r: dict[str, Any]) -> str:
    rows = []
    for command, by in r["commands"].items():
        for runtime, s in by.items():
            w = s["wall_ms"]
            verbs = ", ".join(f"{v} {fmt(ms, 0)}" for v, ms in s["verbs_ms"].items())
            rows.append([command, runtime, w["median"], w["p90"], s["podman_conmon_ms"], verbs])
    lines = [table(["command", "runtime", "median ms", "p90 ms", "podman+conmon ms",
                    "runtime calls (median ms)"], rows)]
    for command, v in (r["target"] or {}).items():
        lines.append(f"{command}: vmfactory-oci - runc = {v['gap_ms']} ms "
                     f"(target <= {TARGET_MS:.0f} ms: {'reached' if v['pass'] else 'NOT reached'})")
    if r.get("error"):
        lines.append(f"error: {r['error']}")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels, samples, stacks = [], [], []
    for command, by in r["commands"].items():
        for runtime, s in by.items():
            labels.append(f"{runtime}\n{command}")
            samples.append(s["samples_ms"])
            stacks.append({**s["verbs_ms"], "podman+conmon": s["podman_conmon_ms"]})
    ax1.boxplot(samples, showfliers=True)
    ax1.set_xticks(range(1, len(labels) + 1), labels)
    ax1.set_ylabel("podman run --rm: wall ms")
    ax1.set_title(f"podman run --rm (n={r['n']} each, TCG, warm pool of {r['pool_size']})")
    parts = [*VERBS, "other", "podman+conmon"]
    bottom = [0.0] * len(stacks)
    for part in parts:
        vals = [s.get(part, 0.0) for s in stacks]
        if any(vals):
            ax2.bar(range(len(stacks)), vals, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.set_xticks(range(len(stacks)), labels)
    ax2.set_ylabel("median ms")
    ax2.set_title("where the time goes")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=10, help="timed runs per runtime and command")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_out_option(p)
    args = p.parse_args()
    if not 1 <= args.n <= 1000:
        p.error("-n: 1..1000")
    return args


def main() -> int:
    args = parse_args()
    try:
        result = asyncio.run(cancel_on_sigterm(run(args)))
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        progress(f"{PREFIX} interrupted ({type(exc).__name__}): the daemon was stopped; "
                 f"no results saved")
        return interrupted_exit(exc)
    if not result["commands"]:
        progress(f"{PREFIX} failed: {result.get('error')}")
        return 1
    publish("engines", result, args.out, as_json=args.json, report=report, plot=plot,
            omit="none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
