"""Every benchmark, one after another, and a markdown summary of them.

Runs boot, template, run, recovery, pool and sizing (each ``python
benchmarks/NAME.py --json --out DIR``; their progress passes through on
stderr), keeps each one's JSON and PNG in DIR, and writes DIR/SUMMARY.md: the
machine (CPU, cores, memory, QEMU version, accelerator), the commit, and each
benchmark's headline numbers and plot.  A benchmark that fails is reported and
the others still run; the exit code is then 1.

    python benchmarks/run_all.py [--quick] [--out DIR] [--only NAME,...]

The full run takes about 90 minutes on a 2-core TCG host and writes
benchmarks/results/; ``--quick`` (a smoke run of about 25 minutes, fewer VMs and
shorter traces) writes benchmarks/results/quick/ unless --out is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.lib.output import RESULTS, progress  # noqa: E402
from benchmarks.lib.summary import commit, machine, markdown  # noqa: E402

# name: (full arguments, quick arguments)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "boot": ([], ["-n", "2"]),
    "template": ([], ["-n", "2", "--clones", "4", "--sizes", "1,2"]),
    "run": ([], ["--cold", "1", "-n", "2"]),
    "recovery": ([], ["-n", "4"]),
    "pool": ([], ["--quick"]),
    "sizing": ([], ["--quick"]),
    "engines": ([], ["-n", "2"]),
    "refill": ([], ["-n", "2", "--pings", "5"]),
}
PREFIX = "run_all:"


class Runner:
    """One benchmark subprocess at a time; SIGTERM stops the running one too."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[str] | None = None
        signal.signal(signal.SIGTERM, self._terminate)

    def _terminate(self, signum: int, frame: object) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()  # each benchmark stops its VMs on SIGTERM
        raise KeyboardInterrupt

    def run(self, name: str, args: list[str], out: Path) -> dict[str, Any]:
        argv = [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--json",
                "--out", str(out), *args]
        shown = [f"benchmarks/{name}.py", *argv[3:]]
        t = time.monotonic()
        self.child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO)
        try:
            stdout, _ = self.child.communicate()
        finally:
            if self.child.poll() is None:
                self.child.terminate()
                self.child.wait()
        run: dict[str, Any] = {"argv": shown, "exit_code": self.child.returncode,
                               "wall_s": round(time.monotonic() - t, 1)}
        self.child = None
        saved = out / f"{name}.json"
        if run["exit_code"] == 0 and saved.exists():
            run["result"] = json.loads(saved.read_text())
        else:
            run["error"] = f"exit code {run['exit_code']}; stdout: {stdout.strip()[-300:]}"
        return run


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run of every benchmark")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for the results and SUMMARY.md (default benchmarks/results, "
                        "with --quick benchmarks/results/quick)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    args = p.parse_args()
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}")
    args.names = names
    args.out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    return args


def main() -> int:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    t0, runner, runs = time.monotonic(), Runner(), {}
    measured = commit()  # what ran, before the results it writes make the tree differ
    try:
        for i, name in enumerate(args.names):
            progress(f"{PREFIX} [{i + 1}/{len(args.names)}] {name} "
                     f"({time.monotonic() - t0:.0f} s elapsed)")
            runs[name] = runner.run(name, BENCHMARKS[name][1 if args.quick else 0], args.out)
            progress(f"{PREFIX} [{i + 1}/{len(args.names)}] {name}: exit code "
                     f"{runs[name]['exit_code']} after {runs[name]['wall_s']:.0f} s")
    except KeyboardInterrupt:
        progress(f"{PREFIX} interrupted: the running benchmark was stopped; no summary written")
        return 130
    info = {"quick": args.quick, "started": started, "wall_s": time.monotonic() - t0,
            "machine": machine(), "commit": measured}
    summary = args.out / "SUMMARY.md"
    summary.write_text(markdown(runs, info, args.out) + "\n")
    (args.out / "run_all.json").write_text(json.dumps(
        {**info, "runs": {n: {k: v for k, v in r.items() if k != "result"}
                          for n, r in runs.items()}}, indent=2) + "\n")
    progress(f"{PREFIX} wrote {summary}")
    return 0 if all(r["exit_code"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
