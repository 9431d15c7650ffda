"""An owner for background tasks whose lifetime is an object's, not a block's.

asyncio.TaskGroup wants ``async with``; services start in one call and stop in
another.  TaskOwner enters a TaskGroup in ``start()`` and leaves it in
``close()``, so every background task has an owner that awaits it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from typing import Any


class TaskOwner:
    """Starts named background tasks and cancels and awaits them all on close."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._stack: AsyncExitStack | None = None
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        if self._group is None:
            self._stack = AsyncExitStack()
            self._group = await self._stack.enter_async_context(asyncio.TaskGroup())

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` in the background; it must handle its own expected errors."""
        if self._group is None:
            coro.close()
            raise RuntimeError(f"{self.name}: task owner is not started")
        task = self._group.create_task(coro, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def running(self, name: str) -> bool:
        return any(t.get_name() == f"{self.name}:{name}" for t in self._tasks)

    async def close(self) -> None:
        """Cancel every task and wait for them; idempotent."""
        if self._stack is None:
            return
        for task in list(self._tasks):
            task.cancel()
        stack, self._stack, self._group = self._stack, None, None
        await stack.aclose()
