"""The resident process of one ``vmfactory-oci`` container (what ``create`` forks).

It is the pid engines wait on: forked by the runtime, holding the engine's stdio
(or the pty slave), exiting with the container's exit code.  In between it holds
the sandbox: a VM leased from the daemon (renewed while it lives), the root
plugged, the container created in the guest; then it serves the control socket
(start, signal, pause, resume, ps, exec, delete) until the container's process
exits or the container is deleted, gives the VM back, and exits.

Lifecycle (one logged place, ``set_status``): creating -> created -> running <-> paused
-> stopped.  Its own log goes to ``ID/resident.log``: its stdio is the container's.

    python -m runtime_client.oci.resident --root R --id ID --bundle B --ready-fd N
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from runtime_client.bundles import find_executable, load_bundle
from runtime_client.container import Container
from runtime_client.errors import ExecutableNotFound
from runtime_client.oci.control import ControlServer
from runtime_client.oci.state import OCI_VERSION, ContainerDir, OciError, process_start_time
from runtime_client.records import NAME_RE
from runtime_client.sandbox import Runtime, Sandbox
from runtime_client.shims.iorelay import host_terminal_size
from vmfactory.config import Config, load_config
from vmfactory.errors import VmFactoryError, quote
from vmfactory.guest.agent.errors import CannotExecute, ExecFailed
from vmfactory.util.tasks import finish

logger = logging.getLogger(__name__)

SHIM, PROXY = "katashimbuiltin", "noProxy"  # the relay lives here; one agent channel


def runtime_name(container_id: str) -> str:
    """The sandbox's and container's name in the client records (stricter than an OCI id)."""
    if NAME_RE.match(container_id):
        return container_id
    return "oci-" + hashlib.sha256(container_id.encode()).hexdigest()[:24]


class Resident:
    """One container's sandbox, from create to the VM given back."""

    def __init__(self, cdir: ContainerDir, bundle: Path, config: str | None) -> None:
        self.cdir = cdir
        self.bundle = bundle
        self.config_path = config
        self.name = runtime_name(cdir.id)
        self.state: dict[str, Any] = {
            "ociVersion": OCI_VERSION, "id": cdir.id, "status": "creating", "pid": os.getpid(),
            "pid_start": process_start_time(os.getpid()), "bundle": str(bundle),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "annotations": {}}
        self.runtime: Runtime | None = None
        self.sandbox: Sandbox | None = None
        self.container: Container | None = None
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.first: asyncio.Task[int] | None = None

    def set_status(self, status: str, **fields: Any) -> None:
        logger.info("container %s: %s -> %s", self.cdir.id, self.state["status"], status)
        self.state.update(status=status, **fields)
        self.cdir.save(self.state)

    def end(self, code: int) -> None:
        if not self.done.done():
            self.done.set_result(code)

    async def create(self) -> None:
        """Everything ``create`` promises, or an error after undoing it."""
        config = _config(self.config_path)
        bundle = load_bundle(self.bundle)  # before any VM: a bad bundle costs nothing
        if find_executable(bundle) is None:
            raise ExecutableNotFound(f"executable {quote(bundle.process.args[0])} not found "
                                     f"in {bundle.rootfs}")
        self.state["annotations"] = bundle.annotations
        self.runtime = Runtime(config, shim=SHIM, proxy=PROXY)
        await _forget_leftovers(self.runtime, self.name)
        t0 = time.monotonic()
        self.sandbox = await self.runtime.create_sandbox(self.name)
        t1 = time.monotonic()
        size = host_terminal_size(0, 1) if bundle.process.terminal else None
        self.container = await self.sandbox.create_container(
            bundle, self.name, rows=size.lines if size else 0, cols=size.columns if size else 0)
        t2 = time.monotonic()
        self.set_status("created")
        logger.info("container %s: created %.0f ms after the resident was forked (sandbox %.0f ms, "
                    "container %.0f ms: %s)", self.cdir.id, _age_ms(),
                    (t1 - t0) * 1000, (t2 - t1) * 1000,
                    ", ".join(f"{k} {v:.0f}" for k, v in self.container.timings.items()))

    async def start(self) -> None:
        assert self.container is not None
        container = self.container
        self.first = asyncio.ensure_future(container.attach(stdin=0, stdout=1, stderr=2))
        try:
            await container.start()
        except BaseException as exc:
            self.first.cancel()
            # The process never ran: it ends as an init whose execve failed would.
            self.end(_exec_code(exc) if isinstance(exc, ExecFailed) else 255)
            raise
        self.set_status("running")
        self.first.add_done_callback(self._first_exited)  # (the relay sends the pty's size)

    def _first_exited(self, task: asyncio.Task[int]) -> None:
        if task.cancelled():
            self.end(137)
        elif task.exception() is not None:
            logger.error("container %s: relay failed: %s", self.cdir.id, task.exception())
            self.end(255)
        else:
            self.end(task.result())

    async def close(self, code: int | None) -> None:
        """Stopped first (the process is gone), then the VM given back."""
        self.set_status("stopped", exit_code=code)
        if self.first is not None and not self.first.done():
            self.first.cancel()
            await asyncio.gather(self.first, return_exceptions=True)
        if self.sandbox is not None:
            await finish(self.sandbox.delete())
        if self.runtime is not None:
            await finish(self.runtime.close())


