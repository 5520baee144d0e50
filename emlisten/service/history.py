"""History loads: deliver the mail a mailbox held before its subscription started (Creatio's
``StartSynchronization``, ``POST /api/email/synchronize``).

Live delivery and history split each folder at its *history floor*: the checkpoint seeded when
the subscription started (``Store.get_history_floor``). Live delivery covers UIDs above it; a
history load covers UIDs at or below it whose INTERNALDATE is at or after the requested date,
and records what it delivered (``Store.mark_history_delivered``). So a repeated load, which
Creatio's failover job sends every minute for a broken mailbox, never delivers a mail twice and
never repeats what live delivery sent.

A load runs in a nursery owned by :class:`HistoryLoads` (started from the node's root nursery, so
it is cancelled on shutdown); the API only submits work. At most one load per mailbox runs in
the whole cluster: it holds the store's named lease ``history/<mailbox id>`` while it runs.
Progress stays in the process that runs the load (``HistoryLoads.progress``).

Exchange (EWS and Graph) has no UIDs: items are listed by received date and split from live
delivery by the folder's history floor (see :mod:`emlisten.mail.ews.history` and
:mod:`emlisten.mail.graph.history`); what a load delivered is recorded as 63-bit numbers derived
from the item ids (:func:`item_number`), and each mail carries the ``Email.Id`` live delivery
gives the same item (from the item id).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Literal, Protocol

import trio

from emlisten.abc import MailReader, MailSource, Sink, Store
from emlisten.config import Settings
from emlisten.errors import (
    DeliveryError,
    FolderNotFoundError,
    MailAuthError,
    MailSourceError,
    StoreError,
)
from emlisten.mail.ews.history import EwsHistory
from emlisten.mail.ews.source import EwsReader
from emlisten.mail.graph.history import GraphHistory
from emlisten.mail.graph.source import GraphReader
from emlisten.mail.imap.source import ImapReader
from emlisten.mail.mime import to_email
from emlisten.models import Checkpoint, Email, MailboxConfig, RawMessage, email_id, message_key
from emlisten.service.backoff import Retry

log = logging.getLogger(__name__)

HistoryState = Literal["running", "done", "failed"]

#: Protocols a history load can read.
SUPPORTED_PROTOCOLS = frozenset({"imap", "ews", "graph"})
#: Consecutive failed attempts (without any mail delivered in between) before a load gives up.
MAX_ATTEMPTS = 8
#: UIDs per ``UID FETCH (INTERNALDATE)`` when sorting candidates by date.
_DATE_FETCH_CHUNK = 1000
#: Messages at least this big are converted in a worker thread (as live delivery does).
_THREAD_CONVERT_BYTES = 256 * 1024
#: A start date before this year loads everything (``SEARCH ALL``; ticks 0 is DateTime.MinValue).
_SEARCH_ALL_BEFORE_YEAR = 1971
_IMAP_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class ItemHistory(Protocol):
    """History over a protocol without UIDs (EWS, Graph): items by id and received time."""

    async def items(
        self, folder: str, since: datetime, floor: Checkpoint
    ) -> list[tuple[str, datetime | None]] | None:
        """Items received since ``since`` that live delivery does not cover (None: cannot tell)."""
        ...

    async def fetch(self, item_ids: Sequence[str]) -> list[RawMessage]:
        """MIME of these items (``key`` = item id), gone ones left out."""
        ...


def item_number(item_id: str) -> int:
    """A stable 63-bit number for an item id (the store records history deliveries as numbers)."""
    return int.from_bytes(hashlib.sha256(item_id.encode("utf-8")).digest()[:8], "big") >> 1


class HistoryUnsupportedError(Exception):
    """The mailbox's protocol cannot load history (yet)."""


class HistoryNotRunningError(Exception):
    """The node is not running history loads (not started yet, or shutting down)."""


class _LoadStopped(Exception):
    """The load must end without retrying: the mailbox was closed, or the lease was lost."""


@dataclass
class HistoryProgress:
    """What one load did so far (shown in ``/v1/mailboxes`` and the node's status)."""

    mailbox_id: str
    since: datetime
    state: HistoryState = "running"
    #: Messages this load has to deliver (grows as folders are searched).
    total: int = 0
    delivered: int = 0
    #: Found but delivered earlier (by a previous load).
    skipped: int = 0
    #: Listed by the search but gone (expunged) before they could be fetched.
    vanished: int = 0
    #: Passes over the folders (a retry after a failure is a new pass).
    passes: int = 0
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.delivered - self.vanished)

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "since": self.since.isoformat(),
            "total": self.total,
            "delivered": self.delivered,
            "skipped": self.skipped,
            "remaining": self.remaining,
            "error": self.error,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


