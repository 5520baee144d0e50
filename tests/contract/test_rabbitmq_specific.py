"""What the TaskQueue contract cannot say about RabbitMQ: real channel and connection loss,
durability arguments, quorum queues, dead letters staying put, and errors."""

from __future__ import annotations

import json

import aio_pika
import pytest
import trio

from emlisten._bridge import open_asyncio_bridge, run_asyncio
from emlisten.abc import TaskDelivery
from emlisten.errors import ConfigError, QueueError
from emlisten.models import SyncTask
from emlisten.queue.rabbitmq import RabbitMQQueue
from tests.contract.backends import (
    AMQP_URL,
    broker_refuses_publishes,
    close_broker_connections,
    rabbitmq_queue,
    unique_queue_name,
)

pytestmark = pytest.mark.rabbitmq


def task(n: int) -> SyncTask:
    return SyncTask(mailbox_id=f"m{n}", folder="INBOX", uidvalidity=1, uid_hint=n)


async def test_task_survives_a_consumer_that_disappears_without_acking() -> None:
    """Another node's consumer takes a task and dies (its connection is closed) without acking."""
    name = unique_queue_name()
    async with rabbitmq_queue(name=name) as survivor:
        got_it = trio.Event()

        # The doomed node: its own connection and channel (the same bridge loop, as a test can
        # have only one).
        async def doomed_node(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with (
                RabbitMQQueue.open(AMQP_URL, queue_name=name, connection_name=f"{name}-doomed") as q,
                q.consume(prefetch=1) as deliveries,
            ):
                task_status.started()
                delivery = await anext(deliveries)
                assert delivery.task == task(7)
                got_it.set()
                await trio.sleep_forever()  # never acks

        async with trio.open_nursery() as nursery:
            await nursery.start(doomed_node)
            await survivor.publish(task(7))
            with trio.fail_after(5):
                await got_it.wait()
            nursery.cancel_scope.cancel()  # the node goes away: channel and connection close

        async with survivor.consume(prefetch=1) as deliveries:
            with trio.fail_after(5):
                again = await anext(deliveries)
            assert again.task == task(7)
            await again.ack()


async def test_consumption_and_publish_resume_after_the_broker_drops_the_connection() -> None:
    name = unique_queue_name()
    async with rabbitmq_queue(name=name) as queue, queue.consume(prefetch=2) as deliveries:
        await queue.publish(task(1))
        with trio.fail_after(5):
            held = await anext(deliveries)  # taken, not acked when the connection dies
        assert await close_broker_connections(name) == 1
        # publish retries transparently while the robust connection comes back.
        with trio.fail_after(20):
            await queue.publish(task(2))
        await held.ack()  # its channel is gone: a no-op, the broker redelivers it
        seen: list[TaskDelivery] = []
        with trio.fail_after(20):
            while {d.task.uid_hint for d in seen} != {1, 2}:
                seen.append(await anext(deliveries))
        for delivery in seen:
            await delivery.ack()
        assert await queue.depth() == 0


async def test_queues_are_durable_with_dead_lettering() -> None:
    name = unique_queue_name()
    async with rabbitmq_queue(name=name) as queue:
        await queue.publish(task(1))

        async def inspect() -> tuple[bool, bool, int]:
            connection = await aio_pika.connect(AMQP_URL)
            try:
                channel = await connection.channel()
                main = await channel.declare_queue(name, passive=True)
                message = await main.get(no_ack=False)
                assert message is not None
                persistent = message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
                is_json = (
                    message.content_type == "application/json"
                    and json.loads(message.body) == task(1).to_dict()
                )
                await message.nack(requeue=True)
                dead = await channel.declare_queue(f"{name}.dead", passive=True)
                return persistent, is_json, int(dead.declaration_result.message_count or 0)
            finally:
                await connection.close()

        assert await run_asyncio(inspect) == (True, True, 0)
        listing = await trio.run_process(
            ["rabbitmqctl", "list_queues", "name", "durable", "arguments", "-q"], capture_stdout=True
        )
        lines = [line for line in listing.stdout.decode().splitlines() if line.startswith(f"{name}\t")]
        assert len(lines) == 1
        assert "\ttrue\t" in lines[0]
        assert f'"x-dead-letter-routing-key","{name}.dead"' in lines[0]


async def test_dead_letters_are_read_without_being_removed() -> None:
    async with rabbitmq_queue() as queue:
        for n in range(3):
            await queue.publish(task(n))
        async with queue.consume(prefetch=3) as deliveries:
            with trio.fail_after(5):
                got = [await anext(deliveries) for _ in range(3)]
            await got[0].nack(requeue=False)
            await got[1].ack()
            await got[2].nack(requeue=False)
        assert await queue.dead_letters() == [task(0), task(2)]
        assert await queue.dead_letters() == [task(0), task(2)]
        assert await queue.depth() == 0


async def test_quorum_queue() -> None:
    name = unique_queue_name()
    async with rabbitmq_queue(name=name, quorum=True) as queue:
        await queue.publish(task(1))
        await queue.publish(task(2))
        async with queue.consume(prefetch=1) as deliveries:
            with trio.fail_after(5):
                first = await anext(deliveries)
            await first.nack(requeue=False)
            with trio.fail_after(5):
                second = await anext(deliveries)
            await second.ack()
        assert await queue.dead_letters() == [task(1)]
        # The same name as a classic queue is refused by the broker: a clear QueueError.
        with pytest.raises(QueueError, match="PRECONDITION_FAILED"):
            async with RabbitMQQueue.open(AMQP_URL, queue_name=name, quorum=False):
                pass


async def test_cancelled_anext_leaves_the_consumer_usable() -> None:
    async with rabbitmq_queue() as queue, queue.consume(prefetch=1) as deliveries:
        with trio.move_on_after(0.05) as scope:
            await anext(deliveries)
        assert scope.cancelled_caught
        await queue.publish(task(5))
        with trio.fail_after(5):
            delivery = await anext(deliveries)
        assert delivery.task == task(5)
        await delivery.ack()


async def test_garbage_on_the_queue_is_dead_lettered_not_looped_on() -> None:
    name = unique_queue_name()
    async with rabbitmq_queue(name=name) as queue:

        async def publish_garbage() -> None:
            connection = await aio_pika.connect(AMQP_URL)
            try:
                channel = await connection.channel()
                await channel.default_exchange.publish(aio_pika.Message(b"not json"), routing_key=name)
            finally:
                await connection.close()

        await run_asyncio(publish_garbage)
        await queue.publish(task(1))
        async with queue.consume(prefetch=1) as deliveries:
            with trio.fail_after(5):
                delivery = await anext(deliveries)
            assert delivery.task == task(1)
            await delivery.ack()
        # Broker-side dead-lettering (the reject) is asynchronous: wait for it to land.
        with trio.fail_after(5):
            while await queue.depth() != 0:
                await trio.sleep(0.02)
        assert await queue.dead_letters() == []  # unreadable, so not listed as a task


async def test_nack_after_the_consumer_closed_does_not_dead_letter() -> None:
    async with rabbitmq_queue() as queue:
        await queue.publish(task(1))
        async with queue.consume(prefetch=1) as deliveries:
            with trio.fail_after(5):
                delivery = await anext(deliveries)
        await delivery.nack(requeue=False)  # too late: a no-op, the task was requeued
        assert await queue.dead_letters() == []
        async with queue.consume(prefetch=1) as deliveries:
            with trio.fail_after(5):
                again = await anext(deliveries)
            assert again.task == task(1)
            await again.ack()


async def test_a_burst_of_publishes_is_confirmed_whole() -> None:
    """Publishes go out in batches (several crossings into asyncio, several batches awaiting
    their confirms at once): every one of a burst is on the queue when its publish returns."""
    name = unique_queue_name()
    async with rabbitmq_queue(name=name) as queue:
        returned: list[int] = []

        async def publish(n: int) -> None:
            await queue.publish(task(n))
            returned.append(n)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for n in range(3000):
                    nursery.start_soon(publish, n)
        assert sorted(returned) == list(range(3000))
        assert await queue.depth() == 3000
        seen: set[int] = set()
        async with queue.consume(prefetch=500) as deliveries:
            with trio.fail_after(30):
                while len(seen) < 3000:
                    delivery = await anext(deliveries)
                    seen.add(delivery.task.uid_hint)
                    await delivery.ack()
        assert seen == set(range(3000))


async def test_publishes_the_broker_refuses_are_queue_errors_at_once() -> None:
    """A full queue (here: a policy capping it at 0 with reject-publish) nacks publishes: each
    caller of a concurrent burst gets a QueueError straight away, not at the timeout, and
    publishing works again once the broker takes tasks."""
    name = unique_queue_name()
    async with rabbitmq_queue(name=name) as queue:
        errors: list[QueueError] = []

        async def publish(n: int) -> None:
            try:
                await queue.publish(task(n))
            except QueueError as exc:
                errors.append(exc)

        async with broker_refuses_publishes(name):
            with trio.fail_after(10):  # the publish timeout is 30 s
                async with trio.open_nursery() as nursery:
                    for n in range(20):
                        nursery.start_soon(publish, n)
        assert len(errors) == 20
        assert all("DeliveryError" in str(exc) for exc in errors), errors[0]
        with trio.fail_after(10):
            await queue.publish(task(99))
        assert await queue.depth() == 1


async def test_an_unroutable_publish_is_a_queue_error() -> None:
    name = unique_queue_name()
    async with rabbitmq_queue(name=name) as queue:
        await queue.delete_queues()  # nothing to route to now
        with trio.fail_after(10), pytest.raises(QueueError):
            await queue.publish(task(1))


async def test_unreachable_broker_is_a_queue_error() -> None:
    async with open_asyncio_bridge():
        with pytest.raises(QueueError):
            async with RabbitMQQueue.open("amqp://guest:guest@127.0.0.1:1/", queue_name="x"):
                pass


async def test_wrong_credentials_are_a_queue_error_without_the_password() -> None:
    async with open_asyncio_bridge():
        with pytest.raises(QueueError) as caught:
            async with RabbitMQQueue.open("amqp://guest:wrong-pw-xyz@127.0.0.1:5672/", queue_name="x"):
                pass
        assert "wrong-pw-xyz" not in str(caught.value)


async def test_bad_configuration() -> None:
    async with rabbitmq_queue() as queue:
        with pytest.raises(ConfigError):
            async with RabbitMQQueue.open(AMQP_URL, queue_name=""):
                pass
        with pytest.raises(QueueError):
            async with queue.consume(prefetch=0):
                pass
