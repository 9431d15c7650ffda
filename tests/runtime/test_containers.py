"""End-to-end: containers from a busybox OCI bundle in factory VMs, through the
``vmfactory-runtime`` CLI, in every shim/proxy mode, against a real daemon."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from runtime_client.bundles.busybox import make_busybox_bundle
from tests.runtime.conftest import (REPO, RuntimeDaemon, cli, cli_argv, client_processes,
                                    list_json)

pytestmark = pytest.mark.qemu

MODES = [("katashimbuiltin", "noProxy"), ("katashimbuiltin", "kataProxyBuiltin"),
         ("katashimbuiltin", "noopProxy"), ("katashim", "kataProxy"),
         ("katashim", "kataProxyBuiltin"), ("ccshim", "ccProxy"), ("noopshim", "noProxy")]
MODE_IDS = [f"{s}-{p}" for s, p in MODES]
STANDALONE_SHIMS = ("katashim", "ccshim")
RUN_TIMEOUT = 180.0  # a run may wait for the pool to refill under TCG

def relays(shim: str) -> bool:
    return shim != "noopshim"


RELAY_MODES = [(s, p) for s, p in MODES if relays(s)]  # a terminal needs a relay
RELAY_MODE_IDS = [f"{s}-{p}" for s, p in RELAY_MODES]


def one_line(stderr: bytes) -> str:
    lines = stderr.decode(errors="replace").strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def sandbox_ids(rd: RuntimeDaemon) -> list[str]:
    return [s["id"] for s in list_json(rd.config)["sandboxes"]]


def container_names(rd: RuntimeDaemon) -> list[str]:
    return [c["name"] for s in list_json(rd.config)["sandboxes"] for c in s["containers"]]


def container_record(rd: RuntimeDaemon, name: str) -> dict[str, Any] | None:
    for s in list_json(rd.config)["sandboxes"]:
        for c in s["containers"]:
            if c["name"] == name:
                return c
    return None


def wait_running(rd: RuntimeDaemon, name: str, proc: subprocess.Popen[bytes] | None = None,
                 timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        record = container_record(rd, name)
        if record is not None and record["state"] == "running":
            return record
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the CLI exited with {proc.returncode} before {name} ran")
        assert time.monotonic() < deadline, f"container {name} not running: {record}"
        time.sleep(0.5)


def leftovers(rd: RuntimeDaemon) -> list[str]:
    out = []
    if ids := sandbox_ids(rd):
        out.append(f"sandboxes: {ids}")
    if dirs := rd.sandbox_dirs():
        out.append(f"sandbox dirs: {dirs}")
    if procs := client_processes(rd.root):
        out.append(f"proxy/shim processes: {[p.cmdline() for p in procs]}")
    if leases := rd.leases():
        out.append(f"leases: {leases}")
    return out


def wait_settled(rd: RuntimeDaemon, timeout: float = 20.0) -> list[str]:
    """What a test left behind, after giving stopping processes a moment."""
    deadline = time.monotonic() + timeout
    while (left := leftovers(rd)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture
def rd(runtime_daemon: RuntimeDaemon) -> Iterator[RuntimeDaemon]:
    """The daemon; after the test, nothing of the test may be left (and what was
    left is removed so the next test starts clean)."""
    yield runtime_daemon
    left = wait_settled(runtime_daemon)
    for sid in sandbox_ids(runtime_daemon):
        cli(runtime_daemon.config, "sandbox", "rm", sid, timeout=RUN_TIMEOUT)
    for proc in client_processes(runtime_daemon.root):
        try:
            proc.kill()
        except psutil.Error:
            pass
    assert not left, left


@pytest.fixture(scope="module")
def notexec_bundle() -> Iterator[Path]:
    """A busybox bundle with /notexec: mode 755, text without a shebang (ENOEXEC)."""
    base = Path(tempfile.mkdtemp(prefix="vmfr-nx-", dir="/tmp"))
    try:
        bundle = make_busybox_bundle(base / "bundle")
        target = bundle / "rootfs" / "notexec"
        target.write_text("echo this is not a script\n")
        target.chmod(0o755)
        yield bundle
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- every shim/proxy mode ------------------------------------------------------------

@pytest.mark.parametrize(("shim", "proxy"), MODES, ids=MODE_IDS)
def test_echo(rd: RuntimeDaemon, busybox_bundle: Path, shim: str, proxy: str) -> None:
    out = cli(rd.config, "run", "--rm", str(busybox_bundle), "--", "echo", "hello",
              shim=shim, proxy=proxy, timeout=RUN_TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (b"hello\n" if relays(shim) else b"")


@pytest.mark.parametrize(("shim", "proxy"), MODES, ids=MODE_IDS)
def test_one_mib_through_cat(rd: RuntimeDaemon, busybox_bundle: Path, shim: str,
                             proxy: str) -> None:
    data = os.urandom(1 << 20)
    out = cli(rd.config, "run", "--rm", "-i", str(busybox_bundle), "--", "cat",
              shim=shim, proxy=proxy, input=data, timeout=RUN_TIMEOUT)
    assert out.returncode == 0, out.stderr  # cat ended on stdin EOF
    if relays(shim):
        assert len(out.stdout) == len(data)
        assert hashlib.sha256(out.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    else:
        assert out.stdout == b""  # /dev/null stdin: cat ends at once, nothing relayed


@pytest.mark.parametrize(("shim", "proxy"), MODES, ids=MODE_IDS)
def test_exit_codes(rd: RuntimeDaemon, busybox_bundle: Path, shim: str, proxy: str) -> None:
    out = cli(rd.config, "run", "--rm", str(busybox_bundle), "--", "sh", "-c", "exit 3",
              shim=shim, proxy=proxy, timeout=RUN_TIMEOUT)
    assert out.returncode == 3, out.stderr
    out = cli(rd.config, "run", "--rm", str(busybox_bundle), "--", "sh", "-c", "kill -9 $$",
              shim=shim, proxy=proxy, timeout=RUN_TIMEOUT)
    assert out.returncode == 128 + 9, out.stderr


def _read_until(fd: int, marker: bytes, timeout: float, buf: bytes = b"") -> bytes:
    """Read ``fd`` until ``marker`` is in what was read (AssertionError on timeout/EOF)."""
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} within {timeout} s; got {buf!r}"
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: the pty's other side is closed
                raise
            chunk = b""
        assert chunk, f"EOF before {marker!r}; got {buf!r}"
        buf += chunk
    return buf


@pytest.mark.parametrize(("shim", "proxy"), MODES, ids=MODE_IDS)
def test_sigterm_reaches_the_process(rd: RuntimeDaemon, busybox_bundle: Path, shim: str,
                                     proxy: str) -> None:
    name = f"term-{shim}-{proxy}".lower()
    proc = subprocess.Popen(
        cli_argv(rd.config, "run", "--rm", "--name", name, str(busybox_bundle), "--",
                 "sh", "-c", "echo up; exec sleep 60", shim=shim, proxy=proxy),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        wait_running(rd, name, proc)
        if relays(shim):
            assert proc.stdout is not None
            _read_until(proc.stdout.fileno(), b"up", RUN_TIMEOUT)
        else:
            time.sleep(3)  # the client installs its handlers right after the start
        if shim in STANDALONE_SHIMS:
            shims = [p for p in psutil.Process(proc.pid).children()
                     if "runtime_client.shims" in p.cmdline()]
            assert len(shims) == 1, shims
            shims[0].send_signal(signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert container_record(rd, name) is None  # --rm


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _take_terminal() -> None:
    """In the child, after setsid: the pty on fd 0 becomes the controlling tty."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.parametrize(("shim", "proxy"), RELAY_MODES, ids=RELAY_MODE_IDS)
