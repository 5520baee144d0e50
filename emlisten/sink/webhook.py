"""Generic webhooks: signed JSON events to any application's URL (docs/webhooks.md).

Mailboxes registered through ``/v1`` carry a webhook (URL and ``whsec_`` secrets, defaults from
settings); :class:`RoutingSink` sends their mail here and everyone else's to Creatio.

Delivery has two halves, so that a slow receiver never holds up the delivery worker:

1. :meth:`WebhookSink.deliver` turns each message into one ``message.new`` event and appends the
   events to the receiver's durable outbox in the Store (one outbox per URL). It returns once
   they are stored, and the worker moves the checkpoint.
2. One sender per receiver URL (one in the whole cluster: it holds the store lease
   ``webhook/<endpoint>``) sends the outbox: up to ``concurrency`` calls at once, but one at a time
   per mailbox, so each mailbox's events arrive in order. A failed call (timeout, connection
   error, 408, 429, 5xx, 3xx) is retried after the next delay of the retry schedule (jittered
   +-20 %; a 429's ``Retry-After`` wins); any other 4xx is final. An event whose last retry failed,
   or that failed finally, moves to the dead letters (listed, replayed and dropped through
   ``/v1/dead-letters``). Receivers each have their own sender, calls and queue.

Signatures follow Standard Webhooks: ``webhook-id`` (the event id), ``webhook-timestamp`` (Unix
seconds of the attempt) and ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of
"id.timestamp.body">`` for each secret (space-separated during a rotation), keyed with the
base64-decoded part of the ``whsec_`` secret.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import json
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from emlisten import __version__, _egress
from emlisten.abc import Sink, Store
from emlisten.config import Settings
from emlisten.errors import DeliveryError, StoreError
from emlisten.models import Email, MailboxConfig, WebhookEvent, WebhookTarget

log = logging.getLogger(__name__)

#: No default receiver or secret (EMLISTEN_WEBHOOK_URL / _SECRET unset).
_NO_DEFAULT = WebhookTarget()

__all__ = [
    "EVENT_VERSION",
    "RoutingSink",
    "WebhookSink",
    "endpoint_key",
    "find_webhook_sink",
    "message_event_id",
    "sign",
]

#: Version of the event payloads (``"version"`` in every event); bumped on incompatible changes.
EVENT_VERSION = 1
#: Outbox events the sender looks at per pass (the heads of each mailbox's events among them).
_WINDOW = 1000
#: How far it looks when every mailbox in view waits (see _send).
_MAX_WINDOW = 8 * _WINDOW
#: Longest ``Retry-After`` honoured.
_MAX_RETRY_AFTER = 86400.0
_JITTER = 0.2
#: A store error while recording an attempt: wait this long before the event is tried again.
_STORE_PAUSE = 1.0
#: ``last_error`` of a call that could not connect (the receiver is down or unreachable).
_UNREACHABLE = "cannot reach the receiver"


def endpoint_key(url: str) -> str:
    """The outbox name of a receiver URL (a hash: URLs may hold tokens, and keys are visible)."""
    return hashlib.sha256(url.encode()).hexdigest()[:32]


def message_event_id(email_message: Email) -> str:
    """Stable per mailbox and message: ``Email.id`` is a uuid5 of mailbox, folder and message."""
    return f"msg_{email_message.id.replace('-', '')}"


def _signing_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix("whsec_"))


def sign(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: one ``v1,<signature>`` per secret, space-separated."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(_signing_key(secret), signed, hashlib.sha256).digest()).decode()
        for secret in secrets
    )


class _TextOfHtml(HTMLParser):
    """A plain rendition of an HTML body: text content, line breaks at block elements, no
    scripts or styles (for ``data.text`` when the message's body is HTML)."""

    _BLOCKS = frozenset(
        (
            *("address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "fieldset"),
            *("figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header"),
            *("hr", "li", "main", "nav", "ol", "p", "pre", "section", "table", "tr", "ul"),
        )
    )
    _HIDDEN = frozenset(("script", "style", "head", "title", "template"))

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._HIDDEN:
            self._hidden += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._hidden or not data:
            return
        # Runs of white space are one space, kept at the edges ("Hello <b>world</b>").
        collapsed = " ".join(data.split())
        if data[0].isspace():
            collapsed = " " + collapsed
        if data[-1].isspace() and collapsed.strip():
            collapsed += " "
        self.parts.append(collapsed)


def html_to_text(html: str) -> str:
    parser = _TextOfHtml()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).split("\n"))
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip()


