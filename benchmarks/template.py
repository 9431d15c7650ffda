"""Template benchmark (CreateFromTemplate vs CreateNew): latency and host memory.

Latency: boot ``--n`` VMs cold and clone ``--clones`` VMs from one template, one
at a time, each stopped after it was measured; spawn -> agent ready for both,
spawn -> restored for clones.  Memory: for each N in ``--sizes``, the mean PSS
and USS per VM with N VMs alive at once, direct-booted vs clones (booted one by
one, measured when the count reaches a checkpoint; every clone goes through the
get-VM sequence first, as a real handout does).  Then the issue's targets are
checked.  Prints a table (or one JSON object with --json), and saves
benchmarks/results/template.json and template.png (or under --out DIR).

Every VM runs under a private run directory in /tmp and the template lives in a
private directory in /dev/shm; both are removed at the end, and every VM is
stopped, even on an error or Ctrl-C.

    python benchmarks/template.py [--n 5] [--clones 20] [--sizes 1,5,10,20] [--json]
                                  [--config FILE] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.host import MemoryLow, check_room, host_end, host_start  # noqa: E402
from benchmarks.lib.leaks import remove_tree  # noqa: E402
from benchmarks.lib.output import (  # noqa: E402
    add_out_option, progress, publish, pyplot, save_figure, table, verdict)
from benchmarks.lib.stats import stats  # noqa: E402

from vmfactory.config import Config, load_config  # noqa: E402
from vmfactory.factory.direct import DirectFactory  # noqa: E402
from vmfactory.factory.sequence import prepare_vm  # noqa: E402
from vmfactory.factory.spec import image_paths  # noqa: E402
from vmfactory.factory.template import Template, TemplateState  # noqa: E402
from vmfactory.hypervisor.base import Vm  # noqa: E402
from vmfactory.hypervisor.qemu import QemuHypervisor  # noqa: E402

PREFIX = "template:"
TEMPLATE_NAME = "bench"
# Per-VM memory guess before one was measured: guest RAM plus TCG/QEMU overhead.
OVERHEAD_GUESS_MIB = 256

TARGET_CLONE_MS = 60.0
TARGET_RATIO = 50.0
TARGET_PSS_FRACTION = 0.20
TARGET_PSS_N = 10


class Bench:
    """The factory, the template and every VM the benchmark started, for cleanup."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.hypervisor = QemuHypervisor(config.paths.run_dir, config.timeouts)
        self.factory = DirectFactory(config, self.hypervisor)
        self.template = Template(config.paths.template_dir / TEMPLATE_NAME, self.hypervisor)
        self.live: list[Vm] = []
        # Largest RSS seen per kind of VM: the cost of the next one, for the memory check.
        self.rss_seen: dict[str, float] = {}

    def check_room(self, kind: str, extra_mib: float = 0.0) -> None:
        """Raise MemoryLow if one more ``kind`` VM would leave < LOW_WATER_MIB available."""
        need = self.rss_seen.get(kind, self.config.vm.memory_mib + OVERHEAD_GUESS_MIB) + extra_mib
        check_room(need, what=f"one more {kind} VM")

    def note_rss(self, kind: str, rss_mib: float) -> None:
        self.rss_seen[kind] = max(self.rss_seen.get(kind, 0.0), rss_mib)

    async def boot(self) -> Vm:
        self.check_room("direct")
        vm = await self.factory.get_vm()
        self.live.append(vm)  # no await in between: a cancelled get_vm stops its own VM
        return vm

    async def clone(self) -> Vm:
        self.check_room("clone")
        vm = await self.template.clone()
        self.live.append(vm)
        return vm

    async def stop(self, vms: list[Vm]) -> None:
        """Stop ``vms`` (all at once); report but survive a failing stop."""
        results = await asyncio.gather(*(vm.stop() for vm in vms), return_exceptions=True)
        for vm, res in zip(vms, results):
            if vm in self.live:
                self.live.remove(vm)
            if isinstance(res, BaseException):
                progress(f"{PREFIX} warning: stopping vm {vm.id} failed: {res!r}")

    async def close(self) -> None:
        """Stop every VM still alive and destroy the template."""
        while self.live:
            await self.stop(list(self.live))
        if self.template.state is not TemplateState.CREATING:
            await self.template.destroy()
        await self.factory.close()


def mean(values: list[float]) -> float:
    return round(statistics.fmean(values), 3)


