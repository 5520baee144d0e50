"""ConnectPacer: pure timing logic, checked on Trio's mock clock (no real time passes)."""

from __future__ import annotations

import itertools
import math

import pytest
import trio
import trio.testing

from emlisten.service.pacing import MIN_RATE, ConnectPacer


async def start_times(pacer: ConnectPacer, count: int, *, ok: bool = True) -> list[float]:
    times: list[float] = []

    async def one() -> None:
        async with pacer.attempt() as attempt:
            times.append(trio.current_time())
            if ok:
                attempt.succeeded()
            else:
                attempt.failed()

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return sorted(times)


async def test_attempts_are_spaced_by_the_rate(autojump_clock: trio.testing.MockClock) -> None:
    pacer = ConnectPacer(max_concurrent=64, max_per_second=100)
    times = await start_times(pacer, 201)
    # 201 attempts at 100/s: the last one starts 2 s after the first, none earlier than its turn.
    assert times[-1] - times[0] == pytest.approx(2.0)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) == pytest.approx(0.01)


async def test_no_limit_means_no_waiting(autojump_clock: trio.testing.MockClock) -> None:
    pacer = ConnectPacer(max_concurrent=1000, max_per_second=0)
    times = await start_times(pacer, 500)
    assert times[-1] == times[0]
    assert pacer.rate == math.inf


async def test_concurrency_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    pacer = ConnectPacer(max_concurrent=3, max_per_second=0)
    running = peak = 0

    async def one() -> None:
        nonlocal running, peak
        async with pacer.attempt():
            running += 1
            peak = max(peak, running)
            await trio.sleep(1)
            running -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(one)
    assert peak == 3


async def test_failures_halve_the_rate_once_a_second_and_successes_restore_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pacer = ConnectPacer(max_concurrent=64, max_per_second=100)
    await start_times(pacer, 20, ok=False)  # all within 0.2 s: one signal, one cut
    assert pacer.rate == 50
    await trio.sleep(1)
    await start_times(pacer, 1, ok=False)
    assert pacer.rate == 25
    for _ in range(20):  # never below the floor
        await trio.sleep(1)
        await start_times(pacer, 1, ok=False)
    assert pacer.rate == MIN_RATE
    # Additive increase: about a tenth of the maximum (10/s) per second of successes.
    start = trio.current_time()
    while pacer.rate < 100:
        await start_times(pacer, 1)
    assert 8 <= trio.current_time() - start <= 12
