"""Kata's shim modes: how a container process's stdio and signals reach the host.

* ``noopshim``: no I/O relay (the guest gives the process /dev/null stdio);
  signals the client receives are still forwarded, so killing the client
  still reaches the process.
* ``katashimbuiltin``: the client process itself relays stdio
  (:func:`runtime_client.iorelay.relay_io`) and forwards signals.
* ``katashim``: a standalone shim process per container process
  (``python -m runtime_client.shim``) does the same between its own stdio and
  the container process; the client forwards its signals to that shim.  The shim
  opens its own agent connection, so it needs a proxy serving several clients.
* ``ccshim``: deprecated alias of ``katashim``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

from runtime_client.agent import AgentConnection
from runtime_client.errors import ClientError
from runtime_client.iorelay import host_terminal_size, relay_io
from runtime_client.modes import canonical_mode
from vmfactory.config import SHIM_ALIASES

_LOG = logging.getLogger(__name__)

ShimName = Literal["noopshim", "katashim", "katashimbuiltin", "ccshim"]
SHIM_NAMES: tuple[str, ...] = ("noopshim", "katashim", "katashimbuiltin", "ccshim")
_ALIASES = SHIM_ALIASES

# Signals a user or supervisor sends to stop or poke a program: the client passes
# them on instead of dying itself.  SIGKILL/SIGSTOP cannot be caught.
FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

SHIM_MODULE = "runtime_client.shim"
# The directory holding the runtime_client and vmfactory packages.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def canonical_shim(name: str) -> str:
    """``name`` with deprecated aliases resolved (``ccshim`` -> ``katashim``)."""
    return canonical_mode("shim", name, [n for n in SHIM_NAMES if n not in _ALIASES], _ALIASES)


def exit_code_of(returncode: int) -> int:
    """A subprocess return code in shell form: 128+N for death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Shim(ABC):
    """How one container process's stdio and signals are handled on the host."""

    name: ClassVar[str]
    # False only for noopshim: the guest then gives the process /dev/null stdio.
    relays_io: ClassVar[bool]
    # True for katashim: its standalone process opens its own agent connection.
    needs_shared_agent: ClassVar[bool]

    @abstractmethod
    async def run(self, conn: AgentConnection, container_id: str, exec_id: str, *,
                  terminal: bool, stdin: int | None = 0, stdout: int = 1, stderr: int = 2,
                  shim_address: str | None = None,
                  on_first_output: Callable[[], None] | None = None) -> int:
        """Relay (per mode), forward signals, return the exit code."""


def make_shim(name: str) -> Shim:
    """The shim for ``name`` (aliases accepted); ClientError if unknown."""
    return _SHIMS[canonical_shim(name)]()


