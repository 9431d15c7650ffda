"""Supervised background tasks, shielded cleanup and teardowns (no VMs)."""

from __future__ import annotations

import asyncio

import pytest

from vmfactory.util.tasks import Backoff, Policy, Supervisor, Teardown, finish

FAST = Backoff(first_s=0.01, max_s=0.04, reset_after_s=10.0)


async def test_a_failing_task_never_cancels_its_spawner(caplog: pytest.LogCaptureFixture) -> None:
    owner = Supervisor("t", backoff=FAST)

    async def boom() -> None:
        raise ValueError("bad")

    owner.spawn("once", boom)
    await asyncio.sleep(0.05)  # the spawner keeps running: no TaskGroup cancelled it
    assert owner.failures["once"] == 1 and owner.last_error["once"] == "ValueError: bad"
    assert "background task once failed" in caplog.text and "ValueError: bad" in caplog.text
    await owner.close()


async def test_restart_policy_backs_off_and_runs_again() -> None:
    owner = Supervisor("t", backoff=FAST)
    runs: list[float] = []

    async def flaky() -> None:
        runs.append(asyncio.get_running_loop().time())
        if len(runs) < 4:
            raise RuntimeError("not yet")
        await asyncio.sleep(3600)

    owner.spawn("loop", flaky, policy=Policy.RESTART)
    for _ in range(200):
        if len(runs) == 4:
            break
        await asyncio.sleep(0.01)
    assert len(runs) == 4 and owner.failures["loop"] == 3
    gaps = [b - a for a, b in zip(runs, runs[1:])]
    assert gaps[0] >= 0.009 and gaps[2] >= 0.035  # 0.01, 0.02, 0.04: doubling, capped
    assert owner.running("loop")
    await owner.close()
    assert not owner.running("loop")


async def test_fatal_policy_reports_once_to_the_owner() -> None:
    seen: list[tuple[str, BaseException]] = []
    owner = Supervisor("d", on_fatal=lambda name, exc: seen.append((name, exc)))

    async def dies() -> None:
        raise KeyError("k")

    owner.spawn("reaper", dies, policy=Policy.FATAL)
    await asyncio.sleep(0.05)
    assert [(name, type(exc)) for name, exc in seen] == [("d:reaper", KeyError)]
    assert not owner.running("reaper")  # not restarted
    await owner.close()


async def test_close_cancels_everything_and_never_raises() -> None:
    owner = Supervisor("t")
    started = asyncio.Event()
    cleaned = []

    async def sleeper() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.01)
            cleaned.append(True)
            raise RuntimeError("cleanup failed")

    owner.spawn("s", sleeper)
    await started.wait()
    await owner.close()
    await owner.close()  # idempotent
    assert cleaned == [True]
    assert owner.spawn("late", sleeper) is None  # closed: nothing new starts


async def test_finish_completes_cleanup_through_cancellation() -> None:
    done = []

    async def cleanup() -> None:
        await asyncio.sleep(0.05)
        done.append(True)

    async def caller() -> None:
        await finish(cleanup())

    task = asyncio.ensure_future(caller())
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.sleep(0.005)
    task.cancel()  # twice: still finishes first
    with pytest.raises(asyncio.CancelledError):
        await task
    assert done == [True]


async def test_finish_under_a_timeout_becomes_the_timeout() -> None:
    async def cleanup() -> str:
        await asyncio.sleep(0.05)
        return "ok"

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await finish(cleanup())
    assert await finish(cleanup()) == "ok"


async def test_teardown_runs_every_step_and_raises_the_first_failure() -> None:
    ran = []

    async def step(name: str, fail: bool) -> None:
        ran.append(name)
        if fail:
            raise OSError(name)

    teardown = Teardown("t")
    await teardown.step("a", step("a", False))
    await teardown.step("b", step("b", True))
    await teardown.step("c", step("c", True))
    teardown.sync_step("d", lambda: ran.append("d"))
    assert ran == ["a", "b", "c", "d"]
    with pytest.raises(OSError, match="b"):
        teardown.done()
