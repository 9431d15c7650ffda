"""Loop signal handlers for the duration of one shim run."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

# Signals a user or supervisor sends to stop or poke a program: the client passes
# them on instead of dying itself.  SIGKILL/SIGSTOP cannot be caught.
FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


class SignalHandlers:
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
                logger.warning("cannot forward %s: %s", signum.name, exc)
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
            logger.warning("%s failed: %s", what, task.exception())

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
