"""Crash recovery with real QEMU: kill -9 the daemon under load, start it again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from runtime_client.bundles.busybox import make_busybox_bundle
from runtime_client.bundles.images import ImageCache
from vmfactory.errors import VmFactoryError
from vmfactory.server.client import FactoryClient
from tests.conftest import qemu_pids_under
from tests.server.conftest import assert_clean, start_daemon, stop_daemon, write_config
from tests.server.test_daemon import pool_ready
from vmfactory.agent import AgentClient
from vmfactory.guest.image import GuestImage

pytestmark = pytest.mark.qemu


def _alive(pid: int) -> bool:
    """Running, not a zombie: an adopted QEMU is not our child, so once killed it
    waits as a zombie until whoever inherited it reaps it."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def _settled(client: FactoryClient, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    """A status taken while no pool is making a VM (checked before and after)."""
    deadline = time.monotonic() + timeout
    while True:
        before = await client.status()
        await asyncio.sleep(0.2)
        after = await client.status()
        if all(p.refilling == 0 for p in (*before.pools, *after.pools)) and \
                {v.pid for v in before.vms} == {v.pid for v in after.vms}:
            return after
        assert time.monotonic() < deadline, "pools never settled"
        await asyncio.sleep(0.2)


async def _churn(socket: str, stop: asyncio.Event) -> int:
    """get/release in a loop until stopped; errors are expected once the daemon dies."""
    cycles = 0
    async with FactoryClient(socket, timeout=30) as client:
        while not stop.is_set():
            with contextlib.suppress(VmFactoryError):
                handle = await client.get_vm(client="churn")
                await client.release(handle.lease_id)
                cycles += 1
            await asyncio.sleep(0.05)
    return cycles


def test_kill_9_under_load_then_restart(guest_image: GuestImage) -> None:
    root = Path(tempfile.mkdtemp(prefix="vmfd-", dir="/tmp"))
    config = write_config(root, min_size=2, max_size=3, store="leveldb")  # the default store
    d = start_daemon(root, config)
    try:
        asyncio.run(_crash_and_recover(root, config, d))
    finally:
        for pid in qemu_pids_under(root):
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["umount", "-l", *map(str, (root / "templates").glob("*"))],
                       capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


async def _crash_and_recover(root: Path, config: Path, d) -> None:  # type: ignore[no-untyped-def]
    socket = str(d.socket)
    image = ImageCache(Path("/var/lib/vmfactory/bundle-images") / str(os.getuid())).image_for(
        make_busybox_bundle(root / "bundle") / "rootfs")
    async with FactoryClient(socket) as client:
        await pool_ready(client)
        leased = [await client.get_vm(client="keeper") for _ in range(2)]
        await client.attach_disk(leased[0].lease_id, image, "kept1")
    stop = asyncio.Event()
    churn = asyncio.create_task(_churn(socket, stop))
    await asyncio.sleep(3)
    d.proc.kill()  # SIGKILL: no cleanup at all
    d.proc.wait()
    stop.set()
    assert await churn > 0
    assert all(psutil.pid_exists(h.pid) for h in leased), "QEMU must outlive the daemon"

    start = time.monotonic()
    d2 = start_daemon(root, config)  # the stale socket is removed on start
    try:
        async with FactoryClient(socket) as client:
            status = await pool_ready(client)
            restart_s = time.monotonic() - start
            assert status.recovered >= 2 and status.recovery_s < restart_s
            by_lease = {v.lease_id: v for v in status.vms if v.lease_id}
            for h in leased:
                assert by_lease[h.lease_id].pid == h.pid  # same VM, still leased
                agent = AgentClient(f"unix:{h.agent_socket}", call_timeout=10)
                try:
                    await agent.wait_ready(30)
                    assert (await agent.info(0)).platform == "guest"
                finally:
                    await agent.close()
            # Every QEMU under the daemon's directory is accounted for by a record.
            # Status lists pooled and leased VMs, not one a refill is making, so
            # compare at a moment with no refill in flight.
            status = await _settled(client)
            assert set(qemu_pids_under(root)) == {v.pid for v in status.vms}
            assert {p.name for p in (root / "run" / "vms").iterdir()} == {v.vm_id for v in status.vms}
            # The lessee's disk survived with its VM, and is still the lessee's to drop.
            await client.detach_disk(leased[0].lease_id, "kept1")
            await client.attach_disk(leased[0].lease_id, image, "kept1")
            for h in leased:
                await client.release(h.lease_id)
                assert not _alive(h.pid)
    finally:
        code = stop_daemon(d2)
        assert code == 0, d2.log()[-3000:]
    assert_clean(root)