def maybe_stats(values: list[float]) -> dict[str, float] | None:
    return stats(values) if values else None


async def latency_cold(bench: Bench, n: int,
                       stopped_early: dict[str, str]) -> list[dict[str, float]]:
    runs = []
    for i in range(n):
        try:
            vm = await bench.boot()
        except MemoryLow as exc:
            progress(f"{PREFIX} [{i + 1}/{n}] cold boot: stopping early: {exc}")
            stopped_early["latency_cold"] = str(exc)
            break
        try:
            mem = vm.memory()
            run = {**vm.timings.as_dict(), "rss_mib": round(mem.rss_mib, 3),
                   "pss_mib": round(mem.pss_mib, 3), "uss_mib": round(mem.uss_mib, 3)}
        finally:
            await bench.stop([vm])
        bench.note_rss("direct", run["rss_mib"])
        progress(f"{PREFIX} [{i + 1}/{n}] cold boot: agent ready in {run['agent_ready_ms']:.0f} ms")
        runs.append(run)
    return runs


async def build_template(bench: Bench) -> dict[str, Any]:
    spec = await bench.factory.spec_for(bench.config.vm)
    bench.check_room("direct", extra_mib=spec.vm.memory_mib)  # the template VM + its RAM file
    progress(f"{PREFIX} building the template (cold boot + save) in {bench.template.directory}")
    await bench.template.create(spec)
    record = bench.template.record
    info = {"build_s": record["build_seconds"],
            "state_kib": round(record["state_bytes"] / 1024, 1),
            "memory_file_mib": round(record["memory_bytes"] / (1 << 20), 1),
            # What the RAM file really occupies on tmpfs (host memory no process's PSS shows).
            "memory_file_resident_mib":
                round(bench.template.memory_file.stat().st_blocks * 512 / (1 << 20), 1)}
    progress(f"{PREFIX} template ready in {info['build_s']:.1f} s (state {info['state_kib']:.0f} "
             f"KiB, RAM file {info['memory_file_resident_mib']:.0f} MiB on tmpfs)")
    return info


async def latency_clones(bench: Bench, n: int,
                         stopped_early: dict[str, str]) -> list[dict[str, float]]:
    runs = []
    for i in range(n):
        try:
            vm = await bench.clone()
        except MemoryLow as exc:
            progress(f"{PREFIX} [{i + 1}/{n}] clone: stopping early: {exc}")
            stopped_early["latency_clone"] = str(exc)
            break
        try:
            t = time.monotonic()
            await prepare_vm(vm)
            prepare_ms = (time.monotonic() - t) * 1000
            run = {**vm.timings.as_dict(), "prepare_ms": round(prepare_ms, 3)}
            bench.note_rss("clone", vm.memory().rss_mib)
        finally:
            await bench.stop([vm])
        progress(f"{PREFIX} [{i + 1}/{n}] clone: agent ready in {run['agent_ready_ms']:.1f} ms "
                 f"(restored at {run['restore_ms']:.1f} ms, get-VM sequence "
                 f"{run['prepare_ms']:.1f} ms)")
        runs.append(run)
    return runs


async def memory_phase(bench: Bench, kind: str, sizes: list[int]) -> dict[str, Any]:
    """Start ``kind`` VMs one by one up to max(sizes); measure all alive at each checkpoint."""
    top = max(sizes)
    alive: list[Vm] = []
    checkpoints: dict[int, dict[str, float]] = {}
    runs: list[dict[str, float]] = []
    stopped_early = None
    try:
        for i in range(top):
            try:
                vm = await (bench.boot() if kind == "direct" else bench.clone())
            except MemoryLow as exc:
                stopped_early = str(exc)
                progress(f"{PREFIX} [{i + 1}/{top}] {kind}: stopping early: {exc}")
                break
            alive.append(vm)
            run = vm.timings.as_dict()
            if kind == "clone":
                t = time.monotonic()
                await prepare_vm(vm)
                run["prepare_ms"] = round((time.monotonic() - t) * 1000, 3)
            mem = vm.memory()
            bench.note_rss(kind, mem.rss_mib)
            runs.append(run)
            line = (f"{PREFIX} [{i + 1}/{top}] {kind} VMs alive: agent ready in "
                    f"{run['agent_ready_ms']:.0f} ms, RSS {mem.rss_mib:.0f} MiB")
            if len(alive) in sizes:
                usage = [v.memory() for v in alive]
                checkpoints[len(alive)] = {
                    "pss_mib": mean([u.pss_mib for u in usage]),
                    "uss_mib": mean([u.uss_mib for u in usage]),
                    "rss_mib": mean([u.rss_mib for u in usage])}
                c = checkpoints[len(alive)]
                line += (f"; N={len(alive)}: PSS {c['pss_mib']:.1f}, USS {c['uss_mib']:.1f} "
                         f"MiB per VM")
            progress(line)
    finally:
        if alive:
            progress(f"{PREFIX} stopping {len(alive)} {kind} VMs")
        await bench.stop(alive)
    return {"reached": len(alive), "stopped_early": stopped_early,
            "checkpoints": checkpoints, "runs": runs}


