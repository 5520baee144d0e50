"""The renewal's step-back moment tells a silent store from a pause that fell in an attempt.

A node steps back (stops all its mailboxes) when the store has not answered 0.8 TTL after the
last renewal. A process frozen while an attempt waited used to see that deadline as passed on
resume and step back, though the store's answer was already there (CI, test_pause[redis]).
Pure logic of the renewal loop, on a mock clock; the real pause is tests/service/test_pause.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio
import trio.testing

from emlisten.config import Settings
from emlisten.mail.imap.source import ImapSource
from emlisten.queue.inprocess import InProcessQueue
from emlisten.service.listening import MailboxManager
from emlisten.sink.creatio import CreatioSink
from emlisten.store.memory import MemoryStore

TTL = 1.0
RENEW = 0.3
MAILBOXES = ["m1", "m2"]


class _HeldRenewals(MemoryStore):
    """Holds every renewal once ``hold`` is set, until ``answer`` is set. Plays a store other
    nodes use too (Redis) unless ``shared`` is false."""

    def __init__(self, *, shared: bool = True) -> None:
        super().__init__()
        self.shared = shared
        self.hold = False
        self.waiting = trio.Event()
        self.answer = trio.Event()

    async def renew_leases(self, node_id: str, mailbox_ids: Sequence[str], ttl: float) -> list[str]:
        if self.hold:
            self.waiting.set()
            await self.answer.wait()
        return await super().renew_leases(node_id, mailbox_ids, ttl)


async def _owning_node(store: _HeldRenewals) -> MailboxManager:
    settings = Settings(node_id="n1", lease_ttl_seconds=TTL, lease_renew_seconds=RENEW)
    manager = MailboxManager(settings, store, InProcessQueue(), ImapSource(), CreatioSink())
    assert await store.claim_leases("n1", MAILBOXES, TTL) == MAILBOXES
    manager._owned.update(MAILBOXES)
    await manager._renew()  # the last renewal that succeeded: at 0.0
    return manager


async def _attempt_waits(clock: trio.testing.MockClock, store: _HeldRenewals) -> None:
    store.hold = True
    await trio.testing.wait_all_tasks_blocked()  # the loop sleeps until its first renewal
    clock.jump(RENEW)
    await store.waiting.wait()
    assert trio.current_time() < 0.8 * TTL


async def test_a_pause_during_an_attempt_keeps_the_mailboxes(mock_clock: trio.testing.MockClock) -> None:
    store = _HeldRenewals()
    manager = await _owning_node(store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager._renew_loop)
        await _attempt_waits(mock_clock, store)
        # Frozen for 3 TTLs while the attempt waited. On resume the answer is in the socket,
        # but the deadline fires in the first pass, before the caller hears of it.
        mock_clock.jump(3 * TTL)
        await trio.lowlevel.checkpoint()
        store.answer.set()
        await trio.testing.wait_all_tasks_blocked()
        assert manager.owned == frozenset(MAILBOXES)
        assert manager._renewed_at >= 3 * TTL
        nursery.cancel_scope.cancel()


async def test_a_store_silent_until_the_deadline_makes_the_node_step_back(
    mock_clock: trio.testing.MockClock,
) -> None:
    store = _HeldRenewals()
    manager = await _owning_node(store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager._renew_loop)
        await _attempt_waits(mock_clock, store)
        mock_clock.jump(0.8 * TTL - trio.current_time())  # the process runs; the store says nothing
        await trio.testing.wait_all_tasks_blocked()
        assert manager.owned == frozenset()
        nursery.cancel_scope.cancel()


async def test_a_late_renewal_of_an_in_process_store_keeps_the_mailboxes(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Nobody else can take the leases of an in-process store: a renewal that ends past the
    deadline (the process's own loop running behind) is no reason to stop every mailbox. A
    10,000-mailbox node woken from a 47 s pause did that on a slow day, and closed all 10,000
    sessions. The same moment as in the step-back test above, with the store in-process."""
    store = _HeldRenewals(shared=False)
    manager = await _owning_node(store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager._renew_loop)
        await _attempt_waits(mock_clock, store)
        for _ in range(4):  # the process runs, the renewal has not ended: 0.8 TTL, then past TTL
            mock_clock.jump(0.8 * TTL - trio.current_time() if trio.current_time() < 0.8 * TTL else 0.1 * TTL)
            await trio.testing.wait_all_tasks_blocked()
        assert manager.owned == frozenset(MAILBOXES)
        store.answer.set()
        await trio.testing.wait_all_tasks_blocked()
        assert manager.owned == frozenset(MAILBOXES)
        assert manager._renewed_at >= RENEW
        nursery.cancel_scope.cancel()


async def test_an_in_process_store_renews_in_slices_that_let_other_tasks_run() -> None:
    """10,000 leases renewed in one step held the event loop 4-14 ms every renewal period
    (EMLISTEN_SLOW_STEP_MS at 10,000 mailboxes), and a mail arriving then waited it out. Each
    slice is one step of an in-process store; other tasks run between them, and every lease is
    still renewed."""
    store = MemoryStore()
    owned = [f"m{i}" for i in range(5_500)]  # six slices of at most 1,000
    settings = Settings(node_id="n1", lease_ttl_seconds=TTL, lease_renew_seconds=RENEW)
    manager = MailboxManager(settings, store, InProcessQueue(), ImapSource(), CreatioSink())
    assert await store.claim_leases("n1", owned, TTL) == owned
    manager._owned.update(owned)
    turns_while_renewing = 0
    renewing = True

    async def another_task() -> None:
        nonlocal turns_while_renewing
        while renewing:
            turns_while_renewing += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(another_task)
        await trio.lowlevel.checkpoint()  # it has started
        before = turns_while_renewing
        await manager._renew()
        renewing = False
    # Trio runs every runnable task once per pass, in an order that varies: the other task runs
    # in each of the four passes strictly inside the six slices' five, whatever the order.
    assert turns_while_renewing - before >= 4
    assert manager._owned == set(owned)
    assert await store.lease_owners(owned) == dict.fromkeys(owned, "n1")


async def test_a_remote_store_renews_in_one_call() -> None:
    """Redis answers every lease in one round trip; slices would only add round trips."""

    class _Counting(MemoryStore):
        remote = True

        def __init__(self) -> None:
            super().__init__()
            self.calls: list[int] = []

        async def renew_leases(self, node_id: str, mailbox_ids: Sequence[str], ttl: float) -> list[str]:
            self.calls.append(len(mailbox_ids))
            return await super().renew_leases(node_id, mailbox_ids, ttl)

    store = _Counting()
    owned = [f"m{i}" for i in range(2_500)]
    settings = Settings(node_id="n1", lease_ttl_seconds=TTL, lease_renew_seconds=RENEW)
    manager = MailboxManager(settings, store, InProcessQueue(), ImapSource(), CreatioSink())
    await store.claim_leases("n1", owned, TTL)
    manager._owned.update(owned)
    await manager._renew()
    assert store.calls == [2_500]
