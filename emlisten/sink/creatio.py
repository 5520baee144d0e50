"""Creatio's ``ExchangeListenerService`` callbacks: ProcessFullEmail, NewEmail, ProcessMailboxState.

The wire format (PascalCase, Creatio's own spelling "Recepients" and "Avaliable") is produced
here and nowhere else. httpx errors are converted to DeliveryError at this boundary.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import trio

from emlisten import __version__, _egress
from emlisten.abc import Sink
from emlisten.errors import DeliveryError
from emlisten.models import Email, MailboxConfig

log = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"


def sibling_method_url(bpm_endpoint: str, method: str) -> str:
    """``.../ExchangeListenerService.svc/ProcessFullEmail`` -> ``...svc/<method>``."""

    parts = urlsplit(bpm_endpoint)
    path = parts.path.rstrip("/")
    head, _, _last = path.rpartition("/")
    return urlunsplit((parts.scheme, parts.netloc, f"{head}/{method}", "", ""))


def email_to_wire(email: Email) -> dict[str, Any]:
    return {
        "Id": email.id,
        "Subject": email.subject,
        "Body": email.body,
        "IsHtmlBody": email.is_html_body,
        "Sender": email.sender,
        "Recepients": email.recipients,
        "CopyRecepients": email.copy_recipients,
        "BlindCopyRecepients": email.blind_copy_recipients,
        "Headers": [{"Name": name, "Value": value} for name, value in email.headers],
        "Importance": int(email.importance),
        "Attachments": [
            {
                "Id": a.id,
                "Name": a.name,
                "Base64Data": base64.b64encode(a.data).decode("ascii"),
                "IsInline": a.is_inline,
                "ContentId": a.content_id,
                "ContentType": a.content_type,
            }
            for a in email.attachments
        ],
        "SendDateTimeStamp": int(email.send_date.timestamp()) if email.send_date else 0,
        "MessageId": email.message_id,
        "InReplyTo": email.in_reply_to,
        "References": " ".join(email.references),
        "IsTruncated": email.truncated,
    }


def subscription_info(mailbox: MailboxConfig) -> dict[str, Any]:
    return {
        "Id": mailbox.id,
        "SysAdminUnit": mailbox.bpm_user,
        "MailboxId": mailbox.id,
        "WorkspaceName": mailbox.bpm_user_workspace,
        "TimeZoneId": mailbox.bpm_user_time_zone,
        "EventTimeStamp": int(time.time()),
    }


#: Connections per httpx transport. httpx's pool walks all its connections, per connection, on
#: every request and answer (and polls each idle socket): with 32 in one pool that was 13-20 %
#: of a backlog drain's CPU. Several small pools cost the same connections without it.
_CONNECTIONS_PER_POOL = 4

#: Parsed callback URLs, reused by every call to them (a handful per Creatio instance).
_URL_CACHE_SIZE = 1024

#: How a request fails when its connection ended before any answer: mostly a kept-alive
#: connection the receiver closed as the request went out. httpcore drops an idle connection
#: whose close it has seen, not one whose close is still on its way, and many servers end an
#: idle connection after 5 s, as httpx does (hypercorn, Apache, Node).
_NO_ANSWER = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)

#: An answer's body is read this far at most: only an error's first 200 characters are used.
_MAX_ANSWER_BYTES = 64 * 1024


class _Pool:
    __slots__ = ("in_flight", "transport")

    def __init__(self, transport: httpx.AsyncHTTPTransport, size: int) -> None:
        self.transport = transport
        # Requests beyond the pool's connections wait here, not inside httpcore's pool.
        self.in_flight = trio.CapacityLimiter(size)


def _retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as delta-seconds (what a 429 or 503 from Creatio or its proxy sends);
    an HTTP date or junk is ignored (the worker's own backoff applies)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


class CreatioSink(Sink):
    """The callbacks go straight to httpx's transports, not through an ``httpx.AsyncClient``.

    The client's per-request work (merging its defaults into a new request, parsing the URL
    again, the auth, redirect and cookie layers, the event hooks) is none of it used here, and it
    cost a quarter of the CPU of a callback (0.58 -> 0.45 ms per one-mail call, measured against
    the stand-in). What stays is httpx: its transport, connection pools, TLS, timeouts and error
    types; the egress check on every connection (emlisten._egress); no proxies, no redirects.
    Responses set no cookies that a later callback would send back."""

    def __init__(self, *, timeout: float = 300.0, max_connections: int = 32) -> None:
        sizes = [_CONNECTIONS_PER_POOL] * (max_connections // _CONNECTIONS_PER_POOL)
        if max_connections % _CONNECTIONS_PER_POOL:
            sizes.append(max_connections % _CONNECTIONS_PER_POOL)
        # Keep every connection alive: with a backlog, hundreds of mailboxes deliver at once to
        # the same Creatio, and closing all but a few after each call meant a new TCP (and TLS)
        # connection per call on both sides. Every connection goes to an address
        # EMLISTEN_CALLBACK_ALLOW permits (emlisten._egress). One TLS context for all pools:
        # each loads the CA bundle (about 1 MiB and 20 ms apiece here).
        tls = httpx.create_ssl_context()
        self._pools = [
            _Pool(
                _egress.http_transport(
                    "callback",
                    verify=tls,
                    limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
                ),
                size,
            )
            for size in sizes
        ]
        # What httpx.AsyncClient(timeout=...) put on each request.
        self._extensions = {"timeout": httpx.Timeout(timeout, connect=min(timeout, 30.0)).as_dict()}
        self._urls: dict[str, httpx.URL] = {}

    def _least_busy(self) -> _Pool:
        return max(self._pools, key=lambda pool: pool.in_flight.available_tokens)

    def _url(self, url: str) -> httpx.URL:
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = httpx.URL(url)  # InvalidURL for junk, as the client raised it
            if not parsed.host:
                # The client made such a URL relative, and its transport refused that.
                raise httpx.UnsupportedProtocol("the callback URL has no host")
            if len(self._urls) >= _URL_CACHE_SIZE:
                self._urls.clear()
            self._urls[url] = parsed
        return parsed

    @staticmethod
    async def _exchange(
        transport: httpx.AsyncHTTPTransport, request: httpx.Request, *, replayable: bool
    ) -> httpx.Response:
        """The answer (its head) to ``request``. One the receiver may take twice (it carries an
        idempotency key, and Creatio keeps an email once by its Id) is sent again, once, when
        its connection ended before an answer came: as Go's HTTP client does for a request with
        an ``Idempotency-Key`` and browsers for one on a reused connection, rather than turning
        a race with the receiver's keep-alive timeout into a failed delivery and a backoff. Not
        after a timeout or a failure to connect: those say the receiver is not answering."""
        try:
            return await transport.handle_async_request(request)
        except _NO_ANSWER as exc:
            if not replayable:
                raise
            log.debug("callback connection ended without an answer (%s); sending again", type(exc).__name__)
        return await transport.handle_async_request(request)

    async def _post(self, url: str, body: Any, *, what: str, headers: dict[str, str] | None = None) -> None:
        try:
            # As httpx encodes json=: UTF-8, compact, NaN refused (ValueError).
            content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
            request = httpx.Request(
                "POST",
                self._url(url),
                headers=[*_HEADERS, (b"Content-Length", b"%d" % len(content)), *_encoded(headers)],
                content=content,
                extensions=self._extensions,
            )
            pool = self._least_busy()
            async with pool.in_flight:
                replayable = headers is not None and IDEMPOTENCY_HEADER in headers
                response = await self._exchange(pool.transport, request, replayable=replayable)
                try:
                    answer = await _answer_start(response)
                finally:
                    await response.aclose()
        except httpx.TimeoutException:
            raise DeliveryError(
                f"{what}: Creatio did not answer in time ({_origin(url)})", origin=_origin(url)
            ) from None
        except httpx.HTTPError as exc:
            denied = _egress.denial(exc)
            reason = denied.strerror if denied is not None else type(exc).__name__
            raise DeliveryError(
                f"{what}: cannot reach Creatio at {_origin(url)}: {reason}", origin=_origin(url)
            ) from None
        except (httpx.InvalidURL, ValueError):
            # Not an HTTP failure but still the callback's: a warning, not a traceback.
            raise DeliveryError(f"{what}: the callback URL cannot be used ({_origin(url)})") from None
        if not response.is_success:
            snippet = answer.decode(response.encoding or "utf-8", "replace")[:200].replace("\n", " ")
            raise DeliveryError(
                f"{what}: Creatio answered HTTP {response.status_code}: {snippet}",
                status=response.status_code,
                retry_after=_retry_after_seconds(response.headers.get("Retry-After")),
                origin=_origin(url),
            )

    async def deliver(self, mailbox: MailboxConfig, emails: Sequence[Email], *, idempotency_key: str) -> None:
        body = {"Emails": [email_to_wire(e) for e in emails], "SubscriptionInfo": subscription_info(mailbox)}
        await self._post(
            mailbox.bpm_endpoint,
            body,
            what="ProcessFullEmail",
            headers={IDEMPOTENCY_HEADER: idempotency_key},
        )

    async def notify_new_ids(self, mailbox: MailboxConfig, ids: Sequence[str]) -> None:
        info = subscription_info(mailbox)
        body = {
            "newEvent": {
                "UniqueIds": list(ids),
                "Id": mailbox.id,
                "SysAdminUnitName": mailbox.bpm_user,
                "WorkspaceName": mailbox.bpm_user_workspace,
                "TimeZoneId": mailbox.bpm_user_time_zone,
                "EventTimeStamp": info["EventTimeStamp"],
            }
        }
        await self._post(sibling_method_url(mailbox.bpm_endpoint, "NewEmail"), body, what="NewEmail")

    async def report_state(
        self, mailbox: MailboxConfig, *, available: bool, error_class: str = "", message: str = ""
    ) -> None:
        body = {
            "MailboxId": mailbox.id,
            "SenderEmailAddress": mailbox.sender_email or mailbox.user_name,
            "BpmUserName": mailbox.bpm_user,
            "BpmUserWorkspace": mailbox.bpm_user_workspace,
            "Avaliable": available,
            "ExceptionClassName": error_class,
            "ExceptionMessage": message,
            "Context": dict(mailbox.context),
        }
        url = sibling_method_url(mailbox.bpm_endpoint, "ProcessMailboxState")
        await self._post(url, body, what="ProcessMailboxState")

    async def request_token_refresh(self, mailbox: MailboxConfig) -> None:
        body = {
            "MailboxId": mailbox.id,
            "SenderEmailAddress": mailbox.sender_email or mailbox.user_name,
            "BpmUserName": mailbox.bpm_user,
            "BpmUserWorkspace": mailbox.bpm_user_workspace,
        }
        await self._post(sibling_method_url(mailbox.bpm_endpoint, "RefreshToken"), body, what="RefreshToken")

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.transport.aclose()


#: The headers httpx.AsyncClient sent with every callback (its defaults and our User-Agent), in
#: its order; Content-Length and the call's own headers follow.
_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"Accept", b"*/*"),
    (b"Accept-Encoding", b"gzip, deflate"),
    (b"Connection", b"keep-alive"),
    (b"User-Agent", f"emlisten/{__version__}".encode()),
    (b"Content-Type", b"application/json"),
)


async def _answer_start(response: httpx.Response) -> bytes:
    """The answer's body, read to its end (its connection then goes back to the pool) unless it
    is longer than ``_MAX_ANSWER_BYTES``: a receiver that sends without end (each read within
    the timeout) would otherwise hold the delivery and grow the process's memory for good. A
    connection left before the end of its answer is closed, not reused."""
    read = bytearray()
    async with contextlib.aclosing(response.aiter_bytes()) as chunks:  # type: ignore[type-var]  # a generator
        async for chunk in chunks:
            read += chunk
            if len(read) > _MAX_ANSWER_BYTES:
                break
    return bytes(read)


def _encoded(headers: dict[str, str] | None) -> list[tuple[bytes, bytes]]:
    if not headers:
        return []
    # An idempotency key is ASCII (message keys); anything else would fail in h11 anyway.
    return [(name.encode("ascii"), value.encode("ascii")) for name, value in headers.items()]


def _origin(url: str) -> str:
    # Only scheme://host:port: a callback URL may carry tokens in its query string.
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "(an invalid URL)"
    host = parts.hostname or ""
    host = host if len(host) <= 100 else host[:100] + "..."  # log lines stay short
    return f"{parts.scheme[:10]}://{host}{':' + str(port) if port else ''}"
