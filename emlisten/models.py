"""Plain data shared by every layer: mailbox configuration, checkpoints, states, emails, tasks.

These are pure values (no I/O). The Creatio wire format lives in ``emlisten.api`` (input) and
``emlisten.sink.creatio`` (output); everything in between speaks these types.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

INBOX = "INBOX"


class Security(enum.Enum):
    """How the connection to a mail server is protected (MailKit's SecureSocketOptions names)."""

    NONE = "none"
    SSL_ON_CONNECT = "ssl_on_connect"
    STARTTLS = "starttls"
    STARTTLS_WHEN_AVAILABLE = "starttls_when_available"


@dataclass(frozen=True, slots=True)
class ServerEndpoint:
    host: str
    port: int
    security: Security
    verify_certificate: bool = True


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """Where a mailbox registered through ``/v1`` sends its events (see docs/webhooks.md).

    Empty ``url`` / ``secrets``: the defaults from settings (``EMLISTEN_WEBHOOK_URL``,
    ``EMLISTEN_WEBHOOK_SECRET``). ``secrets`` are Standard Webhooks ``whsec_`` secrets, the
    current one first; during a rotation every one of them signs each call. Hidden from ``repr``.
    """

    url: str = ""
    secrets: tuple[str, ...] = field(default=(), repr=False)


@dataclass(frozen=True, slots=True)
class MailboxConfig:
    """One registered mailbox: a validated ``SynchronizationCredentials`` element.

    ``password`` and ``access_token`` are secrets: ``repr`` hides them so they cannot leak into
    logs or tracebacks.
    """

    id: str
    user_name: str
    #: The incoming server (for Exchange: the EWS/Graph host, port 443, for display and probes).
    imap: ServerEndpoint
    bpm_endpoint: str
    password: str = field(default="", repr=False)
    access_token: str = field(default="", repr=False)
    use_oauth: bool = False
    sender_email: str = ""
    folders: tuple[str, ...] = (INBOX,)
    use_full_email: bool = True
    bpm_user: str = ""
    bpm_user_workspace: str = ""
    bpm_user_time_zone: str = ""
    smtp: ServerEndpoint | None = None
    feature_values: Mapping[str, Any] = field(default_factory=dict)
    context: Mapping[str, Any] = field(default_factory=dict)
    #: Everything Creatio sent, minus secrets, kept so later features can use fields we do not
    #: model yet (e.g. ``ServerTypeId``, ``PersonalMetrics``) without a migration.
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)
    #: Which MailSource serves the mailbox: "imap", "ews" or "graph" (see docs/protocols.md).
    protocol: str = "imap"
    #: Exchange: the full service URL (EWS endpoint, or Graph base URL); empty for IMAP.
    service_url: str = ""
    #: Bumped by the service whenever the subscription must be restarted (recreate, changed
    #: credentials); running listeners compare it to know they are stale.
    revision: int = 0
    #: Set for mailboxes registered through ``/v1``: their mail goes to this webhook (signed
    #: events, docs/webhooks.md) instead of Creatio's callbacks at ``bpm_endpoint``.
    webhook: WebhookTarget | None = None

    def replace(self, **changes: Any) -> MailboxConfig:
        return dataclasses.replace(self, **changes)


class MailboxState(enum.StrEnum):
    """Lifecycle of one subscription, as shown by status and the native API."""

    STARTING = "starting"
    CONNECTING = "connecting"
    LISTENING = "listening"
    AUTHENTICATION_ERROR = "authenticationError"
    CONNECT_ERROR = "connectError"
    CLOSED = "closed"


@dataclass(slots=True)
class MailboxStatus:
    state: MailboxState
    last_error: str | None = None
    updated_at: float = 0.0
    delivered: int = 0
    node: str | None = None


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A live node, as its heartbeat describes it."""

    id: str
    role: str
    mailboxes: int = 0
    #: Wall-clock time (Unix seconds) of the heartbeat.
    seen_at: float = 0.0
    started_at: float = 0.0
    version: str = ""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Per (mailbox, folder): how far delivery got.

    IMAP: the folder's UIDVALIDITY and the highest UID delivered. Protocols without UIDs (EWS
    SyncState, Graph deltaLink) keep their position in ``cursor`` and count ``last_uid`` up by
    one per accepted batch, so "only forward" means the same thing for every protocol.
    """

    uidvalidity: int
    last_uid: int
    cursor: str = ""


