"""The composition root: the one place that picks the plugins and wires them.

* :func:`make_hypervisor` chooses the hypervisor plugin (QEMU);
* :func:`make_daemon` builds the daemon of a config: its metadata store and
  its CreateNew and CreateFromTemplate bases over one hypervisor;
* :func:`running_daemon` / :func:`serve` run it with its gRPC server;
* :func:`create_new_vm` / :func:`adopt_vm` give a process a VM of its own (the
  runtime client's CreateNew fallback, when no daemon answers).

Tests hand their own hypervisor (the host-process stand-in) or store to the
same functions; nothing below this module constructs a plugin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

from vmfactory.config import Config, to_toml
from vmfactory.daemon.core import Daemon
from vmfactory.factory.direct import DirectFactory
from vmfactory.factory.template_factory import TemplateFactory
from vmfactory.hypervisor.base import Hypervisor, Vm, VmSpec
from vmfactory.hypervisor.qemu import QemuHypervisor
from vmfactory.server.admin_server import AdminServer
from vmfactory.server.listen import Listener, claim_socket
from vmfactory.store import Store, open_store
from vmfactory.util.tasks import finish

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def make_hypervisor(config: Config) -> Hypervisor:
    """The hypervisor plugin of the product: QEMU, its VMs under ``run_dir/vms``."""
    return QemuHypervisor(config.paths.vms_dir, config.timeouts)


def make_bases(config: Config, hypervisor: Hypervisor) -> tuple[DirectFactory, TemplateFactory]:
    """CreateNew, and CreateFromTemplate (the shared template) falling back to it."""
    direct = DirectFactory(config, hypervisor)
    return direct, TemplateFactory(config, hypervisor, direct)


def make_daemon(config: Config, *, hypervisor: Hypervisor | None = None,
                store: Store | None = None) -> Daemon:
    """The daemon of ``config``; ``hypervisor`` and ``store`` replace the product's.
    Each tenant of the pools gets a template factory of its own."""
    hypervisor = hypervisor or make_hypervisor(config)
    direct, shared = make_bases(config, hypervisor)
    templates = {"": shared} | {pc.tenant: TemplateFactory(config, hypervisor, direct, pc.tenant)
                                for pc in config.pools if pc.tenant}
    return Daemon(config, hypervisor, store or open_store(config.store.url), direct, templates)


@contextlib.asynccontextmanager
async def running_daemon(config: Config, *, signals: bool = False,
                         **plugins: Any) -> AsyncIterator[Daemon]:
    """A started daemon serving the Factory API on its socket.  On exit: stop
    taking requests, give in-flight ones ``daemon.grace_s``, tear everything
    down, remove the socket; a background failure that stopped the daemon is
    raised after that.  ``signals``: SIGTERM and SIGINT ask it to stop."""
    claim_socket(config.daemon.socket)
    daemon = make_daemon(config, **plugins)
    loop = asyncio.get_running_loop()
    if signals:
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, daemon.request_stop)
    listener = Listener(daemon, to_toml(config))
    admin = AdminServer(daemon, config.admin) if config.admin.enabled else None
    try:
        await daemon.start()
        await listener.start()
        if admin is not None:
            await admin.start()
        yield daemon
    finally:
        daemon.events.close()  # ends Watch streams, so they do not hold up the grace
        try:
            if admin is not None:
                await finish(admin.stop())
            await finish(listener.stop(config.daemon.grace_s))
            await daemon.shutdown()
        finally:
            config.daemon.socket.unlink(missing_ok=True)
            if signals:
                for sig in STOP_SIGNALS:
                    loop.remove_signal_handler(sig)


async def serve(config: Config, **plugins: Any) -> None:
    """``vmfactory init``: serve until SIGTERM, SIGINT, Quit or a fatal background
    failure (raised once everything is torn down)."""
    async with running_daemon(config, signals=True, **plugins) as daemon:
        await daemon.wait_stopped()
        logger.info("stopping: no new requests, %g s grace for in-flight ones",
                    config.daemon.grace_s)


async def create_new_vm(config: Config) -> Vm:
    """One VM cold-booted in this process (CreateNew); its agent channel is closed,
    for the caller to open its own."""
    vm = await DirectFactory(config, make_hypervisor(config)).get_vm()
    await vm.disconnect_agent()
    return vm


async def adopt_vm(config: Config, vm_id: str, spec: dict[str, Any], pid: int) -> Vm:
    """The VM another process booted with :func:`create_new_vm` (its QEMU runs in
    its own session), taken over by ``pid``."""
    vm = make_hypervisor(config).create_vm(VmSpec.from_record(spec), vm_id)
    await vm.adopt(pid)
    await vm.disconnect_agent()
    return vm
