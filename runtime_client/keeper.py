"""Keeping a sandbox's lease alive while the sandbox exists.

A client's leases carry a TTL (``runtime.lease_ttl_s``), so the lease of a
client that died ends on its own.  Whoever holds a sandbox renews its lease
every third of the TTL: the client process while it runs (:class:`Renewal`),
then, for a sandbox that outlives it (``run -d``), a keeper process it leaves
behind, in its own session, recorded with the sandbox:

``python -m runtime_client.keeper --socket S --store URL --sandbox ID --lease L --ttl T``

renews until the sandbox's record is gone or stopping, or the lease is gone
(released or reclaimed); ``sandbox stop`` stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from runtime_client.errors import ClientError
from runtime_client.helpers import (
    HelperArgumentParser, helper_process, report_ready, spawn_helper, stop_helper,
)
from runtime_client.records import ClientRecords
from runtime_client.vm import LeasedVm
from vmfactory.errors import LeaseNotFound, NotFound, StoreError, VmFactoryError
from vmfactory.server.client import FactoryClient
from vmfactory.store import open_store
from vmfactory.util.tasks import Supervisor

logger = logging.getLogger(__name__)

PROG = "runtime_client.keeper"
RENEW_FRACTION = 3


class Renewal:
    """This process renews ``vm``'s lease every third of its TTL until :meth:`stop`."""

    def __init__(self, vm: LeasedVm) -> None:
        self.vm = vm
        self._tasks = Supervisor(f"lease-{vm.lease_id}")

    def start(self) -> None:
        if self.vm.ttl_s > 0:
            self._tasks.spawn("renew", self._loop)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.vm.ttl_s / RENEW_FRACTION)
            try:
                await self.vm.renew()
            except LeaseNotFound:
                logger.warning("the lease of vm %s ended", self.vm.vm_id)
                return
            except VmFactoryError as exc:  # the next round may reach the daemon again
                logger.warning("renewing the lease of vm %s: %s", self.vm.vm_id, exc)

    async def stop(self) -> None:
        await self._tasks.close()


async def spawn_keeper(sandbox_id: str, vm: LeasedVm, socket: Path, store: str,
                       log: Path) -> int:
    """A keeper process for the sandbox's lease; its pid."""
    return await spawn_helper(PROG, ["--socket", str(socket), "--store", store,
                                     "--sandbox", sandbox_id, "--lease", vm.lease_id,
                                     "--ttl", repr(vm.ttl_s)], log=log, error=ClientError)


def keeper_alive(pid: int, sandbox_id: str) -> bool:
    return helper_process(pid, PROG, sandbox_id) is not None


def stop_keeper(pid: int, sandbox_id: str) -> None:
    stop_helper(pid, PROG, sandbox_id)


def _held(store: str, sandbox_id: str) -> bool:
    """Whether the sandbox still wants its VM (its record exists, not stopping).
    A store that cannot be read now (held by a client, broken) counts as yes:
    the sandbox's owner stops the keeper when it lets the sandbox go."""
    try:
        with open_store(store) as s:
            record = ClientRecords(s).sandbox(sandbox_id)
    except NotFound:
        return False
    except StoreError as exc:
        logger.warning("cannot read the sandbox record now: %s", exc)
        return True
    return record.get("state") not in ("stopping", "stopped")


async def keep(args: argparse.Namespace, stop: asyncio.Event) -> int:
    """Renew until the sandbox lets go or the lease ends; the exit code."""
    last = time.monotonic()
    async with FactoryClient(args.socket, timeout=args.ttl / RENEW_FRACTION) as factory:
        report_ready(args.ready_fd)
        while _held(args.store, args.sandbox):
            try:
                await factory.renew(args.lease, args.ttl)
                last = time.monotonic()
            except LeaseNotFound:
                return 0
            except VmFactoryError as exc:
                logger.warning("renewing lease %s: %s", args.lease, exc)
                if time.monotonic() - last > args.ttl:
                    return 1  # the lease has ended by now
            try:
                await asyncio.wait_for(stop.wait(), args.ttl / RENEW_FRACTION)
                return 0
            except TimeoutError:
                continue
    return 0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = HelperArgumentParser(prog=PROG, description="Renew a sandbox's lease.")
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--store", required=True)
    parser.add_argument("--sandbox", required=True)
    parser.add_argument("--lease", required=True)
    parser.add_argument("--ttl", required=True, type=float)
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    return await keep(args, stop)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if not args.ttl > 0:
        print(f"{PROG}: error: --ttl must be more than 0", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s keeper[%(process)d] %(levelname)s %(message)s")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
