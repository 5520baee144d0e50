"""Rechecks while a backlog drains: held back (one a second), never longer than the hold limit;
at once when the worker is not busy. The "busy" signal counts tasks taken in the last second."""

from __future__ import annotations

import trio
import trio.testing

from emlisten.config import Settings
from emlisten.queue.inprocess import InProcessQueue
from emlisten.service import delivery
from emlisten.service.delivery import DeliveryWorker, DrainKey, _RecentCount
from emlisten.service.readers import ReaderPool
from emlisten.sink.creatio import CreatioSink
from emlisten.store.memory import MemoryStore


def test_counts_the_current_and_the_previous_second() -> None:
    recent = _RecentCount()
    for i in range(70):
        recent.add(100.0 + i / 100)
    assert recent.in_last_second(100.9) == 70
    # A second later the previous second still speaks for the rate ...
    assert recent.in_last_second(101.5) == 70
    # ... two seconds later nothing does, also after a gap of several seconds.
    assert recent.in_last_second(102.1) == 0
    recent.add(110.0)
    assert recent.in_last_second(110.2) == 1
    assert recent.in_last_second(112.0) == 0


class _RecordingWorker(DeliveryWorker):
    """Records when each recheck starts instead of opening a session (the scheduling is what is
    under test here; the recheck itself is tested against Dovecot in test_fetch_path.py)."""

    def __init__(self) -> None:
        settings = Settings()
        super().__init__(
            settings,
            MemoryStore(),
            InProcessQueue(),
            ReaderPool(None, idle_seconds=0),
            CreatioSink(),  # type: ignore[arg-type]
        )
        self.started: list[float] = []

    async def _recheck(self, key: DrainKey, slots: trio.Semaphore) -> None:
        self.started.append(trio.current_time())
        slots.release()

    def ask(self, count: int) -> None:
        for i in range(count):
            self._rechecks.setdefault((f"m{i}", "INBOX"), trio.current_time())
        self._recheck_asked.set()


async def _run(worker: _RecordingWorker, *, tasks_per_second: int, seconds: float) -> float:
    """Ask 40 rechecks while tasks arrive at the given rate; returns when they were asked."""

    async def traffic() -> None:
        while True:
            for _ in range(tasks_per_second):
                worker._recent_tasks.add(trio.current_time())
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker._run_rechecks)
        if tasks_per_second:
            nursery.start_soon(traffic)
        await trio.sleep(0.5)
        asked_at = trio.current_time()
        worker.ask(40)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()
    return asked_at


async def test_rechecks_wait_while_busy_but_not_past_the_hold(autojump_clock: trio.testing.MockClock) -> None:
    worker = _RecordingWorker()
    asked_at = await _run(worker, tasks_per_second=50, seconds=60)
    waited = [t - asked_at for t in worker.started]
    assert len(waited) == 40
    # One a second while busy ...
    assert waited[:5] == [0.0, 1.0, 2.0, 3.0, 4.0]
    # ... and none later than the hold limit allows.
    assert max(waited) <= delivery._RECHECK_MAX_HOLD_SECONDS + 0.01


async def test_rechecks_run_at_once_when_not_busy(autojump_clock: trio.testing.MockClock) -> None:
    worker = _RecordingWorker()
    asked_at = await _run(worker, tasks_per_second=2, seconds=5)
    assert len(worker.started) == 40
    assert max(worker.started) - asked_at < 0.01


async def test_looks_after_first_idles_are_paced_and_wait_for_rechecks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A cold start asks a look after the first IDLE of every session at once: they start at
    most _CONNECT_RECHECKS_PER_SECOND, and a recheck after new mail does not wait behind them."""
    worker = _RecordingWorker()
    keys: list[DrainKey] = []
    original = worker._recheck

    async def record(key: DrainKey, slots: trio.Semaphore) -> None:
        keys.append(key)
        await original(key, slots)

    worker._recheck = record  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker._run_rechecks)
        await trio.sleep(0.5)
        asked_at = trio.current_time()
        for i in range(100):
            worker._connect_rechecks.setdefault((f"c{i}", "INBOX"), asked_at)
        worker._recheck_asked.set()
        await trio.sleep(1.0)
        worker._rechecks.setdefault(("mail", "INBOX"), trio.current_time())
        worker._recheck_asked.set()
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    started = [t - asked_at for t in worker.started]
    assert len(started) == 101
    rate = delivery._CONNECT_RECHECKS_PER_SECOND
    # Paced: the 100 looks take about 100 / rate seconds, not a burst.
    assert 99 / rate - 0.01 <= max(started) <= 100 / rate + 0.5
    # The recheck after new mail ran as soon as it was asked, ahead of the looks still waiting.
    mail_at = started[keys.index(("mail", "INBOX"))]
    assert mail_at - 1.0 < 1 / rate + 0.01
    assert keys.index(("mail", "INBOX")) < 100
