"""The sizing benchmark's verdict, table and plot (sizing.png): per trace, hit
ratio against idle VM-seconds for every policy, and the adaptive pool's target
over time against the arrivals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.lib.output import fmt, pyplot, save_figure, table, verdict

ADAPTIVE = "adaptive"


def best_fixed(cells: dict[str, dict[str, Any]]) -> str | None:
    """The fixed policy with the highest hit ratio, the smallest one among equals."""
    fixed = [(name, c) for name, c in cells.items()
             if name != ADAPTIVE and c.get("hit_ratio") is not None]
    if not fixed:
        return None
    top = max(c["hit_ratio"] for _, c in fixed)
    return min((c["idle_vm_s"], name) for name, c in fixed if c["hit_ratio"] == top)[1]


def bursty_target(cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Acceptance: on the bursty trace, adaptive hits at least as often as the best
    fixed size, with fewer idle VM-seconds."""
    best, ours = best_fixed(cells), cells.get(ADAPTIVE)
    if best is None or not ours or ours.get("hit_ratio") is None:
        return {"pass": None, "best_fixed": best}
    theirs = cells[best]
    ok = ours["hit_ratio"] >= theirs["hit_ratio"] and ours["idle_vm_s"] < theirs["idle_vm_s"]
    return {"pass": ok, "best_fixed": best, "adaptive_hit_ratio": ours["hit_ratio"],
            "best_fixed_hit_ratio": theirs["hit_ratio"], "adaptive_idle_vm_s": ours["idle_vm_s"],
            "best_fixed_idle_vm_s": theirs["idle_vm_s"]}


def report(result: dict[str, Any]) -> str:
    rows = []
    for trace, cells in result["traces"].items():
        for policy, c in cells.items():
            rows.append([trace, policy, c.get("requests", "n/a"), fmt(c.get("hit_ratio"), 3),
                         fmt(c.get("p50_ms")), fmt(c.get("p99_ms")), fmt(c.get("idle_vm_s")),
                         fmt(c.get("mean_target"), 2), c.get("errors", c.get("error", "n/a"))])
    t = result["target"]
    lines = [table(["trace", "policy", "requests", "hit ratio", "p50 ms", "p99 ms",
                    "idle VM-s", "mean target", "errors"], rows), "",
             f"bursty: adaptive hit ratio {t.get('adaptive_hit_ratio')} vs best fixed "
             f"({t.get('best_fixed')}) {t.get('best_fixed_hit_ratio')}, idle VM-s "
             f"{t.get('adaptive_idle_vm_s')} vs {t.get('best_fixed_idle_vm_s')}: {verdict(t)}",
             f"leaked: {result['leaked_total']}, runtime {result['runtime_s']} s"]
    return "\n".join(lines)


def trade_off_axis(ax: Any, name: str, cells: dict[str, dict[str, Any]]) -> None:
    for i, (policy, c) in enumerate(cells.items()):
        if c.get("hit_ratio") is None:
            continue
        color = "C3" if policy == ADAPTIVE else f"C{i % 3}"
        ax.scatter(c["idle_vm_s"], c["hit_ratio"], color=color, s=60,
                   marker="*" if policy == ADAPTIVE else "o")
        ax.annotate(policy, (c["idle_vm_s"], c["hit_ratio"]), fontsize=8,
                    xytext=(4, -10), textcoords="offset points")
    ax.set(xlabel="idle VM-seconds (measured span)", ylabel="hit ratio", ylim=(0, 1.05),
           title=f"{name}: hit ratio vs idle VMs")
    ax.grid(alpha=0.3)


def timeline_axis(ax: Any, name: str, cells: dict[str, dict[str, Any]],
                  arrivals: list[float], warmup: float) -> None:
    ours = cells.get(ADAPTIVE, {}).get("series") or []
    if ours:
        ts = [row[0] for row in ours]
        ax.step(ts, [row[3] for row in ours], where="post", color="C3", label="adaptive target")
        ax.step(ts, [row[1] for row in ours], where="post", color="C3", alpha=0.4,
                label="adaptive ready")
    rate = ax.twinx()
    if arrivals:
        bins = max(1, int(max(arrivals) // 5) + 1)
        rate.hist(arrivals, bins=bins, range=(0, bins * 5), color="grey", alpha=0.3)
    rate.set_ylabel("arrivals per 5 s", fontsize=8)
    ax.axvspan(0, warmup, color="grey", alpha=0.1, label="warm-up")
    ax.set(xlabel="seconds", ylabel="VMs", title=f"{name}: the adaptive pool over time")
    ax.legend(fontsize=7, loc="upper left")


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    names = list(result["traces"])
    fig, axes = plt.subplots(2, max(1, len(names)), figsize=(5.5 * max(1, len(names)), 8),
                             squeeze=False)
    for i, name in enumerate(names):
        cells, trace = result["traces"][name], result["trace_shapes"][name]
        trade_off_axis(axes[0][i], name, cells)
        timeline_axis(axes[1][i], name, cells, trace["arrivals_at"], trace["warmup_s"])
    fig.suptitle(f"Pool sizing: fixed sizes vs adaptive ({result['host']['cpus']} CPUs, "
                 f"{result['accel']}, {'quick' if result['quick'] else 'full'} run)")
    save_figure(fig, path)
