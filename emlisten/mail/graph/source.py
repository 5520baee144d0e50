"""The Microsoft Graph ``MailSource``: change-notification subscriptions and delta-query readers.

Listening (one subscription per folder): ``POST /subscriptions`` on
``users/{user}/mailFolders('{folder}')/messages`` with ``changeType=created``, a notification and
a lifecycle URL on this service's API (see :mod:`emlisten.mail.graph.notifications`) and a
secret ``clientState``. Graph validates the URLs before it answers, so the API must be reachable
at ``EMLISTEN_PUBLIC_URL`` (or, without it, at the address the node listens on: good for tests
and for a Graph simulator on the same host only). The subscription is renewed (``PATCH``) every
``renew_seconds``; a renewal answered 404 (the subscription expired or was removed) re-creates
it. The subscription is deleted when the listener stops (shielded, short timeout).

Reading: a delta query on the folder's messages (``changeType=created``), its link kept in the
checkpoint's cursor (see :mod:`emlisten.mail.graph.delta`), and each new message's MIME from
``GET /users/{user}/messages/{id}/$value``.

Tokens: the mailbox's ``AccessToken`` (``UseOAuth``) as a bearer token; without one, an app-only
token from the client-credentials grant when ``EMLISTEN_GRAPH_TENANT_ID``, ``..._CLIENT_ID`` and
``..._CLIENT_SECRET`` are set. A 401 raises :class:`MailTokenRejectedError` (the service asks
Creatio for a new token). 429 and 503 are retried after ``Retry-After`` (never sooner), a few
times, then the call fails with :class:`MailConnectError`.

Sending (``/sendMail``) and folder lists are in :mod:`emlisten.mail.graph.send` and
:mod:`emlisten.mail.graph.folders`, over :meth:`GraphSource.session`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import trio

from emlisten import _egress
from emlisten.abc import MailReader, MailSource, NewMailCallback, Prefetch
from emlisten.config import Settings
from emlisten.errors import (
    FolderNotFoundError,
    MailAuthError,
    MailConnectError,
    MailProtocolError,
    MailSourceError,
    MailTokenRejectedError,
)
from emlisten.mail.graph.delta import DEFAULT_WINDOW_SECONDS, DeltaCursor, parse_time
from emlisten.mail.graph.notifications import (
    CREATED,
    MISSED,
    REAUTHORIZATION_REQUIRED,
    REMOVED,
    GraphEvent,
    NotificationHub,
    Route,
    RouteSigner,
    retry_after_seconds,
)
from emlisten.models import INBOX, Checkpoint, FolderInfo, MailboxConfig, RawMessage, SyncTask

log = logging.getLogger(__name__)

DEFAULT_SERVICE_URL = "https://graph.microsoft.com"
API_VERSION = "v1.0"
#: Graph's limit for message subscriptions is 10080 minutes; stay a little under it.
MAX_SUBSCRIPTION_MINUTES = 10070
DEFAULT_AUTHORITY = "https://login.microsoftonline.com"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"


@dataclass(frozen=True, slots=True)
class GraphSettings:
    #: Requested lifetime of a subscription (capped at Graph's maximum).
    subscription_seconds: float = MAX_SUBSCRIPTION_MINUTES * 60.0
    #: Renewal (and "is it still there?") interval; well before expiry.
    renew_seconds: float = 6 * 3600.0
    request_timeout: float = 60.0
    close_timeout: float = 5.0
    #: Throttled (429/503) calls are retried this often before the call fails.
    throttle_retries: int = 5
    #: Longest wait honoured for one Retry-After; longer answers fail the call (retried later).
    max_retry_after: float = 300.0
    #: Wait when a 429/503 carries no Retry-After (doubles per retry).
    default_retry_after: float = 2.0
    #: See emlisten.mail.graph.delta.
    dedup_window_seconds: float = DEFAULT_WINDOW_SECONDS
    #: Graph endpoint of mailboxes whose service URL is the global one (or empty):
    #: ``EMLISTEN_GRAPH_BASE_URL`` (national clouds, test servers).
    base_url: str = DEFAULT_SERVICE_URL


@dataclass(frozen=True, slots=True)
class AppCredentials:
    """App-only access (client-credentials grant), for mailboxes without an AccessToken."""

    tenant_id: str
    client_id: str
    client_secret: str = ""
    authority: str = DEFAULT_AUTHORITY
    #: The token's audience: ``<Graph base URL>/.default`` (each national cloud has its own).
    scope: str = GRAPH_SCOPE

    def __repr__(self) -> str:  # the secret never shows
        return f"AppCredentials(tenant_id={self.tenant_id!r}, client_id={self.client_id!r})"


def graph_origin(service_url: str, base_url: str) -> str:
    """The Graph endpoint of a mailbox: its service URL, unless that is empty or the global
    ``https://graph.microsoft.com`` (Creatio's default), which mean the configured base URL."""
    explicit = (service_url or "").strip().rstrip("/")
    if not explicit or explicit.lower() == DEFAULT_SERVICE_URL:
        return (base_url or DEFAULT_SERVICE_URL).rstrip("/")
    return explicit


