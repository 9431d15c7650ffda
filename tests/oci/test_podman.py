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
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from benchmarks.lib.podman import IMAGE, RUN_TIMEOUT_S, Podman
from tests.runtime.conftest import RuntimeDaemon

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("podman") is None,
                                 reason="podman is not installed (./dev setup installs it)")]


@pytest.fixture(scope="module")
def podman(runtime_daemon: RuntimeDaemon, busybox_bundle: Path) -> Iterator[Podman]:
    p = Podman(runtime_daemon.config)
    try:
        p.import_rootfs(busybox_bundle / "rootfs")
        yield p
    finally:
        leftovers = p.close()
        assert not leftovers, f"containers left in podman: {leftovers}"


@pytest.fixture
def pm(podman: Podman, runtime_daemon: RuntimeDaemon) -> Iterator[Podman]:
    yield podman
    left = podman("ps", "-aq").stdout.split()
    residents = [p.pid for p in psutil.process_iter(["cmdline"])
                 if "runtime_client.oci.resident" in (p.info["cmdline"] or [])]
    deadline = time.monotonic() + 40
    while runtime_daemon.leases() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"podman containers left: {left}"
    assert not residents, f"residents left: {residents}"
    assert runtime_daemon.leases() == []


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
    proc = subprocess.Popen(pm.argv(*args), env=pm.env, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    out = b""
    deadline = time.monotonic() + RUN_TIMEOUT_S
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
    return proc.wait(timeout=RUN_TIMEOUT_S), out


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


def test_podmans_files_limits_and_a_read_only_volume(pm: Podman, tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "marker").write_text("on the host\n")
    out = pm("run", "--rm", "--name", "vmf-v", "--hostname", "vmf-host", "-v", f"{vol}:/data:ro",
             "--ulimit", "nofile=1234:2345", IMAGE, "sh", "-c",
             "echo $(cat /etc/hostname); ulimit -n; ulimit -Hn; cat /data/marker; "
             "grep -c vmf-host /etc/hosts; test -f /run/.containerenv && echo env; "
             "grep CapBnd /proc/self/status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert lines[:5] == ["vmf-host", "1234", "2345", "on the host", "1"], lines
    assert lines[5] == "env"
    assert lines[6] == "CapBnd:\t00000000a80425fb", lines  # podman's 14 default capabilities


def test_a_writable_volume_is_refused_with_one_line(pm: Podman, tmp_path: Path) -> None:
    (tmp_path / "rw").mkdir()
    out = pm("run", "--rm", "-v", f"{tmp_path / 'rw'}:/rw", IMAGE, "true")
    assert out.returncode != 0
    assert b"writable bind mount of directory" in out.stderr, out.stderr
