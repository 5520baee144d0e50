"""The slow-step log names the task whose step held the event loop, and only that one."""

from __future__ import annotations

import logging
import time

import pytest
import trio
import trio.testing

from emlisten.service.watchdog import SlowStepLog


async def test_a_step_that_holds_the_loop_is_named(caplog: pytest.LogCaptureFixture) -> None:
    async def hog() -> None:
        await trio.lowlevel.checkpoint()
        time.sleep(0.06)  # noqa: ASYNC251 - the point: a step that blocks the loop
        await trio.lowlevel.checkpoint()

    async def polite() -> None:
        for _ in range(5):
            await trio.sleep(0.001)

    watchdog = SlowStepLog(threshold_ms=40)
    trio.lowlevel.add_instrument(watchdog)
    try:
        with caplog.at_level(logging.WARNING, logger="emlisten.service.watchdog"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hog, name="the-hog")
                nursery.start_soon(polite, name="polite")
    finally:
        trio.lowlevel.remove_instrument(watchdog)
    lines = [r.getMessage() for r in caplog.records if r.name == "emlisten.service.watchdog"]
    assert len(lines) == 1, lines
    assert "task the-hog" in lines[0] and "hog:" in lines[0]
    held_ms = float(lines[0].split("held ")[1].split(" ms")[0])
    assert 55 <= held_ms < 1000


async def test_a_pass_of_many_short_steps_is_named_by_its_tasks(caplog: pytest.LogCaptureFixture) -> None:
    # Hundreds of tasks woken by one event: no step is slow, the pass that runs them all is.
    woken = trio.Event()

    async def waiter() -> None:
        await woken.wait()
        time.sleep(0.0004)  # noqa: ASYNC251 - a short step, but hundreds of them in one pass

    watchdog = SlowStepLog(threshold_ms=40)
    with caplog.at_level(logging.WARNING, logger="emlisten.service.watchdog"):
        async with trio.open_nursery() as nursery:
            for index in range(300):
                nursery.start_soon(waiter, name=f"mailbox:{index}")
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.add_instrument(watchdog)
            woken.set()
        trio.lowlevel.remove_instrument(watchdog)
    lines = [r.getMessage() for r in caplog.records if r.name == "emlisten.service.watchdog"]
    assert not any("one step of task" in line for line in lines), lines
    passes = [line for line in lines if line.startswith("one pass of the event loop")]
    assert len(passes) == 1, lines
    steps = int(passes[0].split(": ")[1].split(" task step")[0])
    assert 300 <= steps <= 302, passes[0]
    assert "busiest: mailbox " in passes[0], passes[0]
