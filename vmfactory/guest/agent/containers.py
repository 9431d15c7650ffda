"""Containers inside the guest: root disk, overlay, namespaces, processes.

A container's root is the hot-plugged disk (found by its virtio serial),
mounted read-only, under an overlay whose upper layer is a tmpfs of its own.
Everything lives under ``/run/vmfactory/containers/<id>`` in the agent's mount
namespace; the container's own proc/dev mounts live in its namespace only.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import re
import shutil
import signal
import time
from pathlib import Path

from vmfactory.guest.agent import linux, staging
from vmfactory.guest.agent.errors import (
    AgentStateError, AlreadyExists, BadRequest, ExecFailed, NoSuchContainer, Timeout,
)
from vmfactory.guest.agent.launch import Launcher, LaunchPlan, ProcessPlan
from vmfactory.guest.agent.process import GuestProcess, Stdio
from vmfactory.util.states import Lifecycle, require

logger = logging.getLogger(__name__)

BASE = Path("/run/vmfactory/containers")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DISK_POLL_S = 0.005
MAX_DISK_TIMEOUT_S = 60.0
SETUP_TIMEOUT_S = 10.0
KILL_TIMEOUT_S = 5.0
TMPFS_OPTS = "mode=0755,size=50%"


class ContainerState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"


def check_id(kind: str, value: str) -> None:
    if not ID_RE.match(value):
        raise BadRequest(f"{kind} {value!r} must match {ID_RE.pattern}")


def find_disk(serial: str) -> Path | None:
    for dev in Path("/sys/block").iterdir():
        try:
            if (dev / "serial").read_text().strip() == serial:
                return Path("/dev") / dev.name
        except OSError:
            continue  # not a virtio disk, or going away
    return None


def _opens(device: Path) -> bool:
    """Whether ``device`` can be opened yet: its node appears a moment before the
    kernel finishes adding the disk, and until then opening it (or mounting it)
    fails with ENXIO."""
    try:
        os.close(os.open(device, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENOENT, errno.ENODEV):
            return False
        raise
    return True


async def wait_disk(serial: str, timeout: float) -> Path:
    deadline = time.monotonic() + min(timeout or SETUP_TIMEOUT_S, MAX_DISK_TIMEOUT_S)
    while (device := find_disk(serial)) is None or not _opens(device):
        if time.monotonic() > deadline:
            raise Timeout(f"no disk with serial {serial!r} appeared within {timeout:g} s")
        await asyncio.sleep(DISK_POLL_S)
    return device


class Container(Lifecycle[ContainerState]):
    """One container: its mounts, its init process and the processes exec'd into it.

    Its state is derived from its init process (created until started, stopped
    once the init exited), so it changes without ``_set_state``."""

    def __init__(self, container_id: str, workdir: Path) -> None:
        self.id = container_id
        self.workdir = workdir
        self.mounts: list[str] = []
        self.init: GuestProcess | None = None
        self.execs: dict[str, GuestProcess] = {}
        self.start_w = -1
        self.cgroup = ""  # its cgroup directory, when the bundle limits resources

    @property
    def rootfs(self) -> Path:
        return self.workdir / "rootfs"

    def _state_error(self, operation: str) -> Exception:
        return AgentStateError(f"container {self.id} is {self.state.value}: cannot {operation}")

    @property
    def state(self) -> ContainerState:  # type: ignore[override]
        if self.init is None or self.init.exited.done():
            return ContainerState.STOPPED
        return ContainerState.RUNNING if self.start_w < 0 else ContainerState.CREATED

    @require(ContainerState.CREATED)
    async def start(self) -> None:
        """Let the init run the program; its exec error, if the program could not run."""
        init = self.init
        assert init is not None
        t0 = time.monotonic()
        os.write(self.start_w, b"\x01")
        os.close(self.start_w)
        self.start_w = -1
        failed = await init.exec_error()
        if failed is not None:
            raise failed
        logger.info("container %s started in %.0f ms", self.id, (time.monotonic() - t0) * 1000)

    @require(ContainerState.RUNNING)
    async def exec(self, launcher: Launcher, exec_id: str, process: ProcessPlan,
                   relay: bool, rows: int, cols: int) -> GuestProcess:
        """Start another process in the container's namespaces."""
        if exec_id in self.execs:
            raise AlreadyExists(f"process {exec_id!r} exists in container {self.id}")
        stdio = Stdio.open(relay, process.terminal, rows, cols)
        proc = GuestProcess(self.id, exec_id, stdio)
        status_r, status_w = os.pipe()
        err_r, err_w = os.pipe()
        plan = _plan(process, stdio, status_w, err_w)
        assert self.init is not None
        plan.join_pid, plan.cgroup = self.init.pid, self.cgroup
        proc.launch(launcher, plan, status_r, err_r)
        failed = await proc.exec_error()
        if failed is not None:
            await proc.exited
            proc.close()
            raise failed
        # Its PID (the monitor's "P") may come just after the exec itself.
        await asyncio.wait({proc.started, proc.exited}, return_when=asyncio.FIRST_COMPLETED)
        if not proc.started.done() or proc.started.exception() is not None:
            proc.close()
            raise ExecFailed(f"process {exec_id} in container {self.id} did not start")
        self.execs[exec_id] = proc
        return proc

    def process(self, exec_id: str) -> GuestProcess:
        proc = self.init if not exec_id else self.execs.get(exec_id)
        if proc is None:
            raise NoSuchContainer(f"container {self.id} has no process {exec_id!r}")
        return proc

    def mount_root(self, device: Path) -> None:
        lower, rw = self.workdir / "lower", self.workdir / "rw"
        for d in (lower, rw, self.rootfs):
            d.mkdir(parents=True)
        self._mount(str(device), lower, "ext4", linux.MS_RDONLY, None)
        self._mount("tmpfs", rw, "tmpfs", 0, TMPFS_OPTS)
        (rw / "upper").mkdir()
        (rw / "work").mkdir()
        self._mount("overlay", self.rootfs, "overlay", 0,
                    f"lowerdir={lower},upperdir={rw}/upper,workdir={rw}/work")

    def mount_disk(self, device: Path, target: Path) -> None:
        """A read-only disk for one of the bundle's mounts (a directory bind)."""
        self._mount(str(device), target, "ext4", linux.MS_RDONLY, None)

    def _mount(self, source: str, target: Path, fstype: str, flags: int, data: str | None) -> None:
        try:
            linux.mount(source, str(target), fstype, flags, data)
        except OSError as exc:
            raise ExecFailed(f"container {self.id}: cannot mount {fstype} on {target}: "
                             f"{exc.strerror}") from exc
        self.mounts.append(str(target))

    def unmount(self) -> None:
        """Undo mount_root in reverse; leaves nothing under the work directory."""
        while self.mounts:
            target = self.mounts.pop()
            try:
                linux.umount(target, linux.MNT_DETACH)
            except OSError as exc:
                logger.warning("container %s: umount %s: %s", self.id, target, exc)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _plan(process: ProcessPlan, stdio: Stdio, status_w: int, err_w: int) -> LaunchPlan:
    return LaunchPlan(process=process, stdin=stdio.child[0], stdout=stdio.child[1],
                      stderr=stdio.child[2], status_fd=status_w, exec_err_fd=err_w)


