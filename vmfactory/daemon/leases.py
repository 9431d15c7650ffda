"""Leases: every handed-out VM has one, until it is released or its TTL ends."""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from vmfactory.errors import LeaseNotFound
from vmfactory.daemon.records import Role, VmRecords
from vmfactory.hypervisor.base import Vm

logger = logging.getLogger(__name__)


class VmSource(enum.StrEnum):
    """Where a handed-out VM came from."""

    POOL = "pool"     # a warm pool's ready VM
    CLONE = "clone"   # cloned from the template for this request
    BOOT = "boot"     # cold-booted for this request

    @classmethod
    def made(cls, vm: Vm) -> VmSource:
        """The source of a VM a base made just now (not taken from a pool)."""
        return cls.CLONE if vm.spec.is_clone else cls.BOOT


@dataclass
class Lease:
    id: str
    vm: Vm
    pool: str
    source: VmSource
    client: str
    ttl_s: float
    created: float = field(default_factory=time.time)

    @property
    def expires(self) -> float | None:
        return self.created + self.ttl_s if self.ttl_s > 0 else None

    def record(self) -> dict[str, object]:
        return {"lease_id": self.id, "pool": self.pool, "source": self.source.value,
                "client": self.client, "ttl_s": self.ttl_s, "created": self.created}

    @classmethod
    def from_record(cls, vm: Vm, record: dict[str, Any]) -> Lease:
        return cls(record["lease_id"], vm, record["pool"], VmSource(record["source"]),
                   record["client"], float(record["ttl_s"]), float(record["created"]))


class LeaseTable:
    """Leases in memory; each is persisted inside its VM's record (one synced
    write per handout: see VmRecords), so a restarted daemon can restore it."""

    def __init__(self, records: VmRecords) -> None:
        self._records = records
        self._leases: dict[str, Lease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._leases

    def values(self) -> list[Lease]:
        return list(self._leases.values())

    async def add(self, vm: Vm, pool: str, source: VmSource, client: str,
                  ttl_s: float) -> Lease:
        """Record a new lease (synced to the store, off the event loop) and return it."""
        lease = Lease(secrets.token_hex(8), vm, pool, source, client, ttl_s)
        await asyncio.to_thread(self._records.save, vm, Role.LEASED, pool, lease.record())
        self._leases[lease.id] = lease
        return lease

    async def restore(self, lease: Lease) -> None:
        """Take back a lease an earlier daemon recorded (crash recovery)."""
        await asyncio.to_thread(self._records.save, lease.vm, Role.LEASED, lease.pool,
                                lease.record())
        self._leases[lease.id] = lease

    def get(self, lease_id: str) -> Lease:
        try:
            return self._leases[lease_id]
        except KeyError:
            raise LeaseNotFound(f"no lease {lease_id!r}") from None

    def pop(self, lease_id: str) -> Lease:
        """Forget a lease; its record goes when its VM stops."""
        try:
            return self._leases.pop(lease_id)
        except KeyError:
            raise LeaseNotFound(f"no lease {lease_id!r}") from None

    def expired(self, now: float | None = None) -> list[Lease]:
        now = time.time() if now is None else now
        return [lease for lease in self._leases.values()
                if lease.expires is not None and lease.expires <= now]
