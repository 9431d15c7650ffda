"""The QEMU hypervisor plugin, driven over QMP with qemu.qmp.

Each VM owns ``<run_dir>/<id>/`` (QMP and agent sockets, QEMU's log, the serial
console log).  QEMU runs in its own session so it can outlive a crashed daemon.
Every wait is bounded by a named timeout; a VM that misses one is killed, its
run directory removed, and the error names the step.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import shutil
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import psutil
from qemu.qmp import ConnectError, QMPClient, QMPError

from vmfactory.agent import AgentClient
from vmfactory.agent.control import ControlClient
from vmfactory.errors import AgentError, HypervisorError
from vmfactory.guest.agent import AGENT_PORT_NAME
from vmfactory.guest.agent.ctlproto import CONTROL_PORT_NAME
from vmfactory.hypervisor.base import Hypervisor, Vm, VmSpec, VmState
from vmfactory.hypervisor.proc import AdoptedProcess, ChildProcess, ProcessHandle

logger = logging.getLogger(__name__)

T = TypeVar("T")

BASE_KERNEL_ARGS = ("console=ttyS0", "panic=-1", "quiet", "loglevel=3")
QMP_RETRY_S = 0.005
MIGRATE_POLL_S = 0.002
MEMORY_BLOCK_MIB = 128
EXIT_SETTLE_S = 0.5
# Memory hot-plug slots reserved in every VM so hot-plug works on clones too.
MEMORY_SLOTS = 8
# PCIe root ports for hot-plugged disks (one container root each); q35 cannot
# hot-plug onto its root bus.  Part of every VM's device set, templates included.
DISK_PORTS = 8
DISK_POLL_S = 0.01
SERIAL_RE = re.compile(r"^[A-Za-z0-9-]{1,20}$")  # virtio-blk serials hold 20 bytes


def qemu_argv(spec: VmSpec, run_dir: Path, name: str) -> list[str]:
    """The QEMU command line for ``spec``; the device set is the same for every VM."""
    vm = spec.vm
    append = " ".join((*BASE_KERNEL_ARGS, *spec.extra_kernel_args, vm.kernel_args)).strip()
    machine = f"q35,accel={spec.accel}"
    memory: list[str] = []
    if spec.memory_path is not None:
        share = "on" if spec.memory_shared else "off"
        memory = ["-object", f"memory-backend-file,id=mem,size={vm.memory_mib}M,"
                             f"mem-path={spec.memory_path},share={share}"]
        machine += ",memory-backend=mem"
    argv = [
        vm.qemu, "-name", f"vmfactory-{name}", "-nodefaults", "-no-user-config",
        "-display", "none", "-no-reboot", *memory,
        "-machine", machine,
        "-cpu", "host" if spec.accel == "kvm" else "max",
        "-smp", f"{vm.cpus},maxcpus={vm.max_cpus}",
        "-m", f"{vm.memory_mib}M,slots={MEMORY_SLOTS},maxmem={vm.max_memory_mib}M",
        "-kernel", str(spec.kernel), "-initrd", str(spec.initrd), "-append", append,
        "-chardev", f"file,id=console,path={run_dir / 'console.log'}",
        "-serial", "chardev:console",
        "-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off",
        "-drive", f"file={spec.rootfs},if=none,id=root,format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=root,id=rootdisk",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agent,path={run_dir / 'agent.sock'},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        "-chardev", f"socket,id=ctl,path={run_dir / 'ctl.sock'},server=on,wait=off",
        "-device", f"virtserialport,chardev=ctl,name={CONTROL_PORT_NAME}",
        "-device", "vmgenid,id=vmgen0",
        *(arg for i in range(DISK_PORTS)
          for arg in ("-device", f"pcie-root-port,id=hp{i},chassis={i + 1},bus=pcie.0")),
        "-pidfile", str(run_dir / "qemu.pid"),
    ]
    if spec.incoming is not None:
        argv += ["-incoming", "defer", "-S"]  # stay paused after the restore: we cont
    return argv


def last_line(path: Path, marker: str = "") -> str:
    """The last non-empty line of a log (the last one containing ``marker``, if given)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and marker in ln]
    return lines[-1][-300:] if lines else ""


