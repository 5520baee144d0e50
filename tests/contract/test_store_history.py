"""Store contract, part three: history floors and the records of history loads."""

from __future__ import annotations

from emlisten.abc import Store
from emlisten.models import Checkpoint
from tests.contract.test_store import mailbox, store  # noqa: F401 - the parametrized fixture


async def test_seed_records_the_floor(store: Store) -> None:  # noqa: F811
    m = mailbox()
    await store.put_mailbox(m)
    assert await store.get_history_floor(m.id, "INBOX") is None
    assert await store.seed_checkpoint(m.id, "INBOX", Checkpoint(7, 10)) is True
    assert await store.get_history_floor(m.id, "INBOX") == Checkpoint(7, 10)
    # Other folders have their own floor.
    assert await store.get_history_floor(m.id, "Support") is None


async def test_floor_stays_while_live_delivery_advances(store: Store) -> None:  # noqa: F811
    m = mailbox()
    await store.put_mailbox(m)
    await store.seed_checkpoint(m.id, "INBOX", Checkpoint(7, 10))
    assert await store.seed_checkpoint(m.id, "INBOX", Checkpoint(7, 99)) is False
    assert await store.advance_checkpoint(m.id, "INBOX", Checkpoint(7, 15)) is True
    assert await store.get_checkpoint(m.id, "INBOX") == Checkpoint(7, 15)
    assert await store.get_history_floor(m.id, "INBOX") == Checkpoint(7, 10)


async def test_new_uidvalidity_moves_the_floor(store: Store) -> None:  # noqa: F811
    m = mailbox()
    await store.put_mailbox(m)
    await store.seed_checkpoint(m.id, "INBOX", Checkpoint(7, 10))
    await store.advance_checkpoint(m.id, "INBOX", Checkpoint(7, 12))
    # The folder was rebuilt: live delivery restarts at its end, history covers what is below.
    assert await store.advance_checkpoint(m.id, "INBOX", Checkpoint(8, 40)) is True
    assert await store.get_history_floor(m.id, "INBOX") == Checkpoint(8, 40)
    await store.advance_checkpoint(m.id, "INBOX", Checkpoint(8, 41))
    assert await store.get_history_floor(m.id, "INBOX") == Checkpoint(8, 40)


async def test_no_floor_for_unknown_mailbox(store: Store) -> None:  # noqa: F811
    assert await store.seed_checkpoint("nobody", "INBOX", Checkpoint(7, 10)) is False
    assert await store.get_history_floor("nobody", "INBOX") is None


async def test_history_records_per_folder_and_uidvalidity(store: Store) -> None:  # noqa: F811
    m = mailbox()
    await store.put_mailbox(m)
    assert await store.history_delivered(m.id, "INBOX", 7) == set()
    await store.mark_history_delivered(m.id, "INBOX", 7, [1, 2, 3])
    await store.mark_history_delivered(m.id, "INBOX", 7, [3, 4])
    await store.mark_history_delivered(m.id, "INBOX", 7, [])
    await store.mark_history_delivered(m.id, "Support", 7, [9])
    await store.mark_history_delivered(m.id, "INBOX", 8, [5])
    assert await store.history_delivered(m.id, "INBOX", 7) == {1, 2, 3, 4}
    assert await store.history_delivered(m.id, "Support", 7) == {9}
    assert await store.history_delivered(m.id, "INBOX", 8) == {5}
    # The result is a copy: changing it changes nothing stored.
    (await store.history_delivered(m.id, "INBOX", 7)).add(100)
    assert 100 not in await store.history_delivered(m.id, "INBOX", 7)


async def test_many_uids_in_one_call(store: Store) -> None:  # noqa: F811
    m = mailbox()
    await store.put_mailbox(m)
    uids = range(1, 5001)
    await store.mark_history_delivered(m.id, "INBOX", 7, uids)
    assert await store.history_delivered(m.id, "INBOX", 7) == set(uids)


async def test_history_records_need_a_registered_mailbox(store: Store) -> None:  # noqa: F811
    await store.mark_history_delivered("nobody", "INBOX", 7, [1])
    assert await store.history_delivered("nobody", "INBOX", 7) == set()


async def test_remove_drops_floors_and_history(store: Store) -> None:  # noqa: F811
    m = mailbox()
    await store.put_mailbox(m)
    await store.seed_checkpoint(m.id, "INBOX", Checkpoint(7, 10))
    await store.seed_checkpoint(m.id, "Support", Checkpoint(3, 2))
    await store.mark_history_delivered(m.id, "INBOX", 7, [1, 2])
    await store.mark_history_delivered(m.id, "Support", 3, [1])
    await store.remove_mailbox(m.id)
    assert await store.get_history_floor(m.id, "INBOX") is None
    assert await store.history_delivered(m.id, "INBOX", 7) == set()
    assert await store.history_delivered(m.id, "Support", 3) == set()
    # A late record after /close does not resurrect anything.
    await store.mark_history_delivered(m.id, "INBOX", 7, [5])
    assert await store.history_delivered(m.id, "INBOX", 7) == set()
    # Registered again: a new subscription with a new floor and no records.
    await store.put_mailbox(m)
    assert await store.get_history_floor(m.id, "INBOX") is None
    await store.seed_checkpoint(m.id, "INBOX", Checkpoint(7, 30))
    assert await store.get_history_floor(m.id, "INBOX") == Checkpoint(7, 30)
    assert await store.history_delivered(m.id, "INBOX", 7) == set()


async def test_folder_names_with_separators(store: Store) -> None:  # noqa: F811
    m = mailbox(folders=("INBOX", "a:b/c", "Архив"))
    await store.put_mailbox(m)
    await store.seed_checkpoint(m.id, "a:b/c", Checkpoint(1, 4))
    await store.mark_history_delivered(m.id, "a:b/c", 1, [2])
    await store.mark_history_delivered(m.id, "Архив", 1, [3])
    assert await store.get_history_floor(m.id, "a:b/c") == Checkpoint(1, 4)
    assert await store.history_delivered(m.id, "a:b/c", 1) == {2}
    assert await store.history_delivered(m.id, "Архив", 1) == {3}
    await store.remove_mailbox(m.id)
    assert await store.history_delivered(m.id, "Архив", 1) == set()