def target(description: str, value: float | None, op: str, threshold: float,
           unit: str) -> dict[str, Any]:
    ok = None
    if value is not None:
        ok = value < threshold if op == "<" else value >= threshold if op == ">=" else \
            value <= threshold
    return {"description": description, "value": value, "op": op, "threshold": threshold,
            "unit": unit, "pass": ok}


def evaluate_targets(result: dict[str, Any]) -> dict[str, Any]:
    clone_median = result["clone_ms"]["median"] if result["clone_ms"] else None
    key = str(TARGET_PSS_N)
    direct_pss = result["pss_mib"]["direct"].get(key)
    clone_pss = result["pss_mib"]["clone"].get(key)
    fraction = (round(clone_pss / direct_pss, 4)
                if clone_pss is not None and direct_pss else None)
    return {
        "clone_median_ms": target("clone spawn -> agent ready, median", clone_median, "<",
                                  TARGET_CLONE_MS, "ms"),
        "ratio_cold_over_clone": target("cold / clone ratio of medians",
                                        result["ratio_cold_over_clone"], ">=", TARGET_RATIO, "x"),
        "clone_pss_fraction_n10": target(f"clone PSS / direct PSS at N={TARGET_PSS_N}",
                                         fraction, "<=", TARGET_PSS_FRACTION, "fraction"),
    }