class ContainerManager:
    """Every container of this guest, by id."""

    def __init__(self, launcher: Launcher, base: Path = BASE) -> None:
        self.launcher = launcher
        self.base = base
        self.containers: dict[str, Container] = {}

    def get(self, container_id: str) -> Container:
        container = self.containers.get(container_id)
        if container is None:
            raise NoSuchContainer(f"no container {container_id!r}")
        return container

    async def create(self, container_id: str, serial: str, hostname: str,
                     process: ProcessPlan, stdio_relay: bool, rows: int, cols: int,
                     disk_timeout: float, setup: staging.Setup | None = None) -> Container:
        check_id("container id", container_id)
        if container_id in self.containers:
            raise AlreadyExists(f"container {container_id!r} exists")
        container = Container(container_id, self.base / container_id)
        self.containers[container_id] = container
        t0 = time.monotonic()
        try:
            device = await wait_disk(serial, disk_timeout)
            container.mount_root(device)
            setup = setup or staging.Setup()
            await staging.stage(container, setup, lambda serial: wait_disk(serial, disk_timeout))
            container.cgroup = setup.cgroup
            await self._launch_init(container, hostname, process, stdio_relay, rows, cols, setup)
        except BaseException:
            await self._discard(container)
            raise
        logger.info("container %s created in %.0f ms (init pid %d)", container_id,
                    (time.monotonic() - t0) * 1000, container.init.pid)
        return container

    async def _launch_init(self, container: Container, hostname: str, process: ProcessPlan,
                           relay: bool, rows: int, cols: int, setup: staging.Setup) -> None:
        stdio = Stdio.open(relay, process.terminal, rows, cols)
        proc = GuestProcess(container.id, "", stdio)
        container.init = proc
        status_r, status_w = os.pipe()
        err_r, err_w = os.pipe()
        start_r, container.start_w = os.pipe()
        plan = _plan(process, stdio, status_w, err_w)
        plan.root, plan.hostname, plan.start_fd = str(container.rootfs), hostname, start_r
        plan.mounts, plan.masked_paths = setup.mounts, setup.masked_paths
        plan.readonly_paths, plan.sysctl, plan.cgroup = (setup.readonly_paths, setup.sysctl,
                                                         setup.cgroup)
        proc.launch(self.launcher, plan, status_r, err_r)
        # Both the monitor's "P" (the init's PID) and the init's "R" (root ready).
        ready = asyncio.ensure_future(asyncio.gather(asyncio.shield(proc.started),
                                                     asyncio.shield(proc.root_ready)))
        done, _ = await asyncio.wait({ready, proc.exited}, timeout=SETUP_TIMEOUT_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        if ready not in done or ready.exception() is not None:
            ready.cancel()
            failed = await proc.exec_error() if proc.exited.done() else None
            raise failed or ExecFailed(f"container {container.id}: init did not start in time")

    async def start(self, container_id: str) -> None:
        await self.get(container_id).start()

    async def exec(self, container_id: str, exec_id: str, process: ProcessPlan,
                   relay: bool, rows: int, cols: int) -> GuestProcess:
        container = self.get(container_id)
        check_id("exec id", exec_id)
        return await container.exec(self.launcher, exec_id, process, relay, rows, cols)

    def signal(self, container_id: str, exec_id: str, sig: int, every: bool) -> None:
        container = self.get(container_id)
        if not 0 < sig < signal.NSIG:
            raise BadRequest(f"signal {sig} is out of range")
        if every:
            for pid in self.guest_pids(container):
                with contextlib.suppress(ProcessLookupError):  # exited since it was listed
                    os.kill(pid, sig)
            return
        container.process(exec_id).signal(sig)

    def guest_pids(self, container: Container) -> list[int]:
        """Guest PIDs of every process in the container's PID namespace, init last."""
        init = container.init
        if init is None or init.exited.done() or not init.pid:
            return []
        try:
            ns = os.readlink(f"/proc/{init.pid}/ns/pid")
        except OSError:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != init.pid:
                try:
                    if os.readlink(f"/proc/{entry}/ns/pid") == ns:
                        pids.append(int(entry))
                except OSError:
                    continue  # exited meanwhile
        return pids + [init.pid]

    async def remove(self, container_id: str, force: bool) -> None:
        container = self.get(container_id)
        if container.state is ContainerState.RUNNING and not force:
            raise AgentStateError(f"container {container_id} is running (use force)")
        await self._discard(container)
        logger.info("container %s removed", container_id)

    async def _discard(self, container: Container) -> None:
        """Kill what runs, close every fd, unmount: the container leaves no trace."""
        if container.start_w >= 0:
            os.close(container.start_w)  # init sees EOF and exits without running anything
            container.start_w = -1
        procs = [p for p in (container.init, *container.execs.values()) if p is not None]
        if container.init is not None and container.init.pid and not container.init.exited.done():
            # Gone already (its exit report is on its way): nothing to kill.
            with contextlib.suppress(ProcessLookupError):
                os.kill(container.init.pid, signal.SIGKILL)  # takes the whole PID namespace
        for proc in procs:
            if proc.pid:
                try:
                    await asyncio.wait_for(asyncio.shield(proc.exited), KILL_TIMEOUT_S)
                except asyncio.TimeoutError:
                    logger.warning("container %s: %s did not exit", container.id, proc.name)
            proc.close()
        await staging.remove_cgroup(container.cgroup)
        container.unmount()
        self.containers.pop(container.id, None)
