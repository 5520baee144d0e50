"""The process's looks share one gate: a bounded rate, and while a backlog drains one a second,
none held past the limit (pure scheduling, on Trio's autojump clock)."""

from __future__ import annotations

import itertools

import trio
import trio.testing

from emlisten.mail.imap.source import (
    _LOOK_BUSY_FETCHES_PER_SECOND,
    _LOOK_FAILED_MAX_GAP_SECONDS,
    _LOOK_MAX_HOLD_SECONDS,
    LOOKS_PER_SECOND,
    _LookGate,
)


async def starts_of(gate: _LookGate, looks: int, *, asked_at: float | None = None) -> list[float]:
    """When each of ``looks`` looks, asked at once, may start."""
    asked = trio.current_time() if asked_at is None else asked_at
    started: list[float] = []

    async def look() -> None:
        async with gate.slots:
            await gate.wait_turn(asked)
            started.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for _ in range(looks):
            nursery.start_soon(look)
    return started


async def test_looks_start_at_the_configured_rate(autojump_clock: trio.testing.MockClock) -> None:
    gate = _LookGate()
    started = await starts_of(gate, 50)
    assert len(started) == 50
    gaps = [b - a for a, b in itertools.pairwise(started)]
    assert min(gaps) >= 1 / LOOKS_PER_SECOND - 1e-9
    assert started[-1] - started[0] < 50 / LOOKS_PER_SECOND + 0.1


async def test_while_a_backlog_drains_one_look_a_second(autojump_clock: trio.testing.MockClock) -> None:
    gate = _LookGate()
    start = trio.current_time()

    async def drain() -> None:
        # The listening sessions fetch well above the threshold for 10 s.
        while trio.current_time() - start < 10:
            gate.fetched.add(trio.current_time(), _LOOK_BUSY_FETCHES_PER_SECOND * 2)
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        started = await starts_of(gate, 5)
    assert [round(t - start) for t in started] == [0, 1, 2, 3, 4]


async def test_no_look_is_held_past_the_limit(autojump_clock: trio.testing.MockClock) -> None:
    """Under sustained traffic "draining" may never end; a look asked long ago goes at the
    ordinary rate even so."""
    gate = _LookGate()
    now = trio.current_time()
    gate.fetched.add(now, _LOOK_BUSY_FETCHES_PER_SECOND * 2)
    started = await starts_of(gate, 3, asked_at=now - _LOOK_MAX_HOLD_SECONDS)
    assert started[-1] - now < 3 / LOOKS_PER_SECOND + 1e-9


async def test_failed_looks_slow_the_looks_down_until_one_succeeds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A server that refuses more sessions is not asked 25 times a second for one it will
    refuse: the gap doubles per failure in a row, capped, and the first success resets it."""
    gate = _LookGate()
    for _ in range(20):
        gate.outcome("failed")
    started = await starts_of(gate, 3)
    gaps = [b - a for a, b in itertools.pairwise(started)]
    assert gaps == [_LOOK_FAILED_MAX_GAP_SECONDS] * 2
    gate.outcome("nothing")
    await trio.sleep(_LOOK_FAILED_MAX_GAP_SECONDS)
    started = await starts_of(gate, 3)
    assert started[-1] - started[0] < 3 / LOOKS_PER_SECOND