def _config(config_path: str | None) -> Config:
    """vmfactory-oci's config: the file the front end found, else the embedded default."""
    return load_config(Path(config_path) if config_path else None)


def _age_ms() -> float:
    """How long ago this process was forked (clock ticks of /proc, ~10 ms)."""
    forked = process_start_time(os.getpid()) / os.sysconf("SC_CLK_TCK")
    return (time.clock_gettime(time.CLOCK_BOOTTIME) - forked) * 1000


def _exec_code(exc: ExecFailed) -> int:
    """A program that could not be executed ends as a shell reports it; any other
    failure to set the process up as 1."""
    return exc.exit_code if isinstance(exc, CannotExecute) else 1


async def _forget_leftovers(runtime: Runtime, name: str) -> None:
    """Records of a container of this id whose resident was killed: the id was
    deleted (its directory is new), so what they hold goes (the VM too)."""
    if runtime.records.has_sandbox(name):
        logger.warning("sandbox %s: left by a killed resident; removing it", name)
        await (await runtime.open_sandbox(name)).delete()
    if runtime.records.has_container(name):
        runtime.records.delete_container(name)


def forget(cdir: ContainerDir, config_path: str | None) -> int:
    """``delete`` of a container whose resident was killed: its sandbox record,
    lease and VM go now rather than at the lease's TTL, and no record stays."""
    logging.basicConfig(level=logging.WARNING, format="vmfactory-oci: %(message)s")

    async def run() -> None:
        runtime = Runtime(_config(config_path), shim=SHIM, proxy=PROXY)
        try:
            await _forget_leftovers(runtime, runtime_name(cdir.id))
        finally:
            await finish(runtime.close())
    try:
        asyncio.run(run())
    except (VmFactoryError, OSError) as exc:
        print(f"vmfactory-oci: container {cdir.id}: {exc}", file=sys.stderr)
        return 1
    return 0


async def serve(resident: Resident, ready_fd: int) -> int:
    """Create, report, serve until the end; the exit code."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        # Until start, a signal ends the container as it would end its init.
        loop.add_signal_handler(signum, resident.end, 128 + signum)
    server = ControlServer(resident)
    try:
        try:
            await resident.create()
            await server.start()
        except (VmFactoryError, OciError, OSError) as exc:
            _report(ready_fd, {"error": str(exc)})
            raise
        _report(ready_fd, {"ok": True})
        code = await resident.done
    except (VmFactoryError, OciError, OSError) as exc:
        logger.error("container %s: %s", resident.cdir.id, exc)
        code = 1
    finally:
        await finish(server.stop())
        await finish(resident.close(resident.done.result() if resident.done.done() else None))
        _report(ready_fd, {"error": "the container's process was stopped during create"})
    return code


def _report(fd: int, message: dict[str, Any]) -> None:
    """The one report line to ``create``; later calls are no-ops."""
    if fd < 0 or fd in _reported:
        return
    _reported.add(fd)
    try:
        os.write(fd, json.dumps(message).encode() + b"\n")
        os.close(fd)
    except OSError:
        pass  # create gave up waiting


_reported: set[int] = set()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vmfactory-oci resident")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--id", required=True)
    p.add_argument("--bundle", type=Path)
    p.add_argument("--config", default=None)
    p.add_argument("--ready-fd", type=int, default=-1)
    p.add_argument("--forget", action="store_true",
                   help="remove what a killed resident of this id left (its sandbox, VM)")
    args = p.parse_args(argv)
    cdir = ContainerDir(args.root, args.id)
    if args.forget:
        return forget(cdir, args.config)
    if args.bundle is None:
        p.error("--bundle is required")
    log = open(cdir.log, "a", buffering=1)
    sys.stderr = log  # fd 2 is the container's stderr; Python's own words go to the log
    logging.basicConfig(stream=log, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> int:
        return await serve(Resident(cdir, args.bundle, args.config), args.ready_fd)
    try:
        return asyncio.run(run())
    except BaseException as exc:  # noqa: BLE001 - the last word goes to the log
        logger.exception("container %s: resident failed: %s", args.id, exc)
        _report(args.ready_fd, {"error": f"container {args.id}: {exc}"})
        return 255


if __name__ == "__main__":
    sys.exit(main())
