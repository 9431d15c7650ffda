"""The admin HTTP API on a daemon over the host-process stand-in: every endpoint,
metrics that move, PATCH seen by the refill and by gRPC Status, bad requests
refused without effect, and who may connect and change things."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon.conftest import POOL, standin_config, standin_hypervisor, standins, until
from vmfactory.app import running_daemon
from vmfactory.config import Config
from vmfactory.daemon.core import Daemon
from vmfactory.server.client import FactoryClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def admin_config(root: Path, token: str = "") -> Config:
    config = standin_config(root, [{**POOL, "min_size": 2, "max_size": 4}])
    token_file = root / "admin-token"
    if token:
        token_file.write_text(token)
        os.chmod(token_file, 0o600)
    return dataclasses.replace(config, admin=dataclasses.replace(
        config.admin, socket=root / "admin.sock", tcp=f"127.0.0.1:{free_port()}",
        tcp_token_file=str(token_file) if token else ""))


@contextlib.asynccontextmanager
async def serving(config: Config) -> AsyncIterator[tuple[Daemon, httpx.AsyncClient]]:
    async with running_daemon(config, hypervisor=standin_hypervisor(config)) as daemon:
        transport = httpx.AsyncHTTPTransport(uds=str(config.admin.socket))
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as http:
            yield daemon, http


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, parsed by prometheus_client's own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_every_endpoint_answers(root: Path) -> None:
    config = admin_config(root)
    async with serving(config) as (daemon, http):
        assert (await http.get("/readyz")).status_code in (200, 503)
        await until(lambda: len(daemon.pools["p"].ready) == 2)
        for path in ("/healthz", "/readyz", "/v1/pools", "/v1/pools/p", "/v1/vms",
                     "/v1/leases", "/v1/templates", "/v1/host", "/v1/latency", "/metrics",
                     "/openapi.json", "/docs", "/"):
            response = await http.get(path)
            assert response.status_code == 200, (path, response.text)
        pool = (await http.get("/v1/pools/p")).json()
        assert pool["ready"] == 2 and pool["sizing_report"]["policy"] == "fixed"
        assert {"rate_per_s", "refill_s", "target"} <= set(pool["sizing_report"])
        assert (await http.get("/docs-assets/swagger-ui-bundle.js")).status_code == 200
        openapi = (await http.get("/openapi.json")).json()
        paths, schemas = openapi["paths"], openapi["components"]["schemas"]
        assert {"/v1/pools/{name}", "/v1/pools/{name}/drain", "/metrics"} <= set(paths)
        assert {"PoolView", "PoolPatch", "LeaseView", "VmView", "ErrorBody"} <= set(schemas)
        answers = paths["/v1/pools/{name}"]["get"]["responses"]
        assert answers["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/PoolView") and "404" in answers
        drained = (await http.post("/v1/pools/p/drain")).json()
        assert drained == {"stopped": 2}
        await until(lambda: len(daemon.pools["p"].ready) == 2, what="refill after drain")
    assert not standins(root) and not config.admin.socket.exists()


async def test_metrics_move_with_handouts_and_releases(root: Path) -> None:
    config = admin_config(root)
    async with serving(config) as (daemon, http):
        await until(lambda: len(daemon.pools["p"].ready) == 2)
        before = samples((await http.get("/metrics")).text)
        async with FactoryClient(config.daemon.socket) as client:
            handles = [await client.get_vm(timeout=30) for _ in range(2)]
            leased = samples((await http.get("/metrics")).text)
            for handle in handles:
                await client.release(handle.lease_id)
        after = samples((await http.get("/metrics")).text)
        pool = (("pool", "p"),)
        assert leased[("vmfactory_handouts_total", pool)] == \
            before[("vmfactory_handouts_total", pool)] + 2
        count = ("vmfactory_getvm_duration_seconds_count", (("pool", "p"), ("source", "pool")))
        assert leased[count] == before.get(count, 0) + 2
        assert leased[("vmfactory_leases", (("owner_uid", "0"),))] == 2
        assert ("vmfactory_leases", (("owner_uid", "0"),)) not in after
        assert after[("vmfactory_refill_duration_seconds_count", pool)] >= 2
        assert after[("vmfactory_host_memory_available_bytes", ())] > 0


async def test_patch_is_seen_by_the_refill_and_by_grpc_status(root: Path) -> None:
    config = admin_config(root)
    async with serving(config) as (daemon, http):
        await until(lambda: len(daemon.pools["p"].ready) == 2)
        response = await http.patch("/v1/pools/p", json={"min_size": 3, "sizing": "adaptive"})
        assert response.status_code == 200, response.text
        assert response.json()["min_size"] == 3 and response.json()["sizing"] == "adaptive"
        await until(lambda: len(daemon.pools["p"].ready) == 3, what="the refill to 3")
        async with FactoryClient(config.daemon.socket) as client:
            status = await client.status()
        assert status.pools[0].min_size == 3 and status.pools[0].ready == 3
        response = await http.patch("/v1/pools/p", json={"min_size": 1, "max_size": 1})
        assert response.status_code == 200
        await until(lambda: len(daemon.pools["p"].ready) == 1, what="shrunk to max_size 1")


@pytest.mark.parametrize("path, body, status", [
    ("/v1/pools/nope", {"min_size": 1}, 404),
    ("/v1/pools/p", {"min_size": 9}, 400),            # above max_size
    ("/v1/pools/p", {"min_size": 3, "max_size": 2}, 400),
    ("/v1/pools/p", {"min_size": -1}, 422),
    ("/v1/pools/p", {"max_size": "4"}, 422),          # wrong type
    ("/v1/pools/p", {"keep_running": 1}, 422),
    ("/v1/pools/p", {"sizing": "magic"}, 422),
    ("/v1/pools/p", {"cpus": 2}, 422),                # not something PATCH may change
    ("/v1/pools/p", "not json", 422),
])
async def test_bad_patches_are_4xx_json_and_change_nothing(root: Path, path: str, body: object,
                                                           status: int) -> None:
    config = admin_config(root)
    async with serving(config) as (daemon, http):
        before = dataclasses.asdict(daemon.pools["p"].config)
        kwargs = {"content": body} if isinstance(body, str) else {"json": body}
        response = await http.patch(path, **kwargs)
        assert response.status_code == status, response.text
        assert set(response.json()) == {"error", "message"}
        assert dataclasses.asdict(daemon.pools["p"].config) == before
        assert (await http.get("/v1/templates/none")).status_code == 404
        assert (await http.post("/v1/templates/none/rotate")).status_code == 404


async def test_tcp_reads_for_anyone_changes_only_with_the_token(root: Path) -> None:
    token = secrets.token_hex(20)
    config = admin_config(root, token)
    async with serving(config) as (daemon, _):
        base = f"http://{config.admin.tcp}"
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/v1/pools")).status_code == 200
            refused = await http.patch("/v1/pools/p", json={"min_size": 1})
            assert refused.status_code == 403 and daemon.pools["p"].config.min_size == 2
            allowed = await http.patch("/v1/pools/p", json={"min_size": 1},
                                       headers={"authorization": f"Bearer {token}"})
            assert allowed.status_code == 200 and daemon.pools["p"].config.min_size == 1


async def test_the_admin_socket_is_refused_to_other_uids(root: Path) -> None:
    config = admin_config(root)
    async with serving(config) as (_, http):
        assert (await http.get("/healthz")).status_code == 200
        assert (config.admin.socket.stat().st_mode & 0o777) == 0o600
        os.chmod(root, 0o711)
        probe = await asyncio.to_thread(
            subprocess.run, ["/usr/bin/python3", "-c", "import socket, sys; "
                             "socket.socket(socket.AF_UNIX).connect(sys.argv[1])",
                             str(config.admin.socket)],
            user=4242, group=4242, capture_output=True, text=True, timeout=30)
        assert probe.returncode != 0 and "Permission denied" in probe.stderr


async def test_readyz_says_why_until_the_pools_are_full(root: Path) -> None:
    config = admin_config(root)
    async with serving(config) as (daemon, http):
        start = time.monotonic()
        while len(daemon.pools["p"].ready) < 2:
            response = await http.get("/readyz")
            if len(daemon.pools["p"].ready) < 2 and response.status_code == 503:
                assert "pool p" in response.json()["reasons"][0]
                break
            assert time.monotonic() - start < 20
            await asyncio.sleep(0.01)
        await until(lambda: len(daemon.pools["p"].ready) == 2)
        assert (await http.get("/readyz")).json() == {"ready": True, "reasons": []}


async def test_big_or_endless_bodies_are_413_before_anything_reads_them(root: Path) -> None:
    config = admin_config(root)
    async with serving(config) as (daemon, http):
        big = b'{"min_size": 1, "pad": "' + b"x" * 200_000 + b'"}'
        declared = await http.patch("/v1/pools/p", content=big,
                                    headers={"content-type": "application/json"})
        assert declared.status_code == 413, declared.text
        assert declared.json()["error"] == "PayloadTooLarge"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
            yield b'{"min_size": 1, "pad": "'
            for _ in range(100):
                yield b"x" * 4096
        streamed = await http.patch("/v1/pools/p", content=chunks(),
                                    headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        assert daemon.pools["p"].config.min_size == 2
        # A body within the bound still works, through the same listener.
        small = await http.patch("/v1/pools/p", json={"min_size": 1})
        assert small.status_code == 200 and daemon.pools["p"].config.min_size == 1