def test_terminal_size_and_resize(rd: RuntimeDaemon, busybox_bundle: Path, shim: str,
                                  proxy: str) -> None:
    master, slave = pty.openpty()
    _set_winsize(slave, 24, 80)
    try:
        proc = subprocess.Popen(
            cli_argv(rd.config, "run", "--rm", "-t", "-i", str(busybox_bundle), "--",
                     "sh", "-c", "stty size; read x; stty size", shim=shim, proxy=proxy),
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
            preexec_fn=_take_terminal, cwd=REPO)
    finally:
        os.close(slave)
    try:
        buf = _read_until(master, b"24 80", RUN_TIMEOUT)
        # The kernel sends SIGWINCH to the pty's foreground process group: the CLI.
        _set_winsize(master, 40, 100)
        time.sleep(1)
        os.write(master, b"\n")
        buf = _read_until(master, b"40 100", 60, buf)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)
    assert code == 0, buf


# --- one mode ---------------------------------------------------------------------------

def _ps(rd: RuntimeDaemon, container: str) -> list[tuple[int, int, str]]:
    """(PID, GUEST-PID) of each process `ps CONTAINER` lists, with its command."""
    out = cli(rd.config, "ps", container)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert lines[0].split()[:4] == ["PID", "PPID", "STAT", "GUEST-PID"], lines
    rows = []
    for line in lines[1:]:
        pid, _ppid, _stat, guest_pid, command = line.split(None, 4)
        rows.append((int(pid), int(guest_pid), command))
    return rows


