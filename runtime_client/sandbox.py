"""Sandboxes: a VM (from the daemon's pool, or booted here) holding containers.

:class:`Runtime` is the entry point a container runtime embeds.  Every sandbox
and container is recorded as it changes, so another client process can list,
stop or delete what a crashed client left (``Runtime.open_sandbox``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from runtime_client.bundles import Bundle, ImageCache
from runtime_client.container import Container, ContainerHost, ContainerState
from runtime_client.errors import SandboxError
from runtime_client.proxies import Proxy, canonical_proxy, make_proxy
from runtime_client.records import ClientRecords, check_name
from runtime_client.shims import Shim, canonical_shim, make_shim
from runtime_client.keeper import Renewal, keeper_alive, spawn_keeper, stop_keeper
from runtime_client.vm import LeasedVm, SandboxVm, obtain_vm, reap_owned, reattach_vm
from vmfactory.agent.client import AgentClient
from vmfactory.config import Config
from vmfactory.errors import NotFound, VmFactoryError, quote
from vmfactory.server.client import FactoryClient
from vmfactory.store import open_store
from vmfactory.util.states import Lifecycle, require
from vmfactory.util.tasks import Teardown, finish

logger = logging.getLogger(__name__)


class SandboxState(enum.Enum):
    CREATING = "creating"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Sandbox(Lifecycle[SandboxState]):
    """One VM and the containers in it; made by :class:`Runtime`."""

    def __init__(self, runtime: Runtime, sandbox_id: str, proxy: Proxy,
                 vm: SandboxVm | None, vm_record: dict[str, Any], keeper: int = 0) -> None:
        self.runtime = runtime
        self.id = sandbox_id
        self.proxy = proxy
        self.vm = vm
        self.vm_record = vm_record
        self.keeper = keeper  # the pid of the process renewing the lease, once we let go
        self._renewal: Renewal | None = None
        self.conn: AgentClient | None = None
        self._connect_lock = asyncio.Lock()
        self.created = time.time()
        self.timings: dict[str, float] = {}
        self.host = ContainerHost(
            sandbox_id=sandbox_id, connect=self.connect, machine=self.machine,
            shared_address=lambda: self.proxy.shared_address, shim=runtime.shim,
            records=runtime.records, images=runtime.images,
            disk_timeout=runtime.config.timeouts.hotplug)
        self._set_state(SandboxState.CREATING)

    def _state_error(self, operation: str) -> Exception:
        return SandboxError(f"sandbox {self.id} is {self.state.value}: cannot {operation}")

    @property
    def directory(self) -> Path:
        return self.runtime.sandbox_dir(self.id)

    @property
    def shim(self) -> Shim:
        return self.runtime.shim

    def record(self) -> dict[str, Any]:
        vm = self.vm.record() if self.vm is not None else self.vm_record
        return {"id": self.id, "state": self.state.value, "created": self.created,
                "owner_pid": os.getpid(), "vm": vm, "proxy": self.proxy.record(),
                "shim": self.shim.name, "keeper": self.keeper}

    def hold(self) -> None:
        """Renew the lease from this process while it uses the sandbox."""
        if isinstance(self.vm, LeasedVm) and self._renewal is None:
            self._renewal = Renewal(self.vm)
            self._renewal.start()

    async def let_go(self) -> None:
        """This process is done with the sandbox: if the sandbox lives on (a detached
        container), a keeper process renews its lease from now on."""
        if self._renewal is not None:
            renewal, self._renewal = self._renewal, None
            await renewal.stop()
        if self.state is not SandboxState.READY or self.vm_record.get("kind") != "leased":
            return
        if self.keeper and keeper_alive(self.keeper, self.id):
            return
        vm = await self.machine()
        assert isinstance(vm, LeasedVm)
        config = self.runtime.config
        self.keeper = await spawn_keeper(self.id, vm, config.daemon.socket, config.runtime.store,
                                         self.directory / "keeper.log")
        self.save()

    def save(self) -> None:
        self.runtime.records.save_sandbox(self.record())

    async def connect(self) -> AgentClient:
        """The agent connection (through the proxy mode), opened on first use."""
        async with self._connect_lock:
            if self.conn is None:
                await self._open_connection()
        assert self.conn is not None
        return self.conn

    async def _open_connection(self) -> None:
        before = self.proxy.record()
        address = await self.proxy.start()
        if self.proxy.record() != before:
            self.save()  # a proxy process started: another client must be able to stop it
        conn = AgentClient(address, self.runtime.config.timeouts.agent_call,
                           wait_for_ready=True)
        try:
            # The VM's agent answered its factory moments ago: one call's time is
            # enough, and a sandbox whose VM died fails in seconds, not minutes.
            await conn.ping(self.runtime.config.timeouts.agent_call)
        except BaseException:
            await finish(conn.close())
            raise
        self.conn = conn

    async def machine(self) -> SandboxVm:
        """The VM, re-attached from the record when another process made it."""
        if self.vm is None:
            self.vm = await reattach_vm(self.runtime.config, self.runtime.factory, self.vm_record)
        return self.vm

    @require(SandboxState.READY, operation="create a container")
    async def create_container(self, bundle: Bundle, name: str, *,
                               args: list[str] | None = None, terminal: bool | None = None,
                               rows: int = 0, cols: int = 0) -> Container:
        """Hot-plug the bundle's root and create (not start) its first process."""
        check_name("container", name)
        if self.runtime.records.has_container(name):
            raise SandboxError(f"a container named {quote(name)} exists")
        # The agent connection (a new session through the VM's port) opens while
        # the root image is found or built and hot-plugged.
        connecting = asyncio.ensure_future(self.connect())
        try:
            container = await asyncio.to_thread(Container.prepare, self.host, bundle, name, args,
                                                terminal, rows, cols)
            await container.create(await self.machine(), connecting)
        finally:
            if not connecting.done():
                connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
        return container

    async def container(self, name: str) -> Container:
        record = self.runtime.records.container(name)
        if record["sandbox"] != self.id:
            raise NotFound(f"container {quote(name)} is not in sandbox {self.id}")
        return Container.from_record(self.host, record)

    def containers(self) -> list[dict[str, Any]]:
        return self.runtime.records.containers(self.id)

    async def stop(self) -> None:
        """Remove every container (killing what runs), stop the proxy and the VM."""
        if self.state is SandboxState.STOPPED:
            return
        self._set_state(SandboxState.STOPPING)
        self.save()
        try:
            await self._remove_containers()
        finally:
            await finish(self._release())

    async def _stop_keeping(self) -> None:
        if self._renewal is not None:
            renewal, self._renewal = self._renewal, None
            await renewal.stop()
        if self.keeper:
            keeper, self.keeper = self.keeper, 0
            await asyncio.to_thread(stop_keeper, keeper, self.id)

    async def _release(self) -> None:
        """The agent connection, the proxy and the VM, each even if one fails."""
        teardown = Teardown(f"sandbox {self.id}")
        await teardown.step("stop renewing the lease", self._stop_keeping())
        await teardown.step("disconnect", self.disconnect())
        await teardown.step("stop the proxy", self.proxy.stop())
        await teardown.step("stop the VM", self._stop_vm())
        self._set_state(SandboxState.STOPPED)
        self.save()
        teardown.done()
        logger.info("sandbox %s stopped", self.id)

    async def _remove_containers(self) -> None:
        for record in self.containers():
            try:
                container = Container.from_record(self.host, record)
                await container.remove(force=True, vm_going=True)
            except VmFactoryError as exc:  # the VM may be gone: records must go anyway
                logger.warning("sandbox %s: container %s: %s", self.id, record["name"], exc)
                self.runtime.records.delete_container(record["name"])

    async def _stop_vm(self) -> None:
        try:
            await (await self.machine()).stop()
        except VmFactoryError as exc:
            logger.warning("sandbox %s: %s", self.id, exc)
            if self.vm_record.get("kind") == "owned":
                reap_owned(self.vm_record)

    async def delete(self) -> None:
        """Stop if needed, then forget the sandbox; idempotent."""
        await self.stop()
        self.runtime.records.delete_sandbox(self.id)
        shutil.rmtree(self.directory, ignore_errors=True)
        try:
            self.directory.parent.rmdir()  # the last sandbox leaves no trace either
        except OSError:
            pass  # other sandboxes still there

    async def disconnect(self) -> None:
        """Close this process's agent connection (the sandbox keeps running)."""
        if self.conn is not None:
            conn, self.conn = self.conn, None
            await conn.close()
        if self.proxy.name == "kataProxyBuiltin":
            await self.proxy.stop()  # it lives in this process; a later client makes its own