def graph_scope(base_url: str) -> str:
    """The client-credentials scope for a Graph endpoint (``https://graph.microsoft.us/.default``)."""
    parts = urlsplit((base_url or DEFAULT_SERVICE_URL).rstrip("/"))
    return f"{parts.scheme}://{parts.netloc}/.default"


def folder_segment(folder: str) -> str:
    """``INBOX`` (emlisten's name for the inbox) is Graph's well-known folder ``inbox``."""
    return "inbox" if folder.upper() == INBOX else folder


def _graph_error(response: httpx.Response) -> str:
    """``code: message`` from a Graph error body (never the request, which may carry tokens)."""
    try:
        error = response.json().get("error", {})
        code, message = str(error.get("code", "")), str(error.get("message", ""))
    except (ValueError, AttributeError):
        return f"HTTP {response.status_code}"
    text = f"{code}: {message}" if code else message
    return f"HTTP {response.status_code} {text[:300]}".strip()


class _AppTokens:
    """Client-credentials tokens, cached until shortly before they expire."""

    def __init__(self, app: AppCredentials) -> None:
        self.app = app
        self._token = ""
        self._expires_at = 0.0
        self._lock = trio.Lock()

    def invalidate(self) -> None:
        """Graph refused the cached token (revoked, or rotated keys): fetch a new one next time."""
        self._token = ""

    async def token(self, http: httpx.AsyncClient) -> str:
        async with self._lock:
            if self._token and trio.current_time() < self._expires_at:
                return self._token
            url = f"{self.app.authority.rstrip('/')}/{quote(self.app.tenant_id)}/oauth2/v2.0/token"
            try:
                response = await http.post(
                    url,
                    data={
                        "grant_type": "client_credentials",
                        "client_id": self.app.client_id,
                        "client_secret": self.app.client_secret,
                        "scope": self.app.scope,
                    },
                )
            except httpx.HTTPError as exc:
                raise MailConnectError(f"token endpoint unreachable: {type(exc).__name__}") from None
            if response.status_code != 200:
                raise MailAuthError(f"app token request refused: {_graph_error(response)}")
            data = response.json()
            self._token = str(data["access_token"])
            lifetime = float(data.get("expires_in", 3600))
            self._expires_at = trio.current_time() + max(lifetime - 120.0, lifetime / 2)
            return self._token


