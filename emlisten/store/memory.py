"""In-memory Store: the single-process development mode. Real and complete, not a test fake;
state is lost when the process exits (say so at start-up)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager

import trio

from emlisten.abc import ClaimedFolder, Store
from emlisten.models import Checkpoint, MailboxConfig, MailboxState, MailboxStatus, NodeInfo, WebhookEvent


class _FolderMap(dict[tuple[str, str], Checkpoint]):
    """Checkpoints (or history floors) by (mailbox id, folder) that also know each mailbox's
    folders: reading or dropping one mailbox's entries must not walk every mailbox's (at 10,000
    mailboxes the checkpoint refresh walked 10,000 x 10,000 entries with no await between and
    stalled the event loop for 7 s every 30 s). Writes go through ``[]=``, ``del`` and
    ``setdefault`` only."""

    def __init__(self) -> None:
        super().__init__()
        self._folders: dict[str, dict[str, None]] = {}  # an ordered set per mailbox

    def __setitem__(self, key: tuple[str, str], value: Checkpoint) -> None:
        super().__setitem__(key, value)
        self._folders.setdefault(key[0], {})[key[1]] = None

    def __delitem__(self, key: tuple[str, str]) -> None:
        super().__delitem__(key)
        folders = self._folders.get(key[0])
        if folders is not None:
            folders.pop(key[1], None)
            if not folders:
                del self._folders[key[0]]

    def setdefault(self, key: tuple[str, str], default: Checkpoint) -> Checkpoint:  # type: ignore[override]
        if key not in self:
            self[key] = default
        return self[key]

    def of(self, mailbox_id: str) -> dict[str, Checkpoint]:
        """The mailbox's entries by folder."""
        return {folder: self[(mailbox_id, folder)] for folder in self._folders.get(mailbox_id, ())}

    def drop(self, mailbox_id: str) -> None:
        """Forget the mailbox's entries."""
        for folder in list(self._folders.get(mailbox_id, ())):
            del self[(mailbox_id, folder)]


#: Leases renewed per step (MemoryStore.renew_leases).
_RENEW_SLICE = 1000


