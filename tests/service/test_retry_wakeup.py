"""After the receiver's outage, folders waiting to retry go as soon as one of them gets through,
not each at the end of its own backoff (up to the 60 s cap after the receiver was back).

The worker's retry scheduling is what is under test: the sync itself is replaced by a function
of the clock (the delivery path is tested against Dovecot and the Creatio stand-in elsewhere)."""

from __future__ import annotations

from collections.abc import Sequence

import trio
import trio.testing

from emlisten.abc import TaskDelivery
from emlisten.config import Settings
from emlisten.errors import DeliveryError, MailSourceError
from emlisten.models import SyncTask
from emlisten.queue.inprocess import InProcessQueue
from emlisten.service.delivery import DeliveryWorker, DrainKey
from emlisten.service.readers import ReaderPool
from emlisten.sink.creatio import CreatioSink
from emlisten.store.memory import MemoryStore

OUTAGE_ENDS = 45.0


class _Settled(TaskDelivery):
    def __init__(self, task: SyncTask) -> None:
        self.task = task

    async def ack(self) -> None:
        pass

    async def nack(self, *, requeue: bool = True) -> None:
        pass


class _OutageWorker(DeliveryWorker):
    """Every sync fails until OUTAGE_ENDS (with ``error``); records when each folder got through."""

    def __init__(self, error: type[Exception]) -> None:
        super().__init__(
            Settings(),
            MemoryStore(),
            InProcessQueue(),
            ReaderPool(None, idle_seconds=0),
            CreatioSink(),  # type: ignore[arg-type]
        )
        self.error = error
        self.through: dict[str, float] = {}

    async def _sync_exclusively(self, key: DrainKey, seen_at: float, tasks: Sequence[SyncTask]) -> None:
        if trio.current_time() < OUTAGE_ENDS:
            if self.error is DeliveryError:
                raise DeliveryError("Creatio answered HTTP 500", status=500, origin="http://creatio:80")
            raise self.error("the mail server is down")
        self.through[key[0]] = trio.current_time()


async def _outage(worker: _OutageWorker, folders: int) -> list[float]:
    async with trio.open_nursery() as nursery:
        for i in range(folders):
            worker._dispatch(nursery, _Settled(SyncTask(f"m{i}", "INBOX", reason="exists")))
            await trio.sleep(0.1)
    return sorted(worker.through.values())


async def test_folders_retry_when_the_receiver_is_back(autojump_clock: trio.testing.MockClock) -> None:
    through = await _outage(_OutageWorker(DeliveryError), folders=20)
    assert len(through) == 20
    # The first retry after the end gets through, and every other folder goes right behind it.
    assert through[-1] - through[0] < 0.01
    assert through[0] - OUTAGE_ENDS <= 60


async def test_other_failures_keep_their_own_backoff(autojump_clock: trio.testing.MockClock) -> None:
    """A mail server that fails is per mailbox: one folder getting through says nothing of the
    others, so they wait out their own backoff (spread by its jitter)."""
    through = await _outage(_OutageWorker(MailSourceError), folders=20)
    assert len(through) == 20
    assert through[-1] - through[0] > 1.0


class _RateLimitedWorker(_OutageWorker):
    """The receiver answers, refusing every call with 429 until OUTAGE_ENDS."""

    async def _sync_exclusively(self, key: DrainKey, seen_at: float, tasks: Sequence[SyncTask]) -> None:
        if trio.current_time() < OUTAGE_ENDS:
            raise DeliveryError("Creatio answered HTTP 429", status=429, origin="http://creatio:80")
        self.through[key[0]] = trio.current_time()


async def test_refused_deliveries_keep_their_own_backoff(autojump_clock: trio.testing.MockClock) -> None:
    """A receiver that refuses (429: limiting its rate) is not away: one call it lets through
    says nothing of the others, which would otherwise all come back at that moment."""
    through = await _outage(_RateLimitedWorker(DeliveryError), folders=20)
    assert len(through) == 20
    assert through[-1] - through[0] > 1.0
