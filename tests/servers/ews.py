"""An Exchange Web Services simulator: a real HTTP server speaking enough EWS for emlisten.

Written from Microsoft's published EWS reference (operations Subscribe, GetStreamingEvents,
SyncFolderItems, GetItem; MS-OXWSNTIF for streaming notifications). It runs inside the test's
Trio loop (Hypercorn on a free loopback port) at ``/EWS/Exchange.asmx`` and behaves like
Exchange, failures included:

- Accounts with Basic auth (user name + password) and OAuth bearer tokens; anything else gets
  HTTP 401 with ``WWW-Authenticate``. ``auth=("ntlm", "negotiate")`` makes it an NTLM-only server
  as IIS with Windows authentication is (Basic refused with 401): pyspnego is the acceptor, with
  the accounts in a credential file (``NTLM_USER_FILE``); the handshake authenticates the TCP
  connection (told apart by the client's address and port), whose later requests need no
  ``Authorization``; Negotiate carries NTLM in SPNEGO, or Kerberos when a KDC is set up
  (``tests/servers/kdc.py``: the acceptor reads ``HTTP/<host>``'s key from ``KRB5_KTNAME``);
  ``kerberos_only`` refuses NTLM inside Negotiate, and ``handshake_mechanisms`` tells which
  mechanism each handshake used. ``handshakes`` counts completed ones,
  ``close_connections`` answers every request but 401s with ``Connection: close`` (each request
  then needs a new handshake), and a dropped stream forgets its connection's authentication.
- ``GetFolder`` (ids only) and ``Unsubscribe`` (recorded in ``unsubscribed``; the subscription
  leaves its stream, which ends with ``ConnectionStatus`` Closed when it carries no other).
- ``ExchangeImpersonation`` (``PrimarySmtpAddress``) is honoured for accounts allowed to
  impersonate, else a ``ErrorImpersonateUserDenied`` fault. ``X-AnchorMailbox`` is recorded per
  request.
- Mailboxes with folders (``inbox`` plus any added), items with MIME, a change log per folder.
  ``add_message`` appends an item and queues ``CreatedEvent`` + ``NewMailEvent`` on every
  streaming subscription of that folder (events wait for the next connection, as in Exchange).
- ``Subscribe`` (streaming only), ``GetStreamingEvents`` as one chunked response of SOAP
  envelopes: pending notifications (several envelopes per chunk when several are pending,
  and each chunk split in two writes when ``split_chunks``), keep-alives (``ConnectionStatus``
  OK) every ``keepalive_seconds``, ``ConnectionStatus`` Closed after ``ConnectionTimeout``
  minutes (a "minute" lasts ``minute_seconds``, so tests can shorten it).
- On demand: ``drop_streams`` cuts open streams abruptly (no final chunk); ``expire_subscriptions``
  makes subscriptions vanish (``ErrorSubscriptionNotFound`` on the open stream and on every later
  request naming them; their events are lost); ``throttle`` answers ``ErrorServerBusy`` faults
  with ``BackOffMilliseconds`` and keeps answering busy until the back-off has passed.
- Up to 200 ``SubscriptionIds`` per ``GetStreamingEvents`` (more: ``ErrorInvalidRequest`` fault);
  a subscription is served by its newest response only, and a response left without any ends
  with ``ConnectionStatus`` Closed.
- ``SyncFolderItems`` with opaque sync states (a fresh state string on every answer, as Exchange
  does), ``MaxChangesReturned``, ``IncludesLastItemInRange``; ``Create`` and ``Delete`` changes.
- ``GetItem`` with ``IncludeMimeContent`` (base64) and ``DateTimeReceived``; ``ErrorItemNotFound``.
- ``FindItem`` (shallow) with ``IndexedPageItemView`` paging capped at ``find_count_limit``
  (1,000, as Exchange), a ``DateTimeReceived`` restriction and sort order.
- A folder tree below ``msgfolderroot`` (Inbox, Sent Items, plus added folders at any depth, also
  calendar/contacts folders); ``FindFolder`` with ``Traversal`` Shallow or Deep and
  ``IndexedPageFolderView`` paging (``IndexedPagingOffset``, ``IncludesLastItemInRange``).
- ``CreateItem`` of a ``Message`` given as ``MimeContent`` with ``MessageDisposition`` ``SendOnly``
  or ``SendAndSaveCopy`` (``SavedItemFolderId``, default Sent Items): recipients from the
  To/Cc/Bcc headers, every send recorded in ``sent`` with the exact MIME received; the copy (Bcc
  header kept) lands in the saved-item folder; recipients that are simulator accounts get the
  message (Bcc header removed) in their inbox. Refusals as Exchange words them:
  ``ErrorInvalidRecipients`` (no recipient, malformed address, or an address in
  ``rejected_recipients``), ``ErrorSendAsDenied`` (``From`` is not the mailbox),
  ``ErrorMessageSizeExceeded`` (over ``max_message_bytes``), ``ErrorMimeContentInvalidBase64String``.

- POX Autodiscover at ``/autodiscover/autodiscover.xml`` (and any path added to
  ``autodiscover_paths``), same authentication as EWS (HTTP 401 otherwise): the request must be
  the 2006 request schema asking for the ``2006a`` response schema (else error 600); answers
  ``Action`` ``settings`` with ``EXCH`` and ``EXPR`` protocols whose ``EwsUrl`` is ``url`` (or
  ``autodiscover_ews_url``), ``redirectAddr`` for addresses in ``autodiscover_redirect_addresses``,
  ``redirectUrl`` on paths in ``autodiscover_redirect_urls`` (any address), an HTTP 302 for paths in
  ``autodiscover_moved``, and error 500 for unknown addresses.

Not simulated: SRV records and the unauthenticated GET redirect of Autodiscover, SOAP
Autodiscover, pull/push subscriptions, FindItem beyond date restrictions, CreateItem of anything but a MIME
message (``SaveOnly`` drafts, items built from properties), real transport (NDRs), several
mailboxes on one streaming connection from different anchors, HangingConnectionLimit,
EWS schema validation beyond the elements read, and real throttling budgets.
Every request is logged in ``requests`` (with its trio time) so tests can assert waits.
"""

from __future__ import annotations

import atexit
import base64
import email.policy
import functools
import hashlib
import itertools
import json
import logging
import operator
import os
import secrets
import shutil
import struct
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from typing import Any
from xml.etree.ElementTree import Element
from xml.sax.saxutils import escape

import spnego
import spnego.exceptions
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from defusedxml.ElementTree import fromstring
from spnego._ntlm_raw.crypto import lmowfv1, ntowfv1
from spnego.channel_bindings import GssChannelBindings

from tests.servers._http import Receive, Scope, Send, lifespan_or_other, read_body, serve_app, server_config

log = logging.getLogger(__name__)

EWS_PATH = "/EWS/Exchange.asmx"
AUTODISCOVER_PATH = "/autodiscover/autodiscover.xml"
AUTODISCOVER_REQUEST_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
AUTODISCOVER_ERROR_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
AUTODISCOVER_RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
#: Subscriptions one GetStreamingEvents request may name (Exchange's documented maximum).
MAX_SUBSCRIPTIONS_PER_STREAM = 200
SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
TYPES_NS = "http://schemas.microsoft.com/exchange/services/2006/types"
MESSAGES_NS = "http://schemas.microsoft.com/exchange/services/2006/messages"
ERRORS_NS = "http://schemas.microsoft.com/exchange/services/2006/errors"


#: ``WWW-Authenticate`` names of the connection-authenticating schemes.
_HANDSHAKE_SCHEMES = {"negotiate": "Negotiate", "ntlm": "NTLM"}
_ntlm_store: str | None = None


#: The Windows domain of the simulator's accounts: ``EWS\\user`` logs in as ``user``.
NTLM_DOMAIN = "EWS"


#: A credential file per account (by lowercased user name and UPN), with its hashes computed once.
_ntlm_files: dict[str, str] = {}


@functools.cache
def _ntlm_account_dir() -> str:
    path = tempfile.mkdtemp(prefix="emlisten-ntlm-")
    atexit.register(shutil.rmtree, path, True)
    return path