class MemoryStore(Store):
    name = "memory"

    def __init__(self) -> None:
        self._mailboxes: dict[str, MailboxConfig] = {}
        self._statuses: dict[str, MailboxStatus] = {}
        self._checkpoints = _FolderMap()
        self._subscribers: set[trio.MemorySendChannel[str]] = set()
        # Expiry times are wall-clock (time.time()), as Redis TTLs are.
        self._nodes: dict[str, tuple[NodeInfo, float]] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        # History loads: per (mailbox, folder) the floor, per (mailbox, folder, uidvalidity) the
        # UIDs delivered by history loads.
        self._floors = _FolderMap()
        self._history: dict[tuple[str, str, int], set[int]] = {}
        # Webhook outboxes (endpoint -> event id -> event, in insertion order) and dead letters
        # (event id -> event). Copies go in and out, so callers cannot change what is stored.
        self._outboxes: dict[str, dict[str, WebhookEvent]] = {}
        self._dead: dict[str, WebhookEvent] = {}
        #: The data set lives as long as this object: one id for its whole life.
        self._incarnation = str(uuid.uuid4())

    async def put_mailbox(self, mailbox: MailboxConfig) -> None:
        self._mailboxes[mailbox.id] = mailbox

    async def get_mailbox(self, mailbox_id: str) -> MailboxConfig | None:
        return self._mailboxes.get(mailbox_id)

    async def remove_mailbox(self, mailbox_id: str) -> bool:
        existed = self._mailboxes.pop(mailbox_id, None) is not None
        self._leases.pop(mailbox_id, None)
        self._checkpoints.drop(mailbox_id)
        self._floors.drop(mailbox_id)
        for history_key in [k for k in self._history if k[0] == mailbox_id]:
            del self._history[history_key]
        previous = self._statuses.get(mailbox_id)
        self._statuses[mailbox_id] = MailboxStatus(
            MailboxState.CLOSED, delivered=previous.delivered if previous else 0
        )
        return existed

    async def list_mailbox_ids(self) -> list[str]:
        return list(self._mailboxes)

    async def existing(self, mailbox_ids: Iterable[str]) -> set[str]:
        return {mid for mid in mailbox_ids if mid in self._mailboxes}

    async def set_status(self, mailbox_id: str, status: MailboxStatus) -> None:
        previous = self._statuses.get(mailbox_id)
        self._statuses[mailbox_id] = dataclasses.replace(
            status, delivered=previous.delivered if previous else 0
        )

    async def state_counts(self) -> tuple[int, dict[str, int]]:
        counts: dict[MailboxState, int] = {}
        statuses = self._statuses
        for mailbox_id in self._mailboxes:
            status = statuses.get(mailbox_id)
            state = status.state if status is not None else MailboxState.STARTING
            counts[state] = counts.get(state, 0) + 1
        return len(self._mailboxes), {state.value: count for state, count in counts.items()}

    async def get_statuses(self, mailbox_ids: Iterable[str]) -> dict[str, MailboxStatus | None]:
        return {mid: self._statuses.get(mid) for mid in mailbox_ids}

    async def add_delivered(self, mailbox_id: str, count: int) -> None:
        self._count_delivered(mailbox_id, count)

    def _count_delivered(self, mailbox_id: str, count: int) -> bool:
        """``add_delivered`` (no await). Whether there was a status to count in."""
        status = self._statuses.get(mailbox_id)
        if status is None:
            return False
        status.delivered += count
        return True

    async def get_checkpoint(self, mailbox_id: str, folder: str) -> Checkpoint | None:
        return self._checkpoints.get((mailbox_id, folder))

    async def seed_checkpoint(self, mailbox_id: str, folder: str, checkpoint: Checkpoint) -> bool:
        if mailbox_id not in self._mailboxes or (mailbox_id, folder) in self._checkpoints:
            return False
        self._checkpoints[(mailbox_id, folder)] = checkpoint
        self._floors.setdefault((mailbox_id, folder), checkpoint)
        return True

    async def advance_checkpoint(
        self, mailbox_id: str, folder: str, checkpoint: Checkpoint, *, delivered: int = 0
    ) -> bool:
        if delivered:
            self._count_delivered(mailbox_id, delivered)
        return self._advance(mailbox_id, folder, checkpoint)

    def _advance(self, mailbox_id: str, folder: str, checkpoint: Checkpoint) -> bool:
        """``advance_checkpoint`` without the count (no await: atomic)."""
        if mailbox_id not in self._mailboxes:
            return False
        key = (mailbox_id, folder)
        current = self._checkpoints.get(key)
        if (
            current is not None
            and current.uidvalidity == checkpoint.uidvalidity
            and current.last_uid >= checkpoint.last_uid
        ):
            return False
        if current is None:
            self._floors.setdefault(key, checkpoint)
        elif current.uidvalidity != checkpoint.uidvalidity:
            # The folder was rebuilt: live delivery restarts at its current end, so that is
            # where history starts now.
            self._floors[key] = checkpoint
        self._checkpoints[key] = checkpoint
        return True

    async def incarnation(self) -> str:
        return self._incarnation

    async def restore_mailboxes(
        self, mailboxes: Sequence[MailboxConfig], checkpoints: Mapping[str, Mapping[str, Checkpoint]]
    ) -> list[str]:
        return [
            mailbox.id for mailbox in mailboxes if self._restore(mailbox, checkpoints.get(mailbox.id, {}))[0]
        ]

    def _restore(
        self, mailbox: MailboxConfig, checkpoints: Mapping[str, Checkpoint]
    ) -> tuple[bool, list[tuple[str, str]]]:
        """One mailbox of ``restore_mailboxes`` (no await: atomic). Whether it was registered,
        and the (mailbox, folder) keys whose checkpoint and floor it set."""
        registered = mailbox.id not in self._mailboxes
        if registered:
            self._mailboxes[mailbox.id] = mailbox
        set_keys = [
            (mailbox.id, folder)
            for folder, checkpoint in checkpoints.items()
            if self._forward((mailbox.id, folder), checkpoint)
        ]
        return registered, set_keys

    def _forward(self, key: tuple[str, str], checkpoint: Checkpoint) -> bool:
        """Set the checkpoint where there is none, advance it within the same UIDVALIDITY, leave
        any other alone; the floor is set where there is none. Whether it changed (no await)."""
        current = self._checkpoints.get(key)
        if current is not None and (
            current.uidvalidity != checkpoint.uidvalidity or current.last_uid >= checkpoint.last_uid
        ):
            return False
        self._checkpoints[key] = checkpoint
        self._floors.setdefault(key, checkpoint)
        return True

    async def reassert_checkpoints(self, checkpoints: Mapping[str, Mapping[str, Checkpoint]]) -> int:
        return len(self._reassert(checkpoints))

    def _reassert(self, checkpoints: Mapping[str, Mapping[str, Checkpoint]]) -> list[tuple[str, str]]:
        """``reassert_checkpoints`` (no await: atomic): the (mailbox, folder) keys it changed."""
        return [
            (mailbox_id, folder)
            for mailbox_id, folders in checkpoints.items()
            for folder, checkpoint in folders.items()
            if self._forward((mailbox_id, folder), checkpoint)
        ]

    async def get_checkpoints(self, mailbox_id: str) -> dict[str, Checkpoint]:
        return self._checkpoints.of(mailbox_id)

    async def get_checkpoints_of(self, mailbox_ids: Sequence[str]) -> dict[str, dict[str, Checkpoint]]:
        return {mailbox_id: self._checkpoints.of(mailbox_id) for mailbox_id in mailbox_ids}

    async def get_history_floor(self, mailbox_id: str, folder: str) -> Checkpoint | None:
        return self._floors.get((mailbox_id, folder))

    async def mark_history_delivered(
        self, mailbox_id: str, folder: str, uidvalidity: int, uids: Iterable[int]
    ) -> None:
        if mailbox_id not in self._mailboxes:
            return
        self._history.setdefault((mailbox_id, folder, uidvalidity), set()).update(uids)

    async def history_delivered(self, mailbox_id: str, folder: str, uidvalidity: int) -> set[int]:
        return set(self._history.get((mailbox_id, folder, uidvalidity), ()))

    # -- webhook outboxes and dead letters --------------------------------------------------------

    async def outbox_add(self, events: Sequence[WebhookEvent]) -> int:
        added = 0
        for event in events:
            outbox = self._outboxes.setdefault(event.endpoint, {})
            if event.id in outbox or event.id in self._dead:
                continue
            outbox[event.id] = dataclasses.replace(event)
            added += 1
        return added

    async def outbox_endpoints(self) -> list[str]:
        return [endpoint for endpoint, outbox in self._outboxes.items() if outbox]

    async def outbox_peek(self, endpoint: str, limit: int) -> list[WebhookEvent]:
        outbox = self._outboxes.get(endpoint, {})
        return [dataclasses.replace(event) for event in itertools.islice(outbox.values(), max(0, limit))]

    async def outbox_count(self, endpoint: str) -> int:
        return len(self._outboxes.get(endpoint, {}))

    async def outbox_retry(self, event: WebhookEvent) -> bool:
        waiting = self._outboxes.get(event.endpoint, {}).get(event.id)
        if waiting is None:
            return False
        waiting.attempts = event.attempts
        waiting.next_attempt_at = event.next_attempt_at
        waiting.last_error = event.last_error
        return True

    async def outbox_done(self, endpoint: str, event_id: str) -> bool:
        outbox = self._outboxes.get(endpoint)
        if outbox is None or outbox.pop(event_id, None) is None:
            return False
        if not outbox:
            del self._outboxes[endpoint]
        return True

    async def outbox_dead_letter(self, event: WebhookEvent) -> bool:
        if not await self.outbox_done(event.endpoint, event.id):
            return False
        self._dead[event.id] = dataclasses.replace(event)
        return True

    async def list_dead_letters(self, *, offset: int = 0, limit: int = 100) -> tuple[int, list[WebhookEvent]]:
        ordered = sorted(self._dead.values(), key=lambda event: event.dead_at)
        page = ordered[max(0, offset) : max(0, offset) + max(0, limit)]
        return len(ordered), [dataclasses.replace(event) for event in page]

    async def get_dead_letter(self, event_id: str) -> WebhookEvent | None:
        event = self._dead.get(event_id)
        return None if event is None else dataclasses.replace(event)

    async def drop_dead_letter(self, event_id: str) -> bool:
        return self._dead.pop(event_id, None) is not None

    async def replay_dead_letter(self, event_id: str) -> WebhookEvent | None:
        event = self._dead.pop(event_id, None)
        if event is None:
            return None
        queued = dataclasses.replace(event, attempts=0, next_attempt_at=0.0, dead_at=0.0)
        outbox = self._outboxes.setdefault(event.endpoint, {})
        outbox.setdefault(event_id, dataclasses.replace(queued))
        return queued

    async def heartbeat(self, node: NodeInfo, ttl: float) -> None:
        self._nodes[node.id] = (node, time.time() + ttl)

    async def list_nodes(self) -> list[NodeInfo]:
        now = time.time()
        return [node for node, expires in self._nodes.values() if expires > now]

    async def remove_node(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)

    def _holder(self, mailbox_id: str, now: float) -> str | None:
        lease = self._leases.get(mailbox_id)
        return lease[0] if lease is not None and lease[1] > now else None

    async def claim_leases(self, node_id: str, mailbox_ids: Sequence[str], ttl: float) -> list[str]:
        return self._claim(node_id, mailbox_ids, ttl)

    def _claim(self, node_id: str, mailbox_ids: Sequence[str], ttl: float) -> list[str]:
        """``claim_leases`` (no await: atomic)."""
        now = time.time()
        leases, held = self._leases, []
        # One tuple for the batch, not one per lease: a node renews all of its leases every
        # lease_renew_seconds, 10,000 of them at the scale we design for.
        lease = (node_id, now + ttl)
        for mailbox_id in mailbox_ids:
            if self._holder(mailbox_id, now) in (None, node_id):
                leases[mailbox_id] = lease
                held.append(mailbox_id)
        return held

    async def claim_lease_and_read_folder(
        self, node_id: str, lease: str, mailbox_id: str, folder: str, ttl: float
    ) -> ClaimedFolder | None:
        # No await between the claim and the reads: one step, as in the other adapters.
        if not self._claim(node_id, [lease], ttl):
            return None
        mailbox = self._mailboxes.get(mailbox_id)
        checkpoint = self._checkpoints.get((mailbox_id, folder)) if mailbox is not None else None
        return ClaimedFolder(mailbox, checkpoint)

    async def renew_leases(self, node_id: str, mailbox_ids: Sequence[str], ttl: float) -> list[str]:
        # Ours or free (expired while this node was paused): the same step as a claim, in slices
        # with a checkpoint between them. A node renews all of its leases every renewal period,
        # and 10,000 in one step held the event loop 4-14 ms, which any mail arriving waited out.
        held: list[str] = []
        for start in range(0, len(mailbox_ids), _RENEW_SLICE):
            if start:
                await trio.lowlevel.checkpoint()
            held += self._claim(node_id, mailbox_ids[start : start + _RENEW_SLICE], ttl)
        return held

    async def release_leases(self, node_id: str, mailbox_ids: Sequence[str]) -> None:
        now = time.time()
        for mailbox_id in mailbox_ids:
            if self._holder(mailbox_id, now) == node_id:
                del self._leases[mailbox_id]

    async def lease_owners(self, mailbox_ids: Sequence[str]) -> dict[str, str | None]:
        now = time.time()
        return {mailbox_id: self._holder(mailbox_id, now) for mailbox_id in mailbox_ids}

    async def publish_change(self, mailbox_id: str) -> None:
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(mailbox_id)
            except trio.ClosedResourceError:
                self._subscribers.discard(channel)

    @asynccontextmanager
    async def changes(self) -> AsyncIterator[AsyncIterator[str]]:
        # Unbounded: publishers (API requests) must never block on a slow subscriber, and the
        # only subscriber is this process's own ownership loop, which drains it promptly.
        send, receive = trio.open_memory_channel[str](math.inf)
        self._subscribers.add(send)
        try:
            yield receive.__aiter__()
        finally:
            self._subscribers.discard(send)
            send.close()
            receive.close()
