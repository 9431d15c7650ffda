"""How many ready VMs a pool keeps: ``fixed`` (its ``min_size``) or ``adaptive``.

Adaptive: the target is what is expected to be asked for while one VM is being
made, with headroom for the noise of random arrivals::

    target = ceil(rate * refill + HEADROOM * sqrt(rate * refill)),  min_size..max_size

``rate`` (requests per second) is an exponentially decayed count with a time
constant of 120 s; during a burst (the 10 s count is well above what the slow
one predicts) it is the 10 s count, so a burst finds warm VMs.  ``refill`` is
an exponentially weighted mean of the measured refill times.  The target rises
once the computed value is half a VM above it, and falls one VM at a time, only
after the computed value stayed below it for a cool-down: under a steady rate
it settles and stays.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from vmfactory.config import PoolConfig

FAST_TAU_S = 10.0
SLOW_TAU_S = 120.0
HEADROOM = 2.0
COOLDOWN_S = 30.0
RISE_MARGIN = 0.5
# A burst: the fast count exceeds BURST_FACTOR times the slow one by BURST_EVENTS.
BURST_FACTOR = 2.0
BURST_EVENTS = 3.0
REFILL_ALPHA = 0.3
INITIAL_REFILL_S = 2.0


class DecayingRate:
    """Events per second, each event's weight decaying with time constant ``tau``."""

    def __init__(self, tau: float) -> None:
        self.tau = tau
        self._value = 0.0
        self._at: float | None = None

    def _decay(self, now: float) -> None:
        if self._at is not None:
            self._value *= math.exp(-max(0.0, now - self._at) / self.tau)
        self._at = now

    def add(self, now: float) -> None:
        self._decay(now)
        self._value += 1.0 / self.tau

    def value(self, now: float) -> float:
        self._decay(now)
        return self._value


class Sizer:
    """The target of one pool, from what it sees: requests and refill times."""

    def __init__(self, config: PoolConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._fast = DecayingRate(FAST_TAU_S)
        self._slow = DecayingRate(SLOW_TAU_S)
        self.refill_s = INITIAL_REFILL_S
        self._target = config.min_size
        self._lower_since: float | None = None
        self.changes = 0

    def configure(self, config: PoolConfig) -> None:
        """New sizes or policy (an operator's PATCH); the target follows at once."""
        self.config = config
        self._target = min(max(self._target, config.min_size), config.max_size)

    def request(self) -> None:
        self._fast.add(self._clock())
        self._slow.add(self._clock())

    def refilled(self, seconds: float) -> None:
        self.refill_s += REFILL_ALPHA * (seconds - self.refill_s)

    def rate(self) -> float:
        """Requests per second: the slow count, or the fast one during a burst."""
        now = self._clock()
        fast, slow = self._fast.value(now), self._slow.value(now)
        return fast if fast > BURST_FACTOR * slow + BURST_EVENTS / FAST_TAU_S else slow

    def _wanted(self) -> float:
        load = self.rate() * self.refill_s
        return load + HEADROOM * math.sqrt(load)

    def _bounded(self, value: int) -> int:
        return min(max(value, self.config.min_size), self.config.max_size)

    def desired(self) -> int:
        """What the formula asks for now, within the pool's bounds."""
        return self._bounded(math.ceil(self._wanted()))

    def target(self) -> int:
        """The pool's target now (fixed: min_size)."""
        if self.config.sizing == "fixed":
            return self.config.min_size
        wanted, now = self._wanted(), self._clock()
        desired = self._bounded(math.ceil(wanted))
        if wanted > self._target + RISE_MARGIN and desired > self._target:
            self._move(desired)
        elif desired < self._target:
            if self._lower_since is None:
                self._lower_since = now
            elif now - self._lower_since >= COOLDOWN_S:
                self._move(self._target - 1)
        else:
            self._lower_since = None
        return self._target

    def _move(self, target: int) -> None:
        self._target, self._lower_since = target, None
        self.changes += 1

    def report(self) -> dict[str, Any]:
        """What the policy saw and chose (for /v1/pools/{name})."""
        return {"policy": self.config.sizing, "rate_per_s": round(self.rate(), 4),
                "refill_s": round(self.refill_s, 3), "desired": self.desired(),
                "target": self.target(), "headroom": HEADROOM, "cooldown_s": COOLDOWN_S}
