"""Arrival traces for the sizing benchmark: when each request comes and how long
it holds its VM, generated from a seed so every policy replays the same one.

* steady:  Poisson arrivals at a constant rate;
* bursty:  a Poisson trickle plus bursts (several requests within a fraction of
           a second) at roughly regular intervals;
* diurnal: a Poisson rate following one compressed day, low to high and back
           (a raised cosine), drawn by thinning.

Every trace starts with a warm-up (the policy learns, nothing is counted) of the
same shape as what follows."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

HOLD_MEAN_S = 2.0
HOLD_MAX_S = 10.0


@dataclass(frozen=True)
class Arrival:
    at: float     # seconds from the trace's start
    hold: float   # seconds the VM is kept before release


@dataclass(frozen=True)
class Trace:
    name: str
    warmup_s: float
    measured_s: float
    arrivals: list[Arrival]
    shape: str    # one line for the report

    @property
    def duration_s(self) -> float:
        return self.warmup_s + self.measured_s


def _hold(rng: random.Random) -> float:
    return min(rng.expovariate(1 / HOLD_MEAN_S), HOLD_MAX_S)


def poisson(rng: random.Random, rate: float, start: float, end: float) -> list[float]:
    """Arrival times of a Poisson process at ``rate``/s in [start, end)."""
    times, at = [], start + rng.expovariate(rate)
    while at < end:
        times.append(at)
        at += rng.expovariate(rate)
    return times


def steady(rng: random.Random, warmup: float, measured: float, rate: float = 0.5) -> Trace:
    times = poisson(rng, rate, 0.0, warmup + measured)
    return Trace("steady", warmup, measured, [Arrival(t, _hold(rng)) for t in times],
                 f"Poisson, {rate:g}/s")


def bursty(rng: random.Random, warmup: float, measured: float, *, background: float = 0.1,
           size: int = 6, every: float = 20.0, spread: float = 0.3) -> Trace:
    end = warmup + measured
    times = poisson(rng, background, 0.0, end)
    start = every / 2
    while start < end:
        at = start + rng.uniform(-every / 6, every / 6)
        times += [at + rng.uniform(0.0, spread) for _ in range(size)]
        start += every
    times = sorted(t for t in times if 0.0 <= t < end)
    return Trace("bursty", warmup, measured, [Arrival(t, _hold(rng)) for t in times],
                 f"Poisson {background:g}/s + bursts of {size} within {spread:g} s "
                 f"every ~{every:g} s")


def diurnal(rng: random.Random, warmup: float, measured: float, *, low: float = 0.05,
            high: float = 1.0) -> Trace:
    """Night (``low``) through the warm-up, then one day over the measured span."""
    def rate(t: float) -> float:
        if t < warmup:
            return low
        phase = 2 * math.pi * (t - warmup) / measured
        return low + (high - low) * (1 - math.cos(phase)) / 2
    times = [t for t in poisson(rng, high, 0.0, warmup + measured)
             if rng.random() < rate(t) / high]
    return Trace("diurnal", warmup, measured, [Arrival(t, _hold(rng)) for t in times],
                 f"Poisson, {low:g}/s -> {high:g}/s -> {low:g}/s over the measured span")


def traces(seed: int, warmup: float, measured: dict[str, float]) -> list[Trace]:
    """The three traces, each from its own generator seeded from ``seed``."""
    makers = {"steady": steady, "bursty": bursty, "diurnal": diurnal}
    return [makers[name](random.Random(f"{seed}-{name}"), warmup, span)
            for name, span in measured.items()]
