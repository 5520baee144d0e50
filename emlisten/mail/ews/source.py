"""The Exchange Web Services ``MailSource``: streaming subscriptions and SyncFolderItems readers.

Listening (one folder, one ``listen`` call):

1. ``Subscribe`` with a ``StreamingSubscriptionRequest`` on the folder (``INBOX`` -> the
   ``inbox`` distinguished folder), event types ``NewMailEvent`` and ``CreatedEvent``.
2. The first time: the folder's current ``SyncState`` (``SyncFolderItems`` without a state,
   walked to the end, ids only) becomes the catch-up task's ``seed_cursor``, so a new
   subscription starts "now". Then the catch-up task, then ``started()``.
3. ``GetStreamingEvents`` (``ConnectionTimeout`` minutes, default 29) read as a sequence of SOAP
   envelopes: a new-mail notification publishes a ``SyncTask``; keep-alives (``ConnectionStatus``
   OK) only prove the connection lives; ``ConnectionStatus`` Closed ends the response normally
   and the request is re-issued at once.
4. ``ErrorSubscriptionNotFound`` / ``ErrorInvalidSubscription`` (the subscription expired):
   subscribe again and publish a catch-up task (streaming has no watermark; the worker syncs
   from the checkpoint). ``ErrorServerBusy``: wait ``BackOffMilliseconds`` (capped) before the
   next request, never less. An abrupt end of the stream (closed without ``Closed``, cut
   mid-envelope, network error, no byte for ``stream_idle_timeout``) raises
   ``MailConnectError``: the mailbox supervisor reconnects with its backoff, and the new
   ``listen`` subscribes again and publishes a catch-up task.
5. When ``listen`` ends (the mailbox was closed or changed, or an error), its subscription is
   removed with ``Unsubscribe`` (unless the server already lost it). On shutdown the node calls
   ``keep_subscriptions`` first: the mailboxes go to other nodes, which subscribe anew, and the
   old subscriptions lapse on the server (docs/exchange.md).

Connections: listeners of one group (EWS URL, credentials, impersonated mailbox) share
``GetStreamingEvents`` connections of up to 200 subscriptions (``_multiplex.StreamingHub``);
``started()`` comes once the listener's subscription is in an open response. An expired
subscription re-subscribes alone; a broken connection raises ``MailConnectError`` in every
listener on it (each then re-subscribes with a catch-up).

Reading: the checkpoint's ``cursor`` is a ``SyncFolderItems`` ``SyncState``. ``fetch_new`` asks
for at most ``limit`` changes after it, takes the ``Create`` changes, and reads their MIME with
``GetItem`` (``IncludeMimeContent``, base64). The new state is returned with ``last_uid + 1``
when it moved; messages carry no ``position`` (a sync state can only be resumed after the whole
batch). Items deleted before ``GetItem`` are skipped. An unusable sync state
(``ErrorInvalidSyncStateData``) continues from the folder's current end, like an IMAP
UIDVALIDITY change.

Authentication (``_auth.py``): with ``UseOAuth``, ``Authorization: Bearer`` with ``AccessToken``;
else ``UserName``/``Password`` with Basic, NTLM or Negotiate, as the server's ``WWW-Authenticate``
challenge asks (``EMLISTEN_EWS_AUTH=auto``) or as set (``basic|ntlm|negotiate``). Connections are
pooled per credential group (EWS URL, credentials, TLS verification) in an ``AuthenticatedPool``:
at most ``connections_per_account`` for requests, plus one per open streaming response, each
authenticated once and kept (NTLM authenticates a connection). Every request carries
``X-AnchorMailbox`` (the mailbox address). The emlisten extension field ``ImpersonatedUser`` (an
SMTP address) adds the ``ExchangeImpersonation`` header, for service accounts with the
ApplicationImpersonation role; the anchor is then that address. HTTP 401/403 raise
``MailAuthError`` (``MailTokenRejectedError`` with a bearer token).

EWS URL: ``service_url``, or - when it is empty (``IsAutodiscover`` credentials) - found with POX
Autodiscover (``autodiscover.py``) for the mailbox address on first use, then cached per mailbox
for the process; a ``MailConnectError`` while using a discovered URL forgets it, so the next
attempt discovers again (the mailbox may have moved).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit
from xml.etree.ElementTree import Element

import httpx
import trio
from spnego.channel_bindings import GssChannelBindings

from emlisten.abc import MailReader, MailSource, NewMailCallback, Prefetch
from emlisten.errors import (
    FolderNotFoundError,
    MailAuthError,
    MailConnectError,
    MailProtocolError,
    MailSourceError,
    MailTokenRejectedError,
)
from emlisten.mail.ews import _soap
from emlisten.mail.ews._auth import STREAM_EXTENSION, AuthenticatedPool, AuthMode, Credentials, offered
from emlisten.mail.ews._multiplex import MAX_SUBSCRIPTIONS_PER_CONNECTION, Member, StreamingHub
from emlisten.mail.ews.autodiscover import autodiscover_url_hint, discover_ews_url
from emlisten.mail.imap._tls import context_for
from emlisten.models import Checkpoint, FolderInfo, MailboxConfig, RawMessage, SyncTask

log = logging.getLogger(__name__)

#: EWS has no UIDVALIDITY: every EWS checkpoint uses this one, and the cursor carries the state.
EWS_UIDVALIDITY = 1
#: Exchange's limit for ``ConnectionTimeout`` (minutes).
MAX_CONNECTION_TIMEOUT_MINUTES = 30
#: Exchange's limit for ``MaxChangesReturned``.
MAX_SYNC_CHANGES = 512
#: Items per ``GetItem`` call (MIME of each is in the answer, so keep answers moderate).
GET_ITEM_BATCH = 20

_SUBSCRIPTION_GONE = frozenset(
    {"ErrorSubscriptionNotFound", "ErrorInvalidSubscription", "ErrorExpiredSubscription"}
)
_AUTH_CODES = frozenset(
    {
        "ErrorAccessDenied",
        "ErrorImpersonateUserDenied",
        "ErrorImpersonationDenied",
        "ErrorNonExistentMailbox",
        "ErrorMailboxMoveInProgress",
    }
)
_FOLDER_CODES = frozenset({"ErrorFolderNotFound", "ErrorInvalidIdMalformed", "ErrorInvalidFolderId"})


@dataclass(frozen=True, slots=True)
class EwsSettings:
    """Timing and limits of EWS sessions (seconds unless named otherwise)."""

    #: ``GetStreamingEvents`` ``ConnectionTimeout``: 1..30 minutes.
    connection_timeout_minutes: int = 29
    #: No byte at all on a stream for this long (keep-alives included): the connection is dead.
    stream_idle_timeout: float = 5 * 60
    request_timeout: float = 120.0
    connect_timeout: float = 30.0
    #: ``ErrorServerBusy`` answers in a row before giving up (``MailConnectError``).
    busy_retries: int = 5
    #: Upper bound of one ``BackOffMilliseconds`` wait.
    max_back_off: float = 10 * 60
    #: Wait after ``ErrorServerBusy`` without ``BackOffMilliseconds``.
    default_back_off: float = 5.0
    #: ``MaxChangesReturned`` when walking a folder to its current end.
    sync_page_size: int = MAX_SYNC_CHANGES
    server_version: str = _soap.DEFAULT_SERVER_VERSION
    #: Subscriptions per ``GetStreamingEvents`` connection (Exchange allows 200).
    subscriptions_per_connection: int = MAX_SUBSCRIPTIONS_PER_CONNECTION
    #: After a membership change re-issued the request, the old response is still read this long
    #: once the new one is open (events already on their way are not lost).
    handover_grace: float = 2.0
    #: Membership changes within this delay share one re-issued request.
    settle_delay: float = 0.05
    #: ``EMLISTEN_EWS_AUTH``: how user name + password authenticate (bearer tokens always do).
    auth_mode: AuthMode = AuthMode.AUTO
    #: Connections for requests per credential group (streams get one each beyond these).
    connections_per_account: int = 4
    #: Unsubscribe a listener's subscription when it stops (close); see ``EwsSource.listen``.
    unsubscribe_timeout: float = 5.0


class ServerBusyError(MailConnectError):
    """Exchange kept answering ``ErrorServerBusy``: the supervisor retries later."""


class EwsResponseError(MailProtocolError):
    """Exchange answered an operation with an error ``code`` (e.g. ``ErrorInvalidSyncStateData``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"EWS {code}" + (f": {message}" if message else ""))
        self.code = code