@dataclass
class _Candidate:
    uid: int
    date: datetime | None


class HistoryLoads:
    """Runs history loads: ``await nursery.start(loads.run)``, then :meth:`start` per request."""

    def __init__(self, settings: Settings, store: Store, source: MailSource, sink: Sink) -> None:
        self.settings = settings
        self.store = store
        self.source = source
        self.sink = sink
        self._nursery: trio.Nursery | None = None
        self._progress: dict[str, HistoryProgress] = {}

    @property
    def running_count(self) -> int:
        return sum(1 for p in self._progress.values() if p.state == "running")

    def progress(self, mailbox_id: str) -> dict[str, Any] | None:
        """The latest load of this mailbox run by this process, or None."""
        found = self._progress.get(mailbox_id)
        return found.to_json() if found is not None else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def start(self, mailbox: MailboxConfig, since: datetime) -> bool:
        """Start loading ``mailbox``'s mail since ``since`` in the background.

        False when a load of this mailbox already runs (here or on another node). Raises
        HistoryUnsupportedError for a protocol without history, HistoryNotRunningError when
        this node runs no loads, StoreError when the lease cannot be asked for.
        """

        if mailbox.protocol not in SUPPORTED_PROTOCOLS:
            raise HistoryUnsupportedError(
                f"history loads are not supported for {mailbox.protocol!r} mailboxes yet"
            )
        nursery = self._nursery
        if nursery is None:
            raise HistoryNotRunningError("history loads are not running on this node")
        # One owner per load, so a second load on this very node cannot share the lease.
        owner = f"{self.settings.node_id}/history/{uuid.uuid4().hex[:12]}"
        lease = _lease_name(mailbox.id)
        if not await self.store.claim_leases(owner, [lease], self.settings.lease_ttl_seconds):
            return False
        progress = HistoryProgress(mailbox.id, since.astimezone(UTC))
        self._progress[mailbox.id] = progress
        nursery.start_soon(self._run_load, mailbox.id, owner, progress, name=f"history:{mailbox.id}")
        return True

    async def _run_load(self, mailbox_id: str, owner: str, progress: HistoryProgress) -> None:
        lease = _lease_name(mailbox_id)
        where = {"mailbox": mailbox_id}
        log.info("history load started: mail since %s", progress.since.isoformat(), extra=where)
        completed = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_lease, owner, lease, progress, nursery.cancel_scope)
                # Errors are handled inside the nursery body, so none arrives wrapped in a group.
                try:
                    await self._load_with_retries(mailbox_id, progress)
                    completed = True
                except _LoadStopped as exc:
                    progress.error = str(exc)
                except Exception as exc:
                    log.exception("history load failed unexpectedly", extra=where)
                    progress.error = f"unexpected error: {type(exc).__name__}"
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            if completed and progress.error is None:
                progress.state = "done"
            else:
                progress.state = "failed"
                progress.error = progress.error or "cancelled (the node is shutting down)"
            progress.finished_at = time.time()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await self.store.release_leases(owner, [lease])
                except StoreError as exc:
                    log.warning("could not release the history lease: %s", exc, extra=where)
            log.info(
                "history load %s: found %d, delivered %d, skipped %d (delivered before), remaining %d%s",
                progress.state,
                progress.total + progress.skipped,
                progress.delivered,
                progress.skipped,
                progress.remaining,
                f" ({progress.error})" if progress.error else "",
                extra=where,
            )

    async def _keep_lease(
        self, owner: str, lease: str, progress: HistoryProgress, load_scope: trio.CancelScope
    ) -> None:
        ttl = self.settings.lease_ttl_seconds
        while True:
            await trio.sleep(self.settings.lease_renew_seconds)
            try:
                held = await self.store.renew_leases(owner, [lease], ttl)
            except StoreError as exc:
                log.warning(
                    "could not renew the history lease: %s", exc, extra={"mailbox": progress.mailbox_id}
                )
                continue
            if not held:
                # Another node may start a load now: stop, or mail could be delivered twice.
                progress.error = "lost the history lease; stopped"
                load_scope.cancel()
                return

    async def _load_with_retries(self, mailbox_id: str, progress: HistoryProgress) -> None:
        retry = Retry(self.settings.delivery_backoff)
        where = {"mailbox": mailbox_id}
        while True:
            delivered_before = progress.delivered
            try:
                await self._load_once(mailbox_id, progress)
                return
            except MailAuthError as exc:
                # The listener reports rejected credentials to Creatio; retrying here only
                # hammers the server. The next synchronize call starts again.
                raise _LoadStopped(f"authentication failed: {exc}") from None
            except (DeliveryError, MailSourceError, StoreError) as exc:
                if progress.delivered > delivered_before:
                    retry.reset()
                if retry.attempts + 1 >= MAX_ATTEMPTS:
                    raise _LoadStopped(f"gave up after {MAX_ATTEMPTS} attempts: {exc}") from None
                delay = retry.next_delay()
                progress.error = str(exc)
                log.warning("history load failed, retrying in %.1fs: %s", delay, exc, extra=where)
            await trio.sleep(delay)
            progress.error = None

    async def _load_once(self, mailbox_id: str, progress: HistoryProgress) -> None:
        """One pass over every folder. Idempotent: what was delivered is skipped, so a retry
        after a failure starts again from the top."""

        mailbox = await self._mailbox(mailbox_id)
        # A retry plans again: what this load delivered is now "delivered before" too, so only
        # the first pass counts what earlier loads delivered.
        first_pass = progress.passes == 0
        progress.passes += 1
        progress.total = progress.delivered + progress.vanished
        async with self.source.open_reader(mailbox) as opened:
            history: ItemHistory | None = None
            if isinstance(opened, EwsReader):
                history = EwsHistory(opened)
            elif isinstance(opened, GraphReader):
                history = GraphHistory(opened)
            elif not isinstance(opened, ImapReader):
                raise _LoadStopped(f"history loads are not supported for {mailbox.protocol!r} mailboxes yet")
            for folder in mailbox.folders:
                if history is not None:
                    await self._load_items_folder(
                        history, opened, mailbox, folder, progress, count_skipped=first_pass
                    )
                    continue
                assert isinstance(opened, ImapReader)
                plan = await self._plan_folder(opened, mailbox, folder, progress, count_skipped=first_pass)
                if plan is None:
                    continue
                await self._deliver_folder(opened, mailbox_id, folder, plan, progress)

    async def _mailbox(self, mailbox_id: str) -> MailboxConfig:
        # Read fresh each time: credentials may have been updated, the mailbox may be closed.
        mailbox = await self.store.get_mailbox(mailbox_id)
        if mailbox is None:
            raise _LoadStopped("the mailbox was closed")
        return mailbox

    async def _plan_folder(
        self,
        reader: ImapReader,
        mailbox: MailboxConfig,
        folder: str,
        progress: HistoryProgress,
        *,
        count_skipped: bool,
    ) -> tuple[int, list[int]] | None:
        """UIDs of ``folder`` to deliver, in date order, with the folder's UIDVALIDITY."""

        where = {"mailbox": mailbox.id, "folder": folder}
        try:
            info = await reader.select(folder)
        except FolderNotFoundError as exc:
            log.warning("history load: skipping a folder that does not exist: %s", exc, extra=where)
            return None

        async def current_end() -> Checkpoint:
            return Checkpoint(info.uidvalidity, max(info.uidnext - 1, 0))

        floor = await self._floor(mailbox.id, folder, current_end)
        if floor.uidvalidity != info.uidvalidity:
            log.warning(
                "history load: the folder was rebuilt (UIDVALIDITY %d -> %d) and live delivery has "
                "not moved to the new one yet; skipping it this time",
                floor.uidvalidity,
                info.uidvalidity,
                extra=where,
            )
            return None
        since = progress.since
        # SEARCH SINCE compares dates only, in the message's own time zone: ask one day earlier
        # and compare INTERNALDATE exactly below.
        criteria = (
            "ALL"
            if since.year < _SEARCH_ALL_BEFORE_YEAR
            else f"SINCE {_imap_date(since - timedelta(days=1))}"
        )
        found = await reader.client.uid_search(criteria)
        below_floor = [uid for uid in found if uid <= floor.last_uid]
        delivered_before = await self.store.history_delivered(mailbox.id, folder, info.uidvalidity)
        candidates = await self._dates(reader, [uid for uid in below_floor if uid not in delivered_before])
        wanted = [c for c in candidates if c.date is None or c.date >= since]
        skipped = 0
        if count_skipped:
            earlier = await self._dates(reader, [uid for uid in below_floor if uid in delivered_before])
            skipped = sum(1 for c in earlier if c.date is None or c.date >= since)
            progress.skipped += skipped
        # Date order; mail without a date (never from a sane server) goes first, UIDs break ties.
        epoch = datetime.min.replace(tzinfo=UTC)
        wanted.sort(key=lambda c: (c.date or epoch, c.uid))
        progress.total += len(wanted)
        log.info(
            "history load: %d message(s) to deliver, %d delivered before (floor uid %d)",
            len(wanted),
            skipped,
            floor.last_uid,
            extra=where,
        )
        return info.uidvalidity, [c.uid for c in wanted]

    async def _floor(
        self, mailbox_id: str, folder: str, current_end: Callable[[], Awaitable[Checkpoint]]
    ) -> Checkpoint:
        floor = await self.store.get_history_floor(mailbox_id, folder)
        if floor is not None:
            return floor
        checkpoint = await self.store.get_checkpoint(mailbox_id, folder)
        if checkpoint is None:
            # Creatio calls synchronize right after create, maybe before the listener's first
            # connect: start the subscription here. Whoever seeds first sets the floor, so live
            # delivery and this load agree on it.
            await self.store.seed_checkpoint(mailbox_id, folder, await current_end())
            floor = await self.store.get_history_floor(mailbox_id, folder)
            if floor is None:
                raise _LoadStopped("the mailbox was closed")
            return floor
        # Subscribed by a version that kept no floor: everything up to the checkpoint counts as
        # history. Mail delivered live may be offered again, with the same Email.Id.
        log.warning(
            "history load: no history floor recorded; using the live checkpoint",
            extra={"mailbox": mailbox_id, "folder": folder},
        )
        return checkpoint

    @staticmethod
    async def _dates(reader: ImapReader, uids: Sequence[int]) -> list[_Candidate]:
        candidates: list[_Candidate] = []
        for start in range(0, len(uids), _DATE_FETCH_CHUNK):
            chunk = uids[start : start + _DATE_FETCH_CHUNK]
            wanted = set(chunk)
            for message in await reader.client.uid_fetch(chunk, "(UID INTERNALDATE)"):
                if message.uid in wanted:
                    wanted.discard(message.uid)
                    candidates.append(_Candidate(message.uid, message.internal_date))
        return candidates

    async def _deliver_folder(
        self,
        reader: ImapReader,
        mailbox_id: str,
        folder: str,
        plan: tuple[int, Sequence[int]],
        progress: HistoryProgress,
    ) -> None:
        uidvalidity, uids = plan
        count = self.settings.batch_max_count
        for start in range(0, len(uids), count):
            chunk = uids[start : start + count]
            mailbox = await self._mailbox(mailbox_id)
            info = await reader.select(folder)
            if info.uidvalidity != uidvalidity:
                raise MailSourceError(f"UIDVALIDITY of {folder!r} changed during the history load")
            messages = await reader.fetch(chunk)
            progress.vanished += len(chunk) - len(messages)
            for batch in self._batches(messages):
                await self._deliver_batch(mailbox, folder, uidvalidity, batch, progress)
            log.info(
                "history load: delivered %d of %d, %d remaining",
                progress.delivered,
                progress.total,
                progress.remaining,
                extra={"mailbox": mailbox_id, "folder": folder},
            )

    async def _load_items_folder(
        self,
        history: ItemHistory,
        reader: MailReader,
        mailbox: MailboxConfig,
        folder: str,
        progress: HistoryProgress,
        *,
        count_skipped: bool,
    ) -> None:
        """One folder of an EWS or Graph mailbox: list, leave out what was delivered, deliver
        the rest in date order."""
        where = {"mailbox": mailbox.id, "folder": folder}
        try:
            floor = await self._floor(mailbox.id, folder, partial(reader.current_position, folder))
            items = await history.items(folder, progress.since, floor)
        except FolderNotFoundError as exc:
            log.warning("history load: skipping a folder that does not exist: %s", exc, extra=where)
            return
        if items is None:
            log.warning(
                "history load: the folder's history floor is no longer usable on the server, so "
                "what live delivery covers cannot be told; skipping the folder",
                extra=where,
            )
            return
        since = progress.since
        in_range = [(i, r) for i, r in items if r is None or r >= since]
        delivered_before = await self.store.history_delivered(mailbox.id, folder, floor.uidvalidity)
        wanted = [(i, r) for i, r in in_range if item_number(i) not in delivered_before]
        if count_skipped:
            progress.skipped += len(in_range) - len(wanted)
        epoch = datetime.min.replace(tzinfo=UTC)
        wanted.sort(key=lambda pair: pair[1] or epoch)
        progress.total += len(wanted)
        log.info(
            "history load: %d message(s) to deliver, %d delivered before",
            len(wanted),
            len(in_range) - len(wanted),
            extra=where,
        )
        await self._fetch_and_deliver(
            history,
            mailbox_id=mailbox.id,
            folder=folder,
            uidvalidity=floor.uidvalidity,
            wanted=wanted,
            progress=progress,
        )
        if wanted:
            log.info(
                "history load: delivered %d of %d, %d remaining",
                progress.delivered,
                progress.total,
                progress.remaining,
                extra=where,
            )

    async def _fetch_and_deliver(
        self,
        history: ItemHistory,
        *,
        mailbox_id: str,
        folder: str,
        uidvalidity: int,
        wanted: Sequence[tuple[str, datetime | None]],
        progress: HistoryProgress,
    ) -> None:
        """Fetch ``EMLISTEN_BATCH_MAX_COUNT`` items at a time and deliver them, the next batch
        fetched while the current one is delivered (two batches in memory at most). A fetch
        failure reaches the delivering side in turn, so a delivery in flight is never cut."""
        count = self.settings.batch_max_count
        fetched_send, fetched_receive = trio.open_memory_channel[
            tuple[list[RawMessage], int] | MailSourceError
        ](0)

        async def fetch_all() -> None:
            # BrokenResourceError: the delivering side failed and stopped listening.
            with suppress(trio.BrokenResourceError), fetched_send:
                for start in range(0, len(wanted), count):
                    chunk = wanted[start : start + count]
                    received = dict(chunk)
                    try:
                        raws = await history.fetch([item_id for item_id, _ in chunk])
                    except MailSourceError as exc:
                        await fetched_send.send(exc)
                        return
                    messages = [
                        dataclasses.replace(
                            raw,
                            uid=item_number(raw.key),
                            internal_date=raw.internal_date or received.get(raw.key),
                        )
                        for raw in raws
                    ]
                    await fetched_send.send((messages, len(chunk) - len(messages)))

        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch_all)
            try:
                async with fetched_receive:
                    async for item in fetched_receive:
                        if isinstance(item, MailSourceError):
                            raise item
                        messages, vanished = item
                        progress.vanished += vanished
                        current = await self._mailbox(mailbox_id)
                        for batch in self._batches(messages):
                            await self._deliver_batch(current, folder, uidvalidity, batch, progress)
            except Exception as exc:
                # Raised after the nursery, so the caller sees it unwrapped.
                failure = exc
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    def _batches(self, messages: Sequence[RawMessage]) -> Iterable[list[RawMessage]]:
        """Split by ``batch_max_bytes`` (a single big message still goes alone)."""
        batch: list[RawMessage] = []
        size = 0
        for raw in messages:
            if batch and size + len(raw.data) > self.settings.batch_max_bytes:
                yield batch
                batch, size = [], 0
            batch.append(raw)
            size += len(raw.data)
        if batch:
            yield batch

    async def _deliver_batch(
        self,
        mailbox: MailboxConfig,
        folder: str,
        uidvalidity: int,
        batch: Sequence[RawMessage],
        progress: HistoryProgress,
    ) -> None:
        emails: list[Email] = []
        for raw in batch:
            convert = partial(
                to_email,
                raw,
                email_id=email_id(mailbox.id, folder, raw.key or str(raw.uid)),
                max_size=self.settings.max_message_bytes,
            )
            big = len(raw.data) > _THREAD_CONVERT_BYTES
            emails.append(await trio.to_thread.run_sync(convert) if big else convert())
        first, last = batch[0], batch[-1]
        key = "history:" + message_key(mailbox.id, folder, first.key or str(first.uid))
        if last is not first:
            key += f"..{last.key or last.uid}"
        try:
            with trio.fail_after(self.settings.delivery_timeout_seconds):
                if mailbox.use_full_email:
                    await self.sink.deliver(mailbox, emails, idempotency_key=key)
                else:
                    await self.sink.notify_new_ids(mailbox, [raw.key or str(raw.uid) for raw in batch])
        except trio.TooSlowError:
            raise DeliveryError("ProcessFullEmail: no answer within the delivery timeout") from None
        # Shielded: Creatio has the mail; losing the record now would deliver it twice.
        with trio.CancelScope(shield=True):
            await self.store.mark_history_delivered(mailbox.id, folder, uidvalidity, [r.uid for r in batch])
            await self.store.add_delivered(mailbox.id, len(batch))
        progress.delivered += len(batch)


def _lease_name(mailbox_id: str) -> str:
    return f"history/{mailbox_id}"


def _imap_date(moment: datetime) -> str:
    """RFC 3501 ``date`` (``1-Feb-2024``), independent of the process locale."""
    day = moment.astimezone(UTC)
    return f"{day.day}-{_IMAP_MONTHS[day.month - 1]}-{day.year}"


__all__ = [
    "MAX_ATTEMPTS",
    "SUPPORTED_PROTOCOLS",
    "HistoryLoads",
    "HistoryNotRunningError",
    "HistoryProgress",
    "HistoryUnsupportedError",
    "item_number",
]
