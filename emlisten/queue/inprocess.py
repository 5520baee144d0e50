"""In-process TaskQueue: the single-process mode's queue, with RabbitMQ's semantics.

Competing consumers, per-consumer prefetch, manual ack, redelivery of whatever a consumer held
when it went away, and dead letters for nack(requeue=False). Tasks live in memory only.

Mail that listeners fetched and attached to tasks (``SyncTask.prefetched``) waits here until a
worker takes it. It is an optimisation, not the truth (the checkpoint is), so above
``max_payload_bytes`` of waiting mail new tasks are queued without it: a stalled receiver then
costs memory for nudges, not for mail, and the worker reads that mail from the server later.
"""

from __future__ import annotations

import dataclasses
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

    def __init__(self, *, max_payload_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_payload_bytes = max_payload_bytes
        self._payload_bytes = 0
        self._ready: deque[tuple[int, SyncTask]] = deque()
        self._dead: list[SyncTask] = []
        self._seq = itertools.count()
        self._available = trio.lowlevel.ParkingLot()

    async def publish(self, task: SyncTask) -> None:
        if task.prefetched:
            size = _payload_size(task)
            if self._payload_bytes + size > self.max_payload_bytes:
                task = dataclasses.replace(task, prefetched=(), prefetch_from=0, prefetch_to=0)
            else:
                self._payload_bytes += size
        self._ready.append((next(self._seq), task))
        self._available.unpark()

    def _requeue(self, seq: int, task: SyncTask) -> None:
        self._payload_bytes += _payload_size(task)
        # Like RabbitMQ, a requeued task goes back near the head, ahead of newer work.
        self._ready.appendleft((seq, task))
        self._available.unpark()

    async def _take(self) -> tuple[int, SyncTask]:
        while not self._ready:
            await self._available.park()
        seq, task = self._ready.popleft()
        if task.prefetched:
            self._payload_bytes -= _payload_size(task)  # counted while it waits here
        return seq, task

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


def _payload_size(task: SyncTask) -> int:
    return sum(len(raw.data) for raw in task.prefetched)