def impersonated_user(mailbox: MailboxConfig) -> str:
    """The ``ImpersonatedUser`` extension field (any case), or ""."""
    for key, value in mailbox.extra.items():
        if key.lower() == "impersonateduser" and isinstance(value, str):
            return value.strip()
    return ""


def mailbox_address(mailbox: MailboxConfig) -> str:
    """The address requests act on: the impersonated mailbox, else the sender, else the user."""
    return impersonated_user(mailbox) or mailbox.sender_email or mailbox.user_name


def credentials(mailbox: MailboxConfig) -> Credentials:
    """What the mailbox authenticates with: its bearer token with ``UseOAuth``, else user + password."""
    if mailbox.use_oauth:
        if not mailbox.access_token:
            raise MailTokenRejectedError(f"no OAuth access token for {mailbox.user_name!r}")
        return Credentials(mailbox.user_name, "", mailbox.access_token)
    return Credentials(mailbox.user_name, mailbox.password)


def credential_digest(mailbox: MailboxConfig) -> str:
    """Groups connections by credentials: a digest, so the secret itself is kept nowhere else."""
    found = credentials(mailbox)
    material = "\0".join(("bearer", found.token) if found.token else ("user", found.user, found.password))
    return hashlib.sha256(material.encode()).hexdigest()


