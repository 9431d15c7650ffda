"""Broken inputs fail at a named step and leave no QEMU process or run directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import psutil
import pytest

from tests.conftest import qemu_pids_under
from vmfactory.config import Config, load_config
from vmfactory.errors import ConfigError, HypervisorError
from vmfactory.guest.image import GuestImage
from vmfactory.hypervisor.base import VmSpec, VmState
from vmfactory.hypervisor.qemu import QemuHypervisor

pytestmark = pytest.mark.qemu


def _spec(image: GuestImage, config: Config, **changes: object) -> VmSpec:
    spec = VmSpec(vm=config.vm, kernel=image.kernel, initrd=image.initrd,
                  rootfs=image.rootfs, accel="tcg")
    return dataclasses.replace(spec, **changes)


async def _boot_fails(config: Config, spec: VmSpec, step: str, match: str,
                      timeouts: object = None) -> HypervisorError:
    hv = QemuHypervisor(config.paths.run_dir, timeouts or config.timeouts)
    vm = hv.create_vm(spec)
    with pytest.raises(HypervisorError, match=match) as err:
        await vm.start()
    assert err.value.step == step
    assert vm.state is VmState.FAILED
    assert not vm.run_dir.exists()
    assert vm.pid is None
    assert not qemu_pids_under(vm.run_dir)
    return err.value


async def test_missing_kernel(config: Config, guest_image: GuestImage, tmp_path: Path) -> None:
    spec = _spec(guest_image, config, kernel=tmp_path / "no-such-vmlinuz")
    await _boot_fails(config, spec, "qemu-start", "kernel not found: .*no-such-vmlinuz")


async def test_garbage_kernel(config: Config, guest_image: GuestImage, tmp_path: Path) -> None:
    bad = tmp_path / "vmlinuz"
    bad.write_bytes(b"this is not a kernel\n" * 100)
    spec = _spec(guest_image, config, kernel=bad)
    await _boot_fails(config, spec, "qmp-connect", "QEMU exited with code 1")


async def test_broken_root_image(config: Config, guest_image: GuestImage, tmp_path: Path) -> None:
    bad = tmp_path / "rootfs.ext4"
    bad.write_bytes(b"\0" * (4 << 20))
    spec = _spec(guest_image, config, rootfs=bad)
    # Guest init cannot mount it, says so on the console and powers off.
    await _boot_fails(config, spec, "agent-ready", "vmfactory-init: FAILED: mount root image")


@pytest.mark.parametrize("memory", [-1, 0, 64])
def test_bad_memory_size_is_rejected_by_config(memory: int) -> None:
    with pytest.raises(ConfigError, match="vm.memory_mib") as err:
        load_config(overrides={"vm": {"memory_mib": memory}})
    assert err.value.key == "vm.memory_mib"


async def test_memory_beyond_host_is_refused(config: Config, guest_image: GuestImage) -> None:
    host_mib = psutil.virtual_memory().total >> 20
    vm_config = dataclasses.replace(config.vm, memory_mib=host_mib * 2,
                                    max_memory_mib=host_mib * 2)
    spec = _spec(guest_image, config, vm=vm_config)
    await _boot_fails(config, spec, "qemu-start", "exceeds host memory")


async def test_agent_that_never_answers(config: Config, guest_image: GuestImage) -> None:
    spec = _spec(guest_image, config, extra_kernel_args=("vmfactory.agent=off",))
    timeouts = dataclasses.replace(config.timeouts, agent_ready=8.0)
    await _boot_fails(config, spec, "agent-ready", "agent wait-ready: no answer within 8 s", timeouts)
