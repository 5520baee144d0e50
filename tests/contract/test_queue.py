"""The TaskQueue contract, written once and run against every adapter (in-process, and RabbitMQ for real)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import pytest
import trio

from emlisten.abc import TaskDelivery, TaskQueue
from emlisten.models import Checkpoint, RawMessage, SyncTask
from emlisten.queue.inprocess import InProcessQueue
from tests.contract.backends import rabbitmq_queue


@pytest.fixture(params=["in-process", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def queue(request: pytest.FixtureRequest) -> AsyncIterator[TaskQueue]:
    if request.param == "rabbitmq":
        async with rabbitmq_queue() as adapter:
            yield adapter
        return
    in_process: TaskQueue = InProcessQueue()
    yield in_process
    await in_process.aclose()


def task(n: int) -> SyncTask:
    return SyncTask(mailbox_id=f"m{n}", folder="INBOX", uidvalidity=1, uid_hint=n)


async def take(deliveries: AsyncIterator[TaskDelivery], count: int) -> list[TaskDelivery]:
    taken = []
    with trio.fail_after(5):
        for _ in range(count):
            taken.append(await anext(deliveries))
    return taken


async def test_publish_consume_ack_in_order(queue: TaskQueue) -> None:
    for n in range(5):
        await queue.publish(task(n))
    async with queue.consume(prefetch=10) as deliveries:
        got = await take(deliveries, 5)
        assert [d.task for d in got] == [task(n) for n in range(5)]
        for d in got:
            await d.ack()


async def test_task_round_trips_through_dict() -> None:
    t = SyncTask("m", "Sent Items", 42, 7, "catch-up")
    assert SyncTask.from_dict(t.to_dict()) == t


def task_with_mail(n: int) -> SyncTask:
    """A task carrying mail a listener fetched: 8-bit bytes, CRLF, a date with its zone."""
    date = datetime(2026, 12, 6, 7, 0, tzinfo=timezone(timedelta(hours=3)))
    mail = tuple(
        RawMessage(
            uid=uid,
            data=b"Subject: =?utf-8?q?x?=\r\n\r\n" + bytes(range(256)) + b"\r\n",
            internal_date=date,
            size=272,
            key=f"7/{uid}",
            position=Checkpoint(7, uid),
        )
        for uid in (n, n + 2)
    )
    return SyncTask(
        f"m{n}", "INBOX", 7, uid_hint=n + 2, seen_at=1.5, prefetched=mail, prefetch_from=n, prefetch_to=n + 2
    )


async def test_mail_carried_in_a_task_arrives_intact(queue: TaskQueue) -> None:
    await queue.publish(task_with_mail(3))
    async with queue.consume(prefetch=1) as deliveries:
        (got,) = await take(deliveries, 1)
        assert got.task == task_with_mail(3)
        await got.ack()


async def test_in_process_queue_drops_carried_mail_over_its_budget() -> None:
    """Carried mail is an optimisation: beyond the budget the task stays, without the mail."""
    queue = InProcessQueue(max_payload_bytes=600)
    for n in (1, 10, 20):
        await queue.publish(task_with_mail(n))  # 562 bytes of mail each
    async with queue.consume(prefetch=3) as deliveries:
        taken = await take(deliveries, 3)
        for delivery in taken:
            await delivery.ack()
    got = [d.task for d in taken]
    assert got[0] == task_with_mail(1)
    assert [(t.mailbox_id, t.uid_hint, t.has_prefetch, t.prefetched) for t in got[1:]] == [
        ("m10", 12, False, ()),
        ("m20", 22, False, ()),
    ]
    # Taken mail leaves the budget: the next task keeps its mail.
    await queue.publish(task_with_mail(30))
    async with queue.consume(prefetch=1) as deliveries:
        assert [d.task for d in await take(deliveries, 1)] == [task_with_mail(30)]


async def test_prefetch_bounds_unacked(queue: TaskQueue) -> None:
    for n in range(3):
        await queue.publish(task(n))
    async with queue.consume(prefetch=2) as deliveries:
        first = await take(deliveries, 2)
        with trio.move_on_after(0.2) as blocked:
            await anext(deliveries)
        assert blocked.cancelled_caught, "a third task was handed out beyond prefetch=2"
        await first[0].ack()
        third = await take(deliveries, 1)
        assert third[0].task == task(2)


async def test_nack_requeue_redelivers(queue: TaskQueue) -> None:
    await queue.publish(task(1))
    async with queue.consume(prefetch=5) as deliveries:
        (d,) = await take(deliveries, 1)
        await d.nack(requeue=True)
        (again,) = await take(deliveries, 1)
        assert again.task == task(1)
        await again.ack()


async def test_nack_without_requeue_dead_letters(queue: TaskQueue) -> None:
    await queue.publish(task(1))
    async with queue.consume(prefetch=5) as deliveries:
        (d,) = await take(deliveries, 1)
        await d.nack(requeue=False)
    assert await queue.dead_letters() == [task(1)]


async def test_unacked_tasks_are_redelivered_when_consumer_goes_away(queue: TaskQueue) -> None:
    for n in range(3):
        await queue.publish(task(n))
    async with queue.consume(prefetch=5) as deliveries:
        held = await take(deliveries, 3)
        await held[1].ack()
    async with queue.consume(prefetch=5) as deliveries:
        again = await take(deliveries, 2)
        assert sorted(d.task.uid_hint for d in again) == [0, 2]
        for d in again:
            await d.ack()


async def test_competing_consumers_share_work(queue: TaskQueue) -> None:
    received: dict[str, list[int]] = {"a": [], "b": []}
    total = 40
    done = trio.Event()

    async def consume(name: str) -> None:
        async with queue.consume(prefetch=1) as deliveries:
            async for d in deliveries:
                received[name].append(d.task.uid_hint)
                await trio.lowlevel.checkpoint()
                await d.ack()
                if sum(len(v) for v in received.values()) == total:
                    done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume, "a")
        nursery.start_soon(consume, "b")
        for n in range(total):
            await queue.publish(task(n))
        with trio.fail_after(5):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert sorted(received["a"] + received["b"]) == list(range(total))
    assert received["a"] and received["b"], "one consumer got all the work"


async def test_double_ack_is_an_error(queue: TaskQueue) -> None:
    from emlisten.errors import QueueError

    await queue.publish(task(1))
    async with queue.consume(prefetch=5) as deliveries:
        (d,) = await take(deliveries, 1)
        await d.ack()
        with pytest.raises(QueueError):
            await d.ack()


async def test_settling_after_the_consumer_left_is_harmless(queue: TaskQueue) -> None:
    await queue.publish(task(1))
    async with queue.consume(prefetch=5) as deliveries:
        (held,) = await take(deliveries, 1)
    await held.ack()  # the consumer is gone: no error, and the task is not lost
    async with queue.consume(prefetch=5) as deliveries:
        (again,) = await take(deliveries, 1)
        assert again.task == task(1)
        await again.ack()