def _response_error(code: str, message: str, *, bearer: bool) -> MailSourceError:
    text = f"EWS {code}" + (f": {message}" if message else "")
    if code in _AUTH_CODES:
        return MailTokenRejectedError(text) if bearer and code == "ErrorAccessDenied" else MailAuthError(text)
    if code in _FOLDER_CODES:
        return FolderNotFoundError(text)
    return EwsResponseError(code, message)


class EwsClient:
    """One mailbox's EWS endpoint: posts SOAP requests, honours throttling, maps errors.

    Holds the credentials in request headers; it has no repr that could show them.
    """

    __slots__ = (
        "_bearer",
        "_headers",
        "_http",
        "_impersonate",
        "auth_identity",
        "backend_cookie",
        "settings",
        "url",
    )

    def __init__(self, http: httpx.AsyncClient, mailbox: MailboxConfig, settings: EwsSettings) -> None:
        if not mailbox.service_url:
            raise MailProtocolError(f"mailbox {mailbox.id} has no EWS URL")
        self._http = http
        self.url = mailbox.service_url
        self.settings = settings
        self._impersonate = impersonated_user(mailbox)
        # No Authorization here: the transport (an AuthenticatedPool) authenticates.
        self._headers = {
            "Content-Type": "text/xml; charset=utf-8",
            "Accept": "text/xml",
            "X-AnchorMailbox": mailbox_address(mailbox),
        }
        self._bearer = mailbox.use_oauth
        #: Groups streaming connections by credentials.
        self.auth_identity = credential_digest(mailbox)
        #: ``X-BackEndOverrideCookie`` of the last answer that set one (server affinity).
        self.backend_cookie = ""

    def set_affinity(self, headers: Mapping[str, str]) -> None:
        """Send ``headers`` (the group's anchor, affinity and cookie) with every request."""
        self._headers.update(headers)

    @property
    def where(self) -> str:
        parts = urlsplit(self.url)
        return parts.netloc or self.url

    def _envelope(self, body: str) -> bytes:
        return _soap.envelope(body, impersonate=self._impersonate, version=self.settings.server_version)

    def _check_status(self, response: httpx.Response) -> None:
        status = response.status_code
        if status in (401, 403):
            what = "OAuth token" if self._bearer else "credentials"
            message = f"EWS {self.where} rejected the {what} (HTTP {status}"
            if status == 401 and not self._bearer:
                mode = self.settings.auth_mode.value
                message += f"; it offers {offered(response)}, EMLISTEN_EWS_AUTH={mode}"
            message += ")"
            raise MailTokenRejectedError(message) if self._bearer else MailAuthError(message)

    def _error(self, code: str, message: str) -> MailSourceError:
        return _response_error(code, message, bearer=self._bearer)

    async def back_off(self, back_off_ms: int | None, attempt: int) -> None:
        """Wait as the server asked after ``ErrorServerBusy`` (``attempt``: busy answers in a row)."""
        if back_off_ms is None:
            delay = self.settings.default_back_off
        else:
            delay = min(back_off_ms / 1000, self.settings.max_back_off)
        log.warning("EWS %s is busy: backing off %.3fs as asked", self.where, delay)
        # Waited out even when giving up, so the supervisor's retry does not come early.
        await trio.sleep(delay)
        if attempt >= self.settings.busy_retries:
            raise ServerBusyError(f"EWS {self.where} is busy (ErrorServerBusy {attempt} times in a row)")

    async def call(
        self, body: str, *, headers: Mapping[str, str] | None = None
    ) -> list[_soap.ResponseMessage]:
        """Post one operation; its response messages (retrying after ``ErrorServerBusy``).
        ``headers`` are added to this request's (and win)."""
        attempt = 0
        sent = {**self._headers, **headers} if headers else self._headers
        while True:
            try:
                response = await self._http.post(self.url, content=self._envelope(body), headers=sent)
            except httpx.TimeoutException:
                raise MailConnectError(f"EWS {self.where}: no answer in time") from None
            except httpx.HTTPError as exc:
                raise MailConnectError(f"EWS {self.where}: {type(exc).__name__}: {exc}") from None
            self._check_status(response)
            # Only when set: parsing cookies costs each answer a cookie-jar pass (1-2 % of a
            # cold start's CPU), and most answers set none.
            if "set-cookie" in response.headers:
                cookie = response.cookies.get("X-BackEndOverrideCookie")
                if cookie:
                    self.backend_cookie = cookie
            root = self._parse_answer(response.status_code, response.content)
            fault = _soap.fault_of(root)
            if fault is not None:
                if fault.code != "ErrorServerBusy":
                    raise self._error(fault.code, fault.message)
                attempt += 1
                await self.back_off(fault.back_off_ms, attempt)
                continue
            messages = _soap.response_messages(root)
            busy = next((m for m in messages if m.code == "ErrorServerBusy"), None)
            if busy is None:
                return messages
            attempt += 1
            await self.back_off(busy.back_off_ms, attempt)

    async def call_one(self, body: str, *, headers: Mapping[str, str] | None = None) -> _soap.ResponseMessage:
        messages = await self.call(body, headers=headers)
        if not messages:
            raise MailProtocolError("EWS answered without a response message")
        message = messages[0]
        if not message.ok:
            raise self._error(message.code, message.message)
        return message

    def _parse_answer(self, status: int, content: bytes) -> Element:
        if status not in (200, 500):
            raise MailConnectError(f"EWS {self.where} answered HTTP {status}")
        return _soap.parse(content)

    async def stream(
        self,
        body: str,
        on_envelope: Callable[[Element], Awaitable[bool]],
        *,
        on_open: Callable[[], None] | None = None,
    ) -> bool:
        """Post a streaming request; ``on_envelope`` is awaited for each envelope of the
        response, and returns False to stop reading. ``on_open`` is called once the server has
        answered 200 (the subscriptions are on this connection). Returns True when the response
        ended normally (or ``on_envelope`` stopped it), raises MailConnectError when it was cut."""

        timeout = httpx.Timeout(
            self.settings.request_timeout,
            connect=self.settings.connect_timeout,
            read=self.settings.stream_idle_timeout,
        )
        splitter = _soap.EnvelopeSplitter()
        try:
            async with self._http.stream(
                "POST",
                self.url,
                content=self._envelope(body),
                headers=self._headers,
                timeout=timeout,
                # A connection of its own (beyond the pool's bound): a stream holds it for minutes.
                extensions={STREAM_EXTENSION: True},
            ) as response:
                self._check_status(response)
                if response.status_code != 200:
                    content = await response.aread()
                    return await on_envelope(self._parse_answer(response.status_code, content))
                if on_open is not None:
                    on_open()
                chunks = response.aiter_raw()
                async for chunk in chunks:
                    for data in splitter.feed(chunk):
                        if not await on_envelope(_soap.parse(data)):
                            await _drain(chunks)
                            return True
        except httpx.TimeoutException:
            raise MailConnectError(
                f"EWS {self.where}: stream silent for {self.settings.stream_idle_timeout:.0f}s"
            ) from None
        except httpx.HTTPError as exc:
            raise MailConnectError(f"EWS {self.where}: stream broken: {type(exc).__name__}") from None
        if splitter.leftover():
            raise MailConnectError(f"EWS {self.where}: stream cut in the middle of an envelope")
        return True