class QemuVm(Vm):
    """A VM in a QEMU process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._proc: ProcessHandle | None = None
        self._qmp: QMPClient | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    async def start(self) -> None:
        self._require("start", VmState.CREATED)
        self.state = VmState.STARTING
        t0 = time.monotonic()
        try:
            self._check_inputs()
            self.run_dir.mkdir(mode=0o700, parents=True)
            await self._spawn()
            await self._guarded("qmp-connect", self._connect_qmp(), self.timeouts.qemu_start)
            self.timings.qemu_start_ms = (time.monotonic() - t0) * 1000
            if self.spec.incoming is not None:
                await self._guarded("restore", self._restore(self.spec.incoming),
                                    self.timeouts.migrate)
                self.timings.restore_ms = (time.monotonic() - t0) * 1000
            await self._wait_agent()
            self.timings.agent_ready_ms = (time.monotonic() - t0) * 1000
        except BaseException:
            self.state = VmState.FAILED
            await self._teardown()
            raise
        self.state = VmState.RUNNING
        logger.info("vm %s running (pid %s, agent ready in %.0f ms)", self.id, self.pid,
                    self.timings.agent_ready_ms)

    async def adopt(self, pid: int) -> None:
        """Take over the QEMU an earlier daemon started for this VM (CREATED ->
        RUNNING or PAUSED, as QEMU reports it).  The agent must answer."""
        self._require("adopt", VmState.CREATED)
        self.state = VmState.STARTING
        try:
            self._proc = _adoptable(pid, self.run_dir)
            await self._guarded("qmp-connect", self._connect_qmp(), self.timeouts.qemu_start)
            paused = (await self.qmp("query-status"))["status"] == "paused"
            if paused:
                await self.qmp("cont")  # the agent answers only while the vCPUs run
            await self._wait_agent()
            if paused:
                await self.qmp("stop")
        except BaseException:
            self.state = VmState.FAILED
            await self._teardown()
            raise
        self.state = VmState.PAUSED if paused else VmState.RUNNING
        logger.info("vm %s adopted (pid %d, %s)", self.id, pid, self.state.value)

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
                start_new_session=True))

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
        """The agent is ready when its control loop answers and its gRPC server
        listens.  The gRPC channel itself connects on first use: a template's
        guest must be saved without a gRPC session, and a clone's first gRPC
        call pays for TCG translating that path."""
        control = ControlClient(str(self.run_dir / "ctl.sock"), self.timeouts.agent_call)
        self.control = control
        await self._guarded("agent-ready", control.connect(), self.timeouts.agent_call)
        timeout = self.timeouts.agent_ready
        status = await self._guarded("agent-ready", control.wait_ready(timeout), timeout + 1)
        self.boot_mem_total_kib = status["mem_total_kib"]
        boot = status["boot"]
        self.timings.guest_init_s = boot.get("init_start_s", 0.0)
        self.timings.guest_agent_ready_s = boot.get("agent_ready_s", 0.0)
        self.agent = AgentClient(f"unix:{self.agent_socket}", self.timeouts.agent_call)

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
                # A channel that broke is usually QEMU exiting: name that instead.
                await self._settle_exit()
                if self._proc.returncode is not None:
                    raise HypervisorError(step, f"QEMU exited with code {self._proc.returncode}: "
                                                f"{self._exit_reason()}") from exc
                raise HypervisorError(step, str(exc)) from exc
        if exited in done:
            raise HypervisorError(step, f"QEMU exited with code {self._proc.returncode}: "
                                        f"{self._exit_reason()}")
        raise HypervisorError(step, f"timed out after {timeout:g} s")

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

    async def _migration_done(self, step: str) -> None:
        while True:
            status = (await self.qmp("query-migrate")).get("status", "none")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise HypervisorError(step, f"migration {status}: {self._exit_reason()}")
            await asyncio.sleep(MIGRATE_POLL_S)

    async def _restore(self, state: Path) -> None:
        if not state.is_file() or state.stat().st_size == 0:
            raise HypervisorError("restore", f"device state file missing or empty: {state}")
        await self.qmp("migrate-set-capabilities",
                       capabilities=[{"capability": "x-ignore-shared", "state": True}])
        await self.qmp("migrate-incoming", uri=f"exec:cat {shlex.quote(str(state))}")
        await self._migration_done("restore")
        await self.qmp("cont")

    async def save_state(self, state: Path) -> None:
        """Pause and write device state (not RAM: it stays in the memory file) to ``state``."""
        self._require("save", VmState.RUNNING, VmState.PAUSED)
        if self.state is VmState.RUNNING:
            await self.pause()
        await self.qmp("migrate-set-capabilities",
                       capabilities=[{"capability": "x-ignore-shared", "state": True}])
        await self.qmp("migrate", uri=f"exec:cat > {shlex.quote(str(state))}")
        await asyncio.wait_for(self._migration_done("save"), self.timeouts.migrate)

    async def hotplug(self, cpus: int, memory_mib: int) -> None:
        self._require("hot-plug", VmState.RUNNING, VmState.PAUSED)
        vm = self.spec.vm
        if cpus > vm.max_cpus or memory_mib > vm.max_memory_mib:
            raise HypervisorError("hot-plug", f"{cpus} vCPUs / {memory_mib} MiB exceeds the "
                                              f"VM's maximum {vm.max_cpus} / {vm.max_memory_mib}")
        if cpus > self.cpus:
            await self._plug_cpus(cpus - self.cpus)
        if memory_mib > self.memory_mib:
            await self._plug_memory(memory_mib - self.memory_mib)

    async def _plug_cpus(self, count: int) -> None:
        slots = [s for s in await self.qmp("query-hotpluggable-cpus") if "qom-path" not in s]
        if len(slots) < count:
            raise HypervisorError("hot-plug", f"only {len(slots)} free vCPU slots, need {count}")
        for slot in sorted(slots, key=lambda s: sorted(s["props"].items()))[:count]:
            await self.qmp("device_add", driver=slot["type"], id=f"cpu{self.cpus}",
                           **slot["props"])
            self.cpus += 1

    async def _plug_memory(self, mib: int) -> None:
        # The guest onlines memory in 128 MiB blocks: a smaller DIMM would be wasted.
        size = -(-mib // MEMORY_BLOCK_MIB) * MEMORY_BLOCK_MIB
        index = self.memory_mib
        await self.qmp("object-add", **{"qom-type": "memory-backend-ram", "id": f"hpmem{index}",
                                        "size": size << 20})
        await self.qmp("device_add", driver="pc-dimm", id=f"dimm{index}", memdev=f"hpmem{index}")
        self.memory_mib += size

    async def attach_disk(self, path: Path, serial: str, read_only: bool = True) -> str:
        """Hot-plug ``path`` as a virtio-blk disk the guest finds by ``serial``;
        return the device id."""
        self._require("attach-disk", VmState.RUNNING, VmState.PAUSED)
        if not SERIAL_RE.match(serial):
            raise HypervisorError("attach-disk", f"serial {serial!r} must match {SERIAL_RE.pattern}")
        if not path.is_file():
            raise HypervisorError("attach-disk", f"disk image not found: {path}")
        node = f"disk-{serial}"
        await self.qmp("blockdev-add", **{
            "node-name": node, "driver": "raw", "read-only": read_only,
            "file": {"driver": "file", "filename": str(path), "read-only": read_only}})
        try:
            await self._plug_disk(node, serial)
        except BaseException:
            await asyncio.shield(self._drop_node(node))
            raise
        return node

    async def _plug_disk(self, node: str, serial: str) -> None:
        for port in range(DISK_PORTS):
            try:
                # addr 0: a root port has one slot; without it QEMU would put a
                # second device on another slot of a taken port, which the guest
                # never scans, instead of refusing.
                await self.qmp("device_add", driver="virtio-blk-pci", drive=node, id=node,
                               bus=f"hp{port}", addr="0", serial=serial)
                return
            except HypervisorError as exc:
                if "not available" not in str(exc):  # that port is taken: try the next
                    raise
        raise HypervisorError("attach-disk", f"all {DISK_PORTS} disk ports are in use")

    async def _drop_node(self, node: str, deadline: float = 0.0) -> None:
        """Delete a block node; the unplugged device lets go of it a moment after
        it left the device tree, so "in use" is retried until ``deadline``."""
        while True:
            try:
                await self.qmp("blockdev-del", **{"node-name": node})
                return
            except HypervisorError as exc:
                if "in use" in str(exc) and time.monotonic() < deadline:
                    await asyncio.sleep(DISK_POLL_S)
                    continue
                logger.warning("vm %s: blockdev-del %s: %s", self.id, node, exc)
                return

    async def detach_disk(self, serial: str) -> None:
        """Unplug a disk attach_disk added; the guest must have unmounted it."""
        self._require("detach-disk", VmState.RUNNING, VmState.PAUSED)
        node = f"disk-{serial}"
        await self.qmp("device_del", id=node)
        deadline = time.monotonic() + self.timeouts.hotplug
        while any(d["name"] == node for d in await self.qmp("qom-list", path="/machine/peripheral")):
            if time.monotonic() > deadline:
                raise HypervisorError("detach-disk", f"the guest did not release {node} within "
                                                     f"{self.timeouts.hotplug:g} s")
            await asyncio.sleep(DISK_POLL_S)
        await self._drop_node(node, deadline)

    async def pause(self) -> None:
        self._require("pause", VmState.RUNNING)
        await self.qmp("stop")
        self.state = VmState.PAUSED

    async def resume(self) -> None:
        self._require("resume", VmState.PAUSED)
        await self.qmp("cont")
        self.state = VmState.RUNNING

    async def stop(self) -> None:
        if self.state in (VmState.STOPPED, VmState.FAILED, VmState.CREATED):
            self.state = VmState.STOPPED if self.state != VmState.FAILED else self.state
            return
        self.state = VmState.STOPPING
        try:
            await self._teardown(graceful=True)
        finally:
            self.state = VmState.STOPPED
            self._stopped()

    async def _teardown(self, graceful: bool = False) -> None:
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
        shutil.rmtree(self.run_dir, ignore_errors=True)

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

    def create_vm(self, spec: VmSpec, vm_id: str | None = None) -> QemuVm:
        vm = super().create_vm(spec, vm_id)
        assert isinstance(vm, QemuVm)
        return vm
