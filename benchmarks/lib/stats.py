"""Statistics of benchmark samples."""

from __future__ import annotations

import re
import statistics
from collections import Counter
from typing import Any


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100), the one stats() reports as p90."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def stats(values: list[float]) -> dict[str, float]:
    """median/min/max/mean/p90 of ``values``, rounded for printing."""
    ordered = sorted(values)
    out = {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
           "mean": statistics.fmean(ordered), "p90": percentile(ordered, 90), "n": len(ordered)}
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def maybe_stats(values: list[float]) -> dict[str, float] | None:
    """stats(), or None for no values."""
    return stats(values) if values else None


def mean(values: list[float]) -> float:
    return round(statistics.fmean(values), 3)


def median_or_none(values: list[float]) -> float | None:
    """The median rounded like stats(), or None for no values."""
    return round(statistics.median(values), 3) if values else None


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Latency stats (client side, ms) with p99, the server's own get_ms and the hits."""
    ok = [s for s in samples if "error" not in s]
    out: dict[str, Any] = {"requests": len(samples), "errors": len(samples) - len(ok)}
    if not ok:
        return out
    ms = [s["ms"] for s in ok]
    out.update(stats(ms))
    out["p99"] = round(percentile(ms, 99), 3)
    out["server_median"] = round(statistics.median(s["server_ms"] for s in ok), 3)
    out["server_p99"] = round(percentile([s["server_ms"] for s in ok], 99), 3)
    out["hit_fraction"] = round(sum(s["source"] == "pool" for s in ok) / len(ok), 4)
    out["sources"] = dict(Counter(s["source"] for s in ok))
    return out


def count_kinds(lines: list[str], most: int, width: int | None = None) -> dict[str, int]:
    """The ``most`` commonest lines once ids and numbers are masked as ``#``
    (cut to ``width`` characters)."""
    masked = (re.sub(r"[0-9a-f]{8,}|\d+(\.\d+)?", "#", ln)[:width] for ln in lines)
    return dict(Counter(masked).most_common(most))