class _Borrowed(httpx.AsyncBaseTransport):
    """A shared pool as one client's transport: closing the client leaves the pool open."""

    __slots__ = ("pool",)

    def __init__(self, pool: AuthenticatedPool) -> None:
        self.pool = pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.pool.handle_async_request(request)

    async def aclose(self) -> None:
        """The pool's owner closes it."""


#: After the last envelope we want, how long the end of the response may take to arrive.
_DRAIN_SECONDS = 0.5
_DRAIN_BYTES = 64 * 1024


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read what is left of a streaming response the server is ending (``ConnectionStatus``
    Closed, lost subscriptions, busy), so its connection goes back to the pool still open: with
    NTLM a closed connection costs a new handshake on the next request."""
    read = 0
    with trio.move_on_after(_DRAIN_SECONDS):
        async for chunk in chunks:
            read += len(chunk)
            if read > _DRAIN_BYTES:
                return


class EwsSource(MailSource):
    """Listens with EWS streaming notifications; reads with SyncFolderItems + GetItem.

    ``ca_file`` adds trusted CAs for verified TLS. Each listener and reader has its own HTTP
    connection; all share one ``ssl.SSLContext`` per verification setting.
    """

    def __init__(
        self,
        *,
        connection_timeout_minutes: int = 29,
        stream_idle_timeout: float = 5 * 60,
        request_timeout: float = 120.0,
        connect_timeout: float = 30.0,
        busy_retries: int = 5,
        max_back_off: float = 10 * 60,
        default_back_off: float = 5.0,
        ca_file: str | None = None,
        subscriptions_per_connection: int = MAX_SUBSCRIPTIONS_PER_CONNECTION,
        handover_grace: float = 2.0,
        autodiscover_bases: Mapping[str, Sequence[str]] | None = None,
        auth_mode: AuthMode | str = AuthMode.AUTO,
        connections_per_account: int = 4,
        unsubscribe_timeout: float = 5.0,
    ) -> None:
        """``autodiscover_bases`` maps a mail domain to the Autodiscover base URLs tried instead
        of ``https://domain`` and ``https://autodiscover.domain`` (tests; unusual sites)."""
        if not 1 <= connection_timeout_minutes <= MAX_CONNECTION_TIMEOUT_MINUTES:
            raise ValueError("connection_timeout_minutes must be between 1 and 30")
        if not 1 <= subscriptions_per_connection <= MAX_SUBSCRIPTIONS_PER_CONNECTION:
            raise ValueError("subscriptions_per_connection must be between 1 and 200")
        self.settings = EwsSettings(
            connection_timeout_minutes=connection_timeout_minutes,
            stream_idle_timeout=stream_idle_timeout,
            request_timeout=request_timeout,
            connect_timeout=connect_timeout,
            busy_retries=busy_retries,
            max_back_off=max_back_off,
            default_back_off=default_back_off,
            subscriptions_per_connection=subscriptions_per_connection,
            handover_grace=handover_grace,
            auth_mode=AuthMode.parse(auth_mode) if isinstance(auth_mode, str) else auth_mode,
            connections_per_account=connections_per_account,
            unsubscribe_timeout=unsubscribe_timeout,
        )
        if connections_per_account < 1:
            raise ValueError("connections_per_account must be at least 1")
        self.ca_file = ca_file
        #: Authenticated connection pools by (origin, credentials, TLS verification), with their
        #: number of users; a pool closes when its last user leaves.
        self._pools: dict[tuple[str, ...], tuple[AuthenticatedPool, int]] = {}
        #: The scheme each server origin took (``auto``), shared by all pools: a server is
        #: probed without credentials once per process, not once per pool.
        self._schemes: dict[str, str] = {}
        #: The TLS channel bindings each origin showed last, shared the same way: a new
        #: connection's handshake starts with its first request, bound to them (``_auth``).
        self._bindings: dict[str, GssChannelBindings | None] = {}
        #: Streaming hubs by (EWS URL, credentials, impersonation, TLS verification).
        self._hubs: dict[tuple[str, ...], StreamingHub] = {}
        self.autodiscover_bases = {
            domain.lower(): tuple(bases) for domain, bases in (autodiscover_bases or {}).items()
        }
        #: Discovered EWS URLs by mailbox id: ((address, hint), URL).
        self._discovered: dict[str, tuple[tuple[str, str], str]] = {}
        self._discovery_locks: dict[str, trio.Lock] = {}
        #: Set on shutdown: stopping listeners leave their subscriptions (``keep_subscriptions``).
        self._keep_subscriptions = False

    def _pool_key(self, mailbox: MailboxConfig) -> tuple[str, ...]:
        parts = urlsplit(mailbox.service_url)
        origin = f"{parts.scheme}://{parts.netloc}".lower()
        return (origin, credential_digest(mailbox), str(mailbox.imap.verify_certificate))

    def _new_pool(self, mailbox: MailboxConfig) -> AuthenticatedPool:
        return AuthenticatedPool(
            credentials(mailbox),
            mode=self.settings.auth_mode,
            verify=context_for(mailbox.imap.verify_certificate, self.ca_file),
            max_connections=self.settings.connections_per_account,
            schemes=self._schemes,
            bindings=self._bindings,
        )

    @asynccontextmanager
    async def _http(
        self, mailbox: MailboxConfig, *, timeouts: httpx.Timeout | None = None
    ) -> AsyncIterator[httpx.AsyncClient]:
        """An HTTP client on the shared authenticated pool of the mailbox's credential group."""
        settings = self.settings
        key = self._pool_key(mailbox)
        pool, users = self._pools.get(key) or (self._new_pool(mailbox), 0)
        self._pools[key] = (pool, users + 1)
        timeout = timeouts or httpx.Timeout(settings.request_timeout, connect=settings.connect_timeout)
        try:
            # No proxies from the environment: they would bypass the pool (and its authentication).
            async with httpx.AsyncClient(transport=_Borrowed(pool), timeout=timeout, trust_env=False) as http:
                yield http
        finally:
            pool, users = self._pools[key]
            if users > 1:
                self._pools[key] = (pool, users - 1)
            else:
                del self._pools[key]
                with trio.CancelScope(shield=True):
                    await pool.aclose()

    def authenticated_connections(self) -> int:
        """TCP connections held by the pools (idle or busy; for status, tests and benchmarks)."""
        return sum(pool.connections for pool, _ in self._pools.values())

    def pools(self) -> list[AuthenticatedPool]:
        return [pool for pool, _ in self._pools.values()]

    def auth_scheme(self, url: str) -> str:
        """The scheme user name + password took at ``url``'s server ("" before the first answer)."""
        parts = urlsplit(url)
        return self._schemes.get(f"{parts.scheme}://{parts.netloc}".lower(), "")

    def _make_client(self, http: httpx.AsyncClient, mailbox: MailboxConfig) -> EwsClient:
        return EwsClient(http, mailbox, self.settings)

    def _hub(self, client: EwsClient, mailbox: MailboxConfig) -> StreamingHub:
        """The hub of this mailbox's group. Grouped by the exact credentials: with a user's own
        credentials (Basic, NTLM, a delegated token) each mailbox is its own group (its folders
        share connections); a service account (``ImpersonatedUser``) shares connections across
        every mailbox it impersonates, kept on one mailbox server per connection by the
        affinity headers (``_multiplex``)."""
        grouped = bool(impersonated_user(mailbox))
        key = (
            client.url,
            client.auth_identity,
            "impersonation" if grouped else "",
            str(mailbox.imap.verify_certificate),
        )
        hub = self._hubs.get(key)
        if hub is None:
            hub = self._hubs[key] = StreamingHub(
                key,
                self.settings,
                self._hubs,
                open_http=self._http,
                make_client=self._make_client,
                grouped=grouped,
            )
        return hub

    def streaming_connections(self) -> list[int]:
        """Subscriptions per open streaming connection (for status and tests)."""
        return [len(c.members) for hub in self._hubs.values() for c in hub.connections]

    async def resolve(self, mailbox: MailboxConfig) -> MailboxConfig:
        """``mailbox`` with its EWS URL: as given, else from the cache or Autodiscover."""
        if mailbox.service_url:
            return mailbox
        address = mailbox_address(mailbox)
        fingerprint = (address.lower(), autodiscover_url_hint(mailbox.extra))
        lock = self._discovery_locks.setdefault(mailbox.id, trio.Lock())
        # One discovery at a time per mailbox: its folders' listeners all start together.
        async with lock:
            cached = self._discovered.get(mailbox.id)
            if cached is None or cached[0] != fingerprint:
                headers = {"X-AnchorMailbox": address}
                # A pool of its own: candidates are other hosts than the EWS URL's.
                pool = self._new_pool(mailbox)
                timeout = httpx.Timeout(self.settings.request_timeout, connect=self.settings.connect_timeout)
                async with httpx.AsyncClient(transport=pool, timeout=timeout, trust_env=False) as http:
                    url = await discover_ews_url(
                        http,
                        address,
                        headers,
                        bearer=mailbox.use_oauth,
                        hint=fingerprint[1],
                        bases=self.autodiscover_bases,
                    )
                cached = self._discovered[mailbox.id] = (fingerprint, url)
        return mailbox.replace(service_url=cached[1])

    def forget_discovered(self, mailbox: MailboxConfig) -> None:
        """Drop a discovered URL (after a connect failure on it): the next use discovers again."""
        cached = self._discovered.get(mailbox.id)
        if cached is not None and cached[1] == mailbox.service_url:
            del self._discovered[mailbox.id]

    def discovered_url(self, mailbox_id: str) -> str:
        """The cached Autodiscover result of a mailbox, or "" (for status and tests)."""
        cached = self._discovered.get(mailbox_id)
        return cached[1] if cached else ""

    @asynccontextmanager
    async def client(self, mailbox: MailboxConfig) -> AsyncIterator[EwsClient]:
        """An ``EwsClient`` with its own HTTP connection pool (closed on exit); the EWS URL is
        discovered first when the mailbox has none."""
        mailbox = await self.resolve(mailbox)
        async with self._http(mailbox) as http:
            try:
                yield EwsClient(http, mailbox, self.settings)
            except MailConnectError:
                self.forget_discovered(mailbox)
                raise

    async def listen(
        self,
        mailbox: MailboxConfig,
        folder: str,
        on_new_mail: NewMailCallback,
        *,
        prefetch: Prefetch | None = None,
        task_status: trio.TaskStatus[FolderInfo] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # Resolved here too: members of the streaming hub must carry the URL.
        mailbox = await self.resolve(mailbox)
        async with self.client(mailbox) as client:
            reader = EwsReader(client)
            seed = ""
            started = False
            refused = 0
            while True:
                hub = self._hub(client, mailbox)
                # A place first: the subscription is made with that connection's affinity.
                place = hub.reserve(mailbox_address(mailbox))
                try:
                    message = await client.call_one(
                        _soap.subscribe_streaming([folder]), headers=place.affinity_headers()
                    )
                except BaseException:
                    hub.unreserve(place)
                    raise
                if place.anchor and client.backend_cookie and not place.backend_cookie:
                    place.backend_cookie = client.backend_cookie
                subscription = _soap.subscription_id(message)
                member: Member | None = None
                joined = False
                try:
                    if not started:
                        # After subscribing: mail from here on is either before this state or notified.
                        seed = (await reader.current_position(folder)).cursor
                    await on_new_mail(
                        SyncTask(
                            mailbox_id=mailbox.id,
                            folder=folder,
                            uidvalidity=EWS_UIDVALIDITY,
                            reason="catch-up",
                            seed_cursor=seed,
                        )
                    )
                    member = self._member(mailbox, folder, subscription, on_new_mail)
                    connection = hub.join(member, place)
                    joined = True
                    try:
                        await member.settled.wait()
                        if member.live and not started:
                            task_status.started(FolderInfo(folder, EWS_UIDVALIDITY, 0, 0))
                            started = True
                        await member.ended.wait()
                    finally:
                        connection.remove(member)
                finally:
                    if not joined:
                        hub.unreserve(place)
                    # A subscription the server still has (not lost) is ours to remove.
                    if member is None or not member.lost:
                        await self._unsubscribe(client, subscription, place.affinity_headers())
                if member.error is not None:
                    raise member.error
                refused = refused + 1 if member.refused else 0
                if refused >= 2:
                    # Subscribing again at once would loop: let the supervisor back off.
                    raise MailConnectError(f"EWS {client.where} keeps refusing new subscriptions")

    def keep_subscriptions(self) -> None:
        """Shutdown: from now on, listeners that stop leave their subscriptions on the server.

        Called by the node when it shuts down: each of its mailboxes is taken over by another
        node, which subscribes anew; the old subscriptions lapse on the server by themselves
        (Exchange expires a streaming subscription about 30 minutes after its last connection).
        Unsubscribing thousands of them would spend the shutdown grace on requests to Exchange
        and delay the handover. Closing or changing a mailbox unsubscribes (see ``listen``)."""
        self._keep_subscriptions = True

    async def _unsubscribe(self, client: EwsClient, subscription: str, headers: Mapping[str, str]) -> None:
        if self._keep_subscriptions:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(self.settings.unsubscribe_timeout):
            try:
                await client.call(_soap.unsubscribe(subscription), headers=headers)
            except MailSourceError as exc:
                # Not fatal: the server expires it by itself.
                log.info("EWS Unsubscribe failed (%s): the server will expire it", type(exc).__name__)

    @staticmethod
    def _member(
        mailbox: MailboxConfig, folder: str, subscription: str, on_new_mail: NewMailCallback
    ) -> Member:
        async def notify() -> None:
            await on_new_mail(
                SyncTask(mailbox_id=mailbox.id, folder=folder, uidvalidity=EWS_UIDVALIDITY, reason="exists")
            )

        return Member(mailbox, subscription, notify)

    @asynccontextmanager
    async def open_reader(self, mailbox: MailboxConfig) -> AsyncIterator[MailReader]:
        async with self.client(mailbox) as client:
            yield EwsReader(client)


def _parse_received(value: str) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


class EwsReader(MailReader):
    """A ``MailReader`` over one ``EwsClient``; positions are ``SyncFolderItems`` sync states."""

    __slots__ = ("_client",)

    def __init__(self, client: EwsClient) -> None:
        self._client = client

    async def sync(self, folder: str, sync_state: str, max_changes: int) -> _soap.SyncResult:
        message = await self._client.call_one(
            _soap.sync_folder_items(folder, sync_state, max(1, min(max_changes, MAX_SYNC_CHANGES)))
        )
        return _soap.sync_result(message)

    async def current_position(self, folder: str) -> Checkpoint:
        """Walk ``SyncFolderItems`` (ids only) from nothing to the folder's current end."""
        state = ""
        page = self._client.settings.sync_page_size
        while True:
            result = await self.sync(folder, state, page)
            state = result.sync_state or state
            if result.includes_last:
                return Checkpoint(EWS_UIDVALIDITY, 0, state)

    async def fetch_new(
        self, folder: str, checkpoint: Checkpoint, *, limit: int
    ) -> tuple[list[RawMessage], Checkpoint]:
        if not checkpoint.cursor:
            # Never seeded with a sync state: start at the current end rather than delivering
            # the whole folder.
            position = await self.current_position(folder)
            return [], Checkpoint(EWS_UIDVALIDITY, checkpoint.last_uid + 1, position.cursor)
        try:
            result = await self.sync(folder, checkpoint.cursor, limit)
        except EwsResponseError as exc:
            if exc.code != "ErrorInvalidSyncStateData":
                raise
            log.warning(
                "EWS sync state of %r is no longer valid: continuing from the folder's current end",
                folder,
            )
            position = await self.current_position(folder)
            return [], Checkpoint(EWS_UIDVALIDITY, checkpoint.last_uid + 1, position.cursor)
        if not result.changed:
            # Nothing happened: keep the checkpoint, even if the server sent a fresh state
            # string, so the caller sees "nothing new" and stops.
            return [], checkpoint
        after = Checkpoint(EWS_UIDVALIDITY, checkpoint.last_uid + 1, result.sync_state or checkpoint.cursor)
        return await self.fetch(result.created, batch_number=after.last_uid), after

    async def fetch(self, item_ids: Sequence[str], *, batch_number: int = 0) -> list[RawMessage]:
        """The MIME of these items, oldest first; items deleted meanwhile are left out."""
        found: list[RawMessage] = []
        for start in range(0, len(item_ids), GET_ITEM_BATCH):
            batch = item_ids[start : start + GET_ITEM_BATCH]
            for message in await self._client.call(_soap.get_items_mime(batch)):
                if message.code == "ErrorItemNotFound":
                    continue
                if not message.ok:
                    raise self._client._error(message.code, message.message)
                item = _soap.mime_item(message)
                if item is None:
                    raise MailProtocolError("EWS GetItem answer without ItemId or MimeContent")
                try:
                    data = base64.b64decode(item.mime_base64, validate=True)
                except (binascii.Error, ValueError):
                    raise MailProtocolError("EWS MimeContent is not valid base64") from None
                found.append(
                    RawMessage(
                        uid=batch_number,
                        data=data,
                        internal_date=_parse_received(item.date_time_received),
                        size=len(data),
                        key=item.item_id,
                    )
                )
        # Stable: items without a date keep the server's order.
        dated = [m.internal_date.timestamp() if m.internal_date else None for m in found]
        if all(d is not None for d in dated):
            found.sort(key=lambda m: m.internal_date.timestamp() if m.internal_date else 0.0)
        return found

    async def aclose(self) -> None:
        """Nothing to do: the source's ``client`` context closes the connection."""


__all__ = [
    "EWS_UIDVALIDITY",
    "EwsClient",
    "EwsReader",
    "EwsResponseError",
    "EwsSettings",
    "EwsSource",
    "ServerBusyError",
    "credential_digest",
    "credentials",
    "impersonated_user",
    "mailbox_address",
]
