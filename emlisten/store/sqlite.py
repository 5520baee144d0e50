"""SQLite Store: the durable embedded store of a single process (``EMLISTEN_DATA_DIR``).

Memory is the working copy, SQLite the durable one: ``SqliteStore`` is the in-memory store
(:class:`emlisten.store.memory.MemoryStore`, whose answers every read keeps) plus a writer that
copies each change to ``<data dir>/emlisten.db``. At start the whole state is read back into
memory, so a restarted process resumes every mailbox from its checkpoint without waiting for
Creatio.

Writes (group commit). A change updates memory at once (atomically: no await in between), marks
the rows it touched dirty and waits until a writer task has committed them. The writer takes
every row dirty at that moment, reads its current value from memory and writes it in one
transaction, on a thread of its own (``trio.to_thread``, one connection, one thread at a
time), so the event loop never waits on the disk and a burst of thousands of changes costs a
few transactions, not thousands. A caller returning from ``advance_checkpoint`` therefore knows
the checkpoint survives the process being killed.

Durability: WAL journal, ``synchronous=NORMAL``. A commit survives the process dying (SIGKILL,
OOM) because it is in the WAL file; only an operating-system crash or power cut can roll back
the last commits. What that can cost: a checkpoint moves back (the mail after it is delivered
again: a duplicate, never a loss) or a registration made just before is forgotten (Creatio sees
the mailbox "closed" in subscriptionsstate and re-creates it). ``FULL`` would fsync on every
commit to close that window, at several times the cost per write; not worth it for that.

When the disk fails (full, remounted read-only): memory goes on as the working copy, so mail
keeps flowing; the writer retries with backoff, logs the failure, and ``ping`` (``/readyz``)
reports it; callers stop waiting for commits until one succeeds again, then every change made
meanwhile is written. If the process stops before that, the changes since the last commit are
lost as above (duplicates, not losses). At start, a data directory that cannot be opened for
writing is a clear ``StoreError`` and the process exits without touching any mailbox.

Secrets: mailbox documents (credentials, callback URLs) and webhook events (mail content, in
outboxes and dead letters, kept like the rest: a mail whose checkpoint moved is in the outbox) are
encrypted with ``EMLISTEN_SECRET_KEY`` exactly as in Redis (:mod:`emlisten.store._crypto`); ids,
folder names, statuses and checkpoints are in clear. Not kept: node heartbeats and leases (one
process owns the directory: a lock file refuses a second one; leases live in memory and start
free).
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from emlisten.errors import StoreError
from emlisten.models import Checkpoint, MailboxConfig, MailboxStatus, WebhookEvent
from emlisten.store._codec import (
    CodecError,
    decode_mailbox,
    decode_status,
    decode_webhook_event,
    encode_mailbox,
    encode_status,
    encode_webhook_event,
)
from emlisten.store._crypto import CredentialCipher
from emlisten.store.memory import MemoryStore

log = logging.getLogger(__name__)

T = TypeVar("T")

DB_FILE = "emlisten.db"
LOCK_FILE = "emlisten.lock"
SCHEMA_VERSION = 1
#: Encrypted under the key at creation; decrypting it at open tells a wrong key at once.
_KEY_CHECK = b"emlisten data directory"
#: Retry delays after a failed commit (seconds), and how often a lasting failure is logged again.
_RETRY_BASE = 0.5
#: Short: until the write succeeds, a SIGKILL repeats the mail delivered meanwhile (the soak saw
#: 65 repeats when a kill came 6.7 s after the disk was freed, with a 30 s cap); a failing
#: commit costs little.
_RETRY_CAP = 2.0
_LOG_EVERY = 60.0
#: Bound on the final write at close.
_CLOSE_TIMEOUT = 15.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS mailboxes (id TEXT PRIMARY KEY, doc BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS statuses (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    mailbox TEXT NOT NULL, folder TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL, last_uid INTEGER NOT NULL, cursor TEXT NOT NULL,
    PRIMARY KEY (mailbox, folder)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS floors (
    mailbox TEXT NOT NULL, folder TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL, last_uid INTEGER NOT NULL, cursor TEXT NOT NULL,
    PRIMARY KEY (mailbox, folder)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    endpoint TEXT NOT NULL, id TEXT NOT NULL, seq INTEGER NOT NULL, doc BLOB NOT NULL,
    PRIMARY KEY (endpoint, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (id TEXT PRIMARY KEY, doc BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS history (
    mailbox TEXT NOT NULL, folder TEXT NOT NULL, uidvalidity INTEGER NOT NULL, uid INTEGER NOT NULL,
    PRIMARY KEY (mailbox, folder, uidvalidity, uid)
) WITHOUT ROWID;
"""