class GraphSession:
    """Graph calls for one mailbox over a shared HTTP client: auth, throttling, error mapping."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        mailbox: MailboxConfig,
        settings: GraphSettings,
        app_tokens: _AppTokens | None = None,
    ) -> None:
        self.http = http
        self.mailbox = mailbox
        self.settings = settings
        self.app_tokens = app_tokens
        origin = graph_origin(mailbox.service_url, settings.base_url)
        parts = urlsplit(origin)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.base = f"{self.origin}/{API_VERSION}"
        self.user = quote(mailbox.sender_email or mailbox.user_name, safe="@")
        #: Server clock (Unix seconds) from the last response's Date header.
        self.server_time: float | None = None

    async def _authorization(self) -> str:
        mailbox = self.mailbox
        if mailbox.use_oauth:
            if not mailbox.access_token:
                raise MailTokenRejectedError(f"no OAuth access token for {mailbox.user_name!r}")
            return f"Bearer {mailbox.access_token}"
        if self.app_tokens is None:
            raise MailAuthError(
                "Microsoft Graph needs UseOAuth with an AccessToken, or app-only access "
                "(EMLISTEN_GRAPH_TENANT_ID, _CLIENT_ID, _CLIENT_SECRET)"
            )
        return f"Bearer {await self.app_tokens.token(self.http)}"

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def check_link(self, link: str) -> str:
        """A link from a response (nextLink/deltaLink) must stay on the Graph host: the bearer
        token goes with it."""
        parts = urlsplit(link)
        if f"{parts.scheme}://{parts.netloc}" != self.origin:
            raise MailProtocolError("Graph returned a link to another host")
        return link

    async def request(
        self,
        method: str,
        url: str,
        *,
        json_body: Mapping[str, Any] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Send with retries on throttling; returns any response that is not an auth failure,
        throttling or a server error (the caller interprets 2xx, 404, 410...)."""

        settings = self.settings
        what = f"{method} {urlsplit(url).path}"
        default_wait = settings.default_retry_after
        for attempt in range(settings.throttle_retries + 1):
            all_headers = {"Authorization": await self._authorization(), "Accept": "application/json"}
            if headers:
                all_headers.update(headers)
            try:
                response = await self.http.request(
                    method,
                    url,
                    json=json_body,
                    content=content,
                    headers=all_headers,
                    timeout=settings.request_timeout,
                )
            except httpx.HTTPError as exc:
                raise MailConnectError(f"{what}: {type(exc).__name__}") from None
            date = response.headers.get("Date")
            if date:
                with suppress(TypeError, ValueError):
                    self.server_time = parsedate_to_datetime(date).timestamp()
            status = response.status_code
            if status == 401:
                message = f"Graph rejected the token for {self.mailbox.user_name!r}: {_graph_error(response)}"
                if self.mailbox.use_oauth:
                    raise MailTokenRejectedError(message)
                if self.app_tokens is not None:
                    self.app_tokens.invalidate()
                raise MailAuthError(message)
            if status == 403:
                raise MailAuthError(
                    f"Graph denied access to {self.mailbox.user_name!r}: {_graph_error(response)}"
                )
            if status in (429, 503):
                header = response.headers.get("Retry-After")
                wait = retry_after_seconds(header, default=default_wait, cap=float("inf"))
                if attempt == settings.throttle_retries or wait > settings.max_retry_after:
                    raise MailConnectError(f"{what}: throttled ({status}), Retry-After {header or 'none'}")
                log.info(
                    "Graph throttled %s (%d): waiting %.1fs",
                    what,
                    status,
                    wait,
                    extra={"mailbox": self.mailbox.id},
                )
                await trio.sleep(wait)
                default_wait *= 2
                continue
            if status >= 500:
                raise MailConnectError(f"{what}: {_graph_error(response)}")
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def json(self, method: str, url: str, **kwargs: Any) -> Any:
        response = await self.request(method, url, **kwargs)
        if not 200 <= response.status_code < 300:
            raise MailProtocolError(f"{method} {urlsplit(url).path}: {_graph_error(response)}")
        try:
            return response.json()
        except ValueError:
            raise MailProtocolError(f"{method} {urlsplit(url).path}: not JSON") from None

    def now(self) -> float:
        return self.server_time if self.server_time is not None else time.time()

    # -- subscriptions ---------------------------------------------------------------------

    def resource(self, folder: str) -> str:
        return f"users/{self.user}/mailFolders('{folder_segment(folder)}')/messages"

    def _expiration(self) -> str:
        seconds = min(self.settings.subscription_seconds, MAX_SUBSCRIPTION_MINUTES * 60.0)
        moment = datetime.fromtimestamp(self.now(), UTC) + timedelta(seconds=seconds)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    async def create_subscription(self, folder: str, route: Route, public_url: str) -> dict[str, Any]:
        body = {
            "changeType": "created",
            "notificationUrl": public_url + route.notification_path,
            "lifecycleNotificationUrl": public_url + route.lifecycle_path,
            "resource": self.resource(folder),
            "expirationDateTime": self._expiration(),
            "clientState": route.client_state,
            "latestSupportedTlsVersion": "v1_2",
        }
        response = await self.request("POST", self.url("/subscriptions"), json_body=body)
        if response.status_code == 404:
            raise FolderNotFoundError(f"Graph: folder {folder!r} not found: {_graph_error(response)}")
        if response.status_code not in {201, 200}:
            # Typically: the notification URL failed Graph's validation handshake.
            raise MailConnectError(
                f"Graph refused the subscription ({_graph_error(response)}); is the API reachable "
                f"at {public_url} (EMLISTEN_PUBLIC_URL)?"
            )
        data = response.json()
        if not isinstance(data, dict) or not data.get("id"):
            raise MailProtocolError("Graph subscription answer without an id")
        return data

    async def renew_subscription(self, subscription_id: str) -> bool:
        """PATCH a new expiry; False when the subscription is gone."""
        url = self.url(f"/subscriptions/{quote(subscription_id)}")
        response = await self.request("PATCH", url, json_body={"expirationDateTime": self._expiration()})
        if response.status_code == 404:
            return False
        if not 200 <= response.status_code < 300:
            raise MailProtocolError(f"renewing the Graph subscription: {_graph_error(response)}")
        return True

    async def reauthorize_subscription(self, subscription_id: str) -> bool:
        url = self.url(f"/subscriptions/{quote(subscription_id)}/reauthorize")
        response = await self.request("POST", url)
        if response.status_code == 404:
            return False
        if not 200 <= response.status_code < 300:
            raise MailProtocolError(f"reauthorizing the Graph subscription: {_graph_error(response)}")
        return True

    async def delete_subscription(self, subscription_id: str) -> None:
        await self.request("DELETE", self.url(f"/subscriptions/{quote(subscription_id)}"))


