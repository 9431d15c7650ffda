"""The admin API's response bodies (its request body, PoolPatch, sits with the
handlers): what /openapi.json documents and what every answer is checked against."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class ErrorBody(BaseModel):
    """Every error: the project's error class and one line."""

    error: str
    message: str


class Health(BaseModel):
    status: str
    version: str


class Readiness(BaseModel):
    ready: bool
    reasons: list[str]


class PoolStatus(BaseModel):
    name: str
    base: str
    min_size: int
    max_size: int
    target: int
    sizing: Literal["fixed", "adaptive"]
    ready: int
    refilling: int
    handouts: int
    misses: int
    replaced: int
    keep_running: bool
    tenant: str


class PoolSettings(BaseModel):
    """The pool's configuration now (a PATCH changes it until the daemon restarts)."""

    name: str
    cpus: int
    memory_mib: int
    base: str
    min_size: int
    max_size: int
    keep_running: bool
    empty: str
    warm_containers: bool
    tenant: str
    sizing: Literal["fixed", "adaptive"]


class SizingReport(BaseModel):
    """What the sizing policy saw and chose (see vmfactory.daemon.sizing)."""

    policy: Literal["fixed", "adaptive"]
    rate_per_s: float
    refill_s: float
    burst_peak: int
    burst_bar: int
    background_rate_per_s: float
    desired: int
    target: int
    headroom: float
    cooldown_s: float


class PoolView(PoolStatus):
    config: PoolSettings
    sizing_report: SizingReport


class Drained(BaseModel):
    stopped: int


class VmView(BaseModel):
    """A VM the daemon holds; ``lease_id`` only for its lessee (and root)."""

    vm_id: str
    pid: int
    state: str
    pool: str
    lease_id: str
    owner_uid: int
    tenant: str
    cpus: int
    memory_mib: int
    source: str
    age_s: float
    cpu_percent: float
    rss_mib: float
    pss_mib: float


class LeaseView(BaseModel):
    """A lease; ``lease_id`` only for its owner (and root)."""

    lease_id: str
    vm_id: str
    pool: str
    source: str
    owner_uid: int
    client: str
    tenant: str
    ttl_s: float
    expires_in_s: float | None
    age_s: float


class TemplateFactoryView(BaseModel):
    """A template factory: its current template's record and what it made."""

    name: str
    tenant: str
    base: str
    clones: int
    rotations: int
    rotation_due: str | None  # why the template should be replaced now
    fallbacks: dict[str, int]
    template: dict[str, Any]
    direct: dict[str, Any]


class Host(BaseModel):
    memory_total_bytes: int
    memory_available_bytes: int
    mem_floor_mib: int
    version: str
    uptime_s: float
    state: str


class LatencySeries(BaseModel):
    """One GetVM histogram (by source and pool): cumulative ``[le, count]`` buckets."""

    source: str
    pool: str
    buckets: list[tuple[str, float]]
    count: float = 0.0
    sum: float = 0.0
