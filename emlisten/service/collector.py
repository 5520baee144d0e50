"""Keeping Python's garbage collector from stopping the whole process for seconds.

CPython's full (generation 2) collection walks every object the collector tracks, with the event
loop stopped. At 10,000 listening mailboxes that is about 1.6 million objects and 1.3 s
(measured, docs/performance.md), and it runs whenever a quarter as many objects as it tracks
have survived the young generations since the last one: every few seconds during a cold start,
every few minutes under steady mail. Each one held every mailbox's mail for its whole length.

The long-lived objects (sessions, parsers, task trees) are moved out of its reach: every
``FREEZE_EVERY_SECONDS`` the young generations are collected and every tracked object is frozen
(``gc.freeze``, cheap). The collector then only walks what was allocated since, in milliseconds.
Cyclic garbage that involves a frozen object is only found by a full collection of everything
(``gc.unfreeze`` and ``gc.collect``), which runs every ``full_every`` seconds: the one pause left,
at a known rate (an hour by default).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import trio

#: How often objects that survived are frozen. Freezing is a list splice; the young collection
#: before it takes a few ms. Often, because the automatic full collections that still run walk
#: everything not frozen yet: every second keeps each to a few ms (every 10 s let a cold start's
#: grow to 100-400 ms).
FREEZE_EVERY_SECONDS = 1.0


class CollectorPolicy:
    """``await nursery.start(policy.run)``: freezes survivors, collects everything now and then;
    ``release()`` once the node's tasks have ended.

    ``full_every`` 0 leaves Python's collector as it is. ``on_pause(generation, seconds)`` is told
    every collection's length (the process's, not only those the policy starts).
    """

    def __init__(self, *, full_every: float, on_pause: Callable[[int, float], None] | None = None) -> None:
        self.full_every = full_every
        self.on_pause = on_pause
        self._started_at = 0.0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.on_pause is not None:
            gc.callbacks.append(self._observe)
        try:
            task_status.started()
            if self.full_every <= 0:
                await trio.sleep_forever()
            full_at = trio.current_time() + self.full_every
            while True:
                await trio.sleep(FREEZE_EVERY_SECONDS)
                if trio.current_time() >= full_at:
                    self.collect_everything()
                    full_at = trio.current_time() + self.full_every
                else:
                    self.freeze_survivors()
        finally:
            if self.on_pause is not None:
                gc.callbacks.remove(self._observe)

    def hold(self) -> None:
        """The node is shutting down: no automatic collection until ``release()``. Unwinding
        10,000 listeners makes half a million short-lived objects a second, and the collections
        they triggered held the loop 0.1-0.5 s each, several seconds of a 10,000-mailbox
        shutdown; what they would find is garbage of a node about to end."""
        if self.full_every > 0:
            gc.disable()

    def release(self, *, collect: bool = True) -> None:
        """Back to Python's own policy, once every task of the node has ended: nothing stays out
        of the collector's reach after us. Not when the policy's task ends: the node's tasks are
        still unwinding then, and with 1.6 million objects unfrozen each of the full collections
        their unwinding triggers took 2 s (CPython keeps the old generation's size from its last
        full collection): 10-18 s of a 10,000-mailbox shutdown. One full collection here, unless
        ``collect`` is false (the process exits next: the objects go with it, and that
        collection took 1.5 s at 10,000 mailboxes)."""
        if self.full_every > 0:
            gc.enable()
        if gc.get_freeze_count() and collect:
            gc.unfreeze()
            gc.collect()

    @staticmethod
    def freeze_survivors() -> None:
        # Young cyclic garbage is collected first: frozen, it would wait for the full collection.
        gc.collect(1)
        gc.freeze()

    @staticmethod
    def collect_everything() -> None:
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    def _observe(self, phase: str, info: dict[str, Any]) -> None:
        try:
            if phase == "start":
                self._started_at = time.perf_counter()
            elif self.on_pause is not None:
                self.on_pause(int(info["generation"]), time.perf_counter() - self._started_at)
        except RecursionError:
            # A collection can start at any allocation, also one at the bottom of a deep
            # recursion (the JSON parser refusing a body nested 10,000 deep): recording it
            # needs a few frames more than are left. That pause goes unrecorded; raising from
            # a collector callback would only print "Exception ignored".
            pass


__all__ = ["FREEZE_EVERY_SECONDS", "CollectorPolicy"]
