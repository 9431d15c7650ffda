"""The admin API of a real ``vmfactory init`` with real QEMU VMs, and its status
page rendered by a real headless Chromium (Debian's ``chromium``)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import (
    POOL_READY_TIMEOUT_S, DaemonProc, assert_clean, start_daemon, stop_daemon, write_config,
)
from vmfactory.guest.image import GuestImage
from vmfactory.server.client import FactoryClient

pytestmark = pytest.mark.qemu

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def daemon(guest_image: GuestImage) -> Iterator[DaemonProc]:
    root = Path(tempfile.mkdtemp(prefix="vmfa-", dir="/tmp"))
    config = write_config(root, min_size=2, max_size=3)
    port = free_port()
    text = config.read_text().replace('[admin]\n', '[admin]\n', 1)
    text = re.sub(r'(\[admin\]\n(?:.*\n)*?)tcp = ""', rf'\1tcp = "127.0.0.1:{port}"', text)
    config.write_text(text)
    d = start_daemon(root, config)
    d.admin_tcp = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        yield d
    finally:
        code = stop_daemon(d)
        try:
            assert code == 0, d.log()
            assert_clean(root)
            assert not (root / "admin.sock").exists()
        finally:
            subprocess.run(["umount", "-l", *map(str, (root / "templates").glob("*"))],
                           capture_output=True, check=False)
            shutil.rmtree(root, ignore_errors=True)


def admin(d: DaemonProc) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(d.root / "admin.sock")),
                        base_url="http://admin", timeout=60)


def wait_ready(d: DaemonProc) -> None:
    """Until /readyz says so (the admin API starts just after the gRPC socket)."""
    deadline = time.monotonic() + POOL_READY_TIMEOUT_S
    with admin(d) as http:
        while True:
            try:
                if http.get("/readyz").status_code == 200:
                    return
            except httpx.ConnectError:
                pass
            assert time.monotonic() < deadline, d.log()[-2000:]
            time.sleep(0.3)


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_the_admin_api_of_a_real_daemon(daemon: DaemonProc) -> None:
    wait_ready(daemon)
    with admin(daemon) as http:
        for path in ("/healthz", "/v1/pools", "/v1/pools/small", "/v1/vms", "/v1/leases",
                     "/v1/templates", "/v1/host", "/v1/latency", "/", "/docs", "/openapi.json"):
            assert http.get(path).status_code == 200, path
        before = http.get("/metrics").text

        async def cycle() -> None:
            async with FactoryClient(daemon.socket) as client:
                handle = await client.get_vm(timeout=60)
                leases = http.get("/v1/leases").json()
                assert [le["vm_id"] for le in leases] == [handle.vm_id]
                await client.release(handle.lease_id)
        asyncio.run(cycle())
        after = http.get("/metrics").text
        assert metric(after, "vmfactory_handouts_total", pool="small") == \
            metric(before, "vmfactory_handouts_total", pool="small") + 1
        assert metric(after, "vmfactory_getvm_duration_seconds_count", pool="small",
                      source="pool") == metric(before, "vmfactory_getvm_duration_seconds_count",
                                               pool="small", source="pool") + 1
        assert metric(after, "vmfactory_template_clones", template="default") >= 2
        assert metric(after, "vmfactory_vm_pss_bytes") > 0
        templates = http.get("/v1/templates").json()
        assert templates[0]["name"] == "default" and templates[0]["template"]["state"] == "ready"


def test_rotating_the_template_swaps_its_generation(daemon: DaemonProc) -> None:
    wait_ready(daemon)
    with admin(daemon) as http:
        first = http.get("/v1/templates").json()[0]["template"]["name"]
        response = http.post("/v1/templates/default/rotate", timeout=180)
        assert response.status_code == 200, response.text
        assert response.json()[0]["template"]["name"] != first
        assert response.json()[0]["rotations"] == 1


def test_the_status_page_renders_in_chromium(daemon: DaemonProc, tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (./dev setup installs it)")
    wait_ready(daemon)
    url = f"http://{daemon.admin_tcp}/"  # type: ignore[attr-defined]
    profile = tmp_path / "profile"
    dom = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                          "--virtual-time-budget=15000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert 'data-rendered="' in dom.stdout, dom.stderr[-2000:]
    with admin(daemon) as http:
        pools = http.get("/v1/pools").json()
    for pool in pools:
        row = re.search(rf'<tr data-pool="{pool["name"]}">(.*?)</tr>', dom.stdout, re.S)
        assert row, (pool["name"], dom.stdout[:3000])
        cells = dict(re.findall(r'<td class="(\w+)">([^<]*)</td>', row.group(1)))
        for key in ("ready", "target", "min_size", "max_size"):
            assert cells[key] == str(pool[key]), (key, cells, pool)
    shot = tmp_path / "status-page.png"
    subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                    "--virtual-time-budget=15000", "--window-size=1280,1000",
                    f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000
    (tmp_path / "status-page.json").write_text(json.dumps(pools, indent=2))


def pool_status(d: DaemonProc, name: str = "small") -> Any:
    """The pool as gRPC ``Status`` reports it (not the admin API)."""
    async def status() -> Any:
        async with FactoryClient(d.socket) as client:
            return await client.status()
    return next(p for p in asyncio.run(status()).pools if p.name == name)


def wait_pool(d: DaemonProc, ready: int, min_size: int) -> Any:
    deadline = time.monotonic() + POOL_READY_TIMEOUT_S
    while True:
        pool = pool_status(d)
        if pool.min_size == min_size and pool.ready == ready and pool.refilling == 0:
            return pool
        assert time.monotonic() < deadline, (pool, d.log()[-2000:])
        time.sleep(0.3)


# Each is refused with a 4xx and a JSON message, and changes nothing.
BAD_PATCHES = [
    ("small", {"min_size": 5}, 400),            # above max_size (3)
    ("small", {"min_size": -1}, 422),
    ("small", {"max_size": 0}, 422),
    ("small", {"min_size": "3"}, 422),          # a string is not a size
    ("small", {"keep_running": "yes"}, 422),
    ("small", {"sizing": "magic"}, 422),
    ("small", {"min_size": 2, "colour": "red"}, 422),  # unknown field
    ("nosuchpool", {"min_size": 1}, 404),
]
KNOBS = ("min_size", "max_size", "keep_running", "sizing", "target")


def test_patch_and_drain_reach_the_refill_and_grpc_and_bad_ones_change_nothing(
        daemon: DaemonProc) -> None:
    wait_ready(daemon)
    with admin(daemon) as http:
        before = {k: http.get("/v1/pools/small").json()[k] for k in KNOBS}
        for name, body, status in BAD_PATCHES:
            response = http.patch(f"/v1/pools/{name}", json=body)
            assert response.status_code == status, (body, response.text)
            assert isinstance(response.json()["message"], str), response.text
        assert http.patch("/v1/pools/small", content=b"{not json",
                          headers={"content-type": "application/json"}).status_code == 422
        assert {k: http.get("/v1/pools/small").json()[k] for k in KNOBS} == before
        try:
            response = http.patch("/v1/pools/small", json={"min_size": 3})
            assert response.status_code == 200, response.text
            assert response.json()["min_size"] == 3 and response.json()["target"] == 3
            assert wait_pool(daemon, ready=3, min_size=3).target == 3  # refilled to it
            drained = http.post("/v1/pools/small/drain", timeout=120)
            assert drained.status_code == 200 and drained.json() == {"stopped": 3}
            wait_pool(daemon, ready=3, min_size=3)  # and refilled again
        finally:
            assert http.patch("/v1/pools/small", json={"min_size": 2}).status_code == 200
        assert pool_status(daemon).min_size == 2


def test_the_admin_socket_of_a_real_daemon_is_refused_to_other_uids(
        daemon: DaemonProc) -> None:
    wait_ready(daemon)
    sock = daemon.root / "admin.sock"
    assert sock.stat().st_mode & 0o777 == 0o600 and sock.stat().st_uid == 0
    probe = ("import socket, sys\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n"
             "    print(type(e).__name__); sys.exit(3)\n"
             "s.sendall(b'GET /v1/pools HTTP/1.0\\r\\n\\r\\n'); print(s.recv(100))\n")
    mode = daemon.root.stat().st_mode & 0o777
    os.chmod(daemon.root, 0o711)  # the socket's own mode is what must refuse
    try:
        out = subprocess.run(["/usr/bin/python3", "-c", probe, str(sock)], user=4242,
                             group=4242, extra_groups=[], capture_output=True, text=True,
                             timeout=30, cwd="/")
    finally:
        os.chmod(daemon.root, mode)
    assert out.returncode == 3, (out.stdout, out.stderr)
    assert out.stdout.strip() == "PermissionError"
