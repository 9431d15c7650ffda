"""``katashim``: a standalone shim process per container process
(``python -m runtime_client.shims``), holding the caller's stdio; the client
forwards the signals it receives to it."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from runtime_client.errors import ClientError
from runtime_client.shims.base import Shim, exit_code_of
from runtime_client.shims.signals import FORWARDED_SIGNALS, SignalHandlers
from vmfactory.agent.client import AgentClient
from vmfactory.util.tasks import finish

logger = logging.getLogger(__name__)

SHIM_MODULE = "runtime_client.shims"
# The directory holding the runtime_client and vmfactory packages.
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


class StandaloneShim(Shim):
    """``katashim``: a ``python -m runtime_client.shims`` process per container
    process, with the given fds as its stdio; this client forwards the signals
    it receives to that process."""

    name = "katashim"
    relays_io = True
    needs_shared_agent = True

    async def run(self, conn: AgentClient, container_id: str, exec_id: str, *,
                  terminal: bool, stdin: int | None = 0, stdout: int = 1, stderr: int = 2,
                  shim_address: str | None = None,
                  on_first_output: Callable[[], None] | None = None) -> int:
        """Run the shim process until it exits; its exit code (128+N if killed
        by signal N).  ``conn`` is unused: the shim dials ``shim_address``, and
        ``on_first_output`` cannot be observed from here (the output goes from
        the shim straight to the fds)."""
        if shim_address is None:
            raise ClientError("katashim needs a proxy that serves several host clients "
                              "(kataProxy or kataProxyBuiltin)")
        proc = await _spawn_shim(shim_command(shim_address, container_id, exec_id, terminal),
                                 stdin, stdout, stderr)
        handlers = SignalHandlers()
        handlers.install(_kill_handlers(proc, terminal))
        try:
            return exit_code_of(await proc.wait())
        except asyncio.CancelledError:
            # Abandoning the shim must not leave it behind; SIGKILL rather than
            # SIGTERM, which it would pass on to the container process.
            _kill_quietly(proc, signal.SIGKILL)
            await finish(proc.wait())
            raise
        finally:
            await handlers.remove()

def shim_command(address: str, container_id: str, exec_id: str, terminal: bool) -> list[str]:
    """The argv of a standalone shim process."""
    argv = [sys.executable, "-m", SHIM_MODULE, "--address", address,
            "--container", container_id, "--exec", exec_id]
    return argv + ["--terminal"] if terminal else argv

async def _spawn_shim(argv: list[str], stdin: int | None, stdout: int,
                      stderr: int) -> asyncio.subprocess.Process:
    env = dict(os.environ)
    # The shim imports runtime_client and vmfactory from this source tree,
    # whether or not they are installed.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_SOURCE_ROOT), env.get("PYTHONPATH", "")) if p)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL if stdin is None else stdin, stdout=stdout,
            stderr=stderr, env=env, start_new_session=False)
    except OSError as exc:
        raise ClientError(f"cannot start the katashim process: {exc}") from exc
    logger.debug("katashim pid %d: %s", proc.pid, argv)
    return proc

def _kill_handlers(proc: asyncio.subprocess.Process,
                   terminal: bool) -> dict[signal.Signals, Callable[[], None]]:
    signums = FORWARDED_SIGNALS + ((signal.SIGWINCH,) if terminal else ())
    return {signum: functools.partial(_kill_quietly, proc, signum) for signum in signums}

def _kill_quietly(proc: asyncio.subprocess.Process, signum: signal.Signals) -> None:
    if proc.returncode is not None:
        return
    try:
        os.kill(proc.pid, signum)
    except ProcessLookupError:
        pass  # it exited between the check and the kill