class _SignalHandlers:
    """Loop signal handlers for the duration of a shim run.

    Previous Python-level handlers are restored on :meth:`remove`
    (``loop.remove_signal_handler`` alone would reset them to the default).
    Callbacks that start coroutines get owned tasks, cancelled on removal.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._previous: dict[signal.Signals, Any] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def install(self, handlers: dict[signal.Signals, Callable[[], None]]) -> None:
        for signum, callback in handlers.items():
            previous = signal.getsignal(signum)
            try:
                self._loop.add_signal_handler(signum, callback)
            except (RuntimeError, ValueError) as exc:
                # Not the main thread (or no signals here): the process still
                # runs; it just cannot be signalled through us.
                _LOG.warning("cannot forward %s: %s", signum.name, exc)
                continue
            self._previous[signum] = previous

    def spawn(self, coro: Awaitable[None], what: str) -> None:
        """Run ``coro`` in a task owned here; its failure is logged, not raised."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._finished(done, what))

    def _finished(self, task: asyncio.Task[None], what: str) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _LOG.warning("%s failed: %s", what, task.exception())

    async def remove(self) -> None:
        for signum, previous in self._previous.items():
            self._loop.remove_signal_handler(signum)
            if previous is not None:
                signal.signal(signum, previous)
        self._previous.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _agent_handlers(handlers: _SignalHandlers, conn: AgentConnection, container_id: str,
                    exec_id: str, terminal: bool, tty_fds: Iterable[int | None]
                    ) -> dict[signal.Signals, Callable[[], None]]:
    """Callbacks forwarding each signal to the process through the agent, and
    SIGWINCH as a resize when the process has a terminal."""
    def forward(signum: signal.Signals) -> Callable[[], None]:
        def callback() -> None:
            _LOG.debug("forwarding %s to %s/%s", signum.name, container_id, exec_id)
            handlers.spawn(conn.signal(container_id, exec_id, int(signum)),
                           f"forwarding {signum.name} to {container_id}/{exec_id}")
        return callback

    def resize() -> None:
        size = host_terminal_size(*tty_fds)
        if size is not None:
            handlers.spawn(conn.resize(container_id, exec_id, size.lines, size.columns),
                           f"resizing the terminal of {container_id}/{exec_id}")

    callbacks = {signum: forward(signum) for signum in FORWARDED_SIGNALS}
    if terminal:
        callbacks[signal.SIGWINCH] = resize
    return callbacks


class BuiltinShim(Shim):
    """``katashimbuiltin``: the relay and signal forwarding inside this process."""

    name = "katashimbuiltin"
    relays_io = True
    needs_shared_agent = False

    async def run(self, conn: AgentConnection, container_id: str, exec_id: str, *,
                  terminal: bool, stdin: int | None = 0, stdout: int = 1, stderr: int = 2,
                  shim_address: str | None = None,
                  on_first_output: Callable[[], None] | None = None) -> int:
        """Relay stdio (if this mode does) and forward signals until the process
        exited AND its output stream ended (so no output is lost); its exit code."""
        handlers = _SignalHandlers()
        handlers.install(_agent_handlers(handlers, conn, container_id, exec_id, terminal,
                                         (stdin, stdout)))
        try:
            if not self.relays_io:
                return await conn.wait(container_id, exec_id)
            relay = relay_io(conn, container_id, exec_id, stdin=stdin, stdout=stdout,
                             stderr=stderr, terminal=terminal, on_first_output=on_first_output)
            _, code = await _both(relay, conn.wait(container_id, exec_id))
            return code
        finally:
            await handlers.remove()


class NoopShim(BuiltinShim):
    """No stdio relay; signals are forwarded; returns the exit code."""

    name = "noopshim"
    relays_io = False


async def _both(first: Awaitable[None], second: Awaitable[int]) -> tuple[None, int]:
    """Await both concurrently; if either fails, cancel the other and raise."""
    tasks: list[asyncio.Future[Any]] = [asyncio.ensure_future(first),
                                        asyncio.ensure_future(second)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error
    return tasks[0].result(), tasks[1].result()


class StandaloneShim(Shim):
    """``katashim``: a ``python -m runtime_client.shim`` process per container
    process, with the given fds as its stdio; this client forwards the signals
    it receives to that process."""

    name = "katashim"
    relays_io = True
    needs_shared_agent = True

    async def run(self, conn: AgentConnection, container_id: str, exec_id: str, *,
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
        handlers = _SignalHandlers()
        handlers.install(_kill_handlers(proc, terminal))
        try:
            return exit_code_of(await proc.wait())
        except asyncio.CancelledError:
            # Abandoning the shim must not leave it behind; SIGKILL rather than
            # SIGTERM, which it would pass on to the container process.
            _kill_quietly(proc, signal.SIGKILL)
            await asyncio.shield(proc.wait())
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
    _LOG.debug("katashim pid %d: %s", proc.pid, argv)
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


_SHIMS: dict[str, type[Shim]] = {
    NoopShim.name: NoopShim,
    BuiltinShim.name: BuiltinShim,
    StandaloneShim.name: StandaloneShim,
}
