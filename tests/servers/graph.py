"""A Microsoft Graph simulator: a real HTTP server with the mail and subscription endpoints
emlisten uses, written from Microsoft's Graph documentation (v1.0).

Covered:
- Bearer auth per user (delegated tokens): a missing, unknown or revoked token is 401 with
  ``InvalidAuthenticationToken``; another user's mailbox is 403 ``ErrorAccessDenied``.
- ``users/{id}/mailFolders`` (list, get by id or by the well-known name ``inbox``, also in the
  ``mailFolders('inbox')`` form), ``users/{id}/messages/{id}/$value`` (the MIME as stored).
- Delta queries on a folder's messages: a first round listing the folder, later rounds with the
  changes since the deltaLink (created, updated, ``@removed``), the custom option
  ``changeType=created`` kept inside the links, ``$select``, paging with ``@odata.nextLink`` as
  asked by ``Prefer: odata.maxpagesize``; expired sync states answer 410 on demand.
- Subscriptions: create (validation handshake on the notification and lifecycle URLs first:
  ``POST url?validationToken=...`` that must answer 200 with the token as text within 10 s, else
  the create is 400), get, renew (PATCH), reauthorize, delete; expiry (an expired subscription is
  gone: 404, no notifications); at most 10080 minutes for messages.
- Change notifications (``changeType=created``, with ``clientState``, ``resource`` and
  ``resourceData``) POSTed to the subscription's URL for each new message, retried a few times
  when the endpoint fails; lifecycle notifications (``missed``, ``subscriptionRemoved``,
  ``reauthorizationRequired``) on demand; notifications can be dropped for a while.
- ``GET .../mailFolders/{id}/messages`` with ``$filter``/``$orderby`` on ``receivedDateTime``,
  ``$select``, ``$top``/``$skip`` and ``@odata.nextLink`` (pages capped at ``max_list_page``).
- Throttling on demand: the next N requests (of every mailbox, or of one) answer 429 (or 503)
  with ``Retry-After``; every
  request is recorded with its arrival time so tests can check that the client waited.
- A folder tree: Inbox and Sent Items below the (unlisted) root, plus added folders at any depth;
  ``mailFolders`` (the top level) and ``mailFolders/{id}/childFolders``, with ``parentFolderId``,
  ``childFolderCount``, ``$top`` (default 10, as Graph) and ``@odata.nextLink`` paging.
- ``POST users/{id}/sendMail`` in the MIME form (``Content-Type: text/plain``, base64 MIME):
  recipients from the To/Cc/Bcc headers, every send recorded in ``sent`` with the exact MIME, a
  copy (Bcc kept) in Sent Items (``saveToSentItems`` is implied in the MIME form), delivery (Bcc
  header removed) to recipients that are simulator users, ``202``. Refusals: 400
  ``ErrorMimeContentInvalidBase64String``, 400 ``ErrorInvalidRecipients`` (none, malformed, or in
  ``rejected_recipients``), 403 ``ErrorSendAsDenied`` (``From`` is not the mailbox), 413
  ``RequestEntityTooLarge`` (over ``max_request_bytes``, 4 MB as Graph).

Not covered: HTTPS (real Graph requires an https notification URL; the simulator accepts
http), app-only tokens and the token endpoint, rich notifications (resource data, encryption),
batching (``$batch``), most OData options (``$filter`` and ``$orderby`` only on
``receivedDateTime`` of a folder's ``messages``; ``$top``/``$skip`` only there and on folder
lists), ``sendMail`` with a JSON message, folder hierarchy changes and ``mailFolders/delta``, the
notification delays and batching of the real service, and Graph's long retry schedule
(hours) for failing notification endpoints.
"""

from __future__ import annotations

import base64
import email
import email.policy
import itertools
import json
import logging
import operator
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from typing import Any
from urllib.parse import quote, unquote

import httpx
import quart_trio
import trio
from quart import Response, request

from tests.servers._http import serve_app, server_config

log = logging.getLogger(__name__)

