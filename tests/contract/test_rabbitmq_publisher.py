"""The RabbitMQ adapter's publish batching on its own (pure logic: the batch is handed to a
function here instead of the broker; tests/contract/test_rabbitmq_specific.py runs it against
RabbitMQ)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from emlisten.errors import QueueError
from emlisten.queue import rabbitmq
from emlisten.queue.rabbitmq import _Pending, _Publisher


class Broker:
    """Takes batches; each waits for ``release`` unless it is set already."""

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.release = trio.Event()
        self.fail_with: BaseException | None = None

    async def send(self, batch: list[_Pending]) -> None:
        self.batches.append([pending.body for pending in batch])
        await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with


@pytest.fixture
def one_batch_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rabbitmq, "_BATCHES_IN_FLIGHT", 1)


async def publish_noting_errors(publisher: _Publisher, body: bytes, errors: dict[bytes, str]) -> None:
    try:
        await publisher.publish(body, "q")
    except QueueError as exc:
        errors[body] = str(exc)


@pytest.mark.usefixtures("one_batch_at_a_time")
async def test_publishes_waiting_for_a_slot_go_together_in_batches_of_bounded_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rabbitmq, "_BATCH_LIMIT", 4)
    broker = Broker()
    publisher = _Publisher(broker.send)
    async with trio.open_nursery() as nursery:
        await nursery.start(publisher.run)
        nursery.start_soon(publisher.publish, b"first", "q")
        await trio.testing.wait_all_tasks_blocked()
        assert broker.batches == [[b"first"]]  # a lone publish goes at once
        for n in range(6):  # these wait: the one slot is taken
            nursery.start_soon(publisher.publish, f"m{n}".encode(), "q")
        await trio.testing.wait_all_tasks_blocked()
        assert len(broker.batches) == 1
        broker.release.set()
        await trio.testing.wait_all_tasks_blocked()
        # Trio starts concurrent tasks in no set order: the sizes and the contents count.
        assert [len(batch) for batch in broker.batches] == [1, 4, 2]
        assert sorted(broker.batches[1] + broker.batches[2]) == [f"m{n}".encode() for n in range(6)]
        nursery.cancel_scope.cancel()


@pytest.mark.usefixtures("one_batch_at_a_time")
async def test_a_failed_batch_fails_each_of_its_publishes_and_the_next_batch_goes() -> None:
    broker = Broker()
    broker.fail_with = RuntimeError("the bridge broke")
    broker.release.set()
    publisher = _Publisher(broker.send)
    errors: dict[bytes, str] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(publisher.run)
        for body in (b"a", b"b"):
            nursery.start_soon(publish_noting_errors, publisher, body, errors)
        await trio.testing.wait_all_tasks_blocked()
        assert errors == dict.fromkeys((b"a", b"b"), "rabbitmq: RuntimeError: the bridge broke")
        broker.fail_with = None
        with trio.fail_after(5):
            await publisher.publish(b"c", "q")  # the publisher is still there
        assert broker.batches[-1] == [b"c"]
        nursery.cancel_scope.cancel()


@pytest.mark.usefixtures("one_batch_at_a_time")
async def test_a_publish_cancelled_while_it_waits_for_its_batch_is_not_sent() -> None:
    broker = Broker()
    publisher = _Publisher(broker.send)
    async with trio.open_nursery() as nursery:
        await nursery.start(publisher.run)
        nursery.start_soon(publisher.publish, b"holds the slot", "q")
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.01) as waited:  # gives up while the slot is taken
            await publisher.publish(b"given up", "q")
        assert waited.cancelled_caught
        nursery.start_soon(publisher.publish, b"kept", "q")
        await trio.testing.wait_all_tasks_blocked()
        broker.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert broker.batches == [[b"holds the slot"], [b"kept"]]
        nursery.cancel_scope.cancel()


@pytest.mark.usefixtures("one_batch_at_a_time")
async def test_publishes_under_way_or_waiting_when_the_queue_closes_fail() -> None:
    broker = Broker()  # never confirms
    publisher = _Publisher(broker.send)
    errors: dict[bytes, str] = {}

    async with trio.open_nursery() as callers, trio.open_nursery() as queue:
        await queue.start(publisher.run)
        callers.start_soon(publish_noting_errors, publisher, b"under way", errors)
        await trio.testing.wait_all_tasks_blocked()
        callers.start_soon(publish_noting_errors, publisher, b"waiting", errors)
        await trio.testing.wait_all_tasks_blocked()
        queue.cancel_scope.cancel()  # the queue closes
    assert errors == {
        b"under way": "rabbitmq: the queue closed while publishing",
        b"waiting": "rabbitmq: the queue closed before the task was published",
    }
    with pytest.raises(QueueError, match="closed"):
        await publisher.publish(b"after", "q")