#: Task reasons that ask for a look at a folder, not for mail a listener saw: "recheck" after
#: new mail, "recheck-connect" after the first IDLE of a session. Listeners look for
#: themselves (see ImapSource, since 0.1.0); workers still take such tasks from earlier primaries
#: during a rolling upgrade, as ordinary syncs.
RECHECK_REASONS = frozenset({"recheck", "recheck-connect"})


@dataclass(frozen=True, slots=True)
class SyncTask:
    """Work item: "folder F of mailbox M has new mail (at least up to UID ``uid_hint``)".

    Tasks are nudges, not payloads: the worker always syncs from the stored checkpoint, so a
    duplicate, late or coalesced task is harmless and a lost one is repaired by the next catch-up.

    A listener that fetched the new mail on its own session attaches it (``prefetched``): every
    message of the folder with a UID in ``prefetch_from..prefetch_to`` (within ``uidvalidity``)
    that existed when it fetched, complete, in UID order. A worker whose checkpoint has reached
    ``prefetch_from - 1`` delivers them without opening a session of its own; otherwise (a gap,
    another UIDVALIDITY, ``uid_hint`` beyond ``prefetch_to``) it reads from the server as usual.
    """

    mailbox_id: str
    folder: str
    uidvalidity: int = 0
    uid_hint: int = 0
    reason: str = "exists"
    #: Wall-clock time the listener saw the new mail (for the seen-to-delivered latency metric).
    seen_at: float = 0.0
    #: With reason "catch-up": the protocol's position at subscription time (e.g. an EWS
    #: SyncState), stored as the checkpoint's cursor when the folder has no checkpoint yet.
    seed_cursor: str = ""
    prefetched: tuple[RawMessage, ...] = ()
    prefetch_from: int = 0
    prefetch_to: int = 0

    @property
    def has_prefetch(self) -> bool:
        return self.prefetch_to >= self.prefetch_from > 0

    def covered_by(self, checkpoint: Checkpoint | None) -> bool:
        """The checkpoint already covers what this task announced (a UID protocol's task with a
        hint; a nudge without one, or a cursor protocol's, always means "ask the server")."""
        return (
            checkpoint is not None
            and not self.seed_cursor
            and not checkpoint.cursor
            and self.uid_hint > 0
            and checkpoint.uidvalidity == self.uidvalidity
            and checkpoint.last_uid >= self.uid_hint
        )

    def _head(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "mailbox_id": self.mailbox_id,
            "folder": self.folder,
            "uidvalidity": self.uidvalidity,
            "uid_hint": self.uid_hint,
            "reason": self.reason,
            "seen_at": self.seen_at,
            "seed_cursor": self.seed_cursor,
        }
        if self.has_prefetch:
            data["prefetch_from"] = self.prefetch_from
            data["prefetch_to"] = self.prefetch_to
        return data

    @staticmethod
    def _carried(raw: RawMessage) -> dict[str, Any]:
        """A carried message's fields besides its content."""
        return {
            "uid": raw.uid,
            "internal_date": raw.internal_date.isoformat() if raw.internal_date else None,
            "size": raw.size,
            "key": raw.key,
        }

    def to_dict(self) -> dict[str, Any]:
        data = self._head()
        if self.has_prefetch:
            # JSON carries text: base64 keeps 8-bit mail intact (+33 %, small mails only).
            data["prefetched"] = [
                {**self._carried(raw), "data": base64.b64encode(raw.data).decode("ascii")}
                for raw in self.prefetched
            ]
        return data

    def to_json(self) -> bytes:
        """``to_dict()`` as compact JSON (UTF-8), the form tasks travel in between processes.

        Built by hand around the mail: base64 text never needs JSON escaping, and letting
        ``json.dumps`` scan it cost a primary 7 % of its CPU in a split-role backlog drain."""
        head = _compact_json(self._head())
        if not self.has_prefetch:
            return head
        parts = [head[:-1], b',"prefetched":[']
        for n, raw in enumerate(self.prefetched):
            parts += (
                b"," if n else b"",
                _compact_json(self._carried(raw))[:-1],
                b',"data":"',
                base64.b64encode(raw.data),
                b'"}',
            )
        parts.append(b"]}")
        return b"".join(parts)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SyncTask:
        uidvalidity = int(data.get("uidvalidity", 0))

        def date(item: Mapping[str, Any]) -> datetime | None:
            text = item.get("internal_date")
            return datetime.fromisoformat(text) if text else None

        prefetched = tuple(
            RawMessage(
                uid=int(item["uid"]),
                data=base64.b64decode(item["data"]),
                internal_date=date(item),
                size=int(item["size"]) if item.get("size") is not None else None,
                key=str(item.get("key", "")),
                position=Checkpoint(uidvalidity, int(item["uid"])),
            )
            for item in data.get("prefetched", ())
        )
        return cls(
            mailbox_id=str(data["mailbox_id"]),
            folder=str(data["folder"]),
            uidvalidity=uidvalidity,
            uid_hint=int(data.get("uid_hint", 0)),
            reason=str(data.get("reason", "exists")),
            seen_at=float(data.get("seen_at", 0.0)),
            seed_cursor=str(data.get("seed_cursor", "")),
            prefetched=prefetched,
            prefetch_from=int(data.get("prefetch_from", 0)),
            prefetch_to=int(data.get("prefetch_to", 0)),
        )


