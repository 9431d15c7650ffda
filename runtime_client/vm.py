"""Where a sandbox's VM comes from, and who may change it.

* :class:`LeasedVm`: handed out by the node's daemon, which owns its QEMU and
  QMP; disks are attached through the daemon, and release stops the VM.  Any
  client process can do this with the lease id.
* :class:`OwnedVm`: booted in the client process (CreateNew, through
  ``vmfactory.app.create_new_vm``) because no daemon answered.  The client owns
  the VM; a later client process adopts it by the recorded pid to attach disks
  or stop it.
"""

from __future__ import annotations

import logging
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import psutil

from runtime_client.errors import SandboxError
from vmfactory.config import Config
from vmfactory.errors import DaemonUnavailable, LeaseNotFound, VmFactoryError
from vmfactory.hypervisor.base import DiskImage, Vm
from vmfactory.server.client import FactoryClient

logger = logging.getLogger(__name__)


class SandboxVm(ABC):
    """A running VM a sandbox lives in."""

    kind: str

    def __init__(self, vm_id: str, agent_socket: Path, pid: int, source: str) -> None:
        self.vm_id = vm_id
        self.agent_socket = agent_socket
        self.pid = pid
        self.source = source

    @abstractmethod
    async def attach_disk(self, path: Path, serial: str) -> None:
        """Hot-plug ``path`` read-only; the guest finds it by ``serial``."""

    @abstractmethod
    async def detach_disk(self, serial: str) -> None:
        """Unplug a disk (after the guest unmounted it)."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop the VM; idempotent."""

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "vm_id": self.vm_id, "agent_socket": str(self.agent_socket),
                "pid": self.pid, "source": self.source}


class LeasedVm(SandboxVm):
    """A VM leased from the daemon."""

    kind = "leased"

    def __init__(self, factory: FactoryClient, lease_id: str, ttl_s: float = 0.0,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.factory = factory
        self.lease_id = lease_id
        self.ttl_s = ttl_s

    @classmethod
    async def get(cls, factory: FactoryClient, config: Config, client: str) -> LeasedVm:
        """A VM leased with the client's TTL: whoever holds the sandbox renews it
        (see runtime_client.keeper), so a dead client's lease ends on its own."""
        handle = await factory.get_vm(client=client, lease_ttl_s=config.runtime.lease_ttl_s,
                                      timeout=config.runtime.get_vm_timeout_s)
        return cls(factory, handle.lease_id, handle.lease_ttl_s, vm_id=handle.vm_id,
                   agent_socket=Path(handle.agent_socket), pid=handle.pid, source=handle.source)

    async def renew(self) -> None:
        await self.factory.renew(self.lease_id, self.ttl_s)

    async def attach_disk(self, path: Path, serial: str) -> None:
        await self.factory.attach_disk(self.lease_id, path, serial)

    async def detach_disk(self, serial: str) -> None:
        await self.factory.detach_disk(self.lease_id, serial)

    async def stop(self) -> None:
        try:
            await self.factory.release(self.lease_id)
        except LeaseNotFound:
            logger.info("lease %s was already gone", self.lease_id)  # released or reclaimed

    def record(self) -> dict[str, Any]:
        return {**super().record(), "lease_id": self.lease_id, "ttl_s": self.ttl_s}


class OwnedVm(SandboxVm):
    """A VM this client booted (or adopted after its booting client died)."""

    kind = "owned"

    def __init__(self, vm: Vm, source: str) -> None:
        super().__init__(vm.id, vm.agent_socket, vm.pid or 0, source)
        self.vm = vm

    @classmethod
    async def boot(cls, config: Config) -> OwnedVm:
        from vmfactory.app import create_new_vm  # the daemon's plugins: only on this path

        try:
            vm = await create_new_vm(config)  # its agent channel is left to the sandbox
        except VmFactoryError as exc:
            raise SandboxError(f"CreateNew failed: {exc}") from exc
        return cls(vm, "boot")

    @classmethod
    async def adopt(cls, config: Config, record: dict[str, Any]) -> OwnedVm:
        from vmfactory.app import adopt_vm

        try:
            vm = await adopt_vm(config, record["vm_id"], record["spec"], int(record["pid"]))
        except VmFactoryError as exc:
            raise SandboxError(f"the sandbox's VM {record['vm_id']} is gone: {exc}") from exc
        return cls(vm, record.get("source", "boot"))

    async def attach_disk(self, path: Path, serial: str) -> None:
        # The image is this client's own (it built it), so no disk policy applies;
        # the VM is handed the descriptor, as the daemon hands it its checked ones.
        try:
            disk = DiskImage.open_own(path)
            try:
                await self.vm.attach_disk(disk, serial)
            finally:
                disk.close()  # QEMU holds its own copy
        except VmFactoryError as exc:
            raise SandboxError(f"vm {self.vm_id}: {exc}") from exc

    async def detach_disk(self, serial: str) -> None:
        try:
            await self.vm.detach_disk(serial)
        except VmFactoryError as exc:
            raise SandboxError(f"vm {self.vm_id}: {exc}") from exc

    async def stop(self) -> None:
        await self.vm.stop()

    def record(self) -> dict[str, Any]:
        return {**super().record(), "spec": self.vm.spec.to_record(),
                "run_dir": str(self.vm.run_dir)}


async def obtain_vm(config: Config, factory: FactoryClient, client: str) -> SandboxVm:
    """A VM from the daemon; without one, CreateNew here (``runtime.fallback``)."""
    try:
        return await LeasedVm.get(factory, config, client)
    except DaemonUnavailable as exc:
        if config.runtime.fallback != "createnew":
            raise
        logger.warning("no vmfactory daemon answers (%s): booting a VM in this process "
                       "(CreateNew: seconds instead of milliseconds)", exc)
    return await OwnedVm.boot(config)


async def reattach_vm(config: Config, factory: FactoryClient, record: dict[str, Any]) -> SandboxVm:
    """The VM of a recorded sandbox, from another client process."""
    common = {"vm_id": record["vm_id"], "agent_socket": Path(record["agent_socket"]),
              "pid": int(record["pid"]), "source": record.get("source", "")}
    if record["kind"] == "leased":
        return LeasedVm(factory, record["lease_id"], float(record.get("ttl_s", 0.0)), **common)
    return await OwnedVm.adopt(config, record)


def reap_owned(record: dict[str, Any]) -> None:
    """Last resort for an owned VM that cannot be adopted: kill its QEMU (only if
    the pid still is that QEMU) and remove its run directory."""
    run_dir = record.get("run_dir", "")
    try:
        proc = psutil.Process(int(record["pid"]))
        if run_dir and run_dir in " ".join(proc.cmdline()):
            proc.kill()
            proc.wait(5)
    except psutil.Error:
        pass  # gone already
    if run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)


__all__ = ["SandboxVm", "LeasedVm", "OwnedVm", "obtain_vm", "reattach_vm", "reap_owned"]
