"""CreateFromTemplate with real QEMU: one template, many clones, broken templates."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import qemu_pids_under
from vmfactory.app import make_bases, make_hypervisor
from vmfactory.config import Config
from vmfactory.errors import HypervisorError, TemplateError
from vmfactory.factory.sequence import prepare_vm
from vmfactory.factory.spec import resolve_spec
from vmfactory.factory.template import Template, TemplateState
from vmfactory.guest.image import GuestImage
from vmfactory.hypervisor.base import VmState
from vmfactory.hypervisor.qemu import QemuHypervisor

pytestmark = pytest.mark.qemu

CLONES = 20


@pytest.fixture(scope="module")
async def template(config: Config, guest_image: GuestImage) -> AsyncIterator[Template]:
    hv = QemuHypervisor(config.paths.run_dir, config.timeouts)
    directory = config.paths.run_dir / "templates" / "t-test"
    tpl = Template(directory, hv)
    await tpl.create(await resolve_spec(config))
    yield tpl
    await tpl.destroy()
    assert not directory.exists()


async def test_template_is_saved(template: Template) -> None:
    assert template.state is TemplateState.READY
    assert template.problem() is None
    assert template.memory_file.stat().st_size == template.spec.vm.memory_mib << 20
    assert 0 < template.state_file.stat().st_size < 16 << 20  # device state only, no RAM
    assert (template.directory.stat().st_mode & 0o777) == 0o700
    # The template's own QEMU is gone: only files remain.
    assert not qemu_pids_under(template.directory)


async def test_clones_are_distinct_and_current(template: Template) -> None:
    randoms, generations, boot_ids = set(), set(), set()
    for _ in range(CLONES):
        vm = await template.clone()
        try:
            assert vm.state is VmState.RUNNING
            await prepare_vm(vm)
            info = await vm.agent.info(16)
            randoms.add(info.random)
            boot_ids.add(info.boot_id)
            generations.add((await vm.qmp("query-vm-generation-id"))["guid"])
            assert abs(info.time_unix_ns - time.time_ns()) < 10**9
        finally:
            await vm.stop()
        assert not vm.run_dir.exists()
    assert len(randoms) == CLONES
    assert len(generations) == CLONES
    # The kernel makes boot_id on first read; the template never reads it (its agent
    # is checked over the control channel only), so each reseeded clone makes its own.
    assert len(boot_ids) == CLONES
    assert template.record["clone_count"] >= CLONES


async def _copy(template: Template, directory: Path) -> Template:
    shutil.copytree(template.directory, directory)
    return Template(directory, template.hypervisor)


async def test_missing_state_file_is_refused(template: Template, tmp_path: Path) -> None:
    broken = await _copy(template, template.directory.with_name("t-missing"))
    try:
        broken.state_file.unlink()
        with pytest.raises(TemplateError, match="state file is missing"):
            await broken.clone()
    finally:
        await broken.destroy()
    assert not qemu_pids_under(broken.directory)


async def test_truncated_state_file_is_refused(template: Template) -> None:
    broken = await _copy(template, template.directory.with_name("t-trunc"))
    try:
        with broken.state_file.open("r+b") as f:
            f.truncate(broken.record["state_bytes"] // 2)
        with pytest.raises(TemplateError, match="truncated"):
            await broken.clone()
    finally:
        await broken.destroy()


async def test_truncated_state_fails_the_restore_not_hangs(template: Template,
                                                           config: Config) -> None:
    """Past the size check (a record that lies), QEMU itself rejects the state."""
    broken = await _copy(template, template.directory.with_name("t-lie"))
    try:
        with broken.state_file.open("r+b") as f:
            f.truncate(broken.record["state_bytes"] // 2)
        spec = dataclasses.replace(broken.spec, memory_path=broken.memory_file,
                                   incoming=broken.state_file)
        vm = template.hypervisor.create_vm(spec)
        start = time.monotonic()
        with pytest.raises(HypervisorError) as err:
            await vm.start()
        assert err.value.step == "restore"
        assert time.monotonic() - start < config.timeouts.migrate
        assert vm.pid is None and not vm.run_dir.exists()
    finally:
        await broken.destroy()


async def test_other_config_is_a_mismatch(template: Template) -> None:
    other = dataclasses.replace(template.spec, extra_kernel_args=("quiet=0",))
    assert "extra_kernel_args" in (template.mismatch(other) or "")
    bigger = dataclasses.replace(template.spec,
                                 vm=dataclasses.replace(template.spec.vm, max_cpus=8))
    assert template.mismatch(bigger) == "vm.max_cpus differs from the template's"
    assert template.mismatch(template.spec) is None


async def test_create_twice_is_refused(template: Template) -> None:
    with pytest.raises(TemplateError, match="ready"):
        await template.create(template.spec)


async def test_template_factory_clones_or_falls_back(config: Config,
                                                     guest_image: GuestImage) -> None:
    factory = make_bases(config, make_hypervisor(config))[1]
    try:
        vm = await factory.get_vm()
        assert vm.spec.incoming is not None  # a clone
        assert abs((await vm.agent.info(0)).time_unix_ns - time.time_ns()) < 10**9
        await vm.stop()
        other = dataclasses.replace(config.vm, kernel_args="vmfactory.test=1")
        vm = await factory.get_vm(other)
        assert vm.spec.incoming is None  # booted directly
        await vm.stop()
        status = factory.status()
        assert status["clones"] == 1
        assert status["fallbacks"] == {"vm.kernel_args differs from the template's": 1}
        assert status["direct"]["booted"] == 1
    finally:
        await factory.close()
        await factory.template.destroy()


async def test_rotation_swaps_generations_without_failing_requests(
        config: Config, guest_image: GuestImage) -> None:
    rotating = dataclasses.replace(config, template=dataclasses.replace(config.template,
                                                                        name="rot", max_clones=2))
    factory = make_bases(rotating, make_hypervisor(rotating))[1]
    try:
        first = await factory.ensure_template()
        assert first.directory.is_mount()  # a tmpfs of its own, sized to the guest
        for _ in range(2):
            vm = await factory.get_vm()
            await vm.stop()
        assert factory.needs_rotation() == "2 clones"
        # The rebuild runs in the background; requests meanwhile still get clones.
        vm = await factory.get_vm()
        await vm.stop()
        for _ in range(600):
            if factory.rotations:
                break
            await asyncio.sleep(0.1)
        assert factory.rotations == 1
        assert factory.template is not first and not first.directory.exists()
        assert factory.template.record["clone_count"] == 0
        vm = await factory.get_vm()
        await vm.stop()
        assert factory.status()["clones"] == 4 and factory.status()["fallbacks"] == {}
        # A new factory adopts the newest generation instead of building one.
        again = make_bases(rotating, factory.hypervisor)[1]
        assert again.template.directory == factory.template.directory
    finally:
        await factory.close()
        await factory.template.destroy()
    assert not list(config.paths.template_dir.glob("rot.*"))


async def test_bigger_request_is_hot_plugged(template: Template) -> None:
    vm = await template.clone()
    try:
        want = dataclasses.replace(template.spec.vm, cpus=2,
                                   memory_mib=template.spec.vm.memory_mib + 256)
        assert template.mismatch(dataclasses.replace(template.spec, vm=want)) is None
        before = await vm.agent.info(0)
        steps = await prepare_vm(vm, want)
        assert "hot-plug" in steps
        after = await vm.agent.info(0)
        assert (before.cpus_online, after.cpus_online) == (1, 2)
        assert after.mem_total_kib - before.mem_total_kib >= 240 * 1024
        assert (vm.cpus, vm.memory_mib) == (2, want.memory_mib)
        # A smaller request never shrinks the VM.
        smaller = dataclasses.replace(want, cpus=1, memory_mib=want.memory_mib - 128)
        assert "hot-plug" not in await prepare_vm(vm, smaller)
        assert (vm.cpus, vm.memory_mib) == (2, want.memory_mib)
    finally:
        await vm.stop()


# -- standby QEMUs -----------------------------------------------------------------

def _nice(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


async def _with_standby(template: Template, name: str) -> Template:
    """A copy of ``template`` that keeps one QEMU standing by, filled."""
    shutil.copytree(template.directory, template.directory.with_name(name))
    copy = Template(template.directory.with_name(name), template.hypervisor, standby=1)
    copy.standby.replenish()
    await copy.standby.settled()
    return copy


async def test_a_clone_takes_the_qemu_standing_by(template: Template) -> None:
    copy = await _with_standby(template, "t-standby")
    try:
        [waiting] = copy.standby.vms()
        assert waiting.state is VmState.STANDBY and _nice(waiting.pid) == 19
        assert waiting.pid in qemu_pids_under(copy.directory)
        vm = await copy.clone()
        try:
            assert vm is waiting and vm.state is VmState.RUNNING
            assert vm.timings.standby and vm.timings.qemu_start_ms == 0
            assert 0 < vm.timings.restore_ms <= vm.timings.agent_ready_ms
            assert _nice(vm.pid) == 0  # its own priority back for the lessee
            assert (await vm.agent.info(0)).platform == "guest"
            # The next one is being started behind it.
            await copy.standby.settled()
            [behind] = copy.standby.vms()
            assert behind is not vm and behind.state is VmState.STANDBY
            assert copy.status()["waiting"] == 1
        finally:
            await vm.stop()
    finally:
        await copy.destroy()
    assert not qemu_pids_under(copy.directory)  # the standby QEMU went with the template
    assert not behind.run_dir.exists() and not copy.directory.exists()


async def test_a_killed_standby_qemu_gives_way_to_a_new_clone(template: Template) -> None:
    copy = await _with_standby(template, "t-standby-killed")
    try:
        [waiting] = copy.standby.vms()
        os.kill(waiting.pid, signal.SIGKILL)
        await asyncio.sleep(0.2)
        vm = await copy.clone()
        try:
            assert vm is not waiting and not vm.timings.standby
            assert vm.timings.qemu_start_ms > 0
            assert (await vm.agent.info(0)).platform == "guest"
        finally:
            await vm.stop()
        assert not waiting.run_dir.exists()  # the dead one was torn down
    finally:
        await copy.destroy()
    assert not qemu_pids_under(copy.directory)


async def test_only_a_clone_can_stand_by(template: Template) -> None:
    vm = template.hypervisor.create_vm(dataclasses.replace(template.spec, incoming=None))
    with pytest.raises(HypervisorError, match="only a clone"):
        await vm.stand_by()
    await vm.stop()
    assert vm.pid is None and not qemu_pids_under(vm.run_dir)
