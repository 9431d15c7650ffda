"""The daemon core on the host-process stand-in (no QEMU): pools, leases,
recovery and background failures in seconds.

``standin_config(root, pools=...)`` is a config whose VMs need no image (the
stand-in ignores the paths) and whose every path lives under ``root``;
``started(config)`` is a started daemon over ``ProcessHypervisor``.  The
``root`` fixture fails a test that leaves a stand-in process running.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmfactory.app import make_daemon
from vmfactory.config import Config, load_config
from vmfactory.daemon.callers import Caller
from vmfactory.daemon.core import Daemon
from vmfactory.hypervisor.base import Hypervisor
from vmfactory.hypervisor.proc import processes_under
from vmfactory.hypervisor.process import AGENT_MODULE, ProcessHypervisor
from vmfactory.store import Store

# The tests run as root: the caller of their requests.
ME = Caller.local()
POOL = {"name": "p", "base": "direct", "min_size": 2, "max_size": 3, "warm_containers": False}


def standin_config(root: Path, pools: list[dict[str, Any]] | None = None,
                   **daemon: Any) -> Config:
    image = root / "image"
    image.mkdir(exist_ok=True)
    for name in ("kernel", "initrd", "rootfs"):
        (image / name).touch()
    return load_config(overrides={
        "paths": {"run_dir": str(root / "run"), "template_dir": str(root / "templates"),
                  "state_dir": str(root / "state")},
        "image": {name: str(image / name) for name in ("kernel", "initrd", "rootfs")},
        "vm": {"accel": "tcg"},
        "timeouts": {"agent_ready": 30.0, "agent_call": 5.0},
        "daemon": {"socket": str(root / "factory.sock"), "health_interval_s": 0.05,
                   "mem_floor_mib": 0, **daemon},
        "store": {"url": f"file://{root / 'store'}"},
        "pools": pools if pools is not None else [POOL],
    })


def standin_hypervisor(config: Config, cls: type[Hypervisor] = ProcessHypervisor) -> Hypervisor:
    return cls(config.paths.vms_dir, config.timeouts)


async def started(config: Config, *, hypervisor: Hypervisor | None = None,
                  store: Store | None = None) -> Daemon:
    daemon = make_daemon(config, hypervisor=hypervisor or standin_hypervisor(config),
                         store=store)
    await daemon.start()
    return daemon


async def until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what or predicate}"
        await asyncio.sleep(0.02)


def standins(root: Path) -> list[int]:
    """pids of the stand-in VM processes under ``root``."""
    return [p.info["pid"] for p in processes_under(root, AGENT_MODULE)]


@pytest.fixture
def root() -> Iterator[Path]:
    """A short directory (unix socket paths hold 108 bytes); no stand-in may outlive it."""
    path = Path(tempfile.mkdtemp(prefix="vmfs-", dir="/tmp"))
    yield path
    leftovers = processes_under(path, AGENT_MODULE)
    for proc in leftovers:
        proc.kill()
    shutil.rmtree(path, ignore_errors=True)
    assert not leftovers, f"stand-in VMs left running: {[p.info['pid'] for p in leftovers]}"
