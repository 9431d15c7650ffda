"""A container in a sandbox: its root disk, its first process, exec'd processes.

A container gets what it needs from its sandbox as a :class:`ContainerHost`
(the agent connection, the VM, the shim, the records), not the sandbox itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime_client.bundles import Bundle, ImageCache, ProcessSpec, find_executable
from runtime_client.bundles.requests import Disks, container_setup, process_request
from runtime_client.errors import ContainerError, ExecutableNotFound
from runtime_client.records import ClientRecords, check_name
from runtime_client.shims import Shim
from runtime_client.vm import SandboxVm
from vmfactory.agent.client import AgentClient, ContainerSetup, ProcessRequest
from vmfactory.errors import VmFactoryError, quote
from vmfactory.guest.agent.errors import ExecFailed, NoSuchContainer
from vmfactory.util.states import Lifecycle, require
from vmfactory.util.tasks import finish

logger = logging.getLogger(__name__)


class ContainerState(enum.Enum):
    CREATING = "creating"
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ContainerHost:
    """What a container needs from its sandbox."""

    sandbox_id: str
    connect: Callable[[], Awaitable[AgentClient]]   # the agent, through the proxy mode
    machine: Callable[[], Awaitable[SandboxVm]]     # the VM, re-attached if need be
    shared_address: Callable[[], str | None]        # where standalone shims dial
    shim: Shim
    records: ClientRecords
    images: ImageCache
    disk_timeout: float


class Container(Lifecycle[ContainerState]):
    """Made by :meth:`Sandbox.create_container` or loaded from its record."""

    def __init__(self, host: ContainerHost, name: str, serial: str, image: Path,
                 process: ProcessRequest, hostname: str, bundle: str, *,
                 setup: ContainerSetup | None = None, disks: Disks = ()) -> None:
        self.host = host
        self.setup = setup  # only for the create: not recorded
        self.disks = disks  # (serial, image) of the bundle's read-only directory binds
        self.name = name
        self.serial = serial
        self.image = image
        self.process = process
        self.hostname = hostname
        self.bundle = bundle
        self.exit_code: int | None = None
        self.created = time.time()
        self.timings: dict[str, float] = {}
        self._set_state(ContainerState.CREATING)

    def _state_error(self, operation: str) -> Exception:
        return ContainerError(f"container {self.name} is {self.state.value}: cannot {operation}")

    @classmethod
    def prepare(cls, host: ContainerHost, bundle: Bundle, name: str, args: list[str] | None,
                terminal: bool | None, rows: int, cols: int) -> Container:
        spec = bundle.process
        if args:
            spec = spec.with_args(args)
        if terminal is not None:
            spec = spec.with_terminal(terminal)
        if find_executable(bundle, spec.args[0]) is None:
            raise ExecutableNotFound(f"executable {quote(spec.args[0])} not found in the bundle's "
                                     f"root {bundle.rootfs}")
        process = process_request(spec, stdio=host.shim.relays_io, rows=rows, cols=cols)
        image = host.images.image_for(bundle.rootfs)
        setup, disks = container_setup(bundle.confinement, host.images)
        return cls(host, name, "c" + secrets.token_hex(6), image, process,
                   bundle.hostname or name, str(bundle.path), setup=setup, disks=disks)

    @classmethod
    def from_record(cls, host: ContainerHost, record: dict[str, Any]) -> Container:
        p = record["process"]
        process = ProcessRequest(args=tuple(p["args"]), env=tuple(p["env"]), cwd=p["cwd"],
                                 uid=p["uid"], gid=p["gid"], groups=tuple(p["groups"]),
                                 terminal=p["terminal"], stdio=p["stdio"])
        c = cls(host, record["name"], record["serial"], Path(record["image"]), process,
                record["hostname"], record["bundle"],
                disks=tuple((s, Path(i)) for s, i in record.get("disks", ())))
        c._set_state(ContainerState(record["state"]))
        c.exit_code = record.get("exit_code")
        c.created = record.get("created", c.created)
        return c

    def record(self) -> dict[str, Any]:
        p = self.process
        return {"name": self.name, "sandbox": self.host.sandbox_id, "serial": self.serial,
                "image": str(self.image), "bundle": self.bundle, "hostname": self.hostname,
                "state": self.state.value, "exit_code": self.exit_code, "created": self.created,
                "disks": [[serial, str(image)] for serial, image in self.disks],
                "process": {"args": list(p.args), "env": list(p.env), "cwd": p.cwd,
                            "uid": p.uid, "gid": p.gid, "groups": list(p.groups),
                            "terminal": p.terminal, "stdio": p.stdio}}

    def save(self) -> None:
        """Write the record (after each change, so other client processes see it)."""
        self.host.records.save_container(self.record())

    @require(ContainerState.CREATING)
    async def create(self, vm: SandboxVm, conn: Awaitable[AgentClient]) -> None:
        """Record, hot-plug the root, create in the guest; undone on failure."""
        self.save()  # first: a crash from here on leaves a record to clean up
        t0 = time.monotonic()
        try:
            await vm.attach_disk(self.image, self.serial)
            for serial, image in self.disks:
                await vm.attach_disk(image, serial)
            self.timings["attach_ms"] = (time.monotonic() - t0) * 1000
            await (await conn).create_container(self.name, self.serial, self.hostname,
                                                self.process, self.host.disk_timeout,
                                                self.setup)
        except BaseException:
            await finish(self._undo_create(vm))
            raise
        self.timings["create_ms"] = (time.monotonic() - t0) * 1000
        self._set_state(ContainerState.CREATED)
        self.save()

    async def _undo_create(self, vm: SandboxVm) -> None:
        for serial in (self.serial, *(s for s, _ in self.disks)):
            try:
                await vm.detach_disk(serial)
            except VmFactoryError as exc:  # (one never plugged is NotFound)
                logger.debug("container %s: detach %s after a failed create: %s",
                             self.name, serial, exc)
        self.host.records.delete_container(self.name)

    @require(ContainerState.CREATED)
    async def start(self) -> None:
        """Run the first process; a program that cannot run removes the container."""
        conn = await self.host.connect()
        t0 = time.monotonic()
        try:
            await conn.start_container(self.name)
        except ExecFailed:
            await finish(self.remove(force=True))
            raise
        self.timings["start_ms"] = (time.monotonic() - t0) * 1000
        self._set_state(ContainerState.RUNNING)
        self.save()

    async def attach(self, *, stdin: int | None = 0, stdout: int = 1, stderr: int = 2,
                     exec_id: str = "", terminal: bool | None = None,
                     on_first_output: Callable[[], None] | None = None) -> int:
        """Relay stdio and signals through the sandbox's shim mode until the process
        exits; return its exit code."""
        conn = await self.host.connect()
        code = await self.host.shim.run(
            conn, self.name, exec_id,
            terminal=self.process.terminal if terminal is None else terminal,
            stdin=stdin, stdout=stdout, stderr=stderr,
            shim_address=self.host.shared_address(), on_first_output=on_first_output)
        if not exec_id:
            self.stopped(code)
        return code

    async def run(self, *, stdin: int | None = 0, stdout: int = 1, stderr: int = 2,
                  on_first_output: Callable[[], None] | None = None) -> int:
        """Start the first process with its stdio already attached (one round trip
        less before the first byte); return its exit code."""
        attached = asyncio.ensure_future(self.attach(stdin=stdin, stdout=stdout, stderr=stderr,
                                                     on_first_output=on_first_output))
        try:
            await self.start()
        except BaseException:
            attached.cancel()
            await asyncio.gather(attached, return_exceptions=True)
            raise
        return await attached

    def stopped(self, code: int) -> None:
        self.exit_code = code
        self._set_state(ContainerState.STOPPED)
        self.save()

    async def wait(self, exec_id: str = "") -> int:
        code = await (await self.host.connect()).wait(self.name, exec_id)
        if not exec_id:
            self.stopped(code)
        return code

    @require(ContainerState.RUNNING)
    async def exec(self, args: list[str], *, terminal: bool = False,
                   exec_id: str | None = None, rows: int = 0, cols: int = 0,
                   spec: ProcessSpec | None = None) -> str:
        """Start another process in the container; return its exec id.  Its env,
        cwd and user are the first process's, or ``spec``'s when given."""
        exec_id = check_name("exec", exec_id or "e" + secrets.token_hex(4))
        stdio = self.host.shim.relays_io
        if spec is None:
            process = dataclasses.replace(self.process, args=tuple(args), terminal=terminal,
                                          stdio=stdio, rows=rows, cols=cols)
        else:
            process = process_request(spec.with_args(args).with_terminal(terminal),
                                      stdio=stdio, rows=rows, cols=cols)
        await (await self.host.connect()).exec_process(self.name, exec_id, process)
        return exec_id

    async def signal(self, sig: int, *, all: bool = False, exec_id: str = "") -> None:
        await (await self.host.connect()).signal(self.name, exec_id, sig, all)

    async def resize(self, rows: int, cols: int, exec_id: str = "") -> None:
        await (await self.host.connect()).resize(self.name, exec_id, rows, cols)

    async def processes(self) -> list[Any]:
        return await (await self.host.connect()).list_processes(self.name)

    async def refresh(self) -> ContainerState:
        """Ask the guest what became of the first process (it may have exited)."""
        if self.state is ContainerState.RUNNING:
            for info in await (await self.host.connect()).list_containers():
                if info.container_id == self.name and info.state == "stopped":
                    self.stopped(info.exit_code)
        return self.state

    async def remove(self, force: bool = False, vm_going: bool = False) -> None:
        """Remove from the guest, unplug the root disk, drop the record.

        ``vm_going``: the VM stops next, so the disk need not be unplugged."""
        if not force and await self.refresh() is ContainerState.RUNNING:
            raise ContainerError(f"container {self.name} is running (stop it, or force)")
        conn = await self.host.connect()
        try:
            await conn.remove_container(self.name, force=True)
        except NoSuchContainer:
            pass  # the guest no longer has it (removed already, or a new guest)
        if not vm_going:
            machine = await self.host.machine()
            for serial in (self.serial, *(s for s, _ in self.disks)):
                await machine.detach_disk(serial)
        self.host.records.delete_container(self.name)
        logger.info("container %s removed", self.name)
