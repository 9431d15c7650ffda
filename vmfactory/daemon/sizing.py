"""How many ready VMs a pool keeps: ``fixed`` (its ``min_size``) or ``adaptive``.

Adaptive: the target is what is expected to be asked for while one VM is being
made, with headroom for the noise of random arrivals::

    target = ceil(rate * refill + HEADROOM * sqrt(rate * refill)),  min_size..max_size

``rate`` (requests per second) is an exponentially decayed count with a time
constant of 120 s, or the 10 s count while that is well above what the slow one
predicts (the rate rose).  ``refill`` is an exponentially weighted mean of the
measured refill times.  Bursts are what that formula cannot see: a burst is a
window of one refill time holding at least 3 requests and more than random
arrivals at the background rate (requests outside bursts, so regular bursts
do not raise their own bar) would put there in one of 1000 two-minute spans (a
Poisson tail bound).  The biggest burst of the last two minutes, plus the
formula's value for the background arriving while that burst is refilled (in
rounds of ``daemon.refill_concurrency`` refills), is the target's floor: 6
requests in a second over a trickle want 8 warm VMs, whatever the average, while the
ordinary peaks of a steady rate change nothing.  The target rises once the
computed value is half a VM above it, and falls to it in one step only after
the computed value stayed below it for a cool-down: under a steady rate it
settles and stays.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from vmfactory.config import PoolConfig

FAST_TAU_S = 10.0
SLOW_TAU_S = 120.0
HEADROOM = 2.0
COOLDOWN_S = 30.0
RISE_MARGIN = 0.5
# A rising rate: the fast count exceeds BURST_FACTOR times the slow one by BURST_EVENTS.
BURST_FACTOR = 2.0
BURST_EVENTS = 3.0
# A burst: a peak that steady arrivals reach in at most FALSE_BURSTS of PEAK_MEMORY_S spans.
PEAK_MEMORY_S = 120.0
FALSE_BURSTS = 1e-3
MIN_BURST = 3
REFILL_ALPHA = 0.3
INITIAL_REFILL_S = 2.0


class DecayingRate:
    """Events per second, each event's weight decaying with time constant ``tau``.

    Until it has watched for ``tau`` the decayed count underestimates the rate; it
    is divided by the weight the time watched carries (at least ``min_age``'s, so
    a first event is not taken for a flood)."""

    def __init__(self, tau: float, start: float, min_age: float) -> None:
        self.tau, self._start, self._min_age = tau, start, min_age
        self._value = 0.0
        self._at: float | None = None

    def _decay(self, now: float) -> None:
        if self._at is not None:
            self._value *= math.exp(-max(0.0, now - self._at) / self.tau)
        self._at = now

    def add(self, now: float) -> None:
        self._decay(now)
        self._value += 1.0 / self.tau

    def remove(self, at: float, now: float) -> None:
        """Take back the event added at ``at``."""
        self._decay(now)
        self._value = max(0.0, self._value - math.exp(-max(0.0, now - at) / self.tau) / self.tau)

    def value(self, now: float) -> float:
        self._decay(now)
        age = max(self._min_age, now - self._start)
        return self._value / (1.0 - math.exp(-age / self.tau))


def poisson_bar(mean: float, p: float) -> int:
    """The smallest ``k`` with P(X >= k) <= ``p`` for X ~ Poisson(``mean``)."""
    k, pmf, below = 0, math.exp(-mean), 0.0
    while 1.0 - below > p and k < 10_000:
        below += pmf
        k += 1
        pmf *= mean / k
    return k


class Sizer:
    """The target of one pool, from what it sees: requests and refill times."""

    def __init__(self, config: PoolConfig, clock: Callable[[], float] = time.monotonic,
                 refill_concurrency: int = 1) -> None:
        self.config = config
        self._clock = clock
        self._concurrency = max(1, refill_concurrency)  # refills in flight at once
        start = clock()
        self._fast = DecayingRate(FAST_TAU_S, start, FAST_TAU_S)
        # A young pool's slow counts are scaled up, but no more than 2.5 times: a burst
        # in its first seconds must not pass for its background rate.
        self._slow = DecayingRate(SLOW_TAU_S, start, SLOW_TAU_S / 2)
        self.refill_s = INITIAL_REFILL_S
        self._background = DecayingRate(SLOW_TAU_S, start, SLOW_TAU_S / 2)  # arrivals that were not in a burst
        # Arrivals within the last refill time, and whether the background counted them.
        self._window: deque[list[Any]] = deque()
        self._peaks: deque[tuple[float, int]] = deque()  # (when, burst size), falling
        self._target = config.min_size
        self._lower_since: float | None = None
        self.changes = 0

    def configure(self, config: PoolConfig) -> None:
        """New sizes or policy (an operator's PATCH); the target follows at once."""
        self.config = config
        self._target = min(max(self._target, config.min_size), config.max_size)

    def request(self) -> None:
        now = self._clock()
        self._fast.add(now)
        self._slow.add(now)
        while self._window and self._window[0][0] < now - self.refill_s:
            self._window.popleft()
        self._window.append([now, False])
        if len(self._window) < self._burst_bar():
            self._background.add(now)
            self._window[-1][1] = True
            return
        for arrival in self._window:  # a burst: none of it is background
            if arrival[1]:
                self._background.remove(arrival[0], now)
                arrival[1] = False
        while self._peaks and self._peaks[-1][1] <= len(self._window):
            self._peaks.pop()  # a later, bigger burst outlives it
        self._peaks.append((now, len(self._window)))

    def peak(self) -> int:
        """The biggest burst (requests within one refill time) in the last PEAK_MEMORY_S."""
        now = self._clock()
        while self._peaks and self._peaks[0][0] < now - PEAK_MEMORY_S:
            self._peaks.popleft()
        return self._peaks[0][1] if self._peaks else 0

    def refilled(self, seconds: float) -> None:
        self.refill_s += REFILL_ALPHA * (seconds - self.refill_s)

    def rate(self) -> float:
        """Requests per second: the slow count, or the fast one during a burst."""
        now = self._clock()
        fast, slow = self._fast.value(now), self._slow.value(now)
        return fast if fast > BURST_FACTOR * slow + BURST_EVENTS / FAST_TAU_S else slow

    def _wanted(self) -> float:
        load = self.rate() * self.refill_s
        wanted = load + HEADROOM * math.sqrt(load)
        peak = self.peak()
        if not peak:
            return wanted
        # The burst comes on top of the background, which goes on while the burst is
        # refilled: in rounds of as many refills as may run at once.
        recovery_s = self.refill_s * math.ceil(peak / self._concurrency)
        background = self._background.value(self._clock()) * recovery_s
        return max(wanted, peak + background + HEADROOM * math.sqrt(background))

    def _burst_bar(self) -> int:
        # Judged against the arrivals outside bursts, or regular bursts would raise their own bar.
        load = self._background.value(self._clock()) * self.refill_s
        spans = max(1.0, PEAK_MEMORY_S / max(self.refill_s, 0.1))
        return max(MIN_BURST, poisson_bar(load, FALSE_BURSTS / spans))

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
                self._move(desired)
        else:
            self._lower_since = None
        return self._target

    def _move(self, target: int) -> None:
        self._target, self._lower_since = target, None
        self.changes += 1

    def report(self) -> dict[str, Any]:
        """What the policy saw and chose (for /v1/pools/{name})."""
        return {"policy": self.config.sizing, "rate_per_s": round(self.rate(), 4),
                "refill_s": round(self.refill_s, 3), "burst_peak": self.peak(),
                "burst_bar": self._burst_bar(),
                "background_rate_per_s": round(self._background.value(self._clock()), 4),
                "desired": self.desired(),
                "target": self.target(), "headroom": HEADROOM, "cooldown_s": COOLDOWN_S}