def _iso(moment: datetime | float) -> str:
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def message_payload(
    mailbox_id: str, message: Email, *, created_at: float, inline_limit: int
) -> dict[str, Any]:
    """The ``message.new`` event of one message (schema in docs/webhooks.md)."""
    return {
        "type": "message.new",
        "version": EVENT_VERSION,
        "id": message_event_id(message),
        "mailbox": mailbox_id,
        "timestamp": _iso(created_at),
        "data": {
            "id": message.id,
            "folder": message.folder,
            "subject": message.subject,
            "from": message.sender,
            "to": list(message.recipients),
            "cc": list(message.copy_recipients),
            "bcc": list(message.blind_copy_recipients),
            "date": _iso(message.send_date) if message.send_date else None,
            "message_id": message.message_id,
            "in_reply_to": message.in_reply_to,
            "references": list(message.references),
            "importance": message.importance.name.lower(),
            # The body as sent when it is plain text, else a plain rendition of the HTML body.
            "text": html_to_text(message.body) if message.is_html_body else message.body,
            "html": message.body if message.is_html_body else None,
            "truncated": message.truncated,
            "headers": [{"name": name, "value": value} for name, value in message.headers],
            "attachments": [
                {
                    "id": attachment.id,
                    "filename": attachment.name,
                    "content_type": attachment.content_type,
                    "size": len(attachment.data),
                    "inline": attachment.is_inline,
                    "content_id": attachment.content_id,
                    # Larger attachments travel as metadata only (docs/webhooks.md).
                    "content": (
                        base64.b64encode(attachment.data).decode("ascii")
                        if len(attachment.data) <= inline_limit
                        else None
                    ),
                }
                for attachment in message.attachments
            ],
        },
    }


def _only_store_errors(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_store_errors(inner) for inner in exc.exceptions)
    return isinstance(exc, StoreError)


@dataclass(frozen=True, slots=True)
class _Outcome:
    ok: bool
    error: str = ""
    final: bool = False
    retry_after: float | None = None


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), capped; None when absent."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), _MAX_RETRY_AFTER)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return min(max(0.0, moment.timestamp() - time.time()), _MAX_RETRY_AFTER)


@dataclass(eq=False)
class _Sender:
    endpoint: str
    wake: trio.Event = field(default_factory=trio.Event)
    #: New events were added to the outbox (by this node): read it again.
    dirty: bool = True
    #: The outbox as last read, minus what was sent since (oldest first).
    cached: list[WebhookEvent] = field(default_factory=list)
    #: Attempts recorded while a read of the outbox was in progress (id -> the event as
    #: recorded, None once it left the outbox): that read may predate the record, so its copies
    #: of them are stale.
    recorded_during_read: dict[str, WebhookEvent | None] | None = None
    #: When a connection test of an unreachable receiver last started (trio clock).
    last_probe: float = -math.inf
    probing: bool = False
    #: A call could not connect since the receiver last answered.
    unreachable: bool = False
    #: Events to try now whatever their schedule says (see receiver_is_back).
    released: set[str] = field(default_factory=set)

    def receiver_is_back(self) -> None:
        """The receiver answered: events that wait only because it was unreachable go now,
        instead of at the next step of their retry schedule (a long outage has reached steps of
        hours). Each is released once: failing again, it follows its schedule."""
        if self.unreachable:
            self.unreachable = False
            self.released.update(e.id for e in self.cached if e.last_error.startswith(_UNREACHABLE))
            self.wake.set()

    def recorded(self, event: WebhookEvent, *, removed: bool) -> None:
        if self.recorded_during_read is not None:
            self.recorded_during_read[event.id] = None if removed else event
        if removed:
            self.cached = [e for e in self.cached if e.id != event.id]
        else:
            for cached in self.cached:
                if cached.id == event.id and cached is not event:
                    cached.attempts = event.attempts
                    cached.next_attempt_at = event.next_attempt_at
                    cached.last_error = event.last_error