def test_two_containers_in_one_sandbox(rd: RuntimeDaemon, busybox_bundle: Path) -> None:
    bundle = str(busybox_bundle)
    try:
        out = cli(rd.config, "run", "-d", "--name", "a", bundle, "--", "sh", "-c",
                  "echo A > /marker; exec sleep 120", timeout=RUN_TIMEOUT)
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"a\n"

        out = cli(rd.config, "run", "--rm", "--sandbox", "a", "--name", "b", bundle, "--",
                  "sh", "-c", "cat /marker; echo pid=$$; ls /proc", timeout=RUN_TIMEOUT)
        # cat fails (b has its own root), so the script's status is ls's: 0.
        assert out.returncode == 0, out.stderr
        assert b"No such file" in out.stderr
        assert b"A\n" not in out.stdout
        words = out.stdout.decode().split()
        pid = int(next(w for w in words if w.startswith("pid="))[4:])
        assert pid <= 3, words  # its own PID namespace
        numeric = [int(w) for w in words if w.isdigit()]
        assert pid in numeric and len(numeric) <= 4, numeric  # only its own processes

        out = cli(rd.config, "run", "-d", "--sandbox", "a", "--name", "b2", bundle, "--",
                  "sleep", "120", timeout=RUN_TIMEOUT)
        assert out.returncode == 0, out.stderr
        ps_a, ps_b2 = _ps(rd, "a"), _ps(rd, "b2")
        assert any(cmd == "sleep 120" for _, _, cmd in ps_a), ps_a
        assert any(cmd == "sleep 120" for _, _, cmd in ps_b2), ps_b2
        assert 1 in {pid for pid, _, _ in ps_a}, ps_a
        assert 1 in {pid for pid, _, _ in ps_b2}, ps_b2
        guest_a = {g for _, g, _ in ps_a}
        guest_b2 = {g for _, g, _ in ps_b2}
        assert not guest_a & guest_b2, (ps_a, ps_b2)

        for args in (("kill", "-s", "TERM", "b2"), ("rm", "-f", "b2"), ("rm", "-f", "a"),
                     ("sandbox", "rm", "a")):
            out = cli(rd.config, *args)
            assert out.returncode == 0, (args, out.stderr)
        assert "a" not in sandbox_ids(rd)
    finally:
        cli(rd.config, "sandbox", "rm", "a", timeout=RUN_TIMEOUT)


