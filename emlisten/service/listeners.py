"""ListenerControl over the Store: what the Creatio API calls do, on any node and any role.

The API only writes the registry and publishes a change; the ownership loop of whichever node
owns the mailbox reacts to it. So a request can land on any node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from emlisten import __version__
from emlisten.abc import RESYNC, Store, TaskQueue
from emlisten.errors import QueueError, StoreError
from emlisten.models import MailboxConfig, MailboxState, MailboxStatus

log = logging.getLogger(__name__)

#: Above this many mailboxes in one call, nodes get one "re-read everything" instead of N changes.
_BULK = 50


def same_source(a: MailboxConfig, b: MailboxConfig) -> bool:
    """Whether two registrations read the same mail: same protocol, server and user. A mailbox
    registered again with the same source resumes from its checkpoints (docs/architecture.md)."""
    return (
        a.protocol == b.protocol
        and a.imap.host.casefold() == b.imap.host.casefold()
        and a.imap.port == b.imap.port
        and a.service_url.casefold() == b.service_url.casefold()
        and a.user_name.casefold() == b.user_name.casefold()
    )


class StoreListenerControl:
    """Implements both ListenerControl (Creatio's API) and AdminView (the native API)."""

    def __init__(
        self,
        store: Store,
        queue: TaskQueue | None = None,
        *,
        node_id: str,
        role: str,
        extra_status: Callable[[], dict[str, Any]] | None = None,
        history: Callable[[str], dict[str, Any] | None] | None = None,
    ) -> None:
        self.store = store
        self.queue = queue
        self.node_id = node_id
        self.role = role
        self._extra_status = extra_status
        #: Progress of this node's history load of a mailbox (emlisten.service.history).
        self._history = history

    async def _register(self, mailboxes: Sequence[MailboxConfig], *, restart: bool) -> None:
        """Store the mailboxes (a new revision when they must restart) and tell every node.

        Batched: a few round trips whatever the count, so Creatio's bulk create of thousands of
        mailboxes answers in seconds."""

        if not mailboxes:
            return
        existing = await self.store.get_mailboxes([m.id for m in mailboxes])
        now = time.time()
        new_statuses = {}
        stored = []
        for mailbox in mailboxes:
            previous = existing.get(mailbox.id)
            if previous is not None and not same_source(previous, mailbox):
                # Known id, another server or user: its checkpoints describe other folders. Forget
                # them (and its history records) so listening starts at the newest message there.
                await self.store.remove_mailbox(mailbox.id)
                log.info(
                    "mailbox moved to another server or user: checkpoints dropped",
                    extra={"mailbox": mailbox.id},
                )
                previous = None
            if previous is None:
                new_statuses[mailbox.id] = MailboxStatus(MailboxState.STARTING, updated_at=now)
                revision = 1
            else:
                changed = mailbox.replace(revision=previous.revision) != previous
                revision = previous.revision + 1 if (restart or changed) else previous.revision
            stored.append(mailbox.replace(revision=revision))
        await self.store.set_statuses(new_statuses)
        await self.store.put_mailboxes(stored)
        if len(stored) > _BULK:
            await self.store.publish_change(RESYNC)
        else:
            for mailbox in stored:
                await self.store.publish_change(mailbox.id)

    async def create(self, mailboxes: Sequence[MailboxConfig]) -> None:
        await self._register(mailboxes, restart=False)
        log.debug("create: %d mailbox(es)", len(mailboxes))

    async def recreate(self, mailboxes: Sequence[MailboxConfig]) -> None:
        await self._register(mailboxes, restart=True)
        log.debug("recreate: %d mailbox(es)", len(mailboxes))

    async def update(self, mailboxes: Sequence[MailboxConfig]) -> list[str]:
        known = await self.store.existing(m.id for m in mailboxes)
        await self._register([m for m in mailboxes if m.id in known], restart=False)
        unknown = [m.id for m in mailboxes if m.id not in known]
        log.debug("update: %d mailbox(es), %d unknown", len(mailboxes) - len(unknown), len(unknown))
        return unknown

    async def close(self, mailbox_ids: Sequence[str]) -> None:
        for mailbox_id in mailbox_ids:
            await self.store.remove_mailbox(mailbox_id)
            await self.store.publish_change(mailbox_id)
        log.debug("close: %d mailbox(es)", len(mailbox_ids))

    async def subscription_states(self, mailbox_ids: Sequence[str]) -> dict[str, str]:
        existing = await self.store.existing(mailbox_ids)
        return {mid: "exists" if mid in existing else "closed" for mid in mailbox_ids}

    async def service_status(self) -> dict[str, Any]:
        total, counts = await self.store.state_counts()
        body: dict[str, Any] = {
            "ServiceStatus": "Started",
            "Version": __version__,
            "Node": self.node_id,
            "Role": self.role,
            "Store": self.store.name,
            "Connections": {"Total": total, **counts},
        }
        body.update(self.local_status())
        return body

    def local_status(self) -> dict[str, Any]:
        """This node's own figures (listeners, deliveries in flight, ...): no store read."""
        return self._extra_status() if self._extra_status is not None else {}

    # -- AdminView -------------------------------------------------------------------------------

    async def mailboxes(self) -> list[dict[str, Any]]:
        ids = sorted(await self.store.list_mailbox_ids())
        configs = await self.store.get_mailboxes(ids)
        statuses = await self.store.get_statuses(ids)
        owners = await self.store.lease_owners(ids)
        all_checkpoints = await self.store.get_checkpoints_of(ids)
        result = []
        for mailbox_id in ids:
            config = configs.get(mailbox_id)
            if config is None:
                continue  # closed meanwhile
            status = statuses.get(mailbox_id)
            checkpoints = all_checkpoints.get(mailbox_id, {})
            owner = owners.get(mailbox_id)
            state = status.state if status else MailboxState.STARTING
            if status is not None and owner is not None and status.node not in (None, owner):
                # Written by the previous owner: the new one has not connected yet.
                state = MailboxState.STARTING
            result.append(
                {
                    "id": mailbox_id,
                    "email": config.sender_email or config.user_name,
                    "server": f"{config.imap.host}:{config.imap.port}",
                    "state": state.value,
                    "node": owner,
                    "folders": [
                        {
                            "name": folder,
                            "uidvalidity": cp.uidvalidity if cp else None,
                            "last_uid": cp.last_uid if cp else None,
                        }
                        for folder in config.folders
                        for cp in [checkpoints.get(folder)]
                    ],
                    "last_error": status.last_error if status else None,
                    "delivered": status.delivered if status else 0,
                    "updated_at": status.updated_at if status else None,
                    "history": self._history(mailbox_id) if self._history else None,
                }
            )
        return result

    async def nodes(self) -> list[dict[str, Any]]:
        now = time.time()
        return [
            {
                "id": node.id,
                "role": node.role,
                "mailboxes": node.mailboxes,
                "heartbeat_age_seconds": round(max(0.0, now - node.seen_at), 3),
                "uptime_seconds": round(max(0.0, now - node.started_at), 1) if node.started_at else None,
                "version": node.version,
            }
            for node in sorted(await self.store.list_nodes(), key=lambda n: n.id)
        ]

    async def readiness(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            await self.store.ping()
            checks["store"] = "ok"
        except StoreError as exc:
            checks["store"] = str(exc) or type(exc).__name__
        if self.queue is not None:
            try:
                await self.queue.ping()
                checks["queue"] = "ok"
            except QueueError as exc:
                checks["queue"] = str(exc) or type(exc).__name__
        return checks
