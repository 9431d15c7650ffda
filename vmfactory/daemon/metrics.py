"""The daemon's Prometheus metrics (text exposition through the admin API).

Latencies are histograms observed as they happen (GetVM by source and pool,
refills by pool); everything else is read from the daemon's own state at each
scrape, so nothing is counted twice:

==========================================  ==========================================
vmfactory_getvm_duration_seconds            histogram {source, pool}
vmfactory_refill_duration_seconds           histogram {pool}
vmfactory_handouts_total                    {pool}
vmfactory_misses_total                      {pool}
vmfactory_replacements_total                {pool}
vmfactory_refill_failures_total             {pool}
vmfactory_fallbacks_total                   {template, reason}: no clone, a boot
vmfactory_pool_ready / _target / _refilling {pool}
vmfactory_vms                               {state}
vmfactory_leases                            {owner_uid}
vmfactory_template_age_seconds / _clones    {template}
vmfactory_host_memory_available_bytes
vmfactory_vm_pss_bytes                      {vm_id, pool, role}
vmfactory_recovery_seconds / _recovered_vms
==========================================  ==========================================
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Protocol

import psutil
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vmfactory.daemon.leases import LeaseTable
from vmfactory.daemon.pools import Pool
from vmfactory.daemon.recovery import RecoveryReport
from vmfactory.errors import VmFactoryError
from vmfactory.factory.template_factory import TemplateFactory

GETVM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                 30.0)
REFILL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Observed(Protocol):
    """What the metrics read of the daemon at each scrape."""

    pools: dict[str, Pool]
    leases: LeaseTable
    templates: dict[str, TemplateFactory]
    recovery: RecoveryReport


class DaemonMetrics:
    """A registry of its own (not the process-global one): one per daemon."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.getvm = Histogram("vmfactory_getvm_duration_seconds",
                               "GetVM, from the request to the lease, by where the VM came from",
                               ["source", "pool"], buckets=GETVM_BUCKETS, registry=self.registry)
        self.refill = Histogram("vmfactory_refill_duration_seconds",
                                "Making one VM for a pool (clone or boot, warm-up, pause)",
                                ["pool"], buckets=REFILL_BUCKETS, registry=self.registry)

    def watch(self, daemon: Observed) -> None:
        """Read ``daemon``'s state at each scrape."""
        self.registry.register(_StateCollector(daemon))

    def observe_refill(self, pool: str, seconds: float) -> None:
        self.refill.labels(pool).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def histograms(self) -> list[dict[str, object]]:
        """The GetVM histograms as JSON-ready cumulative buckets (the status page)."""
        out: list[dict[str, object]] = []
        for metric in self.getvm.collect():
            series: dict[tuple[str, str], dict[str, object]] = {}
            for sample in metric.samples:
                key = (sample.labels.get("source", ""), sample.labels.get("pool", ""))
                entry = series.setdefault(key, {"source": key[0], "pool": key[1], "buckets": []})
                if sample.name.endswith("_bucket"):
                    entry["buckets"].append([sample.labels["le"], sample.value])  # type: ignore[union-attr]
                elif sample.name.endswith("_count"):
                    entry["count"] = sample.value
                elif sample.name.endswith("_sum"):
                    entry["sum"] = sample.value
            out += list(series.values())
        return out


class _StateCollector(Collector):
    def __init__(self, daemon: Observed) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        yield from self._pools()
        yield from self._vms()
        yield from self._templates()
        memory = GaugeMetricFamily("vmfactory_host_memory_available_bytes",
                                   "Host memory available (refills pause under the floor)")
        memory.add_metric([], psutil.virtual_memory().available)
        yield memory
        recovery = GaugeMetricFamily("vmfactory_recovery_seconds",
                                     "How long taking back a previous daemon's VMs took")
        recovery.add_metric([], self.daemon.recovery.seconds)
        yield recovery
        recovered = GaugeMetricFamily("vmfactory_recovered_vms", "VMs taken back at start")
        recovered.add_metric([], self.daemon.recovery.adopted)
        yield recovered

    def _pools(self) -> Iterator[Metric]:
        counters = {name: CounterMetricFamily(f"vmfactory_{name}", doc, labels=["pool"])
                    for name, doc in (("handouts", "Pooled VMs handed out"),
                                      ("misses", "Requests that found the pool empty"),
                                      ("replacements", "Pooled VMs replaced (died, failed)"),
                                      ("refill_failures", "Refills that failed"))}
        gauges = {name: GaugeMetricFamily(f"vmfactory_pool_{name}", doc, labels=["pool"])
                  for name, doc in (("ready", "Ready VMs"), ("target", "The pool's target"),
                                    ("refilling", "Refills in flight"))}
        for pool in self.daemon.pools.values():
            values = {"handouts": pool.handouts, "misses": pool.misses,
                      "replacements": pool.replaced, "refill_failures": pool.refill_failures,
                      "ready": len(pool.ready), "target": pool.sizer.target(),
                      "refilling": pool.refilling}
            for name, family in (*counters.items(), *gauges.items()):
                family.add_metric([pool.name], values[name])
        yield from counters.values()
        yield from gauges.values()

    def _vms(self) -> Iterator[Metric]:
        states: Counter[str] = Counter()
        owners: Counter[str] = Counter()
        pss = GaugeMetricFamily("vmfactory_vm_pss_bytes", "Host memory of a VM's process (PSS)",
                                labels=["vm_id", "pool", "role"])
        held = [(vm, p.name, "pooled") for p in self.daemon.pools.values() for vm in p.ready]
        held += [(le.vm, le.pool, "leased") for le in self.daemon.leases.values()]
        for lease in self.daemon.leases.values():
            owners[str(lease.owner_uid)] += 1
        for vm, pool, role in held:
            states[vm.state.value] += 1
            try:
                pss.add_metric([vm.id, pool, role], vm.memory().pss_mib * (1 << 20))
            except (psutil.Error, OSError, VmFactoryError):
                continue  # it is going away
        by_state = GaugeMetricFamily("vmfactory_vms", "VMs the daemon holds, by state",
                                     labels=["state"])
        for state, count in states.items():
            by_state.add_metric([state], count)
        leases = GaugeMetricFamily("vmfactory_leases", "Leases, by owner uid",
                                   labels=["owner_uid"])
        for owner, count in owners.items():
            leases.add_metric([owner], count)
        yield from (by_state, leases, pss)

    def _templates(self) -> Iterator[Metric]:
        age = GaugeMetricFamily("vmfactory_template_age_seconds", "Age of the current template",
                                labels=["template"])
        clones = GaugeMetricFamily("vmfactory_template_clones",
                                   "Clones made of the current template", labels=["template"])
        fallbacks = CounterMetricFamily("vmfactory_fallbacks",
                                        "Requests that did not fit the template (booted)",
                                        labels=["template", "reason"])
        for factory in self.daemon.templates.values():
            record = factory.template.record
            if record:
                age.add_metric([factory.name], time.time() - record["created_at"])
                clones.add_metric([factory.name], record["clone_count"])
            for reason, count in factory.fallbacks.items():
                fallbacks.add_metric([factory.name, reason], count)
        yield from (age, clones, fallbacks)
