"""The hypervisor plugin interface: what the factory needs from a VM.

A :class:`Vm` moves through :class:`VmState` explicitly (``_set_state``); an
operation guarded by ``@require`` raises :class:`VmStateError` in any other
state.  ``stop()`` is the one idempotent teardown: it undoes everything
``start()`` (or ``adopt()``) set up, in reverse.

Everything above this package is typed to :class:`Hypervisor` and :class:`Vm`;
the plugins are ``qemu`` (the product) and ``process`` (a host-process stand-in
for tests), and only the composition root (``vmfactory.app``) picks one.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import shutil
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import psutil

from vmfactory.agent import AgentClient
from vmfactory.agent.control import ControlClient
from vmfactory.config import TimeoutsConfig, VmConfig
from vmfactory.errors import HypervisorError, InvalidRequest, VmStateError, quote
from vmfactory.hypervisor.proc import processes_under
from vmfactory.util.states import Lifecycle, require
from vmfactory.util.tasks import finish

logger = logging.getLogger(__name__)

T = TypeVar("T")

SERIAL_RE = re.compile(r"^[A-Za-z0-9-]{1,20}$")  # virtio-blk serials hold 20 bytes
# A VM id names the VM's run directory: nothing that could point elsewhere.
VM_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_serial(serial: str) -> None:
    """The rule for disk serials (the guest finds a disk by it), as a request error."""
    if not SERIAL_RE.match(serial):
        raise InvalidRequest(f"serial {quote(serial)} must be 1-20 of [A-Za-z0-9-]")


class VmState(enum.Enum):
    CREATED = "created"
    STANDBY = "standby"    # a clone's process started ahead, waiting for its state
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

    @property
    def is_clone(self) -> bool:
        """Whether a VM of this spec is restored from a template rather than booted."""
        return self.incoming is not None

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
    """Milliseconds from process spawn (from ``start()`` for a clone whose QEMU
    stood by: ``standby``), plus the guest's own uptime milestones."""

    qemu_start_ms: float = 0.0
    restore_ms: float = 0.0
    agent_ready_ms: float = 0.0
    guest_init_s: float = 0.0
    guest_agent_ready_s: float = 0.0
    standby: bool = False

    def as_dict(self) -> dict[str, float | bool]:
        return {k: v if isinstance(v, bool) else round(v, 3) for k, v in asdict(self).items()}


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


@dataclass
class DiskImage:
    """An image file opened for a VM: the hypervisor gets this descriptor, never
    the path, so the file that was checked is the file that is attached."""

    path: Path  # what the caller named, for messages and logs
    fd: int
    writable: bool = False

    @classmethod
    def open_own(cls, path: Path, writable: bool = False) -> DiskImage:
        """One of the factory's own files (the guest image): no policy to apply."""
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            return cls(path, os.open(path, flags), writable)
        except OSError as exc:
            raise HypervisorError("attach-disk", f"cannot open {path}: {exc.strerror}") from exc

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def make_run_dir(path: Path, *, fresh: bool = False) -> None:
    """A run directory: root's, and only traversable by others (mode 0711), so a
    lessee reaches its VM's agent socket (granted to it) and nothing else.
    ``fresh``: a VM's own directory, which must not exist yet."""
    path.mkdir(mode=0o711, parents=True, exist_ok=not fresh)
    os.chmod(path, 0o711)


# What the hypervisor's processes create (sockets, logs) is root's alone until granted.
VM_UMASK = 0o077


def new_vm_id() -> str:
    return secrets.token_hex(4)


LIVE = (VmState.RUNNING, VmState.PAUSED)


