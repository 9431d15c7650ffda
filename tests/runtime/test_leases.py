"""Client leases cannot leak: the runtime client's leases carry a short TTL that
whoever holds the sandbox renews (the client, then its keeper process), so a
client killed at a bad moment loses its VM within the TTL."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.runtime.conftest import REPO, RuntimeDaemon, cli, client_processes, list_json
from vmfactory.config import load_config, to_toml

pytestmark = pytest.mark.qemu

TTL_S = 3.0
# A client that dies right after GetVM, before it wrote anything about its sandbox.
DOOMED = """
import asyncio, sys
from pathlib import Path
from runtime_client.vm import LeasedVm
from vmfactory.config import load_config
from vmfactory.server.client import FactoryClient

async def main() -> None:
    config = load_config(Path(sys.argv[1]))
    vm = await LeasedVm.get(FactoryClient(config.daemon.socket), config, "doomed")
    print(vm.lease_id, vm.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.fixture
def rd(runtime_daemon: RuntimeDaemon) -> RuntimeDaemon:
    return runtime_daemon


def short_ttl(rd: RuntimeDaemon, tmp_path: Path) -> Path:
    """The test daemon's config, with the client's lease TTL cut to TTL_S."""
    config = load_config(rd.config)
    path = tmp_path / "short-ttl.toml"
    path.write_text(to_toml(dataclasses.replace(
        config, runtime=dataclasses.replace(config.runtime, lease_ttl_s=TTL_S))))
    return path


def gone_within(rd: RuntimeDaemon, lease: str, seconds: float) -> float:
    """Seconds until ``lease`` is no longer in the daemon's status (fail after ``seconds``)."""
    start = time.monotonic()
    while lease in rd.leases():
        assert time.monotonic() - start < seconds, f"lease {lease} still held"
        time.sleep(0.2)
    return time.monotonic() - start


def keepers(rd: RuntimeDaemon) -> list[psutil.Process]:
    return client_processes(rd.root, "runtime_client.keeper")


def test_a_client_killed_between_getvm_and_its_record_loses_its_vm(
        rd: RuntimeDaemon, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", DOOMED, str(short_ttl(rd, tmp_path))],
                            stdout=subprocess.PIPE, cwd=REPO, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        lease, pid = proc.stdout.readline().split()
        assert lease.decode() in rd.leases()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    took = gone_within(rd, lease.decode(), TTL_S + 5)
    assert took <= TTL_S + 2  # the TTL, plus the reaper's half-second tick
    assert not psutil.pid_exists(int(pid)) or psutil.Process(int(pid)).status() == "zombie"


def test_a_detached_sandbox_keeps_its_lease_until_removed(
        rd: RuntimeDaemon, busybox_bundle: Path, tmp_path: Path) -> None:
    config = short_ttl(rd, tmp_path)
    out = cli(config, "run", "-d", "--name", "kept", str(busybox_bundle), "--", "sleep", "300")
    assert out.returncode == 0, out.stderr
    try:
        record = {s["id"]: s for s in list_json(config)["sandboxes"]}["kept"]
        lease, keeper = record["vm"]["lease_id"], record["keeper"]
        assert keeper and [p.pid for p in keepers(rd)] == [keeper]
        time.sleep(3 * TTL_S)  # three TTLs: only the keeper's renewals hold it
        assert lease in rd.leases()
        out = cli(config, "sandbox", "rm", "kept")
        assert out.returncode == 0, out.stderr
        assert not keepers(rd) and lease not in rd.leases()
    finally:
        cli(config, "sandbox", "rm", "kept")


def test_a_killed_keeper_lets_the_lease_end(rd: RuntimeDaemon, busybox_bundle: Path,
                                            tmp_path: Path) -> None:
    config = short_ttl(rd, tmp_path)
    out = cli(config, "run", "-d", "--name", "orphan", str(busybox_bundle), "--",
              "sleep", "300")
    assert out.returncode == 0, out.stderr
    try:
        record = {s["id"]: s for s in list_json(config)["sandboxes"]}["orphan"]
        os.kill(record["keeper"], signal.SIGKILL)
        assert gone_within(rd, record["vm"]["lease_id"], TTL_S + 5) <= TTL_S + 2
        # The records of a sandbox whose VM was reclaimed are still removable.
        out = cli(config, "sandbox", "rm", "orphan")
        assert out.returncode == 0, out.stderr
        assert "orphan" not in {s["id"] for s in list_json(config)["sandboxes"]}
    finally:
        cli(config, "sandbox", "rm", "orphan")
