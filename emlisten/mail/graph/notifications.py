"""Microsoft Graph change notifications: where they are sent, how they are checked, where they go.

Any node of a cluster may receive a notification (the public URL usually points at a load
balancer), so nothing here needs to know which node holds the subscription:

- Each subscription gets its own notification path, ``/v1/graph/notifications/<route>``, where
  ``<route>`` encodes the mailbox id, the folder and a random nonce, followed by an HMAC of them
  (key derived from ``EMLISTEN_SECRET_KEY``, which every node of a cluster shares). A node can
  therefore tell from the path alone which (mailbox, folder) a notification is about, and answers
  the validation handshake only for paths that emlisten itself made.
- The subscription's ``clientState`` is a second HMAC of the route (another label), so it is
  secret (it never appears in a URL) and any node can verify it without a lookup.
- A verified ``created`` notification becomes a ``SyncTask`` on the shared queue: the worker then
  syncs the folder from its checkpoint with a delta query, so a notification that arrives twice,
  late or out of order does no harm.

Lifecycle notifications (``lifecycleEvent``) go to ``/v1/graph/lifecycle/<route>``: ``missed`` is
a SyncTask too (the delta query finds what the missed notifications were about). For
``subscriptionRemoved`` and ``reauthorizationRequired`` the subscription itself must be
re-created or re-authorised, which only the node holding it can do: when that node received the
notification, its listener acts at once (this node's subscriptions are kept in
:class:`NotificationHub`'s in-process registry); on any other node the notification is logged,
a SyncTask is published, and the owner repairs the subscription at its next renewal check
(``GraphSource(renew_seconds=...)``), which re-creates a subscription that is gone.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from emlisten.models import SyncTask

log = logging.getLogger(__name__)

NOTIFICATION_PREFIX = "/v1/graph/notifications/"
LIFECYCLE_PREFIX = "/v1/graph/lifecycle/"

#: Events a listener reacts to.
CREATED = "created"
MISSED = "missed"
REMOVED = "subscriptionRemoved"
REAUTHORIZATION_REQUIRED = "reauthorizationRequired"
LIFECYCLE_EVENTS = frozenset({MISSED, REMOVED, REAUTHORIZATION_REQUIRED})

Publish = Callable[[SyncTask], Awaitable[None]]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Route:
    """Where one subscription's notifications go, and the secret they must carry."""

    token: str
    mailbox_id: str
    folder: str
    client_state: str = field(repr=False)

    @property
    def notification_path(self) -> str:
        return NOTIFICATION_PREFIX + self.token

    @property
    def lifecycle_path(self) -> str:
        return LIFECYCLE_PREFIX + self.token


@dataclass(frozen=True, slots=True)
class GraphEvent:
    """What a notification tells the listener holding the subscription."""

    kind: str
    subscription_id: str
    seen_at: float = 0.0


@dataclass(slots=True)
class HandleResult:
    accepted: int = 0
    rejected: int = 0
    published: list[SyncTask] = field(default_factory=list)


class RouteSigner:
    """Makes and checks notification routes and client states (pure logic, no I/O)."""

    def __init__(self, secret: bytes) -> None:
        self._key = hashlib.sha256(b"emlisten/graph-notifications\0" + secret).digest()

    @classmethod
    def from_setting(cls, secret_key: str | None) -> RouteSigner:
        """From ``EMLISTEN_SECRET_KEY``; without one (single node, in-memory store) a random key
        per process, which is fine because then only this process receives its notifications."""
        return cls(secret_key.encode("utf-8") if secret_key else os.urandom(32))

    def _mac(self, label: bytes, payload: bytes) -> bytes:
        return hmac.new(self._key, label + b"\0" + payload, hashlib.sha256).digest()

    def new_route(self, mailbox_id: str, folder: str) -> Route:
        payload = "\n".join((mailbox_id, folder, secrets.token_hex(8))).encode("utf-8")
        token = _b64(payload) + "." + _b64(self._mac(b"route", payload)[:16])
        return Route(token, mailbox_id, folder, self.client_state(token))

    def client_state(self, token: str) -> str:
        # 43 characters; Graph allows up to 128.
        return _b64(self._mac(b"client-state", token.encode("utf-8")))

    def parse(self, token: str) -> Route | None:
        """The route a path token names, or None when emlisten did not make it."""
        encoded, dot, mac = token.partition(".")
        if not dot or len(token) > 2048:
            return None
        try:
            payload = _unb64(encoded)
            presented = _unb64(mac)
        except (binascii.Error, ValueError):
            return None
        if not hmac.compare_digest(presented, self._mac(b"route", payload)[:16]):
            return None
        parts = payload.decode("utf-8", errors="replace").split("\n")
        if len(parts) != 3:
            return None
        return Route(token, parts[0], parts[1], self.client_state(token))

    def verify_client_state(self, route: Route, presented: object) -> bool:
        return isinstance(presented, str) and hmac.compare_digest(
            presented.encode("utf-8"), route.client_state.encode("utf-8")
        )