class Runtime:
    """Sandboxes and containers on factory VMs."""

    def __init__(self, config: Config, *, shim: str | None = None,
                 proxy: str | None = None) -> None:
        self.config = config
        self.shim = make_shim(canonical_shim(shim or config.runtime.shim))
        self.proxy_mode = canonical_proxy(proxy or config.runtime.proxy)
        if self.shim.needs_shared_agent and self.proxy_mode not in ("kataProxy",
                                                                    "kataProxyBuiltin"):
            raise SandboxError(f"{self.shim.name} needs a proxy that serves several host "
                               f"clients (kataProxy or kataProxyBuiltin), not {self.proxy_mode}")
        self.records = ClientRecords(open_store(config.runtime.store))
        self.factory = FactoryClient(str(config.daemon.socket))
        image_root = Path(config.runtime.image_dir or config.paths.state_dir / "bundle-images")
        self.images = ImageCache(image_root / str(os.getuid()))
        self._open: dict[str, Sandbox] = {}

    def sandbox_dir(self, sandbox_id: str) -> Path:
        root = self.config.runtime.run_dir or self.config.paths.run_dir / "sandboxes"
        return Path(root) / sandbox_id

    async def create_sandbox(self, sandbox_id: str | None = None) -> Sandbox:
        """A sandbox on a VM from the daemon (CreateNew here if none answers)."""
        sandbox_id = check_name("sandbox", sandbox_id or secrets.token_hex(6))
        if self.records.has_sandbox(sandbox_id):
            raise SandboxError(f"a sandbox named {quote(sandbox_id)} exists")
        t0 = time.monotonic()
        vm = await obtain_vm(self.config, self.factory, f"runtime:{os.getpid()}")
        directory = self.sandbox_dir(sandbox_id)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        sandbox = Sandbox(self, sandbox_id, make_proxy(self.proxy_mode, vm.agent_socket,
                                                       directory), vm, vm.record())
        sandbox.timings["get_vm_ms"] = (time.monotonic() - t0) * 1000
        try:
            sandbox.save()
        except BaseException:
            await finish(sandbox.delete())
            raise
        sandbox._set_state(SandboxState.READY)
        sandbox.save()
        sandbox.hold()
        self._open[sandbox_id] = sandbox
        logger.info("sandbox %s ready on vm %s (%s) in %.0f ms", sandbox_id, vm.vm_id, vm.source,
                    sandbox.timings["get_vm_ms"])
        return sandbox

    async def open_sandbox(self, sandbox_id: str) -> Sandbox:
        """A recorded sandbox, possibly made by another (maybe dead) client process."""
        if sandbox_id in self._open:
            return self._open[sandbox_id]
        record = self.records.sandbox(sandbox_id)
        vm_record = record["vm"]
        proxy = make_proxy(record["proxy"]["mode"], Path(vm_record["agent_socket"]),
                           self.sandbox_dir(sandbox_id), record["proxy"])
        sandbox = Sandbox(self, sandbox_id, proxy, None, vm_record, int(record.get("keeper", 0)))
        sandbox._set_state(SandboxState(record["state"]))
        sandbox.created = record.get("created", sandbox.created)
        self._open[sandbox_id] = sandbox
        return sandbox

    async def open_container(self, name: str) -> Container:
        record = self.records.container(name)
        sandbox = await self.open_sandbox(record["sandbox"])
        return Container.from_record(sandbox.host, record)

    def sandboxes(self) -> list[dict[str, Any]]:
        return self.records.sandboxes()

    async def close(self) -> None:
        """Disconnect from every sandbox (they keep running, their leases kept by a
        keeper process) and close the store; every step even if one fails."""
        teardown = Teardown("runtime client")
        for sandbox in list(self._open.values()):
            await teardown.step(f"sandbox {sandbox.id}: disconnect", sandbox.disconnect())
            await teardown.step(f"sandbox {sandbox.id}: hand the lease over", sandbox.let_go())
        self._open.clear()
        teardown.sync_step("prune images", lambda: self.images.prune(
            self.config.runtime.image_cache_keep))
        await teardown.step("factory client", self.factory.close())
        teardown.sync_step("store", self.records.store.close)
        teardown.done()

    async def __aenter__(self) -> Runtime:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["Runtime", "Sandbox", "SandboxState", "ContainerState"]