async def run(config: Config, n: int, clones: int, sizes: list[int]) -> dict[str, Any]:
    t_start = time.monotonic()
    host = host_start(config.paths.run_dir)
    progress(f"{PREFIX} preparing the guest image")
    await image_paths(config, quiet=False)
    bench = Bench(config)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)  # clean up on SIGTERM too
    stopped_early: dict[str, str] = {}
    try:
        spec = await bench.factory.spec_for(config.vm)
        progress(f"{PREFIX} latency: {n} cold boots, accel {spec.accel}")
        cold = await latency_cold(bench, n, stopped_early)
        template_info = await build_template(bench)
        progress(f"{PREFIX} latency: {clones} clones")
        clone_runs = await latency_clones(bench, clones, stopped_early)
        progress(f"{PREFIX} memory: clones, checkpoints N={','.join(map(str, sizes))}")
        mem_clone = await memory_phase(bench, "clone", sizes)
        await bench.template.destroy()  # its RAM file is not needed by direct VMs
        progress(f"{PREFIX} memory: direct boots, checkpoints N={','.join(map(str, sizes))}")
        mem_direct = await memory_phase(bench, "direct", sizes)
    finally:
        await bench.close()
        loop.remove_signal_handler(signal.SIGTERM)
    for kind, phase in (("direct", mem_direct), ("clone", mem_clone)):
        if phase["stopped_early"]:
            stopped_early[f"memory_{kind}"] = phase["stopped_early"]

    cold_ms = maybe_stats([r["agent_ready_ms"] for r in cold])
    clone_ms = maybe_stats([r["agent_ready_ms"] for r in clone_runs])
    ratio = (round(cold_ms["median"] / clone_ms["median"], 1)
             if cold_ms and clone_ms and clone_ms["median"] > 0 else None)
    mem = {metric: {kind: {str(s): phase["checkpoints"].get(s, {}).get(metric) for s in sizes}
                    for kind, phase in (("direct", mem_direct), ("clone", mem_clone))}
           for metric in ("pss_mib", "uss_mib", "rss_mib")}
    result: dict[str, Any] = {
        "benchmark": "template", "accel": spec.accel,
        "vm": {"cpus": config.vm.cpus, "memory_mib": config.vm.memory_mib},
        "n": n, "clones": clones, "sizes": sizes,
        "cold_ms": cold_ms,
        "clone_ms": clone_ms,
        "restore_ms": maybe_stats([r["restore_ms"] for r in clone_runs]),
        "clone_qemu_start_ms": maybe_stats([r["qemu_start_ms"] for r in clone_runs]),
        "clone_prepare_ms": maybe_stats([r["prepare_ms"] for r in clone_runs]),
        "ratio_cold_over_clone": ratio,
        "template": template_info,
        **mem,
        "reached": {"direct": mem_direct["reached"], "clone": mem_clone["reached"]},
        "stopped_early": stopped_early or None,
    }
    host.update(host_end(config.paths.run_dir))
    result["host"] = host
    result["targets"] = evaluate_targets(result)
    result["runtime_s"] = round(time.monotonic() - t_start, 1)
    result["runs"] = {"cold": cold, "clone": clone_runs,
                      "memory_direct": mem_direct["runs"], "memory_clone": mem_clone["runs"]}
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(12, 4.8))
    runs = result["runs"]
    groups = [("cold boot\nspawn -> agent ready", [r["agent_ready_ms"] for r in runs["cold"]],
               "C0"),
              ("clone\nspawn -> agent ready", [r["agent_ready_ms"] for r in runs["clone"]], "C1"),
              ("clone\nspawn -> restored", [r["restore_ms"] for r in runs["clone"]], "C2")]
    groups = [g for g in groups if g[1]]
    for x, (label, values, color) in enumerate(groups):
        st = stats(values)
        ax1.bar(x, st["median"], width=0.6, color=color, alpha=0.75)
        ax1.errorbar(x, st["median"], yerr=[[st["median"] - st["min"]], [st["p90"] - st["median"]]],
                     fmt="none", ecolor="black", capsize=6)
        jitter = [x + 0.18 * ((i % 7) - 3) / 3 for i in range(len(values))]
        ax1.scatter(jitter, values, s=10, color="black", alpha=0.5, zorder=3)
        text = f"{st['median'] / 1000:.1f} s" if st["median"] >= 1000 else f"{st['median']:.0f} ms"
        ax1.annotate(text, (x, st["p90"]), textcoords="offset points", xytext=(0, 8),
                     ha="center", fontsize=9)
    ax1.axhline(TARGET_CLONE_MS, color="C3", linestyle="--", linewidth=1,
                label=f"clone target {TARGET_CLONE_MS:.0f} ms")
    ax1.set_yscale("log")
    ax1.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=9)
    ax1.set_ylim(bottom=1, top=max(max(g[1]) for g in groups) * 4)
    ratio = result["ratio_cold_over_clone"]
    ax1.set(ylabel="ms (log)", title=f"Latency ({result['accel']}): median, whiskers min..p90"
                                     + (f"\ncold / clone = {ratio:.0f}x" if ratio else ""))
    ax1.legend(loc="upper right", fontsize=8)

    sizes = [int(s) for s in result["sizes"]]
    for kind, color in (("direct", "C0"), ("clone", "C1")):
        for metric, style, marker in (("pss_mib", "-", "o"), ("uss_mib", "--", "s")):
            points = [(s, result[metric][kind][str(s)]) for s in sizes
                      if result[metric][kind][str(s)] is not None]
            if points:
                ax2.plot([p[0] for p in points], [p[1] for p in points], linestyle=style,
                         marker=marker, color=color,
                         label=f"{kind} {metric.split('_')[0].upper()}")
    ax2.set_xticks(sizes)
    ax2.set(xlabel="N VMs alive at once", ylabel="MiB per VM (mean)", ylim=(0, None),
            title="Host memory per VM vs N")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    save_figure(fig, path)


def fmt_value(t: dict[str, Any]) -> str:
    v = t["value"]
    if v is None:
        return "n/a"
    if t["unit"] == "fraction":
        return f"{100 * v:.1f}%"
    return f"{v:.1f} {t['unit']}" if t["unit"] == "ms" else f"{v:.1f}{t['unit']}"


def fmt_goal(t: dict[str, Any]) -> str:
    th = t["threshold"]
    if t["unit"] == "fraction":
        return f"{t['op']} {100 * th:.0f}%"
    return f"{t['op']} {th:g} {t['unit']}" if t["unit"] == "ms" else f"{t['op']} {th:g}{t['unit']}"


