"""The embedded store's per-mailbox index of checkpoints and history floors (pure logic): reading
or dropping one mailbox's folders must see exactly what the flat map holds, without walking the
other mailboxes' entries."""

from __future__ import annotations

from emlisten.models import Checkpoint
from emlisten.store.memory import MemoryStore, _FolderMap


def test_the_index_follows_every_write() -> None:
    folders = _FolderMap()
    folders[("a", "INBOX")] = Checkpoint(1, 5)
    folders[("a", "Sent")] = Checkpoint(1, 2)
    folders[("b", "INBOX")] = Checkpoint(7, 1)
    folders[("a", "INBOX")] = Checkpoint(1, 9)  # overwrite keeps one entry
    assert folders.setdefault(("b", "INBOX"), Checkpoint(9, 9)) == Checkpoint(7, 1)
    assert folders.setdefault(("b", "Junk"), Checkpoint(3, 3)) == Checkpoint(3, 3)
    assert folders.of("a") == {"INBOX": Checkpoint(1, 9), "Sent": Checkpoint(1, 2)}
    assert folders.of("b") == {"INBOX": Checkpoint(7, 1), "Junk": Checkpoint(3, 3)}
    del folders[("a", "Sent")]
    assert folders.of("a") == {"INBOX": Checkpoint(1, 9)}
    folders.drop("b")
    assert folders.of("b") == {} and ("b", "INBOX") not in folders
    folders.drop("nobody")
    assert dict(folders) == {("a", "INBOX"): Checkpoint(1, 9)}


async def test_checkpoints_of_many_mailboxes_read_through_the_index() -> None:
    store = MemoryStore()
    # Written the way the store writes them; read back for some mailboxes, one unknown.
    for n in range(50):
        store._checkpoints[(f"m{n}", "INBOX")] = Checkpoint(1, n)
    found = await store.get_checkpoints_of(["m3", "m42", "unknown"])
    assert found == {"m3": {"INBOX": Checkpoint(1, 3)}, "m42": {"INBOX": Checkpoint(1, 42)}, "unknown": {}}
    assert await store.get_checkpoints("m7") == {"INBOX": Checkpoint(1, 7)}