class WebhookSink(Sink):
    """Accepts events into durable per-receiver outboxes and runs their senders (see the module
    docstring). Bind it to the store (:meth:`bind`) and run :meth:`run` in the node's nursery."""

    def __init__(
        self,
        *,
        default: WebhookTarget = _NO_DEFAULT,
        retry_delays: Sequence[float] = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 43200),
        timeout: float = 30.0,
        concurrency: int = 8,
        inline_attachment_bytes: int = 1024 * 1024,
        lease_ttl: float = 15.0,
        poll_seconds: float = 1.0,
        idle_seconds: float = 30.0,
        probe_seconds: float = 10.0,
    ) -> None:
        self.default = default
        self.retry_delays = tuple(retry_delays)
        self.timeout = timeout
        self.concurrency = concurrency
        self.inline_attachment_bytes = inline_attachment_bytes
        self.lease_ttl = lease_ttl
        self.poll_seconds = poll_seconds
        self.idle_seconds = idle_seconds
        self.probe_seconds = probe_seconds
        self._store: Store | None = None
        self._owner = f"webhooks/{uuid.uuid4().hex[:12]}"
        self._nursery: trio.Nursery | None = None
        self._senders: dict[str, _Sender] = {}
        #: mailbox id -> (cached until, its secrets; None once it was removed)
        self._secrets: dict[str, tuple[float, tuple[str, ...] | None]] = {}
        #: Told the outcome of every call (the web console's recent events of a mailbox):
        #: ``(event, "delivered" | "retry" | "dead_letter")``, ``event.last_error`` saying why.
        self.on_outcome: Callable[[WebhookEvent, str], None] | None = None
        # Receivers are slow or dead independently: no shared connection limit (each sender
        # bounds its own calls), so one cannot take the pool from another.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            # Only to addresses EMLISTEN_CALLBACK_ALLOW permits (emlisten._egress).
            transport=_egress.http_transport(
                "callback", limits=httpx.Limits(max_connections=None, max_keepalive_connections=200)
            ),
            headers={"User-Agent": f"emlisten/{__version__}"},
            follow_redirects=False,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookSink:
        return cls(
            default=WebhookTarget(
                url=settings.webhook_url or "", secrets=tuple((settings.webhook_secret or "").split())
            ),
            retry_delays=settings.webhook_retry_delays,
            timeout=settings.webhook_timeout_seconds,
            concurrency=settings.webhook_concurrency,
            inline_attachment_bytes=settings.webhook_inline_attachment_bytes,
            lease_ttl=max(15.0, settings.lease_ttl_seconds),
        )

    def bind(self, store: Store, *, node_id: str = "") -> None:
        """The store holding the outboxes (the node's store, known only once it is open)."""
        self._store = store
        if node_id:
            self._owner = f"{node_id}/webhooks/{uuid.uuid4().hex[:12]}"

    @property
    def store(self) -> Store:
        if self._store is None:
            raise DeliveryError("webhook sink is not bound to a store")
        return self._store

    # -- Sink ------------------------------------------------------------------------------------

    def _url(self, mailbox: MailboxConfig) -> str:
        url = (mailbox.webhook.url if mailbox.webhook else "") or self.default.url
        if not url:
            raise DeliveryError("no webhook URL: the mailbox has none and EMLISTEN_WEBHOOK_URL is not set")
        return url

    def _event(
        self, mailbox: MailboxConfig, event_id: str, kind: str, payload: dict[str, Any]
    ) -> WebhookEvent:
        url = self._url(mailbox)
        return WebhookEvent(
            id=event_id,
            endpoint=endpoint_key(url),
            url=url,
            mailbox_id=mailbox.id,
            type=kind,
            payload=json.dumps(payload, ensure_ascii=False, separators=(",", ":")),
            created_at=time.time(),
            secrets=mailbox.webhook.secrets if mailbox.webhook else (),
        )

    async def _enqueue(self, events: Sequence[WebhookEvent]) -> None:
        try:
            await self.store.outbox_add(events)
        except StoreError as exc:
            raise DeliveryError(f"webhook outbox unavailable: {exc}") from None
        for endpoint in dict.fromkeys(event.endpoint for event in events):
            self._ensure_sender(endpoint)

    async def deliver(self, mailbox: MailboxConfig, emails: Sequence[Email], *, idempotency_key: str) -> None:
        """Queue one ``message.new`` event per message; returns once they are in the outbox."""
        now = time.time()
        events = [
            self._event(
                mailbox,
                message_event_id(message),
                "message.new",
                message_payload(
                    mailbox.id, message, created_at=now, inline_limit=self.inline_attachment_bytes
                ),
            )
            for message in emails
        ]
        await self._enqueue(events)

    async def notify_new_ids(self, mailbox: MailboxConfig, ids: Sequence[str]) -> None:
        """Not used: mailboxes registered through /v1 always get full messages."""

    async def report_state(
        self, mailbox: MailboxConfig, *, available: bool, error_class: str = "", message: str = ""
    ) -> None:
        """A ``mailbox.state`` event: the mailbox started or stopped working."""
        now = time.time()
        event_id = f"evt_{uuid.uuid4().hex}"
        payload = {
            "type": "mailbox.state",
            "version": EVENT_VERSION,
            "id": event_id,
            "mailbox": mailbox.id,
            "timestamp": _iso(now),
            "data": {"available": available, "error_class": error_class, "message": message},
        }
        await self._enqueue([self._event(mailbox, event_id, "mailbox.state", payload)])

    async def request_token_refresh(self, mailbox: MailboxConfig) -> None:
        """A ``mailbox.token_expired`` event: the application should PATCH a new access_token."""
        now = time.time()
        event_id = f"evt_{uuid.uuid4().hex}"
        payload = {
            "type": "mailbox.token_expired",
            "version": EVENT_VERSION,
            "id": event_id,
            "mailbox": mailbox.id,
            "timestamp": _iso(now),
            "data": {},
        }
        await self._enqueue([self._event(mailbox, event_id, "mailbox.token_expired", payload)])

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- senders ---------------------------------------------------------------------------------

    def wake(self, event: WebhookEvent) -> None:
        """A replayed (or otherwise new) event waits in this endpoint's outbox."""
        self._ensure_sender(event.endpoint)

    def _ensure_sender(self, endpoint: str) -> None:
        sender = self._senders.get(endpoint)
        if sender is not None:
            sender.dirty = True
            sender.wake.set()
        elif self._nursery is not None:
            sender = self._senders[endpoint] = _Sender(endpoint)
            self._nursery.start_soon(self._run_sender, sender, name=f"webhook-sender:{endpoint[:8]}")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the senders until cancelled: those for outboxes found in the store (left over from a
        restart, or filled by other nodes) and those deliveries start."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                task_status.started()
                while True:
                    try:
                        for endpoint in await self.store.outbox_endpoints():
                            self._ensure_sender(endpoint)
                    except (StoreError, DeliveryError) as exc:
                        log.warning("cannot list webhook outboxes: %s", exc)
                    await trio.sleep(self.poll_seconds * 2)
            finally:
                self._nursery = None

    async def _run_sender(self, sender: _Sender) -> None:
        lease = f"webhook/{sender.endpoint}"
        store = self.store
        # An owner per sender: a sender that is still letting go of the lease (idle, stopping)
        # and its successor on this node must not both hold it.
        owner = f"{self._owner}/{uuid.uuid4().hex[:8]}"
        try:
            wait = 0.01
            while not await store.claim_leases(owner, [lease], self.lease_ttl):
                # Another node sends this receiver's outbox; stand by while it has events.
                if not await store.outbox_count(sender.endpoint):
                    return
                await trio.sleep(wait)
                wait = min(wait * 2, self.lease_ttl / 3)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._keep_lease, owner, lease, nursery.cancel_scope)
                    await self._send(sender, nursery)
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await store.release_leases(owner, [lease])
        except Exception as exc:  # an ExceptionGroup from the nursery too
            # Never take the node down: the outbox is looked at again within two polls.
            if _only_store_errors(exc):
                log.warning("webhook sender stopped: %s", exc)
            else:
                log.exception("webhook sender failed unexpectedly")
        finally:
            if self._senders.get(sender.endpoint) is sender:
                del self._senders[sender.endpoint]

    async def _keep_lease(self, owner: str, lease: str, scope: trio.CancelScope) -> None:
        while True:
            await trio.sleep(self.lease_ttl / 3)
            try:
                held = await self.store.renew_leases(owner, [lease], self.lease_ttl)
            except StoreError as exc:
                log.warning("cannot renew the webhook lease: %s", exc)
                continue
            if not held:
                log.warning("lost the lease of a webhook outbox: another node sends it now")
                scope.cancel()
                return

    async def _send(self, sender: _Sender, nursery: trio.Nursery) -> None:
        """Send the outbox until it stays empty for ``idle_seconds``.

        The outbox is read again when this node added events, every ``poll_seconds`` (events
        other nodes added), and when what was read is used up; in between, finished calls only
        update the copy in memory (a read per call would cost a store round trip each)."""
        store = self.store
        slots = trio.Semaphore(self.concurrency)
        in_flight: set[str] = set()
        idle_since: float | None = None
        last_read = -math.inf
        full = False
        window = _WINDOW
        while True:
            sender.wake = trio.Event()
            now = trio.current_time()
            if (
                sender.dirty
                or not sender.cached
                or now - last_read >= self.poll_seconds
                or (full and len(sender.cached) < window // 2)
            ):
                sender.dirty = False
                recorded: dict[str, WebhookEvent | None] = {}
                sender.recorded_during_read = recorded
                try:
                    fresh = await store.outbox_peek(sender.endpoint, window)
                finally:
                    sender.recorded_during_read = None
                last_read = trio.current_time()
                full = len(fresh) >= window
                if not full:
                    window = _WINDOW
                sender.cached = []
                for read in fresh:
                    current = recorded.get(read.id, read)
                    if current is not None:  # None: it left the outbox meanwhile
                        sender.cached.append(current)
                if not fresh and not in_flight:
                    if idle_since is None:
                        idle_since = last_read
                    elif last_read - idle_since >= self.idle_seconds and not sender.dirty:
                        # No await since the read: a delivery after this point starts a new sender.
                        del self._senders[sender.endpoint]
                        return
                else:
                    idle_since = None
            now_wall = time.time()
            next_due = math.inf
            heads: dict[str, WebhookEvent] = {}
            for event in sender.cached:
                heads.setdefault(event.mailbox_id, event)
            started = 0
            for mailbox_id, event in heads.items():
                if mailbox_id in in_flight:
                    continue
                if event.next_attempt_at > now_wall and event.id not in sender.released:
                    next_due = min(next_due, event.next_attempt_at)
                    continue
                try:
                    slots.acquire_nowait()
                except trio.WouldBlock:
                    break  # a finishing call wakes us
                in_flight.add(mailbox_id)
                sender.released.discard(event.id)
                nursery.start_soon(self._attempt, sender, event, in_flight, slots)
                started += 1
            if (
                full
                and not started
                and len(in_flight) < self.concurrency
                and window < _MAX_WINDOW
                and not any(e.last_error.startswith(_UNREACHABLE) for e in heads.values())
            ):
                # Every mailbox in view waits (a failing backlog fills the view) while events of
                # others may lie beyond it: look further at once. Not for an unreachable
                # receiver: the others would wait for it too.
                window *= 2
                sender.dirty = True
                continue
            if (
                next_due < math.inf
                and not in_flight
                and not sender.probing
                and trio.current_time() - sender.last_probe >= self.probe_seconds
                and any(e.last_error.startswith(_UNREACHABLE) for e in heads.values())
            ):
                sender.probing = True
                sender.last_probe = trio.current_time()
                nursery.start_soon(self._probe, sender, heads[next(iter(heads))].url)
            timeout = min(self.poll_seconds, max(0.0, next_due - time.time()))
            with trio.move_on_after(timeout):
                await sender.wake.wait()

    async def _probe(self, sender: _Sender, url: str) -> None:
        """While a receiver is unreachable, test every ``probe_seconds`` whether it accepts a TCP
        connection again (no request: nothing is sent, no attempt is spent)."""
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            with trio.move_on_after(min(self.timeout, 10.0)):
                stream = await _egress.open_tcp_stream(parts.hostname or "", port, "callback")
                await stream.aclose()
                log.info("webhook receiver reachable again: sending what waits for it")
                sender.receiver_is_back()
        except Exception as exc:  # any failure to connect means "still down"
            log.debug("webhook receiver still unreachable: %s", type(exc).__name__)
        finally:
            sender.probing = False

    async def _attempt(
        self, sender: _Sender, event: WebhookEvent, in_flight: set[str], slots: trio.Semaphore
    ) -> None:
        try:
            outcome = await self._post(event)
            with trio.CancelScope(shield=True):
                removed = await self._record(event, outcome)
            sender.recorded(event, removed=removed)
            if outcome.ok:
                sender.receiver_is_back()
            elif outcome.error.startswith(_UNREACHABLE):
                sender.unreachable = True
        except StoreError as exc:
            log.warning("webhook outbox: %s", exc, extra={"mailbox": event.mailbox_id})
            await trio.sleep(_STORE_PAUSE)
            sender.dirty = True  # the outbox may differ from what this sender believes
        except Exception as exc:
            # A bug must not take the sender (or the node) down: it counts as a failed attempt.
            log.exception("webhook call failed unexpectedly", extra={"mailbox": event.mailbox_id})
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                try:
                    removed = await self._record(
                        event, _Outcome(False, f"internal error: {type(exc).__name__}")
                    )
                    sender.recorded(event, removed=removed)
                except StoreError:
                    await trio.sleep(_STORE_PAUSE)
            sender.dirty = True
        finally:
            in_flight.discard(event.mailbox_id)
            slots.release()
            sender.wake.set()

    async def _record(self, event: WebhookEvent, outcome: _Outcome) -> bool:
        """Store the outcome of a call; True when the event left the outbox."""
        store = self.store
        if outcome.ok:
            await store.outbox_done(event.endpoint, event.id)
            self._tell(event, "delivered")
            return True
        event.attempts += 1
        event.last_error = outcome.error
        if outcome.final or event.attempts > len(self.retry_delays):
            event.dead_at = time.time()
            await store.outbox_dead_letter(event)
            self._tell(event, "dead_letter")
            log.warning(
                "webhook event dead-lettered after %d attempt(s): %s",
                event.attempts,
                outcome.error,
                extra={"mailbox": event.mailbox_id},
            )
            return True
        if outcome.retry_after is not None:
            delay = outcome.retry_after
        else:
            base = self.retry_delays[event.attempts - 1]
            delay = random.uniform(base * (1 - _JITTER), base * (1 + _JITTER))
        event.next_attempt_at = time.time() + delay
        await store.outbox_retry(event)
        self._tell(event, "retry")
        log.info(
            "webhook call failed (attempt %d), retrying in %.1fs: %s",
            event.attempts,
            delay,
            outcome.error,
            extra={"mailbox": event.mailbox_id},
        )
        return False

    def _tell(self, event: WebhookEvent, outcome: str) -> None:
        if self.on_outcome is not None:
            try:
                self.on_outcome(event, outcome)
            except Exception:
                # An observer's bug must not turn a stored outcome into a second attempt.
                log.exception("webhook outcome observer failed", extra={"mailbox": event.mailbox_id})

    async def _secrets_for(self, event: WebhookEvent) -> tuple[str, ...]:
        """The mailbox's current secrets, else the default (a rotation applies to queued events
        too); for a mailbox removed since the event was queued, the secrets it had then."""
        mailbox_id = event.mailbox_id
        now = time.monotonic()
        cached = self._secrets.get(mailbox_id)
        if cached is None or cached[0] <= now:
            mailbox = await self.store.get_mailbox(mailbox_id)
            current = None if mailbox is None else (mailbox.webhook.secrets if mailbox.webhook else ())
            if len(self._secrets) > 10000:
                self._secrets.clear()
            # Briefly cached: a rotation (PATCH) signs with the new secrets within seconds.
            cached = self._secrets[mailbox_id] = (now + 5.0, current)
        current = cached[1]
        if current is None:  # removed
            return event.secrets or self.default.secrets
        return current or self.default.secrets

    async def _post(self, event: WebhookEvent) -> _Outcome:
        secrets = await self._secrets_for(event)
        if not secrets:
            return _Outcome(
                False,
                "no signing secret (the mailbox has none and EMLISTEN_WEBHOOK_SECRET is not set)",
                final=True,
            )
        # A lone surrogate (possible in mail text) cannot be UTF-8: sent as "?", signed as sent.
        body = event.payload.encode("utf-8", errors="replace")
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": event.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secrets, event.id, timestamp, body),
        }
        try:
            with trio.fail_after(self.timeout + 5):
                response = await self._client.post(event.url, content=body, headers=headers)
        except (httpx.TimeoutException, trio.TooSlowError):
            return _Outcome(False, f"no answer within {self.timeout:g}s")
        except httpx.HTTPError as exc:
            denied = _egress.denial(exc)
            reason = denied.strerror if denied is not None else type(exc).__name__
            return _Outcome(False, f"{_UNREACHABLE}: {reason}")
        except (httpx.InvalidURL, ValueError):
            return _Outcome(False, "the webhook URL cannot be used", final=True)
        status = response.status_code
        if 200 <= status < 300:
            return _Outcome(True)
        snippet = response.text[:200].replace("\n", " ")
        error = f"HTTP {status}" + (f": {snippet}" if snippet else "")
        if status == 429:
            return _Outcome(False, error, retry_after=_retry_after(response.headers.get("retry-after")))
        if 400 <= status < 500 and status != 408:
            return _Outcome(False, error, final=True)
        return _Outcome(False, error)