MAX_MESSAGE_SUBSCRIPTION_MINUTES = 10080
VALIDATION_TIMEOUT = 10.0
NOTIFICATION_TIMEOUT = 3.0
TENANT_ID = "00000000-0000-4000-8000-00000000beef"
#: What an app-only token stands for: any mailbox (application permissions).
APP_CALLER = "*app*"


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso_ms(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_iso(text: str) -> datetime:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = {
        "error": {
            "code": code,
            "message": message,
            "innerError": {"date": _iso(_now()), "request-id": str(uuid.uuid4())},
        }
    }
    response = Response(json.dumps(body), status=status, content_type="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _json(payload: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(payload), status=status, content_type="application/json; odata.metadata=minimal"
    )


def _without_bcc(mime: bytes) -> bytes:
    """The message as transport delivers it: the Bcc header (and its folded lines) removed."""
    end = mime.find(b"\r\n\r\n")
    if end < 0:
        return mime
    kept: list[bytes] = []
    skipping = False
    for line in mime[: end + 2].split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = line.lower().startswith(b"bcc:")
        if not skipping:
            kept.append(line)
    return b"\r\n".join(kept) + mime[end + 2 :]


def _new_id() -> str:
    # Graph ids are long URL-safe base64 strings.
    return base64.urlsafe_b64encode(b"AAMk" + secrets.token_bytes(60)).decode("ascii").rstrip("=")


@dataclass
class SimMessage:
    id: str
    folder_id: str
    mime: bytes
    received: datetime
    subject: str
    change_key: int = 0


#: Attachments from this size on must go through an upload session (Graph: 3 MB).
UPLOAD_SESSION_MIN_BYTES = 3 * 1024 * 1024


@dataclass(frozen=True)
class SimAttachment:
    name: str
    content_type: str
    data: bytes
    inline: bool
    content_id: str


def _attachment_of(item: dict[str, Any], data: bytes) -> SimAttachment:
    return SimAttachment(
        name=str(item.get("name") or "attachment"),
        content_type=str(item.get("contentType") or "application/octet-stream"),
        data=data,
        inline=bool(item.get("isInline")),
        content_id=str(item.get("contentId") or ""),
    )


@dataclass
class SimDraft:
    id: str
    user: str
    mime: bytes
    attachments: list[SimAttachment] = field(default_factory=list)

    def final_mime(self) -> bytes:
        """The draft's MIME with its added attachments, as Exchange builds the sent message."""
        if not self.attachments:
            return self.mime
        message = email.message_from_bytes(self.mime, policy=email.policy.default)
        assert isinstance(message, email.message.EmailMessage)
        for attachment in self.attachments:
            maintype, _, subtype = attachment.content_type.partition("/")
            message.add_attachment(
                attachment.data,
                maintype=maintype or "application",
                subtype=subtype or "octet-stream",
                filename=attachment.name,
                disposition="inline" if attachment.inline else "attachment",
                cid=f"<{attachment.content_id}>" if attachment.content_id else None,
            )
        return message.as_bytes(policy=email.policy.SMTP)


@dataclass
class SimUpload:
    draft_id: str
    item: dict[str, Any]
    size: int
    received: bytearray = field(default_factory=bytearray)


@dataclass
class SimFolder:
    id: str
    name: str
    well_known: str = ""
    parent_id: str = ""
    messages: dict[str, SimMessage] = field(default_factory=dict)
    #: (seq, kind, message id): kind "created" | "updated" | "deleted".
    changes: list[tuple[int, str, str]] = field(default_factory=list)


@dataclass
class SimUser:
    email: str
    id: str
    folders: dict[str, SimFolder] = field(default_factory=dict)
    #: The id of msgfolderroot: the parent of the top-level folders (not listed itself).
    root_id: str = field(default_factory=_new_id)

    def folder(self, key: str) -> SimFolder | None:
        key_lower = key.lower()
        for folder in self.folders.values():
            if folder.id == key or (folder.well_known and folder.well_known == key_lower):
                return folder
        return None


@dataclass
class SimSubscription:
    id: str
    user: str
    folder_id: str
    resource: str
    change_type: str
    notification_url: str
    lifecycle_url: str
    client_state: str
    expiration: datetime
    creator_token: str

    def to_json(self) -> dict[str, Any]:
        return {
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#subscriptions/$entity",
            "id": self.id,
            "resource": self.resource,
            "applicationId": "00000000-0000-4000-8000-0000000000ap",
            "changeType": self.change_type,
            "clientState": self.client_state,
            "notificationUrl": self.notification_url,
            "lifecycleNotificationUrl": self.lifecycle_url or None,
            "expirationDateTime": _iso_ms(self.expiration),
            "creatorId": self.user,
            "latestSupportedTlsVersion": "v1_2",
            "includeResourceData": False,
            "notificationContentType": "application/json",
        }


@dataclass(frozen=True)
class SentMail:
    """One message sent with sendMail, as the simulator received it (MIME decoded)."""

    address: str
    mime: bytes
    recipients: tuple[str, ...]
    saved_message_id: str


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    status: int
    at: float  # time.monotonic()


@dataclass(frozen=True)
class SentNotification:
    subscription_id: str
    kind: str  # "created" or a lifecycle event
    url: str
    status: int | None  # None: no answer (timeout, connection refused)
    at: float


_RESOURCE = re.compile(
    r"^/?(?:users/(?P<user>[^/]+)|me)/mailFolders(?:\('(?P<quoted>[^']+)'\)|/(?P<plain>[^/]+))/messages$",
    re.IGNORECASE,
)
_FOLDER = r"mailFolders(?:\('(?P<quoted>[^']+)'\)|/(?P<plain>[^/()]+))"


class GraphSimulator:
    """``await nursery.start(sim.serve)``; then ``sim.base_url`` is the service URL."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.users: dict[str, SimUser] = {}
        self.tokens: dict[str, str] = {}  # token -> user email (lower), or APP_CALLER
        self.apps: dict[tuple[str, str], str] = {}  # (tenant, client id) -> client secret
        self.token_requests = 0
        self.subscriptions: dict[str, SimSubscription] = {}
        self.requests: list[RecordedRequest] = []
        self.notifications: list[SentNotification] = []
        self.validations: list[tuple[str, int | None]] = []
        self._seq = itertools.count(1)
        self._last_seq = 0
        self._epoch = 0
        self._throttle: list[tuple[int, str]] = []  # (status, Retry-After) for the next requests
        self._user_throttle: dict[str, list[tuple[int, str]]] = {}  # the same, per mailbox
        self._upload_throttle: list[tuple[int, str]] = []  # the same, for upload-session PUTs
        self._dropping: set[str] = set()
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._http: httpx.AsyncClient | None = None
        self.sent: list[SentMail] = []
        #: Addresses sendMail refuses with ErrorInvalidRecipients (lowercase).
        self.rejected_recipients: set[str] = set()
        self.max_request_bytes = 4 * 1024 * 1024
        #: Drafts (large mail: draft, attachments, send) and open upload sessions by token.
        self.drafts: dict[str, SimDraft] = {}
        self.uploads: dict[str, SimUpload] = {}
        #: Size of every upload-session chunk received.
        self.upload_chunks: list[int] = []
        #: Exchange Online's limits for one attachment and one message (150 MB).
        self.max_attachment_bytes = 150 * 1024 * 1024
        self.max_message_bytes = 150 * 1024 * 1024
        #: Messages one ``GET .../messages`` page returns at most, whatever ``$top`` asks.
        self.max_list_page = 1000
        self.app = self._make_app()

    # -- server ------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = server_config(self.host)
        # No keep-alive towards the notification endpoints: an idle kept-alive connection makes
        # the receiving node's graceful shutdown wait for its full timeout.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits) as http, trio.open_nursery() as nursery:
            self._http = http
            self._nursery = nursery
            self.port = await nursery.start(serve_app, self.app, config)
            task_status.started()

    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("the Graph simulator is not serving yet")
        return f"http://{self.host}:{self.port}"

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Any, *, timeout: float = 10.0) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()

    # -- test controls -----------------------------------------------------------------------

    def add_user(self, email_address: str | None = None) -> tuple[str, str]:
        """A new mailbox with an inbox; returns (email, bearer token)."""
        address = (email_address or f"user-{uuid.uuid4().hex[:10]}@contoso.test").lower()
        user = SimUser(address, str(uuid.uuid4()))
        inbox = SimFolder(_new_id(), "Inbox", "inbox", user.root_id)
        user.folders[inbox.id] = inbox
        sent = SimFolder(_new_id(), "Sent Items", "sentitems", user.root_id)
        user.folders[sent.id] = sent
        self.users[address] = user
        return address, self.issue_token(address)

    def issue_token(self, address: str) -> str:
        token = "eyJ0eXAiOiJKV1Qi." + secrets.token_urlsafe(24)
        self.tokens[token] = address.lower()
        return token

    def register_app(self, tenant_id: str, client_id: str, client_secret: str) -> None:
        """An app with application permissions on every mailbox (client-credentials grant at
        ``{base_url}/{tenant}/oauth2/v2.0/token``)."""
        self.apps[(tenant_id, client_id)] = client_secret

    def revoke_token(self, token: str) -> None:
        self.tokens.pop(token, None)

    def add_folder(self, address: str, name: str, *, parent: str | None = None) -> str:
        """A folder below ``parent`` (an id or well-known name; default: the top level)."""
        user = self.users[address.lower()]
        parent_id = user.root_id
        if parent is not None:
            found = user.folder(parent)
            if found is None:
                raise KeyError(parent)
            parent_id = found.id
        folder = SimFolder(_new_id(), name, parent_id=parent_id)
        user.folders[folder.id] = folder
        return folder.id

    def messages_in(self, address: str, folder: str) -> list[SimMessage]:
        return list(self._folder_of(address, folder).messages.values())

    def _folder_of(self, address: str, folder: str) -> SimFolder:
        found = self.users[address.lower()].folder(folder)
        if found is None:
            raise KeyError(folder)
        return found

    def _record_change(self, folder: SimFolder, kind: str, message_id: str) -> None:
        seq = next(self._seq)
        self._last_seq = seq
        folder.changes.append((seq, kind, message_id))

    def add_message(
        self, address: str, mime: bytes, folder: str = "inbox", *, received: datetime | None = None
    ) -> str:
        """A message arrives (as delivered by transport); notifies matching subscriptions.
        ``received``: its ``receivedDateTime`` (default now)."""
        target = self._folder_of(address, folder)
        parsed = email.message_from_bytes(mime, policy=email.policy.default)
        message = SimMessage(_new_id(), target.id, mime, received or _now(), str(parsed.get("Subject", "")))
        target.messages[message.id] = message
        self._record_change(target, "created", message.id)
        for subscription in self._live_subscriptions():
            if (
                subscription.user == address.lower()
                and subscription.folder_id == target.id
                and "created" in subscription.change_type.split(",")
            ):
                if address.lower() in self._dropping:
                    continue
                self._notify(subscription, self._change_payload(subscription, message))
        self._changed_now()
        return message.id

    def update_message(self, address: str, message_id: str, folder: str = "inbox") -> None:
        """Something changed on the message (e.g. read): an "updated" change in delta rounds."""
        target = self._folder_of(address, folder)
        target.messages[message_id].change_key += 1
        self._record_change(target, "updated", message_id)

    def delete_message(self, address: str, message_id: str, folder: str = "inbox") -> None:
        target = self._folder_of(address, folder)
        del target.messages[message_id]
        self._record_change(target, "deleted", message_id)

    def throttle(
        self, count: int = 1, *, retry_after: str = "1", status: int = 429, user: str | None = None
    ) -> None:
        """The next ``count`` requests answer ``status`` with this ``Retry-After``; with ``user``,
        the next requests on that mailbox only (Graph throttles per app and mailbox)."""
        if user is None:
            self._throttle.extend([(status, retry_after)] * count)
        else:
            self._user_throttle.setdefault(user.lower(), []).extend([(status, retry_after)] * count)

    def throttle_uploads(self, count: int = 1, *, retry_after: str = "1", status: int = 429) -> None:
        """The next ``count`` upload-session chunks answer ``status`` with this ``Retry-After``."""
        self._upload_throttle.extend([(status, retry_after)] * count)

    def drop_notifications(self, address: str, dropping: bool = True) -> None:
        """While dropping, new mail of this user sends no change notification."""
        if dropping:
            self._dropping.add(address.lower())
        else:
            self._dropping.discard(address.lower())

    def expire_sync_states(self) -> None:
        """Every delta link issued so far answers 410 Gone from now on."""
        self._epoch += 1

    def subscriptions_of(self, address: str) -> list[SimSubscription]:
        return [s for s in self._live_subscriptions() if s.user == address.lower()]

    def _live_subscriptions(self) -> list[SimSubscription]:
        now = _now()
        for subscription_id in [k for k, s in self.subscriptions.items() if s.expiration <= now]:
            del self.subscriptions[subscription_id]
        return list(self.subscriptions.values())

    def send_lifecycle(self, subscription_id: str, event: str) -> None:
        subscription = self.subscriptions[subscription_id]
        if not subscription.lifecycle_url:
            return
        payload = {
            "value": [
                {
                    "subscriptionId": subscription.id,
                    "subscriptionExpirationDateTime": _iso_ms(subscription.expiration),
                    "tenantId": TENANT_ID,
                    "clientState": subscription.client_state,
                    "lifecycleEvent": event,
                }
            ]
        }
        self._post_soon(subscription.id, event, subscription.lifecycle_url, payload)

    def remove_subscription(self, subscription_id: str, *, notify: bool = True) -> None:
        """Graph drops a subscription (e.g. the mailbox moved); tells the app when ``notify``."""
        if notify:
            self.send_lifecycle(subscription_id, "subscriptionRemoved")
        self.subscriptions.pop(subscription_id, None)
        self._changed_now()

    def requests_to(self, method: str, pattern: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    # -- notifications out -------------------------------------------------------------------

    def _change_payload(self, subscription: SimSubscription, message: SimMessage) -> dict[str, Any]:
        user = self.users[subscription.user]
        resource = f"Users/{user.id}/Messages/{message.id}"
        return {
            "value": [
                {
                    "subscriptionId": subscription.id,
                    "subscriptionExpirationDateTime": _iso_ms(subscription.expiration),
                    "changeType": "created",
                    "resource": resource,
                    "resourceData": {
                        "@odata.type": "#Microsoft.Graph.Message",
                        "@odata.id": resource,
                        "@odata.etag": f'W/"{message.change_key}"',
                        "id": message.id,
                    },
                    "clientState": subscription.client_state,
                    "tenantId": TENANT_ID,
                }
            ]
        }

    def _notify(self, subscription: SimSubscription, payload: dict[str, Any]) -> None:
        self._post_soon(subscription.id, "created", subscription.notification_url, payload)

    def _post_soon(self, subscription_id: str, kind: str, url: str, payload: dict[str, Any]) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._post_with_retries, subscription_id, kind, url, payload)

    async def _post_with_retries(
        self, subscription_id: str, kind: str, url: str, payload: dict[str, Any]
    ) -> None:
        assert self._http is not None
        for attempt in range(4):
            status: int | None = None
            try:
                response = await self._http.post(url, json=payload, timeout=NOTIFICATION_TIMEOUT)
                status = response.status_code
            except httpx.HTTPError:
                status = None
            self.notifications.append(SentNotification(subscription_id, kind, url, status, time.monotonic()))
            self._changed_now()
            if status is not None and 200 <= status < 300:
                return
            await trio.sleep(0.2 * 2**attempt)

    async def _validate_url(self, url: str) -> bool:
        assert self._http is not None
        token = (
            f"Validation: Testing client application reachability for subscription Request-Id: {uuid.uuid4()}"
        )
        separator = "&" if "?" in url else "?"
        try:
            response = await self._http.post(
                f"{url}{separator}validationToken={quote(token)}",
                headers={"Content-Type": "text/plain; charset=utf-8"},
                timeout=VALIDATION_TIMEOUT,
            )
        except httpx.HTTPError:
            self.validations.append((url, None))
            return False
        self.validations.append((url, response.status_code))
        return response.status_code == 200 and response.text == token

    # -- HTTP --------------------------------------------------------------------------------

    def _make_app(self) -> quart_trio.QuartTrio:
        app = quart_trio.QuartTrio(__name__)

        @app.route("/v1.0/<path:rest>", methods=["GET", "POST", "PATCH", "DELETE"])
        async def graph(rest: str) -> Response:
            response = await self._handle(request.method, unquote(request.path[len("/v1.0/") :]))
            self.requests.append(
                RecordedRequest(request.method, request.path, response.status_code, time.monotonic())
            )
            self._changed_now()
            return response

        @app.put("/upload/<token>")
        async def upload(token: str) -> Response:
            response = await self._upload_chunk(token)
            recorded = RecordedRequest("PUT", "/upload/...", response.status_code, time.monotonic())
            self.requests.append(recorded)
            self._changed_now()
            return response

        @app.post("/<tenant>/oauth2/v2.0/token")
        async def token_endpoint(tenant: str) -> Response:
            form = await request.form
            self.token_requests += 1
            secret = self.apps.get((tenant, form.get("client_id", "")))
            # The global audience, or this server's own (as a national cloud has its own).
            scopes = ("https://graph.microsoft.com/.default", f"{self.base_url}/.default")
            if form.get("grant_type") != "client_credentials" or form.get("scope") not in scopes:
                return _json({"error": "invalid_request", "error_description": "AADSTS900144"}, 400)
            if secret is None or form.get("client_secret") != secret:
                return _json({"error": "invalid_client", "error_description": "AADSTS7000215"}, 401)
            token = "eyJhcHAi." + secrets.token_urlsafe(24)
            self.tokens[token] = APP_CALLER
            return _json(
                {"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": token}
            )

        return app

    def _authenticate(self) -> tuple[str | None, Response | None]:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None, _error(
                401, "InvalidAuthenticationToken", "Access token is empty.", {"WWW-Authenticate": "Bearer"}
            )
        address = self.tokens.get(token.strip())
        if address is None:
            return None, _error(
                401,
                "InvalidAuthenticationToken",
                "Lifetime validation failed, the token is expired.",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return address, None

    @staticmethod
    def _throttled(queue: list[tuple[int, str]]) -> Response:
        status, retry_after = queue.pop(0)
        code = "TooManyRequests" if status == 429 else "ServiceUnavailable"
        return _error(
            status,
            code,
            "Application is over its MailboxConcurrency limit.",
            {"Retry-After": retry_after},
        )

    async def _handle(self, method: str, path: str) -> Response:
        if self._throttle:
            return self._throttled(self._throttle)
        caller, failure = self._authenticate()
        if failure is not None:
            return failure
        assert caller is not None
        path = path.strip("/")
        target = re.match(r"users/([^/]+)", path, re.IGNORECASE)
        throttled = self._user_throttle.get(target.group(1).lower() if target else caller)
        if throttled:
            return self._throttled(throttled)

        if path == "subscriptions" and method == "POST":
            return await self._create_subscription(caller)
        match = re.fullmatch(r"subscriptions/([^/]+)(/reauthorize)?", path)
        if match:
            return await self._subscription(method, match.group(1), bool(match.group(2)), caller)

        match = re.fullmatch(r"(?:users/(?P<user>[^/]+)|me)(?P<rest>/.*)?", path, re.IGNORECASE)
        if not match:
            return _error(400, "BadRequest", f"Resource not found for the segment '{path.split('/')[0]}'.")
        address = (match.group("user") or caller).lower()
        user = self.users.get(address)
        if user is None:
            return _error(404, "ErrorInvalidUser", f"The requested user '{address}' is invalid.")
        if address != caller and caller != APP_CALLER:
            return _error(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        rest = (match.group("rest") or "").strip("/")

        if rest.lower() == "mailfolders" and method == "GET":
            return self._folder_list(user, user.root_id)
        if rest.lower() == "sendmail" and method == "POST":
            return await self._send_mail(user)
        match = re.fullmatch(_FOLDER + r"(?P<tail>/.*)?", rest, re.IGNORECASE)
        if match:
            folder = user.folder(match.group("quoted") or match.group("plain"))
            if folder is None:
                return _error(404, "ErrorItemNotFound", "The specified object was not found in the store.")
            tail = (match.group("tail") or "").strip("/")
            if tail == "" and method == "GET":
                return _json(self._folder_json(user, folder))
            if tail.lower() == "childfolders" and method == "GET":
                return self._folder_list(user, folder.id)
            if tail.lower() in ("messages/delta", "messages/microsoft.graph.delta()") and method == "GET":
                return self._delta(user, folder)
            if tail.lower() == "messages" and method == "GET":
                return self._list_messages(user, folder)
            return _error(400, "BadRequest", "Unsupported segment in this simulator.")
        if rest.lower() == "messages" and method == "POST":
            return await self._create_draft(user)
        match = re.fullmatch(r"messages/([^/]+)(/.*)?", rest)
        if match and match.group(1) in self.drafts:
            return await self._draft_request(user, method, match.group(1), (match.group(2) or "").strip("/"))
        match = re.fullmatch(r"messages/([^/]+)/\$value", rest)
        if match and method == "GET":
            for folder in user.folders.values():
                found = folder.messages.get(match.group(1))
                if found is not None:
                    return Response(found.mime, status=200, content_type="text/plain")
            return _error(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return _error(400, "BadRequest", "Unsupported request in this simulator.")

    def _folder_list(self, user: SimUser, parent_id: str) -> Response:
        children = [f for f in user.folders.values() if f.parent_id == parent_id]
        try:
            top = int(request.args.get("$top", "10"))
            skip = int(request.args.get("$skip", "0"))
        except ValueError:
            return _error(400, "BadRequest", "Invalid $top or $skip.")
        if not 1 <= top <= 1000 or skip < 0:
            return _error(400, "BadRequest", "Invalid $top or $skip.")
        page = children[skip : skip + top]
        payload: dict[str, Any] = {
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users('x')/mailFolders",
            "value": [self._folder_json(user, f) for f in page],
        }
        if skip + top < len(children):
            args = {k: v for k, v in request.args.items() if k not in ("$skip", "$top")}
            args.update({"$top": str(top), "$skip": str(skip + top)})
            query = "&".join(f"{quote(k, safe='$')}={quote(v, safe=',')}" for k, v in args.items())
            payload["@odata.nextLink"] = f"{self.base_url}{request.path}?{query}"
        return _json(payload)

    async def _send_mail(self, user: SimUser) -> Response:
        data = await request.get_data(as_text=False)
        assert isinstance(data, bytes)
        if len(data) > self.max_request_bytes:
            return _error(413, "RequestEntityTooLarge", "The request is larger than the maximum allowed.")
        if not request.headers.get("Content-Type", "").lower().startswith("text/plain"):
            return _error(400, "BadRequest", "The simulator only takes sendMail in MIME form (text/plain).")
        try:
            mime = base64.b64decode(b"".join(data.split()), validate=True)
        except ValueError:
            return _error(
                400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content."
            )
        return self._submit(user, mime)

    def _submit(self, user: SimUser, mime: bytes) -> Response:
        """Send ``mime`` as ``user``: check it as Exchange does, keep a copy, deliver it."""
        headers = BytesHeaderParser(policy=email.policy.default).parsebytes(mime)

        def addresses(*names: str) -> list[str]:
            values = [str(v) for name in names for v in headers.get_all(name, [])]
            return [a for _, a in getaddresses(values) if a]

        recipients = addresses("To", "Cc", "Bcc")
        if not recipients:
            return _error(
                400,
                "ErrorInvalidRecipients",
                "At least one recipient is not valid., "
                "A message can't be sent because it contains no recipients.",
            )
        bad = [r for r in recipients if "@" not in r or r.lower() in self.rejected_recipients]
        if bad:
            return _error(
                400,
                "ErrorInvalidRecipients",
                f"At least one recipient is not valid., Recipient '{bad[0]}' is not resolved. "
                "All recipients must be resolved before a message can be submitted.",
            )
        if any(a.lower() != user.email for a in addresses("From")):
            return _error(
                403,
                "ErrorSendAsDenied",
                "The user account which was used to submit this request does not have the right to "
                "send mail on behalf of the specified sending account.",
            )
        saved = self.add_message(user.email, mime, "sentitems")
        self.sent.append(SentMail(user.email, mime, tuple(recipients), saved))
        delivered = _without_bcc(mime)
        for recipient in dict.fromkeys(r.lower() for r in recipients):
            if recipient in self.users:
                self.add_message(recipient, delivered)
        return Response("", status=202)

    @staticmethod
    def _folder_json(user: SimUser, folder: SimFolder) -> dict[str, Any]:
        return {
            "id": folder.id,
            "displayName": folder.name,
            "parentFolderId": folder.parent_id or None,
            "childFolderCount": sum(1 for f in user.folders.values() if f.parent_id == folder.id),
            "totalItemCount": len(folder.messages),
            "unreadItemCount": len(folder.messages),
        }

    # -- subscriptions -----------------------------------------------------------------------

    async def _create_subscription(self, caller: str) -> Response:
        try:
            body = json.loads(await request.get_data(as_text=True))
        except ValueError:
            return _error(400, "BadRequest", "Unable to read JSON request payload.")
        if not isinstance(body, dict):
            return _error(400, "BadRequest", "Unable to read JSON request payload.")
        for name in ("changeType", "notificationUrl", "resource", "expirationDateTime"):
            if not isinstance(body.get(name), str) or not body[name]:
                return _error(
                    400, "InvalidRequest", f"'{name}' is a required property for subscription creation."
                )
        match = _RESOURCE.match(body["resource"])
        if not match:
            return _error(
                400,
                "ExtensionError",
                "Operation: Create; Exception: [Status Code: BadRequest; Reason: Unsupported resource]",
            )
        address = (unquote(match.group("user")) if match.group("user") else caller).lower()
        if address != caller and caller != APP_CALLER:
            return _error(
                403,
                "ExtensionError",
                "Operation: Create; Exception: [Status Code: Forbidden; Reason: Access is denied]",
            )
        user = self.users.get(address)
        folder = user.folder(match.group("quoted") or match.group("plain")) if user else None
        if user is None or folder is None:
            return _error(
                404,
                "ExtensionError",
                "Operation: Create; Exception: [Status Code: NotFound; Reason: The folder was not found]",
            )
        change_types = {c.strip() for c in body["changeType"].split(",")}
        if not change_types <= {"created", "updated", "deleted"}:
            return _error(400, "InvalidRequest", "Invalid changeType.")
        try:
            expiration = _parse_iso(body["expirationDateTime"])
        except ValueError:
            return _error(400, "InvalidRequest", "Invalid expirationDateTime.")
        now = _now()
        if expiration <= now or expiration > now + timedelta(minutes=MAX_MESSAGE_SUBSCRIPTION_MINUTES):
            return _error(
                400,
                "InvalidRequest",
                f"Subscription expiration can only be {MAX_MESSAGE_SUBSCRIPTION_MINUTES} minutes "
                "in the future.",
            )
        client_state = body.get("clientState") or ""
        if len(client_state) > 128:
            return _error(400, "InvalidRequest", "clientState is too long (128 characters at most).")
        lifecycle_url = body.get("lifecycleNotificationUrl") or ""
        for url in (body["notificationUrl"], lifecycle_url):
            if url and not await self._validate_url(url):
                return _error(
                    400,
                    "ValidationError",
                    "Subscription validation request failed. Notification endpoint must respond with "
                    "200 OK to validation request.",
                )
        token = request.headers["Authorization"].partition(" ")[2].strip()
        subscription = SimSubscription(
            id=str(uuid.uuid4()),
            user=address,
            folder_id=folder.id,
            resource=body["resource"],
            change_type=body["changeType"],
            notification_url=body["notificationUrl"],
            lifecycle_url=lifecycle_url,
            client_state=client_state,
            expiration=expiration,
            creator_token=token,
        )
        self.subscriptions[subscription.id] = subscription
        self._changed_now()
        return _json(subscription.to_json(), 201)

    async def _subscription(
        self, method: str, subscription_id: str, reauthorize: bool, caller: str
    ) -> Response:
        live = {s.id: s for s in self._live_subscriptions()}
        subscription = live.get(subscription_id)
        if subscription is None or (subscription.user != caller and caller != APP_CALLER):
            return _error(404, "ResourceNotFound", "The object was not found.")
        if reauthorize:
            if method != "POST":
                return _error(405, "MethodNotAllowed", "Method not allowed.")
            subscription.creator_token = request.headers["Authorization"].partition(" ")[2].strip()
            return Response("", status=204)
        if method == "GET":
            return _json(subscription.to_json())
        if method == "DELETE":
            del self.subscriptions[subscription_id]
            self._changed_now()
            return Response("", status=204)
        if method == "PATCH":
            try:
                body = json.loads(await request.get_data(as_text=True))
                expiration = _parse_iso(body["expirationDateTime"])
            except (ValueError, KeyError, TypeError):
                return _error(400, "InvalidRequest", "Invalid expirationDateTime.")
            now = _now()
            if expiration <= now or expiration > now + timedelta(minutes=MAX_MESSAGE_SUBSCRIPTION_MINUTES):
                return _error(400, "InvalidRequest", "Invalid expirationDateTime.")
            subscription.expiration = expiration
            return _json(subscription.to_json())
        return _error(405, "MethodNotAllowed", "Method not allowed.")

    # -- drafts and upload sessions (large mail) ---------------------------------------------

    async def _create_draft(self, user: SimUser) -> Response:
        """``POST users/{id}/messages`` in the MIME form: a draft (not in any listed folder)."""
        data = await request.get_data(as_text=False)
        assert isinstance(data, bytes)
        if len(data) > self.max_request_bytes:
            return _error(413, "RequestEntityTooLarge", "The request is larger than the maximum allowed.")
        if not request.headers.get("Content-Type", "").lower().startswith("text/plain"):
            return _error(400, "BadRequest", "The simulator only creates drafts in MIME form (text/plain).")
        try:
            mime = base64.b64decode(b"".join(data.split()), validate=True)
        except ValueError:
            return _error(
                400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content."
            )
        draft = SimDraft(_new_id(), user.email, mime)
        self.drafts[draft.id] = draft
        return _json({"id": draft.id, "isDraft": True}, 201)

    async def _draft_request(self, user: SimUser, method: str, draft_id: str, tail: str) -> Response:
        draft = self.drafts[draft_id]
        if draft.user != user.email:
            return _error(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        if tail == "" and method == "DELETE":
            del self.drafts[draft_id]
            return Response("", status=204)
        if tail == "attachments" and method == "POST":
            body = await request.get_json(force=True, silent=True)
            if not isinstance(body, dict) or body.get("@odata.type") != "#microsoft.graph.fileAttachment":
                return _error(400, "BadRequest", "Expected a fileAttachment.")
            try:
                content = base64.b64decode(str(body.get("contentBytes", "")), validate=True)
            except ValueError:
                return _error(400, "BadRequest", "Invalid contentBytes.")
            if len(content) >= UPLOAD_SESSION_MIN_BYTES:
                return _error(413, "RequestEntityTooLarge", "3 MB or more: use an upload session.")
            draft.attachments.append(_attachment_of(body, content))
            return _json({"id": _new_id(), "name": body.get("name")}, 201)
        if tail.lower() == "attachments/createuploadsession" and method == "POST":
            body = await request.get_json(force=True, silent=True)
            item = body.get("AttachmentItem") if isinstance(body, dict) else None
            if not isinstance(item, dict) or item.get("attachmentType") != "file":
                return _error(400, "BadRequest", "AttachmentItem with attachmentType file is required.")
            size = item.get("size")
            if not isinstance(size, int) or size <= 0:
                return _error(400, "BadRequest", "AttachmentItem.size is required.")
            if size > self.max_attachment_bytes:
                return _error(
                    413, "ErrorAttachmentSizeExceeded", "The attachment is larger than the maximum allowed."
                )
            token = secrets.token_urlsafe(24)
            self.uploads[token] = SimUpload(draft_id, item, size)
            expires = _iso_ms(_now() + timedelta(minutes=15))
            return _json(
                {
                    "uploadUrl": f"{self.base_url}/upload/{token}",
                    "expirationDateTime": expires,
                    "nextExpectedRanges": ["0-"],
                },
                201,
            )
        if tail == "send" and method == "POST":
            if any(u.draft_id == draft_id for u in self.uploads.values()):
                return _error(400, "ErrorInvalidRequest", "An attachment upload is not complete.")
            mime = draft.final_mime()
            if len(mime) > self.max_message_bytes:
                return _error(413, "ErrorMessageSizeExceeded", "The message exceeds the maximum size.")
            answer = self._submit(user, mime)
            if answer.status_code == 202:
                del self.drafts[draft_id]
            return answer
        return _error(400, "BadRequest", "Unsupported draft request in this simulator.")

    async def _upload_chunk(self, token: str) -> Response:
        """``PUT`` of one byte range to an upload URL (pre-authenticated: an Authorization header
        is refused, as Graph does)."""
        # Every answer comes once the chunk is read, as a real server's does (an answer before
        # it would leave the client blocked writing the rest).
        data = await request.get_data(as_text=False)
        assert isinstance(data, bytes)
        upload = self.uploads.get(token)
        if upload is None:
            return _error(404, "ItemNotFound", "The upload session was not found.")
        if "Authorization" in request.headers:
            return _error(401, "InvalidAuthenticationToken", "Do not send a token to an upload URL.")
        if self._upload_throttle:
            return self._throttled(self._upload_throttle)
        if len(data) > self.max_request_bytes:
            return _error(413, "RequestEntityTooLarge", "The chunk is larger than the maximum allowed.")
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", request.headers.get("Content-Range", ""))
        if match is None:
            return _error(400, "InvalidContentRange", "Content-Range is required.")
        start, end, total = (int(g) for g in match.groups())
        if total != upload.size or start != len(upload.received) or end - start + 1 != len(data):
            return _error(416, "InvalidRange", "The range does not match the upload session.")
        if end + 1 < total and len(data) % (320 * 1024):
            return _error(400, "InvalidChunkSize", "Chunks must be multiples of 320 KiB.")
        upload.received += data
        self.upload_chunks.append(len(data))
        if len(upload.received) < total:
            return _json(
                {
                    "expirationDateTime": _iso_ms(_now() + timedelta(minutes=15)),
                    "nextExpectedRanges": [f"{len(upload.received)}-"],
                }
            )
        del self.uploads[token]
        draft = self.drafts.get(upload.draft_id)
        if draft is None:
            return _error(404, "ErrorItemNotFound", "The draft is gone.")
        draft.attachments.append(_attachment_of(upload.item, bytes(upload.received)))
        response = Response("", status=201)
        location = f"{self.base_url}/v1.0/users/{draft.user}/messages/{draft.id}/attachments"
        response.headers["Location"] = location
        return response

    # -- message lists -----------------------------------------------------------------------

    def _list_messages(self, user: SimUser, folder: SimFolder) -> Response:
        """``GET .../mailFolders/{id}/messages``: ``$filter`` on ``receivedDateTime`` (ge, gt,
        lt, le joined by ``and``), ``$orderby=receivedDateTime [asc|desc]`` (default desc, as
        Graph), ``$select``, ``$top`` (default 10, at most 1000) and ``$skip``; ``@odata.nextLink``."""
        args = request.args
        messages = list(folder.messages.values())
        text = args.get("$filter", "").strip()
        if text:
            tests = {"ge": operator.ge, "gt": operator.gt, "lt": operator.lt, "le": operator.le}
            for clause in re.split(r"\s+and\s+", text, flags=re.IGNORECASE):
                match = re.fullmatch(r"receivedDateTime\s+(ge|gt|lt|le)\s+(\S+)", clause.strip())
                if match is None:
                    return _error(400, "ErrorInvalidUrlQueryFilter", "The query filter is not supported.")
                try:
                    bound = _parse_iso(match.group(2))
                except ValueError:
                    return _error(400, "BadRequest", "Invalid DateTimeOffset in the filter.")
                compare = tests[match.group(1)]
                messages = [m for m in messages if compare(m.received.replace(microsecond=0), bound)]
        order = args.get("$orderby", "receivedDateTime desc").strip().lower()
        if order not in ("receiveddatetime", "receiveddatetime asc", "receiveddatetime desc"):
            return _error(400, "BadRequest", "The simulator orders by receivedDateTime only.")
        messages.sort(key=lambda m: m.received, reverse=order.endswith("desc"))
        try:
            top = int(args.get("$top", "10"))
            skip = int(args.get("$skip", "0"))
        except ValueError:
            return _error(400, "BadRequest", "Invalid $top or $skip.")
        if not 1 <= top <= 1000 or skip < 0:
            return _error(400, "BadRequest", "Invalid $top or $skip.")
        selected = {s.strip() for s in args.get("$select", "").split(",") if s.strip()}
        # Graph may return fewer than $top (server-driven paging): the nextLink carries on.
        top = min(top, self.max_list_page)
        page = messages[skip : skip + top]
        values = []
        for message in page:
            full = {
                "@odata.etag": f'W/"{message.change_key}"',
                "id": message.id,
                "receivedDateTime": _iso(message.received),
                "subject": message.subject,
            }
            values.append({k: v for k, v in full.items() if not selected or k in selected or k == "id"})
        payload: dict[str, Any] = {
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users('x')/messages",
            "value": values,
        }
        if skip + top < len(messages):
            following = {k: v for k, v in args.items() if k != "$skip"}
            following["$skip"] = str(skip + top)
            query = "&".join(f"{quote(k, safe='$')}={quote(v, safe=',:')}" for k, v in following.items())
            payload["@odata.nextLink"] = f"{self.base_url}{request.path}?{query}"
        return _json(payload)

    # -- delta -------------------------------------------------------------------------------

    def _token(self, state: dict[str, Any]) -> str:
        state["ep"] = self._epoch
        return base64.urlsafe_b64encode(json.dumps(state).encode()).decode().rstrip("=")

    @staticmethod
    def _untoken(text: str) -> dict[str, Any] | None:
        try:
            data = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def _delta(self, user: SimUser, folder: SimFolder) -> Response:
        args = request.args
        page_size = 10
        match = re.search(r"odata\.maxpagesize=(\d+)", request.headers.get("Prefer", ""))
        if match:
            page_size = max(1, min(int(match.group(1)), 1000))
        link_base = (
            f"{self.base_url}/v1.0/users/{quote(user.email, safe='@')}/mailFolders/{folder.id}/messages/delta"
        )
        token_text = args.get("$deltatoken") or args.get("$skiptoken")
        if token_text is not None:
            state = self._untoken(token_text)
            if state is None or state.get("f") != folder.id:
                return _error(400, "BadRequest", "Invalid delta token.")
            if state.get("ep") != self._epoch:
                return _error(410, "SyncStateNotFound", "The sync state generation is not found.")
            if "upto" not in state:
                # The first page of a round from a deltaLink: the round covers changes up to now.
                state["upto"] = self._last_seq
        else:
            state = {
                "f": folder.id,
                "phase": "initial",
                "offset": 0,
                "upto": self._last_seq,
                "ct": args.get("changeType", ""),
                "select": args.get("$select", ""),
            }
        selected = [s.strip() for s in str(state.get("select", "")).split(",") if s.strip()]

        def shape(message: SimMessage) -> dict[str, Any]:
            full = {
                "@odata.type": "#microsoft.graph.message",
                "@odata.etag": f'W/"{message.change_key}"',
                "id": message.id,
                "receivedDateTime": _iso(message.received),
                "subject": message.subject,
                "isRead": False,
            }
            if not selected:
                return full
            return {
                k: v for k, v in full.items() if k in selected or k in ("id", "@odata.type", "@odata.etag")
            }

        items: list[dict[str, Any]]
        if state["phase"] == "initial":
            snapshot = sorted(
                (m for m in folder.messages.values()),
                key=lambda m: m.received,
            )
            offset = int(state["offset"])
            chunk = snapshot[offset : offset + page_size]
            items = [shape(m) for m in chunk]
            more = offset + page_size < len(snapshot)
            following = {**state, "offset": offset + page_size}
        else:
            since, upto = int(state["since"]), int(state["upto"])
            latest: dict[str, str] = {}
            for seq, kind, message_id in folder.changes:
                if since < seq <= upto:
                    previous = latest.get(message_id)
                    latest[message_id] = "created" if previous == "created" and kind == "updated" else kind
            wanted = [c for c in str(state.get("ct", "")).split(",") if c]
            entries = [(mid, kind) for mid, kind in latest.items() if not wanted or kind in wanted]
            offset = int(state.get("offset", 0))
            chunk_entries = entries[offset : offset + page_size]
            items = []
            for message_id, kind in chunk_entries:
                message = folder.messages.get(message_id)
                if kind == "deleted" or message is None:
                    items.append({"id": message_id, "@removed": {"reason": "deleted"}})
                else:
                    items.append(shape(message))
            more = offset + page_size < len(entries)
            following = {**state, "offset": offset + page_size}
        payload: dict[str, Any] = {
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#Collection(message)",
            "value": items,
        }
        if more:
            payload["@odata.nextLink"] = f"{link_base}?$skiptoken={self._token(following)}"
        else:
            # The next round reads every change after the point where this round started.
            final = {
                "f": folder.id,
                "phase": "changes",
                "since": int(state["upto"]),
                "ct": state.get("ct", ""),
                "select": state.get("select", ""),
                "offset": 0,
            }
            payload["@odata.deltaLink"] = f"{link_base}?$deltatoken={self._token(final)}"
        response = _json(payload)
        response.headers["Preference-Applied"] = f"odata.maxpagesize={page_size}"
        return response


@asynccontextmanager
async def running_graph_simulator() -> AsyncIterator[GraphSimulator]:
    """A ``GraphSimulator`` serving on a free loopback port for the duration of the block."""
    simulator = GraphSimulator()
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.serve)
        yield simulator
        nursery.cancel_scope.cancel()
