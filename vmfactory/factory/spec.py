"""From configuration to a bootable :class:`VmSpec`: image paths and accelerator."""

from __future__ import annotations

import asyncio
from pathlib import Path

from vmfactory.config import Config, VmConfig
from vmfactory.guest.image import ImageBuilder
from vmfactory.hypervisor.accel import resolve_accel
from vmfactory.hypervisor.base import VmSpec


async def image_paths(config: Config, *, quiet: bool = True) -> tuple[Path, Path, Path]:
    """Kernel, initrd and root image: explicit config paths, else the built image."""
    img = config.image
    if img.kernel and img.initrd and img.rootfs:
        return Path(img.kernel), Path(img.initrd), Path(img.rootfs)
    builder = ImageBuilder(config.paths.state_dir, quiet=quiet)
    built = await asyncio.to_thread(builder.ensure)
    return (Path(img.kernel or built.kernel), Path(img.initrd or built.initrd),
            Path(img.rootfs or built.rootfs))


async def resolve_spec(config: Config, vm: VmConfig | None = None, *,
                       quiet: bool = True) -> VmSpec:
    """A spec for ``vm`` (default: the config's [vm]) with 'auto' resolved."""
    vm = vm or config.vm
    kernel, initrd, rootfs = await image_paths(config, quiet=quiet)
    accel = await resolve_accel(vm.accel, vm.qemu, kernel, initrd,
                                config.timeouts.kvm_probe, config.paths.state_dir)
    return VmSpec(vm=vm, kernel=kernel, initrd=initrd, rootfs=rootfs, accel=accel)