def test_own_pid_namespace(rd: RuntimeDaemon, busybox_bundle: Path) -> None:
    """One container per sandbox (the part of the test above the hot-plug bug spares)."""
    out = cli(rd.config, "run", "--rm", str(busybox_bundle), "--", "sh", "-c",
              "echo pid=$$; ls /proc", timeout=RUN_TIMEOUT)
    assert out.returncode == 0, out.stderr
    words = out.stdout.decode().split()
    pid = int(next(w for w in words if w.startswith("pid="))[4:])
    numeric = [int(w) for w in words if w.isdigit()]
    # The guest runs the agent, kernel threads...: a shared /proc would list dozens.
    assert pid <= 3 and pid in numeric and len(numeric) <= 4, words


def test_detached_container_ps_kill_rm(rd: RuntimeDaemon, busybox_bundle: Path) -> None:
    try:
        out = cli(rd.config, "run", "-d", "--name", "solo", str(busybox_bundle), "--",
                  "sleep", "120", timeout=RUN_TIMEOUT)
        assert (out.returncode, out.stdout) == (0, b"solo\n"), out.stderr
        record = container_record(rd, "solo")
        assert record is not None and record["state"] == "running", record
        rows = _ps(rd, "solo")
        assert 1 in {pid for pid, _, _ in rows}, rows
        assert [pid for pid, _, cmd in rows if cmd == "sleep 120"] != [], rows
        assert all(guest > 1 for _, guest, _ in rows), rows  # not the guest's own PIDs

        out = cli(rd.config, "rm", "solo")
        assert out.returncode == 125 and b"running" in out.stderr, out.stderr
        out = cli(rd.config, "kill", "-s", "TERM", "solo")
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + 30
        while (out := cli(rd.config, "rm", "solo")).returncode != 0:
            assert time.monotonic() < deadline, out.stderr
            time.sleep(0.5)
        assert out.stdout == b"solo\n"
        assert container_names(rd) == []
        assert sandbox_ids(rd) == ["solo"]  # the sandbox outlives its containers
        out = cli(rd.config, "sandbox", "rm", "solo", timeout=RUN_TIMEOUT)
        assert out.returncode == 0, out.stderr
        assert sandbox_ids(rd) == []
    finally:
        cli(rd.config, "sandbox", "rm", "solo", timeout=RUN_TIMEOUT)


def test_exec_in_a_running_container(rd: RuntimeDaemon, busybox_bundle: Path) -> None:
    try:
        out = cli(rd.config, "run", "-d", "--name", "ea", str(busybox_bundle), "--", "sh",
                  "-c", "echo A > /marker; exec sleep 120", timeout=RUN_TIMEOUT)
        assert out.returncode == 0, out.stderr
        out = cli(rd.config, "exec", "ea", "--", "cat", "/marker")
        assert (out.returncode, out.stdout) == (0, b"A\n"), out.stderr
    finally:
        cli(rd.config, "sandbox", "rm", "ea", timeout=RUN_TIMEOUT)


def test_bad_bundles_cost_nothing(rd: RuntimeDaemon, busybox_bundle: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="vmfr-bad-", dir="/tmp"))
    try:
        no_rootfs = base / "no-rootfs"
        no_rootfs.mkdir()
        shutil.copy(busybox_bundle / "config.json", no_rootfs / "config.json")
        bad_json = base / "bad-json"
        bad_json.mkdir()
        (bad_json / "rootfs").symlink_to(busybox_bundle / "rootfs")
        (bad_json / "config.json").write_text('{"ociVersion": "1.0.2", "process": {')
        cases = [((str(no_rootfs),), 125, "rootfs"),
                 ((str(bad_json),), 125, "JSON"),
                 ((str(busybox_bundle), "--", "nope"), 127, "nope")]
        before = list_json(rd.config)
        handouts = rd.handouts()
        for args, code, word in cases:
            out = cli(rd.config, "run", "--rm", *args)
            assert out.returncode == code, (args, out.stderr)
            assert word in one_line(out.stderr), (args, out.stderr)
            assert out.stdout == b""
            assert list_json(rd.config) == before
            assert rd.sandbox_dirs() == []
            assert rd.handouts() == handouts, "a bad bundle took a VM"
            assert rd.leases() == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_not_executable_in_its_own_sandbox(rd: RuntimeDaemon, notexec_bundle: Path) -> None:
    out = cli(rd.config, "run", "--rm", "--name", "nx", str(notexec_bundle), "--", "/notexec",
              timeout=RUN_TIMEOUT)
    assert out.returncode == 126, out.stderr
    assert "cannot execute" in one_line(out.stderr)
    assert "nx" not in sandbox_ids(rd)  # the sandbox it made is gone (rd checks the rest)


