"""Every port of emlisten in one place. Adapters live in ``store/``, ``queue/``, ``mail/``, ``sink/``.

The service core (``emlisten.service``) only sees these interfaces; which adapter backs each one
is decided once, at start-up, from the configuration.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import trio

from emlisten.models import (
    Checkpoint,
    Email,
    FolderInfo,
    MailboxConfig,
    MailboxState,
    MailboxStatus,
    NodeInfo,
    RawMessage,
    SyncTask,
    WebhookEvent,
)

#: Published instead of a mailbox id when many mailboxes changed at once.
RESYNC = "*"


@dataclass(frozen=True, slots=True)
class ClaimedFolder:
    """What ``Store.claim_lease_and_read_folder`` read once it held the lease."""

    #: None: the mailbox is not registered (closed meanwhile, or the store lost its data).
    mailbox: MailboxConfig | None
    #: The folder's checkpoint (None: none yet, or no mailbox).
    checkpoint: Checkpoint | None


class Store(ABC):
    """Shared state: the mailbox registry, states, checkpoints, and change notifications.

    Any node can answer for any mailbox from here. Implementations must be safe for concurrent
    use by many tasks.
    """

    name: str = "store"
    #: Each call is a round trip to another process (Redis): gathering calls into bulk ones pays
    #: (emlisten/service/batching.py). In-process stores answer at once; a wait would only delay.
    remote: bool = False
    #: Other processes (nodes) use the store too, so one of them may take a lease this node did
    #: not renew in time: the node stops its mailboxes before that can happen. An in-process
    #: store (memory; SQLite, one process per data directory) has no other node to make room
    #: for: a late renewal there is this process's own event loop running behind.
    shared: bool = False

    @abstractmethod
    async def put_mailbox(self, mailbox: MailboxConfig) -> None:
        """Register or replace a mailbox (credentials included)."""

    @abstractmethod
    async def get_mailbox(self, mailbox_id: str) -> MailboxConfig | None: ...

    async def put_mailboxes(self, mailboxes: Sequence[MailboxConfig]) -> None:
        """``put_mailbox`` for many (adapters batch this into one round trip)."""
        for mailbox in mailboxes:
            await self.put_mailbox(mailbox)

    async def set_statuses(self, statuses: Mapping[str, MailboxStatus]) -> None:
        """``set_status`` for many (adapters batch this into one round trip)."""
        for mailbox_id, status in statuses.items():
            await self.set_status(mailbox_id, status)

    @abstractmethod
    async def remove_mailbox(self, mailbox_id: str) -> bool:
        """Forget a mailbox and its checkpoints; its status becomes CLOSED. True if it existed."""

    @abstractmethod
    async def list_mailbox_ids(self) -> list[str]: ...

    async def get_mailboxes(self, mailbox_ids: Sequence[str]) -> dict[str, MailboxConfig]:
        """Several mailboxes at once (adapters batch this); unknown ids are left out."""
        found = {}
        for mailbox_id in mailbox_ids:
            mailbox = await self.get_mailbox(mailbox_id)
            if mailbox is not None:
                found[mailbox_id] = mailbox
        return found

    @abstractmethod
    async def existing(self, mailbox_ids: Iterable[str]) -> set[str]:
        """Which of these mailboxes are registered (one round trip, for subscriptionsstate)."""

    @abstractmethod
    async def set_status(self, mailbox_id: str, status: MailboxStatus) -> None:
        """Record the state; ``status.delivered`` is ignored (only add_delivered moves it)."""

    @abstractmethod
    async def get_statuses(self, mailbox_ids: Iterable[str]) -> dict[str, MailboxStatus | None]: ...

    async def state_counts(self) -> tuple[int, dict[str, int]]:
        """How many mailboxes are registered, and how many of them are in each state (a mailbox
        without a status counts as starting). Operators and health checks poll this often:
        adapters that can count in place should."""
        ids = await self.list_mailbox_ids()
        counts: dict[str, int] = {}
        for status in (await self.get_statuses(ids)).values():
            state = status.state.value if status else MailboxState.STARTING.value
            counts[state] = counts.get(state, 0) + 1
        return len(ids), counts

    @abstractmethod
    async def add_delivered(self, mailbox_id: str, count: int) -> None:
        """Add to the mailbox's delivered counter (nothing for a mailbox without a status)."""

    @abstractmethod
    async def get_checkpoint(self, mailbox_id: str, folder: str) -> Checkpoint | None: ...

    @abstractmethod
    async def seed_checkpoint(self, mailbox_id: str, folder: str, checkpoint: Checkpoint) -> bool:
        """Set the checkpoint only if there is none yet (a new subscription). True if it was set."""

    @abstractmethod
    async def advance_checkpoint(
        self, mailbox_id: str, folder: str, checkpoint: Checkpoint, *, delivered: int = 0
    ) -> bool:
        """Move the checkpoint forward; never backwards within one UIDVALIDITY.

        A different UIDVALIDITY replaces the checkpoint (the folder was rebuilt). Returns True
        when the stored checkpoint changed. Does nothing (False) for an unknown mailbox, so a
        delivery that finishes after ``/close`` cannot resurrect it.

        ``delivered``: also ``add_delivered(mailbox_id, delivered)``, in the same round trip,
        whether the checkpoint moved or not (a worker records the checkpoint and the count of
        the mail just accepted together). A counter that cannot be written never fails the
        checkpoint's write; a call repeated after a lost answer may count twice (cosmetic).
        """

    @abstractmethod
    async def publish_change(self, mailbox_id: str) -> None:
        """Tell every node's ownership loop that this mailbox was created, changed or removed.

        ``RESYNC`` ("*") instead of an id means "many changed: re-read everything" (bulk calls)."""

    @abstractmethod
    def changes(self) -> AbstractAsyncContextManager[AsyncIterator[str]]:
        """Subscribe to change notifications: ``async with store.changes() as ids: ...``.

        Only changes published after the subscription was entered are seen.
        """

    # -- the data set's identity (docs/reliability.md, "A store that lost its data") -------------

    @abstractmethod
    async def incarnation(self) -> str:
        """The id of the data set this store holds, created (random) when there is none.

        It stays the same for as long as the data does (a Redis restarted with its data, a
        reopened data directory) and changes when the data is gone (Redis restarted empty or
        flushed): a node that sees another id than the one it started with knows that every
        registration, checkpoint and lease was lost, not removed."""

    @abstractmethod
    async def restore_mailboxes(
        self, mailboxes: Sequence[MailboxConfig], checkpoints: Mapping[str, Mapping[str, Checkpoint]]
    ) -> list[str]:
        """Register each mailbox that is not registered, with the checkpoints given for its
        folders (``checkpoints[mailbox_id][folder]``), after the store lost its data.

        Never overwrites: a registered mailbox keeps its stored document. Checkpoints only move
        forward, as with ``reassert_checkpoints``: a folder without one gets the given checkpoint,
        a folder with one of the same UIDVALIDITY and a lower ``last_uid`` is advanced to it, any
        other is kept (so whichever of a restore and a worker's re-assertion comes first, the
        newer checkpoint wins). A folder without a history floor gets the checkpoint it ends up
        with as its floor (as with ``seed_checkpoint``). Atomic per mailbox at least: nobody sees
        a restored mailbox without the checkpoints it was restored with. Returns the ids this
        call registered."""

    @abstractmethod
    async def reassert_checkpoints(self, checkpoints: Mapping[str, Mapping[str, Checkpoint]]) -> int:
        """Put back checkpoints a worker wrote before the store lost its data
        (``checkpoints[mailbox_id][folder]``), whether the mailbox is registered (yet) or not.

        Only forward, per folder: set where the folder has none (its history floor too, where it
        has none), advanced where the stored one has the same UIDVALIDITY and a lower
        ``last_uid``; never moved back, and one of another UIDVALIDITY is never touched. Atomic
        per folder at least. Returns how many folders were set or advanced.

        Checkpoints of a mailbox nobody registers again stay as leftovers: ``remove_mailbox``
        deletes them, and a registration of that id resumes from them (as when Creatio's
        failover job re-creates a mailbox the store lost before its primary restored it)."""

    @abstractmethod
    async def get_checkpoints(self, mailbox_id: str) -> dict[str, Checkpoint]:
        """Every folder's checkpoint of one mailbox (for the admin API)."""

    async def get_checkpoints_of(self, mailbox_ids: Sequence[str]) -> dict[str, dict[str, Checkpoint]]:
        """``get_checkpoints`` for many mailboxes (adapters batch this into one round trip)."""
        return {mailbox_id: await self.get_checkpoints(mailbox_id) for mailbox_id in mailbox_ids}

    # -- nodes and leases ------------------------------------------------------------------------
    # Leases are named, exclusive and expire: a mailbox id names its ownership lease, and
    # "sync/<mailbox>/<folder>" names the lease a worker holds while it delivers that folder.

    @abstractmethod
    async def heartbeat(self, node: NodeInfo, ttl: float) -> None:
        """Announce that ``node`` is alive for the next ``ttl`` seconds."""

    @abstractmethod
    async def list_nodes(self) -> list[NodeInfo]:
        """Nodes whose heartbeat has not expired."""

    @abstractmethod
    async def remove_node(self, node_id: str) -> None:
        """Withdraw a node's heartbeat (clean shutdown), so the others rebalance at once."""

    @abstractmethod
    async def claim_leases(self, node_id: str, mailbox_ids: Sequence[str], ttl: float) -> list[str]:
        """Take the leases that nobody holds (or this node already holds); returns those now held."""

    @abstractmethod
    async def renew_leases(self, node_id: str, mailbox_ids: Sequence[str], ttl: float) -> list[str]:
        """Extend this node's leases and re-take those that expired with nobody taking them (this
        node was paused past the TTL); returns those now held. Only a lease another node holds
        is lost, and it is left untouched. Same step as ``claim_leases``, one atomic batch."""

    @abstractmethod
    async def claim_lease_and_read_folder(
        self, node_id: str, lease: str, mailbox_id: str, folder: str, ttl: float
    ) -> ClaimedFolder | None:
        """``claim_leases(node_id, [lease], ttl)`` and, when the lease is held, the mailbox and
        the folder's checkpoint as they are right after the claim, in one atomic step and one
        round trip (a worker starting to sync a folder). None when another node holds the lease
        (nothing is read). The checkpoint is None without a registered mailbox. When what it read
        is unreadable it gives the lease back and raises StoreError."""

    @abstractmethod
    async def release_leases(self, node_id: str, mailbox_ids: Sequence[str]) -> None:
        """Give up leases this node holds (others' leases are untouched)."""

    @abstractmethod
    async def lease_owners(self, mailbox_ids: Sequence[str]) -> dict[str, str | None]:
        """Current holder of each mailbox's lease (None when free)."""

    # -- history loads (/api/email/synchronize) --------------------------------------------------
    # The "history floor" of a folder is the checkpoint seeded when its subscription started
    # (seed_checkpoint records it in the same atomic step; advance_checkpoint replaces it when the
    # UIDVALIDITY changes). Live delivery covers UIDs above it, history loads UIDs at or below it.

    @abstractmethod
    async def get_history_floor(self, mailbox_id: str, folder: str) -> Checkpoint | None:
        """The folder's history floor (UIDVALIDITY and the last UID that predates live delivery)."""

    @abstractmethod
    async def mark_history_delivered(
        self, mailbox_id: str, folder: str, uidvalidity: int, uids: Iterable[int]
    ) -> None:
        """Record that a history load delivered these UIDs (nothing for an unknown mailbox)."""

    @abstractmethod
    async def history_delivered(self, mailbox_id: str, folder: str, uidvalidity: int) -> set[int]:
        """UIDs of the folder (within this UIDVALIDITY) that history loads delivered."""

    # -- webhook outboxes and dead letters (emlisten.sink.webhook, docs/webhooks.md) -----------
    # One outbox per receiver (``WebhookEvent.endpoint``), oldest first. The webhook sink adds
    # events (the checkpoint moves once they are in), one sender per endpoint sends them and
    # removes them; those whose retries run out move to the dead letters, which the API lists,
    # replays and drops. An event id is the event's identity across outbox and dead letters.
    # Stores that persist (Redis) keep both across restarts.

    @abstractmethod
    async def outbox_add(self, events: Sequence[WebhookEvent]) -> int:
        """Append the events to the end of their endpoints' outboxes, in the order given.

        An event whose id is already waiting in that outbox, or is in the dead letters, is
        skipped (a mail delivered twice is queued once). Atomic per call. Returns how many
        were added."""

    @abstractmethod
    async def outbox_endpoints(self) -> list[str]:
        """Endpoints whose outbox holds at least one event (senders to run after a restart)."""

    @abstractmethod
    async def outbox_peek(self, endpoint: str, limit: int) -> list[WebhookEvent]:
        """Up to ``limit`` events of the endpoint's outbox, oldest first (not removed); their
        ``attempts``, ``next_attempt_at`` and ``last_error`` as last recorded."""

    @abstractmethod
    async def outbox_count(self, endpoint: str) -> int:
        """How many events wait in the endpoint's outbox."""

    @abstractmethod
    async def outbox_retry(self, event: WebhookEvent) -> bool:
        """Record a failed attempt: store ``attempts``, ``next_attempt_at`` and ``last_error``
        of the waiting event (its place in the outbox is kept). False if it no longer waits."""

    @abstractmethod
    async def outbox_done(self, endpoint: str, event_id: str) -> bool:
        """Remove a delivered event from the outbox. False if it was not there."""

    @abstractmethod
    async def outbox_dead_letter(self, event: WebhookEvent) -> bool:
        """Move the waiting event to the dead letters, atomically, with the ``attempts``,
        ``last_error`` and ``dead_at`` given. False (nothing changed) if it no longer waits."""

    @abstractmethod
    async def list_dead_letters(self, *, offset: int = 0, limit: int = 100) -> tuple[int, list[WebhookEvent]]:
        """How many dead letters there are, and ``limit`` of them from ``offset``, oldest
        ``dead_at`` first."""

    @abstractmethod
    async def get_dead_letter(self, event_id: str) -> WebhookEvent | None: ...

    @abstractmethod
    async def drop_dead_letter(self, event_id: str) -> bool:
        """Forget a dead letter for good. False if there was none with this id."""

    @abstractmethod
    async def replay_dead_letter(self, event_id: str) -> WebhookEvent | None:
        """Move a dead letter back to the end of its endpoint's outbox, atomically, with
        ``attempts`` 0, ``next_attempt_at`` 0, ``dead_at`` 0 and ``last_error`` kept. Returns the
        event as queued, or None when there is no such dead letter (or another replay took it)."""

    async def ping(self) -> None:  # noqa: B027 - optional hook, default: always reachable
        """Raise StoreError when the store cannot be reached."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class TaskDelivery(ABC):
    """One task handed to a consumer; it must be acked or nacked exactly once.

    Once the consumer has gone away (its ``consume`` context exited, or the broker connection
    dropped) the task is redelivered to someone else, and settling it is a silent no-op.
    """

    task: SyncTask

    @abstractmethod
    async def ack(self) -> None: ...

    @abstractmethod
    async def nack(self, *, requeue: bool = True) -> None:
        """Give the task back (``requeue``) or dead-letter it."""


class TaskQueue(ABC):
    """Spreads sync tasks over workers. At-least-once: an unacked task is redelivered."""

    name: str = "queue"

    @abstractmethod
    async def publish(self, task: SyncTask) -> None:
        """Returns once the queue has taken responsibility for the task."""

    @abstractmethod
    def consume(self, *, prefetch: int) -> AbstractAsyncContextManager[AsyncIterator[TaskDelivery]]:
        """``async with queue.consume(prefetch=n) as deliveries: async for d in deliveries``.

        At most ``prefetch`` deliveries are outstanding (unacked) per consumer.
        """

    @abstractmethod
    async def dead_letters(self) -> list[SyncTask]:
        """Tasks that were nacked without requeue (for inspection)."""

    async def ping(self) -> None:  # noqa: B027 - optional hook
        """Raise QueueError when the queue cannot be reached."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


