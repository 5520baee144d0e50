"""What the HTTP API may ask of the service: the Creatio listener operations, role-independent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from emlisten.models import MailboxConfig


class ListenerControl(Protocol):
    async def create(self, mailboxes: Sequence[MailboxConfig]) -> None:
        """Register the mailboxes and start listening (an existing subscription is kept as is,
        but its credentials are updated)."""

    async def recreate(self, mailboxes: Sequence[MailboxConfig]) -> None:
        """Drop any existing subscription of these mailboxes and subscribe again (checkpoints kept)."""

    async def update(self, mailboxes: Sequence[MailboxConfig]) -> list[str]:
        """Replace credentials/options of existing subscriptions; returns the ids that were unknown."""

    async def close(self, mailbox_ids: Sequence[str]) -> None:
        """Stop listening and forget the mailboxes. Unknown ids are ignored."""

    async def subscription_states(self, mailbox_ids: Sequence[str]) -> dict[str, str]:
        """``{id: "exists" | "closed"}`` for each id (Creatio re-creates anything not "exists")."""

    async def service_status(self) -> dict[str, Any]:
        """Body of ``GET /api/listeners/status`` (ServiceStatus, Version, Connections...)."""


class AdminView(Protocol):
    """What the native admin API (``/v1/...``, ``/readyz``) and ``emlisten status`` read."""

    async def mailboxes(self) -> list[dict[str, Any]]:
        """Per mailbox: id, email, state, node, folders (UIDVALIDITY, last UID), last_error, delivered."""

    async def nodes(self) -> list[dict[str, Any]]:
        """Per live node: id, role, mailboxes, heartbeat_age_seconds, version."""

    async def readiness(self) -> dict[str, str]:
        """``{"store": "ok" | error, "queue": "ok" | error}``."""