def notification_items(body: object) -> list[Mapping[str, Any]]:
    """The ``value`` array of a ``changeNotificationCollection`` (malformed items dropped)."""
    if not isinstance(body, Mapping):
        return []
    items = body.get("value")
    if not isinstance(items, list):
        return []
    return [item for item in items if isinstance(item, Mapping)]


class _Listener:
    __slots__ = ("route", "send")

    def __init__(self, route: Route, send: trio.MemorySendChannel[GraphEvent]) -> None:
        self.route = route
        self.send = send


class NotificationHub:
    """Turns notification requests into SyncTasks and listener events.

    The registry maps this node's live subscription ids to their listeners; see the module
    docstring for what happens when a notification reaches another node.
    """

    def __init__(self, signer: RouteSigner) -> None:
        self.signer = signer
        self._listeners: dict[str, _Listener] = {}
        self.rejected_total = 0

    def register(self, subscription_id: str, route: Route, send: trio.MemorySendChannel[GraphEvent]) -> None:
        self._listeners[subscription_id] = _Listener(route, send)

    def unregister(self, subscription_id: str) -> None:
        self._listeners.pop(subscription_id, None)

    @property
    def local_subscriptions(self) -> int:
        return len(self._listeners)

    async def handle(self, route: Route, body: object, publish: Publish, *, lifecycle: bool) -> HandleResult:
        """Check every notification of one request and act on the good ones.

        Returns once the resulting tasks are published (so a failure can be answered with an
        error and Graph retries); listener events are handed over without waiting."""

        result = HandleResult()
        wants_sync = False
        seen_at = time.time()
        for item in notification_items(body):
            if not self.signer.verify_client_state(route, item.get("clientState")):
                result.rejected += 1
                continue
            result.accepted += 1
            subscription_id = str(item.get("subscriptionId") or "")
            kind = str(item.get("lifecycleEvent") or "") if lifecycle else CREATED
            if lifecycle and kind not in LIFECYCLE_EVENTS:
                log.info("ignoring unknown Graph lifecycle event %r", kind[:40])
                continue
            if not lifecycle and str(item.get("changeType") or CREATED).lower() != CREATED:
                continue
            listener = self._listeners.get(subscription_id)
            if listener is not None and listener.route.token == route.token:
                try:
                    listener.send.send_nowait(GraphEvent(kind, subscription_id, seen_at))
                    continue
                except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # busy or gone: fall through to the queue
            if kind in (REMOVED, REAUTHORIZATION_REQUIRED):
                log.info(
                    "Graph %s for a subscription held by another node: its renewal check repairs it",
                    kind,
                    extra={"mailbox": route.mailbox_id, "folder": route.folder},
                )
            wants_sync = True
        if result.rejected:
            self.rejected_total += result.rejected
            log.warning(
                "dropped %d Graph notification(s) with a wrong clientState",
                result.rejected,
                extra={"mailbox": route.mailbox_id},
            )
        if wants_sync:
            task = SyncTask(
                mailbox_id=route.mailbox_id,
                folder=route.folder,
                uidvalidity=1,
                reason="missed" if lifecycle else "exists",
                seen_at=seen_at,
            )
            await publish(task)
            result.published.append(task)
        return result


def retry_after_seconds(value: str | None, *, default: float, cap: float) -> float:
    """A ``Retry-After`` header (seconds or an HTTP date) as a delay, within [0, cap]."""
    if not value:
        return min(default, cap)
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return min(default, cap)
    if not math.isfinite(seconds):
        return min(default, cap)
    return max(0.0, min(seconds, cap))


__all__ = [
    "CREATED",
    "LIFECYCLE_PREFIX",
    "MISSED",
    "NOTIFICATION_PREFIX",
    "REAUTHORIZATION_REQUIRED",
    "REMOVED",
    "GraphEvent",
    "HandleResult",
    "NotificationHub",
    "Route",
    "RouteSigner",
    "notification_items",
    "retry_after_seconds",
]
