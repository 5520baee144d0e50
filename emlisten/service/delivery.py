"""The secondary's side: consume sync tasks, download new mail, convert, deliver, checkpoint.

Tasks are nudges ("folder F of mailbox M has new mail"); the truth is the checkpoint. One drainer
task per (mailbox, folder) syncs from the checkpoint upwards in UID order, so duplicate, late or
coalesced tasks are harmless, and the checkpoint only advances after Creatio answered 2xx.

A drainer whose deliveries fail keeps exactly one task unacked while it backs off, so a failing
Creatio endpoint slows only its own mailboxes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import trio

from emlisten.abc import ClaimedFolder, MailReader, Sink, Store, TaskDelivery, TaskQueue
from emlisten.config import Settings
from emlisten.errors import DeliveryError, MailSourceError, QueueError, StoreError
from emlisten.mail.mime import to_email
from emlisten.metrics import Metrics
from emlisten.models import (
    RECHECK_REASONS,
    Checkpoint,
    Email,
    MailboxConfig,
    RawMessage,
    SyncTask,
    email_id,
    message_key,
)
from emlisten.service.backoff import Retry
from emlisten.service.readers import ReaderPool

log = logging.getLogger(__name__)

DrainKey = tuple[str, str]

_THREAD_CONVERT_BYTES = 256 * 1024
#: How long the checkpoint of accepted mail is retried through a store outage (see
#: DeliveryWorker._save_checkpoint); past it the drainer's retry may deliver the mail again.
_CHECKPOINT_PATIENCE = 120.0
#: How many folders' last written checkpoints a worker remembers, to put them back when the store
#: loses its data (docs/reliability.md, "A store that lost its data"); the least recently written
#: go first. An entry (a (mailbox id, folder) key, a Checkpoint, the OrderedDict's links) costs
#: about 330 bytes with 36-character ids: about 35 MB at the limit, reached only by a worker that
#: delivered to 100,000 folders since it started.
_REMEMBERED_CHECKPOINTS = 100_000
#: How often the worker looks at the store's incarnation (one GET): a wipe is seen within this,
#: and the primaries restore no sooner than 2 s after they see it (MailboxManager), so every
#: worker has put its checkpoints back before a restored folder can be synced.
_INCARNATION_WATCH_SECONDS = 1.0
#: A checkpoint write that finds its mailbox unknown this soon after the worker saw the store
#: lose its data is put back at once: a delivery accepted during the outage may record its
#: checkpoint after the worker put back the others.
_LATE_REASSERT_SECONDS = 30.0


class _Drainer:
    __slots__ = ("key", "pending")

    def __init__(self, key: DrainKey) -> None:
        self.key = key
        self.pending: list[TaskDelivery] = []


class DeliveryWorker:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        queue: TaskQueue,
        readers: ReaderPool,
        sink: Sink,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.settings = settings
        # Unique per process even when two processes share a node id by mistake.
        self._lock_owner = f"{settings.node_id}/worker/{uuid.uuid4().hex[:12]}"
        self.store = store
        self.queue = queue
        self.readers = readers
        self.sink = sink
        self._drainers: dict[DrainKey, _Drainer] = {}
        #: Receivers (origins) some drainer is backing off from, set when one gets through.
        self._receivers_back: dict[str, trio.Event] = {}
        self._intake = trio.CancelScope()
        self._idle = trio.Event()
        self._idle.set()
        #: The last checkpoint this worker wrote per folder (bounded, least recently written
        #: dropped first): the exact delivered point, put back if the store loses its data.
        self._written: OrderedDict[DrainKey, Checkpoint] = OrderedDict()
        #: The store's data set as this worker saw it (Store.incarnation), kept across runs.
        self._incarnation: str | None = None
        #: When this worker last saw the store lose its data (trio time).
        self._store_lost_at = -math.inf

    @property
    def busy(self) -> int:
        return len(self._drainers)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            watch = trio.CancelScope()
            nursery.start_soon(self._watch_incarnation, watch)
            with self._intake:
                async with self.queue.consume(prefetch=self.settings.worker_concurrency) as deliveries:
                    task_status.started()
                    async for delivery in deliveries:
                        self._dispatch(nursery, delivery)
            # Intake stopped (shutdown): the nursery waits for running drainers to finish.
            watch.cancel()

    async def _watch_incarnation(self, scope: trio.CancelScope) -> None:
        """Put back the checkpoints this worker wrote when the store loses its data (Redis
        restarted empty). The primaries restore their mailboxes with the checkpoints they read,
        which lag the ones workers wrote since: without this, the mail in between is delivered
        again. Only forward (Store.reassert_checkpoints), so it never undoes newer progress."""
        with scope:
            while True:
                try:
                    await self._check_incarnation()
                except StoreError as exc:
                    # Redis is down during a wipe: look again at the next tick.
                    log.debug("could not read the store's incarnation: %s", exc)
                await trio.sleep(_INCARNATION_WATCH_SECONDS)

    async def _check_incarnation(self) -> None:
        current = await self.store.incarnation()
        if self._incarnation is None:
            self._incarnation = current  # the baseline
            return
        if current == self._incarnation:
            return
        # Before the snapshot: a write that finds its mailbox gone from now on puts itself back.
        self._store_lost_at = trio.current_time()
        remembered: dict[str, dict[str, Checkpoint]] = {}
        for (mailbox_id, folder), checkpoint in self._written.items():
            remembered.setdefault(mailbox_id, {})[folder] = checkpoint
        changed = await self.store.reassert_checkpoints(remembered)
        log.warning(
            "the store lost its data (new incarnation): put back %d of the %d checkpoint(s) this "
            "worker wrote",
            changed,
            len(self._written),
        )
        self._incarnation = current

    def _remember(self, mailbox_id: str, folder: str, checkpoint: Checkpoint) -> None:
        key = (mailbox_id, folder)
        known = self._written.pop(key, None)
        if (
            known is not None
            and known.uidvalidity == checkpoint.uidvalidity
            and known.last_uid > checkpoint.last_uid
        ):
            checkpoint = known  # a late write of older progress (it changed nothing in the store)
        self._written[key] = checkpoint
        if len(self._written) > _REMEMBERED_CHECKPOINTS:
            self._written.popitem(last=False)

    async def _advance(self, mailbox_id: str, folder: str, checkpoint: Checkpoint) -> None:
        """Move the checkpoint on past mail that needs no delivery (vanished, a rebuilt folder)."""
        if await self.store.advance_checkpoint(mailbox_id, folder, checkpoint):
            self._remember(mailbox_id, folder, checkpoint)

    def reset_intake(self) -> None:
        """Allow ``run`` again after ``stop_intake`` (a primary standing in more than once)."""
        self._intake = trio.CancelScope()

    def stop_intake(self) -> None:
        """Take no new tasks; drainers finish what they hold (the caller bounds how long)."""
        self._intake.cancel()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def _dispatch(self, nursery: trio.Nursery, delivery: TaskDelivery) -> None:
        key = (delivery.task.mailbox_id, delivery.task.folder)
        drainer = self._drainers.get(key)
        if drainer is None:
            drainer = _Drainer(key)
            self._drainers[key] = drainer
            self._idle = trio.Event()
            drainer.pending.append(delivery)
            nursery.start_soon(self._drain, drainer, name=f"drain:{key[0]}:{key[1]}")
        else:
            drainer.pending.append(delivery)

    async def _drain(self, drainer: _Drainer) -> None:
        retry = Retry(self.settings.delivery_backoff)
        failing_at: str | None = None  # the receiver the last failed attempt could not reach
        try:
            while drainer.pending:
                taken = drainer.pending
                drainer.pending = []
                seen = [d.task.seen_at for d in taken if d.task.reason == "exists" and d.task.seen_at]
                seen_at = min(seen) if seen else 0.0
                tasks = [d.task for d in taken]
                while True:
                    try:
                        await self._sync_exclusively(drainer.key, seen_at, tasks)
                        if failing_at is not None:
                            self._receiver_is_back(failing_at)
                            failing_at = None
                        break
                    except (DeliveryError, MailSourceError, StoreError) as exc:
                        failing_at = _receiver_away(exc)
                        delay = retry.next_delay()
                        asked = exc.retry_after if isinstance(exc, DeliveryError) else None
                        if asked is not None:
                            # The receiver said when to come back: sooner than a grown backoff
                            # after a short overload, never later than the backoff's cap.
                            delay = min(asked, self.settings.delivery_retry_cap_seconds)
                        log.warning(
                            "delivery failed, retrying in %.1fs: %s",
                            delay,
                            exc,
                            extra={"mailbox": drainer.key[0], "folder": drainer.key[1]},
                        )
                    except Exception:
                        failing_at = None
                        delay = retry.next_delay()
                        log.exception(
                            "sync failed unexpectedly, retrying in %.1fs",
                            delay,
                            extra={"mailbox": drainer.key[0], "folder": drainer.key[1]},
                        )
                    # Tasks that arrived meanwhile go into the retry as UIDs it must reach (with
                    # only the first task's carried mail, a retry that covered it asked the
                    # server nothing and the rest waited for the next mail), without the mail
                    # they carry (memory stays bounded in a long outage: the server has it).
                    # Settle them now so a failing mailbox holds one queue slot, not one per
                    # new mail.
                    tasks += [
                        dataclasses.replace(d.task, prefetched=(), prefetch_from=0, prefetch_to=0)
                        for d in drainer.pending
                    ]
                    await self._ack_all(drainer.pending)
                    drainer.pending = []
                    await self._back_off(delay, failing_at)
                retry.reset()
                await self._ack_all(taken)
        finally:
            del self._drainers[drainer.key]
            if not self._drainers:
                self._idle.set()

    async def _back_off(self, delay: float, receiver: str | None) -> None:
        """Wait before a retry, and no longer than until a delivery to the same receiver got
        through again: after an outage of Creatio each folder would otherwise wait out its own
        backoff, up to the cap (60 s) after the receiver was back."""
        if receiver is None:
            await trio.sleep(delay)
            return
        back = self._receivers_back.get(receiver)
        if back is None:
            back = self._receivers_back[receiver] = trio.Event()
        with trio.move_on_after(delay):
            await back.wait()

    def _receiver_is_back(self, receiver: str) -> None:
        back = self._receivers_back.pop(receiver, None)
        if back is not None:
            back.set()

    async def _sync_exclusively(self, key: DrainKey, seen_at: float, tasks: Sequence[SyncTask]) -> None:
        """Sync one folder while holding its sync lease, so that two workers (two secondaries, or
        a primary standing in) never deliver the same folder at once: that would double mail.
        Within this worker one drainer per folder runs at a time (``_drainers``).

        The lease is the store's generic named lease, renewed while the sync runs."""

        name = f"sync/{key[0]}/{key[1]}"
        ttl = self.settings.lease_ttl_seconds
        wait = 0.01
        # The claim reads the mailbox and the checkpoint too: one store round trip, not three.
        while (
            claimed := await self.store.claim_lease_and_read_folder(self._lock_owner, name, *key, ttl)
        ) is None:
            # Another worker is syncing this folder; it may miss mail that arrived after its
            # UID SEARCH, so wait for it and sync again rather than dropping this task.
            await trio.sleep(wait)
            wait = min(wait * 2, 0.5)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_lease, name, ttl)
                await self.sync_folder(*key, seen_at=seen_at, tasks=tasks, claimed=claimed)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The nursery wraps the sync's own error (a Creatio 500 is a DeliveryError): unwrap
            # it, so the retry loop logs a warning with its status, not a traceback.
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                raise group.exceptions[0] from None
            _errors, cancelled = group.split(Exception)
            if cancelled is not None:
                # A shutdown cancelled the renewal while the sync failed: only the cancellation
                # (or whatever else is no Exception) goes on; the drainer's retry would not know
                # the group, and the node would stop with a traceback. The error is moot: its
                # task is not acked and comes back.
                raise cancelled from None
            raise
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.store.release_leases(self._lock_owner, [name])

    async def _keep_lease(self, name: str, ttl: float) -> None:
        while True:
            await trio.sleep(ttl / 3)
            try:
                held = await self.store.renew_leases(self._lock_owner, [name], ttl)
            except StoreError as exc:
                # Go on: raised, it ended the sync, and with it the retries of the checkpoint
                # write of mail the receiver already has, so the retried task delivered it again.
                log.warning("cannot renew the sync lease %s, trying again: %s", name, exc)
                continue
            if not held:
                log.warning("lost the sync lease %s: another worker may deliver in parallel", name)
                return

    @staticmethod
    async def _ack_all(deliveries: Sequence[TaskDelivery]) -> None:
        for delivery in deliveries:
            try:
                await delivery.ack()
            except QueueError as exc:
                # Harmless: an unacked task comes back, and syncing again from the checkpoint
                # delivers nothing twice.
                log.warning("could not acknowledge a task: %s", exc)

    async def sync_folder(
        self,
        mailbox_id: str,
        folder: str,
        *,
        seen_at: float = 0.0,
        tasks: Sequence[SyncTask] = (),
        claimed: ClaimedFolder | None = None,
    ) -> int:
        """Deliver everything after the checkpoint, oldest first. Returns how many were delivered.

        Mail the listener fetched on its own session (``SyncTask.prefetched``) is delivered from
        the tasks; the server is asked only for what they do not cover. ``claimed``: the mailbox
        and checkpoint read with the sync lease (None: read them now)."""

        if claimed is None:
            mailbox = await self.store.get_mailbox(mailbox_id)
            checkpoint = await self.store.get_checkpoint(mailbox_id, folder) if mailbox else None
        else:
            mailbox, checkpoint = claimed.mailbox, claimed.checkpoint
        if mailbox is None:
            return 0  # closed meanwhile
        delivered = 0
        if checkpoint is not None and tasks:
            checkpoint, delivered = await self._deliver_prefetched(
                mailbox, folder, checkpoint, tasks, seen_at
            )
            if all(task.covered_by(checkpoint) for task in tasks):
                return delivered
        # A session opened only to answer rechecks (queued by a primary of an earlier version,
        # during a rolling upgrade) is closed at once: most rechecks find nothing.
        only_rechecks = bool(tasks) and all(task.reason in RECHECK_REASONS for task in tasks)
        async with self.readers.reader(mailbox, linger=0 if only_rechecks else None) as reader:
            if checkpoint is None:
                # The listener seeds the checkpoint before it publishes; none means the mailbox
                # was closed (or re-created) meanwhile. Seed defensively and deliver nothing older.
                await self.store.seed_checkpoint(mailbox_id, folder, await reader.current_position(folder))
                return 0
            while True:
                messages, after = await reader.fetch_new(
                    folder, checkpoint, limit=self.settings.batch_max_count
                )
                if messages:
                    delivered += await self._deliver_messages(mailbox, folder, messages, after, seen_at)
                    await self._mark_synchronized(mailbox, reader, messages)
                    if len(messages) < self.settings.batch_max_count:
                        # Caught up: mail arriving meanwhile sends a new task, which runs another
                        # pass; asking the server again now would cost a round trip per mail.
                        return delivered
                elif after != checkpoint:
                    await self._advance(mailbox_id, folder, after)
                else:
                    return delivered
                checkpoint = after

    async def _deliver_prefetched(
        self,
        mailbox: MailboxConfig,
        folder: str,
        checkpoint: Checkpoint,
        tasks: Sequence[SyncTask],
        seen_at: float,
    ) -> tuple[Checkpoint, int]:
        """Deliver the mail the tasks carry, as far as it continues the checkpoint without a gap.
        Returns the checkpoint reached and how many were delivered."""

        if checkpoint.cursor or _feature_enabled(mailbox, "MarkEmailsAsSynchronized"):
            return checkpoint, 0  # marking needs a session of our own anyway
        delivered = 0
        for task in sorted((t for t in tasks if t.has_prefetch), key=lambda t: t.prefetch_from):
            if task.uidvalidity != checkpoint.uidvalidity or task.prefetch_to <= checkpoint.last_uid:
                continue
            if task.prefetch_from > checkpoint.last_uid + 1:
                break  # a gap only the server can fill
            after = Checkpoint(checkpoint.uidvalidity, task.prefetch_to)
            messages = [raw for raw in task.prefetched if raw.uid > checkpoint.last_uid]
            if messages:
                delivered += await self._deliver_messages(mailbox, folder, messages, after, seen_at)
                self.metrics.prefetched_emails.inc(len(messages))
            else:
                await self._advance(mailbox.id, folder, after)
            checkpoint = after
        return checkpoint, delivered

    async def _mark_synchronized(
        self, mailbox: MailboxConfig, reader: MailReader, messages: Sequence[RawMessage]
    ) -> None:
        """Creatio's ``FeatureValues.MarkEmailsAsSynchronized``: flag delivered mail on the server.

        Best effort: the mail is already delivered, so a failure is logged, not retried."""

        if not _feature_enabled(mailbox, "MarkEmailsAsSynchronized"):
            return
        mark = getattr(reader, "mark", None)
        if mark is None:
            return
        try:
            await mark([raw.uid for raw in messages])
        except MailSourceError as exc:
            log.warning(
                "could not mark delivered mail as synchronized: %s", exc, extra={"mailbox": mailbox.id}
            )

    async def _deliver_messages(
        self,
        mailbox: MailboxConfig,
        folder: str,
        messages: Sequence[RawMessage],
        after: Checkpoint,
        seen_at: float,
    ) -> int:
        """Deliver in calls bounded by bytes, checkpointing after each accepted call.

        A call may only end where the protocol can resume (a message with a ``position``); the
        last call ends at ``after``.
        """

        batch: list[tuple[RawMessage, Email]] = []
        batch_bytes = 0
        delivered = 0
        for raw in messages:
            convert = partial(
                to_email,
                raw,
                email_id=email_id(mailbox.id, folder, raw.key or str(raw.uid)),
                max_size=self.settings.max_message_bytes,
            )
            size = len(raw.data)
            # Big mails take tens of milliseconds to parse: keep them off the event loop.
            email = await trio.to_thread.run_sync(convert) if size > _THREAD_CONVERT_BYTES else convert()
            email.folder = folder
            previous = batch[-1][0] if batch else None
            if (
                previous is not None
                and previous.position is not None
                and batch_bytes + size > self.settings.batch_max_bytes
            ):
                delivered += await self._deliver_batch(mailbox, folder, batch, previous.position, seen_at)
                batch, batch_bytes = [], 0
            batch.append((raw, email))
            batch_bytes += size
        if batch:
            delivered += await self._deliver_batch(mailbox, folder, batch, after, seen_at)
        return delivered

    async def _deliver_batch(
        self,
        mailbox: MailboxConfig,
        folder: str,
        batch: Sequence[tuple[RawMessage, Email]],
        checkpoint: Checkpoint,
        seen_at: float,
    ) -> int:
        first, last = batch[0][0], batch[-1][0]
        key = message_key(mailbox.id, folder, first.key or str(first.uid))
        if last is not first:
            key += f"..{last.key or last.uid}"
        emails = [email for _raw, email in batch]
        called_at = trio.current_time()
        try:
            with trio.fail_after(self.settings.delivery_timeout_seconds):
                if mailbox.use_full_email:
                    await self.sink.deliver(mailbox, emails, idempotency_key=key)
                else:
                    # UseFullEmail=false: Creatio gets the message ids and loads the mail itself.
                    await self.sink.notify_new_ids(mailbox, [raw.key or str(raw.uid) for raw, _ in batch])
        except trio.TooSlowError:
            self.metrics.deliveries.labels(outcome="failure").inc()
            self.metrics.activity.delivery_failed(mailbox.id, folder, "no answer within the delivery timeout")
            raise DeliveryError("ProcessFullEmail: no answer within the delivery timeout") from None
        except DeliveryError as error:
            self.metrics.deliveries.labels(outcome="failure").inc()
            self.metrics.activity.delivery_failed(mailbox.id, folder, str(error))
            raise
        finally:
            self.metrics.delivery_calls.observe(trio.current_time() - called_at)
        self.metrics.deliveries.labels(outcome="success").inc()
        self.metrics.delivered_emails.inc(len(batch))
        latency = max(0.0, time.time() - seen_at) if seen_at else None
        if latency is not None:
            for _ in batch:
                self.metrics.delivery_latency.observe(latency)
        self.metrics.activity.delivered(mailbox.id, folder, len(batch), latency)
        # The delivered count rides on the checkpoint's write (one round trip); a counter the
        # store cannot write never fails it (Store.advance_checkpoint).
        await self._save_checkpoint(mailbox.id, folder, checkpoint, delivered=len(batch))
        log.info(
            "delivered %d email(s), uid %d..%d",
            len(batch),
            first.uid,
            last.uid,
            extra={"mailbox": mailbox.id, "folder": folder, "arrived_to_delivered_ms": _age_ms(batch)},
        )
        return len(batch)

    async def _save_checkpoint(
        self, mailbox_id: str, folder: str, checkpoint: Checkpoint, *, delivered: int = 0
    ) -> None:
        """Record the checkpoint of mail the receiver has accepted, and count the ``delivered``
        mails with it. Creatio has the mail now: if the store cannot take the write (an outage),
        retrying the delivery from the old checkpoint would deliver it twice, so the write itself
        is retried (shielded, each try) for up to ``_CHECKPOINT_PATIENCE`` seconds before the
        error goes to the drainer."""
        retry = Retry(self.settings.delivery_backoff)
        give_up_at = trio.current_time() + _CHECKPOINT_PATIENCE
        while True:
            try:
                with trio.CancelScope(shield=True):
                    stored = await self.store.advance_checkpoint(
                        mailbox_id, folder, checkpoint, delivered=delivered
                    )
                    # Remembered whatever the store did with it: the receiver has the mail.
                    self._remember(mailbox_id, folder, checkpoint)
                    if not stored and trio.current_time() - self._store_lost_at < _LATE_REASSERT_SECONDS:
                        await self._reassert_late(mailbox_id, folder, checkpoint)
                return
            except StoreError as error:
                if trio.current_time() >= give_up_at:
                    raise
                log.warning(
                    "could not record the checkpoint of delivered mail, retrying: %s",
                    error,
                    extra={"mailbox": mailbox_id, "folder": folder},
                )
            await trio.sleep(min(retry.next_delay(), 2.0))

    async def _reassert_late(self, mailbox_id: str, folder: str, checkpoint: Checkpoint) -> None:
        """The mailbox is unknown to a store that just lost its data (or was closed): put the
        checkpoint back as the others were, in case this write came after them. Best effort:
        at worst the primary's restore repeats this batch."""
        try:
            await self.store.reassert_checkpoints({mailbox_id: {folder: checkpoint}})
        except StoreError as error:
            log.warning(
                "could not put back the checkpoint of delivered mail: %s",
                error,
                extra={"mailbox": mailbox_id, "folder": folder},
            )


def _feature_enabled(mailbox: MailboxConfig, name: str) -> bool:
    wanted = name.lower()
    for key, value in mailbox.feature_values.items():
        if key.lower() == wanted:
            return value is True or (isinstance(value, (int, str)) and str(value).lower() in ("1", "true"))
    return False


def _age_ms(batch: Sequence[tuple[RawMessage, Email]]) -> int | None:
    dates = [raw.internal_date for raw, _ in batch if raw.internal_date is not None]
    if not dates:
        return None
    return max(0, math.floor((time.time() - min(dates).timestamp()) * 1000))


def _receiver_away(exc: Exception) -> str | None:
    """The receiver a failed delivery says is away (no answer, or a 5xx), whose folders retry
    together once one delivery to it gets through again; None for a refusal (4xx): a receiver
    limiting its rate (429) lets some calls through and asks the rest to wait, so one getting
    through must not send every refused folder back at once, and a 400 or 413 is the batch's."""
    if isinstance(exc, DeliveryError) and (exc.status is None or exc.status >= 500):
        return exc.origin
    return None