class GraphReader(MailReader):
    """Reads new messages of a mailbox's folders with delta queries."""

    def __init__(self, session: GraphSession) -> None:
        self.session = session

    def _folder_path(self, folder: str) -> str:
        return f"/users/{self.session.user}/mailFolders/{quote(folder_segment(folder))}"

    async def current_position(self, folder: str) -> Checkpoint:
        session = self.session
        response = await session.request("GET", session.url(self._folder_path(folder) + "?$select=id"))
        if response.status_code == 404:
            raise FolderNotFoundError(f"Graph: folder {folder!r} not found")
        if response.status_code != 200:
            raise MailProtocolError(f"reading folder {folder!r}: {_graph_error(response)}")
        return Checkpoint(1, 0, start_cursor(session.now()))

    def _first_round_url(self, folder: str) -> str:
        return self.session.url(
            self._folder_path(folder) + "/messages/delta?changeType=created&$select=id,receivedDateTime"
        )

    async def fetch_new(
        self, folder: str, checkpoint: Checkpoint, *, limit: int
    ) -> tuple[list[RawMessage], Checkpoint]:
        session = self.session
        cursor = DeltaCursor.load(checkpoint.cursor)
        if cursor is None:
            # No cursor of ours (e.g. a checkpoint seeded without one): start from now.
            position = await self.current_position(folder)
            return [], Checkpoint(1, checkpoint.last_uid + 1, position.cursor)
        initial = cursor.initial or not cursor.link
        url = session.check_link(cursor.link) if cursor.link else self._first_round_url(folder)
        response = await session.request("GET", url, headers={"Prefer": f"odata.maxpagesize={max(1, limit)}"})
        if response.status_code == 410:
            log.warning(
                "Graph delta state of %r expired: rebuilding it (mail is not lost)",
                folder,
                extra={"mailbox": session.mailbox.id},
            )
            return [], Checkpoint(1, checkpoint.last_uid + 1, cursor.restart_round().dump())
        if response.status_code == 404:
            raise FolderNotFoundError(f"Graph: folder {folder!r} not found")
        if response.status_code != 200:
            raise MailProtocolError(f"delta query on {folder!r}: {_graph_error(response)}")
        try:
            page = response.json()
            items = [i for i in page.get("value", []) if isinstance(i, dict)]
        except (ValueError, AttributeError):
            raise MailProtocolError(f"delta query on {folder!r}: malformed answer") from None
        next_link = page.get("@odata.nextLink")
        delta_link = page.get("@odata.deltaLink")
        if not isinstance(next_link, str) and not isinstance(delta_link, str):
            raise MailProtocolError(f"delta query on {folder!r}: neither nextLink nor deltaLink")
        if not items and not next_link and not initial:
            # Nothing changed. Keep the old deltaLink (Graph hands out a new one every round,
            # which would otherwise look like progress forever).
            return [], checkpoint
        fresh = [item for item in items if cursor.is_new(item, initial=initial)]
        fresh.sort(key=lambda item: parse_time(item.get("receivedDateTime")) or 0.0)
        last_uid = checkpoint.last_uid + 1
        messages: list[RawMessage] = []
        delivered: list[tuple[str, float | None]] = []
        for item in fresh:
            item_id = str(item["id"])
            received = parse_time(item.get("receivedDateTime"))
            delivered.append((item_id, received))
            data = await self._mime(item_id)
            if data is None:
                continue  # deleted before we got to it
            messages.append(
                RawMessage(
                    uid=last_uid,
                    data=data,
                    internal_date=datetime.fromtimestamp(received, UTC) if received is not None else None,
                    size=len(data),
                    key=item_id,
                )
            )
        after = cursor.after_page(
            next_link=session.check_link(next_link) if isinstance(next_link, str) else None,
            delta_link=session.check_link(delta_link) if isinstance(delta_link, str) else None,
            initial=initial,
            delivered=delivered,
            window=session.settings.dedup_window_seconds,
        )
        return messages, Checkpoint(1, last_uid, after.dump())

    async def _mime(self, item_id: str) -> bytes | None:
        session = self.session
        url = session.url(f"/users/{session.user}/messages/{quote(item_id, safe='')}/$value")
        response = await session.request("GET", url, headers={"Accept": "*/*"})
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise MailProtocolError(f"reading a message: {_graph_error(response)}")
        return response.content

    async def aclose(self) -> None:
        return None