def _ntlm_register(user: str, address: str, password: str) -> None:
    """Add an account to this process's NTLM credential file (pyspnego's acceptor reads the file
    named by ``NTLM_USER_FILE``; one file serves every simulator of the process), under the
    names Windows accepts: ``user``, ``user@domain`` (UPN) and ``DOMAIN\\user``.

    Also to a file of its own, with the LM and NT hashes computed here: for every handshake the
    acceptor reads its store file to the matching line and hashes a stored password again (the
    LM hash with a pure-Python DES), so with 1,000 accounts the simulator's credential lookup
    cost more than the rest of the handshake. ``_ntlm_store_for`` points the acceptor at the
    account's own file (a domain controller looks up one account too)."""
    global _ntlm_store
    if _ntlm_store is None:
        handle, _ntlm_store = tempfile.mkstemp(prefix="emlisten-ntlm-", suffix=".txt")
        os.close(handle)
        os.environ["NTLM_USER_FILE"] = _ntlm_store
        atexit.register(os.unlink, _ntlm_store)
    with open(_ntlm_store, "a", encoding="utf-8") as store:
        store.write(f":{user}:{password}\n:{address}:{password}\n{NTLM_DOMAIN}:{user}:{password}\n")
    if user.lower() in _ntlm_files or address.lower() in _ntlm_files:
        return  # the shared file answers with the first line that matches: so do we
    path = os.path.join(_ntlm_account_dir(), f"{len(_ntlm_files)}.txt")
    # smbpasswd lines: NAME:UID:LM:NT:FLAGS:LCT, which pyspnego reads without hashing anything.
    hashes = f"{lmowfv1(password).hex().upper()}:{ntowfv1(password).hex().upper()}"
    with open(path, "w", encoding="utf-8") as own:
        for name in (user, address, f"{NTLM_DOMAIN}\\{user}"):
            own.write(f"{name}:0:{hashes}:[U]:LCT-00000000\n")
    _ntlm_files[user.lower()] = _ntlm_files[address.lower()] = path


#: The start of an NTLM AUTHENTICATE message (signature, type 3).
_NTLM_AUTHENTICATE = b"NTLMSSP\x00\x03\x00\x00\x00"


def _ntlm_store_for(token: bytes) -> str | None:
    """The credential file of the account an NTLM AUTHENTICATE message (raw, or inside SPNEGO)
    names, or None (the acceptor then searches the shared file, and refuses unknown users)."""
    start = token.find(_NTLM_AUTHENTICATE)
    if start < 0 or len(token) < start + 64:
        return None
    message = token[start:]
    # MS-NLMP 2.2.1.3: UserNameFields (length, maximum, offset) at 36, NegotiateFlags at 60.
    length, _, offset = struct.unpack_from("<HHI", message, 36)
    (flags,) = struct.unpack_from("<I", message, 60)
    raw = message[offset : offset + length]
    try:
        user = raw.decode("utf-16-le" if flags & 0x1 else "latin-1")
    except UnicodeDecodeError:
        return None
    return _ntlm_files.get(user.lower())


@contextmanager
def _credential_store(path: str | None) -> Iterator[None]:
    """``NTLM_USER_FILE`` is ``path`` while the acceptor looks a user up (synchronously)."""
    if path is None:
        yield
        return
    shared = os.environ.get("NTLM_USER_FILE")
    os.environ["NTLM_USER_FILE"] = path
    try:
        yield
    finally:
        if shared is None:
            os.environ.pop("NTLM_USER_FILE", None)
        else:
            os.environ["NTLM_USER_FILE"] = shared