class RoutingSink(Sink):
    """Mailboxes with a webhook (registered through /v1) go to the webhook sink, the others to
    Creatio's callbacks."""

    def __init__(self, creatio: Sink, webhooks: WebhookSink) -> None:
        self.creatio = creatio
        self.webhooks = webhooks

    def _for(self, mailbox: MailboxConfig) -> Sink:
        return self.creatio if mailbox.webhook is None else self.webhooks

    async def deliver(self, mailbox: MailboxConfig, emails: Sequence[Email], *, idempotency_key: str) -> None:
        await self._for(mailbox).deliver(mailbox, emails, idempotency_key=idempotency_key)

    async def notify_new_ids(self, mailbox: MailboxConfig, ids: Sequence[str]) -> None:
        await self._for(mailbox).notify_new_ids(mailbox, ids)

    async def report_state(
        self, mailbox: MailboxConfig, *, available: bool, error_class: str = "", message: str = ""
    ) -> None:
        await self._for(mailbox).report_state(
            mailbox, available=available, error_class=error_class, message=message
        )

    async def request_token_refresh(self, mailbox: MailboxConfig) -> None:
        await self._for(mailbox).request_token_refresh(mailbox)

    async def aclose(self) -> None:
        await self.creatio.aclose()
        await self.webhooks.aclose()


def find_webhook_sink(sink: Sink) -> WebhookSink | None:
    """The webhook sink of a node's sink (itself, or one route of a RoutingSink)."""
    if isinstance(sink, WebhookSink):
        return sink
    if isinstance(sink, RoutingSink):
        return sink.webhooks
    return None
