"""podman drives ``vmfactory-oci`` (through conmon), against a real daemon with a
warm pool of real QEMU VMs: the containers.conf of the README, a busybox image
the test makes from busybox-static and imports, and nothing left afterwards
(no container in podman, no lease, no resident)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import termios
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.oci.conftest import REPO
from tests.runtime.conftest import RuntimeDaemon

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("podman") is None,
                                 reason="podman is not installed (./dev setup installs it)")]

IMAGE = "localhost/vmf-busybox:test"
RUN_TIMEOUT = 300


def containers_conf(wrapper: Path) -> str:
    """What the README tells a user to write (plus this machine's two settings)."""
    return f"""[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
netns = "none"

[engine]
runtime = "vmfactory"
runtime_supports_json = ["crun", "runc", "kata", "vmfactory"]

[engine.runtimes]
vmfactory = ["{wrapper}"]
"""


@dataclass
class Podman:
    rd: RuntimeDaemon
    work: Path
    env: dict[str, str]

    def __call__(self, *args: str, input: bytes | None = None,
                 timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
        argv = ["podman", "--root", str(self.work / "storage"), "--runroot",
                str(self.work / "run"), "--storage-driver", "vfs", "--cgroup-manager",
                "cgroupfs", "--events-backend", "none", *args]
        return subprocess.run(argv, env=self.env, input=input, capture_output=True,
                              timeout=timeout, stdin=None if input is not None
                              else subprocess.DEVNULL)


@pytest.fixture(scope="module")
def podman(runtime_daemon: RuntimeDaemon, busybox_bundle: Path) -> Iterator[Podman]:
    work = Path(tempfile.mkdtemp(prefix="vmfp-", dir="/tmp"))
    wrapper = work / "vmfactory-oci"
    # The installed command is .venv/bin/vmfactory-oci; this checkout's, for the test.
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m "
                       f"runtime_client.oci.cli --config {runtime_daemon.config} "
                       f"\"$@\"\n")
    wrapper.chmod(0o755)
    (work / "containers.conf").write_text(containers_conf(wrapper))
    env = {**os.environ, "CONTAINERS_CONF": str(work / "containers.conf")}
    p = Podman(runtime_daemon, work, env)
    tar = subprocess.run(["tar", "-C", str(busybox_bundle / "rootfs"), "-c", "."],
                         capture_output=True, check=True).stdout
    imported = p("import", "-", IMAGE, input=tar, timeout=120)
    assert imported.returncode == 0, imported.stderr
    try:
        yield p
    finally:
        leftovers = p("ps", "-aq").stdout.split()
        for cid in leftovers:
            p("rm", "-f", cid.decode())
        p("rmi", "-af")
        subprocess.run(["umount", "-R", str(work / "storage")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        assert not leftovers, f"containers left in podman: {leftovers}"


@pytest.fixture
def pm(podman: Podman) -> Iterator[Podman]:
    yield podman
    left = podman("ps", "-aq").stdout.split()
    residents = [p.pid for p in psutil.process_iter(["cmdline"])
                 if "runtime_client.oci.resident" in (p.info["cmdline"] or [])]
    deadline = time.monotonic() + 40
    while podman.rd.leases() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"podman containers left: {left}"
    assert not residents, f"residents left: {residents}"
    assert podman.rd.leases() == []


def test_run_rm_echo(pm: Podman) -> None:
    out = pm("run", "--rm", IMAGE, "echo", "hello from a VM")
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"hello from a VM\n"


def test_exit_codes(pm: Podman) -> None:
    assert pm("run", "--rm", IMAGE, "sh", "-c", "exit 7").returncode == 7
    assert pm("run", "--rm", IMAGE, "sh", "-c", "kill -9 $$").returncode == 137


def test_one_mib_through_cat(pm: Podman) -> None:
    data = os.urandom(1 << 20)
    out = pm("run", "--rm", "-i", IMAGE, "cat", input=data)
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256(out.stdout).hexdigest() == hashlib.sha256(data).hexdigest()


def test_detached_exec_stop_rm(pm: Podman) -> None:
    out = pm("run", "-d", "--name", "vmf-d", IMAGE, "sleep", "600")
    assert out.returncode == 0, out.stderr
    try:
        ex = pm("exec", "vmf-d", "sh", "-c", "echo in; exit 4")
        assert (ex.returncode, ex.stdout) == (4, b"in\n"), ex.stderr
        assert pm("pause", "vmf-d").returncode == 0
        assert b"paused" in pm("inspect", "-f", "{{.State.Status}}", "vmf-d").stdout
        assert pm("unpause", "vmf-d").returncode == 0
        assert pm("stop", "-t", "2", "vmf-d").returncode == 0
        assert b"exited" in pm("inspect", "-f", "{{.State.Status}}", "vmf-d").stdout
    finally:
        assert pm("rm", "-f", "vmf-d").returncode == 0


def _run_on_pty(pm: Podman, args: list[str], rows: int, cols: int,
                resize_to: tuple[int, int] | None = None) -> tuple[int, bytes]:
    """Run podman with a pty as its terminal (as a person at a shell would); after
    the first output, optionally resize the terminal. Returns (exit code, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    argv = ["podman", "--root", str(pm.work / "storage"), "--runroot", str(pm.work / "run"),
            "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
            "--events-backend", "none", *args]
    proc = subprocess.Popen(argv, env=pm.env, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    out = b""
    deadline = time.monotonic() + RUN_TIMEOUT
    resized = resize_to is None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every slave closed
                break
            if not chunk:
                break
            out += chunk
        if not resized and b"ready" in out:
            r, c = resize_to  # type: ignore[misc]
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", r, c, 0, 0))
            resized = True
        if proc.poll() is not None and not ready:
            break
    os.close(master)
    return proc.wait(timeout=RUN_TIMEOUT), out


def test_tty_size_and_resize(pm: Podman) -> None:
    # The initial size reaches the guest's pty, then a resize does: the script
    # prints "ready", waits for SIGWINCH's effect by polling stty, and reports.
    script = ("stty size; echo ready; i=0; while [ $i -lt 100 ]; do "
              "s=$(stty size); [ \"$s\" = '40 120' ] && break; sleep 0.1; i=$((i+1)); done; "
              "echo now $(stty size)")
    rc, out = _run_on_pty(pm, ["run", "--rm", "-t", IMAGE, "sh", "-c", script],
                          rows=33, cols=101, resize_to=(40, 120))
    text = out.decode(errors="replace").replace("\r", "")
    assert rc == 0, text
    assert "33 101\n" in text, text
    assert "now 40 120" in text, text


def test_detached_kill(pm: Podman) -> None:
    out = pm("run", "-d", "--name", "vmf-k", IMAGE, "sleep", "600")
    assert out.returncode == 0, out.stderr
    try:
        assert pm("kill", "-s", "KILL", "vmf-k").returncode == 0
        waited = pm("wait", "vmf-k")
        assert waited.stdout.strip() == b"137", waited.stderr
        assert b"exited" in pm("inspect", "-f", "{{.State.Status}}", "vmf-k").stdout
    finally:
        assert pm("rm", "-f", "vmf-k").returncode == 0
