"""A real daemon process on a real unix socket, with a small template pool."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import qemu_pids_under
from vmfactory.config import scratch_config
from vmfactory.guest.image import GuestImage
from vmfactory.util.spawn import spawn_daemon

POOL_READY_TIMEOUT_S = 180.0


@dataclass
class DaemonProc:
    root: Path
    config: Path
    proc: subprocess.Popen[bytes]

    @property
    def socket(self) -> Path:
        return self.root / "factory.sock"

    def log(self) -> str:
        return (self.root / "daemon.log").read_text(errors="replace")


def write_config(root: Path, min_size: int = 2, max_size: int = 3, store: str = "file",
                 runtime: dict[str, Any] | None = None) -> Path:
    """A daemon (and runtime client) config under ``root``; ``runtime`` is merged
    into ``[runtime]``."""
    return scratch_config(root, {
        "vm": {"accel": "tcg"},
        "daemon": {"health_interval_s": 0.2},
        "store": {"url": f"leveldb://{root / 'store.ldb'}"} if store == "leveldb" else {},
        "runtime": runtime or {},
        "pools": [{"name": "small", "min_size": min_size, "max_size": max_size},
                  # Never refilled (min_size 0): requests for 2 vCPUs find it empty.
                  {"name": "empty", "cpus": 2, "min_size": 0, "max_size": 1}],
    })


def start_daemon(root: Path, config: Path, command: list[str] | None = None) -> DaemonProc:
    """``vmfactory init`` (or ``command``) on ``config``, logging to ``root/daemon.log``."""
    proc = spawn_daemon(config, root / "factory.sock", root / "daemon.log", command=command)
    return DaemonProc(root, config, proc)



def assert_clean(root: Path) -> None:
    """Nothing the daemon made may outlive it."""
    assert not qemu_pids_under(root), "QEMU processes left behind"
    assert not (root / "factory.sock").exists()
    run = root / "run"
    assert not run.exists() or not list(run.iterdir()), list(run.iterdir())
    templates = root / "templates"
    assert not templates.exists() or not list(templates.iterdir())
    with open("/proc/mounts") as f:
        assert str(root) not in f.read()


def stop_daemon(d: DaemonProc, sig: int = signal.SIGTERM) -> int:
    if d.proc.poll() is None:
        d.proc.send_signal(sig)
    try:
        return d.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        d.proc.kill()
        raise


@pytest.fixture(scope="module")
def daemon(guest_image: GuestImage) -> Iterator[DaemonProc]:
    root = Path(tempfile.mkdtemp(prefix="vmfd-", dir="/tmp"))
    d = start_daemon(root, write_config(root))
    try:
        yield d
    finally:
        code = stop_daemon(d)
        log = d.log()
        try:
            assert code == 0, log
            assert_clean(root)
        finally:
            for pid in qemu_pids_under(root):
                os.kill(pid, signal.SIGKILL)
            subprocess.run(["umount", "-l", *[str(p) for p in (root / "templates").glob("*")]],
                           capture_output=True, check=False)
            shutil.rmtree(root, ignore_errors=True)
