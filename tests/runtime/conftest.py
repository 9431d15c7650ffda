"""Fixtures for runtime_client tests against a real daemon with real QEMU VMs.

``runtime_daemon``: a daemon (pool "small": 1 vCPU, min 2, max 3) under a short
/tmp/vmfr-XXXX root, with a ``[runtime]`` table pointing the client's records at
``<root>/client``.  Its teardown removes what tests left (and fails on it), stops
the daemon and checks that nothing survives: QEMU, proxy and shim processes,
sandbox directories, templates, mounts.

``busybox_bundle``: an OCI bundle of the host's static busybox, built once.

``cli(config, *args, shim=..., proxy=...)``: ``python -m runtime_client`` as a
subprocess with a timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from vmfactory.server.client import FactoryClient
from runtime_client.bundles.busybox import make_busybox_bundle, static_busybox
from tests.conftest import qemu_pids_under
from tests.server.conftest import (POOL_READY_TIMEOUT_S, DaemonProc, start_daemon,
                                   stop_daemon, write_config)
from vmfactory.guest.image import GuestImage

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SHIM = "katashimbuiltin"
DEFAULT_PROXY = "noProxy"
CLIENT_MODULES = ("runtime_client.proxies", "runtime_client.shims", "runtime_client.keeper")


def write_runtime_config(root: Path, min_size: int = 2, max_size: int = 3) -> Path:
    """The server tests' daemon config, which the CLI reads too, with a stricter
    ``[runtime]``."""
    return write_config(root, min_size=min_size, max_size=max_size, runtime={
        # A test must never silently boot its own VM in the client.
        "fallback": "fail",
        # TCG refills are slow when tests take VMs back to back.
        "get_vm_timeout_s": 300.0})


@dataclass
class RuntimeDaemon:
    daemon: DaemonProc

    @property
    def root(self) -> Path:
        return self.daemon.root

    @property
    def config(self) -> Path:
        return self.daemon.config

    @property
    def socket(self) -> Path:
        return self.daemon.socket

    @property
    def sandboxes_dir(self) -> Path:
        return self.root / "run" / "sandboxes"

    def sandbox_dirs(self) -> list[str]:
        d = self.sandboxes_dir
        return sorted(p.name for p in d.iterdir()) if d.exists() else []

    def status(self) -> Any:
        return asyncio.run(_status(self.socket))

    def leases(self) -> list[str]:
        """Lease ids of the daemon's leased VMs."""
        return [vm.lease_id for vm in self.status().vms if vm.lease_id]

    def handouts(self) -> int:
        return sum(p.handouts for p in self.status().pools)

    def log(self) -> str:
        return self.daemon.log()


async def _status(socket: Path) -> Any:
    async with FactoryClient(str(socket), timeout=30.0) as client:
        return await client.status()


def cli(config: Path, *args: str, shim: str = DEFAULT_SHIM, proxy: str = DEFAULT_PROXY,
        input: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """``python -m runtime_client --config CONFIG --shim S --proxy P ARGS...``."""
    return subprocess.run(cli_argv(config, *args, shim=shim, proxy=proxy), input=input,
                          capture_output=True, timeout=timeout, cwd=REPO,
                          stdin=None if input is not None else subprocess.DEVNULL)


def cli_argv(config: Path, *args: str, shim: str = DEFAULT_SHIM,
             proxy: str = DEFAULT_PROXY) -> list[str]:
    return [sys.executable, "-m", "runtime_client", "--config", str(config), "--shim", shim,
            "--proxy", proxy, *args]


def list_json(config: Path) -> dict[str, Any]:
    out = cli(config, "list", "--json", timeout=60)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return json.loads(out.stdout)


def client_processes(root: Path, module: str | None = None) -> list[psutil.Process]:
    """Live proxy/shim processes whose command line mentions ``root``."""
    modules = (module,) if module else CLIENT_MODULES
    out = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmd = proc.info["cmdline"] or []
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if any(m in cmd for m in modules) and any(str(root) in arg for arg in cmd):
            out.append(proc)
    return out


def _cleanup_leftovers(rd: RuntimeDaemon) -> list[str]:
    """Remove sandboxes the tests left; describe what was left."""
    problems: list[str] = []
    try:
        records = list_json(rd.config)["sandboxes"]
    except Exception as exc:  # noqa: BLE001 - reported, the checks below still run
        problems.append(f"list --json failed: {exc}")
        records = []
    for record in records:
        problems.append(f"sandbox left: {record['id']} "
                        f"({[c['name'] for c in record['containers']]})")
        try:
            cli(rd.config, "sandbox", "rm", record["id"], timeout=120)
        except subprocess.TimeoutExpired:
            problems.append(f"sandbox rm {record['id']} timed out")
    return problems


def _wait_pool_ready(rd: RuntimeDaemon, timeout: float = POOL_READY_TIMEOUT_S) -> None:
    """Until the "small" pool has a VM ready (the template is built on the first fill)."""
    deadline = time.monotonic() + timeout
    while True:
        pools = {p.name: p for p in rd.status().pools}
        if pools["small"].ready >= 1:
            return
        if rd.daemon.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the pool did not fill:\n{rd.log()}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def runtime_daemon(guest_image: GuestImage) -> Iterator[RuntimeDaemon]:
    root = Path(tempfile.mkdtemp(prefix="vmfr-", dir="/tmp"))
    rd = RuntimeDaemon(start_daemon(root, write_runtime_config(root)))
    try:
        _wait_pool_ready(rd)
        yield rd
    finally:
        problems = _cleanup_leftovers(rd)
        code = stop_daemon(rd.daemon)
        log = rd.log()
        leaked = client_processes(root)
        qemu = qemu_pids_under(root)
        try:
            assert code == 0, log
            assert not problems, problems
            assert not leaked, f"proxy/shim processes left: {[p.cmdline() for p in leaked]}"
            assert not qemu, f"QEMU processes left behind: {qemu}"
            assert not rd.socket.exists()
            assert not rd.sandbox_dirs(), f"sandbox dirs left: {rd.sandbox_dirs()}"
            run = root / "run"
            others = [p.name for p in run.iterdir() if p.name != "sandboxes"] \
                if run.exists() else []
            assert not others, f"VM run dirs left: {others}"
            templates = root / "templates"
            assert not templates.exists() or not list(templates.iterdir())
            with open("/proc/mounts") as f:
                assert str(root) not in f.read()
        finally:
            for proc in leaked:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            for pid in qemu:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["umount", "-l", *[str(p) for p in (root / "templates").glob("*")]],
                           capture_output=True, check=False)
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def busybox_bundle() -> Iterator[Path]:
    static_busybox()  # busybox-static missing fails here, with the apt package to install
    base = Path(tempfile.mkdtemp(prefix="vmfr-bb-", dir="/tmp"))
    try:
        yield make_busybox_bundle(base / "bundle")
    finally:
        shutil.rmtree(base, ignore_errors=True)
