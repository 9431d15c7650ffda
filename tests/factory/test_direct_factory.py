"""CreateNew over the host-process stand-in hypervisor (a test double, no QEMU)."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from vmfactory.config import Config, load_config
from vmfactory.errors import FactoryError, HypervisorError
from vmfactory.factory.direct import DirectFactory
from vmfactory.hypervisor.base import VmState
from vmfactory.hypervisor.process import ProcessHypervisor


@pytest.fixture
def standin_config(tmp_path: Path) -> Iterator[Config]:
    run_dir = Path(tempfile.mkdtemp(prefix="vmf-", dir="/tmp"))
    for name in ("kernel", "initrd", "rootfs"):
        (tmp_path / name).write_bytes(b"unused by the stand-in")
    yield load_config(overrides={
        "paths": {"run_dir": str(run_dir)}, "vm": {"accel": "tcg"},
        "image": {n: str(tmp_path / n) for n in ("kernel", "initrd", "rootfs")}})
    shutil.rmtree(run_dir, ignore_errors=True)


async def test_get_vm_returns_a_running_vm_with_a_live_agent(standin_config: Config) -> None:
    factory = DirectFactory(standin_config, ProcessHypervisor(standin_config.paths.run_dir,
                                                              standin_config.timeouts))
    vm = await factory.get_vm()
    try:
        assert vm.state is VmState.RUNNING
        assert (await vm.agent.info(0)).platform == "host-standin"
        assert factory.status()["booted"] == 1
        assert factory.status()["hypervisor"]["name"] == "process-standin"
    finally:
        await vm.stop()
    assert vm.pid is None and not vm.run_dir.exists()


async def test_failed_boot_is_counted_and_cleaned(standin_config: Config) -> None:
    timeouts = dataclasses.replace(standin_config.timeouts, agent_ready=0.01)
    factory = DirectFactory(standin_config, ProcessHypervisor(standin_config.paths.run_dir,
                                                              timeouts))
    before = {p.pid for p in psutil.process_iter()}
    with pytest.raises(HypervisorError, match="agent-ready"):
        await factory.get_vm()
    assert factory.status()["failed"] == 1 and factory.status()["booted"] == 0
    assert list(standin_config.paths.run_dir.iterdir()) == []
    leaked = [p for p in psutil.process_iter(["pid", "cmdline"])
              if p.pid not in before and "vmfactory.guest.agent" in " ".join(p.info["cmdline"] or [])]
    assert leaked == []


async def test_closed_factory_refuses(standin_config: Config) -> None:
    factory = DirectFactory(standin_config, ProcessHypervisor(standin_config.paths.run_dir,
                                                              standin_config.timeouts))
    await factory.close()
    await factory.close()
    with pytest.raises(FactoryError, match="closed"):
        await factory.get_vm()
