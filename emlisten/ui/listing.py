"""The console's mailbox list: paged, filtered and sorted on the server, fast at 10,000 mailboxes.

Registrations are encrypted at rest (Redis): decrypting all of them on every poll would cost more
than the console's budget. The directory keeps a summary of each (no secrets: id, address,
protocol, server, folders, where its mail goes) and per request reads only the id list, the
states (one batched read) and, for the rows of the page, the lease owners. New ids are read at
once; a changed registration (a new address or server) shows within ``refresh_seconds``, as the
stalest summaries are re-read a batch at a time.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from emlisten.abc import Store
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
_READ_CHUNK = 1000


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
        webhook_url=_without_secrets(config.webhook.url) if config.webhook is not None else "",
        haystack=f"{config.id}\n{email}\n{server}".lower(),
    )


def _without_secrets(url: str) -> str:
    """Scheme, host and path only: a receiver URL may carry a token in its query or userinfo."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return urlunsplit((parts.scheme, host + port, parts.path, "", ""))


class MailboxDirectory:
    def __init__(self, store: Store, *, refresh_seconds: float = 30.0, refresh_batch: int = 500) -> None:
        self.store = store
        self.refresh_seconds = refresh_seconds
        self.refresh_batch = refresh_batch
        self._summaries: dict[str, MailboxSummary] = {}
        self._read_at: dict[str, float] = {}

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
    ) -> dict[str, Any]:
        """One page of the list. ``counts`` are per state over the mailboxes that match
        ``query`` and ``protocol`` (the state filter aside), so the console can show them all."""

        summaries = await self.summaries()
        needle = query.strip().lower()
        matching = [
            s
            for s in summaries.values()
            if (not needle or needle in s.haystack) and (not protocol or s.protocol == protocol)
        ]
        statuses = await self.store.get_statuses([s.id for s in matching])
        counts: dict[str, int] = {}
        for s in matching:
            state_of = _state(statuses.get(s.id))
            counts[state_of] = counts.get(state_of, 0) + 1
        if state:
            matching = [s for s in matching if _state(statuses.get(s.id)) == state]
        matching.sort(key=_sort_key(sort, statuses))
        rows = matching[offset : offset + limit]
        owners = await self.store.lease_owners([s.id for s in rows])
        return {
            "registered": len(summaries),
            "total": len(matching),
            "offset": offset,
            "limit": limit,
            "counts": counts,
            "items": [
                row(s, statuses.get(s.id), owners.get(s.id), activity.events.last_delivery.get(s.id))
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
