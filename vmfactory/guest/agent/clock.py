"""The guest clock follows its host's: every agent call carries the host's time.

A pooled VM waits paused, and a clone resumes from its template's save time, so
the guest's wall clock lags its host's by the time it did not run.  Rather than
a clock round trip in the daemon's handout, the host's agent client sends its
clock (``time.time_ns()`` as decimal text) in the metadata of every call, and
the agent steps its clock forward when it lags by more than ``SLACK_NS``.  The
clock is only ever moved forward here: a request that waited in a queue carries
an older time than the host's by then, never a newer one.  ``SetTime`` remains
for a caller that wants the clock set outright.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from vmfactory.guest.agent.platform import Platform

logger = logging.getLogger(__name__)

HOST_TIME_KEY = "vmfactory-host-time-ns"
SLACK_NS = 20_000_000   # lags under 20 ms are left alone: no step per call
MAX_DIGITS = 20         # a 64-bit nanosecond count; anything longer is not a time


def host_time(metadata: Mapping[str, Sequence[str]]) -> int | None:
    """The host time a call carries, or None (absent or not a positive integer)."""
    values = metadata.get(HOST_TIME_KEY)
    if not values or len(values[0]) > MAX_DIGITS or not values[0].isdigit():
        return None
    return int(values[0]) or None


class ClockFollower:
    """Steps ``platform``'s clock forward to the time a call carries."""

    def __init__(self, platform: Platform) -> None:
        self._platform = platform
        self.steps = 0

    def follow(self, metadata: Mapping[str, Sequence[str]]) -> None:
        host_ns = host_time(metadata)
        if host_ns is None or host_ns - self._platform.now_ns() <= SLACK_NS:
            return
        try:
            self._platform.set_time(host_ns)
        except OSError as exc:  # the call itself still runs; the clock stays behind
            logger.warning("cannot step the clock forward: %s", exc)
            return
        self.steps += 1
