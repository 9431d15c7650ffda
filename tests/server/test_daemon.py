"""The daemon as a real process: pools, leases, bad input, clean shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil
import pytest

from vmfactory.errors import DeadlineExceeded, InvalidRequest, LeaseNotFound, PoolEmpty
from vmfactory.server.client import FactoryClient
from tests.server.conftest import (
    POOL_READY_TIMEOUT_S, DaemonProc, assert_clean, start_daemon, stop_daemon, write_config,
)
from vmfactory.guest.image import GuestImage
from vmfactory.proto import factory_pb2 as pb

pytestmark = pytest.mark.qemu


async def pool_ready(client: FactoryClient, size: int = 2,
                     timeout: float = POOL_READY_TIMEOUT_S) -> pb.StatusReply:
    deadline = time.monotonic() + timeout
    while True:
        status = await client.status()
        if status.pools[0].ready >= size and status.pools[0].refilling == 0:
            return status
        assert time.monotonic() < deadline, f"pool not ready: {status}"
        await asyncio.sleep(0.2)


async def test_get_and_release(daemon: DaemonProc) -> None:
    async with FactoryClient(str(daemon.socket)) as client:
        await pool_ready(client)
        handle = await client.get_vm(client="test")
        assert handle.source == "pool" and handle.lease_id
        assert Path(handle.agent_socket).exists() and psutil.pid_exists(handle.pid)
        status = await client.status()
        leased = [v for v in status.vms if v.lease_id == handle.lease_id]
        assert len(leased) == 1 and leased[0].state == "running"
        await client.release(handle.lease_id)
        assert not psutil.pid_exists(handle.pid)
        assert not Path(handle.agent_socket).exists()
        status = await pool_ready(client)
        assert status.pools[0].handouts >= 1
        with pytest.raises(LeaseNotFound):
            await client.release(handle.lease_id)


async def test_killed_pooled_vm_is_replaced_not_handed_out(daemon: DaemonProc) -> None:
    async with FactoryClient(str(daemon.socket)) as client:
        status = await pool_ready(client)
        victim = status.vms[0]
        assert victim.state == "paused"
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            status = await client.status()
            if status.pools[0].replaced >= 1 and victim.vm_id not in {v.vm_id for v in status.vms}:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        handles = [await client.get_vm() for _ in range(2)]
        try:
            assert victim.vm_id not in {h.vm_id for h in handles}
            assert all(psutil.pid_exists(h.pid) for h in handles)
        finally:
            for h in handles:
                await client.release(h.lease_id)
        await pool_ready(client)


async def test_empty_pool_honours_the_deadline(daemon: DaemonProc) -> None:
    async with FactoryClient(str(daemon.socket)) as client:
        start = time.monotonic()
        # The same class whether the daemon's answer or the call's own deadline came first.
        with pytest.raises(PoolEmpty, match="DEADLINE_EXCEEDED|no ready VM before the deadline"):
            await client.get_vm(cpus=2, timeout=0.5)
        assert 0.4 < time.monotonic() - start < 2.0
        empty = {p.name: p for p in (await client.status()).pools}["empty"]
        assert empty.misses >= 1 and empty.ready == 0 and empty.handouts == 0


async def test_lease_ttl_reclaims_the_vm(daemon: DaemonProc) -> None:
    async with FactoryClient(str(daemon.socket)) as client:
        await pool_ready(client)
        handle = await client.get_vm(lease_ttl_s=0.5)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(handle.pid):
            assert time.monotonic() < deadline, "lease was not reclaimed"
            await asyncio.sleep(0.1)
        with pytest.raises(LeaseNotFound):
            await client.release(handle.lease_id)


@pytest.mark.parametrize("kwargs, match", [
    ({"cpus": 64}, "cpus 64 exceeds"),
    ({"memory_mib": 1 << 30}, "memory_mib .* exceeds"),
    ({"memory_mib": 16}, "memory_mib: 16 is out of range"),
    ({"image": "ubuntu"}, "unknown image"),
    ({"base": "magic"}, "unknown base"),
    ({"lease_ttl_s": -1.0}, "must be between 0 and"),
])
async def test_bad_requests_are_invalid_argument(daemon: DaemonProc, kwargs: dict,
                                                 match: str) -> None:
    async with FactoryClient(str(daemon.socket)) as client:
        with pytest.raises(InvalidRequest, match=match):
            await client.get_vm(**kwargs)
        assert (await client.status()).pid == daemon.proc.pid  # still serving


async def test_malformed_and_unknown_fields_are_invalid_argument(daemon: DaemonProc) -> None:
    async with grpc.aio.insecure_channel(f"unix:{daemon.socket}") as channel:
        raw = channel.unary_unary("/vmfactory.factory.v1.Factory/GetVM",
                                  request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)
        for payload, match in ((b"\xff\xff\xff\xff", "malformed"),
                               (b"\x0a\x05\x08\x01\x98\x06\x01", "unknown fields \\[99\\]")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await raw(payload, timeout=5)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert pytest.importorskip("re").search(match, err.value.details())


async def test_expired_deadline_and_unknown_lease(daemon: DaemonProc) -> None:
    async with FactoryClient(str(daemon.socket)) as client:
        # A deadline that has passed on arrival, or in flight (grpc's own): either way
        # DEADLINE_EXCEEDED, at once.
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await client.get_vm(timeout=0.0001)
        assert time.monotonic() - start < 1.0
        with pytest.raises(LeaseNotFound, match="no lease 'deadbeef'"):
            await client.release("deadbeef")
        assert (await client.status()).pools[0].name == "small"


async def test_watch_streams_pool_events(daemon: DaemonProc) -> None:
    async with FactoryClient(str(daemon.socket)) as client:
        await pool_ready(client)
        seen: list[str] = []

        async def watch() -> None:
            async for event in client.watch():
                seen.append(event.kind)
                if "ready" in seen and "handout" in seen:
                    return

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.2)
        handle = await client.get_vm()
        await client.release(handle.lease_id)
        await asyncio.wait_for(watcher, 60)
        assert "handout" in seen and "ready" in seen


async def test_config_and_health(daemon: DaemonProc) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with FactoryClient(str(daemon.socket)) as client:
        toml = await client.config()
        assert '[[pools]]\nname = "small"' in toml
    async with grpc.aio.insecure_channel(f"unix:{daemon.socket}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="vmfactory.factory.v1.Factory"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_socket_mode_and_second_daemon_refused(daemon: DaemonProc) -> None:
    assert (daemon.socket.stat().st_mode & 0o777) == 0o600
    proc = subprocess.run([sys.executable, "-m", "vmfactory.cli", "--config", str(daemon.config),
                           "init"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == \
        f"vmfactory: error: another daemon is serving on {daemon.socket}"


@pytest.mark.parametrize("how", ["quit", "sigterm"])
def test_stop_leaves_nothing(guest_image: GuestImage, how: str) -> None:
    root = Path(tempfile.mkdtemp(prefix="vmfd-", dir="/tmp"))
    (root / "factory.sock").touch()  # a stale socket is removed, not an obstacle
    d = start_daemon(root, write_config(root, min_size=1, max_size=1))

    async def use() -> None:
        async with FactoryClient(str(d.socket)) as client:
            await pool_ready(client, size=1)
            await client.get_vm(lease_ttl_s=0)  # a leased VM must be stopped too
            if how == "quit":
                await client.quit()

    try:
        asyncio.run(use())
        code = d.proc.wait(timeout=60) if how == "quit" else stop_daemon(d)
        assert code == 0, d.log()
        assert_clean(root)
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
        import shutil
        shutil.rmtree(root, ignore_errors=True)
