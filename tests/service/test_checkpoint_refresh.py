"""The periodic re-read of checkpoints feeds a restore after Redis lost its data; an in-process
store cannot lose its data while the process lives, so it is never read for that (at 10,000
mailboxes the read was 4 % of an idle node's CPU). Pure logic of the loop, on a mock clock."""

from __future__ import annotations

import trio
import trio.testing

from emlisten.config import Settings
from emlisten.mail.imap.source import ImapSource
from emlisten.queue.inprocess import InProcessQueue
from emlisten.service.listening import MailboxManager
from emlisten.sink.creatio import CreatioSink
from emlisten.store.memory import MemoryStore

PERIOD = 1.0


async def _refreshes_in(remote: bool, seconds: float) -> float | None:
    """``emlisten_checkpoint_refreshes_total`` after ``seconds`` of the loop."""
    store = MemoryStore()
    store.remote = remote  # only the flag differs; the reads are the in-memory store's
    settings = Settings(node_id="n1", checkpoint_refresh_seconds=PERIOD)
    manager = MailboxManager(settings, store, InProcessQueue(), ImapSource(), CreatioSink())
    manager._incarnation = await store.incarnation()  # as run() reads it first
    with trio.move_on_after(seconds):
        await manager._checkpoint_refresh_loop()
    return manager.metrics.registry.get_sample_value("emlisten_checkpoint_refreshes_total")


async def test_a_remote_store_is_read_every_period(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0
    assert await _refreshes_in(True, 5.5 * PERIOD) == 5


async def test_an_in_process_store_is_never_read(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0
    assert await _refreshes_in(False, 5.5 * PERIOD) == 0
