"""``katashimbuiltin`` and ``noopshim``: the client process itself relays the
process's stdio (or not) and forwards the signals it receives."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from runtime_client.shims.base import Shim
from runtime_client.shims.iorelay import host_terminal_size, relay_io
from runtime_client.shims.signals import FORWARDED_SIGNALS, SignalHandlers
from vmfactory.agent.client import AgentClient

logger = logging.getLogger(__name__)


def _agent_handlers(handlers: SignalHandlers, conn: AgentClient, container_id: str,
                    exec_id: str, terminal: bool, tty_fds: Iterable[int | None]
                    ) -> dict[signal.Signals, Callable[[], None]]:
    """Callbacks forwarding each signal to the process through the agent, and
    SIGWINCH as a resize when the process has a terminal."""
    def forward(signum: signal.Signals) -> Callable[[], None]:
        def callback() -> None:
            logger.debug("forwarding %s to %s/%s", signum.name, container_id, exec_id)
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

    async def run(self, conn: AgentClient, container_id: str, exec_id: str, *,
                  terminal: bool, stdin: int | None = 0, stdout: int = 1, stderr: int = 2,
                  shim_address: str | None = None,
                  on_first_output: Callable[[], None] | None = None) -> int:
        """Relay stdio (if this mode does) and forward signals until the process
        exited AND its output stream ended (so no output is lost); its exit code."""
        handlers = SignalHandlers()
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
