"""Run benchmark: time from `run` to the container's first stdout byte, per VM source.

Runs ``echo first`` in a busybox bundle through the runtime client library
(katashimbuiltin, noProxy) on VMs from three sources, in one invocation:

* cold:  no daemon answers, so the client boots a VM in-process (CreateNew);
* clone: a daemon whose only pool has another VM size, so GetVM clones the
         template on demand;
* pool:  a daemon with a warm pool of the default size, refilled between runs
         so every GetVM is a hit.

Each source gets one untimed warm-up run.  The bundle's ext4 root image is built
once before all runs and reported as image_build_ms.  Prints a table (or one
JSON object with --json; progress goes to stderr) and saves
benchmarks/results/run.json and run.png (or under --out DIR).

    python benchmarks/run.py [--cold 3] [-n 10] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.lib.daemon import stop_daemon  # noqa: E402
from benchmarks.lib.host import other_qemu_count  # noqa: E402
from benchmarks.lib.leaks import remove_tree  # noqa: E402
from benchmarks.lib.output import (  # noqa: E402
    add_out_option, progress, publish, pyplot, save_figure, table)
from benchmarks.lib.stats import stats  # noqa: E402

from runtime_client.bundles import Bundle, ImageCache, load_bundle  # noqa: E402
from vmfactory.server.client import FactoryClient  # noqa: E402
from runtime_client.sandbox import Runtime  # noqa: E402
from runtime_client.bundles.busybox import make_busybox_bundle  # noqa: E402
from vmfactory.config import Config, load_config, scratch_config  # noqa: E402
from vmfactory.guest.image import GuestImage, ImageBuilder  # noqa: E402
from vmfactory.util.spawn import spawn_daemon  # noqa: E402

ARGS = ["echo", "first"]
SOURCES = ("cold", "clone", "pool")
VM_SOURCE = {"cold": "boot", "clone": "clone", "pool": "pool"}  # SandboxVm.source
TARGET_POOL_MEDIAN_MS = 250
POOL_MIN = 2
DAEMON_START_S = 60
DAEMON_STOP_S = 120
POOL_FILL_S = 600
# Segments that add up to the first-byte time (stacked in the plot).
SEGMENTS = ("get_vm", "sandbox_record", "disk_attach", "connect_and_create",
            "start_to_first_byte")
BREAKDOWN = ("get_vm_ms", "attach_ms", "create_ms", "start_ms", "first_byte_ms", "exit_ms")
POOLS: dict[str, list[dict[str, Any]]] = {
    "cold": [],  # no daemon runs
    # Another size than the runtime asks for: GetVM clones the template now.
    "clone": [{"name": "other", "cpus": 2, "min_size": 0, "max_size": 1}],
    "pool": [{"name": "warm", "min_size": POOL_MIN, "max_size": POOL_MIN}],
}


def write_config(root: Path, phase: str, guest: GuestImage) -> Path:
    """A config for ``phase``; cold points the daemon socket at a path nobody serves."""
    overrides: dict[str, Any] = {
        "paths": {"state_dir": str(root / "state")},
        "image": {"kernel": str(guest.kernel), "initrd": str(guest.initrd),
                  "rootfs": str(guest.rootfs)},
        "vm": {"accel": "tcg"},
        "daemon": {"socket": str(root / ("none.sock" if phase == "cold" else "factory.sock")),
                   "mem_floor_mib": 512},
        "store": {"url": f"file://{root / ('store-' + phase)}"},
        "runtime": {"fallback": "createnew", "get_vm_timeout_s": 600.0},
    }
    if POOLS[phase]:
        overrides["pools"] = POOLS[phase]
    return scratch_config(root, overrides, name=f"{phase}.toml")


@contextmanager
def daemon(root: Path, config: Path, label: str) -> Iterator[subprocess.Popen[bytes]]:
    """A daemon process serving ``config``; SIGTERM'd and awaited on exit."""
    proc = spawn_daemon(config, root / "factory.sock", root / f"daemon-{label}.log",
                        timeout=DAEMON_START_S)
    try:
        progress(f"run: {label} daemon pid {proc.pid} serving")
        yield proc
    finally:
        stop(proc, label)


def stop(proc: subprocess.Popen[bytes], label: str) -> None:
    if stop_daemon(proc, DAEMON_STOP_S) is None:
        progress(f"run: {label} daemon ignored SIGTERM for {DAEMON_STOP_S} s: killed")
    progress(f"run: {label} daemon exited ({proc.returncode})")