def start_cursor(server_time: float) -> str:
    """The cursor of a subscription that starts "now". Whole seconds, as Graph's
    ``receivedDateTime`` and ``Date`` have: mail of the same second is delivered rather than lost."""
    return DeltaCursor.starting_at(float(math.floor(server_time))).dump()


class GraphSource(MailSource):
    """See the module docstring. ``public_url``: the base URL where Graph reaches this node's
    API; when None it is announced later with :meth:`api_listening` (the API's port is only
    known once it listens) and listeners wait for it."""

    def __init__(
        self,
        *,
        public_url: str | None = None,
        secret_key: str | None = None,
        app_credentials: AppCredentials | None = None,
        ca_file: str | None = None,
        settings: GraphSettings | None = None,
    ) -> None:
        self.settings = settings or GraphSettings()
        self.hub = NotificationHub(RouteSigner.from_setting(secret_key))
        self.ca_file = ca_file
        self._public_url = public_url.rstrip("/") if public_url else None
        self._url_known = trio.Event()
        if self._public_url:
            self._url_known.set()
        self._app_tokens = _AppTokens(app_credentials) if app_credentials else None
        self._clients: dict[bool, httpx.AsyncClient] = {}
        self._users = 0

    @property
    def public_url(self) -> str | None:
        return self._public_url

    def api_listening(self, url: str) -> None:
        """The API listens at ``url``; used when no public URL was configured."""
        if self._public_url is None:
            self._public_url = url.rstrip("/")
            log.warning(
                "EMLISTEN_PUBLIC_URL is not set: Graph notifications are expected at %s", self._public_url
            )
        self._url_known.set()

    async def wait_public_url(self) -> str:
        await self._url_known.wait()
        assert self._public_url is not None
        return self._public_url

    @asynccontextmanager
    async def session(self, mailbox: MailboxConfig) -> AsyncIterator[GraphSession]:
        """A session on the process-wide HTTP client (one per TLS-verification setting, opened
        while anyone uses it: every mailbox talks to the same Graph host, so connections and the
        TLS context are shared)."""
        verify = mailbox.imap.verify_certificate
        client = self._clients.get(verify)
        if client is None:
            import ssl

            context: ssl.SSLContext | bool
            if verify:
                context = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True
            else:
                context = False
            # Only to addresses EMLISTEN_MAIL_ALLOW permits (emlisten._egress).
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
            transport = _egress.http_transport("mail", verify=context, limits=limits)
            client = httpx.AsyncClient(transport=transport)
            self._clients[verify] = client
        self._users += 1
        try:
            yield GraphSession(client, mailbox, self.settings, self._app_tokens)
        finally:
            self._users -= 1
            if self._users == 0:
                clients, self._clients = list(self._clients.values()), {}
                with trio.CancelScope(shield=True), trio.move_on_after(self.settings.close_timeout):
                    for idle in clients:
                        await idle.aclose()

    @asynccontextmanager
    async def open_reader(self, mailbox: MailboxConfig) -> AsyncIterator[MailReader]:
        async with self.session(mailbox) as session:
            yield GraphReader(session)

    async def listen(
        self,
        mailbox: MailboxConfig,
        folder: str,
        on_new_mail: NewMailCallback,
        *,
        prefetch: Prefetch | None = None,
        task_status: trio.TaskStatus[FolderInfo] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        public_url = await self.wait_public_url()
        async with self.session(mailbox) as session:
            listener = _SubscriptionListener(self, session, folder, public_url, on_new_mail)
            await listener.run(task_status)


class _SubscriptionListener:
    """Holds one folder's subscription: create, renew, react to notifications, delete."""

    def __init__(
        self,
        source: GraphSource,
        session: GraphSession,
        folder: str,
        public_url: str,
        on_new_mail: NewMailCallback,
    ) -> None:
        self.source = source
        self.session = session
        self.folder = folder
        self.public_url = public_url
        self.on_new_mail = on_new_mail
        self.subscription_id: str | None = None
        self.send, self.events = trio.open_memory_channel[GraphEvent](64)

    @property
    def mailbox_id(self) -> str:
        return self.session.mailbox.id

    async def _subscribe(self) -> None:
        hub = self.source.hub
        route = hub.signer.new_route(self.mailbox_id, self.folder)
        data = await self.session.create_subscription(self.folder, route, self.public_url)
        self.subscription_id = str(data["id"])
        hub.register(self.subscription_id, route, self.send)
        log.info("Graph subscription created", extra={"mailbox": self.mailbox_id, "folder": self.folder})
        # Mail that arrived before this subscription existed: found by the delta query. The seed
        # makes a brand-new mailbox start now (the supervisor only uses it without a checkpoint).
        await self.on_new_mail(
            SyncTask(
                mailbox_id=self.mailbox_id,
                folder=self.folder,
                uidvalidity=1,
                reason="catch-up",
                seed_cursor=start_cursor(self.session.now()),
            )
        )

    def _forget(self) -> None:
        if self.subscription_id is not None:
            self.source.hub.unregister(self.subscription_id)

    async def _resubscribe(self, why: str) -> None:
        log.info("Graph subscription %s: re-creating it", why, extra={"mailbox": self.mailbox_id})
        self._forget()
        self.subscription_id = None
        await self._subscribe()

    async def run(self, task_status: trio.TaskStatus[FolderInfo]) -> None:
        settings = self.source.settings
        try:
            await self._subscribe()
            task_status.started(FolderInfo(self.folder, 1, 0, 0))
            renew_at = trio.current_time() + settings.renew_seconds
            while True:
                event: GraphEvent | None = None
                with trio.move_on_at(renew_at):
                    event = await self.events.receive()
                if event is None:
                    assert self.subscription_id is not None
                    if not await self.session.renew_subscription(self.subscription_id):
                        await self._resubscribe("expired or removed")
                    renew_at = trio.current_time() + settings.renew_seconds
                    continue
                if event.subscription_id != self.subscription_id:
                    continue  # about a subscription we replaced meanwhile
                if event.kind == CREATED:
                    await self.on_new_mail(
                        SyncTask(self.mailbox_id, self.folder, 1, reason="exists", seen_at=event.seen_at)
                    )
                elif event.kind == MISSED:
                    await self.on_new_mail(
                        SyncTask(self.mailbox_id, self.folder, 1, reason="missed", seen_at=event.seen_at)
                    )
                elif event.kind == REMOVED:
                    await self._resubscribe("removed by Graph")
                    renew_at = trio.current_time() + settings.renew_seconds
                elif event.kind == REAUTHORIZATION_REQUIRED:
                    if not await self.session.reauthorize_subscription(event.subscription_id):
                        await self._resubscribe("gone when reauthorizing")
                    renew_at = trio.current_time() + settings.renew_seconds
        finally:
            self._forget()
            await self._delete()

    async def _delete(self) -> None:
        subscription_id = self.subscription_id
        if subscription_id is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(self.source.settings.close_timeout):
            try:
                await self.session.delete_subscription(subscription_id)
            except MailSourceError as exc:
                log.info(
                    "could not delete the Graph subscription: %s", exc, extra={"mailbox": self.mailbox_id}
                )


def graph_sources(source: MailSource) -> list[GraphSource]:
    """The GraphSource(s) behind ``source`` (a RoutingSource or a GraphSource itself)."""
    if isinstance(source, GraphSource):
        return [source]
    inner = getattr(source, "sources", None)
    if isinstance(inner, Mapping):
        return [s for s in inner.values() if isinstance(s, GraphSource)]
    return []


def announce_api(source: MailSource, host: str, port: int) -> None:
    """Tell Graph sources where the API listens (node.py calls this once it does)."""
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - reading the bind address, not binding
        host = "127.0.0.1"
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    for graph in graph_sources(source):
        graph.api_listening(url)


__all__ = [
    "AppCredentials",
    "GraphReader",
    "GraphSession",
    "GraphSettings",
    "GraphSource",
    "announce_api",
    "folder_segment",
    "graph_origin",
    "graph_scope",
    "graph_source_from_settings",
    "graph_sources",
    "start_cursor",
]


def graph_source_from_settings(settings: Settings) -> GraphSource:
    """The node's GraphSource, configured from ``EMLISTEN_*`` settings."""
    app = None
    if settings.graph_tenant_id and settings.graph_client_id and settings.graph_client_secret:
        app = AppCredentials(
            settings.graph_tenant_id,
            settings.graph_client_id,
            settings.graph_client_secret,
            authority=settings.graph_authority,
            scope=graph_scope(settings.graph_base_url),
        )
    return GraphSource(
        public_url=settings.public_url,
        secret_key=settings.secret_key,
        app_credentials=app,
        ca_file=settings.tls_ca_file,
        settings=GraphSettings(
            request_timeout=settings.command_timeout_seconds, base_url=settings.graph_base_url
        ),
    )
