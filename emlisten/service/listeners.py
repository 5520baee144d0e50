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
from emlisten.abc import Store
from emlisten.models import MailboxConfig, MailboxState, MailboxStatus

log = logging.getLogger(__name__)


class StoreListenerControl:
    def __init__(
        self,
        store: Store,
        *,
        node_id: str,
        role: str,
        extra_status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.role = role
        self._extra_status = extra_status

    async def _register(self, mailbox: MailboxConfig, *, restart: bool) -> None:
        existing = await self.store.get_mailbox(mailbox.id)
        if existing is None:
            await self.store.set_status(
                mailbox.id, MailboxStatus(MailboxState.STARTING, updated_at=time.time())
            )
            revision = 1
        else:
            comparable = mailbox.replace(revision=existing.revision)
            changed = comparable != existing
            revision = existing.revision + 1 if (restart or changed) else existing.revision
        await self.store.put_mailbox(mailbox.replace(revision=revision))
        await self.store.publish_change(mailbox.id)

    async def create(self, mailboxes: Sequence[MailboxConfig]) -> None:
        for mailbox in mailboxes:
            await self._register(mailbox, restart=False)
        log.info("create: %d mailbox(es)", len(mailboxes))

    async def recreate(self, mailboxes: Sequence[MailboxConfig]) -> None:
        for mailbox in mailboxes:
            await self._register(mailbox, restart=True)
        log.info("recreate: %d mailbox(es)", len(mailboxes))

    async def update(self, mailboxes: Sequence[MailboxConfig]) -> list[str]:
        known = await self.store.existing(m.id for m in mailboxes)
        for mailbox in mailboxes:
            if mailbox.id in known:
                await self._register(mailbox, restart=False)
        unknown = [m.id for m in mailboxes if m.id not in known]
        log.info("update: %d mailbox(es), %d unknown", len(mailboxes) - len(unknown), len(unknown))
        return unknown

    async def close(self, mailbox_ids: Sequence[str]) -> None:
        for mailbox_id in mailbox_ids:
            await self.store.remove_mailbox(mailbox_id)
            await self.store.publish_change(mailbox_id)
        log.info("close: %d mailbox(es)", len(mailbox_ids))

    async def subscription_states(self, mailbox_ids: Sequence[str]) -> dict[str, str]:
        existing = await self.store.existing(mailbox_ids)
        return {mid: "exists" if mid in existing else "closed" for mid in mailbox_ids}

    async def service_status(self) -> dict[str, Any]:
        ids = await self.store.list_mailbox_ids()
        statuses = await self.store.get_statuses(ids)
        counts: dict[str, int] = {}
        for status in statuses.values():
            state = status.state.value if status else MailboxState.STARTING.value
            counts[state] = counts.get(state, 0) + 1
        body: dict[str, Any] = {
            "ServiceStatus": "Started",
            "Version": __version__,
            "Node": self.node_id,
            "Role": self.role,
            "Store": self.store.name,
            "Connections": {"Total": len(ids), **counts},
        }
        if self._extra_status is not None:
            body.update(self._extra_status())
        return body
