"""The adaptive sizing policy on a simulated clock: stable under a steady rate,
quick to rise on a burst, back to its minimum once idle."""

from __future__ import annotations

import random

from vmfactory.config import PoolConfig
from vmfactory.daemon.sizing import COOLDOWN_S, Sizer

ADAPTIVE = PoolConfig(name="a", min_size=1, max_size=12, sizing="adaptive")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(sizer: Sizer, clock: Clock, seconds: float, rate: float, rng: random.Random,
        refill_s: float = 1.5) -> list[int]:
    """Poisson arrivals at ``rate`` for ``seconds``, the target read every second."""
    targets, end = [], clock.now + seconds
    arrival = clock.now + rng.expovariate(rate) if rate else end + 1.0
    for tick in range(1, int(seconds) + 1):
        second = end - seconds + tick
        while arrival <= second:
            clock.now = arrival
            sizer.request()
            sizer.refilled(refill_s)
            arrival += rng.expovariate(rate) if rate else seconds
        clock.now = second
        targets.append(sizer.target())
    return targets


def test_a_fixed_pool_keeps_its_minimum() -> None:
    clock = Clock()
    sizer = Sizer(PoolConfig(name="f", min_size=2, max_size=8), clock)
    assert run(sizer, clock, 300, 5.0, random.Random(1)) == [2] * 300


def test_a_steady_rate_settles_and_stays() -> None:
    clock, rng = Clock(), random.Random(7)
    sizer = Sizer(ADAPTIVE, clock)
    run(sizer, clock, 600, 1.0, rng)  # warm up: the slow average fills in
    changes = sizer.changes
    targets = run(sizer, clock, 1800, 1.0, rng)
    assert sizer.changes - changes <= 2, targets  # no oscillation over 30 minutes
    assert max(targets) - min(targets) <= 1
    assert 3 <= targets[-1] <= 8  # about rate * refill + 2 sqrt(rate * refill)


def test_a_burst_raises_the_target_at_once_and_idle_brings_it_back() -> None:
    clock, rng = Clock(), random.Random(3)
    sizer = Sizer(ADAPTIVE, clock)
    assert run(sizer, clock, 60, 0.05, rng)[-1] == 1
    before = sizer.target()
    for _ in range(8):  # eight requests within one second
        sizer.request()
        sizer.refilled(1.5)
    assert sizer.target() >= before + 2
    idle = run(sizer, clock, 20 * COOLDOWN_S, 0.0, rng)
    assert idle[-1] == 1  # back to min_size
    assert all(a >= b for a, b in zip(idle, idle[1:]))  # down only
    assert sum(a != b for a, b in zip(idle, idle[1:])) <= 2


def test_regular_bursts_keep_warm_vms_that_the_average_would_not() -> None:
    clock, rng = Clock(), random.Random(5)
    sizer = Sizer(ADAPTIVE, clock)
    targets = []
    for _ in range(40):  # six requests at once every 30 s, over a trickle
        for _ in range(6):
            sizer.request()
            sizer.refilled(2.0)
        targets += run(sizer, clock, 30, 0.1, rng, refill_s=2.0)
    assert min(targets[:30]) >= 6  # the first burst, in a pool seconds old, counts too
    assert sizer.desired() >= 6 and min(targets[300:]) >= 6
    average = sizer.rate() * sizer.refill_s
    assert average + 2 * average ** 0.5 < 4  # what the formula alone would keep
    assert sizer.report()["burst_peak"] >= 6


def test_bounds_are_kept_and_a_new_configuration_applies_at_once() -> None:
    clock = Clock()
    sizer = Sizer(ADAPTIVE, clock)
    for _ in range(500):
        sizer.request()
    assert sizer.target() == 12  # max_size
    sizer.configure(PoolConfig(name="a", min_size=1, max_size=4, sizing="adaptive"))
    assert sizer.target() == 4
    report = sizer.report()
    assert report["policy"] == "adaptive" and report["target"] == 4 and report["rate_per_s"] > 10


def test_a_burst_keeps_room_for_the_background_while_it_is_refilled() -> None:
    """Six at once over 0.1/s with 2 s refills: refilled in 3 rounds of 2 (6 s), in
    which the background brings 0.6 more on average: 6 + 0.6 + 2 sqrt(0.6) -> 9.
    One refill at a time would take 12 s: more still."""
    targets = {}
    for concurrency in (2, 1):
        clock, rng = Clock(), random.Random(11)
        sizer = Sizer(ADAPTIVE, clock, refill_concurrency=concurrency)
        run(sizer, clock, 240, 0.1, rng, refill_s=2.0)
        for _ in range(6):
            sizer.request()
            sizer.refilled(2.0)
        targets[concurrency] = sizer.target()
    assert targets[2] >= 8   # (counting one refill time of background: 7)
    assert targets[1] > targets[2]
