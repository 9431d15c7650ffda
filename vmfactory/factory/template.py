"""CreateFromTemplate: boot one template VM, save it, then clone it.

A template is a directory on tmpfs (mode 0700) holding the guest's RAM
(``memory``, a file-backed memory backend shared while the template runs), its
device state (``state``, saved with x-ignore-shared so RAM is not copied) and a
record (``template.json``) of what it was built from.  A clone is a new QEMU
with the same devices, the memory file mapped private (copy-on-write), and the
device state restored: tens of milliseconds instead of a cold boot.  With
``standby`` > 0 the next clones' QEMUs are started ahead (see standby.py), so a
clone pays only for the restore.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import os
import shutil
import subprocess
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from vmfactory.errors import HypervisorError, TemplateError
from vmfactory.factory.standby import StandbyClones
from vmfactory.hypervisor.base import Hypervisor, Vm, VmSpec
from vmfactory.util.states import Lifecycle, require
from vmfactory.util.tasks import finish

logger = logging.getLogger(__name__)

# Time for the guest agent to see the host leave before the vCPUs stop, so the
# saved agent waits for its next host (a missed hang-up is recovered anyway).
QUIESCE_S = 0.2
STATE_ROOM_MIB = 64
RESIZABLE = frozenset({"cpus", "memory_mib"})


def _mount_tmpfs(directory: Path, size_mib: int) -> None:
    """Give the template a tmpfs of its own, sized to guest memory plus device state.

    Only root can mount; otherwise the directory stays on whatever holds it
    (/dev/shm by default), with the free-space check in ``_build`` as the bound.
    """
    if os.geteuid() != 0:
        return
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o",
                           f"size={size_mib}m,mode=0700,nosuid,nodev,noexec",
                           "vmfactory-template", str(directory)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise TemplateError(f"mount tmpfs on {directory}: {proc.stderr.strip()}")


def _remove_template_dir(directory: Path) -> None:
    """Unmount (lazily: running clones keep their mappings) and remove."""
    if os.path.ismount(directory):
        subprocess.run(["umount", "-l", str(directory)], capture_output=True, check=False)
    shutil.rmtree(directory, ignore_errors=True)


class TemplateState(enum.Enum):
    ABSENT = "absent"
    CREATING = "creating"
    READY = "ready"
    DESTROYED = "destroyed"


@lru_cache(maxsize=8)
def qemu_version(qemu: str) -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout.splitlines() or ["unknown"])[0].strip()


TEMPLATE_OWN = ("memory_path", "memory_shared", "incoming")


def spec_record(spec: VmSpec) -> dict[str, Any]:
    """The parts of a spec a clone must share with its template, as JSON."""
    return {k: v for k, v in spec.to_record().items() if k not in TEMPLATE_OWN}


def spec_from_record(record: dict[str, Any]) -> VmSpec:
    return VmSpec.from_record(record)


class Template(Lifecycle[TemplateState]):
    """One template directory and its lifecycle."""

    def __init__(self, directory: Path, hypervisor: Hypervisor, standby: int = 0) -> None:
        self.directory = directory
        self.hypervisor = hypervisor
        self.record: dict[str, Any] = {}
        self.standby = StandbyClones(directory.name, self._standby_vm,
                                     standby if hypervisor.supports_standby else 0)
        self._set_state(TemplateState.ABSENT)
        if self.record_file.exists():
            self.record = json.loads(self.record_file.read_text())
            self._set_state(TemplateState.READY)

    @property
    def name(self) -> str:
        return self.directory.name

    def _state_error(self, operation: str) -> Exception:
        return TemplateError(f"template {self.name} is {self.state.value}: cannot {operation}")

    @property
    def memory_file(self) -> Path:
        return self.directory / "memory"

    @property
    def state_file(self) -> Path:
        return self.directory / "state"

    @property
    def record_file(self) -> Path:
        return self.directory / "template.json"

    @property
    def spec(self) -> VmSpec:
        return spec_from_record(self.record["spec"])

    @require(TemplateState.ABSENT, TemplateState.DESTROYED)
    async def create(self, spec: VmSpec) -> None:
        """Boot a template VM from ``spec``, save it, stop its VM."""
        self._set_state(TemplateState.CREATING)
        try:
            await self._build(spec)
        except BaseException:
            _remove_template_dir(self.directory)
            self._set_state(TemplateState.ABSENT)
            raise
        self._set_state(TemplateState.READY)

    async def _build(self, spec: VmSpec) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=False)
        _mount_tmpfs(self.directory, spec.vm.memory_mib + STATE_ROOM_MIB)
        free_mib = shutil.disk_usage(self.directory).free >> 20
        if free_mib < spec.vm.memory_mib + STATE_ROOM_MIB:
            raise TemplateError(f"{self.directory}: {free_mib} MiB free, need "
                                f"{spec.vm.memory_mib + STATE_ROOM_MIB} MiB")
        t0 = time.monotonic()
        vm = self.hypervisor.create_vm(dataclasses.replace(
            spec, memory_path=self.memory_file, memory_shared=True, incoming=None))
        try:
            await vm.start()
            await vm.disconnect_agent()  # no host connected in the saved guest
            await asyncio.sleep(QUIESCE_S)
            await vm.save_state(self.state_file)
        finally:
            await finish(vm.stop())
        self.record = {"spec": spec_record(spec), "qemu_version": qemu_version(spec.vm.qemu),
                       "created_at": time.time(), "clone_count": 0,
                       "state_bytes": self.state_file.stat().st_size,
                       "memory_bytes": self.memory_file.stat().st_size,
                       "build_seconds": round(time.monotonic() - t0, 2)}
        self._write_record()
        logger.info("template %s ready in %.1f s (state %d KiB)", self.directory.name,
                    self.record["build_seconds"], self.record["state_bytes"] >> 10)

    def _write_record(self) -> None:
        tmp = self.record_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=2))
        tmp.rename(self.record_file)

    def problem(self) -> str | None:
        """Why this template cannot be cloned now, or None."""
        if self.state is not TemplateState.READY:
            return f"template is {self.state.value}"
        for path, key in ((self.state_file, "state_bytes"), (self.memory_file, "memory_bytes")):
            if not path.is_file():
                return f"{path.name} file is missing"
            if path.stat().st_size != self.record[key]:
                return f"{path.name} file is truncated or was replaced"
        if qemu_version(self.spec.vm.qemu) != self.record["qemu_version"]:
            return "QEMU was upgraded since the template was saved"
        for what in ("kernel", "initrd", "rootfs"):
            if not Path(self.record["spec"][what]).is_file():
                return f"the template's {what} is gone"
        return None

    def mismatch(self, spec: VmSpec) -> str | None:
        """How ``spec`` differs from the template's in a way a clone cannot absorb.

        ``vm.cpus`` and ``vm.memory_mib`` are ignored: a clone is grown to a
        larger request by hot-plug, and a smaller request gets the template's
        size (never less than asked).  Everything else shapes the QEMU command
        line or the guest, which a clone inherits and cannot change.
        """
        mine, theirs = spec_record(self.spec), spec_record(spec)
        for key in ("kernel", "initrd", "rootfs", "accel", "extra_kernel_args"):
            if mine[key] != theirs[key]:
                return f"{key} differs from the template's"
        for key, value in mine["vm"].items():
            if key not in RESIZABLE and theirs["vm"][key] != value:
                return f"vm.{key} differs from the template's"
        return None

    def _clone_spec(self) -> VmSpec:
        return dataclasses.replace(self.spec, memory_path=self.memory_file,
                                   memory_shared=False, incoming=self.state_file)

    def _standby_vm(self) -> Vm:
        return self.hypervisor.create_vm(self._clone_spec())

    async def clone(self, vm_id: str | None = None) -> Vm:
        """A RUNNING clone whose agent answered: a standby QEMU restored when one
        waits (and ``vm_id`` is not imposed), else a new one."""
        problem = self.problem()
        if problem:
            raise TemplateError(f"template {self.name}: {problem}")
        try:
            vm = await self._start_clone(vm_id)
        finally:
            self.standby.replenish()
        self.record["clone_count"] += 1
        self._write_record()
        return vm

    async def _start_clone(self, vm_id: str | None) -> Vm:
        waiting = self.standby.take() if vm_id is None else None
        if waiting is not None:
            try:
                await waiting.start()  # stops the VM itself on failure
                return waiting
            except HypervisorError as exc:
                # Its QEMU may have been killed while it waited: a new one still can.
                logger.warning("template %s: standby vm %s failed (%s): a new clone",
                               self.name, waiting.id, exc)
        vm = self.hypervisor.create_vm(self._clone_spec(), vm_id)
        await vm.start()
        return vm

    async def close_standby(self) -> None:
        """Stop the QEMUs waiting for a clone (they map the memory file); idempotent."""
        await self.standby.close()

    async def destroy(self) -> None:
        """Stop the standby QEMUs, remove the template's files; idempotent."""
        await self.close_standby()
        self.remove()

    @require(TemplateState.ABSENT, TemplateState.READY, TemplateState.DESTROYED,
             operation="remove")
    def remove(self) -> None:
        """:meth:`destroy` for callers outside the event loop."""
        _remove_template_dir(self.directory)
        try:
            self.directory.parent.rmdir()  # the template_dir, only when empty
        except OSError:
            pass
        self.record = {}
        self._set_state(TemplateState.DESTROYED)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "state": self.state.value,
                               "directory": str(self.directory)}
        if self.record:
            out.update({k: self.record[k] for k in ("created_at", "clone_count", "state_bytes",
                                                    "qemu_version", "build_seconds")})
            out["problem"] = self.problem()
        out.update(self.standby.status())
        return out
