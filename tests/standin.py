"""The host-process stand-in of a VM (vmfactory.hypervisor.process), shared by the
tests that need a real agent without QEMU.  Import the fixtures into a test module
(``from tests.standin import run_root, hypervisor, vm``) to use them there."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio

from vmfactory.config import TimeoutsConfig, VmConfig
from vmfactory.hypervisor.base import VmSpec
from vmfactory.hypervisor.process import ProcessHypervisor, ProcessVm

TIMEOUTS = TimeoutsConfig(agent_ready=30.0, agent_call=5.0)
SPEC = VmSpec(vm=VmConfig(), kernel=Path("/nonexistent/kernel"), initrd=Path("/nonexistent/initrd"),
              rootfs=Path("/nonexistent/rootfs"), accel="tcg")


def processes_under(root: Path) -> list[psutil.Process]:
    """Live (non-zombie) descendants of ours whose command line mentions ``root``."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if (child.status() != psutil.STATUS_ZOMBIE
                    and any(str(root) in arg for arg in child.cmdline())):
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


@pytest.fixture(scope="module")
def run_root() -> Iterator[Path]:
    """A short run dir (unix socket paths are limited to 108 bytes); nothing started
    under it may outlive the module."""
    root = Path(tempfile.mkdtemp(prefix="vmf-", dir="/tmp"))
    yield root
    leftovers = processes_under(root)
    for proc in leftovers:
        proc.kill()
    shutil.rmtree(root, ignore_errors=True)
    assert not leftovers, f"processes left running: {leftovers}"


@pytest.fixture(scope="module")
def hypervisor(run_root: Path) -> ProcessHypervisor:
    return ProcessHypervisor(run_root, TIMEOUTS)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def vm(hypervisor: ProcessHypervisor) -> AsyncIterator[ProcessVm]:
    """One running stand-in shared by a module's tests (each restores what it changes)."""
    machine = hypervisor.create_vm(SPEC)
    await machine.start()
    yield machine
    await machine.stop()
