"""Pool events, fanned out to any number of watchers (the Watch RPC, logs, tests)."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

WATCH_QUEUE = 1000


class EventKind(enum.StrEnum):
    """What happened to a pool or one of its VMs (the Watch RPC's ``kind``)."""

    READY = "ready"                    # a VM entered the pool
    HANDOUT = "handout"                # a pooled VM was leased
    MISS = "miss"                      # a request found the pool empty
    REPLACED = "replaced"              # a pooled VM died or failed at handout
    RELEASED = "released"              # a lessee gave its VM back
    RECLAIMED = "reclaimed"            # a lease ended without its lessee (TTL, shutdown)
    REFILL_PAUSED = "refill-paused"    # host memory under the floor
    REFILL_FAILED = "refill-failed"    # making a VM for the pool failed
    WARMUP_FAILED = "warmup-failed"    # the container warm-up failed (the VM is pooled)


@dataclass(frozen=True)
class PoolEvent:
    pool: str
    kind: EventKind
    vm_id: str = ""
    detail: str = ""
    time: float = field(default_factory=time.time)


class EventBus:
    """Publish/subscribe; a watcher that falls behind loses its oldest events."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[PoolEvent | None]] = set()
        self.counts: dict[str, int] = {}

    def publish(self, event: PoolEvent) -> None:
        self.counts[event.kind] = self.counts.get(event.kind, 0) + 1
        logger.debug("pool %s: %s %s %s", event.pool, event.kind, event.vm_id, event.detail)
        for q in self._queues:
            if q.full():
                q.get_nowait()
            q.put_nowait(event)

    async def watch(self) -> AsyncIterator[PoolEvent]:
        """Events from now on, until :meth:`close`."""
        q: asyncio.Queue[PoolEvent | None] = asyncio.Queue(WATCH_QUEUE)
        self._queues.add(q)
        try:
            while (event := await q.get()) is not None:
                yield event
        finally:
            self._queues.discard(q)

    def close(self) -> None:
        """End every watch."""
        for q in self._queues:
            if q.full():
                q.get_nowait()
            q.put_nowait(None)