async def wait_pool(client: FactoryClient, timeout: float = POOL_FILL_S) -> None:
    """Until the pool holds min_size ready VMs and nothing is being made."""
    deadline = time.monotonic() + timeout
    while True:
        pool = (await client.status()).pools[0]
        if pool.ready >= pool.min_size and pool.refilling == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"pool did not refill: {pool.ready}/{pool.min_size} ready")
        await asyncio.sleep(0.1)


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def one_run(rt: Runtime, bundle: Bundle, name: str) -> dict[str, Any]:
    """One sandbox + container + attach; times relative to t0 (before create_sandbox)."""
    marks: dict[str, float] = {}
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    try:
        t0 = time.monotonic()
        sandbox = await rt.create_sandbox(name)
        try:
            marks["sandbox"] = time.monotonic()
            container = await sandbox.create_container(bundle, name, args=ARGS)
            marks["created"] = time.monotonic()
            # As `vmfactory-runtime run` does: start with the IoStream already open.
            code = await container.run(
                stdin=None, stdout=write_fd, stderr=write_fd,
                on_first_output=lambda: marks.setdefault("first", time.monotonic()))
            marks["exit"] = time.monotonic()
            source = sandbox.vm.source if sandbox.vm is not None else "?"
        finally:
            await sandbox.delete()
        output = _read_all(read_fd)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    if code != 0 or output != b"first\n" or "first" not in marks:
        raise RuntimeError(f"{name}: exit {code}, output {output!r}")
    ms = {k: (v - t0) * 1000 for k, v in marks.items()}
    return _timings(source, ms, {**sandbox.timings, **container.timings})


def _timings(source: str, ms: dict[str, float], lib: dict[str, float]) -> dict[str, Any]:
    """The library's timings, the run's own marks, and segments summing to first byte."""
    # The agent connection opens while the root disk is plugged, so "create"
    # (plug + connect + create in the guest) covers both.
    segments = {
        "get_vm": lib["get_vm_ms"], "sandbox_record": ms["sandbox"] - lib["get_vm_ms"],
        "disk_attach": lib["attach_ms"],
        "connect_and_create": ms["created"] - ms["sandbox"] - lib["attach_ms"],
        "start_to_first_byte": ms["first"] - ms["created"]}
    out: dict[str, Any] = {"source": source, "get_vm_ms": lib["get_vm_ms"],
                           "attach_ms": lib["attach_ms"], "create_ms": lib["create_ms"],
                           "start_ms": lib["start_ms"], "first_byte_ms": ms["first"],
                           "exit_ms": ms["exit"]}
    out.update({f"seg_{k}_ms": v for k, v in segments.items()})
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


async def run_phase(config: Config, source: str, n: int, bundle: Bundle,
                    before: Callable[[], Awaitable[None]] | None = None) -> list[dict[str, Any]]:
    """One untimed warm-up run, then ``n`` timed runs, each checked for its VM's source."""
    rt = Runtime(config, shim="katashimbuiltin", proxy="noProxy")
    runs: list[dict[str, Any]] = []
    try:
        for i in range(n + 1):
            if before is not None:
                await before()
            r = await one_run(rt, bundle, f"b{source}{i}")
            if r["source"] != VM_SOURCE[source]:
                raise RuntimeError(f"{source} run {i}: the VM came from {r['source']!r}")
            label = "warm-up" if i == 0 else f"[{i}/{n}]"
            progress(f"run: {source} {label} first byte {r['first_byte_ms']:.0f} ms (get_vm "
                     f"{r['get_vm_ms']:.0f}, create {r['create_ms']:.0f}, start "
                     f"{r['start_ms']:.0f}), exit {r['exit_ms']:.0f} ms")
            if i:
                runs.append(r)
        return runs
    finally:
        await rt.close()


async def phases(root: Path, n_cold: int, n: int) -> dict[str, Any]:
    guest = await asyncio.to_thread(ImageBuilder(load_config().paths.state_dir, quiet=True).ensure)
    paths = {s: write_config(root, s, guest) for s in SOURCES}
    configs = {s: load_config(p) for s, p in paths.items()}
    bundle = load_bundle(make_busybox_bundle(root / "bundle", args=ARGS))
    t = time.monotonic()
    ImageCache(configs["cold"].paths.state_dir / "bundle-images").image_for(bundle.rootfs)
    image_build_ms = (time.monotonic() - t) * 1000
    progress(f"run: bundle root image built in {image_build_ms:.0f} ms")
    runs = {"cold": await run_phase(configs["cold"], "cold", n_cold, bundle)}
    with daemon(root, paths["clone"], "clone"):
        runs["clone"] = await run_phase(configs["clone"], "clone", n, bundle)
    with daemon(root, paths["pool"], "pool"):
        async with FactoryClient(str(root / "factory.sock")) as client:
            progress(f"run: filling the pool ({POOL_MIN} VMs)")
            await wait_pool(client)
            runs["pool"] = await run_phase(configs["pool"], "pool", n, bundle,
                                           lambda: wait_pool(client))
    return summarize(runs, image_build_ms)


