"""The admin API of a real ``vmfactory init`` with real QEMU VMs, and its status
page rendered by a real headless Chromium (Debian's ``chromium``)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

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
