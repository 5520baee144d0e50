"""What a worker asks of the store per task (issue #13): with Redis every call is a round trip
through the asyncio bridge, so the common path, one task carrying mail the listener fetched, is
held to three calls: the sync lease claimed with the mailbox and the checkpoint, the checkpoint
written with the delivered count, the lease released.

The store records the calls (the in-memory store, in process); the callback goes to the Creatio
stand-in over HTTP."""

from __future__ import annotations

import time
from typing import Any

import trio

from emlisten.abc import Store
from emlisten.config import Settings
from emlisten.models import (
    Checkpoint,
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

MAILBOX_ID = "33333333-3333-3333-3333-333333333333"


class _RecordingStore(MemoryStore):
    """The in-memory store, recording each Store call the worker makes (but its watch of the
    store's incarnation, once a second)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []


def _recording(name: str) -> Any:
    async def method(self: _RecordingStore, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(name)
        return await getattr(MemoryStore, name)(self, *args, **kwargs)

    return method


for _name in sorted(Store.__abstractmethods__ - {"changes", "incarnation"}):
    setattr(_RecordingStore, _name, _recording(_name))


def _task(first_uid: int, count: int) -> SyncTask:
    raws = tuple(
        RawMessage(uid=uid, data=make_message(f"mail {uid}"), key=f"7/{uid}", position=Checkpoint(7, uid))
        for uid in range(first_uid, first_uid + count)
    )
    last = first_uid + count - 1
    return SyncTask(
        MAILBOX_ID,
        "INBOX",
        uidvalidity=7,
        uid_hint=last,
        seen_at=time.time(),
        prefetched=raws,
        prefetch_from=first_uid,
        prefetch_to=last,
    )


async def test_a_prefetched_task_costs_three_store_calls(nursery: trio.Nursery) -> None:
    creatio = CreatioStandIn()
    await nursery.start(creatio.serve)
    store = _RecordingStore()
    mailbox = MailboxConfig(
        id=MAILBOX_ID,
        user_name="user@example.test",
        password="not-used: the mail comes with the task",
        imap=ServerEndpoint("imap.invalid", 993, Security.SSL_ON_CONNECT),
        bpm_endpoint=creatio.endpoint(),
        folders=("INBOX",),
    )
    await store.put_mailbox(mailbox)
    await store.set_status(MAILBOX_ID, MailboxStatus(MailboxState.LISTENING))
    await store.seed_checkpoint(MAILBOX_ID, "INBOX", Checkpoint(7, 0))
    queue = InProcessQueue()
    sink = CreatioSink(timeout=10.0)
    worker = DeliveryWorker(Settings(), store, queue, ReaderPool(None, idle_seconds=0), sink)
    try:
        await nursery.start(worker.run)
        for first_uid in (1, 4):
            store.calls.clear()
            await queue.publish(_task(first_uid, 3))
            await creatio.wait_for_emails(MAILBOX_ID, first_uid + 2, timeout=10)
            with trio.fail_after(10):
                while worker.busy:
                    await trio.sleep(0.01)
            assert store.calls == ["claim_lease_and_read_folder", "advance_checkpoint", "release_leases"]
        assert await store.get_checkpoint(MAILBOX_ID, "INBOX") == Checkpoint(7, 6)
        status = (await store.get_statuses([MAILBOX_ID]))[MAILBOX_ID]
        assert status is not None and status.delivered == 6
        assert await store.lease_owners([f"sync/{MAILBOX_ID}/INBOX"]) == {f"sync/{MAILBOX_ID}/INBOX": None}
    finally:
        worker.stop_intake()
        await sink.aclose()
