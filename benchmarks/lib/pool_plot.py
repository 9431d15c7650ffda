"""pool.png: get latency from a full pool, a hit vs a miss, the sweep's hit ratios."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from benchmarks.lib.output import pyplot, save_figure
from benchmarks.lib.pool_report import (
    COMPARISON, TARGET_HOT_MEDIAN_MS, TARGET_WARM_MEDIAN_MS, TARGET_WARM_P99_MS)


def latency_axis(ax: Any, result: dict[str, Any]) -> None:
    for key, label, color, dx in (("warm_get_ms", "warm (paused)", "C0", 0.97),
                                  ("hot_get_ms", "hot (running)", "C1", 1.03)):
        items = sorted(((int(c), s) for c, s in result[key].items() if s and "median" in s))
        if not items:
            continue
        xs = [c * dx for c, _ in items]
        ax.plot(xs, [s["median"] for _, s in items], marker="o", color=color,
                label=f"{label} median")
        ax.scatter(xs, [s["p99"] for _, s in items], marker="v", color=color, s=60,
                   label=f"{label} p99")
        for x, (_, s) in zip(xs, items):
            ax.vlines(x, s["median"], s["p99"], color=color, alpha=0.4)
    ax.axhline(TARGET_WARM_MEDIAN_MS, color="C0", ls=":", lw=1, label="warm median target")
    ax.axhline(TARGET_WARM_P99_MS, color="C0", ls="--", lw=1, label="warm p99 target")
    ax.axhline(TARGET_HOT_MEDIAN_MS, color="C1", ls=":", lw=1, label="hot median target")
    ax.set_xscale("log", base=2)
    ticks = sorted({int(c) for key in ("warm_get_ms", "hot_get_ms") for c in result[key]})
    if ticks:
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xticks([], minor=True)
    ax.set_yscale("log")
    ax.set(xlabel="concurrent clients", ylabel="client-side get latency (ms)",
           title="Get from a full pool")
    ax.legend(fontsize=7)


def comparison_axis(ax: Any, result: dict[str, Any]) -> None:
    labels, values, colors = [], [], []
    for _, label, key, color in COMPARISON:
        s = result["comparison_ms"].get(key)
        if s and "median" in s:
            labels.append(label)
            values.append(s["median"])
            colors.append(color)
    bars = ax.bar(labels, values, color=colors)
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, v * 1.1, f"{v:.1f} ms" if v < 1000 else
                f"{v / 1000:.1f} s", ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.set(ylabel="client-side latency, median (ms)", title="A get: pool hit vs miss (C=1)")


def sweep_grid(sw: dict[str, Any]) -> tuple[list[list[float]], list[list[str]]]:
    """Hit ratio and a note per (pool size, rate) cell; NaN and "" where none was measured."""
    rates, sizes = sw["rates"], sw["sizes"]
    grid = [[math.nan] * len(rates) for _ in sizes]
    notes = [[""] * len(rates) for _ in sizes]
    for c in sw["cells"]:
        if c["pool_size"] in sizes and c["rate_per_s"] in rates and c["hit_ratio"] is not None:
            i, j = sizes.index(c["pool_size"]), rates.index(c["rate_per_s"])
            grid[i][j] = c["hit_ratio"]
            notes[i][j] = f"{100 * c['hit_ratio']:.0f}%\nmed {c['median_ms']:.0f} ms\n" \
                          f"n={c['requests']}"
    return grid, notes


def sweep_axis(fig: Any, ax: Any, result: dict[str, Any]) -> None:
    sw = result["sweep"]
    rates, sizes = sw["rates"], sw["sizes"]
    grid, notes = sweep_grid(sw)
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, origin="lower", aspect="auto")
    for i in range(len(sizes)):
        for j in range(len(rates)):
            if notes[i][j]:
                ax.text(j, i, notes[i][j], ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
    ax.set_yticks(range(len(sizes)), [str(s) for s in sizes])
    ax.set(xlabel="arrival rate (requests/s)", ylabel="pool size",
           title=f"Hit ratio (Poisson arrivals, hold ~{sw['hold_mean_s']:g} s)")
    fig.colorbar(im, ax=ax, label="hit ratio")


def plot(result: dict[str, Any], path: Path) -> None:
    fig, (ax1, ax2, ax3) = pyplot().subplots(1, 3, figsize=(17, 5))
    latency_axis(ax1, result)
    comparison_axis(ax2, result)
    sweep_axis(fig, ax3, result)
    fig.suptitle(f"vmfactory pools (TCG{', quick run' if result['quick'] else ''})")
    save_figure(fig, path)
