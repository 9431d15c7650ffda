"""Background failures of a real ``vmfactory init`` with real QEMU VMs, its store
failing on demand (``python -m tests.faults``: the configured store wrapped in
a test double that refuses what its trigger file names)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.server.conftest import (
    POOL_READY_TIMEOUT_S, DaemonProc, assert_clean, start_daemon, stop_daemon, write_config,
)
from vmfactory.guest.image import GuestImage
from vmfactory.server.client import FactoryClient

pytestmark = pytest.mark.qemu


@pytest.fixture
def root(guest_image: GuestImage) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vmfx-", dir="/tmp"))
    yield path
    subprocess.run(["umount", "-l", *map(str, (path / "templates").glob("*"))],
                   capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


def faulty_daemon(root: Path) -> DaemonProc:
    config = write_config(root, min_size=1, max_size=1)
    return start_daemon(root, config, [sys.executable, "-m", "tests.faults", str(root / "fail"),
                                       "--config", str(config), "init"])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, d: DaemonProc) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{d.log()[-3000:]}"
        time.sleep(0.2)


async def ready(d: DaemonProc) -> int:
    async with FactoryClient(d.socket, timeout=10) as client:
        return (await client.status()).pools[0].ready


def test_refills_failing_on_the_store_keep_the_daemon_serving(root: Path) -> None:
    (root / "fail").write_text("save")
    d = faulty_daemon(root)
    try:
        wait_until(lambda: "refill failed: injected failure" in d.log(), POOL_READY_TIMEOUT_S,
                   "a failed refill", d)
        assert d.proc.poll() is None and asyncio.run(ready(d)) == 0  # serving, pool empty
        (root / "fail").unlink()
        wait_until(lambda: asyncio.run(ready(d)) == 1, POOL_READY_TIMEOUT_S,
                   "the refill after the fault", d)

        async def get_and_release() -> str:
            async with FactoryClient(d.socket, timeout=60) as client:
                handle = await client.get_vm()
                await client.release(handle.lease_id)
                return handle.source
        assert asyncio.run(get_and_release()) == "pool"
    finally:
        code = stop_daemon(d)
    assert code == 0, d.log()
    assert_clean(root)


def test_a_failing_lease_reaper_stops_vmfactory_init_cleanly(root: Path) -> None:
    d = faulty_daemon(root)
    try:
        wait_until(lambda: asyncio.run(ready(d)) == 1, POOL_READY_TIMEOUT_S, "a full pool", d)

        async def lease() -> None:
            async with FactoryClient(d.socket, timeout=60) as client:
                await client.get_vm(lease_ttl_s=1.0)
        asyncio.run(lease())
        (root / "fail").write_text("delete")  # the expired lease's record cannot go
        code = d.proc.wait(timeout=120)
    finally:
        stop_daemon(d)
    log = d.log().strip().splitlines()
    assert code == 1, log[-20:]
    assert log[-1] == ("vmfactory: error: background task daemon:lease-reaper failed: "
                       "StoreError: injected failure: store delete refused"), log[-20:]
    assert any("stopping the daemon" in line for line in log)
    assert_clean(root)