def report(result: dict[str, Any]) -> str:
    out = [f"template vs cold boot, accel {result['accel']}, {result['n']} cold boots, "
           f"{result['clones']} clones, template built in {result['template']['build_s']:.1f} s"]
    rows = []
    for name, key in (("cold: spawn -> agent ready (ms)", "cold_ms"),
                      ("clone: spawn -> agent ready (ms)", "clone_ms"),
                      ("clone: spawn -> restored (ms)", "restore_ms"),
                      ("clone: spawn -> QMP up (ms)", "clone_qemu_start_ms"),
                      ("clone: get-VM sequence (ms)", "clone_prepare_ms")):
        st = result[key]
        if st:
            rows.append([name, *(float(st[s]) for s in ("median", "p90", "min", "max"))])
    out.append(table(["latency", "median", "p90", "min", "max"], rows))
    ratio = result["ratio_cold_over_clone"]
    out.append(f"cold / clone ratio of medians: {ratio:.1f}x" if ratio else
               "cold / clone ratio: n/a")
    out.append("")
    mem_rows = []
    for s in result["sizes"]:
        k = str(s)
        cells = [result[m][kind][k] for kind in ("direct", "clone")
                 for m in ("pss_mib", "uss_mib")]
        dp, cp = cells[0], cells[2]
        frac = f"{100 * cp / dp:.1f}%" if dp and cp is not None else "n/a"
        mem_rows.append([s, *("n/a" if c is None else float(c) for c in cells), frac])
    out.append("host memory per VM with N alive (MiB, mean over the N VMs)")
    out.append(table(["N", "direct PSS", "direct USS", "clone PSS", "clone USS",
                      "clone/direct PSS"], mem_rows))
    tpl = result["template"]
    out.append(f"(plus the template's RAM file on tmpfs: {tpl['memory_file_resident_mib']:.0f} MiB "
               f"resident, shared by all clones, in no process's PSS)")
    if result["stopped_early"]:
        for phase, why in result["stopped_early"].items():
            out.append(f"stopped early ({phase}): {why}")
    out.append("")
    out.append("targets")
    out.append(table(["target", "measured", "goal", "result"],
                     [[t["description"], fmt_value(t), fmt_goal(t), verdict(t)]
                      for t in result["targets"].values()]))
    host = result["host"]
    if host["other_qemu_start"] or host["other_qemu_end"]:
        out.append(f"note: {host['other_qemu_start']} other QEMU processes at the start, "
                   f"{host['other_qemu_end']} at the end, shared the {host['cpus']} CPUs "
                   f"(load average {host['loadavg_start'][0]} -> {host['loadavg_end'][0]})")
    rt = result["runtime_s"]
    out.append(f"runtime {int(rt // 60)} min {rt % 60:.0f} s")
    return "\n".join(out)


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}")
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError("sizes must be positive integers")
    return sizes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--n", type=int, default=5, help="VMs to cold-boot (default 5)")
    p.add_argument("--clones", type=int, default=20, help="VMs to clone (default 20)")
    p.add_argument("--sizes", type=parse_sizes, default=[1, 5, 10, 20],
                   help="N VMs alive at once to measure memory at (default 1,5,10,20)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--config", type=Path)
    add_out_option(p)
    args = p.parse_args()
    if args.n < 1 or args.clones < 1:
        p.error("--n and --clones must be at least 1")

    run_dir = Path(tempfile.mkdtemp(prefix="vmf-bench-", dir="/tmp"))
    shm_dir = Path(tempfile.mkdtemp(prefix="vmfactory-bench-", dir="/dev/shm"))
    interrupted: BaseException | None = None
    try:
        config = load_config(args.config, overrides={"paths": {
            "run_dir": str(run_dir), "template_dir": str(shm_dir / "templates")}})
        result = asyncio.run(run(config, args.n, args.clones, args.sizes))
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:  # Ctrl-C, SIGTERM
        interrupted = exc
    finally:
        leftovers = remove_tree(run_dir) + remove_tree(shm_dir)
        if leftovers:
            progress(f"{PREFIX} killed leftover QEMU processes {leftovers}")
    if interrupted is not None:
        progress(f"{PREFIX} interrupted ({type(interrupted).__name__}): every VM stopped, "
                 f"run and template directories removed; no results saved")
        return 130 if isinstance(interrupted, KeyboardInterrupt) else 128 + signal.SIGTERM

    publish("template", result, args.out, as_json=args.json, report=report, plot=plot,
            omit="runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
