"""In-process TaskQueue: the single-process mode's queue, with RabbitMQ's semantics.

Competing consumers, per-consumer prefetch, manual ack, redelivery of whatever a consumer held
when it went away, and dead letters for nack(requeue=False). Tasks live in memory only.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from emlisten.abc import TaskDelivery, TaskQueue
from emlisten.errors import QueueError
from emlisten.models import SyncTask


class _Delivery(TaskDelivery):
    __slots__ = ("_consumer", "_settled", "orphaned", "seq", "task")

    def __init__(self, consumer: _Consumer, seq: int, task: SyncTask) -> None:
        self._consumer = consumer
        self.seq = seq
        self.task = task
        self._settled = False
        #: The consumer went away and the task was requeued (as when a RabbitMQ channel closes);
        #: settling it now is a no-op, since someone else will get the task again.
        self.orphaned = False

    def _settle(self) -> bool:
        if self.orphaned:
            return False
        if self._settled:
            raise QueueError("task already acknowledged")
        self._settled = True
        self._consumer.release(self)
        return True

    async def ack(self) -> None:
        self._settle()

    async def nack(self, *, requeue: bool = True) -> None:
        if not self._settle():
            return
        if requeue:
            self._consumer.queue._requeue(self.seq, self.task)
        else:
            self._consumer.queue._dead.append(self.task)


class _Consumer:
    def __init__(self, queue: InProcessQueue, prefetch: int) -> None:
        self.queue = queue
        self.prefetch = prefetch
        self.unacked: dict[int, _Delivery] = {}
        self.slot_free = trio.lowlevel.ParkingLot()

    def release(self, delivery: _Delivery) -> None:
        self.unacked.pop(delivery.seq, None)
        self.slot_free.unpark()

    # An iterator class, not an async generator: a cancelled ``anext`` must leave it usable.
    def __aiter__(self) -> _Consumer:
        return self

    async def __anext__(self) -> TaskDelivery:
        while len(self.unacked) >= self.prefetch:
            await self.slot_free.park()
        seq, task = await self.queue._take()
        delivery = _Delivery(self, seq, task)
        self.unacked[seq] = delivery
        return delivery


class InProcessQueue(TaskQueue):
    name = "in-process"

    def __init__(self) -> None:
        self._ready: deque[tuple[int, SyncTask]] = deque()
        self._dead: list[SyncTask] = []
        self._seq = itertools.count()
        self._available = trio.lowlevel.ParkingLot()

    async def publish(self, task: SyncTask) -> None:
        self._ready.append((next(self._seq), task))
        self._available.unpark()

    def _requeue(self, seq: int, task: SyncTask) -> None:
        # Like RabbitMQ, a requeued task goes back near the head, ahead of newer work.
        self._ready.appendleft((seq, task))
        self._available.unpark()

    async def _take(self) -> tuple[int, SyncTask]:
        while not self._ready:
            await self._available.park()
        return self._ready.popleft()

    @asynccontextmanager
    async def consume(self, *, prefetch: int) -> AsyncIterator[AsyncIterator[TaskDelivery]]:
        if prefetch < 1:
            raise QueueError("prefetch must be at least 1")
        consumer = _Consumer(self, prefetch)
        try:
            yield consumer
        finally:
            # The consumer went away: whatever it still held goes back to the queue.
            for delivery in sorted(consumer.unacked.values(), key=lambda d: d.seq, reverse=True):
                delivery.orphaned = True
                self._requeue(delivery.seq, delivery.task)
            consumer.unacked.clear()

    async def dead_letters(self) -> list[SyncTask]:
        return list(self._dead)

    def depth(self) -> int:
        return len(self._ready)
