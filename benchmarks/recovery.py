"""Crash recovery benchmark: how long a restarted daemon takes to re-adopt N VMs.

Starts a daemon with N VMs alive (half pooled, half leased), kills it with
SIGKILL, starts it again and reads how long recovery took (the daemon measures
it) and how long until it served again.  Prints a table or one JSON object, and
saves benchmarks/results/recovery.json (or under --out DIR).

    python benchmarks/recovery.py [-n 20] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.lib.daemon import stop_daemon  # noqa: E402
from benchmarks.lib.leaks import adopt_orphans, reap_orphans, remove_tree  # noqa: E402
from benchmarks.lib.output import add_out_option, progress, save_json, table  # noqa: E402

from vmfactory.server.client import FactoryClient  # noqa: E402
from vmfactory.config import scratch_config  # noqa: E402
from vmfactory.util.spawn import spawn_daemon  # noqa: E402

DAEMON_STOP_S = 120.0


def _config(root: Path, n: int) -> Path:
    return scratch_config(root, {
        "vm": {"accel": "tcg"}, "daemon": {"mem_floor_mib": 2048},
        "store": {"url": f"leveldb://{root / 'store.ldb'}"},
        "pools": [{"name": "bench", "min_size": n, "max_size": n}]})


def _start(root: Path, config: Path) -> subprocess.Popen[bytes]:
    return spawn_daemon(config, root / "factory.sock", root / "daemon.log")


async def _wait_ready(sock: str, n: int, timeout: float = 600) -> object:
    async with FactoryClient(sock) as client:
        deadline = time.monotonic() + timeout
        while True:
            status = await client.status()
            ready = status.pools[0].ready
            leased = sum(1 for v in status.vms if v.lease_id)
            if ready + leased >= n and status.pools[0].refilling == 0:
                return status
            if time.monotonic() > deadline:
                raise RuntimeError(f"pool did not fill: {ready} ready")
            await asyncio.sleep(0.5)


async def run(n: int) -> dict[str, object]:
    adopt_orphans()  # the killed daemon's VMs: reaped by us, not left as zombies
    root = Path(tempfile.mkdtemp(prefix="vmfr-", dir="/tmp"))
    pool = n - n // 2
    config = _config(root, pool)
    sock = str(root / "factory.sock")
    proc = _start(root, config)
    try:
        progress(f"recovery: filling a pool of {pool}")
        await _wait_ready(sock, pool)
        async with FactoryClient(sock) as client:
            leases = [await client.get_vm(client="bench") for _ in range(n // 2)]
        await _wait_ready(sock, n)
        alive = n
        progress(f"recovery: {alive} VMs alive ({len(leases)} leased); kill -9 the daemon")
        proc.kill()
        proc.wait()
        start = time.monotonic()
        proc = _start(root, config)
        serving_s = time.monotonic() - start
        async with FactoryClient(sock) as client:
            status = await client.status()
        result = {"benchmark": "recovery", "vms_alive": alive, "leased": len(leases),
                  "recovered": status.recovered, "recovery_s": round(status.recovery_s, 3),
                  "restart_to_serving_s": round(serving_s, 3)}
        progress(f"recovery: {status.recovered} VMs re-adopted in {status.recovery_s:.2f} s")
        return result
    finally:
        stop_daemon(proc, DAEMON_STOP_S)
        leaked = remove_tree(root)
        if leaked:
            progress(f"recovery: killed leftover QEMU processes under {root}: {leaked}")
        reap_orphans()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=20, help="pool size (default 20)")
    p.add_argument("--json", action="store_true")
    add_out_option(p)
    args = p.parse_args()
    result = asyncio.run(run(args.n))
    save_json("recovery", result, args.out)
    if args.json:
        print(json.dumps(result))
    else:
        print(table(["VMs alive", "leased", "re-adopted", "recovery (s)", "restart->serving (s)"],
                    [[result["vms_alive"], result["leased"], result["recovered"],
                      result["recovery_s"], result["restart_to_serving_s"]]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
