"""What the Store contract cannot say about the SQLite store: it survives a restart, keeps no
secret in plain text on disk, refuses a second process and a wrong key, and keeps mail flowing
(and catches up) when the disk fails under it."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from emlisten.errors import StoreError
from emlisten.models import (
    Checkpoint,
    MailboxConfig,
    MailboxState,
    MailboxStatus,
    Security,
    ServerEndpoint,
    WebhookEvent,
)
from emlisten.store._crypto import WRONG_KEY_MESSAGE
from emlisten.store.sqlite import DB_FILE, SqliteStore
from tests.contract.backends import sqlite_store

PASSWORD = "hunter2-sqlite-password"
TOKEN = "tok-sqlite-abcdef-123456"
CALLBACK = "https://creatio.internal.example/0/ProcessFullEmail"


def mailbox(mailbox_id: str = "m-1", **changes: object) -> MailboxConfig:
    config = MailboxConfig(
        id=mailbox_id,
        user_name="someone.private@example.com",
        password=PASSWORD,
        access_token=TOKEN,
        imap=ServerEndpoint("imap.example.com", 993, Security.SSL_ON_CONNECT),
        bpm_endpoint=CALLBACK,
        folders=("INBOX", "Support"),
    )
    return config.replace(**changes)


async def test_everything_survives_a_restart(tmp_path: Path) -> None:
    kept, closed = mailbox("m-1"), mailbox("m-2")
    async with sqlite_store(tmp_path) as store:
        await store.put_mailboxes([kept, closed])
        await store.set_status(kept.id, MailboxStatus(MailboxState.LISTENING, updated_at=5.0, node="n1"))
        await store.add_delivered(kept.id, 7)
        assert await store.seed_checkpoint(kept.id, "INBOX", Checkpoint(11, 100))
        assert await store.advance_checkpoint(kept.id, "INBOX", Checkpoint(11, 140))
        await store.seed_checkpoint(kept.id, "Support", Checkpoint(12, 3, cursor="c-1"))
        await store.mark_history_delivered(kept.id, "INBOX", 11, [5, 6, 99])
        await store.seed_checkpoint(closed.id, "INBOX", Checkpoint(1, 1))
        await store.mark_history_delivered(closed.id, "INBOX", 1, [1])
        assert await store.remove_mailbox(closed.id)

    async with sqlite_store(tmp_path) as store:
        assert await store.list_mailbox_ids() == [kept.id]
        assert await store.get_mailbox(kept.id) == kept
        status = (await store.get_statuses([kept.id]))[kept.id]
        assert status is not None
        assert (status.state, status.delivered, status.node) == (MailboxState.LISTENING, 7, "n1")
        assert await store.get_checkpoints(kept.id) == {
            "INBOX": Checkpoint(11, 140),
            "Support": Checkpoint(12, 3, cursor="c-1"),
        }
        assert await store.get_history_floor(kept.id, "INBOX") == Checkpoint(11, 100)
        assert await store.history_delivered(kept.id, "INBOX", 11) == {5, 6, 99}
        # The closed mailbox left nothing but its CLOSED status behind.
        assert await store.get_checkpoints(closed.id) == {}
        assert await store.history_delivered(closed.id, "INBOX", 1) == set()
        closed_status = (await store.get_statuses([closed.id]))[closed.id]
        assert closed_status is not None and closed_status.state is MailboxState.CLOSED
        # Leases are not kept: a restarted process finds them free.
        assert await store.lease_owners([kept.id]) == {kept.id: None}


async def test_a_returned_change_is_on_disk_already(tmp_path: Path) -> None:
    """Group commit: when advance_checkpoint returns, another connection reads the new value."""
    async with sqlite_store(tmp_path) as store:
        await store.put_mailbox(mailbox())
        await store.seed_checkpoint("m-1", "INBOX", Checkpoint(1, 1))

        async def advance(uid: int) -> None:
            await store.advance_checkpoint("m-1", "INBOX", Checkpoint(1, uid))

        async with trio.open_nursery() as nursery:
            for uid in range(2, 502):
                nursery.start_soon(advance, uid)
        with contextlib.closing(sqlite3.connect(tmp_path / DB_FILE)) as reader:
            (last_uid,) = reader.execute("SELECT last_uid FROM checkpoints WHERE mailbox = 'm-1'").fetchone()
        assert last_uid == 501
        # 500 concurrent changes shared a few transactions.
        assert store.commits < 100


async def test_a_checkpoint_and_its_delivered_count_are_on_disk_together(tmp_path: Path) -> None:
    """advance_checkpoint(..., delivered=n) returns once one commit holds both."""
    async with sqlite_store(tmp_path) as store:
        await store.put_mailbox(mailbox())
        await store.set_status("m-1", MailboxStatus(MailboxState.LISTENING))
        await store.seed_checkpoint("m-1", "INBOX", Checkpoint(1, 1))
        commits = store.commits
        assert await store.advance_checkpoint("m-1", "INBOX", Checkpoint(1, 4), delivered=3) is True
        assert store.commits == commits + 1
        # Counted without a move too (a redelivery), and written.
        assert await store.advance_checkpoint("m-1", "INBOX", Checkpoint(1, 4), delivered=2) is False
        assert store.commits == commits + 2
    async with sqlite_store(tmp_path) as reopened:
        assert await reopened.get_checkpoint("m-1", "INBOX") == Checkpoint(1, 4)
        status = (await reopened.get_statuses(["m-1"]))["m-1"]
        assert status is not None and status.delivered == 5


def _file_contents(directory: Path, label: str) -> dict[str, bytes]:
    return {f"{label}/{path.name}": path.read_bytes() for path in directory.iterdir() if path.is_file()}


async def test_no_secret_in_plain_text_in_the_data_directory(tmp_path: Path) -> None:
    async with sqlite_store(tmp_path) as store:
        await store.put_mailbox(mailbox())
        await store.put_mailbox(mailbox("m-2", password=PASSWORD + "-2"))
        await store.flush()
        files = _file_contents(tmp_path, "open")  # the WAL holds the latest writes
    files.update(_file_contents(tmp_path, "closed"))
    assert f"closed/{DB_FILE}" in files
    for name, content in files.items():
        for secret in (PASSWORD, TOKEN, CALLBACK, "someone.private@example.com", "contract-test-secret-key"):
            assert secret.encode() not in content, (name, secret)
            assert secret.encode("utf-16-le") not in content, (name, secret)


async def test_only_the_owner_can_read_the_files(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    async with sqlite_store(directory) as store:
        await store.put_mailbox(mailbox())
        modes = await trio.to_thread.run_sync(_modes, directory)
    assert modes.pop(".") == 0o700  # created by the store
    assert {name: mode for name, mode in modes.items() if mode != 0o600} == {}
    assert {DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", "emlisten.lock"} <= set(modes)


def _modes(directory: Path) -> dict[str, int]:
    found = {path.name: path.stat().st_mode & 0o777 for path in directory.iterdir()}
    return {".": directory.stat().st_mode & 0o777, **found}


async def test_wrong_key_is_refused_at_open(tmp_path: Path) -> None:
    async with sqlite_store(tmp_path) as store:
        await store.put_mailbox(mailbox())
    with pytest.raises(StoreError, match=WRONG_KEY_MESSAGE.split(":")[0]):
        async with sqlite_store(tmp_path, secret_key="another-key"):
            pass
    # An empty store is checked too: the key is recorded when the directory is created.
    empty = tmp_path / "empty"
    async with sqlite_store(empty):
        pass
    with pytest.raises(StoreError, match="wrong EMLISTEN_SECRET_KEY"):
        async with sqlite_store(empty, secret_key="another-key"):
            pass


async def test_a_directory_in_another_format_is_refused(tmp_path: Path) -> None:
    async with sqlite_store(tmp_path) as store:
        await store.put_mailbox(mailbox())
    await trio.to_thread.run_sync(_set_format, tmp_path, "99")
    with pytest.raises(StoreError, match="written in format 99, this emlisten reads format 1"):
        async with sqlite_store(tmp_path):
            pass


def _set_format(directory: Path, version: str) -> None:
    with contextlib.closing(sqlite3.connect(directory / DB_FILE)) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (version,))
        db.commit()


async def test_one_process_per_data_directory(tmp_path: Path) -> None:
    async with sqlite_store(tmp_path):
        with pytest.raises(StoreError, match="in use by another emlisten process"):
            async with sqlite_store(tmp_path):
                pass
    async with sqlite_store(tmp_path):  # free again once closed
        pass


async def test_unusable_directory_is_a_clear_error(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("x")
    with pytest.raises(StoreError, match=r"data directory .*file: not usable"):
        async with sqlite_store(not_a_directory):
            pass
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / DB_FILE).write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"cannot (open|use) emlisten.db"):
        async with sqlite_store(garbage):
            pass


@contextlib.contextmanager
def _read_only(directory: Path) -> Iterator[None]:
    """The directory and its files made unwritable for real: immutable (chattr +i) as root,
    whom file modes do not stop; modes otherwise."""
    paths = [directory, *directory.iterdir()]
    as_root = os.geteuid() == 0
    for path in paths:
        if as_root:
            subprocess.run(["chattr", "+i", str(path)], check=True)
        else:
            path.chmod(0o500 if path.is_dir() else 0o400)
    try:
        yield
    finally:
        for path in paths:
            if as_root:
                subprocess.run(["chattr", "-i", str(path)], check=True)
            else:
                path.chmod(0o700 if path.is_dir() else 0o600)


async def test_a_read_only_data_directory_is_a_clear_error_at_start(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    async with sqlite_store(directory) as store:
        await store.put_mailbox(mailbox())
    with (
        _read_only(directory),
        pytest.raises(StoreError, match=r"data directory .*data: not usable: Permission"),
    ):
        async with sqlite_store(directory):
            pass
    async with sqlite_store(directory) as store:  # writable again: everything is still there
        assert await store.list_mailbox_ids() == ["m-1"]


def _fail_writes(store: SqliteStore, fail: bool) -> None:
    """Make the store's writes fail for real. As root: its WAL file made immutable, so the write
    into it fails in the kernel (SQLite: "disk I/O error"), as on a disk remounted read-only or
    full. Otherwise: the connection set read-only ("attempt to write a readonly database")."""
    if os.geteuid() == 0:
        wal = store.directory / f"{DB_FILE}-wal"
        subprocess.run(["chattr", "+i" if fail else "-i", str(wal)], check=True)
    else:
        store._db.connection.execute(f"PRAGMA query_only={int(fail)}")


async def test_a_failing_disk_keeps_mail_flowing_and_catches_up(tmp_path: Path) -> None:
    async with sqlite_store(tmp_path) as store:
        await store.put_mailbox(mailbox())
        await store.seed_checkpoint("m-1", "INBOX", Checkpoint(1, 1))
        await store.ping()
        await store.flush()
        await store._thread(_fail_writes, store, True)
        try:
            # Changes still return (memory carries on) and read back; readiness reports the disk.
            with trio.fail_after(10):
                assert await store.advance_checkpoint("m-1", "INBOX", Checkpoint(1, 5))
                await store.put_mailbox(mailbox("m-2"))
                await store.remove_mailbox("m-1")
                await store.put_mailbox(mailbox("m-1"))
                await store.seed_checkpoint("m-1", "INBOX", Checkpoint(1, 9))
            assert await store.get_checkpoint("m-1", "INBOX") == Checkpoint(1, 9)
            with pytest.raises(StoreError, match="cannot write"):
                await store.ping()
        finally:
            await store._thread(_fail_writes, store, False)
        with trio.fail_after(10):
            while store.failure is not None:
                await trio.sleep(0.05)
        await store.ping()

    async with sqlite_store(tmp_path) as store:
        assert sorted(await store.list_mailbox_ids()) == ["m-1", "m-2"]
        assert await store.get_checkpoints("m-1") == {"INBOX": Checkpoint(1, 9)}


def event(event_id: str, endpoint: str = "receiver-a") -> WebhookEvent:
    return WebhookEvent(
        id=event_id,
        endpoint=endpoint,
        url=f"https://{endpoint}.example/hook",
        mailbox_id="m-1",
        type="message.new",
        payload='{"subject": "confidential quarterly figures"}',
        created_at=1.0,
    )


async def test_webhook_outboxes_and_dead_letters_survive_a_restart_in_order(tmp_path: Path) -> None:
    async with sqlite_store(tmp_path) as store:
        assert await store.outbox_add([event("e1"), event("e2"), event("e3"), event("e4", "receiver-b")]) == 4
        retried = dataclasses.replace(event("e2"), attempts=2, next_attempt_at=50.0, last_error="HTTP 500")
        assert await store.outbox_retry(retried)
        assert await store.outbox_dead_letter(dataclasses.replace(event("e1"), attempts=9, dead_at=7.0))
        assert await store.outbox_done("receiver-b", "e4")

    async with sqlite_store(tmp_path) as store:
        assert await store.outbox_endpoints() == ["receiver-a"]
        assert await store.outbox_peek("receiver-a", 10) == [retried, event("e3")]
        total, dead = await store.list_dead_letters()
        assert (total, [d.id for d in dead], dead[0].attempts) == (1, ["e1"], 9)
        # Replayed: to the end of its outbox, and it stays there across the next restart.
        assert await store.replay_dead_letter("e1") is not None

    async with sqlite_store(tmp_path) as store:
        assert [e.id for e in await store.outbox_peek("receiver-a", 10)] == ["e2", "e3", "e1"]
        assert await store.list_dead_letters() == (0, [])
        await store.outbox_add([event("e5")])
        assert [e.id for e in await store.outbox_peek("receiver-a", 10)] == ["e2", "e3", "e1", "e5"]
        await store.flush()
        content = await trio.to_thread.run_sync(_file_contents, tmp_path, "open")
    assert all(b"confidential quarterly" not in data for data in content.values())
