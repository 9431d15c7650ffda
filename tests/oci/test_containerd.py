"""containerd's runc shim drives ``vmfactory-oci`` (``ctr run --runc-binary``),
against a real daemon with a warm pool of real QEMU VMs: a private containerd
(its own root, state and socket), a busybox root from busybox-static, and
nothing left afterwards (no task or container in containerd, no lease)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.oci.conftest import REPO
from tests.runtime.conftest import RuntimeDaemon

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("containerd") is None,
                                 reason="containerd is not installed (./dev setup installs it)")]

RUN_TIMEOUT = 300
CONFIG = """version = 2
disabled_plugins = ["io.containerd.grpc.v1.cri"]
"""


@dataclass
class Ctr:
    rd: RuntimeDaemon
    work: Path
    wrapper: Path

    def __call__(self, *args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["ctr", "--address", str(self.work / "containerd.sock"), *args],
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def ctr(runtime_daemon: RuntimeDaemon) -> Iterator[Ctr]:
    work = Path(tempfile.mkdtemp(prefix="vmfc-", dir="/tmp"))
    (work / "config.toml").write_text(CONFIG)
    wrapper = work / "vmfactory-oci"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m "
                       f"runtime_client.oci.cli --config {runtime_daemon.config} \"$@\"\n")
    wrapper.chmod(0o755)
    daemon = subprocess.Popen(
        ["containerd", "--config", str(work / "config.toml"), "--root", str(work / "root"),
         "--state", str(work / "state"), "--address", str(work / "containerd.sock")],
        stdout=subprocess.DEVNULL, stderr=open(work / "containerd.log", "wb"))
    c = Ctr(runtime_daemon, work, wrapper)
    deadline = time.monotonic() + 60
    while c("version", timeout=30).returncode != 0:
        assert daemon.poll() is None and time.monotonic() < deadline, \
            (work / "containerd.log").read_text()[-2000:]
        time.sleep(0.2)
    try:
        yield c
    finally:
        containers = c("containers", "ls", "-q").stdout.split()
        for cid in containers:
            c("tasks", "kill", "-s", "KILL", cid.decode())
            c("tasks", "delete", "-f", cid.decode())
            c("containers", "delete", cid.decode())
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        subprocess.run(["umount", "-R", str(work / "state")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        assert not containers, f"containers left in containerd: {containers}"


def test_ctr_run_rm(ctr: Ctr, busybox_bundle: Path) -> None:
    rootfs = str(busybox_bundle / "rootfs")
    out = ctr("run", "--rm", "--rootfs", "--runc-binary", str(ctr.wrapper), rootfs, "vmf-ctr",
              "sh", "-c", "echo from containerd; exit 6")
    assert out.returncode == 6, out.stderr
    assert out.stdout == b"from containerd\n"
    assert ctr("containers", "ls", "-q").stdout == b""
    deadline = time.monotonic() + 40
    while ctr.rd.leases():
        assert time.monotonic() < deadline, ctr.rd.leases()
        time.sleep(0.2)