def summarize(runs: dict[str, list[dict[str, Any]]], image_build_ms: float) -> dict[str, Any]:
    first = {s: stats([r["first_byte_ms"] for r in rs]) for s, rs in runs.items()}
    breakdown = {s: {k: round(statistics.median(r[k] for r in rs), 3)
                     for k in BREAKDOWN + tuple(f"seg_{g}_ms" for g in SEGMENTS)}
                 for s, rs in runs.items()}
    return {
        "benchmark": "run", "command": ARGS, "shim": "katashimbuiltin", "proxy": "noProxy",
        "accel": "tcg", "first_byte_ms": first,
        "exit_ms": {s: stats([r["exit_ms"] for r in rs]) for s, rs in runs.items()},
        "breakdown_ms": breakdown, "image_build_ms": round(image_build_ms, 3),
        "target": {"pool_median_lt_ms": TARGET_POOL_MEDIAN_MS,
                   "reached": first["pool"]["median"] < TARGET_POOL_MEDIAN_MS},
        "n": {s: len(rs) for s, rs in runs.items()}, "runs": runs}


async def measure(n_cold: int, n: int) -> dict[str, Any]:
    """All phases in a fresh short /tmp root, removed (and QEMU-checked) afterwards."""
    root = Path(tempfile.mkdtemp(prefix="vmfrun-", dir="/tmp"))
    others = other_qemu_count(root)
    leaked: list[int] = []
    try:
        result = await phases(root, n_cold, n)
    finally:
        leaked = remove_tree(root)
        if leaked:
            progress(f"run: killed leftover QEMU processes under {root}: {leaked}")
    result["other_qemu"] = {"start": others, "end": other_qemu_count(root)}
    result["leaked_qemu"] = leaked
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(12, 4.5))
    data = [[r["first_byte_ms"] for r in result["runs"][s]] for s in SOURCES]
    ax1.boxplot(data, whis=(0, 100))
    ax1.set_xticks(range(1, len(SOURCES) + 1), SOURCES)
    for i, values in enumerate(data, start=1):
        ax1.scatter([i] * len(values), values, s=14, alpha=0.6, zorder=3)
    ax1.axhline(TARGET_POOL_MEDIAN_MS, ls="--", color="grey", lw=1,
                label=f"target {TARGET_POOL_MEDIAN_MS} ms (pool median)")
    ax1.set(yscale="log", ylabel="ms (log)", title="run -> first stdout byte")
    ax1.legend(loc="upper right")
    totals = [result["first_byte_ms"][s]["median"] for s in SOURCES]
    sums = [sum(result["breakdown_ms"][s][f"seg_{g}_ms"] for g in SEGMENTS) for s in SOURCES]
    left = [0.0] * len(SOURCES)
    for seg in SEGMENTS:
        shares = [100 * result["breakdown_ms"][s][f"seg_{seg}_ms"] / t
                  for s, t in zip(SOURCES, sums)]
        ax2.barh(list(SOURCES), shares, left=left, label=seg)
        left = [a + b for a, b in zip(left, shares)]
    for i, t in enumerate(totals):
        ax2.text(101, i, f"{t:.0f} ms", va="center")
    ax2.set(xlim=(0, 118), xlabel="% (segment medians, normalised)",
            title="Breakdown; label: median first byte")
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
    save_figure(fig, path)


def report(result: dict[str, Any]) -> str:
    fb, ex, bd = result["first_byte_ms"], result["exit_ms"], result["breakdown_ms"]
    rows = [[s, fb[s]["n"], fb[s]["median"], fb[s]["p90"], fb[s]["min"], fb[s]["max"],
             ex[s]["median"]] for s in SOURCES]
    parts = [f"run -> first stdout byte of {' '.join(ARGS)!r} (ms), accel tcg",
             table(["source", "n", "median", "p90", "min", "max", "exit median"], rows), "",
             "breakdown medians (ms)",
             table(["source", *SEGMENTS],
                   [[s, *(bd[s][f"seg_{g}_ms"] for g in SEGMENTS)] for s in SOURCES]), "",
             f"bundle image build: {result['image_build_ms']:.0f} ms; target pool median < "
             f"{TARGET_POOL_MEDIAN_MS} ms: {'reached' if result['target']['reached'] else 'not reached'}"
             f"; other QEMU processes on the host: {result['other_qemu']}"]
    return "\n".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cold", type=int, default=3, help="cold (CreateNew) runs (default 3)")
    p.add_argument("-n", type=int, default=10, help="clone and pool runs each (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_out_option(p)
    args = p.parse_args()
    if args.cold < 1 or args.n < 1:
        p.error("--cold and -n must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    logging.getLogger("runtime_client.vm").setLevel(logging.ERROR)  # CreateNew is intended
    try:
        result = asyncio.run(measure(args.cold, args.n))
    except KeyboardInterrupt:
        progress("run: interrupted (cleaned up)")
        return 130
    publish("run", result, args.out, as_json=args.json, report=report, plot=plot, omit="runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
