"""Store contract, the worker's two steps per sync: the sync lease claimed with what the sync
reads (``claim_lease_and_read_folder``), and the checkpoint written with the delivered count
(``advance_checkpoint(..., delivered=n)``)."""

from __future__ import annotations

import trio

from emlisten.abc import ClaimedFolder, Store
from emlisten.models import Checkpoint, MailboxState, MailboxStatus
from tests.contract.test_store import mailbox, store  # noqa: F401 - the parametrized fixture

TTL = 30.0


def _lease(mailbox_id: str, folder: str) -> str:
    return f"sync/{mailbox_id}/{folder}"


async def test_the_claim_reads_the_mailbox_and_the_checkpoint(store: Store) -> None:  # noqa: F811
    m = mailbox()
    await store.put_mailbox(m)
    await store.seed_checkpoint(m.id, "INBOX", Checkpoint(5, 10))
    inbox = _lease(m.id, "INBOX")

    claimed = await store.claim_lease_and_read_folder("w1", inbox, m.id, "INBOX", TTL)
    assert claimed == ClaimedFolder(m, Checkpoint(5, 10))
    assert await store.lease_owners([inbox]) == {inbox: "w1"}
    # A folder without a checkpoint yet.
    support = _lease(m.id, "Support")
    assert await store.claim_lease_and_read_folder("w1", support, m.id, "Support", TTL) == ClaimedFolder(
        m, None
    )
    # The holder may claim again, and reads what is stored now.
    await store.advance_checkpoint(m.id, "INBOX", Checkpoint(5, 12))
    again = await store.claim_lease_and_read_folder("w1", inbox, m.id, "INBOX", TTL)
    assert again == ClaimedFolder(m, Checkpoint(5, 12))


async def test_the_claim_is_exclusive_and_reads_nothing_when_lost(store: Store) -> None:  # noqa: F811
    m = mailbox()
    await store.put_mailbox(m)
    await store.seed_checkpoint(m.id, "INBOX", Checkpoint(5, 10))
    inbox = _lease(m.id, "INBOX")
    # Also against a lease taken the generic way (the same named lease).
    assert await store.claim_leases("w1", [inbox], TTL) == [inbox]
    assert await store.claim_lease_and_read_folder("w2", inbox, m.id, "INBOX", TTL) is None
    assert await store.lease_owners([inbox]) == {inbox: "w1"}
    await store.release_leases("w1", [inbox])
    assert await store.claim_lease_and_read_folder("w2", inbox, m.id, "INBOX", TTL) == ClaimedFolder(
        m, Checkpoint(5, 10)
    )
    assert await store.claim_leases("w1", [inbox], TTL) == []
    assert await store.renew_leases("w2", [inbox], TTL) == [inbox]


async def test_concurrent_folder_claims_have_one_winner(store: Store) -> None:  # noqa: F811
    m = mailbox()
    await store.put_mailbox(m)
    inbox = _lease(m.id, "INBOX")
    winners: list[str] = []

    async def claim(worker: str) -> None:
        if await store.claim_lease_and_read_folder(worker, inbox, m.id, "INBOX", TTL) is not None:
            winners.append(worker)

    async with trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(claim, f"w{n}")
    assert len(winners) == 1
    assert await store.lease_owners([inbox]) == {inbox: winners[0]}


async def test_an_expired_sync_lease_is_taken_over(store: Store) -> None:  # noqa: F811
    m = mailbox()
    await store.put_mailbox(m)
    inbox = _lease(m.id, "INBOX")
    assert await store.claim_lease_and_read_folder("dead", inbox, m.id, "INBOX", 0.2) is not None
    with trio.fail_after(5):
        while await store.claim_lease_and_read_folder("alive", inbox, m.id, "INBOX", TTL) is None:
            await trio.sleep(0.05)
    assert await store.lease_owners([inbox]) == {inbox: "alive"}
    assert await store.renew_leases("dead", [inbox], TTL) == []


