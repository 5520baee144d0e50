"""The console's mailbox list: paged, filtered and sorted on the server, fast at 10,000 mailboxes.

Registrations are encrypted at rest (Redis), and reading 10,000 states costs more than the
console's budget once the store is busy. So the list is chosen and ordered from a snapshot of
every mailbox's summary (no secrets: id, address, protocol, server, folders, where its mail goes)
and state, at most ``max_age`` seconds old and taken again in the background; the 50 rows shown
are then read fresh (their states and lease owners). Summaries are kept between snapshots: new
ids are read at once, and a changed registration (a new address or server) shows within
``refresh_seconds``, as the stalest summaries are re-read a batch at a time.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from emlisten.abc import Store
from emlisten.api.v1_mailboxes import redact_url
from emlisten.errors import StoreError
from emlisten.metrics import Activity
from emlisten.models import MailboxConfig, MailboxState, MailboxStatus

__all__ = ["MAX_PAGE", "SORTS", "MailboxDirectory", "MailboxSummary", "summarise"]

MAX_PAGE = 500
SORTS = ("email", "state", "since")
#: Failing first, then on the way, then healthy.
_STATE_ORDER = {
    MailboxState.AUTHENTICATION_ERROR.value: 0,
    MailboxState.CONNECT_ERROR.value: 1,
    MailboxState.STARTING.value: 2,
    MailboxState.CONNECTING.value: 3,
    MailboxState.LISTENING.value: 4,
    MailboxState.CLOSED.value: 5,
}
log = logging.getLogger(__name__)

_READ_CHUNK = 1000
_STARTING = MailboxState.STARTING.value
#: A snapshot older than this is taken again before answering (nobody asked for a while).
_WAIT_PAST_SECONDS = 30.0
#: Snapshots are at least this many times their own cost apart (at most 1/5 of the node's time).
_REFRESH_DUTY = 5.0


@dataclass(frozen=True, slots=True)
class MailboxSummary:
    id: str
    email: str
    protocol: str
    server: str
    folders: tuple[str, ...]
    #: "webhook" (registered through /v1) or "creatio".
    sink: str
    webhook_url: str
    #: Lower-cased text the filter searches (id, address, server).
    haystack: str


def summarise(config: MailboxConfig) -> MailboxSummary:
    email = config.sender_email or config.user_name
    server = f"{config.imap.host}:{config.imap.port}"
    return MailboxSummary(
        id=config.id,
        email=email,
        protocol=config.protocol,
        server=server,
        folders=tuple(config.folders),
        sink="webhook" if config.webhook is not None else "creatio",
        webhook_url=redact_url(config.webhook.url) if config.webhook is not None else "",
        haystack=f"{config.id}\n{email}\n{server}".lower(),
    )


@dataclass(frozen=True, slots=True)
class _Snapshot:
    taken_at: float  # time.monotonic()
    #: Every registered mailbox, sorted by address.
    by_email: list[MailboxSummary]
    statuses: Mapping[str, MailboxStatus | None]
    states: Mapping[str, str]
    #: Mailboxes per state, over all of them.
    counts: dict[str, int]


class MailboxDirectory:
    """Answers the console's list from a snapshot of every mailbox's summary and state, taken
    again in the background when it is older than ``max_age`` seconds, or five times what the
    last one took when the store is slow (a request waits for it only when there is none, or it
    is older than 30 s). The rows of the page are read fresh."""

    def __init__(
        self,
        store: Store,
        *,
        max_age: float = 2.0,
        refresh_seconds: float = 30.0,
        refresh_batch: int = 500,
    ) -> None:
        self.store = store
        self.max_age = max_age
        self.refresh_seconds = refresh_seconds
        self.refresh_batch = refresh_batch
        self._summaries: dict[str, MailboxSummary] = {}
        self._read_at: dict[str, float] = {}
        self._snapshot: _Snapshot | None = None
        #: How long the last snapshot took: a busy store is asked less often.
        self.last_refresh_seconds = 0.0
        self._lock = trio.Lock()

    async def summaries(self) -> dict[str, MailboxSummary]:
        """Every registered mailbox's summary (ids in the store's order)."""
        ids = await self.store.list_mailbox_ids()
        present = set(ids)
        for gone in [mailbox_id for mailbox_id in self._summaries if mailbox_id not in present]:
            del self._summaries[gone]
            del self._read_at[gone]
        now = time.monotonic()
        to_read = [mailbox_id for mailbox_id in ids if mailbox_id not in self._summaries]
        stale = sorted(
            (at, mailbox_id) for mailbox_id, at in self._read_at.items() if at < now - self.refresh_seconds
        )
        to_read += [mailbox_id for _, mailbox_id in stale[: self.refresh_batch]]
        for start in range(0, len(to_read), _READ_CHUNK):
            chunk = to_read[start : start + _READ_CHUNK]
            configs = await self.store.get_mailboxes(chunk)
            for mailbox_id in chunk:
                config = configs.get(mailbox_id)
                if config is None:  # closed meanwhile
                    self._summaries.pop(mailbox_id, None)
                    self._read_at.pop(mailbox_id, None)
                    continue
                self._summaries[mailbox_id] = summarise(config)
                self._read_at[mailbox_id] = now
        known = self._summaries
        return {mailbox_id: known[mailbox_id] for mailbox_id in ids if mailbox_id in known}

    async def refresh(self) -> None:
        """Take a new snapshot (one at a time; a caller that waited for another's is done)."""
        requested_at = time.monotonic()
        async with self._lock:
            if self._snapshot is not None and self._snapshot.taken_at >= requested_at:
                return
            taken_at = time.monotonic()
            summaries = await self.summaries()
            ids = list(summaries)
            statuses: dict[str, MailboxStatus | None] = {}
            # In chunks: requests are answered between them, not after all 10,000.
            for start in range(0, len(ids), _READ_CHUNK):
                statuses.update(await self.store.get_statuses(ids[start : start + _READ_CHUNK]))
                await trio.lowlevel.checkpoint()
            by_email = sorted(summaries.values(), key=lambda s: (s.email.lower(), s.id))
            states = {mailbox_id: _state(status) for mailbox_id, status in statuses.items()}
            self._snapshot = _Snapshot(taken_at, by_email, statuses, states, dict(Counter(states.values())))
            self.last_refresh_seconds = time.monotonic() - taken_at

    async def _refresh_in_background(self) -> None:
        try:
            await self.refresh()
        except StoreError as exc:  # the next request tries again (and waits, past 30 s)
            log.warning("console: cannot read the mailboxes for the list: %s", exc)

    @property
    def refreshing(self) -> bool:
        return self._lock.locked()

    async def _current(
        self, refresh_later: Callable[[Callable[[], Awaitable[None]]], None] | None
    ) -> _Snapshot:
        age = math.inf if self._snapshot is None else time.monotonic() - self._snapshot.taken_at
        if age > _WAIT_PAST_SECONDS or refresh_later is None:
            # The first request, or the first after a quiet spell: too old to show even once.
            await self.refresh()
        elif age > max(self.max_age, _REFRESH_DUTY * self.last_refresh_seconds) and not self.refreshing:
            refresh_later(self._refresh_in_background)
        assert self._snapshot is not None
        return self._snapshot

    async def totals(
        self, refresh_later: Callable[[Callable[[], Awaitable[None]]], None] | None = None
    ) -> tuple[int, dict[str, int]]:
        """How many mailboxes are registered, and how many are in each state (from the snapshot:
        ``Store.state_counts`` reads every state, too much to do every 2 s at 10,000)."""
        snapshot = await self._current(refresh_later)
        return len(snapshot.by_email), dict(snapshot.counts)

    async def page(
        self,
        activity: Activity,
        *,
        query: str = "",
        state: str = "",
        protocol: str = "",
        sort: str = "email",
        offset: int = 0,
        limit: int = 50,
        refresh_later: Callable[[Callable[[], Awaitable[None]]], None] | None = None,
    ) -> dict[str, Any]:
        """One page of the list. ``counts`` are per state over the mailboxes that match
        ``query`` and ``protocol`` (the state filter aside), so the console can show them all.
        ``refresh_later(refresh)`` runs a refresh of a stale snapshot after the answer."""

        snapshot = await self._current(refresh_later)
        statuses, states = snapshot.statuses, snapshot.states
        needle = query.strip().lower()
        if needle or protocol:
            matching = [
                s
                for s in snapshot.by_email
                if (not needle or needle in s.haystack) and (not protocol or s.protocol == protocol)
            ]
            counts = dict(Counter(states.get(s.id, _STARTING) for s in matching))
        else:
            matching, counts = snapshot.by_email, snapshot.counts
        if state:
            matching = [s for s in matching if states.get(s.id, _STARTING) == state]
        if sort != "email":
            matching = sorted(matching, key=_sort_key(sort, statuses))
        rows = matching[offset : offset + limit]
        # What the page shows is read now: the snapshot only chose and ordered the rows.
        fresh = await self.store.get_statuses([s.id for s in rows])
        owners = await self.store.lease_owners([s.id for s in rows])
        return {
            "registered": len(snapshot.by_email),
            "total": len(matching),
            "offset": offset,
            "limit": limit,
            "counts": counts,
            "as_of_seconds": round(time.monotonic() - snapshot.taken_at, 3),
            "items": [
                row(s, fresh.get(s.id), owners.get(s.id), activity.events.last_delivery.get(s.id))
                for s in rows
            ],
        }


def _state(status: MailboxStatus | None) -> str:
    return status.state.value if status is not None else MailboxState.STARTING.value


def _sort_key(sort: str, statuses: Mapping[str, MailboxStatus | None]) -> Any:
    if sort == "state":
        return lambda s: (_STATE_ORDER.get(_state(statuses.get(s.id)), 9), s.email.lower(), s.id)
    if sort == "since":  # the latest state change first
        return lambda s: (-((statuses.get(s.id) or MailboxStatus(MailboxState.STARTING)).updated_at), s.id)
    return lambda s: (s.email.lower(), s.id)


def row(
    summary: MailboxSummary,
    status: MailboxStatus | None,
    owner: str | None,
    last_mail_at: float | None,
) -> dict[str, Any]:
    return {
        "id": summary.id,
        "email": summary.email,
        "protocol": summary.protocol,
        "server": summary.server,
        "sink": summary.sink,
        "state": _state(status),
        "state_since": status.updated_at if status is not None and status.updated_at else None,
        "last_error": status.last_error if status is not None else None,
        "delivered": status.delivered if status is not None else 0,
        "node": owner or (status.node if status is not None else None),
        "last_mail_at": last_mail_at,
    }


def folders_of(summary: MailboxSummary, checkpoints: Mapping[str, Any]) -> Sequence[dict[str, Any]]:
    return [
        {
            "name": folder,
            "uidvalidity": cp.uidvalidity if cp else None,
            "last_uid": cp.last_uid if cp else None,
        }
        for folder in summary.folders
        for cp in [checkpoints.get(folder)]
    ]