Statement = tuple[str, Sequence[Any]]


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class _Dirty:
    """Rows changed in memory since the last commit (their values are read at commit time)."""

    #: Mailboxes whose checkpoints, floors and history were removed (written before the rest).
    purged: set[str] = field(default_factory=set)
    mailboxes: set[str] = field(default_factory=set)
    statuses: set[str] = field(default_factory=set)
    checkpoints: set[tuple[str, str]] = field(default_factory=set)
    floors: set[tuple[str, str]] = field(default_factory=set)
    history: dict[tuple[str, str, int], set[int]] = field(default_factory=dict)
    #: Webhook events: (endpoint, event id) of outboxes, event ids of dead letters.
    outbox: set[tuple[str, str]] = field(default_factory=set)
    dead: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(
            self.purged
            or self.mailboxes
            or self.statuses
            or self.checkpoints
            or self.floors
            or self.history
            or self.outbox
            or self.dead
        )

    def merge(self, other: _Dirty) -> None:
        """Take back what a failed commit did not write (values are re-read from memory)."""
        self.purged |= other.purged
        self.mailboxes |= other.mailboxes
        self.statuses |= other.statuses
        self.checkpoints |= other.checkpoints
        self.floors |= other.floors
        for key, uids in other.history.items():
            self.history.setdefault(key, set()).update(uids)
        self.outbox |= other.outbox
        self.dead |= other.dead


class _Database:
    """The connection; every method runs on the store's worker thread, one call at a time."""

    def __init__(self, path: Path) -> None:
        # Owner-only, whatever the umask: SQLite gives its -wal and -shm files the same mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        self.connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=NORMAL")
        self.connection.execute("PRAGMA foreign_keys=OFF")
        self.connection.executescript(_SCHEMA)

    def apply(self, statements: Sequence[Statement]) -> None:
        connection = self.connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                connection.execute(sql, params)
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:  # BEGIN itself may have failed (a read-only file)
                connection.execute("ROLLBACK")
            raise

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.connection.execute(sql, params).fetchall()

    def close(self) -> None:
        self.connection.close()


