"""Cold boot benchmark (CreateNew): boot N VMs one after another.

For each VM: QEMU start (spawn -> QMP), spawn -> agent ready, the guest's own
milestones, and host memory (RSS, PSS, USS) right after the agent answered.
Prints a table (or one JSON object with --json), and saves
benchmarks/results/boot.json and boot.png (or under --out DIR).

    python benchmarks/boot.py [-n 5] [--json] [--config FILE] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.output import (  # noqa: E402
    add_out_option, progress, publish, pyplot, save_figure, table)
from benchmarks.lib.stats import stats  # noqa: E402

from vmfactory.config import Config, load_config  # noqa: E402
from vmfactory.factory.direct import DirectFactory  # noqa: E402
from vmfactory.factory.spec import image_paths  # noqa: E402
from vmfactory.app import make_hypervisor  # noqa: E402


async def boot_one(factory: DirectFactory) -> dict[str, float]:
    vm = await factory.get_vm()
    try:
        mem = vm.memory()
        return {**vm.timings.as_dict(), "rss_mib": mem.rss_mib, "pss_mib": mem.pss_mib,
                "uss_mib": mem.uss_mib}
    finally:
        await vm.stop()


async def run(config: Config, n: int) -> dict[str, Any]:
    progress("boot: preparing the guest image")
    await image_paths(config, quiet=False)
    factory = DirectFactory(config, make_hypervisor(config))
    runs = []
    for i in range(n):
        r = await boot_one(factory)
        progress(f"boot: [{i + 1}/{n}] agent ready in {r['agent_ready_ms']:.0f} ms, "
                 f"PSS {r['pss_mib']:.0f} MiB")
        runs.append(r)
    spec = await factory.spec_for(config.vm)
    return {
        "benchmark": "boot", "n": n, "accel": spec.accel,
        "vm": {"cpus": config.vm.cpus, "memory_mib": config.vm.memory_mib},
        "cold_boot_ms": stats([r["agent_ready_ms"] for r in runs]),
        "qemu_start_ms": stats([r["qemu_start_ms"] for r in runs]),
        "guest_init_s": stats([r["guest_init_s"] for r in runs]),
        "guest_agent_ready_s": stats([r["guest_agent_ready_s"] for r in runs]),
        "rss_mib": stats([r["rss_mib"] for r in runs]),
        "pss_mib": stats([r["pss_mib"] for r in runs]),
        "uss_mib": stats([r["uss_mib"] for r in runs]),
        "runs": runs,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    runs = result["runs"]
    xs = range(1, len(runs) + 1)
    qemu = [r["qemu_start_ms"] / 1000 for r in runs]
    rest = [(r["agent_ready_ms"] - r["qemu_start_ms"]) / 1000 for r in runs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(xs, qemu, label="QEMU start (spawn -> QMP)")
    ax1.bar(xs, rest, bottom=qemu, label="firmware + kernel + agent start")
    ax1.set(xlabel="boot #", ylabel="seconds", title=f"Cold boot to agent ready ({result['accel']})")
    ax1.legend(loc="lower right")
    for key, label in (("rss_mib", "RSS"), ("pss_mib", "PSS"), ("uss_mib", "USS")):
        ax2.plot(xs, [r[key] for r in runs], marker="o", label=label)
    ax2.set(xlabel="boot #", ylabel="MiB", title="Host memory per VM after boot", ylim=(0, None))
    ax2.legend()
    save_figure(fig, path)


def report(result: dict[str, Any]) -> str:
    rows = [[name, *(result[key][s] for s in ("median", "min", "max"))]
            for name, key in (("spawn -> agent ready (ms)", "cold_boot_ms"),
                              ("QEMU start (ms)", "qemu_start_ms"),
                              ("guest uptime at /init (s)", "guest_init_s"),
                              ("guest uptime at agent ready (s)", "guest_agent_ready_s"),
                              ("RSS (MiB)", "rss_mib"), ("PSS (MiB)", "pss_mib"),
                              ("USS (MiB)", "uss_mib"))]
    return (f"cold boot, {result['n']} VMs, accel {result['accel']}\n"
            + table(["metric", "median", "min", "max"], rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=5, help="VMs to boot (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--config", type=Path)
    add_out_option(p)
    args = p.parse_args()
    if args.n < 1:
        p.error("-n must be at least 1")
    config = load_config(args.config)
    result = asyncio.run(run(config, args.n))
    publish("boot", result, args.out, as_json=args.json, report=report, plot=plot, omit="runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
