"""A VM in a QEMU process: spawn, connect QMP, wait for the agent, adopt, stop.

Each VM owns ``<run_dir>/<id>/`` (QMP and agent sockets, QEMU's log, the serial
console log).  QEMU runs in its own session so it can outlive a crashed daemon.
Every wait is bounded by a named timeout; a VM that misses one is killed, its
run directory removed, and the error names the step.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import psutil
from qemu.qmp import ConnectError, QMPClient, QMPError

from vmfactory.agent import AgentClient
from vmfactory.agent.control import ControlClient
from vmfactory.errors import AgentError, AlreadyExists, HypervisorError, NotFound, quote
from vmfactory.hypervisor.base import (
    LIVE, VM_UMASK, DiskImage, Hypervisor, Vm, VmState, make_run_dir,
)
from vmfactory.hypervisor.proc import QEMU_MARKER, AdoptedProcess, ChildProcess, ProcessHandle
from vmfactory.hypervisor.qemu import hotplug, migration
from vmfactory.hypervisor.qemu.argv import last_line, qemu_argv
from vmfactory.util.states import require

logger = logging.getLogger(__name__)

T = TypeVar("T")

QMP_RETRY_S = 0.005
EXIT_SETTLE_S = 0.5


class QemuVm(Vm):
    """A VM in a QEMU process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._proc: ProcessHandle | None = None
        self._qmp: QMPClient | None = None
        self._disks: dict[str, hotplug.PluggedDisk] = {}
        # Passing a descriptor and the add-fd that takes it must not interleave.
        self._disk_lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    # -- process lifecycle ---------------------------------------------------
    @require(VmState.CREATED)
    async def stand_by(self) -> None:
        if self.spec.incoming is None:
            raise HypervisorError("standby", "only a clone (a spec with incoming state) "
                                             "can stand by")
        await self._starting(self._launch())
        self._set_state(VmState.STANDBY)

    @require(VmState.CREATED, VmState.STANDBY)
    async def start(self) -> None:
        launched = self.state is VmState.STANDBY
        await self._starting(self._boot(launched))
        self._set_state(VmState.RUNNING)
        logger.info("vm %s running (pid %s, agent ready in %.0f ms%s)", self.id, self.pid,
                    self.timings.agent_ready_ms, ", QEMU started ahead" if launched else "")

    async def _launch(self) -> None:
        """Spawn QEMU and connect QMP (a clone's QEMU then waits in -incoming defer)."""
        t0 = time.monotonic()
        self._check_inputs()
        make_run_dir(self.run_dir, fresh=True)
        await self._spawn()
        await self._guarded("qmp-connect", self._connect_qmp(), self.timeouts.qemu_start)
        self.timings.qemu_start_ms = (time.monotonic() - t0) * 1000

    async def _boot(self, launched: bool) -> None:
        """From spawn (or, ``launched``, from a standby QEMU) to the agent answering;
        the timings count from here, so a standby clone's qemu_start_ms is 0."""
        t0 = time.monotonic()
        if launched:
            self.timings.qemu_start_ms = 0.0
            self.timings.standby = True
        else:
            await self._launch()
        if self.spec.incoming is not None:
            await self._guarded("restore", migration.restore(
                self.qmp, self.spec.incoming, self._exit_reason), self.timeouts.migrate)
            self.timings.restore_ms = (time.monotonic() - t0) * 1000
        await self._wait_agent()
        self.timings.agent_ready_ms = (time.monotonic() - t0) * 1000

    @require(VmState.CREATED)
    async def adopt(self, pid: int) -> None:
        paused = await self._starting(self._take_over(pid))
        self._set_state(VmState.PAUSED if paused else VmState.RUNNING)
        logger.info("vm %s adopted (pid %d, %s)", self.id, pid, self.state.value)

    async def _take_over(self, pid: int) -> bool:
        """Connect to the QEMU ``pid`` and its agent; whether its vCPUs were stopped."""
        self._proc = _adoptable(pid, self.run_dir)
        await self._guarded("qmp-connect", self._connect_qmp(), self.timeouts.qemu_start)
        self._disks = await hotplug.plugged_disks(self.qmp)
        paused = bool((await self.qmp("query-status"))["status"] == "paused")
        if paused:
            await self.qmp("cont")  # the agent answers only while the vCPUs run
        await self._wait_agent()
        if paused:
            await self.qmp("stop")
        return paused

    def _check_inputs(self) -> None:
        for what, path in (("kernel", self.spec.kernel), ("initrd", self.spec.initrd),
                           ("root image", self.spec.rootfs)):
            if not path.is_file():
                raise HypervisorError("qemu-start", f"{what} not found: {path}")
        host_mib = psutil.virtual_memory().total >> 20
        if self.spec.vm.memory_mib > host_mib:
            raise HypervisorError("qemu-start", f"memory_mib {self.spec.vm.memory_mib} exceeds "
                                                f"host memory ({host_mib} MiB)")
        if shutil.which(self.spec.vm.qemu) is None:
            raise HypervisorError("qemu-start", f"QEMU binary not found: {self.spec.vm.qemu}")

    async def _spawn(self) -> None:
        argv = qemu_argv(self.spec, self.run_dir, self.id)
        logger.debug("vm %s: %s", self.id, " ".join(argv))
        with open(self.run_dir / "qemu.log", "wb") as log:
            self._proc = ChildProcess(await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, umask=VM_UMASK))

    async def _connect_qmp(self) -> None:
        while not self.qmp_socket.exists():
            await asyncio.sleep(QMP_RETRY_S)
        while True:
            qmp = QMPClient(f"vm-{self.id}")
            # A refused attempt is expected while QEMU starts, and retried: keep the
            # library from logging each one as an ERROR.
            qmp.logger.setLevel(logging.CRITICAL)
            try:
                await qmp.connect(str(self.qmp_socket))
            except ConnectError:
                await asyncio.sleep(QMP_RETRY_S)
                continue
            finally:
                qmp.logger.setLevel(logging.NOTSET)
            self._qmp = qmp
            return

    async def _wait_agent(self) -> None:
        """The agent is ready when its control loop answers and its ttrpc server
        serves.  The agent channel itself connects on first use: a template's
        guest must be saved without a host on it, and a clone's first agent
        call pays for TCG translating that path."""
        control = ControlClient(str(self.run_dir / "ctl.sock"), self.timeouts.agent_call)
        self.control = control
        await self._guarded("agent-ready", control.connect(), self.timeouts.agent_call)
        timeout = self.timeouts.agent_ready
        if self.spec.incoming is not None:
            # A clone's agent served when its template was saved, so one ping
            # proves it runs again.  Its status (MemTotal, boot milestones) costs
            # a restored guest ~60 ms of first-time translation under TCG: it is
            # asked for only by a hot-plug, which needs it.
            await self._guarded("agent-ready", control.ping(timeout), timeout + 1)
        else:
            self._note_status(await self._guarded("agent-ready", control.wait_ready(timeout),
                                                  timeout + 1))
        self.agent = AgentClient(f"unix:{self.agent_socket}", self.timeouts.agent_call)

    def _note_status(self, status: dict[str, Any]) -> None:
        self.boot_mem_total_kib = status["mem_total_kib"]
        boot = status["boot"]
        self.timings.guest_init_s = boot.get("init_start_s", 0.0)
        self.timings.guest_agent_ready_s = boot.get("agent_ready_s", 0.0)

    async def _guarded(self, step: str, work: Awaitable[T], timeout: float) -> T:
        """Run ``work`` unless QEMU exits first or ``timeout`` passes."""
        assert self._proc is not None
        task = asyncio.ensure_future(work)
        exited = asyncio.ensure_future(self._proc.wait())
        try:
            done, _ = await asyncio.wait({task, exited}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task in done:
            try:
                return task.result()
            except (HypervisorError, AgentError, QMPError, OSError) as exc:
                if isinstance(exc, HypervisorError) and exc.step == step:
                    raise
                raise await self._step_failed(step, exc) from exc
        if exited in done:
            raise HypervisorError(step, f"QEMU exited with code {self._proc.returncode}: "
                                        f"{self._exit_reason()}")
        raise HypervisorError(step, f"timed out after {timeout:g} s")

    async def _step_failed(self, step: str, exc: Exception) -> HypervisorError:
        """The error for a step whose channel broke: usually QEMU exiting, so name that."""
        await self._settle_exit()
        assert self._proc is not None
        if self._proc.returncode is not None:
            return HypervisorError(step, f"QEMU exited with code {self._proc.returncode}: "
                                         f"{self._exit_reason()}")
        return HypervisorError(step, str(exc))

    async def _settle_exit(self) -> None:
        """Give a dying QEMU a moment to be reaped, so its exit can be reported."""
        if self._proc is not None and self._proc.returncode is None:
            try:
                await asyncio.wait_for(self._proc.wait(), EXIT_SETTLE_S)
            except asyncio.TimeoutError:
                pass

    def _exit_reason(self) -> str:
        return (last_line(self.run_dir / "console.log", "vmfactory-init: FAILED")
                or last_line(self.run_dir / "qemu.log")
                or last_line(self.run_dir / "console.log") or "no output")

    async def qmp(self, command: str, **arguments: Any) -> Any:
        """Run one QMP command within the qmp_command timeout."""
        if self._qmp is None:
            raise HypervisorError(command, "no QMP connection")
        try:
            return await asyncio.wait_for(self._qmp.execute(command, arguments or None),
                                          self.timeouts.qmp_command)
        except (QMPError, asyncio.TimeoutError) as exc:
            raise HypervisorError(command, f"QMP {command} failed: {exc!r}") from exc

    # -- running ---------------------------------------------------------------
    @require(VmState.RUNNING)
    async def pause(self) -> None:
        await self.qmp("stop")
        self._set_state(VmState.PAUSED)

    @require(VmState.PAUSED)
    async def resume(self) -> None:
        await self.qmp("cont")
        self._set_state(VmState.RUNNING)

    @require(*LIVE, operation="save")
    async def save_state(self, state: Path) -> None:
        if self.state is VmState.RUNNING:
            await self.pause()
        await migration.save(self.qmp, state, self.timeouts.migrate, self._exit_reason)

    @require(*LIVE, operation="hot-plug")
    async def hotplug(self, cpus: int, memory_mib: int) -> None:
        vm = self.spec.vm
        if cpus > vm.max_cpus or memory_mib > vm.max_memory_mib:
            raise HypervisorError("hot-plug", f"{cpus} vCPUs / {memory_mib} MiB exceeds the "
                                              f"VM's maximum {vm.max_cpus} / {vm.max_memory_mib}")
        if not self.boot_mem_total_kib and self.control is not None:
            # A clone's MemTotal before anything is plugged (see _wait_agent).
            self._note_status(await self.control.status())
        if cpus > self.cpus:
            self.cpus = await hotplug.plug_cpus(self.qmp, self.cpus, cpus - self.cpus)
        if memory_mib > self.memory_mib:
            self.memory_mib += await hotplug.plug_memory(self.qmp, self.memory_mib,
                                                         memory_mib - self.memory_mib)

    @require(*LIVE)
    async def attach_disk(self, disk: DiskImage, serial: str) -> str:
        async with self._disk_lock:
            if serial in self._disks:
                raise AlreadyExists(f"vm {self.id} has a disk with serial {quote(serial)}")
            plugged = await hotplug.attach_disk(self.qmp, self._send_fd, disk, serial)
            self._disks[serial] = plugged
        return plugged.node

    def _send_fd(self, fd: int) -> None:
        if self._qmp is None:
            raise HypervisorError("attach-disk", "no QMP connection")
        self._qmp.send_fd_scm(fd)

    @require(*LIVE)
    async def detach_disk(self, serial: str) -> None:
        async with self._disk_lock:
            plugged = self._disks.get(serial)
            if plugged is None:
                raise NotFound(f"vm {self.id} has no disk with serial {quote(serial)}")
            await hotplug.detach_disk(self.qmp, plugged, self.timeouts.hotplug)
            del self._disks[serial]

    # -- teardown --------------------------------------------------------------
    async def _teardown(self, graceful: bool) -> None:
        """Agent channel, QMP, process, run directory: undone in reverse order of setup."""
        await self.disconnect_agent()
        if graceful and self._qmp is not None and self._proc and self._proc.returncode is None:
            try:
                await asyncio.wait_for(self._qmp.execute("quit"), self.timeouts.qmp_command)
            except (QMPError, asyncio.TimeoutError, EOFError, ConnectionError):
                pass  # QEMU may close the socket before answering; the wait below decides
        if self._qmp is not None:
            qmp, self._qmp = self._qmp, None
            try:
                await qmp.disconnect()
            except (QMPError, EOFError, OSError):
                pass  # the peer is gone already: exactly what teardown wants
        await self._reap(self.timeouts.shutdown if graceful else 0.0)
        self._remove_run_dir()

    async def _reap(self, grace: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None and grace > 0:
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except asyncio.TimeoutError:
                logger.warning("vm %s: QEMU did not exit within %g s, killing it", self.id, grace)
        await proc.kill()


def _adoptable(pid: int, run_dir: Path) -> AdoptedProcess:
    """The process ``pid`` if it is the QEMU of the VM in ``run_dir``."""
    try:
        proc = AdoptedProcess(pid)
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error as exc:
        raise HypervisorError("adopt", f"no process {pid}: {exc}") from exc
    if str(run_dir / "qmp.sock") not in cmdline or proc.returncode is not None:
        raise HypervisorError("adopt", f"process {pid} is not the QEMU of {run_dir}")
    return proc


class QemuHypervisor(Hypervisor):
    """Creates :class:`QemuVm` instances under ``run_dir``."""

    name = "qemu"
    vm_class = QemuVm
    process_marker = QEMU_MARKER
    supports_standby = True