class SqliteStore(MemoryStore):
    name = "sqlite"

    def __init__(self, database: _Database, *, cipher: CredentialCipher, directory: Path) -> None:
        """Use :meth:`open`."""
        super().__init__()
        self._db = database
        self._cipher = cipher
        self.directory = directory
        self._limiter = trio.CapacityLimiter(1)
        self._dirty = _Dirty()
        #: Position of each waiting webhook event in its outbox (memory keeps insertion order).
        self._outbox_seq: dict[tuple[str, str], int] = {}
        self._next_seq = 1
        self._wake = trio.Event()
        #: Set when the commit of the rows dirty now has been tried.
        self._committed = trio.Event()
        #: Why the last commit failed (None: the disk holds everything committed so far).
        self.failure: str | None = None
        self.commits = 0

    def __repr__(self) -> str:
        return f"SqliteStore(directory={str(self.directory)!r})"

    @classmethod
    @asynccontextmanager
    async def open(cls, directory: str | os.PathLike[str], *, secret_key: str) -> AsyncIterator[SqliteStore]:
        """Open (or create) the store in ``directory`` and load it; close it (writing every
        change) on exit. Raises ``StoreError`` when the directory cannot be used (another
        emlisten holds it, not writable, not a database, wrong ``secret_key``)."""

        cipher = CredentialCipher(secret_key)
        path = Path(directory)
        lock_fd = await trio.to_thread.run_sync(_lock_directory, path)
        try:
            try:
                database = await trio.to_thread.run_sync(_Database, path / DB_FILE)
            except (sqlite3.Error, OSError) as exc:
                raise StoreError(f"data directory {path}: cannot open {DB_FILE}: {_describe(exc)}") from None
            store = cls(database, cipher=cipher, directory=path)
            try:
                started = time.monotonic()
                await store._load()
                log.info(
                    "data directory %s: %d mailbox(es) loaded in %.2fs",
                    path,
                    len(store._mailboxes),
                    time.monotonic() - started,
                )
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(store._write_loop)
                        try:
                            yield store
                        finally:
                            nursery.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    # The writer never raises: what failed is the caller's body. Hand its error
                    # back as it was, not wrapped in this nursery's group.
                    if len(group.exceptions) == 1:
                        raise group.exceptions[0] from None
                    raise
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                    await store._final_commit()
                await trio.to_thread.run_sync(database.close)
        finally:
            os.close(lock_fd)

    # -- loading ---------------------------------------------------------------------------------

    async def _thread(self, function: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(function, *args, limiter=self._limiter)

    async def _load(self) -> None:
        try:
            await self._check_key()
            await self._load_incarnation()
            rows = {
                table: await self._thread(self._db.query, f"SELECT * FROM {table}")  # noqa: S608 - fixed names
                for table in ("mailboxes", "statuses", "checkpoints", "floors", "history")
            }
            rows["outbox"] = await self._thread(
                self._db.query, "SELECT endpoint, id, seq, doc FROM outbox ORDER BY seq"
            )
            rows["dead_letters"] = await self._thread(self._db.query, "SELECT id, doc FROM dead_letters")
        except sqlite3.Error as exc:
            raise StoreError(
                f"data directory {self.directory}: cannot use {DB_FILE}: {_describe(exc)}"
            ) from None
        try:
            for mailbox_id, blob in rows["mailboxes"]:
                plaintext = self._cipher.decrypt(bytes(blob), associated_data=mailbox_id.encode())
                self._mailboxes[mailbox_id] = decode_mailbox(plaintext)
            for mailbox_id, document in rows["statuses"]:
                self._statuses[mailbox_id] = decode_status(document)
            # Columns, not JSON: at 10,000 mailboxes decoding them was a third of the load time.
            for mailbox_id, folder, uidvalidity, last_uid, cursor in rows["checkpoints"]:
                self._checkpoints[(mailbox_id, folder)] = Checkpoint(uidvalidity, last_uid, cursor)
            for mailbox_id, folder, uidvalidity, last_uid, cursor in rows["floors"]:
                self._floors[(mailbox_id, folder)] = Checkpoint(uidvalidity, last_uid, cursor)
            for endpoint, event_id, seq, blob in rows["outbox"]:
                self._outboxes.setdefault(endpoint, {})[event_id] = self._open_event(event_id, blob)
                self._outbox_seq[(endpoint, event_id)] = seq
                self._next_seq = max(self._next_seq, seq + 1)
            for event_id, blob in rows["dead_letters"]:
                self._dead[event_id] = self._open_event(event_id, blob)
        except CodecError as exc:
            raise StoreError(f"data directory {self.directory}: unreadable document: {exc}") from None
        for mailbox_id, folder, uidvalidity, uid in rows["history"]:
            self._history.setdefault((mailbox_id, folder, uidvalidity), set()).add(uid)

    def _seal_event(self, event: WebhookEvent) -> bytes:
        return self._cipher.encrypt(encode_webhook_event(event), associated_data=event.id.encode())

    def _open_event(self, event_id: str, blob: bytes) -> WebhookEvent:
        return decode_webhook_event(self._cipher.decrypt(bytes(blob), associated_data=event_id.encode()))

    async def _load_incarnation(self) -> None:
        """The data set's id (Store.incarnation) is kept with the data: a reopened directory
        keeps it, a new one gets its own."""
        found = await self._thread(self._db.query, "SELECT value FROM meta WHERE key = 'incarnation'")
        if found:
            self._incarnation = str(found[0][0])
            return
        statement: Statement = (
            "INSERT INTO meta (key, value) VALUES ('incarnation', ?)",
            (self._incarnation,),
        )
        await self._thread(self._db.apply, [statement])

    async def _check_key(self) -> None:
        schema = await self._thread(self._db.query, "SELECT value FROM meta WHERE key = 'schema'")
        if schema and str(schema[0][0]) != str(SCHEMA_VERSION):
            raise StoreError(
                f"data directory {self.directory}: written in format {schema[0][0]}, this emlisten "
                f"reads format {SCHEMA_VERSION}"
            )
        found = await self._thread(self._db.query, "SELECT value FROM meta WHERE key = 'key-check'")
        if found:
            # A wrong key raises StoreError (WRONG_KEY_MESSAGE) here, before anything is read.
            self._cipher.decrypt(bytes(found[0][0]), associated_data=_KEY_CHECK)
            return
        blob = self._cipher.encrypt(_KEY_CHECK, associated_data=_KEY_CHECK)
        statements: list[Statement] = [
            ("INSERT INTO meta (key, value) VALUES ('key-check', ?)", (blob,)),
            ("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)),
        ]
        await self._thread(self._db.apply, statements)

    # -- writing ---------------------------------------------------------------------------------

    async def _persisted(self) -> None:
        """Wait until the rows just made dirty are committed (not while the disk is failing:
        memory carries on alone until a commit succeeds again)."""
        committed = self._committed
        self._wake.set()
        if self.failure is None:
            await committed.wait()

    def _statements(self, dirty: _Dirty) -> tuple[list[Statement], list[MailboxConfig]]:
        """The SQL writing the current memory values of the dirty rows (purges first), and the
        mailboxes to write, which :meth:`_write` encodes and encrypts on the worker thread (a
        bulk create of 10,000 held the event loop for half a second here)."""
        statements: list[Statement] = []
        to_seal: list[MailboxConfig] = []
        for mailbox_id in dirty.purged:
            for table in ("checkpoints", "floors", "history"):
                statements.append((f"DELETE FROM {table} WHERE mailbox = ?", (mailbox_id,)))  # noqa: S608
        for mailbox_id in dirty.mailboxes:
            mailbox = self._mailboxes.get(mailbox_id)
            if mailbox is None:
                statements.append(("DELETE FROM mailboxes WHERE id = ?", (mailbox_id,)))
            else:
                to_seal.append(mailbox)  # immutable: safe to read from the worker thread
        for mailbox_id in dirty.statuses:
            status = self._statuses.get(mailbox_id)
            if status is not None:
                statements.append(
                    (
                        "INSERT OR REPLACE INTO statuses (id, doc) VALUES (?, ?)",
                        (mailbox_id, encode_status(status).decode()),
                    )
                )
        for table, keys, values in (
            ("checkpoints", dirty.checkpoints, self._checkpoints),
            ("floors", dirty.floors, self._floors),
        ):
            for key in keys:
                checkpoint = values.get(key)
                if checkpoint is None:
                    statements.append((f"DELETE FROM {table} WHERE mailbox = ? AND folder = ?", key))  # noqa: S608
                else:
                    statements.append(
                        (
                            f"INSERT OR REPLACE INTO {table} (mailbox, folder, uidvalidity, last_uid, cursor)"  # noqa: S608
                            " VALUES (?, ?, ?, ?, ?)",
                            (*key, checkpoint.uidvalidity, checkpoint.last_uid, checkpoint.cursor),
                        )
                    )
        for endpoint, event_id in dirty.outbox:
            event = self._outboxes.get(endpoint, {}).get(event_id)
            if event is None:
                statements.append(("DELETE FROM outbox WHERE endpoint = ? AND id = ?", (endpoint, event_id)))
            else:
                statements.append(
                    (
                        "INSERT OR REPLACE INTO outbox (endpoint, id, seq, doc) VALUES (?, ?, ?, ?)",
                        (endpoint, event_id, self._outbox_seq[(endpoint, event_id)], self._seal_event(event)),
                    )
                )
        for event_id in dirty.dead:
            dead = self._dead.get(event_id)
            if dead is None:
                statements.append(("DELETE FROM dead_letters WHERE id = ?", (event_id,)))
            else:
                statements.append(
                    (
                        "INSERT OR REPLACE INTO dead_letters (id, doc) VALUES (?, ?)",
                        (event_id, self._seal_event(dead)),
                    )
                )
        for (mailbox_id, folder, uidvalidity), uids in dirty.history.items():
            for uid in uids:
                statements.append(
                    (
                        "INSERT OR IGNORE INTO history (mailbox, folder, uidvalidity, uid)"
                        " VALUES (?, ?, ?, ?)",
                        (mailbox_id, folder, uidvalidity, uid),
                    )
                )
        return statements, to_seal

    def _write(self, statements: list[Statement], to_seal: list[MailboxConfig]) -> None:
        """On the worker thread: encrypt the mailboxes, then one transaction with everything."""
        for mailbox in to_seal:
            blob = self._cipher.encrypt(encode_mailbox(mailbox), associated_data=mailbox.id.encode())
            statements.append(
                ("INSERT OR REPLACE INTO mailboxes (id, doc) VALUES (?, ?)", (mailbox.id, blob))
            )
        self._db.apply(statements)

    async def _commit_dirty(self) -> None:
        """One transaction with every dirty row; on failure they stay dirty. Raises what failed."""
        dirty, self._dirty = self._dirty, _Dirty()
        committed, self._committed = self._committed, trio.Event()
        try:
            if dirty:
                await self._thread(self._write, *self._statements(dirty))
                self.commits += 1
        except BaseException:
            self._dirty.merge(dirty)
            raise
        finally:
            committed.set()

    async def _write_loop(self) -> None:
        delay = _RETRY_BASE
        logged_at = -float("inf")
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            try:
                await self._commit_dirty()
            except (sqlite3.Error, OSError) as exc:
                self.failure = f"data directory {self.directory}: cannot write: {_describe(exc)}"
                now = trio.current_time()
                if now - logged_at >= _LOG_EVERY:
                    logged_at = now
                    log.error("%s; state is kept in memory and written when the disk recovers", self.failure)
                await trio.sleep(delay)
                delay = min(_RETRY_CAP, delay * 2)
                self._wake.set()
                continue
            if self.failure is not None:
                log.warning("data directory %s: writable again, state written", self.directory)
                self.failure = None
                logged_at = -float("inf")
            delay = _RETRY_BASE

    async def _final_commit(self) -> None:
        try:
            await self._commit_dirty()
        except (sqlite3.Error, OSError) as exc:
            log.error(
                "data directory %s: could not write the last changes at shutdown: %s",
                self.directory,
                _describe(exc),
            )

    async def flush(self) -> None:
        """Wait until every change made so far is committed (tests, benchmarks)."""
        await self._persisted()

    async def ping(self) -> None:
        if self.failure is not None:
            raise StoreError(self.failure)

    # -- changes: memory first, then the rows they touched ---------------------------------------

    async def put_mailbox(self, mailbox: MailboxConfig) -> None:
        await super().put_mailbox(mailbox)
        self._dirty.mailboxes.add(mailbox.id)
        await self._persisted()

    async def put_mailboxes(self, mailboxes: Sequence[MailboxConfig]) -> None:
        for mailbox in mailboxes:
            await super().put_mailbox(mailbox)
            self._dirty.mailboxes.add(mailbox.id)
        await self._persisted()

    async def remove_mailbox(self, mailbox_id: str) -> bool:
        existed = await super().remove_mailbox(mailbox_id)
        dirty = self._dirty
        dirty.mailboxes.add(mailbox_id)
        dirty.statuses.add(mailbox_id)
        dirty.purged.add(mailbox_id)
        # UIDs not written yet must not come back after the purge.
        for key in [k for k in dirty.history if k[0] == mailbox_id]:
            del dirty.history[key]
        await self._persisted()
        return existed

    async def set_status(self, mailbox_id: str, status: MailboxStatus) -> None:
        await super().set_status(mailbox_id, status)
        self._dirty.statuses.add(mailbox_id)
        await self._persisted()

    async def set_statuses(self, statuses: Mapping[str, MailboxStatus]) -> None:
        for mailbox_id, status in statuses.items():
            await super().set_status(mailbox_id, status)
            self._dirty.statuses.add(mailbox_id)
        await self._persisted()

    async def add_delivered(self, mailbox_id: str, count: int) -> None:
        await super().add_delivered(mailbox_id, count)
        if mailbox_id in self._statuses:
            self._dirty.statuses.add(mailbox_id)
            await self._persisted()

    async def seed_checkpoint(self, mailbox_id: str, folder: str, checkpoint: Checkpoint) -> bool:
        if not await super().seed_checkpoint(mailbox_id, folder, checkpoint):
            return False
        self._dirty.checkpoints.add((mailbox_id, folder))
        self._dirty.floors.add((mailbox_id, folder))
        await self._persisted()
        return True

    async def advance_checkpoint(
        self, mailbox_id: str, folder: str, checkpoint: Checkpoint, *, delivered: int = 0
    ) -> bool:
        # Both in memory first, then one wait: one transaction carries the checkpoint and the count.
        counted = bool(delivered) and self._count_delivered(mailbox_id, delivered)
        if counted:
            self._dirty.statuses.add(mailbox_id)
        moved = self._advance(mailbox_id, folder, checkpoint)
        if moved:
            self._dirty.checkpoints.add((mailbox_id, folder))
            self._dirty.floors.add((mailbox_id, folder))
        if moved or counted:
            await self._persisted()
        return moved

    async def restore_mailboxes(
        self, mailboxes: Sequence[MailboxConfig], checkpoints: Mapping[str, Mapping[str, Checkpoint]]
    ) -> list[str]:
        restored = []
        for mailbox in mailboxes:
            registered, set_keys = self._restore(mailbox, checkpoints.get(mailbox.id, {}))
            if registered:
                restored.append(mailbox.id)
                self._dirty.mailboxes.add(mailbox.id)
            self._dirty.checkpoints.update(set_keys)
            self._dirty.floors.update(set_keys)
        await self._persisted()  # one transaction carries every mailbox with its checkpoints
        return restored

    async def reassert_checkpoints(self, checkpoints: Mapping[str, Mapping[str, Checkpoint]]) -> int:
        changed = self._reassert(checkpoints)
        if changed:
            self._dirty.checkpoints.update(changed)
            self._dirty.floors.update(changed)
            await self._persisted()
        return len(changed)

    async def mark_history_delivered(
        self, mailbox_id: str, folder: str, uidvalidity: int, uids: Iterable[int]
    ) -> None:
        if mailbox_id not in self._mailboxes:
            return
        members = set(uids)
        if not members:
            return
        await super().mark_history_delivered(mailbox_id, folder, uidvalidity, members)
        self._dirty.history.setdefault((mailbox_id, folder, uidvalidity), set()).update(members)
        await self._persisted()

    # -- webhook outboxes and dead letters -------------------------------------------------------

    def _queued(self, endpoint: str, event_id: str) -> None:
        """The event now waits in its outbox: give it a place after everything before it."""
        key = (endpoint, event_id)
        if key not in self._outbox_seq and event_id in self._outboxes.get(endpoint, {}):
            self._outbox_seq[key] = self._next_seq
            self._next_seq += 1
        self._dirty.outbox.add(key)

    def _left_outbox(self, endpoint: str, event_id: str) -> None:
        self._outbox_seq.pop((endpoint, event_id), None)
        self._dirty.outbox.add((endpoint, event_id))

    async def outbox_add(self, events: Sequence[WebhookEvent]) -> int:
        added = await super().outbox_add(events)
        if added:
            for event in events:
                self._queued(event.endpoint, event.id)
            await self._persisted()
        return added

    async def outbox_retry(self, event: WebhookEvent) -> bool:
        if not await super().outbox_retry(event):
            return False
        self._dirty.outbox.add((event.endpoint, event.id))
        await self._persisted()
        return True

    async def outbox_done(self, endpoint: str, event_id: str) -> bool:
        if not await super().outbox_done(endpoint, event_id):
            return False
        self._left_outbox(endpoint, event_id)
        await self._persisted()
        return True

    async def outbox_dead_letter(self, event: WebhookEvent) -> bool:
        # Both moves in memory before anything is written: one transaction carries them.
        if not await MemoryStore.outbox_done(self, event.endpoint, event.id):
            return False
        self._dead[event.id] = dataclasses.replace(event)
        self._left_outbox(event.endpoint, event.id)
        self._dirty.dead.add(event.id)
        await self._persisted()
        return True

    async def drop_dead_letter(self, event_id: str) -> bool:
        if not await super().drop_dead_letter(event_id):
            return False
        self._dirty.dead.add(event_id)
        await self._persisted()
        return True

    async def replay_dead_letter(self, event_id: str) -> WebhookEvent | None:
        queued = await super().replay_dead_letter(event_id)
        if queued is None:
            return None
        self._dirty.dead.add(event_id)
        self._queued(queued.endpoint, event_id)
        await self._persisted()
        return queued


def _lock_directory(path: Path) -> int:
    """Create the directory if needed and lock it for this process (one emlisten per directory)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreError(f"data directory {path}: not usable: {_describe(exc)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreError(f"data directory {path} is in use by another emlisten process") from None
    return fd