class Vm(Lifecycle[VmState], ABC):
    """One VM and its agent channel."""

    def __init__(self, spec: VmSpec, run_dir: Path, timeouts: TimeoutsConfig,
                 vm_id: str | None = None) -> None:
        self.id = vm_id or new_vm_id()
        self.spec = spec
        self.run_dir = run_dir / self.id
        self.timeouts = timeouts
        self._set_state(VmState.CREATED)
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

    def _state_error(self, operation: str) -> Exception:
        return VmStateError(operation, self.state.value)

    def _remove_run_dir(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _lifecycle_name(self) -> str:
        return f"vm {self.id}"

    def _stopped(self) -> None:
        """STOPPED, then the stop callbacks; every callback runs even if one fails,
        and the first failure is raised after all of them."""
        self._set_state(VmState.STOPPED)
        callbacks, self.stop_callbacks = self.stop_callbacks, []
        first: Exception | None = None
        for callback in callbacks:
            try:
                callback(self)
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the others ran
                logger.error("vm %s: stop callback failed: %s", self.id, exc)
                first = first or exc
        if first is not None:
            raise first

    @property
    def alive(self) -> bool:
        """Whether the VM's process runs and the VM is running or paused."""
        return self.pid is not None and self.state in LIVE

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

    def set_priority(self, nice: int) -> None:
        """The CPU priority of every thread of the VM's process (QEMU's vCPU and I/O
        threads alike): a VM being made for a pool runs at ``nice`` 19, so it yields
        to the VMs in use; it gets 0 back when it is handed out."""
        pid = self.pid
        if pid is None:
            return
        try:
            threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            return  # gone: the health loop deals with it
        for tid in threads:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            except (ProcessLookupError, PermissionError):
                pass  # that thread ended meanwhile; raising needs root, which the daemon is

    @require(*LIVE, VmState.STANDBY)
    def memory(self) -> MemoryUsage:
        """Host memory used by the VM's process."""
        assert self.pid is not None
        return MemoryUsage.of_pid(self.pid)

    @abstractmethod
    async def start(self) -> None:
        """Boot and wait until the agent answers (CREATED or STANDBY -> RUNNING)."""

    async def stand_by(self) -> None:
        """Start the process of a clone ahead of its restore (CREATED -> STANDBY),
        so :meth:`start` costs only the restore; hypervisors with
        ``supports_standby`` implement it."""
        raise HypervisorError("standby", f"{type(self).__name__} cannot stand by")

    @abstractmethod
    async def adopt(self, pid: int) -> None:
        """Take over the process ``pid`` an earlier daemon started for this VM
        (CREATED -> RUNNING or PAUSED, as it is found); its agent must answer."""

    async def save_state(self, state: Path) -> None:
        """Pause and save device state to ``state`` (guest RAM stays in its memory
        file): what a template is made of."""
        raise HypervisorError("save", f"{type(self).__name__} cannot save its state")

    @abstractmethod
    async def pause(self) -> None:
        """Stop the vCPUs (RUNNING -> PAUSED)."""

    @abstractmethod
    async def resume(self) -> None:
        """Restart the vCPUs (PAUSED -> RUNNING)."""

    async def hotplug(self, cpus: int, memory_mib: int) -> None:
        """Grow the VM to ``cpus`` vCPUs and ``memory_mib`` MiB (never shrinks)."""
        raise HypervisorError("hot-plug", f"{type(self).__name__} cannot hot-plug")

    async def attach_disk(self, disk: DiskImage, serial: str) -> str:
        """Hot-plug ``disk`` (the hypervisor takes its own copy of the descriptor)
        so the guest finds it by ``serial``; return its device id.
        AlreadyExists if a disk with that serial is attached."""
        raise HypervisorError("attach-disk", f"{type(self).__name__} cannot hot-plug disks")

    async def detach_disk(self, serial: str) -> None:
        """Unplug a disk :meth:`attach_disk` added; NotFound if there is none."""
        raise HypervisorError("detach-disk", f"{type(self).__name__} cannot hot-plug disks")

    def grant(self, uid: int) -> None:
        """Give the VM's agent and control sockets to ``uid`` (mode 0600): its lessee
        talks to its guest; nobody else can."""
        for sock in (self.agent_socket, self.run_dir / "ctl.sock"):
            if sock.exists():
                os.chown(sock, uid, -1)
                os.chmod(sock, 0o600)

    async def stop(self) -> None:
        """Shut down and remove every trace; idempotent.

        Any state goes to STOPPED, except FAILED: a VM that failed to start was
        already torn down and keeps saying why it is gone.
        """
        if self.state in (VmState.CREATED, VmState.STOPPED, VmState.FAILED):
            if self.state is VmState.CREATED:
                self._set_state(VmState.STOPPED)
            return
        self._set_state(VmState.STOPPING)
        try:
            await finish(self._teardown(graceful=True))
        finally:
            self._stopped()

    async def _starting(self, setup: Awaitable[T]) -> T:
        """Run ``setup`` (a start or an adopt) in STARTING; if it fails or is
        cancelled, tear down what it made (FAILED) and re-raise."""
        self._set_state(VmState.STARTING)
        try:
            return await setup
        except BaseException:
            self._set_state(VmState.FAILED)
            await finish(self._teardown(graceful=False))
            raise

    @abstractmethod
    async def _teardown(self, graceful: bool) -> None:
        """Undo the set-up in reverse: agent channels, the process, the run directory.
        ``graceful``: ask the VM to exit before it is killed."""


class Hypervisor(ABC):
    """Creates VMs of one kind, each with a run directory under ``run_dir``."""

    name: str = "abstract"
    vm_class: type[Vm]
    # A word in the command line of every VM process this plugin starts.
    process_marker: str = ""
    # Whether its VMs can be started ahead of a clone's restore (Vm.stand_by).
    supports_standby: bool = False

    def __init__(self, run_dir: Path, timeouts: TimeoutsConfig) -> None:
        self.run_dir = run_dir
        self.timeouts = timeouts

    def create_vm(self, spec: VmSpec, vm_id: str | None = None) -> Vm:
        """A new VM in state CREATED; call ``start()`` to boot it (or ``adopt()``
        the process of the VM ``vm_id`` an earlier daemon started)."""
        if vm_id is not None and not VM_ID_RE.match(vm_id):
            raise HypervisorError("create", f"bad vm id {vm_id[:80]!r}")
        make_run_dir(self.run_dir)
        return self.vm_class(spec, self.run_dir, self.timeouts, vm_id)

    def describe(self) -> dict[str, str]:
        return {"name": self.name}

    def close(self) -> None:
        """Remove ``run_dir`` if no VM is left in it (whoever made the hypervisor
        closes it when done with its VMs)."""
        try:
            self.run_dir.rmdir()
        except OSError:
            pass  # absent, or VMs (an earlier daemon's, to recover) still there

    def vm_processes(self) -> dict[int, str]:
        """pid -> VM id of every live VM process of this plugin under ``run_dir``,
        ours or an earlier daemon's (crash recovery reaps those it cannot adopt)."""
        marker = f"{self.run_dir}/"
        out = {}
        for proc in processes_under(self.run_dir, self.process_marker):
            cmdline = " ".join(proc.info["cmdline"] or [])
            out[proc.info["pid"]] = cmdline.split(marker, 1)[1].split("/", 1)[0]
        return out


__all__ = ["VM_UMASK", "BootTimings", "DiskImage", "make_run_dir", "Hypervisor", "LIVE", "MemoryUsage", "SERIAL_RE", "Vm",
           "VmSpec", "VmState", "check_serial"]
