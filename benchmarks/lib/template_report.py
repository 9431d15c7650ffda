"""The template benchmark's result: template.json's object assembled from the
measurements, the issue's targets, the text report and template.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.lib.output import pyplot, save_figure, table, verdict
from benchmarks.lib.stats import maybe_stats, stats
from benchmarks.lib.template_phases import Measurements
from vmfactory.config import Config

TARGET_CLONE_MS = 60.0
TARGET_RATIO = 50.0
TARGET_PSS_FRACTION = 0.20
TARGET_PSS_N = 10
KINDS = ("direct", "clone")
LATENCY_ROWS = (("cold: spawn -> agent ready (ms)", "cold_ms"),
                ("clone: start -> agent ready (ms)", "clone_ms"),
                ("clone, new QEMU: spawn -> agent ready (ms)", "clone_fresh_ms"),
                ("clone: restore (ms)", "restore_ms"),
                ("clone, new QEMU: spawn -> QMP up (ms)", "clone_qemu_start_ms"),
                ("clone: get-VM sequence (ms)", "clone_prepare_ms"))


# -- assembling ------------------------------------------------------------------

def latency(m: Measurements) -> dict[str, Any]:
    """Latency stats of the cold boots and clones, and the ratio of their medians.

    ``clone_ms`` is the product's path: a clone whose QEMU stood by when the
    template keeps standby QEMUs (from ``start()``; its spawn happened ahead),
    else a new QEMU's spawn -> agent ready, which ``clone_fresh_ms`` always is.
    """
    cold_ms = maybe_stats([r["agent_ready_ms"] for r in m.cold])
    fresh = [r for r in m.clones if not r.get("standby")]
    product = [r for r in m.clones if r.get("standby")] or fresh
    clone_ms = maybe_stats([r["agent_ready_ms"] for r in product])
    return {"cold_ms": cold_ms, "clone_ms": clone_ms,
            "clone_fresh_ms": maybe_stats([r["agent_ready_ms"] for r in fresh]),
            "clone_standby_runs": len(m.clones) - len(fresh),
            "restore_ms": maybe_stats([r["restore_ms"] - r["qemu_start_ms"] for r in m.clones]),
            "clone_qemu_start_ms": maybe_stats([r["qemu_start_ms"] for r in fresh]),
            "clone_prepare_ms": maybe_stats([r["prepare_ms"] for r in m.clones]),
            "ratio_cold_over_clone": (round(cold_ms["median"] / clone_ms["median"], 1)
                                      if cold_ms and clone_ms and clone_ms["median"] > 0
                                      else None)}


def memory(m: Measurements, sizes: list[int]) -> dict[str, Any]:
    """metric -> kind -> N -> mean MiB per VM (None where N was not reached)."""
    return {metric: {kind: {str(s): m.memory[kind]["checkpoints"].get(s, {}).get(metric)
                            for s in sizes} for kind in KINDS}
            for metric in ("pss_mib", "uss_mib", "rss_mib")}


def assemble(config: Config, m: Measurements, n: int, clones: int, sizes: list[int],
             host: dict[str, Any], runtime_s: float) -> dict[str, Any]:
    result: dict[str, Any] = {
        "benchmark": "template", "accel": m.accel,
        "vm": {"cpus": config.vm.cpus, "memory_mib": config.vm.memory_mib},
        "n": n, "clones": clones, "sizes": sizes,
        **latency(m),
        "template": m.template,
        **memory(m, sizes),
        "reached": {kind: m.memory[kind]["reached"] for kind in KINDS},
        "stopped_early": m.stopped_early or None,
        "host": host,
    }
    result["targets"] = evaluate_targets(result)
    result["runtime_s"] = runtime_s
    result["runs"] = {"cold": m.cold, "clone": m.clones,
                      "memory_direct": m.memory["direct"]["runs"],
                      "memory_clone": m.memory["clone"]["runs"]}
    return result


# -- targets -----------------------------------------------------------------------

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
        "clone_median_ms": target("clone start -> agent ready, median", clone_median, "<",
                                  TARGET_CLONE_MS, "ms"),
        "ratio_cold_over_clone": target("cold / clone ratio of medians",
                                        result["ratio_cold_over_clone"], ">=", TARGET_RATIO, "x"),
        "clone_pss_fraction_n10": target(f"clone PSS / direct PSS at N={TARGET_PSS_N}",
                                         fraction, "<=", TARGET_PSS_FRACTION, "fraction"),
    }


# -- the report ------------------------------------------------------------------------

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


def latency_section(result: dict[str, Any]) -> list[str]:
    rows = [[name, *(float(result[key][s]) for s in ("median", "p90", "min", "max"))]
            for name, key in LATENCY_ROWS if result[key]]
    ratio = result["ratio_cold_over_clone"]
    return [table(["latency", "median", "p90", "min", "max"], rows),
            f"cold / clone ratio of medians: {ratio:.1f}x" if ratio else
            "cold / clone ratio: n/a"]


def memory_row(result: dict[str, Any], s: int) -> list[Any]:
    cells = [result[m][kind][str(s)] for kind in KINDS for m in ("pss_mib", "uss_mib")]
    dp, cp = cells[0], cells[2]
    frac = f"{100 * cp / dp:.1f}%" if dp and cp is not None else "n/a"
    return [s, *("n/a" if c is None else float(c) for c in cells), frac]


def memory_section(result: dict[str, Any]) -> list[str]:
    tpl = result["template"]
    out = ["host memory per VM with N alive (MiB, mean over the N VMs)",
           table(["N", "direct PSS", "direct USS", "clone PSS", "clone USS",
                  "clone/direct PSS"], [memory_row(result, s) for s in result["sizes"]]),
           f"(plus the template's RAM file on tmpfs: {tpl['memory_file_resident_mib']:.0f} MiB "
           f"resident, shared by all clones, in no process's PSS)"]
    if tpl.get("standby_pss_mib") is not None:
        out.append(f"(plus {tpl['standby_qemus']} QEMU(s) standing by for the next clone: "
                   f"{tpl['standby_pss_mib']:.1f} MiB PSS each)")
    for phase, why in (result["stopped_early"] or {}).items():
        out.append(f"stopped early ({phase}): {why}")
    return out


def targets_section(result: dict[str, Any]) -> list[str]:
    out = ["targets", table(["target", "measured", "goal", "result"],
                            [[t["description"], fmt_value(t), fmt_goal(t), verdict(t)]
                             for t in result["targets"].values()])]
    host = result["host"]
    if host["other_qemu_start"] or host["other_qemu_end"]:
        out.append(f"note: {host['other_qemu_start']} other QEMU processes at the start, "
                   f"{host['other_qemu_end']} at the end, shared the {host['cpus']} CPUs "
                   f"(load average {host['loadavg_start'][0]} -> {host['loadavg_end'][0]})")
    rt = result["runtime_s"]
    return out + [f"runtime {int(rt // 60)} min {rt % 60:.0f} s"]


def report(result: dict[str, Any]) -> str:
    head = (f"template vs cold boot, accel {result['accel']}, {result['n']} cold boots, "
            f"{result['clones']} clones, template built in {result['template']['build_s']:.1f} s")
    return "\n".join([head, *latency_section(result), "", *memory_section(result), "",
                      *targets_section(result)])


# -- template.png -------------------------------------------------------------------

def latency_axis(ax: Any, result: dict[str, Any]) -> None:
    runs = result["runs"]
    groups = [("cold boot\nspawn -> agent ready", [r["agent_ready_ms"] for r in runs["cold"]],
               "C0"),
              ("clone, standby QEMU\nstart -> agent ready",
               [r["agent_ready_ms"] for r in runs["clone"] if r.get("standby")], "C1"),
              ("clone, new QEMU\nspawn -> agent ready",
               [r["agent_ready_ms"] for r in runs["clone"] if not r.get("standby")], "C4"),
              ("clone\nrestore", [r["restore_ms"] - r["qemu_start_ms"] for r in runs["clone"]],
               "C2")]
    groups = [g for g in groups if g[1]]
    for x, (_, values, color) in enumerate(groups):
        st = stats(values)
        ax.bar(x, st["median"], width=0.6, color=color, alpha=0.75)
        ax.errorbar(x, st["median"], yerr=[[st["median"] - st["min"]], [st["p90"] - st["median"]]],
                    fmt="none", ecolor="black", capsize=6)
        jitter = [x + 0.18 * ((i % 7) - 3) / 3 for i in range(len(values))]
        ax.scatter(jitter, values, s=10, color="black", alpha=0.5, zorder=3)
        text = f"{st['median'] / 1000:.1f} s" if st["median"] >= 1000 else f"{st['median']:.0f} ms"
        ax.annotate(text, (x, st["p90"]), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=9)
    ax.axhline(TARGET_CLONE_MS, color="C3", linestyle="--", linewidth=1,
               label=f"clone target {TARGET_CLONE_MS:.0f} ms")
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=9)
    ax.set_ylim(bottom=1, top=max(max(g[1]) for g in groups) * 4)
    ratio = result["ratio_cold_over_clone"]
    ax.set(ylabel="ms (log)", title=f"Latency ({result['accel']}): median, whiskers min..p90"
                                    + (f"\ncold / clone = {ratio:.0f}x" if ratio else ""))
    ax.legend(loc="upper right", fontsize=8)


def memory_axis(ax: Any, result: dict[str, Any]) -> None:
    sizes = [int(s) for s in result["sizes"]]
    for kind, color in (("direct", "C0"), ("clone", "C1")):
        for metric, style, marker in (("pss_mib", "-", "o"), ("uss_mib", "--", "s")):
            points = [(s, result[metric][kind][str(s)]) for s in sizes
                      if result[metric][kind][str(s)] is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], linestyle=style,
                        marker=marker, color=color, label=f"{kind} {metric.split('_')[0].upper()}")
    ax.set_xticks(sizes)
    ax.set(xlabel="N VMs alive at once", ylabel="MiB per VM (mean)", ylim=(0, None),
           title="Host memory per VM vs N")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot(result: dict[str, Any], path: Path) -> None:
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(12, 4.8))
    latency_axis(ax1, result)
    memory_axis(ax2, result)
    save_figure(fig, path)
