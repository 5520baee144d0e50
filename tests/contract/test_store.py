"""The Store contract, written once and run against every adapter (memory, Redis for real, SQLite)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from emlisten.abc import Store
from emlisten.errors import StoreError
from emlisten.models import (
    Checkpoint,
    MailboxConfig,
    MailboxState,
    MailboxStatus,
    NodeInfo,
    Security,
    ServerEndpoint,
)
from emlisten.store.memory import MemoryStore
from tests.contract.backends import redis_store, sqlite_store


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis), "sqlite"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "redis":
        async with redis_store() as adapter:
            yield adapter
        return
    if request.param == "sqlite":
        async with sqlite_store(request.getfixturevalue("tmp_path")) as durable:
            yield durable
        return
    memory: Store = MemoryStore()
    yield memory
    await memory.aclose()


def mailbox(mailbox_id: str = "11111111-1111-1111-1111-111111111111", **changes: object) -> MailboxConfig:
    config = MailboxConfig(
        id=mailbox_id,
        user_name="user@example.com",
        password="s3cret",
        imap=ServerEndpoint("imap.example.com", 993, Security.SSL_ON_CONNECT),
        bpm_endpoint="https://creatio.example.com/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail",
        folders=("INBOX", "Support"),
        feature_values={"MarkEmailsAsSynchronized": True},
    )
    return config.replace(**changes)


async def test_registry_round_trip(store: Store) -> None:
    original = mailbox()
    await store.put_mailbox(original)
    assert await store.get_mailbox(original.id) == original
    assert await store.list_mailbox_ids() == [original.id]
    assert await store.existing([original.id, "other"]) == {original.id}


async def test_get_many_mailboxes(store: Store) -> None:
    a, b = mailbox(), mailbox("22222222-2222-2222-2222-222222222222", password="other")
    await store.put_mailbox(a)
    await store.put_mailbox(b)
    assert await store.get_mailboxes([a.id, "unknown", b.id]) == {a.id: a, b.id: b}
    assert await store.get_mailboxes([]) == {}


async def test_put_replaces(store: Store) -> None:
    await store.put_mailbox(mailbox())
    changed = mailbox(password="new", revision=2)
    await store.put_mailbox(changed)
    stored = await store.get_mailbox(changed.id)
    assert stored is not None
    assert stored.password == "new"
    assert stored.revision == 2


async def test_remove_forgets_mailbox_and_checkpoints_and_reads_closed(store: Store) -> None:
    m = mailbox()
    await store.put_mailbox(m)
    await store.seed_checkpoint(m.id, "INBOX", Checkpoint(7, 10))
    assert await store.remove_mailbox(m.id) is True
    assert await store.get_mailbox(m.id) is None
    assert await store.get_checkpoint(m.id, "INBOX") is None
    statuses = await store.get_statuses([m.id])
    status = statuses[m.id]
    assert status is not None
    assert status.state is MailboxState.CLOSED
    assert await store.remove_mailbox(m.id) is False


async def test_unknown_mailbox(store: Store) -> None:
    assert await store.get_mailbox("nope") is None
    assert await store.get_statuses(["nope"]) == {"nope": None}
    assert await store.existing(["nope"]) == set()


async def test_status_and_delivered_counter(store: Store) -> None:
    m = mailbox()
    await store.put_mailbox(m)
    await store.set_status(m.id, MailboxStatus(MailboxState.LISTENING, updated_at=1.0, node="n1"))
    await store.add_delivered(m.id, 3)
    await store.add_delivered(m.id, 2)
    status = (await store.get_statuses([m.id]))[m.id]
    assert status is not None
    assert (status.state, status.delivered, status.node) == (MailboxState.LISTENING, 5, "n1")


async def test_status_writes_never_reset_the_delivered_counter(store: Store) -> None:
    m = mailbox()
    await store.put_mailbox(m)
    await store.set_status(m.id, MailboxStatus(MailboxState.LISTENING))
    await store.add_delivered(m.id, 4)
    await store.set_status(m.id, MailboxStatus(MailboxState.CONNECT_ERROR, delivered=0))
    status = (await store.get_statuses([m.id]))[m.id]
    assert status is not None
    assert (status.state, status.delivered) == (MailboxState.CONNECT_ERROR, 4)


async def test_seed_only_once(store: Store) -> None:
    m = mailbox()
    await store.put_mailbox(m)
    assert await store.seed_checkpoint(m.id, "INBOX", Checkpoint(5, 100)) is True
    assert await store.seed_checkpoint(m.id, "INBOX", Checkpoint(5, 1)) is False
    assert await store.get_checkpoint(m.id, "INBOX") == Checkpoint(5, 100)
    # Folders are independent.
    assert await store.get_checkpoint(m.id, "Support") is None


async def test_seed_ignored_for_unknown_mailbox(store: Store) -> None:
    assert await store.seed_checkpoint("gone", "INBOX", Checkpoint(1, 1)) is False
    assert await store.get_checkpoint("gone", "INBOX") is None


async def test_checkpoint_only_moves_forward_within_uidvalidity(store: Store) -> None:
    m = mailbox()
    await store.put_mailbox(m)
    await store.seed_checkpoint(m.id, "INBOX", Checkpoint(5, 10))
    assert await store.advance_checkpoint(m.id, "INBOX", Checkpoint(5, 12)) is True
    assert await store.advance_checkpoint(m.id, "INBOX", Checkpoint(5, 11)) is False
    assert await store.advance_checkpoint(m.id, "INBOX", Checkpoint(5, 12)) is False
    assert await store.get_checkpoint(m.id, "INBOX") == Checkpoint(5, 12)
    # A new UIDVALIDITY replaces the checkpoint, even with a lower UID.
    assert await store.advance_checkpoint(m.id, "INBOX", Checkpoint(6, 3)) is True
    assert await store.get_checkpoint(m.id, "INBOX") == Checkpoint(6, 3)


async def test_cursor_travels_with_the_checkpoint(store: Store) -> None:
    m = mailbox()
    await store.put_mailbox(m)
    await store.seed_checkpoint(m.id, "INBOX", Checkpoint(1, 0, "sync-state-0"))
    assert await store.advance_checkpoint(m.id, "INBOX", Checkpoint(1, 1, "sync-state-1")) is True
    assert await store.get_checkpoint(m.id, "INBOX") == Checkpoint(1, 1, "sync-state-1")
    assert await store.get_checkpoints(m.id) == {"INBOX": Checkpoint(1, 1, "sync-state-1")}


async def test_advance_does_not_resurrect_closed_mailbox(store: Store) -> None:
    m = mailbox()
    await store.put_mailbox(m)
    await store.remove_mailbox(m.id)
    assert await store.advance_checkpoint(m.id, "INBOX", Checkpoint(5, 12)) is False
    assert await store.get_checkpoint(m.id, "INBOX") is None


async def test_change_notifications_reach_every_subscriber(store: Store) -> None:
    async with store.changes() as first, store.changes() as second:
        await store.publish_change("a")
        await store.publish_change("b")
        with trio.fail_after(5):
            assert [await anext(first), await anext(first)] == ["a", "b"]
            assert [await anext(second), await anext(second)] == ["a", "b"]


async def test_changes_before_subscribing_are_not_replayed(store: Store) -> None:
    await store.publish_change("early")
    async with store.changes() as changes:
        await store.publish_change("late")
        with trio.fail_after(5):
            assert await anext(changes) == "late"


async def test_an_error_inside_changes_comes_out_as_it_was_raised(store: Store) -> None:
    """Not wrapped in an ExceptionGroup (as a nursery inside ``changes()`` would): the ownership
    loop catches the StoreError of a lost feed by its type and subscribes again."""
    with pytest.raises(StoreError, match=r"^the feed was lost$"):
        async with store.changes() as changes:
            await store.publish_change("a")
            with trio.fail_after(5):
                assert await anext(changes) == "a"
            raise StoreError("the feed was lost")
    with trio.move_on_after(0.05) as scope:  # a cancelled body is just cancelled
        async with store.changes():
            await trio.sleep_forever()
    assert scope.cancelled_caught
    async with store.changes() as changes:  # and the store subscribes again
        await store.publish_change("b")
        with trio.fail_after(5):
            assert await anext(changes) == "b"


async def test_concurrent_advances_keep_the_highest(store: Store) -> None:
    m = mailbox()
    await store.put_mailbox(m)
    await store.seed_checkpoint(m.id, "INBOX", Checkpoint(9, 0))
    async with trio.open_nursery() as nursery:
        for uid in range(1, 51):
            nursery.start_soon(store.advance_checkpoint, m.id, "INBOX", Checkpoint(9, uid))
    assert await store.get_checkpoint(m.id, "INBOX") == Checkpoint(9, 50)


async def test_secrets_not_in_repr() -> None:
    m = mailbox(password="hunter2-password", access_token="tok-abcdef")
    assert "hunter2-password" not in repr(m)
    assert "tok-abcdef" not in repr(m)


# Ownership (heartbeats, leases) is in test_store_ownership.py; these add the edges.


async def test_removed_mailbox_has_no_checkpoints_left(store: Store) -> None:
    m = mailbox()
    await store.put_mailbox(m)
    await store.seed_checkpoint(m.id, "INBOX", Checkpoint(5, 10))
    await store.seed_checkpoint(m.id, "Support", Checkpoint(6, 2))
    await store.remove_mailbox(m.id)
    assert await store.get_checkpoints(m.id) == {}


async def test_a_later_heartbeat_replaces_the_node_info(store: Store) -> None:
    await store.heartbeat(NodeInfo("node-1", "primary", mailboxes=3, seen_at=1.0), 30)
    await store.heartbeat(NodeInfo("node-1", "primary", mailboxes=4, seen_at=2.0), 30)
    await store.remove_node("never-seen")
    nodes = [n for n in await store.list_nodes() if n.id == "node-1"]
    assert [(n.mailboxes, n.seen_at) for n in nodes] == [(4, 2.0)]


async def test_lease_calls_with_no_mailboxes(store: Store) -> None:
    assert await store.claim_leases("n", [], 30) == []
    assert await store.renew_leases("n", [], 30) == []
    await store.release_leases("n", [])
    assert await store.lease_owners([]) == {}


async def test_concurrent_batch_claims_give_each_lease_to_one_node(store: Store) -> None:
    ids = [f"m{i}" for i in range(20)]
    won: dict[str, list[str]] = {}

    async def claim(node: str) -> None:
        won[node] = await store.claim_leases(node, ids, 30)

    async with trio.open_nursery() as nursery:
        for node in ("n1", "n2", "n3"):
            nursery.start_soon(claim, node)
    assert sorted(mid for held in won.values() for mid in held) == sorted(ids)
    owners = await store.lease_owners(ids)
    for node, held in won.items():
        assert all(owners[mid] == node for mid in held)


async def test_state_counts_cover_registered_mailboxes_only(store: Store) -> None:
    ids = [f"{n}{n}{n}{n}{n}{n}{n}{n}-1111-1111-1111-111111111111" for n in range(1, 5)]
    for mailbox_id in ids:
        await store.put_mailbox(mailbox(mailbox_id))
    await store.set_status(ids[0], MailboxStatus(MailboxState.LISTENING))
    await store.set_status(ids[1], MailboxStatus(MailboxState.LISTENING))
    await store.set_status(ids[2], MailboxStatus(MailboxState.AUTHENTICATION_ERROR, last_error="no"))
    # ids[3] has no status yet: starting. A closed mailbox is not counted.
    assert await store.state_counts() == (4, {"listening": 2, "authenticationError": 1, "starting": 1})
    await store.remove_mailbox(ids[0])
    assert await store.state_counts() == (3, {"listening": 1, "authenticationError": 1, "starting": 1})
