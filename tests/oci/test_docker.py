"""docker (dockerd 20.10, its own containerd and runc shim) drives ``vmfactory-oci``
added with ``--add-runtime``, against a real daemon with a warm pool: exit codes,
output, a read-only volume, -i; nothing left in docker, no lease, no resident."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from benchmarks.lib.podman import wrapper_script
from tests.runtime.conftest import RuntimeDaemon

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("dockerd") is None,
                                 reason="docker.io is not installed (./dev setup installs it)")]

IMAGE = "vmf-busybox:test"
START_S = 60
RUN_TIMEOUT_S = 300


@dataclass
class Docker:
    work: Path
    env: dict[str, str]

    def __call__(self, *args: str, input: bytes | None = None,
                 timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["docker", *args], env=self.env, input=input,
                              capture_output=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)


def _start_dockerd(work: Path, wrapper: Path) -> subprocess.Popen[bytes]:
    log = open(work / "dockerd.log", "wb")
    # No bridge and no iptables: these hosts have no network to give, and the
    # containers run with --network none.
    return subprocess.Popen(
        ["dockerd", "--data-root", str(work / "data"), "--exec-root", str(work / "exec"),
         "-H", f"unix://{work}/docker.sock", "--pidfile", str(work / "docker.pid"),
         "--iptables=false", "--ip-masq=false", "--bridge=none", "--storage-driver=vfs",
         "--add-runtime", f"vmfactory={wrapper}", "--default-runtime", "vmfactory",
         "--default-ulimit", "nofile=20000:20000"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def docker(runtime_daemon: RuntimeDaemon, busybox_bundle: Path) -> Iterator[Docker]:
    work = Path(tempfile.mkdtemp(prefix="vmfd-", dir="/tmp"))
    wrapper = work / "vmfactory-oci"
    wrapper.write_text(wrapper_script(runtime_daemon.config))
    wrapper.chmod(0o755)
    proc = _start_dockerd(work, wrapper)
    d = Docker(work, {**os.environ, "DOCKER_HOST": f"unix://{work}/docker.sock"})
    try:
        deadline = time.monotonic() + START_S
        while d("info", timeout=30).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, \
                (work / "dockerd.log").read_text(errors="replace")[-2000:]
            time.sleep(0.3)
        tar = subprocess.run(["tar", "-C", str(busybox_bundle / "rootfs"), "-c", "."],
                             capture_output=True, check=True).stdout
        assert d("import", "-", IMAGE, input=tar, timeout=120).returncode == 0
        yield d
    finally:
        left = d("ps", "-aq").stdout.split()
        for cid in left:
            d("rm", "-f", cid.decode())
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        subprocess.run(["umount", "-R", "-l", str(work)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        assert not left, f"containers left in docker: {left}"


@pytest.fixture
def dk(docker: Docker, runtime_daemon: RuntimeDaemon) -> Iterator[Docker]:
    yield docker
    left = docker("ps", "-aq").stdout.split()
    deadline = time.monotonic() + 40
    while runtime_daemon.leases() and time.monotonic() < deadline:
        time.sleep(0.2)
    residents = [p.pid for p in psutil.process_iter(["cmdline"])
                 if "runtime_client.oci.resident" in (p.info["cmdline"] or [])]
    assert not left and not residents and runtime_daemon.leases() == []


def test_docker_run_exit_code_and_output(dk: Docker) -> None:
    out = dk("run", "--rm", "--network", "none", IMAGE, "sh", "-c", "echo hi from docker; exit 3")
    assert (out.returncode, out.stdout) == (3, b"hi from docker\n"), out.stderr


def test_docker_run_with_a_volume_and_stdin(dk: Docker, tmp_path: Path) -> None:
    (tmp_path / "marker").write_text("from the host\n")
    out = dk("run", "--rm", "-i", "--network", "none", "-v", f"{tmp_path}:/data:ro", IMAGE,
             "sh", "-c", "cat /data/marker; cat", input=b"through stdin\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"from the host\nthrough stdin\n"