#: Called by a listener when the server reports new mail (or after a (re)connect, for catch-up).
NewMailCallback = Callable[[SyncTask], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Prefetch:
    """Asks a listener to fetch new mail on the session it listens on, and attach it to the task.

    The listening session is already logged in and has the folder selected: fetching there costs
    no second connection, TLS handshake, login or SELECT. Messages larger than
    ``max_message_bytes``, and more than ``max_messages`` at once, are left to a reader.
    """

    max_message_bytes: int
    max_messages: int
    #: The folder's stored checkpoint (None: a new subscription), read once per (re)connect so
    #: that the catch-up of a few mails is fetched on the listening session too.
    checkpoint: Callable[[str], Awaitable[Checkpoint | None]]


class MailReader(ABC):
    """An authenticated session used to read new messages, folder by folder."""

    @abstractmethod
    async def current_position(self, folder: str) -> Checkpoint:
        """The checkpoint meaning "everything up to now" (where a new subscription starts)."""

    @abstractmethod
    async def fetch_new(
        self, folder: str, checkpoint: Checkpoint, *, limit: int
    ) -> tuple[list[RawMessage], Checkpoint]:
        """Up to ``limit`` messages after ``checkpoint``, oldest first, and the checkpoint just
        past them. No messages and the same checkpoint: nothing new. No messages and another
        checkpoint: move on without delivering (e.g. vanished messages, a rebuilt folder).
        Messages are read without marking them seen."""

    @abstractmethod
    async def aclose(self) -> None: ...


class MailSource(ABC):
    """A protocol family (IMAP, EWS, Graph): listens to folders and opens readers."""

    @abstractmethod
    async def listen(
        self,
        mailbox: MailboxConfig,
        folder: str,
        on_new_mail: NewMailCallback,
        *,
        prefetch: Prefetch | None = None,
        task_status: trio.TaskStatus[FolderInfo] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Hold one live subscription to ``folder`` until cancelled or the connection fails.

        Calls ``task_status.started(info)`` once the subscription is really live (IMAP: in IDLE),
        and ``on_new_mail`` whenever the server reports new messages. Raises a MailSourceError
        subclass on failure; the caller reconnects. ``prefetch``: fetch new mail on the listening
        session where the protocol can (sources that cannot ignore it).
        """

    @abstractmethod
    def open_reader(self, mailbox: MailboxConfig) -> AbstractAsyncContextManager[MailReader]: ...


class Sink(ABC):
    """Where mail goes (Creatio's callbacks, or a generic webhook)."""

    @abstractmethod
    async def deliver(self, mailbox: MailboxConfig, emails: Sequence[Email], *, idempotency_key: str) -> None:
        """Deliver a batch; returns only when the receiver accepted it (2xx).

        Raises DeliveryError otherwise. ``idempotency_key`` is stable for the same batch of mail.
        """

    @abstractmethod
    async def notify_new_ids(self, mailbox: MailboxConfig, ids: Sequence[str]) -> None:
        """Announce ids only (Creatio's ``NewEmail``, for ``UseFullEmail=false``)."""

    @abstractmethod
    async def report_state(
        self, mailbox: MailboxConfig, *, available: bool, error_class: str = "", message: str = ""
    ) -> None:
        """Tell the receiver whether the mailbox works (Creatio's ``ProcessMailboxState``)."""

    @abstractmethod
    async def request_token_refresh(self, mailbox: MailboxConfig) -> None:
        """Ask the receiver for a new OAuth token (Creatio's ``RefreshToken``); it arrives later
        through ``/api/listeners/update``."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


__all__ = [
    "ClaimedFolder",
    "MailReader",
    "MailSource",
    "NewMailCallback",
    "Prefetch",
    "Sink",
    "Store",
    "TaskDelivery",
    "TaskQueue",
]
