"""A worker puts back the checkpoints it wrote when the store loses its data (Redis restarted
empty): the newest it knows per folder, for a bounded number of folders, and a checkpoint it
records after that into a store that no longer knows the mailbox goes back too.

The worker's bookkeeping is what is under test, on the in-memory store (a store that loses its
data is one whose contents and incarnation are replaced); the cluster test
tests/cluster/test_store_wipe.py shows the whole path with Redis, Dovecot and the primaries."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from emlisten.config import Settings
from emlisten.models import Checkpoint
from emlisten.queue.inprocess import InProcessQueue
from emlisten.service import delivery
from emlisten.service.delivery import DeliveryWorker
from emlisten.service.readers import ReaderPool
from emlisten.sink.creatio import CreatioSink
from emlisten.store.memory import MemoryStore

REMEMBERED = 50


class _LosableStore(MemoryStore):
    def lose_data(self) -> None:
        """What Redis restarted empty is: nothing left, and another data set id."""
        MemoryStore.__init__(self)


async def test_a_worker_puts_back_what_it_wrote_when_the_store_loses_its_data(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "_REMEMBERED_CHECKPOINTS", REMEMBERED)
    store = _LosableStore()
    worker = DeliveryWorker(
        Settings(),
        store,
        InProcessQueue(),
        ReaderPool(None, idle_seconds=0),
        CreatioSink(),  # type: ignore[arg-type]
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        await trio.sleep(1.5)  # its first look at the incarnation is the baseline

        # Checkpoints of accepted mail, one folder more than the worker remembers: the least
        # recently written (m0) is forgotten. m1 is written again later; m2 gets a late write of
        # older progress (a retry that lagged), which must not replace what it knows.
        for n in range(REMEMBERED + 1):
            await worker._save_checkpoint(f"m{n}", "INBOX", Checkpoint(7, 100 + n))
        await worker._save_checkpoint("m1", "INBOX", Checkpoint(7, 200))
        await worker._save_checkpoint("m2", "INBOX", Checkpoint(7, 50))

        store.lose_data()
        # Put back meanwhile by another worker (or restored by a primary): more for m3, less for m4.
        meanwhile = {"m3": {"INBOX": Checkpoint(7, 500)}, "m4": {"INBOX": Checkpoint(7, 1)}}
        await store.reassert_checkpoints(meanwhile)
        await trio.sleep(1.5)  # the worker's next look

        found = await store.get_checkpoints_of([f"m{n}" for n in range(REMEMBERED + 1)])
        assert found["m0"] == {}  # forgotten: the bound holds
        assert found["m1"] == {"INBOX": Checkpoint(7, 200)}
        assert found["m2"] == {"INBOX": Checkpoint(7, 102)}
        assert found["m3"] == {"INBOX": Checkpoint(7, 500)}  # never moved back
        assert found["m4"] == {"INBOX": Checkpoint(7, 104)}
        assert all(found[f"m{n}"] == {"INBOX": Checkpoint(7, 100 + n)} for n in range(5, REMEMBERED + 1))

        # A delivery accepted while the store was down records its checkpoint after the put-back:
        # the store does not know the mailbox (nobody restored it yet), so it goes back on its own.
        await worker._save_checkpoint("late", "INBOX", Checkpoint(7, 9))
        assert await store.get_checkpoint("late", "INBOX") == Checkpoint(7, 9)

        worker.stop_intake()
