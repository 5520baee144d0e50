"""A shutdown that lands while a sync fails: the worker stops cleanly.

The cancellation reaches the sync lease's renewal task while the sync itself raises (here a
Creatio 500 coming back at that moment): the sync's nursery then holds both the error and the
Cancelled. The worker used to pass that group on as it was, past the drainer's retry (which
handles one error, not a group), and the node stopped with an ExceptionGroup traceback (seen
once in the full suite: an EWS reader's connect error at shutdown). The cancellation goes on; the
error is moot (its task was not acked: it comes back)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import trio

from emlisten.config import Settings
from emlisten.errors import DeliveryError
from emlisten.models import (
    Checkpoint,
    Email,
    MailboxConfig,
    MailboxState,
    MailboxStatus,
    RawMessage,
    Security,
    ServerEndpoint,
    SyncTask,
)
from emlisten.queue.inprocess import InProcessQueue
from emlisten.service.delivery import DeliveryWorker
from emlisten.service.readers import ReaderPool
from emlisten.sink.creatio import CreatioSink
from emlisten.store.memory import MemoryStore
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import make_message

MAILBOX_ID = "44444444-4444-4444-4444-444444444444"


class _ShutdownOnRefusal(CreatioSink):
    """The real sink; when Creatio refuses a call, the shutdown's cancellation lands right then
    (before the error leaves the sink, with no checkpoint in between)."""

    def __init__(self, shutdown: trio.CancelScope) -> None:
        super().__init__(timeout=10.0)
        self.shutdown = shutdown
        self.refused = 0

    async def deliver(self, mailbox: MailboxConfig, emails: Sequence[Email], *, idempotency_key: str) -> None:
        try:
            await super().deliver(mailbox, emails, idempotency_key=idempotency_key)
        except DeliveryError:
            self.refused += 1
            self.shutdown.cancel()
            raise


async def test_a_shutdown_while_a_delivery_fails_stops_the_worker_cleanly(nursery: trio.Nursery) -> None:
    creatio = CreatioStandIn()
    await nursery.start(creatio.serve)
    creatio.fail_mailbox(MAILBOX_ID, 500)
    store = MemoryStore()
    await store.put_mailbox(
        MailboxConfig(
            id=MAILBOX_ID,
            user_name="user@example.test",
            password="not-used: the mail comes with the task",
            imap=ServerEndpoint("imap.invalid", 993, Security.SSL_ON_CONNECT),
            bpm_endpoint=creatio.endpoint(),
            folders=("INBOX",),
        )
    )
    await store.set_status(MAILBOX_ID, MailboxStatus(MailboxState.LISTENING))
    await store.seed_checkpoint(MAILBOX_ID, "INBOX", Checkpoint(7, 0))
    queue = InProcessQueue()
    shutdown = trio.CancelScope()
    sink = _ShutdownOnRefusal(shutdown)
    worker = DeliveryWorker(Settings(), store, queue, ReaderPool(None, idle_seconds=0), sink)
    raw = RawMessage(uid=1, data=make_message("refused"), key="7/1", position=Checkpoint(7, 1))
    task = SyncTask(
        MAILBOX_ID,
        "INBOX",
        uidvalidity=7,
        uid_hint=1,
        seen_at=time.time(),
        prefetched=(raw,),
        prefetch_from=1,
        prefetch_to=1,
    )
    try:
        with trio.fail_after(15), shutdown:
            async with trio.open_nursery() as inner:
                await inner.start(worker.run)
                await queue.publish(task)
        assert sink.refused == 1
        assert shutdown.cancelled_caught
        # Nothing delivered, nothing recorded, and the folder's lease is free for whoever runs next.
        assert await store.get_checkpoint(MAILBOX_ID, "INBOX") == Checkpoint(7, 0)
        assert await store.lease_owners([f"sync/{MAILBOX_ID}/INBOX"]) == {f"sync/{MAILBOX_ID}/INBOX": None}
    finally:
        await sink.aclose()
