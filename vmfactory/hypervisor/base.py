"""The hypervisor plugin interface: what the factory needs from a VM.

A :class:`Vm` moves through :class:`VmState` explicitly; an operation called in
the wrong state raises :class:`VmStateError`.  ``stop()`` is the one idempotent
teardown: it undoes everything ``start()`` set up, in reverse.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Callable
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import psutil

from vmfactory.agent import AgentClient
from vmfactory.agent.control import ControlClient
from vmfactory.config import TimeoutsConfig, VmConfig
from vmfactory.errors import HypervisorError, VmStateError


class VmState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class VmSpec:
    """Everything one VM boots from, resolved (no 'auto' left)."""

    vm: VmConfig
    kernel: Path
    initrd: Path
    rootfs: Path
    accel: Literal["kvm", "tcg"]
    extra_kernel_args: tuple[str, ...] = ()
    # Templating: guest RAM in a file (shared by a template, mapped private by clones).
    memory_path: Path | None = None
    memory_shared: bool = False
    # Restore device state from this file instead of booting (a template clone).
    incoming: Path | None = None

    def to_record(self) -> dict[str, Any]:
        """JSON-ready form, for metadata records."""
        out: dict[str, Any] = {"vm": asdict(self.vm), "accel": self.accel,
                               "extra_kernel_args": list(self.extra_kernel_args),
                               "memory_shared": self.memory_shared}
        for name in ("kernel", "initrd", "rootfs", "memory_path", "incoming"):
            value = getattr(self, name)
            out[name] = None if value is None else str(value)
        return out

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> VmSpec:
        paths = {name: None if record.get(name) is None else Path(record[name])
                 for name in ("kernel", "initrd", "rootfs", "memory_path", "incoming")}
        return cls(vm=VmConfig(**record["vm"]), accel=record["accel"],
                   extra_kernel_args=tuple(record.get("extra_kernel_args", ())),
                   memory_shared=bool(record.get("memory_shared", False)), **paths)


@dataclass
class BootTimings:
    """Milliseconds from process spawn, plus the guest's own uptime milestones."""

    qemu_start_ms: float = 0.0
    restore_ms: float = 0.0
    agent_ready_ms: float = 0.0
    guest_init_s: float = 0.0
    guest_agent_ready_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class MemoryUsage:
    """Host memory of one VM's process, in MiB."""

    rss_mib: float
    pss_mib: float
    uss_mib: float

    @classmethod
    def of_pid(cls, pid: int) -> MemoryUsage:
        info = psutil.Process(pid).memory_full_info()
        mib = float(1 << 20)
        return cls(info.rss / mib, info.pss / mib, info.uss / mib)


def new_vm_id() -> str:
    return secrets.token_hex(4)


class Vm(ABC):
    """One VM and its agent channel."""

    def __init__(self, spec: VmSpec, run_dir: Path, timeouts: TimeoutsConfig,
                 vm_id: str | None = None) -> None:
        self.id = vm_id or new_vm_id()
        self.spec = spec
        self.run_dir = run_dir / self.id
        self.timeouts = timeouts
        self.state = VmState.CREATED
        self.timings = BootTimings()
        self.agent: AgentClient | None = None
        self.control: ControlClient | None = None
        # Current size: starts as the spec's, grows with hot-plug.
        self.cpus = spec.vm.cpus
        self.memory_mib = spec.vm.memory_mib
        self.boot_mem_total_kib = 0  # the guest's MemTotal when its agent first answered
        self.created_at = time.monotonic()
        # Called once the VM is stopped (e.g. to drop its metadata record).
        self.stop_callbacks: list[Callable[[Vm], None]] = []

    def _stopped(self) -> None:
        callbacks, self.stop_callbacks = self.stop_callbacks, []
        for callback in callbacks:
            callback(self)

    def _require(self, operation: str, *allowed: VmState) -> None:
        if self.state not in allowed:
            raise VmStateError(operation, self.state.value)

    async def disconnect_agent(self) -> None:
        """Close the host's agent connections (gRPC and control); idempotent."""
        if self.agent is not None:
            agent, self.agent = self.agent, None
            await agent.close()
        if self.control is not None:
            control, self.control = self.control, None
            await control.close()

    async def hand_over_agent(self) -> None:
        """Close the host's gRPC agent channel so a lessee can open its own: the
        agent socket serves one host client at a time.  The control channel stays."""
        if self.agent is not None:
            agent, self.agent = self.agent, None
            await agent.close()

    @property
    def agent_socket(self) -> Path:
        return self.run_dir / "agent.sock"

    @property
    @abstractmethod
    def pid(self) -> int | None:
        """The process that holds the VM, while it runs."""

    def memory(self) -> MemoryUsage:
        """Host memory used by the VM's process."""
        self._require("memory", VmState.RUNNING, VmState.PAUSED)
        assert self.pid is not None
        return MemoryUsage.of_pid(self.pid)

    @abstractmethod
    async def start(self) -> None:
        """Boot and wait until the agent answers (CREATED -> RUNNING)."""

    @abstractmethod
    async def pause(self) -> None:
        """Stop the vCPUs (RUNNING -> PAUSED)."""

    @abstractmethod
    async def resume(self) -> None:
        """Restart the vCPUs (PAUSED -> RUNNING)."""

    async def hotplug(self, cpus: int, memory_mib: int) -> None:
        """Grow the VM to ``cpus`` vCPUs and ``memory_mib`` MiB (never shrinks)."""
        raise HypervisorError("hot-plug", f"{type(self).__name__} cannot hot-plug")

    async def attach_disk(self, path: Path, serial: str, read_only: bool = True) -> str:
        """Hot-plug a disk image the guest finds by ``serial``; return its device id."""
        raise HypervisorError("attach-disk", f"{type(self).__name__} cannot hot-plug disks")

    async def detach_disk(self, serial: str) -> None:
        """Unplug a disk :meth:`attach_disk` added."""
        raise HypervisorError("detach-disk", f"{type(self).__name__} cannot hot-plug disks")

    @abstractmethod
    async def stop(self) -> None:
        """Shut down and remove every trace; idempotent.

        Any state goes to STOPPED, except FAILED: a VM that failed to start was
        already torn down and keeps saying why it is gone.
        """


class Hypervisor(ABC):
    """Creates VMs of one kind, each with a run directory under ``run_dir``."""

    name: str = "abstract"
    vm_class: type[Vm]

    def __init__(self, run_dir: Path, timeouts: TimeoutsConfig) -> None:
        self.run_dir = run_dir
        self.timeouts = timeouts

    def create_vm(self, spec: VmSpec, vm_id: str | None = None) -> Vm:
        """A new VM in state CREATED; call ``start()`` to boot it."""
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.vm_class(spec, self.run_dir, self.timeouts, vm_id)

    def describe(self) -> dict[str, str]:
        return {"name": self.name}


__all__ = ["BootTimings", "Hypervisor", "MemoryUsage", "Vm", "VmSpec", "VmState"]