async def test_the_claim_of_an_unknown_mailbox_holds_the_lease_and_reads_nothing(store: Store) -> None:  # noqa: F811
    gone = _lease("gone", "INBOX")
    assert await store.claim_lease_and_read_folder("w1", gone, "gone", "INBOX", TTL) == ClaimedFolder(
        None, None
    )
    # Held all the same: the worker releases it when its (empty) sync ends.
    assert await store.lease_owners([gone]) == {gone: "w1"}
    # A leftover checkpoint a worker put back after the store lost its data is no mailbox.
    await store.reassert_checkpoints({"gone": {"INBOX": Checkpoint(1, 5)}})
    assert await store.claim_lease_and_read_folder("w1", gone, "gone", "INBOX", TTL) == ClaimedFolder(
        None, None
    )
    # A closed mailbox reads as unknown.
    m = mailbox()
    await store.put_mailbox(m)
    await store.seed_checkpoint(m.id, "INBOX", Checkpoint(5, 10))
    await store.remove_mailbox(m.id)
    inbox = _lease(m.id, "INBOX")
    assert await store.claim_lease_and_read_folder("w1", inbox, m.id, "INBOX", TTL) == ClaimedFolder(
        None, None
    )


async def _delivered(adapter: Store, mailbox_id: str) -> int | None:
    status = (await adapter.get_statuses([mailbox_id]))[mailbox_id]
    return None if status is None else status.delivered


async def test_the_checkpoint_carries_the_delivered_count(store: Store) -> None:  # noqa: F811
    m = mailbox()
    await store.put_mailbox(m)
    await store.set_status(m.id, MailboxStatus(MailboxState.LISTENING))
    await store.seed_checkpoint(m.id, "INBOX", Checkpoint(5, 10))

    assert await store.advance_checkpoint(m.id, "INBOX", Checkpoint(5, 13), delivered=3) is True
    assert await store.get_checkpoint(m.id, "INBOX") == Checkpoint(5, 13)
    assert await _delivered(store, m.id) == 3
    # Counted whether the checkpoint moved or not, as add_delivered after it would have; the
    # checkpoint still only moves forward.
    assert await store.advance_checkpoint(m.id, "INBOX", Checkpoint(5, 12), delivered=2) is False
    assert await store.get_checkpoint(m.id, "INBOX") == Checkpoint(5, 13)
    assert await _delivered(store, m.id) == 5
    # No count, nothing added; a new UIDVALIDITY still replaces the checkpoint.
    assert await store.advance_checkpoint(m.id, "INBOX", Checkpoint(6, 1)) is True
    assert await _delivered(store, m.id) == 5
    assert await store.advance_checkpoint(m.id, "INBOX", Checkpoint(6, 4), delivered=1) is True
    assert (await store.get_checkpoint(m.id, "INBOX"), await _delivered(store, m.id)) == (Checkpoint(6, 4), 6)
    # A status write does not reset what the checkpoint writes counted.
    await store.set_status(m.id, MailboxStatus(MailboxState.CONNECT_ERROR, delivered=0))
    assert await _delivered(store, m.id) == 6


async def test_the_count_needs_a_status_and_never_resurrects_a_mailbox(store: Store) -> None:  # noqa: F811
    m = mailbox()
    await store.put_mailbox(m)
    await store.seed_checkpoint(m.id, "INBOX", Checkpoint(5, 10))
    # No status yet: the checkpoint moves, no status appears (as add_delivered).
    assert await store.advance_checkpoint(m.id, "INBOX", Checkpoint(5, 11), delivered=4) is True
    assert await store.get_statuses([m.id]) == {m.id: None}
    # After /close: no checkpoint comes back, and the mailbox stays closed.
    await store.remove_mailbox(m.id)
    assert await store.advance_checkpoint(m.id, "INBOX", Checkpoint(5, 20), delivered=1) is False
    assert await store.get_checkpoint(m.id, "INBOX") is None
    assert await store.get_mailbox(m.id) is None
    status = (await store.get_statuses([m.id]))[m.id]
    assert status is not None and status.state is MailboxState.CLOSED
