"""Single-item store calls made by many tasks at once, sent as one bulk call.

A cold start of 10,000 mailboxes makes every supervisor read its last state, write
``connecting`` and ``listening`` and read its checkpoint: with Redis each is a round trip through
the asyncio bridge (about 0.4 ms of CPU), and the primary of a split set-up spent a quarter of
its cold start there. The store has bulk forms of those calls (``get_statuses``,
``set_statuses``, ``get_checkpoints_of``); a :class:`Coalescer` gathers the single calls that
arrive within a few milliseconds of each other and makes one bulk call for them. Each caller
still waits for its own result (or the batch's error), so nothing changes for it but the wait.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Generic, TypeVar

import trio

from emlisten.abc import Store
from emlisten.errors import StoreError
from emlisten.models import Checkpoint, MailboxStatus

T = TypeVar("T")
R = TypeVar("R")

#: How long the first call of a batch waits for others to join it.
BATCH_WINDOW_SECONDS = 0.005
#: A batch this big goes at once.
BATCH_MAX_ITEMS = 256


class _Batch(Generic[T, R]):
    __slots__ = ("done", "error", "full", "items", "results")

    def __init__(self) -> None:
        self.items: list[T] = []
        self.results: Sequence[R] | None = None  # None: the bulk call failed or never ran
        #: The bulk call's error when it is every caller's (``shared_errors``).
        self.error: Exception | None = None
        self.done = trio.Event()
        self.full = trio.Event()


class Coalescer(Generic[T, R]):
    """``await coalescer(item)``: ``bulk([item, ...])[i]`` for this caller's ``i``.

    The first caller of a batch leads it: it waits up to ``window`` seconds (less when the
    batch fills up) for others to join, then makes the bulk call for all of them. When that
    call fails (or the leader is cancelled), every other caller makes its own single call, so
    each gets its own result or its own error, as without batching.

    ``shared_errors``: errors of the bulk call that cannot be one item's (a write of documents
    the callers made failing: the store's failure), which every caller gets as it is, without
    asking again: each would have got it alone, and asking again after a store outage's timeout
    meant waiting out a second one (a supervisor's state write during a Redis outage took two
    rounds of the client's retries to fail, not one)."""

    def __init__(
        self,
        bulk: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        window: float = BATCH_WINDOW_SECONDS,
        max_items: int = BATCH_MAX_ITEMS,
        shared_errors: tuple[type[Exception], ...] = (),
    ) -> None:
        self._bulk = bulk
        self._window = window
        self._max_items = max(1, max_items)
        self._shared_errors = shared_errors
        self._open: _Batch[T, R] | None = None

    async def __call__(self, item: T) -> R:
        batch = self._open
        if batch is not None:
            index = len(batch.items)
            batch.items.append(item)
            if len(batch.items) >= self._max_items:
                self._open = None
                batch.full.set()
            await batch.done.wait()
            if batch.results is not None:
                return batch.results[index]
            if batch.error is not None:
                # A copy each: one exception object raised in many tasks would gather all
                # their tracebacks.
                raise copy.copy(batch.error) from batch.error
            return (await self._bulk([item]))[0]
        batch = _Batch()
        batch.items.append(item)
        try:
            if self._max_items > 1 and self._window > 0:
                self._open = batch  # others join until the window ends or the batch is full
                with trio.move_on_after(self._window):
                    await batch.full.wait()
                if self._open is batch:
                    self._open = None
            try:
                results = await self._bulk(batch.items)
            except Exception as exc:
                if len(batch.items) == 1:
                    raise
                if isinstance(exc, self._shared_errors):
                    batch.error = exc  # every caller's: the finally below wakes them with it
                    raise
                batch.done.set()  # the others ask on their own, and so does the leader
                return (await self._bulk([item]))[0]
            if len(results) != len(batch.items):
                raise RuntimeError(f"a bulk call answered {len(results)} of {len(batch.items)} items")
            batch.results = results
            return results[0]
        finally:
            if self._open is batch:
                self._open = None
            batch.done.set()


class StoreBatcher:
    """The coalesced store calls of a primary's mailbox supervisors. Only a remote store's calls
    wait to be gathered: an in-process one answers each at once (``window`` 0)."""

    def __init__(self, store: Store, *, window: float | None = None) -> None:
        self._store = store
        if window is None:
            window = BATCH_WINDOW_SECONDS if store.remote else 0.0
        self.get_status: Coalescer[str, MailboxStatus | None] = Coalescer(self._get_statuses, window=window)
        # A failed set_statuses is the store's failure (it writes documents the callers made):
        # every caller's, at once. A failed read may be one unreadable document: asked again.
        self.set_status: Coalescer[tuple[str, MailboxStatus], None] = Coalescer(
            self._set_statuses, window=window, shared_errors=(StoreError,)
        )
        self.get_checkpoint: Coalescer[tuple[str, str], Checkpoint | None] = Coalescer(
            self._get_checkpoints, window=window
        )

    async def _get_statuses(self, mailbox_ids: list[str]) -> list[MailboxStatus | None]:
        found = await self._store.get_statuses(mailbox_ids)
        return [found.get(mailbox_id) for mailbox_id in mailbox_ids]

    async def _set_statuses(self, writes: list[tuple[str, MailboxStatus]]) -> list[None]:
        statuses: Mapping[str, MailboxStatus] = dict(writes)  # one mailbox twice: the later wins
        await self._store.set_statuses(statuses)
        return [None] * len(writes)

    async def _get_checkpoints(self, folders: list[tuple[str, str]]) -> list[Checkpoint | None]:
        found = await self._store.get_checkpoints_of(sorted({mailbox_id for mailbox_id, _ in folders}))
        return [found.get(mailbox_id, {}).get(folder) for mailbox_id, folder in folders]
