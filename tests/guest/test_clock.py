"""The guest clock follows the host time every agent call carries (guest/agent/clock).

The unit tests drive ClockFollower with a test double of the platform (a clock
that records each set); the stand-in tests go through the real agent over ttrpc.
"""

from __future__ import annotations

import time

import pytest

from tests import standin
from vmfactory.guest.agent.clock import HOST_TIME_KEY, SLACK_NS, ClockFollower, host_time
from vmfactory.guest.agent.platform import HostStandInPlatform
from vmfactory.hypervisor.process import ProcessVm
from vmfactory.proto import agent_pb2 as pb
from vmfactory.ttrpc import aio as ttrpc

pytestmark = pytest.mark.timeout(60)
run_root, hypervisor, vm = standin.run_root, standin.hypervisor, standin.vm

HOUR_NS = 3600 * 10**9


class _Clock(HostStandInPlatform):
    """A test double: the stand-in platform, counting clock sets (and refusing
    them when ``refuse`` is set)."""

    def __init__(self) -> None:
        super().__init__()
        self.sets: list[int] = []
        self.refuse = False

    def set_time(self, unix_ns: int) -> None:
        if self.refuse:
            raise PermissionError(1, "Operation not permitted")
        self.sets.append(unix_ns)
        super().set_time(unix_ns)


@pytest.mark.parametrize("values", [[], [""], ["-5"], ["12x"], ["1" * 21], ["0"], [" 1"]])
def test_a_missing_or_malformed_host_time_is_ignored(values: list[str]) -> None:
    assert host_time({HOST_TIME_KEY: values} if values else {}) is None
    clock = _Clock()
    clock.set_time(time.time_ns() - HOUR_NS)
    clock.sets.clear()
    ClockFollower(clock).follow({HOST_TIME_KEY: values})
    assert clock.sets == []


def test_a_lagging_clock_steps_forward_and_never_back() -> None:
    clock = _Clock()
    follower = ClockFollower(clock)
    clock.set_time(time.time_ns() - HOUR_NS)  # as a VM paused for an hour
    host = time.time_ns()
    follower.follow({HOST_TIME_KEY: [str(host)]})
    assert clock.sets[-1] == host and follower.steps == 1
    assert abs(clock.now_ns() - time.time_ns()) < 10**9
    # A request that waited in a queue carries an older time: no step back.
    follower.follow({HOST_TIME_KEY: [str(host - HOUR_NS)]})
    # Within the slack: no step either (no clock_settime per call).
    follower.follow({HOST_TIME_KEY: [str(clock.now_ns() + SLACK_NS // 2)]})
    assert follower.steps == 1 and len(clock.sets) == 2


def test_a_refused_step_leaves_the_call_alone() -> None:
    clock = _Clock()
    clock.refuse = True
    follower = ClockFollower(clock)
    follower.follow({HOST_TIME_KEY: [str(time.time_ns() + HOUR_NS)]})  # logs, no raise
    assert follower.steps == 0


async def test_the_agents_clock_follows_the_first_call_after_a_lag(vm: ProcessVm) -> None:
    assert vm.agent is not None
    await vm.agent.set_time(time.time_ns() - HOUR_NS)  # the stand-in keeps an offset
    # A call without the host's time (a raw ttrpc client) leaves the lag alone ...
    raw = await ttrpc.Client.connect_unix(str(vm.agent_socket))
    try:
        reply = pb.GuestInfo.FromString(await raw.call(
            "vmfactory.agent.v1.Agent", "GetInfo", pb.GetInfoRequest().SerializeToString(),
            timeout=5.0))
    finally:
        await raw.close()
    assert time.time_ns() - reply.time_unix_ns > HOUR_NS - 10 * 10**9
    # ... the host's agent client sends it with every call: the first one fixes it.
    info = await vm.agent.info(0)
    assert abs(info.time_unix_ns - time.time_ns()) < 2 * 10**9