def _starts_handshake(token: bytes) -> bool:
    """An NTLM NEGOTIATE message or a SPNEGO NegTokenInit: a client starting (again)."""
    return token.startswith(b"NTLMSSP\x00\x01\x00\x00\x00") or token[:1] == b"\x60"


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    """``send`` adding ``extra`` headers to the response start (a handshake's final token)."""
    if not extra:
        return send

    async def send_with(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return send_with


def _attr(value: str) -> str:
    return escape(value, {'"': "&quot;"})


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _find(element: Element, name: str) -> Element | None:
    for sub in element.iter():
        if _local(sub.tag) == name:
            return sub
    return None


def _find_all(element: Element, name: str) -> list[Element]:
    return [sub for sub in element.iter() if _local(sub.tag) == name]


def _text(element: Element, name: str) -> str:
    found = _find(element, name)
    return (found.text or "").strip() if found is not None else ""


# --------------------------------------------------------------------------------------------
# State


@dataclass
class EwsItem:
    id: str
    change_key: str
    mime: bytes
    received: datetime
    folder_id: str


@dataclass
class EwsFolder:
    id: str
    name: str
    parent_id: str = ""
    folder_class: str = "IPF.Note"
    #: The element FindFolder returns: Folder, CalendarFolder, ContactsFolder, TasksFolder.
    kind: str = "Folder"
    #: (sequence number, "Create" | "Delete", item id); sequence numbers only grow.
    changes: list[tuple[int, str, str]] = field(default_factory=list)


@dataclass
class EwsAccount:
    address: str
    user: str
    password: str
    can_impersonate: bool = False
    folders: dict[str, EwsFolder] = field(default_factory=dict)
    distinguished: dict[str, str] = field(default_factory=dict)
    items: dict[str, EwsItem] = field(default_factory=dict)

    @property
    def inbox(self) -> EwsFolder:
        return self.folders[self.distinguished["inbox"]]

    @property
    def sent_items(self) -> EwsFolder:
        return self.folders[self.distinguished["sentitems"]]

    def items_in(self, folder_id: str) -> list[EwsItem]:
        return [i for i in self.items.values() if i.folder_id == folder_id]


@dataclass(frozen=True)
class SentMail:
    """One message sent with CreateItem, as the simulator received it."""

    address: str  # the sending mailbox
    disposition: str
    mime: bytes
    recipients: tuple[str, ...]
    saved_item_id: str | None


@dataclass
class _Stream:
    subscriptions: list[_Subscription]
    wake: trio.Event = field(default_factory=trio.Event)
    dropped: bool = False

    def poke(self) -> None:
        self.wake.set()


@dataclass
class _Subscription:
    id: str
    address: str
    folder_ids: frozenset[str]
    event_types: frozenset[str]
    expired: bool = False
    #: (event type, item id, folder id, timestamp) waiting for a stream.
    pending: list[tuple[str, str, str, str]] = field(default_factory=list)
    streams: set[int] = field(default_factory=set)
    #: ``X-AnchorMailbox`` of the Subscribe request when it asked for server affinity.
    anchor: str = ""


@dataclass(frozen=True)
class EwsRequest:
    """One request as the simulator saw it."""

    at: float  # trio.current_time() on arrival
    operation: str  # e.g. "GetStreamingEvents"; "" when the body was not understood
    mailbox: str | None  # the mailbox acted on (after impersonation), None if not authenticated
    status: int
    anchor: str | None  # the X-AnchorMailbox header
    impersonated: str | None
    busy: bool = False
    authorization_scheme: str = ""


@dataclass
class _Throttle:
    back_off_ms: int
    remaining: int
    busy_until: float = 0.0
    #: Only this operation is throttled ("": every one).
    operation: str = ""


class _Fault(Exception):
    def __init__(self, code: str, message: str, *, back_off_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.back_off_ms = back_off_ms


class _Drop(Exception):
    """Raised inside a streaming response to cut the connection without a final chunk."""


# --------------------------------------------------------------------------------------------
# Envelopes


def _envelope(body: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        f'<s:Envelope xmlns:s="{SOAP_NS}"><s:Header>'
        f'<h:ServerVersionInfo MajorVersion="15" MinorVersion="2" MajorBuildNumber="1544" '
        f'MinorBuildNumber="4" Version="V2017_07_11" xmlns:h="{TYPES_NS}" xmlns="{TYPES_NS}"/>'
        f'</s:Header><s:Body xmlns:m="{MESSAGES_NS}" xmlns:t="{TYPES_NS}">{body}</s:Body></s:Envelope>'
    ).encode()


def _fault(code: str, message: str, back_off_ms: int | None) -> bytes:
    message_xml = ""
    if back_off_ms is not None:
        message_xml = (
            f'<t:MessageXml xmlns:t="{TYPES_NS}"><t:Value Name="BackOffMilliseconds">'
            f"{back_off_ms}</t:Value></t:MessageXml>"
        )
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        f'<s:Envelope xmlns:s="{SOAP_NS}"><s:Body><s:Fault>'
        f'<faultcode xmlns:a="{TYPES_NS}">a:{escape(code)}</faultcode>'
        f'<faultstring xml:lang="en-US">{escape(message)}</faultstring>'
        f'<detail><e:ResponseCode xmlns:e="{ERRORS_NS}">{escape(code)}</e:ResponseCode>'
        f'<e:Message xmlns:e="{ERRORS_NS}">{escape(message)}</e:Message>{message_xml}</detail>'
        "</s:Fault></s:Body></s:Envelope>"
    ).encode()


def _message(name: str, inner: str = "", *, code: str = "NoError", text: str = "") -> str:
    if code == "NoError":
        return f'<m:{name} ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>{inner}</m:{name}>'
    return (
        f'<m:{name} ResponseClass="Error"><m:MessageText>{escape(text)}</m:MessageText>'
        f"<m:ResponseCode>{code}</m:ResponseCode><m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>"
        f"{inner}</m:{name}>"
    )


def _response(operation: str, messages: list[str]) -> bytes:
    return _envelope(
        f"<m:{operation}Response><m:ResponseMessages>{''.join(messages)}</m:ResponseMessages>"
        f"</m:{operation}Response>"
    )


def _streaming(inner: str, *, code: str = "NoError", text: str = "") -> bytes:
    return _response(
        "GetStreamingEvents", [_message("GetStreamingEventsResponseMessage", inner, code=code, text=text)]
    )


def _timestamp(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _without_bcc(mime: bytes) -> bytes:
    """The message as transport delivers it: the Bcc header (and its folded lines) removed."""
    end = mime.find(b"\r\n\r\n")
    if end < 0:
        return mime
    lines = mime[: end + 2].split(b"\r\n")
    kept: list[bytes] = []
    skipping = False
    for line in lines:
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = line.lower().startswith(b"bcc:")
        if not skipping:
            kept.append(line)
    return b"\r\n".join(kept) + mime[end + 2 :]


def _new_id(prefix: str = "AAMkA") -> str:
    return prefix + base64.b64encode(uuid.uuid4().bytes + secrets.token_bytes(8)).decode()


def _client_name(context: spnego.ContextProxy) -> str:
    """The authenticated user's name: NTLM's as the client sent it (``user``, ``DOMAIN\\user``,
    a UPN), Kerberos's principal ``user@REALM`` without the realm (the KDC's users are the
    simulator's accounts by user name)."""
    principal = str(context.client_principal or "")
    if context.negotiated_protocol == "kerberos":
        return principal.rpartition("@")[0] or principal
    return principal


# --------------------------------------------------------------------------------------------
# The server


class EwsSimulator:
    """Serve with ``await nursery.start(sim.serve)`` (or ``running_ews_simulator()``)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        keepalive_seconds: float = 1.0,
        minute_seconds: float = 60.0,
        split_chunks: bool = True,
        auth: Sequence[str] = ("basic",),
        close_connections: bool = False,
        tls: tuple[str, str] | None = None,
        channel_binding: bool = False,
        kerberos_only: bool = False,
    ) -> None:
        """``tls``: (certificate PEM, key PEM) files: serve https. ``channel_binding``: NTLM and
        Negotiate demand Extended Protection (the client's token bound to that certificate).
        ``kerberos_only``: Negotiate refuses NTLM inside SPNEGO (a domain with NTLM disabled);
        Kerberos needs the acceptor's keytab (``KRB5_KTNAME``, see ``tests/servers/kdc.py``)."""
        self.host = host
        self.port = 0
        self.keepalive_seconds = keepalive_seconds
        self.minute_seconds = minute_seconds
        self.split_chunks = split_chunks
        #: Schemes accepted for user + password: "basic", "ntlm", "negotiate" (bearer always).
        self.auth_schemes = tuple(a.lower() for a in auth)
        self.close_connections = close_connections
        self.kerberos_only = kerberos_only
        self.tls = tls
        self._bindings: GssChannelBindings | None = None
        if channel_binding:
            if tls is None:
                raise ValueError("channel binding needs TLS")
            with open(tls[0], "rb") as pem:
                der = x509.load_pem_x509_certificate(pem.read()).public_bytes(serialization.Encoding.DER)
            # RFC 5929 with the test certificates' signature hash (SHA-256), computed here and
            # not with the client's code, so a client getting it wrong is refused.
            end_point = hashlib.sha256(der).digest()
            self._bindings = GssChannelBindings(application_data=b"tls-server-end-point:" + end_point)
        #: Completed NTLM/Negotiate handshakes (one per authenticated TCP connection).
        self.handshakes = 0
        #: The mechanism of each completed handshake: "ntlm", or "kerberos" (inside Negotiate).
        self.handshake_mechanisms: list[str] = []
        #: Request body bytes received (all requests).
        self.bytes_received = 0
        #: Connections (client address, port) authenticated by a handshake, and their account.
        self._connection_accounts: dict[tuple[Any, ...], str] = {}
        self._handshakes_in_progress: dict[tuple[Any, ...], tuple[str, Any]] = {}
        #: Subscription ids removed by Unsubscribe, in order.
        self.unsubscribed: list[str] = []
        #: The request being handled (handlers are synchronous) and headers for its answer.
        self._request_headers: Mapping[str, str] = {}
        self._response_headers: list[tuple[bytes, bytes]] = []
        #: (X-AnchorMailbox, Cookie) of every GetStreamingEvents request carrying several mailboxes.
        self.grouped_streams: list[tuple[str, str]] = []
        self.accounts: dict[str, EwsAccount] = {}  # by lowercased address
        #: Accounts by lowercased user name and address (the first added wins, as in a scan).
        self._accounts_by_name: dict[str, EwsAccount] = {}
        self.tokens: dict[str, str] = {}  # bearer token -> address
        self.requests: list[EwsRequest] = []
        self._subscriptions: dict[str, _Subscription] = {}
        self._streams: dict[int, _Stream] = {}
        #: Subscription count of every finished GetStreamingEvents response.
        self.streams_served: list[int] = []
        #: Most GetStreamingEvents responses open at once.
        self.max_open_streams = 0
        self._stream_ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._throttles: dict[str, _Throttle] = {}
        self._changed = trio.Event()
        self.sent: list[SentMail] = []
        #: Addresses CreateItem refuses with ErrorInvalidRecipients (lowercase).
        self.rejected_recipients: set[str] = set()
        self.max_message_bytes = 25 * 1024 * 1024
        #: Items one FindItem page returns at most (Exchange's EWSFindCountLimit).
        self.find_count_limit = 1000
        #: Paths (lowercase) answering POX Autodiscover.
        self.autodiscover_paths: set[str] = {AUTODISCOVER_PATH}
        #: Requested address (lowercase) -> the address a ``redirectAddr`` answer names.
        self.autodiscover_redirect_addresses: dict[str, str] = {}
        #: Autodiscover path (lowercase) -> the URL its ``redirectUrl`` answers name.
        self.autodiscover_redirect_urls: dict[str, str] = {}
        #: Autodiscover path (lowercase) -> ``Location`` of an HTTP 302 answer.
        self.autodiscover_moved: dict[str, str] = {}
        #: The ``EwsUrl`` in ``settings`` answers (default: ``url``).
        self.autodiscover_ews_url: str | None = None

    # -- server ----------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = server_config(self.host, self.port, loglevel="CRITICAL")
        config.errorlog = None
        config.keep_alive_timeout = 75
        # Hundreds of listeners may connect at once (the multiplexing tests).
        config.backlog = 1024
        if self.tls is not None:
            config.certfile, config.keyfile = self.tls
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(serve_app, self._asgi, config)
            task_status.started()

    @property
    def url(self) -> str:
        """The EWS endpoint URL (what Creatio sends as ``ServiceUrl``)."""
        return f"{self.base_url}{EWS_PATH}"

    @property
    def base_url(self) -> str:
        """``http(s)://host:port``: an Autodiscover base URL for ``EwsSource(autodiscover_bases=)``."""
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    # -- accounts and mail -----------------------------------------------------------------

    def add_account(
        self, user: str | None = None, password: str | None = None, *, can_impersonate: bool = False
    ) -> EwsAccount:
        name = user or f"user-{uuid.uuid4().hex[:10]}"
        address = name if "@" in name else f"{name}@ews.example.test"
        account = EwsAccount(address, name, password or secrets.token_urlsafe(12), can_impersonate)
        if any(s in _HANDSHAKE_SCHEMES for s in self.auth_schemes):
            _ntlm_register(name, address, account.password)
        root = EwsFolder(_new_id("AQMkAroot"), "Top of Information Store", folder_class="")
        inbox = EwsFolder(_new_id("AQMkAinbox"), "Inbox", root.id)
        sent = EwsFolder(_new_id("AQMkAsent"), "Sent Items", root.id)
        for folder, name in ((inbox, "inbox"), (root, "msgfolderroot"), (sent, "sentitems")):
            account.folders[folder.id] = folder
            account.distinguished[name] = folder.id
        self.accounts[address.lower()] = account
        self._accounts_by_name.setdefault(account.user.lower(), account)
        self._accounts_by_name.setdefault(address.lower(), account)
        return account

    def add_folder(
        self,
        address: str,
        name: str,
        *,
        parent_id: str | None = None,
        folder_class: str = "IPF.Note",
        kind: str = "Folder",
    ) -> str:
        """A folder below ``parent_id`` (default: the root, beside the inbox). Returns its id."""
        account = self.accounts[address.lower()]
        parent = parent_id or account.distinguished["msgfolderroot"]
        if parent not in account.folders:
            raise KeyError(parent)
        folder = EwsFolder(_new_id("AQMkAfolder"), name, parent, folder_class, kind)
        account.folders[folder.id] = folder
        return folder.id

    def issue_token(self, address: str) -> str:
        token = "ews-" + secrets.token_urlsafe(24)
        self.tokens[token] = address.lower()
        return token

    def revoke_token(self, token: str) -> None:
        self.tokens.pop(token, None)

    def add_message(
        self, address: str, mime: bytes, *, folder_id: str | None = None, received: datetime | None = None
    ) -> str:
        """Deliver ``mime`` into the inbox (or ``folder_id``); notify subscriptions. Returns the item id.
        ``received``: its ``DateTimeReceived`` (default now; older for mail that was already there)."""
        account = self.accounts[address.lower()]
        folder = account.folders[folder_id] if folder_id else account.inbox
        item = EwsItem(_new_id(), _new_id("CQAAABYAAA"), mime, received or datetime.now(UTC), folder.id)
        account.items[item.id] = item
        folder.changes.append((next(self._seq), "Create", item.id))
        stamp = _timestamp(item.received)
        for subscription in self._subscriptions.values():
            if subscription.address != account.address.lower() or subscription.expired:
                continue
            if folder.id not in subscription.folder_ids:
                continue
            for event in ("CreatedEvent", "NewMailEvent"):
                if event in subscription.event_types:
                    subscription.pending.append((event, item.id, folder.id, stamp))
            for stream_id in subscription.streams:
                self._streams[stream_id].poke()
        return item.id

    def delete_message(self, address: str, item_id: str) -> None:
        account = self.accounts[address.lower()]
        item = account.items.pop(item_id)
        account.folders[item.folder_id].changes.append((next(self._seq), "Delete", item_id))

    # -- failures on demand ----------------------------------------------------------------

    def drop_streams(self, address: str) -> int:
        """Cut every open streaming connection of ``address`` abruptly. Returns how many."""
        count = 0
        for stream in self._streams.values():
            if any(s.address == address.lower() for s in stream.subscriptions):
                stream.dropped = True
                stream.poke()
                count += 1
        return count

    def expire_subscriptions(self, address: str) -> int:
        """Make every subscription of ``address`` vanish (as after a server restart or a lapse)."""
        count = 0
        for subscription in self._subscriptions.values():
            if subscription.address == address.lower() and not subscription.expired:
                subscription.expired = True
                subscription.pending.clear()
                count += 1
                for stream_id in subscription.streams:
                    self._streams[stream_id].poke()
        return count

    def expire_subscription(self, subscription_id: str) -> None:
        """Make one subscription vanish (``ErrorSubscriptionIds`` names only it)."""
        subscription = self._subscriptions[subscription_id]
        subscription.expired = True
        subscription.pending.clear()
        for stream_id in subscription.streams:
            self._streams[stream_id].poke()

    def throttle(self, address: str, back_off_ms: int, *, count: int = 1, operation: str = "") -> None:
        """Answer the next ``count`` requests for ``address`` (of ``operation`` only, when given)
        with ErrorServerBusy, and any such request that comes before the announced back-off has
        passed."""
        self._throttles[address.lower()] = _Throttle(back_off_ms, count, operation=operation)

    # -- inspection ------------------------------------------------------------------------

    def live_subscriptions(self, address: str) -> list[str]:
        return [s.id for s in self._subscriptions.values() if s.address == address.lower() and not s.expired]

    def open_streams(self, address: str) -> int:
        return sum(
            1
            for stream in self._streams.values()
            if any(s.address == address.lower() for s in stream.subscriptions)
        )

    def stream_sizes(self, address: str) -> list[int]:
        """Subscriptions of ``address`` carried by each open streaming response, largest first."""
        sizes = [
            sum(1 for s in stream.subscriptions if s.address == address.lower())
            for stream in self._streams.values()
        ]
        return sorted((n for n in sizes if n), reverse=True)

    def open_stream_sizes(self) -> list[int]:
        """Subscriptions carried by each open streaming response (any mailbox), largest first."""
        return sorted((len(stream.subscriptions) for stream in self._streams.values()), reverse=True)

    def subscription_of_folder(self, address: str, folder_id: str) -> str:
        """The live subscription id on ``folder_id`` (exactly one expected)."""
        (found,) = [
            s.id
            for s in self._subscriptions.values()
            if s.address == address.lower() and not s.expired and folder_id in s.folder_ids
        ]
        return found

    def requests_for(self, address: str, operation: str | None = None) -> list[EwsRequest]:
        return [
            r
            for r in self.requests
            if r.mailbox == address.lower() and (operation is None or r.operation == operation)
        ]

    async def wait_until(self, check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
        """Wait (event driven) until ``check()`` is truthy; re-checked after every request and
        stream change."""
        with trio.move_on_after(timeout):
            while True:
                changed = self._changed
                result = check()
                if result:
                    return result
                await changed.wait()
        raise AssertionError(f"EWS simulator: timed out waiting for {what or check}")

    def _notify_change(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- HTTP ------------------------------------------------------------------------------

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if await lifespan_or_other(scope, receive, send):
            return
        body = await read_body(receive)
        if body is None:
            return
        self.bytes_received += len(body)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        connection = tuple(scope.get("client") or ())
        if self.close_connections:
            send = self._closing(send, connection)
        try:
            await self._route(scope, body, headers, connection, receive, send)
        except _Drop:
            # The TCP connection goes: so does its authentication.
            self._connection_accounts.pop(connection, None)
            raise

    def _closing(self, send: Send, connection: tuple[Any, ...]) -> Send:
        async def send_and_close(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] != 401:
                # Not during a handshake: its legs must share the connection.
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
                self._connection_accounts.pop(connection, None)
            await send(message)

        return send_and_close

    async def _route(
        self,
        scope: Scope,
        body: bytes,
        headers: dict[str, str],
        connection: tuple[Any, ...],
        receive: Receive,
        send: Send,
    ) -> None:
        path = str(scope["path"]).lower()
        if (
            path in self.autodiscover_paths
            or path in self.autodiscover_moved
            or path in self.autodiscover_redirect_urls
        ):
            if scope["method"] != "POST":
                await self._plain(send, 405, b"Autodiscover accepts POST only")
                return
            await self._autodiscover(path, body, headers, connection, send)
            return
        if scope["path"] != EWS_PATH:
            await self._plain(send, 404, b"not found")
            return
        if scope["method"] != "POST":
            await self._plain(send, 405, b"EWS accepts POST only")
            return
        await self._handle(body, headers, connection, receive, send)

    @staticmethod
    async def _plain(
        send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"content-length", str(len(body)).encode()),
                    *(extra or []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    async def _xml(send: Send, status: int, body: bytes) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/xml; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _record(self, request: EwsRequest) -> None:
        self.requests.append(request)
        self._notify_change()

    def _challenges(self, scheme: str, realm: str) -> list[tuple[bytes, bytes]]:
        if scheme == "bearer":
            return [(b"www-authenticate", b'Bearer error="invalid_token"')]
        found = []
        for accepted in self.auth_schemes:
            if accepted in _HANDSHAKE_SCHEMES:
                found.append((b"www-authenticate", _HANDSHAKE_SCHEMES[accepted].encode()))
            elif accepted == "basic":
                found.append((b"www-authenticate", f'Basic realm="{realm}"'.encode()))
        return found

    def _account_named(self, principal: str) -> EwsAccount | None:
        return self._accounts_by_name.get(principal.rsplit("\\", 1)[-1].lower())

    def _authorize(
        self, headers: Mapping[str, str], connection: tuple[Any, ...], realm: str
    ) -> tuple[EwsAccount | None, str, list[tuple[bytes, bytes]]]:
        """(account or None, scheme, headers: the challenge for a 401, or a final token)."""
        value = headers.get("authorization", "")
        scheme = value.partition(" ")[0].lower()
        if scheme in _HANDSHAKE_SCHEMES and scheme in self.auth_schemes:
            try:
                return self._handshake(scheme, value.partition(" ")[2].strip(), connection, realm)
            except AttributeError:
                # pyspnego's Kerberos acceptor fails so on channel bindings that do not match
                # (Extended Protection): a refusal, as IIS answers it.
                self._handshakes_in_progress.pop(connection, None)
                return None, scheme, self._challenges(scheme, realm)
        if not value and connection in self._connection_accounts:
            return self.accounts.get(self._connection_accounts[connection]), "connection", []
        if scheme == "basic" and "basic" not in self.auth_schemes:
            return None, scheme, self._challenges(scheme, realm)
        account, scheme = self._authenticate(headers)
        return account, scheme, [] if account is not None else self._challenges(scheme, realm)

    def _handshake(
        self, scheme: str, token: str, connection: tuple[Any, ...], realm: str
    ) -> tuple[EwsAccount | None, str, list[tuple[bytes, bytes]]]:
        name = _HANDSHAKE_SCHEMES[scheme]
        self._connection_accounts.pop(connection, None)
        started = self._handshakes_in_progress.get(connection)
        try:
            raw = base64.b64decode(token)
            if started is not None and (started[0] != scheme or _starts_handshake(raw)):
                # A new first leg restarts the handshake, as on IIS.
                started = None
            if started is None:
                context = spnego.server(protocol=scheme, channel_bindings=self._bindings)
                answer = context.step(raw)
            else:
                context = started[1]
                with _credential_store(_ntlm_store_for(raw)):
                    answer = context.step(raw)
        except (spnego.exceptions.SpnegoError, ValueError):
            # A wrong password or an unknown user: start again from the challenge.
            self._handshakes_in_progress.pop(connection, None)
            return None, scheme, self._challenges(scheme, realm)
        if self.kerberos_only and context.negotiated_protocol != "kerberos":
            # NTLM disabled in the domain: the NTLM token inside SPNEGO is refused at once.
            self._handshakes_in_progress.pop(connection, None)
            return None, scheme, self._challenges(scheme, realm)
        if not context.complete:
            self._handshakes_in_progress[connection] = (scheme, context)
            return (
                None,
                scheme,
                [(b"www-authenticate", f"{name} {base64.b64encode(answer or b'').decode()}".encode())],
            )
        self._handshakes_in_progress.pop(connection, None)
        account = self._account_named(_client_name(context))
        if account is None:
            return None, scheme, self._challenges(scheme, realm)
        self._connection_accounts[connection] = account.address.lower()
        self.handshakes += 1
        self.handshake_mechanisms.append(str(context.negotiated_protocol or scheme))
        final = (
            [(b"www-authenticate", f"{name} {base64.b64encode(answer).decode()}".encode())] if answer else []
        )
        return account, scheme, final

    def authenticated_connections(self) -> int:
        """Connections authenticated by a handshake and not known to be closed."""
        return len(self._connection_accounts)

    def _authenticate(self, headers: Mapping[str, str]) -> tuple[EwsAccount | None, str]:
        value = headers.get("authorization", "")
        scheme, _, credentials = value.partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            try:
                user, _, password = base64.b64decode(credentials).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None, scheme
            account = self._accounts_by_name.get(user.lower())
            if account is not None and secrets.compare_digest(password.encode(), account.password.encode()):
                return account, scheme
            return None, scheme
        if scheme == "bearer":
            address = self.tokens.get(credentials.strip())
            return (self.accounts.get(address) if address else None), scheme
        return None, scheme

    async def _handle(
        self,
        raw: bytes,
        headers: Mapping[str, str],
        connection: tuple[Any, ...],
        receive: Receive,
        send: Send,
    ) -> None:
        now = trio.current_time()
        anchor = headers.get("x-anchormailbox")
        caller, scheme, auth_headers = self._authorize(headers, connection, "ews")
        if caller is None:
            self._record(EwsRequest(now, "", None, 401, anchor, None, authorization_scheme=scheme))
            await self._plain(send, 401, b"401 Unauthorized", auth_headers)
            return
        send = _with_headers(send, auth_headers)
        operation, impersonated = "", None
        try:
            try:
                root = fromstring(raw, forbid_dtd=True)
            except Exception:
                raise _Fault("ErrorSchemaValidation", "The request failed schema validation.") from None
            body = _find(root, "Body")
            if body is None or len(body) == 0:
                raise _Fault("ErrorSchemaValidation", "The request has no SOAP body.")
            request = body[0]
            operation = _local(request.tag)
            target = caller
            impersonation = _find(root, "ExchangeImpersonation")
            if impersonation is not None:
                impersonated = _text(impersonation, "PrimarySmtpAddress").lower()
                if not caller.can_impersonate:
                    raise _Fault(
                        "ErrorImpersonateUserDenied",
                        "The account does not have permission to impersonate the requested user.",
                    )
                found = self.accounts.get(impersonated)
                if found is None:
                    raise _Fault(
                        "ErrorNonExistentMailbox", "The SMTP address has no mailbox associated with it."
                    )
                target = found
            self._check_throttle(target, now, operation)
            if operation == "GetStreamingEvents":
                self._record(
                    EwsRequest(
                        now,
                        operation,
                        target.address.lower(),
                        200,
                        anchor,
                        impersonated,
                        authorization_scheme=scheme,
                    )
                )
                await self._stream(
                    target,
                    request,
                    receive,
                    send,
                    caller=caller,
                    anchor=anchor or "",
                    cookie=headers.get("cookie", ""),
                )
                return
            handler = {
                "Subscribe": self._subscribe,
                "SyncFolderItems": self._sync_folder_items,
                "GetItem": self._get_item,
                "FindFolder": self._find_folder,
                "GetFolder": self._get_folder,
                "Unsubscribe": self._unsubscribe,
                "FindItem": self._find_item,
                "CreateItem": self._create_item,
            }.get(operation)
            if handler is None:
                raise _Fault(
                    "ErrorInvalidRequest", f"The operation {operation} is not supported by the simulator."
                )
            self._response_headers = []
            self._request_headers = headers
            answer = handler(target, request)
        except _Fault as fault:
            self._record(
                EwsRequest(
                    now,
                    operation,
                    caller.address.lower() if impersonated is None else impersonated,
                    500,
                    anchor,
                    impersonated,
                    busy=fault.code == "ErrorServerBusy",
                    authorization_scheme=scheme,
                )
            )
            await self._xml(send, 500, _fault(fault.code, fault.message, fault.back_off_ms))
            return
        self._record(
            EwsRequest(
                now, operation, target.address.lower(), 200, anchor, impersonated, authorization_scheme=scheme
            )
        )
        await self._xml(_with_headers(send, self._response_headers), 200, answer)

    async def _autodiscover(
        self, path: str, raw: bytes, headers: Mapping[str, str], connection: tuple[Any, ...], send: Send
    ) -> None:
        now = trio.current_time()
        anchor = headers.get("x-anchormailbox")
        caller, scheme, auth_headers = self._authorize(headers, connection, "autodiscover")
        if caller is None:
            self._record(
                EwsRequest(now, "Autodiscover", None, 401, anchor, None, authorization_scheme=scheme)
            )
            await self._plain(send, 401, b"401 Unauthorized", auth_headers)
            return
        send = _with_headers(send, auth_headers)
        self._record(
            EwsRequest(
                now, "Autodiscover", caller.address.lower(), 200, anchor, None, authorization_scheme=scheme
            )
        )
        location = self.autodiscover_moved.get(path)
        if location is not None:
            await self._plain(send, 302, b"moved", [(b"location", location.encode())])
            return
        await self._xml(send, 200, self._autodiscover_answer(path, raw))

    def _autodiscover_answer(self, path: str, raw: bytes) -> bytes:
        def error(code: str, message: str) -> bytes:
            return (
                '<?xml version="1.0" encoding="utf-8"?>'
                f'<Autodiscover xmlns="{AUTODISCOVER_ERROR_NS}"><Response>'
                f'<Error Time="{datetime.now(UTC):%H:%M:%S}" Id="{secrets.randbelow(10**9)}">'
                f"<ErrorCode>{code}</ErrorCode><Message>{escape(message)}</Message><DebugData />"
                "</Error></Response></Autodiscover>"
            ).encode()

        def account(inner: str) -> bytes:
            return (
                '<?xml version="1.0" encoding="utf-8"?>'
                f'<Autodiscover xmlns="{AUTODISCOVER_ERROR_NS}">'
                f'<Response xmlns="{AUTODISCOVER_RESPONSE_NS}"><Account>'
                f"<AccountType>email</AccountType>{inner}</Account></Response></Autodiscover>"
            ).encode()

        try:
            root = fromstring(raw, forbid_dtd=True)
        except Exception:
            return error("600", "Invalid Request")
        if root.tag != f"{{{AUTODISCOVER_REQUEST_NS}}}Autodiscover":
            return error("600", "Invalid Request")
        address = _text(root, "EMailAddress").lower()
        if _text(root, "AcceptableResponseSchema") != AUTODISCOVER_RESPONSE_NS or not address:
            return error("600", "Invalid Request")
        if address in self.autodiscover_redirect_addresses:
            target = self.autodiscover_redirect_addresses[address]
            return account(f"<Action>redirectAddr</Action><RedirectAddr>{escape(target)}</RedirectAddr>")
        if path in self.autodiscover_redirect_urls:
            target = self.autodiscover_redirect_urls[path]
            return account(f"<Action>redirectUrl</Action><RedirectUrl>{escape(target)}</RedirectUrl>")
        found = self.accounts.get(address)
        if found is None:
            return error("500", "The e-mail address cannot be found.")
        ews_url = escape(self.autodiscover_ews_url or self.url)
        server = escape(self.host)
        return (
            '<?xml version="1.0" encoding="utf-8"?>'
            f'<Autodiscover xmlns="{AUTODISCOVER_ERROR_NS}">'
            f'<Response xmlns="{AUTODISCOVER_RESPONSE_NS}">'
            f"<User><DisplayName>{escape(found.user)}</DisplayName>"
            f"<AutoDiscoverSMTPAddress>{escape(found.address)}</AutoDiscoverSMTPAddress></User>"
            "<Account><AccountType>email</AccountType><Action>settings</Action>"
            f"<Protocol><Type>EXCH</Type><Server>{server}</Server><EwsUrl>{ews_url}</EwsUrl></Protocol>"
            f"<Protocol><Type>EXPR</Type><Server>{server}</Server><EwsUrl>{ews_url}</EwsUrl></Protocol>"
            "</Account></Response></Autodiscover>"
        ).encode()

    def _check_throttle(self, account: EwsAccount, now: float, operation: str) -> None:
        throttle = self._throttles.get(account.address.lower())
        if throttle is None or throttle.operation not in ("", operation):
            return
        if now < throttle.busy_until or throttle.remaining > 0:
            if now >= throttle.busy_until:
                throttle.remaining -= 1
                throttle.busy_until = now + throttle.back_off_ms / 1000
            remaining_ms = max(1, round((throttle.busy_until - now) * 1000))
            raise _Fault(
                "ErrorServerBusy",
                "The server cannot service this request right now. Try again later.",
                back_off_ms=remaining_ms,
            )
        del self._throttles[account.address.lower()]

    # -- operations ------------------------------------------------------------------------

    def _folder(self, account: EwsAccount, element: Element | None) -> EwsFolder | None:
        if element is None:
            return None
        name = _local(element.tag)
        folder_id = element.get("Id", "")
        if name == "DistinguishedFolderId":
            folder_id = account.distinguished.get(folder_id, "")
        return account.folders.get(folder_id)

    def _unsubscribe(self, account: EwsAccount, request: Element) -> bytes:
        subscription_id = _text(request, "SubscriptionId")
        subscription = self._subscriptions.get(subscription_id)
        if subscription is None or subscription.expired or subscription.address != account.address.lower():
            return _response(
                "Unsubscribe",
                [
                    _message(
                        "UnsubscribeResponseMessage",
                        code="ErrorSubscriptionNotFound",
                        text="The subscription could not be found.",
                    )
                ],
            )
        del self._subscriptions[subscription_id]
        self.unsubscribed.append(subscription_id)
        for stream_id in subscription.streams:
            stream = self._streams.get(stream_id)
            if stream is not None and subscription in stream.subscriptions:
                stream.subscriptions.remove(subscription)
                stream.poke()
        self._notify_change()
        return _response("Unsubscribe", [_message("UnsubscribeResponseMessage")])

    def _get_folder(self, account: EwsAccount, request: Element) -> bytes:
        name = "GetFolderResponseMessage"
        ids = _find(request, "FolderIds")
        if ids is None or len(ids) == 0:
            raise _Fault("ErrorSchemaValidation", "FolderIds is required.")
        messages = []
        for element in ids:
            folder = self._folder(account, element)
            if folder is None:
                code = "ErrorFolderNotFound"
                text = "The specified folder could not be found in the store."
                if _local(element.tag) == "FolderId" and not element.get("Id", "").startswith("AQMkA"):
                    code, text = "ErrorInvalidIdMalformed", "Id is malformed."
                messages.append(_message(name, "<m:Folders/>", code=code, text=text))
                continue
            messages.append(
                _message(
                    name,
                    f'<m:Folders><t:{folder.kind}><t:FolderId Id="{_attr(folder.id)}" ChangeKey="AQAAAA=="/>'
                    f"<t:DisplayName>{escape(folder.name)}</t:DisplayName></t:{folder.kind}></m:Folders>",
                )
            )
        return _response("GetFolder", messages)

    def _subscribe(self, account: EwsAccount, request: Element) -> bytes:
        streaming = _find(request, "StreamingSubscriptionRequest")
        if streaming is None:
            raise _Fault("ErrorInvalidSubscriptionRequest", "Only streaming subscriptions are simulated.")
        folder_ids = set()
        ids = _find(streaming, "FolderIds")
        for element in list(ids) if ids is not None else []:
            folder = self._folder(account, element)
            if folder is None:
                return _response(
                    "Subscribe",
                    [
                        _message(
                            "SubscribeResponseMessage",
                            code="ErrorFolderNotFound",
                            text="The specified folder could not be found in the store.",
                        )
                    ],
                )
            folder_ids.add(folder.id)
        events = frozenset((e.text or "").strip() for e in _find_all(streaming, "EventType"))
        if not folder_ids or not events:
            raise _Fault("ErrorSchemaValidation", "FolderIds and EventTypes are required.")
        subscription = _Subscription(_new_id("EQBt"), account.address.lower(), frozenset(folder_ids), events)
        if self._request_headers.get("x-preferserveraffinity", "").lower() == "true":
            # Exchange keeps the group on the anchor's mailbox server and names it in a cookie.
            subscription.anchor = self._request_headers.get("x-anchormailbox", "").lower()
            cookie = f"X-BackEndOverrideCookie=mbx01~{subscription.anchor}; path=/"
            self._response_headers.append((b"set-cookie", cookie.encode()))
        self._subscriptions[subscription.id] = subscription
        return _response(
            "Subscribe",
            [
                _message(
                    "SubscribeResponseMessage",
                    f"<m:SubscriptionId>{escape(subscription.id)}</m:SubscriptionId>",
                )
            ],
        )

    def _sync_folder_items(self, account: EwsAccount, request: Element) -> bytes:
        name = "SyncFolderItemsResponseMessage"
        sync_folder = _find(request, "SyncFolderId")
        folder = self._folder(
            account, sync_folder[0] if sync_folder is not None and len(sync_folder) else None
        )
        if folder is None:
            return _response(
                "SyncFolderItems",
                [
                    _message(
                        name,
                        code="ErrorFolderNotFound",
                        text="The specified folder could not be found in the store.",
                    )
                ],
            )
        state_text = _text(request, "SyncState")
        after = 0
        if state_text:
            try:
                state = json.loads(base64.b64decode(state_text, validate=True))
                after = int(state["seq"])
                if state["folder"] != folder.id:
                    raise ValueError("another folder")
            except (ValueError, KeyError, TypeError):
                return _response(
                    "SyncFolderItems",
                    [
                        _message(
                            name,
                            code="ErrorInvalidSyncStateData",
                            text="Synchronization state data is corrupt or otherwise invalid.",
                        )
                    ],
                )
        try:
            limit = int(_text(request, "MaxChangesReturned") or "512")
        except ValueError:
            limit = 0
        if not 1 <= limit <= 512:
            raise _Fault("ErrorSchemaValidation", "MaxChangesReturned must be between 1 and 512.")
        pending = [c for c in folder.changes if c[0] > after]
        returned = pending[:limit]
        if returned:
            after = returned[-1][0]
        changes = []
        for _seq, kind, item_id in returned:
            item = account.items.get(item_id)
            change_key = item.change_key if item else "CQAAAA=="
            item_xml = f'<t:ItemId Id="{_attr(item_id)}" ChangeKey="{_attr(change_key)}"/>'
            changes.append(
                f"<t:Create><t:Message>{item_xml}</t:Message></t:Create>"
                if kind == "Create"
                else f"<t:Delete>{item_xml}</t:Delete>"
            )
        # A fresh opaque string every time, even when nothing changed (as Exchange does).
        new_state = base64.b64encode(
            json.dumps({"folder": folder.id, "seq": after, "n": secrets.token_hex(4)}).encode()
        ).decode()
        inner = (
            f"<m:SyncState>{new_state}</m:SyncState>"
            f"<m:IncludesLastItemInRange>{str(len(pending) <= limit).lower()}</m:IncludesLastItemInRange>"
            f"<m:Changes>{''.join(changes)}</m:Changes>"
        )
        return _response("SyncFolderItems", [_message(name, inner)])

    def _get_item(self, account: EwsAccount, request: Element) -> bytes:
        name = "GetItemResponseMessage"
        include_mime = _text(request, "IncludeMimeContent").lower() == "true"
        shape = _text(request, "BaseShape")
        wants_received = shape in ("Default", "AllProperties") or any(
            f.get("FieldURI") == "item:DateTimeReceived" for f in _find_all(request, "FieldURI")
        )
        ids = _find(request, "ItemIds")
        messages = []
        for element in list(ids) if ids is not None else []:
            item = account.items.get(element.get("Id", ""))
            if item is None:
                messages.append(
                    _message(
                        name,
                        "<m:Items/>",
                        code="ErrorItemNotFound",
                        text="The specified object was not found in the store.",
                    )
                )
                continue
            parts = []
            if include_mime:
                encoded = base64.b64encode(item.mime).decode()
                parts.append(f'<t:MimeContent CharacterSet="UTF-8">{encoded}</t:MimeContent>')
            parts.append(f'<t:ItemId Id="{_attr(item.id)}" ChangeKey="{_attr(item.change_key)}"/>')
            if wants_received:
                parts.append(f"<t:DateTimeReceived>{_timestamp(item.received)}</t:DateTimeReceived>")
            messages.append(_message(name, f"<m:Items><t:Message>{''.join(parts)}</t:Message></m:Items>"))
        return _response("GetItem", messages)

    def _find_item(self, account: EwsAccount, request: Element) -> bytes:
        """FindItem (Shallow) in one folder: ``IndexedPageItemView`` paging (at most
        ``find_count_limit`` per page), a ``Restriction`` of ``IsGreaterThanOrEqualTo`` /
        ``IsGreaterThan`` / ``IsLessThan`` / ``IsLessThanOrEqualTo`` on ``item:DateTimeReceived``
        (alone or under ``And``), ``SortOrder`` on ``item:DateTimeReceived``; ItemId and
        DateTimeReceived in the answer."""
        name = "FindItemResponseMessage"
        if request.get("Traversal", "Shallow") != "Shallow":
            raise _Fault("ErrorInvalidRequest", "The simulator only does Shallow FindItem.")
        parents = _find(request, "ParentFolderIds")
        if parents is None or len(parents) != 1:
            raise _Fault("ErrorSchemaValidation", "ParentFolderIds must name one folder.")
        folder = self._folder(account, parents[0])
        if folder is None:
            return _response(
                "FindItem",
                [_message(name, code="ErrorFolderNotFound", text="The specified folder could not be found.")],
            )
        items = account.items_in(folder.id)
        restriction = _find(request, "Restriction")
        tests = {
            "IsGreaterThanOrEqualTo": operator.ge,
            "IsGreaterThan": operator.gt,
            "IsLessThan": operator.lt,
            "IsLessThanOrEqualTo": operator.le,
        }
        if restriction is not None and len(restriction):
            conditions = list(restriction[0]) if _local(restriction[0].tag) == "And" else [restriction[0]]
            for condition in conditions:
                compare = tests.get(_local(condition.tag))
                field_uri = _find(condition, "FieldURI")
                constant = _find(condition, "Constant")
                if compare is None or field_uri is None or constant is None:
                    raise _Fault("ErrorInvalidRestriction", "This restriction is not simulated.")
                if field_uri.get("FieldURI") != "item:DateTimeReceived":
                    raise _Fault("ErrorInvalidRestriction", "Only item:DateTimeReceived is simulated.")
                try:
                    bound = datetime.fromisoformat(constant.get("Value", "").replace("Z", "+00:00"))
                except ValueError:
                    raise _Fault("ErrorSchemaValidation", "The Constant is not a date-time.") from None
                if bound.tzinfo is None:
                    bound = bound.replace(tzinfo=UTC)
                items = [i for i in items if compare(i.received, bound)]
        order = _find(request, "FieldOrder")
        descending = order is not None and order.get("Order") == "Descending"
        # Ties keep the order of arrival (the change log), as a stable sort on the store.
        items.sort(key=lambda i: i.received, reverse=descending)
        view = _find(request, "IndexedPageItemView")
        offset, limit = 0, self.find_count_limit
        if view is not None:
            try:
                offset = int(view.get("Offset", "0"))
                limit = int(view.get("MaxEntriesReturned", str(limit)))
            except ValueError:
                raise _Fault("ErrorSchemaValidation", "Offset and MaxEntriesReturned are integers.") from None
            if offset < 0 or limit < 1:
                raise _Fault("ErrorInvalidIndexedPagingParameters", "Invalid paging parameters.")
        page = items[offset : offset + min(limit, self.find_count_limit)]
        entries = "".join(
            f'<t:Message><t:ItemId Id="{_attr(i.id)}" ChangeKey="{_attr(i.change_key)}"/>'
            f"<t:DateTimeReceived>{_timestamp(i.received)}</t:DateTimeReceived></t:Message>"
            for i in page
        )
        end = offset + len(page)
        inner = (
            f'<m:RootFolder IndexedPagingOffset="{end}" TotalItemsInView="{len(items)}" '
            f'IncludesLastItemInRange="{str(end >= len(items)).lower()}">'
            f"<t:Items>{entries}</t:Items></m:RootFolder>"
        )
        return _response("FindItem", [_message(name, inner)])

    def _find_folder(self, account: EwsAccount, request: Element) -> bytes:
        name = "FindFolderResponseMessage"
        parents = _find(request, "ParentFolderIds")
        if parents is None or len(parents) != 1:
            raise _Fault("ErrorSchemaValidation", "ParentFolderIds must name one folder.")
        parent = self._folder(account, parents[0])
        if parent is None:
            return _response(
                "FindFolder",
                [_message(name, code="ErrorFolderNotFound", text="The specified folder could not be found.")],
            )
        deep = request.get("Traversal", "Shallow") == "Deep"
        below: list[EwsFolder] = []

        def collect(parent_id: str) -> None:
            for folder in account.folders.values():
                if folder.parent_id == parent_id:
                    below.append(folder)
                    if deep:
                        collect(folder.id)

        collect(parent.id)
        view = _find(request, "IndexedPageFolderView")
        offset, limit = 0, len(below) or 1
        if view is not None:
            try:
                offset = int(view.get("Offset", "0"))
                limit = int(view.get("MaxEntriesReturned", str(limit)))
            except ValueError:
                raise _Fault("ErrorSchemaValidation", "Offset and MaxEntriesReturned are integers.") from None
            if offset < 0 or limit < 1:
                raise _Fault("ErrorInvalidIndexedPagingParameters", "Invalid paging parameters.")
        page = below[offset : offset + limit]
        entries = []
        for folder in page:
            children = sum(1 for f in account.folders.values() if f.parent_id == folder.id)
            counts = ""
            if folder.kind == "Folder":
                count = len(account.items_in(folder.id))
                counts = f"<t:TotalCount>{count}</t:TotalCount><t:UnreadCount>{count}</t:UnreadCount>"
            folder_class = (
                f"<t:FolderClass>{escape(folder.folder_class)}</t:FolderClass>" if folder.folder_class else ""
            )
            entries.append(
                f'<t:{folder.kind}><t:FolderId Id="{_attr(folder.id)}" ChangeKey="AQAAABYAAAA="/>'
                f'<t:ParentFolderId Id="{_attr(folder.parent_id)}" ChangeKey="AQAAAA=="/>'
                f"{folder_class}<t:DisplayName>{escape(folder.name)}</t:DisplayName>"
                f"{counts}<t:ChildFolderCount>{children}</t:ChildFolderCount></t:{folder.kind}>"
            )
        end = offset + len(page)
        inner = (
            f'<m:RootFolder IndexedPagingOffset="{end}" TotalItemsInView="{len(below)}" '
            f'IncludesLastItemInRange="{str(end >= len(below)).lower()}">'
            f"<t:Folders>{''.join(entries)}</t:Folders></m:RootFolder>"
        )
        return _response("FindFolder", [_message(name, inner)])

    def _create_item(self, account: EwsAccount, request: Element) -> bytes:
        name = "CreateItemResponseMessage"
        disposition = request.get("MessageDisposition", "")
        if disposition not in ("SendOnly", "SendAndSaveCopy"):
            raise _Fault(
                "ErrorInvalidRequest", f"MessageDisposition {disposition or '(none)'} is not simulated."
            )
        items = _find(request, "Items")
        messages = [e for e in (list(items) if items is not None else []) if _local(e.tag) == "Message"]
        if len(messages) != 1 or _find(messages[0], "MimeContent") is None:
            raise _Fault("ErrorInvalidRequest", "The simulator sends one Message given as MimeContent.")

        def refused(code: str, text: str) -> bytes:
            return _response("CreateItem", [_message(name, "<m:Items/>", code=code, text=text)])

        try:
            mime = base64.b64decode(_text(messages[0], "MimeContent"), validate=True)
        except ValueError:
            return refused(
                "ErrorMimeContentInvalidBase64String", "The MIME content is not a valid base64 string."
            )
        if len(mime) > self.max_message_bytes:
            return refused("ErrorMessageSizeExceeded", "The message exceeds the maximum supported size.")
        headers = BytesHeaderParser(policy=email.policy.default).parsebytes(mime)
        recipients = [
            address
            for _, address in getaddresses(
                [str(v) for field_name in ("To", "Cc", "Bcc") for v in headers.get_all(field_name, [])]
            )
            if address
        ]
        if not recipients:
            return refused("ErrorInvalidRecipients", "At least one recipient is required.")
        bad = [r for r in recipients if "@" not in r or r.lower() in self.rejected_recipients]
        if bad:
            return refused("ErrorInvalidRecipients", "One or more recipients are invalid: " + ", ".join(bad))
        senders = [a for _, a in getaddresses([str(v) for v in headers.get_all("From", [])]) if a]
        if any(a.lower() != account.address.lower() for a in senders):
            return refused(
                "ErrorSendAsDenied",
                "The user account which was used to submit this request does not have the right to "
                "send mail on behalf of the specified sending account.",
            )
        saved_id = None
        if disposition == "SendAndSaveCopy":
            saved = _find(request, "SavedItemFolderId")
            folder = (
                self._folder(account, saved[0]) if saved is not None and len(saved) else account.sent_items
            )
            if folder is None:
                return refused("ErrorFolderNotFound", "The specified folder could not be found in the store.")
            saved_id = self.add_message(account.address, mime, folder_id=folder.id)
        self.sent.append(SentMail(account.address.lower(), disposition, mime, tuple(recipients), saved_id))
        delivered = _without_bcc(mime)
        for recipient in dict.fromkeys(r.lower() for r in recipients):
            if recipient in self.accounts:
                self.add_message(recipient, delivered)
        return _response("CreateItem", [_message(name, "<m:Items/>")])

    # -- streaming -------------------------------------------------------------------------

    async def _stream(
        self,
        account: EwsAccount,
        request: Element,
        receive: Receive,
        send: Send,
        *,
        caller: EwsAccount,
        anchor: str,
        cookie: str,
    ) -> None:
        ids = [(e.text or "").strip() for e in _find_all(request, "SubscriptionId")]
        try:
            minutes = int(_text(request, "ConnectionTimeout"))
        except ValueError:
            minutes = 0
        if not 1 <= minutes <= 30:
            await self._xml(
                send, 500, _fault("ErrorInvalidArgument", "ConnectionTimeout must be 1..30 minutes.", None)
            )
            return
        if len(ids) > MAX_SUBSCRIPTIONS_PER_STREAM:
            await self._xml(
                send,
                500,
                _fault(
                    "ErrorInvalidRequest",
                    f"A connection carries at most {MAX_SUBSCRIPTIONS_PER_STREAM} subscriptions.",
                    None,
                ),
            )
            return
        subscriptions = [self._subscriptions.get(i) for i in ids]

        def served(subscription: _Subscription | None) -> bool:
            if subscription is None or subscription.expired:
                return False
            if subscription.address == account.address.lower():
                return True
            # Another mailbox's subscription: only for a service account, and only on the
            # mailbox server of the group (made with this anchor and affinity).
            return (
                caller.can_impersonate and bool(subscription.anchor) and subscription.anchor == anchor.lower()
            )

        unknown = [i for i, s in zip(ids, subscriptions, strict=True) if not served(s)]
        if len({s.address for s in subscriptions if s is not None}) > 1 and not unknown:
            self.grouped_streams.append((anchor.lower(), cookie))
        if unknown or not ids:
            listed = "".join(f"<t:SubscriptionId>{escape(i)}</t:SubscriptionId>" for i in unknown)
            await self._xml(
                send,
                200,
                _streaming(
                    f"<m:ErrorSubscriptionIds>{listed}</m:ErrorSubscriptionIds>",
                    code="ErrorSubscriptionNotFound",
                    text="The subscription could not be found.",
                ),
            )
            return
        live = [s for s in subscriptions if s is not None]
        stream = _Stream(live)
        stream_id = next(self._stream_ids)
        self._streams[stream_id] = stream
        self.max_open_streams = max(self.max_open_streams, len(self._streams))
        for subscription in live:
            # A subscription is served by its newest connection only; a connection left with
            # none ends with ConnectionStatus Closed.
            for old_id in subscription.streams:
                old = self._streams.get(old_id)
                if old is not None and subscription in old.subscriptions:
                    old.subscriptions.remove(subscription)
                    old.poke()
            subscription.streams = {stream_id}
        self._notify_change()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/xml; charset=utf-8")],
            }
        )
        try:
            async with trio.open_nursery() as nursery:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_disconnect)
                await self._stream_body(stream, minutes * self.minute_seconds, send)
                nursery.cancel_scope.cancel()
        finally:
            del self._streams[stream_id]
            self.streams_served.append(len(ids))
            for subscription in live:
                subscription.streams.discard(stream_id)
            self._notify_change()

    async def _stream_body(self, stream: _Stream, lifetime: float, send: Send) -> None:
        deadline = trio.current_time() + lifetime
        next_keepalive = trio.current_time() + self.keepalive_seconds
        while True:
            with trio.move_on_at(min(deadline, next_keepalive)):
                await stream.wake.wait()
            stream.wake = trio.Event()
            if stream.dropped:
                raise _Drop("stream dropped on demand")
            envelopes: list[bytes] = []
            ended = False
            expired = [s.id for s in stream.subscriptions if s.expired]
            if expired:
                listed = "".join(f"<t:SubscriptionId>{escape(i)}</t:SubscriptionId>" for i in expired)
                envelopes.append(
                    _streaming(
                        f"<m:ErrorSubscriptionIds>{listed}</m:ErrorSubscriptionIds>",
                        code="ErrorSubscriptionNotFound",
                        text="The subscription could not be found.",
                    )
                )
                ended = True
            for subscription in stream.subscriptions:
                if subscription.expired:
                    continue
                # One envelope per event batch, so a burst puts several envelopes in one chunk.
                while subscription.pending:
                    event, item_id, folder_id, stamp = subscription.pending.pop(0)
                    envelopes.append(
                        _streaming(
                            "<m:Notifications><m:Notification>"
                            f"<t:SubscriptionId>{escape(subscription.id)}</t:SubscriptionId>"
                            f"<t:{event}><t:TimeStamp>{stamp}</t:TimeStamp>"
                            f'<t:ItemId Id="{_attr(item_id)}" ChangeKey="CQAAAA=="/>'
                            f'<t:ParentFolderId Id="{_attr(folder_id)}" ChangeKey="AQAAAA=="/>'
                            f"</t:{event}></m:Notification></m:Notifications>"
                        )
                    )
            now = trio.current_time()
            if not ended and not stream.subscriptions:
                envelopes.append(_streaming("<m:ConnectionStatus>Closed</m:ConnectionStatus>"))
                ended = True
            if not ended and now >= next_keepalive:
                envelopes.append(_streaming("<m:ConnectionStatus>OK</m:ConnectionStatus>"))
                next_keepalive = now + self.keepalive_seconds
            if not ended and now >= deadline:
                envelopes.append(_streaming("<m:ConnectionStatus>Closed</m:ConnectionStatus>"))
                ended = True
            if envelopes:
                await self._send_chunk(send, b"".join(envelopes))
            if ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return

    async def _send_chunk(self, send: Send, data: bytes) -> None:
        if self.split_chunks and len(data) > 1:
            # Cut somewhere inside an envelope, so the client must reassemble across chunks.
            cut = len(data) // 2 + 7
            await send({"type": "http.response.body", "body": data[:cut], "more_body": True})
            # A pause, so the halves reach the client as separate reads.
            await trio.sleep(0.002)
            await send({"type": "http.response.body", "body": data[cut:], "more_body": True})
        else:
            await send({"type": "http.response.body", "body": data, "more_body": True})


@asynccontextmanager
async def running_ews_simulator(**options: Any) -> AsyncIterator[EwsSimulator]:
    """An ``EwsSimulator`` serving on a free loopback port for the duration of the block."""
    simulator = EwsSimulator(**options)
    async with trio.open_nursery() as nursery:
        await nursery.start(simulator.serve)
        yield simulator
        nursery.cancel_scope.cancel()
