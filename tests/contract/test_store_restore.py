"""Store contract, the restore after a store lost its data: the data set's identity
(``incarnation``), ``restore_mailboxes`` (register if absent, checkpoints only forward, atomic per
mailbox) and ``reassert_checkpoints`` (the workers put back the checkpoints they wrote, only
forward, registered or not), on every adapter, plus what only Redis and SQLite can show."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from emlisten.abc import Store
from emlisten.models import Checkpoint
from emlisten.service.listeners import StoreListenerControl
from emlisten.store.redis import RedisStore
from tests.contract.backends import (
    REDIS_URL,
    TEST_SECRET_KEY,
    delete_redis_keys,
    redis_store,
    sqlite_store,
    unique_prefix,
)
from tests.contract.test_redis_specific import raw_hash
from tests.contract.test_store import mailbox, store  # noqa: F401 - the parametrized fixture


async def test_the_incarnation_stays_while_the_data_does(store: Store) -> None:  # noqa: F811
    first = await store.incarnation()
    assert first
    await store.put_mailbox(mailbox())
    assert await store.incarnation() == first


async def test_restore_into_an_empty_store(store: Store) -> None:  # noqa: F811
    m = mailbox()  # folders INBOX and Support; only INBOX's checkpoint is known
    assert await store.restore_mailboxes([m], {m.id: {"INBOX": Checkpoint(7, 10)}}) == [m.id]

    assert await store.get_mailbox(m.id) == m  # the password comes back as it went in
    assert await store.list_mailbox_ids() == [m.id]
    assert await store.get_checkpoints(m.id) == {"INBOX": Checkpoint(7, 10)}
    assert await store.get_history_floor(m.id, "INBOX") == Checkpoint(7, 10)
    # The worker's "no checkpoint: seed at the current position" cannot move a restored one;
    # a folder restored without one is seeded as before.
    assert await store.seed_checkpoint(m.id, "INBOX", Checkpoint(7, 99)) is False
    assert await store.seed_checkpoint(m.id, "Support", Checkpoint(3, 4)) is True
    assert await store.advance_checkpoint(m.id, "INBOX", Checkpoint(7, 12)) is True
    assert await store.get_checkpoint(m.id, "INBOX") == Checkpoint(7, 12)


async def test_restore_never_overwrites_what_was_written_meanwhile(store: Store) -> None:  # noqa: F811
    ours = mailbox()
    theirs = ours.replace(password="written-by-the-api", revision=3)  # e.g. Creatio's recreate
    await store.put_mailbox(theirs)
    await store.seed_checkpoint(ours.id, "INBOX", Checkpoint(7, 20))

    restored = await store.restore_mailboxes(
        [ours], {ours.id: {"INBOX": Checkpoint(7, 30), "Support": Checkpoint(8, 5)}}
    )

    assert restored == []
    assert await store.get_mailbox(ours.id) == theirs
    # Checkpoints only go forward: INBOX moves on to the one this node knows was reached (mail up
    # to it was delivered before the loss); Support had none and gets ours. The floor stays.
    assert await store.get_checkpoints(ours.id) == {"INBOX": Checkpoint(7, 30), "Support": Checkpoint(8, 5)}
    assert await store.get_history_floor(ours.id, "INBOX") == Checkpoint(7, 20)
    # Never back, and never over another UIDVALIDITY (the folder was rebuilt meanwhile).
    await store.advance_checkpoint(ours.id, "Support", Checkpoint(9, 1))
    older = {"INBOX": Checkpoint(7, 25), "Support": Checkpoint(8, 6)}
    await store.restore_mailboxes([ours], {ours.id: older})
    assert await store.get_checkpoints(ours.id) == {"INBOX": Checkpoint(7, 30), "Support": Checkpoint(9, 1)}


async def test_restoring_again_changes_nothing(store: Store) -> None:  # noqa: F811
    a, b = mailbox(), mailbox("22222222-2222-2222-2222-222222222222")
    checkpoints = {a.id: {"INBOX": Checkpoint(1, 5)}, b.id: {"INBOX": Checkpoint(2, 6)}}
    assert sorted(await store.restore_mailboxes([a, b], checkpoints)) == sorted([a.id, b.id])
    await store.advance_checkpoint(a.id, "INBOX", Checkpoint(1, 9))

    # Another node (or this one, a tick later) restores the same mailboxes with older knowledge.
    assert await store.restore_mailboxes([a, b], {a.id: {"INBOX": Checkpoint(1, 2)}}) == []
    assert await store.get_checkpoint(a.id, "INBOX") == Checkpoint(1, 9)
    assert await store.get_checkpoint(b.id, "INBOX") == Checkpoint(2, 6)
    assert await store.restore_mailboxes([], {}) == []


async def test_a_restored_mailbox_is_never_seen_without_its_checkpoint(store: Store) -> None:  # noqa: F811
    """A worker that finds the mailbox and then reads no checkpoint seeds one at the server's
    current position, skipping the mail in between: the two must appear together."""
    mailboxes = [mailbox(f"m-{n:04d}") for n in range(300)]
    checkpoints = {m.id: {"INBOX": Checkpoint(1, 100)} for m in mailboxes}
    seen_without: list[str] = []
    done = False

    async def worker() -> None:
        while not done:
            for m in mailboxes:
                if (
                    await store.get_mailbox(m.id) is not None
                    and await store.get_checkpoint(m.id, "INBOX") is None
                ):
                    seen_without.append(m.id)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker)
        assert len(await store.restore_mailboxes(mailboxes, checkpoints)) == len(mailboxes)
        done = True
    assert seen_without == []


@pytest.mark.redis
async def test_redis_a_wiped_prefix_is_a_new_incarnation_and_credentials_stay_encrypted() -> None:
    prefix = unique_prefix()
    async with (
        redis_store(prefix=prefix) as node,
        RedisStore.open(REDIS_URL, prefix=prefix, secret_key=TEST_SECRET_KEY) as other_node,
    ):
        first = await node.incarnation()
        assert await other_node.incarnation() == first  # one id per data set, whoever asks

        await delete_redis_keys(prefix)  # what a Redis restarted empty looks like to us
        second = await other_node.incarnation()
        assert second != first
        assert await node.incarnation() == second

        m = mailbox(password="restored-secret-password")
        assert await node.restore_mailboxes([m], {m.id: {"INBOX": Checkpoint(1, 2)}}) == [m.id]
        stored = await raw_hash(f"{prefix}mailboxes")
        assert b"restored-secret-password" not in stored[m.id.encode()]
        assert await other_node.get_mailbox(m.id) == m


async def test_sqlite_keeps_the_incarnation_and_the_restore_across_a_restart(tmp_path: Path) -> None:
    m = mailbox()
    async with sqlite_store(tmp_path / "a") as durable:
        first = await durable.incarnation()
        await durable.restore_mailboxes([m], {m.id: {"INBOX": Checkpoint(7, 10)}})
    async with sqlite_store(tmp_path / "a") as durable:
        assert await durable.incarnation() == first
        assert await durable.get_mailbox(m.id) == m
        assert await durable.get_checkpoints(m.id) == {"INBOX": Checkpoint(7, 10)}
        assert await durable.get_history_floor(m.id, "INBOX") == Checkpoint(7, 10)
    async with sqlite_store(tmp_path / "b") as elsewhere:
        assert await elsewhere.incarnation() != first


async def test_checkpoints_of_thousands_of_mailboxes_at_once(store: Store) -> None:  # noqa: F811
    """What a primary reads every EMLISTEN_CHECKPOINT_REFRESH_SECONDS (Redis: one script per
    2,000 mailboxes, so this crosses a chunk)."""
    mailboxes = [mailbox(f"m-{n:04d}", folders=("INBOX",)) for n in range(2500)]
    expected = {m.id: {"INBOX": Checkpoint(1, n)} for n, m in enumerate(mailboxes)}
    await store.restore_mailboxes(mailboxes, expected)
    found = await store.get_checkpoints_of([*expected, "unknown"])
    assert found == {**expected, "unknown": {}}


# -- reassert_checkpoints: what the workers know they delivered ----------------------------------


async def test_reassert_into_an_empty_store_before_the_mailbox_is_registered(store: Store) -> None:  # noqa: F811
    m = mailbox()
    written = {"INBOX": Checkpoint(7, 40), "Support": Checkpoint(8, 3)}
    changed = await store.reassert_checkpoints({m.id: written})

    assert changed == 2
    assert await store.get_mailbox(m.id) is None  # nothing registered: only the checkpoints
    assert await store.get_checkpoints(m.id) == written
    assert await store.get_history_floor(m.id, "INBOX") == Checkpoint(7, 40)
    # The primary's restore comes after it with an older checkpoint: the worker's stays.
    known = {"INBOX": Checkpoint(7, 30), "Support": Checkpoint(8, 3)}
    assert await store.restore_mailboxes([m], {m.id: known}) == [m.id]
    assert await store.get_mailbox(m.id) == m
    assert await store.get_checkpoints(m.id) == written
    assert await store.advance_checkpoint(m.id, "INBOX", Checkpoint(7, 41)) is True


async def test_reassert_after_the_restore_only_moves_forward(store: Store) -> None:  # noqa: F811
    m = mailbox(folders=("INBOX", "Support", "Sales"))
    await store.restore_mailboxes([m], {m.id: {"INBOX": Checkpoint(7, 30), "Support": Checkpoint(8, 50)}})
    await store.advance_checkpoint(m.id, "Sales", Checkpoint(5, 9))

    changed = await store.reassert_checkpoints(
        {
            m.id: {
                "INBOX": Checkpoint(7, 40),  # the worker delivered further: advanced
                "Support": Checkpoint(8, 45),  # the restore knows more: never moved back
                "Sales": Checkpoint(4, 99),  # another UIDVALIDITY (the folder was rebuilt): left alone
            }
        }
    )

    assert changed == 1
    assert await store.get_checkpoints(m.id) == {
        "INBOX": Checkpoint(7, 40),
        "Support": Checkpoint(8, 50),
        "Sales": Checkpoint(5, 9),
    }
    # The floors stay where the restore put them (history covers UIDs at or below them).
    assert await store.get_history_floor(m.id, "INBOX") == Checkpoint(7, 30)
    assert await store.reassert_checkpoints({m.id: {"INBOX": Checkpoint(7, 40)}}) == 0
    assert await store.reassert_checkpoints({}) == 0


async def test_leftover_checkpoints_go_with_close_and_stay_for_a_registration(store: Store) -> None:  # noqa: F811
    """Workers put back the checkpoints of mailboxes nobody restores: closed before the loss (a
    worker does not hear of closes), or whose primary died with the store. ``close`` deletes
    them; a registration resumes from them, as after Creatio's failover job re-creates a mailbox
    the store lost (possibly before its primary restored it): its mail since is delivered, once."""
    closed, recreated = mailbox(), mailbox("22222222-2222-2222-2222-222222222222")
    await store.reassert_checkpoints({m.id: {"INBOX": Checkpoint(7, 40)} for m in (closed, recreated)})

    assert await store.remove_mailbox(closed.id) is False
    assert await store.get_checkpoints(closed.id) == {}
    assert await store.get_history_floor(closed.id, "INBOX") is None

    control = StoreListenerControl(store, node_id="n1", role="all")
    await control.recreate([recreated])
    assert await store.get_mailbox(recreated.id) is not None
    assert await store.get_checkpoints(recreated.id) == {"INBOX": Checkpoint(7, 40)}
    assert await store.seed_checkpoint(recreated.id, "INBOX", Checkpoint(7, 90)) is False
    # The primary's restore after it registers nothing and moves nothing back.
    assert await store.restore_mailboxes([recreated], {recreated.id: {"INBOX": Checkpoint(7, 30)}}) == []
    assert await store.get_checkpoints(recreated.id) == {"INBOX": Checkpoint(7, 40)}


async def test_reassert_thousands_of_folders_at_once(store: Store) -> None:  # noqa: F811
    """What a worker remembers can be 100,000 folders (Redis: 2,000 a script call, so this
    crosses a chunk)."""
    checkpoints = {f"m-{n:04d}": {"INBOX": Checkpoint(1, n + 1)} for n in range(2500)}
    assert await store.reassert_checkpoints(checkpoints) == 2500
    assert await store.get_checkpoints_of(list(checkpoints)) == checkpoints
    assert await store.reassert_checkpoints(checkpoints) == 0


async def test_sqlite_keeps_reasserted_checkpoints_across_a_restart(tmp_path: Path) -> None:
    m = mailbox()
    async with sqlite_store(tmp_path / "a") as durable:
        await durable.reassert_checkpoints({m.id: {"INBOX": Checkpoint(7, 10)}})
    async with sqlite_store(tmp_path / "a") as durable:
        assert await durable.get_checkpoints(m.id) == {"INBOX": Checkpoint(7, 10)}
        assert await durable.get_history_floor(m.id, "INBOX") == Checkpoint(7, 10)
