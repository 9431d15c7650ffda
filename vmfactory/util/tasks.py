"""Supervised background tasks, whose lifetime is an object's, not a block's.

An ``asyncio.TaskGroup`` cancels the task that opened it when a child fails: a
daemon's background loops must not do that to whoever happened to start them.
A :class:`Supervisor` owns named tasks instead.  Each runs inside a wrapper that
logs a failure with the task's name and traceback and then applies the task's
:class:`Policy`:

* ``ONCE``: a one-shot job; its failure is logged and counted, nothing more;
* ``RESTART``: a loop hit a fault that may pass: run it again after a backoff
  that doubles up to a bound (and starts over once a run has lasted a while);
* ``FATAL``: the owner cannot work without this loop: ``on_fatal`` is called
  once with the error, for a deliberate, logged shutdown.

:meth:`Supervisor.close` cancels every task and waits for all of them; it
never raises.  :func:`finish` runs cleanup to its end even when the caller is
cancelled meanwhile, then passes the cancellation on; :class:`Teardown` runs a
sequence of cleanup steps to the end and raises the first failure after the
last step.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Policy(enum.Enum):
    """What a task's failure (an exception other than cancellation) leads to."""

    ONCE = "once"
    RESTART = "restart"
    FATAL = "fatal"


@dataclass(frozen=True)
class Backoff:
    """Delays between restarts: ``first_s`` doubling up to ``max_s``; a run that
    lasted ``reset_after_s`` counts as healthy and starts the sequence over."""

    first_s: float = 0.5
    max_s: float = 30.0
    reset_after_s: float = 60.0


async def finish(work: Awaitable[T]) -> T:
    """Await ``work`` to its end even if the caller is cancelled meanwhile (once
    or many times), then re-raise that cancellation: cleanup never stops halfway.

    If ``work`` fails while a cancellation is pending, its error is logged and
    the cancellation raised (the caller asked to stop; the cleanup's failure is
    not lost)."""
    task = asyncio.ensure_future(work)
    interrupted = False
    while True:
        try:
            await asyncio.wait({task})
            break
        except asyncio.CancelledError:
            interrupted = True
    if interrupted:
        if not task.cancelled() and task.exception() is not None:
            logger.error("cleanup failed while cancelled: %r", task.exception(),
                         exc_info=task.exception())
        raise asyncio.CancelledError
    return task.result()


class Supervisor:
    """Starts named background tasks, applies their policy when they fail, and
    cancels and awaits them all on :meth:`close`.

    ``failures`` counts failures per task name and ``last_error`` keeps the last
    one's text, for status pages.
    """

    def __init__(self, name: str, *, on_fatal: Callable[[str, BaseException], None] | None = None,
                 backoff: Backoff = Backoff()) -> None:
        self.name = name
        self.backoff = backoff
        self.failures: Counter[str] = Counter()
        self.last_error: dict[str, str] = {}
        self._on_fatal = on_fatal
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def spawn(self, name: str, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any,
              policy: Policy = Policy.ONCE) -> asyncio.Task[None] | None:
        """Run ``fn(*args)`` in the background under ``policy``; None once closed
        (the owner is shutting down, so no new work starts)."""
        if self._closed:
            logger.debug("%s: not starting %s: closing", self.name, name)
            return None
        task = asyncio.get_running_loop().create_task(
            self._supervise(name, fn, args, policy), name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def running(self, name: str) -> bool:
        return any(t.get_name() == f"{self.name}:{name}" for t in self._tasks)

    async def _supervise(self, name: str, fn: Callable[..., Coroutine[Any, Any, Any]],
                         args: tuple[Any, ...], policy: Policy) -> None:
        delay = self.backoff.first_s
        while True:
            started = time.monotonic()
            try:
                await fn(*args)
                return
            except Exception as exc:  # noqa: BLE001 - the supervisor's job: log and apply policy
                self._failed(name, exc, policy)
                if policy is not Policy.RESTART:
                    return
            if time.monotonic() - started >= self.backoff.reset_after_s:
                delay = self.backoff.first_s
            logger.warning("%s: restarting %s in %.1f s", self.name, name, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff.max_s)

    def _failed(self, name: str, exc: Exception, policy: Policy) -> None:
        self.failures[name] += 1
        self.last_error[name] = f"{type(exc).__name__}: {exc}"
        logger.error("%s: background task %s failed (%s)", self.name, name, policy.value,
                     exc_info=exc)
        if policy is Policy.FATAL and self._on_fatal is not None:
            self._on_fatal(f"{self.name}:{name}", exc)

    async def close_when_done(self, timeout: float) -> None:
        """Let the tasks finish for up to ``timeout`` seconds, then :meth:`close`."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        await self.close()

    async def close(self) -> None:
        """Cancel every task and wait until all have ended; idempotent, never raises."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await finish(asyncio.gather(*tasks, return_exceptions=True))


class Teardown:
    """Runs cleanup steps to their end: each step is awaited with :func:`finish`,
    a failing step is logged and the next one still runs, and the first failure
    is raised by :meth:`done` once every step has run."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.first: Exception | None = None

    async def step(self, name: str, work: Awaitable[Any]) -> None:
        try:
            await finish(work)
        except Exception as exc:  # noqa: BLE001 - kept and raised by done(), after the rest
            logger.error("%s: %s failed: %s", self.what, name, exc)
            self.first = self.first or exc

    def sync_step(self, name: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - as in step()
            logger.error("%s: %s failed: %s", self.what, name, exc)
            self.first = self.first or exc

    def done(self) -> None:
        """Raise the first failure, if any step failed."""
        if self.first is not None:
            raise self.first
