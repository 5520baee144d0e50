"""Store contract, part two: node heartbeats and mailbox leases (ownership across primaries)."""

from __future__ import annotations

import trio

from emlisten.abc import Store
from emlisten.models import Checkpoint, NodeInfo
from tests.contract.test_store import mailbox, store  # noqa: F401 - the parametrized fixture

TTL = 30.0


async def test_heartbeats_list_live_nodes(store: Store) -> None:  # noqa: F811
    await store.heartbeat(NodeInfo("n1", "primary", mailboxes=3, seen_at=1.0), TTL)
    await store.heartbeat(NodeInfo("n2", "secondary"), TTL)
    nodes = {n.id: n for n in await store.list_nodes()}
    assert set(nodes) >= {"n1", "n2"}
    assert (nodes["n1"].role, nodes["n1"].mailboxes) == ("primary", 3)
    await store.remove_node("n1")
    assert "n1" not in {n.id for n in await store.list_nodes()}


async def test_heartbeat_expires(store: Store) -> None:  # noqa: F811
    await store.heartbeat(NodeInfo("short-lived", "primary"), 0.2)
    assert "short-lived" in {n.id for n in await store.list_nodes()}
    with trio.fail_after(5):
        while "short-lived" in {n.id for n in await store.list_nodes()}:
            await trio.sleep(0.05)


async def test_lease_is_exclusive(store: Store) -> None:  # noqa: F811
    assert await store.claim_leases("n1", ["a", "b"], TTL) == ["a", "b"]
    assert await store.claim_leases("n2", ["a", "b", "c"], TTL) == ["c"]
    # Claiming again what one holds is fine (idempotent).
    assert await store.claim_leases("n1", ["a"], TTL) == ["a"]
    assert await store.lease_owners(["a", "b", "c", "d"]) == {"a": "n1", "b": "n1", "c": "n2", "d": None}


async def test_renew_keeps_own_and_free_leases_never_others(store: Store) -> None:  # noqa: F811
    await store.claim_leases("n1", ["a"], TTL)
    await store.claim_leases("n2", ["b"], TTL)
    # "never" is free (nobody holds it): renewing takes it; "b" is n2's and stays n2's.
    assert await store.renew_leases("n1", ["a", "b", "never"], TTL) == ["a", "never"]
    assert await store.lease_owners(["a", "b", "never"]) == {"a": "n1", "b": "n2", "never": "n1"}


async def test_renew_re_takes_a_lease_that_expired_while_nobody_took_it(store: Store) -> None:  # noqa: F811
    # The node was paused past the TTL: its lease expired, but no other node claimed it.
    await store.claim_leases("paused", ["a", "b"], 0.2)
    with trio.fail_after(5):
        while await store.lease_owners(["a", "b"]) != {"a": None, "b": None}:
            await trio.sleep(0.05)
    assert await store.claim_leases("other", ["b"], TTL) == ["b"]
    assert await store.renew_leases("paused", ["a", "b"], TTL) == ["a"]
    assert await store.lease_owners(["a", "b"]) == {"a": "paused", "b": "other"}


async def test_release_only_own_leases(store: Store) -> None:  # noqa: F811
    await store.claim_leases("n1", ["a"], TTL)
    await store.claim_leases("n2", ["b"], TTL)
    await store.release_leases("n1", ["a", "b"])
    assert await store.lease_owners(["a", "b"]) == {"a": None, "b": "n2"}
    assert await store.claim_leases("n3", ["a"], TTL) == ["a"]


async def test_expired_lease_can_be_taken_over(store: Store) -> None:  # noqa: F811
    await store.claim_leases("dead", ["a"], 0.2)
    with trio.fail_after(5):
        while not await store.claim_leases("alive", ["a"], TTL):
            await trio.sleep(0.05)
    assert await store.lease_owners(["a"]) == {"a": "alive"}
    # The old holder comes back (it was paused, not dead): the lease is lost, and stays taken.
    assert await store.renew_leases("dead", ["a"], TTL) == []
    assert await store.lease_owners(["a"]) == {"a": "alive"}


async def test_concurrent_claims_have_one_winner(store: Store) -> None:  # noqa: F811
    winners: list[str] = []

    async def claim(node: str) -> None:
        winners.extend(node for _ in await store.claim_leases(node, ["contested"], TTL))

    async with trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(claim, f"n{n}")
    assert len(winners) == 1


async def test_closing_a_mailbox_frees_its_lease(store: Store) -> None:  # noqa: F811
    m = mailbox()
    await store.put_mailbox(m)
    await store.claim_leases("n1", [m.id], TTL)
    await store.remove_mailbox(m.id)
    assert await store.lease_owners([m.id]) == {m.id: None}


async def test_get_checkpoints_lists_every_folder(store: Store) -> None:  # noqa: F811
    m = mailbox()
    await store.put_mailbox(m)
    await store.seed_checkpoint(m.id, "INBOX", Checkpoint(1, 10))
    await store.seed_checkpoint(m.id, "Support", Checkpoint(2, 20))
    assert await store.get_checkpoints(m.id) == {"INBOX": Checkpoint(1, 10), "Support": Checkpoint(2, 20)}
    assert await store.get_checkpoints("other") == {}


async def test_checkpoints_of_many_mailboxes(store: Store) -> None:  # noqa: F811
    a, b = mailbox("aaaaaaaa-0000-0000-0000-000000000001"), mailbox("aaaaaaaa-0000-0000-0000-000000000002")
    for m in (a, b):
        await store.put_mailbox(m)
    await store.seed_checkpoint(a.id, "INBOX", Checkpoint(1, 10))
    assert await store.get_checkpoints_of([a.id, b.id]) == {a.id: {"INBOX": Checkpoint(1, 10)}, b.id: {}}
    assert await store.get_checkpoints_of([]) == {}
