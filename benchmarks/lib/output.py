"""Benchmark output: progress on stderr, text tables, result files and plots."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "results"


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def save_json(name: str, data: dict[str, Any], out: Path = RESULTS) -> Path:
    """Write ``out/NAME.json``; its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[f"{c:.1f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def add_out_option(parser: argparse.ArgumentParser) -> None:
    """``--out DIR``: where NAME.json and NAME.png go (default benchmarks/results)."""
    parser.add_argument("--out", type=Path, default=RESULTS, metavar="DIR",
                        help="directory for the JSON and PNG results (default "
                             "benchmarks/results; give smoke runs another one)")


def publish(name: str, result: dict[str, Any], out: Path, *, as_json: bool,
            report: Callable[[dict[str, Any]], str],
            plot: Callable[[dict[str, Any], Path], None], omit: str) -> None:
    """Save ``out/NAME.json`` and ``out/NAME.png``, then print ``result`` without
    its ``omit`` key as one JSON object (``as_json``) or the report and the paths."""
    json_path = save_json(name, result, out)
    png_path = out / f"{name}.png"
    plot(result, png_path)
    if as_json:
        print(json.dumps({k: v for k, v in result.items() if k != omit}))
        return
    print(report(result))
    print(f"saved {json_path} and {png_path}")


def fmt(v: Any, digits: int = 1) -> str:
    """A table cell: n/a for None, floats with ``digits`` decimals."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def verdict(t: dict[str, Any]) -> str:
    """PASS, FAIL or n/a for a target's ``pass``."""
    return {True: "PASS", False: "FAIL", None: "n/a"}[t["pass"]]


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (imported only when a plot is drawn)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` (PNG, 100 dpi) and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
