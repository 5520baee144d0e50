"""Reading sessions kept open between fetches, so the next mail of a mailbox is fetched at once.

Each open session is held by a task in the pool's nursery (its ``async with`` stays structured)
and closed after ``idle_seconds`` without use, or at once when it failed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from emlisten.abc import MailReader, MailSource
from emlisten.errors import MailSourceError
from emlisten.models import MailboxConfig

log = logging.getLogger(__name__)


class _Held:
    __slots__ = ("config", "expiry", "lock", "reader", "retire")

    def __init__(self, config: MailboxConfig, reader: MailReader) -> None:
        self.config = config
        self.reader = reader
        self.lock = trio.Lock()
        self.retire = trio.Event()
        # Its deadline is the idle expiry; users push it out (or to infinity while in use).
        self.expiry = trio.CancelScope()


class ReaderPool:
    def __init__(self, source: MailSource, *, idle_seconds: float) -> None:
        self.source = source
        self.idle_seconds = idle_seconds
        self._held: dict[str, _Held] = {}
        self._nursery: trio.Nursery | None = None

    @property
    def open_count(self) -> int:
        return len(self._held)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def retire(self, mailbox_id: str) -> None:
        held = self._held.pop(mailbox_id, None)
        if held is not None:
            held.retire.set()

    @asynccontextmanager
    async def reader(
        self, mailbox: MailboxConfig, *, linger: float | None = None
    ) -> AsyncIterator[MailReader]:
        """A logged-in session for this mailbox, used by one task at a time.

        ``linger``: how long a session opened for this use stays open afterwards (default
        ``idle_seconds``); a session that was already open keeps the pool's idle time."""

        assert self._nursery is not None
        held = self._held.get(mailbox.id)
        if held is not None and held.config != mailbox:
            self.retire(mailbox.id)  # credentials changed
            held = None
        keep = self.idle_seconds
        if held is None:
            held = await self._nursery.start(self._hold, mailbox)
            keep = self.idle_seconds if linger is None else linger
        async with held.lock:
            held.expiry.deadline = math.inf
            try:
                yield held.reader
            except MailSourceError:
                self.retire(mailbox.id)
                raise
            finally:
                held.expiry.deadline = trio.current_time() + keep

    async def _hold(self, mailbox: MailboxConfig, *, task_status: trio.TaskStatus[_Held]) -> None:
        async with self.source.open_reader(mailbox) as reader:
            held = _Held(mailbox, reader)
            self._held[mailbox.id] = held
            held.expiry.deadline = trio.current_time() + self.idle_seconds
            task_status.started(held)
            try:
                with held.expiry:
                    await held.retire.wait()
            finally:
                if self._held.get(mailbox.id) is held:
                    del self._held[mailbox.id]
                # Wait (briefly, even when cancelled) for a current user to finish before the
                # session is logged out under it.
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    async with held.lock:
                        pass
