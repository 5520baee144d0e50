"""The listeners' prefetch memory: taken at once, or with a short patience for real sizes."""

from __future__ import annotations

import trio
import trio.testing

from emlisten.mail.imap.source import ByteBudget


async def test_take_waits_for_memory_given_back(autojump_clock: trio.testing.MockClock) -> None:
    budget = ByteBudget(100)
    assert budget.try_take(80)
    got: list[tuple[bool, float]] = []

    async def taker() -> None:
        started = trio.current_time()
        got.append((await budget.take(50, patience=2.0), trio.current_time() - started))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker)
        await trio.sleep(0.5)
        budget.give_back(80)
    assert got == [(True, 0.5)]
    assert budget.available == 50


async def test_take_gives_up_after_its_patience(autojump_clock: trio.testing.MockClock) -> None:
    budget = ByteBudget(100)
    assert budget.try_take(80)
    started = trio.current_time()
    assert not await budget.take(50, patience=2.0)
    assert trio.current_time() - started == 2.0
    assert not await budget.take(101, patience=2.0)  # more than there is: no waiting at all
    assert trio.current_time() - started == 2.0
    assert budget.available == 20
