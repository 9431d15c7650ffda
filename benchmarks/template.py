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
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.host import (  # noqa: E402
    cancel_on_sigterm, host_end, host_start, interrupted_exit)
from benchmarks.lib.leaks import remove_tree  # noqa: E402
from benchmarks.lib.output import add_out_option, progress, publish  # noqa: E402
from benchmarks.lib.template_phases import PREFIX, Bench, measure  # noqa: E402
from benchmarks.lib.template_report import assemble, plot, report  # noqa: E402

from vmfactory.config import Config, load_config  # noqa: E402
from vmfactory.factory.spec import image_paths  # noqa: E402


async def run(config: Config, n: int, clones: int, sizes: list[int]) -> dict[str, Any]:
    t_start = time.monotonic()
    host = host_start(config.paths.run_dir)
    progress(f"{PREFIX} preparing the guest image")
    await image_paths(config, quiet=False)
    bench = Bench(config)
    try:
        measured = await measure(bench, n, clones, sizes)
    finally:
        await bench.close()
    host.update(host_end(config.paths.run_dir))
    return assemble(config, measured, n, clones, sizes, host,
                    round(time.monotonic() - t_start, 1))


@contextmanager
def private_dirs() -> Iterator[tuple[Path, Path]]:
    """A run directory in /tmp and a template directory in /dev/shm, removed on exit
    with whatever QEMU process or mount is still under them."""
    run_dir = Path(tempfile.mkdtemp(prefix="vmf-bench-", dir="/tmp"))
    shm_dir = Path(tempfile.mkdtemp(prefix="vmfactory-bench-", dir="/dev/shm"))
    try:
        yield run_dir, shm_dir
    finally:
        leftovers = remove_tree(run_dir) + remove_tree(shm_dir)
        if leftovers:
            progress(f"{PREFIX} killed leftover QEMU processes {leftovers}")


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}")
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError("sizes must be positive integers")
    return sizes


def parse_args() -> argparse.Namespace:
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
    return args


def main() -> int:
    args = parse_args()
    try:
        with private_dirs() as (run_dir, shm_dir):
            config = load_config(args.config, overrides={"paths": {
                "run_dir": str(run_dir), "template_dir": str(shm_dir / "templates")}})
            result = asyncio.run(cancel_on_sigterm(  # every VM is stopped on SIGTERM too
                run(config, args.n, args.clones, args.sizes)))
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:  # Ctrl-C, SIGTERM
        progress(f"{PREFIX} interrupted ({type(exc).__name__}): every VM stopped, "
                 f"run and template directories removed; no results saved")
        return interrupted_exit(exc)
    publish("template", result, args.out, as_json=args.json, report=report, plot=plot,
            omit="runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
