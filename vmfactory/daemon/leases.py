"""Leases: every handed-out VM has one, until it is released or its TTL ends."""

from __future__ import annotations

import enum
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from vmfactory.daemon.callers import Caller
from vmfactory.daemon.records import Role, VmRecords
from vmfactory.errors import LeaseNotFound, PermissionDenied, quote
from vmfactory.hypervisor.base import Vm
from vmfactory.util.tasks import finish

logger = logging.getLogger(__name__)


class VmSource(enum.StrEnum):
    """Where a handed-out VM came from."""

    POOL = "pool"     # a warm pool's ready VM
    CLONE = "clone"   # cloned from the template for this request
    BOOT = "boot"     # cold-booted for this request
    STANDBY = "standby"  # not handed out: a clone's QEMU waiting for its template's state

    @classmethod
    def made(cls, vm: Vm) -> VmSource:
        """The source of a VM a base made just now (not taken from a pool)."""
        return cls.CLONE if vm.spec.is_clone else cls.BOOT


def new_lease_id() -> str:
    """16 hex digits: not guessable, so a lease id in a log or a status is no key."""
    return secrets.token_hex(8)


@dataclass
class Lease:
    """A handed-out VM and who holds it: ``owner_uid`` alone (and root) may act
    on it.  With a TTL it ends ``ttl_s`` after it was made or last renewed."""

    id: str
    vm: Vm
    pool: str
    source: VmSource
    client: str
    ttl_s: float
    owner_uid: int = 0
    tenant: str = ""
    created: float = field(default_factory=time.time)
    renewed: float = 0.0
    request_id: str = ""

    @property
    def expires(self) -> float | None:
        return max(self.created, self.renewed) + self.ttl_s if self.ttl_s > 0 else None

    def record(self) -> dict[str, object]:
        return {"lease_id": self.id, "pool": self.pool, "source": self.source.value,
                "client": self.client, "ttl_s": self.ttl_s, "created": self.created,
                "renewed": self.renewed, "owner_uid": self.owner_uid, "tenant": self.tenant}

    @classmethod
    def from_record(cls, vm: Vm, record: dict[str, Any]) -> Lease:
        return cls(record["lease_id"], vm, record["pool"], VmSource(record["source"]),
                   record["client"], float(record["ttl_s"]), int(record.get("owner_uid", 0)),
                   str(record.get("tenant", "")), float(record["created"]),
                   float(record.get("renewed", 0.0)))


# How long a withdrawn request id is remembered, for a GetVM still on its way.
WITHDRAWN_KEEP_S = 120.0
WITHDRAWN_MAX = 10_000


class LeaseTable:
    """Leases in memory; each is persisted inside its VM's record (one synced
    write per handout: see VmRecords), so a restarted daemon can restore it.

    A caller that gave up on a GetVM withdraws it by its request id: the lease it
    made ends, or, when the withdrawal arrives first, the lease it makes later."""

    def __init__(self, records: VmRecords) -> None:
        self._records = records
        self._leases: dict[str, Lease] = {}
        self._withdrawn: dict[tuple[int, str], float] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, lease_id: object) -> bool:
        return lease_id in self._leases

    def values(self) -> list[Lease]:
        return list(self._leases.values())

    async def add(self, lease: Lease) -> Lease:
        """Record a new lease (synced to the store in a group commit) and return it.
        A caller cancelled meanwhile still waits for the write, so whoever stops
        the VM next also drops its record."""
        await finish(self._records.commit(lease.vm, Role.LEASED, lease.pool, lease.record()))
        self._leases[lease.id] = lease
        return lease

    async def renew(self, lease: Lease, ttl_s: float) -> None:
        """The lease ends ``ttl_s`` from now (recorded, so a restarted daemon agrees)."""
        lease.ttl_s, lease.renewed = ttl_s, time.time()
        await self._records.commit(lease.vm, Role.LEASED, lease.pool, lease.record())

    async def restore(self, lease: Lease) -> None:
        """Take back a lease an earlier daemon recorded (crash recovery)."""
        await self._records.commit(lease.vm, Role.LEASED, lease.pool, lease.record())
        self._leases[lease.id] = lease

    def get(self, lease_id: str) -> Lease:
        try:
            return self._leases[lease_id]
        except KeyError:
            raise LeaseNotFound(f"no lease {quote(lease_id)}") from None

    def owned(self, lease_id: str, caller: Caller) -> Lease:
        """The lease, if ``caller`` may act on it (its owner, or root)."""
        lease = self.get(lease_id)
        if not caller.owns(lease.owner_uid):
            raise PermissionDenied(f"lease {quote(lease_id)} belongs to another user")
        return lease

    def pop(self, lease_id: str) -> Lease:
        """Forget a lease; its record goes when its VM stops."""
        try:
            return self._leases.pop(lease_id)
        except KeyError:
            raise LeaseNotFound(f"no lease {quote(lease_id)}") from None

    def withdraw(self, request_id: str, caller: Caller) -> Lease | None:
        """The caller's lease made for ``request_id``, popped; None (and the id is
        remembered, so that lease ends as soon as it is made) if there is none yet."""
        for lease in self._leases.values():
            if lease.request_id == request_id and lease.owner_uid == caller.uid:
                return self._leases.pop(lease.id)
        now = time.monotonic()
        self._withdrawn = {k: t for k, t in self._withdrawn.items()
                           if now - t < WITHDRAWN_KEEP_S}
        if len(self._withdrawn) < WITHDRAWN_MAX:
            self._withdrawn[(caller.uid, request_id)] = now
        return None

    def was_withdrawn(self, lease: Lease) -> bool:
        """Whether the request that made ``lease`` was withdrawn before it came."""
        key = (lease.owner_uid, lease.request_id)
        return bool(lease.request_id) and self._withdrawn.pop(key, None) is not None

    def expired(self, now: float | None = None) -> list[Lease]:
        now = time.time() if now is None else now
        return [lease for lease in self._leases.values()
                if lease.expires is not None and lease.expires <= now]