def test_not_executable_keeps_the_sandbox_usable(rd: RuntimeDaemon, busybox_bundle: Path,
                                                 notexec_bundle: Path) -> None:
    try:
        out = cli(rd.config, "run", "-d", "--name", "keep", str(busybox_bundle), "--",
                  "sleep", "120", timeout=RUN_TIMEOUT)
        assert out.returncode == 0, out.stderr
        out = cli(rd.config, "run", "--sandbox", "keep", "--name", "bad", str(notexec_bundle),
                  "--", "/notexec", timeout=RUN_TIMEOUT)
        assert out.returncode == 126, out.stderr
        assert "cannot execute" in one_line(out.stderr)
        out = cli(rd.config, "run", "--rm", "--sandbox", "keep", "--name", "ok",
                  str(busybox_bundle), "--", "echo", "still", timeout=RUN_TIMEOUT)
        assert (out.returncode, out.stdout) == (0, b"still\n"), out.stderr
        names = container_names(rd)
        assert "bad" not in names and "keep" in names, names
        out = cli(rd.config, "sandbox", "rm", "keep", timeout=RUN_TIMEOUT)
        assert out.returncode == 0, out.stderr
    finally:
        cli(rd.config, "sandbox", "rm", "keep", timeout=RUN_TIMEOUT)


@pytest.mark.parametrize("proxy", ["noProxy", "noopProxy"])
def test_katashim_needs_a_shared_proxy(rd: RuntimeDaemon, busybox_bundle: Path,
                                       proxy: str) -> None:
    handouts = rd.handouts()
    out = cli(rd.config, "run", "--rm", str(busybox_bundle), "--", "echo", "hi",
              shim="katashim", proxy=proxy)
    assert out.returncode == 125, out.stderr
    assert "kataProxy" in one_line(out.stderr)
    assert out.stdout == b""
    assert rd.handouts() == handouts


# --- a crashed client (issue #6) ----------------------------------------------------------

def proxy_processes_for(sandbox_dir: Path) -> list[psutil.Process]:
    return client_processes(sandbox_dir, "runtime_client.proxies")


def test_a_crashed_clients_sandbox_can_be_removed(rd: RuntimeDaemon,
                                                   busybox_bundle: Path) -> None:
    proc = subprocess.Popen(
        cli_argv(rd.config, "run", "--name", "crash", str(busybox_bundle), "--", "sleep", "300",
                 shim="katashimbuiltin", proxy="kataProxy"),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    try:
        wait_running(rd, "crash", proc)
        proc.kill()
        proc.wait(timeout=30)
        assert proc.stderr is not None
        proc.stderr.close()

        records = {s["id"]: s for s in list_json(rd.config)["sandboxes"]}
        assert "crash" in records, records
        assert [c["name"] for c in records["crash"]["containers"]] == ["crash"]
        lease = records["crash"]["vm"]["lease_id"]
        assert lease in rd.leases()
        sandbox_dir = rd.sandboxes_dir / "crash"
        # The standalone proxy outlives its client.
        assert proxy_processes_for(sandbox_dir), "the proxy died with the client"

        out = cli(rd.config, "sandbox", "rm", "crash", timeout=RUN_TIMEOUT)
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"crash\n"

        assert "crash" not in sandbox_ids(rd)
        assert "crash" not in container_names(rd)
        assert not sandbox_dir.exists()
        deadline = time.monotonic() + 10
        while proxy_processes_for(sandbox_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not proxy_processes_for(sandbox_dir)
        leases = rd.leases()
        assert lease not in leases and leases == [], leases
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        cli(rd.config, "sandbox", "rm", "crash", timeout=RUN_TIMEOUT)