def _compact_json(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class FolderInfo:
    """What SELECT tells about a folder."""

    name: str
    uidvalidity: int
    uidnext: int
    exists: int


@dataclass(frozen=True, slots=True)
class RawMessage:
    """One message as fetched from the server.

    ``key`` identifies it within its folder for good (IMAP: "UIDVALIDITY/UID"; Exchange: the
    item id); ``position`` is the checkpoint just past it when the protocol can resume there
    (IMAP can after every message; a sync token only after the whole batch).
    """

    uid: int
    data: bytes
    internal_date: datetime | None = None
    size: int | None = None
    key: str = ""
    position: Checkpoint | None = None


@dataclass(frozen=True, slots=True)
class Attachment:
    id: str
    name: str
    data: bytes = field(repr=False)
    content_type: str = "application/octet-stream"
    is_inline: bool = False
    content_id: str | None = None


class Importance(enum.IntEnum):
    """Creatio's importance values (as Exchange's: Low=0, Normal=1, High=2)."""

    LOW = 0
    NORMAL = 1
    HIGH = 2


@dataclass(slots=True)
class Email:
    """A received message in the shape Creatio consumes (see ``sink.creatio`` for the wire names)."""

    id: str
    subject: str = ""
    body: str = ""
    is_html_body: bool = False
    sender: str = ""
    recipients: list[str] = field(default_factory=list)
    copy_recipients: list[str] = field(default_factory=list)
    blind_copy_recipients: list[str] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    importance: Importance = Importance.NORMAL
    attachments: list[Attachment] = field(default_factory=list)
    send_date: datetime | None = None
    message_id: str = ""
    in_reply_to: str = ""
    references: list[str] = field(default_factory=list)
    #: True when the message exceeded the configured maximum size and was cut.
    truncated: bool = False
    #: The folder it was found in (set by the delivery worker; webhook events carry it).
    folder: str = ""


@dataclass(slots=True)
class WebhookEvent:
    """One event waiting in a webhook outbox, or in the dead letters once its retries ran out.

    ``payload`` is the JSON body exactly as it is sent (and signed). ``endpoint`` names the
    outbox it waits in (a key derived from ``url``, opaque to stores): one outbox per receiver.
    """

    id: str
    endpoint: str
    url: str
    mailbox_id: str
    type: str
    payload: str
    created_at: float
    attempts: int = 0
    #: Wall-clock time (Unix seconds) before which it is not tried again.
    next_attempt_at: float = 0.0
    last_error: str = ""
    #: When it was moved to the dead letters (0: still in the outbox).
    dead_at: float = 0.0
    #: The mailbox's signing secrets when it was queued: they sign it if the mailbox is removed
    #: before it is sent (otherwise the mailbox's current ones do). Hidden from ``repr``.
    secrets: tuple[str, ...] = field(default=(), repr=False)


def message_key(mailbox_id: str, folder: str, key: str) -> str:
    """Stable identity of a message: the same mail always gets the same key (and Email.Id)."""

    return f"{mailbox_id}/{folder}/{key}"


_EMAIL_ID_NAMESPACE = uuid.UUID("6f1d3c2e-9b7a-4f53-8d2e-3a1c5e7b9f00")


def email_id(mailbox_id: str, folder: str, key: str) -> str:
    """Deterministic GUID for a message, so a redelivery carries the same ``Email.Id``."""

    return str(uuid.uuid5(_EMAIL_ID_NAMESPACE, message_key(mailbox_id, folder, key)))


def folders_or_inbox(folders: Sequence[str]) -> tuple[str, ...]:
    cleaned = tuple(dict.fromkeys(f for f in folders if f))
    return cleaned or (INBOX,)
