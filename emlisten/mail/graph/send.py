"""Sending mail through Microsoft Graph: ``POST /users/{user}/sendMail`` with the MIME.

The body is the MIME that :func:`emlisten.sender.compose.compose` produced, base64-encoded, with
``Content-Type: text/plain`` (Graph's MIME form of ``sendMail``), so attachments and inline parts
are sent exactly as composed. Bcc recipients travel in a ``Bcc`` header
(:func:`emlisten.mail.ews.send.exchange_mime`; Exchange never transmits it). In the MIME form
Graph takes no parameters: the message is always saved to Sent Items (``saveToSentItems``
defaults to true), so ``"SaveToSent": false`` has no effect for Graph mailboxes.

Tokens and throttling are :class:`emlisten.mail.graph.source.GraphSession`'s: 429/503 are waited
out (Graph did not take the message), a 401 is :class:`SendAuthError`. Graph answers ``202
Accepted``; errors: ``ErrorInvalidRecipients`` -> :class:`SendRejectedRecipients`, 413 or
``ErrorMessageSizeExceeded`` -> :class:`SendSizeError`, ``ErrorSendAsDenied`` and other 4xx ->
:class:`SendRejectedError`. The app-only token needs the ``Mail.Send`` application permission.

Large mail: a request to Graph carries at most 4 MB, so MIME above ``DIRECT_SEND_LIMIT`` (3 MB)
goes another way. The biggest attachments are taken out of the MIME until the rest fits; the rest
becomes a draft (``POST /users/{user}/messages``, MIME form), each attachment taken out is added
to it (at least 3 MB: ``attachments/createUploadSession`` and ``PUT`` of 320 KiB-aligned chunks
with ``Content-Range`` to the pre-authenticated upload URL, which gets no bearer token; smaller:
``POST attachments`` with ``contentBytes``), then ``POST /messages/{id}/send`` sends it (a copy
is saved to Sent Items). Up to the server's limits (Exchange Online: 150 MB per message and per
attachment). A failure deletes the draft. Throttled chunks are retried after ``Retry-After``.
"""

from __future__ import annotations

import base64
import email
import email.policy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import trio

from emlisten.errors import MailAuthError, MailConnectError, MailSourceError
from emlisten.mail.ews.send import EXCHANGE_SENT_FOLDER, exchange_mime, rejected_recipients_error
from emlisten.mail.graph.notifications import retry_after_seconds
from emlisten.mail.graph.source import GraphSession, GraphSource, _graph_error
from emlisten.models import MailboxConfig
from emlisten.sender import (
    SendAuthError,
    SendConnectError,
    SendError,
    SendRejectedError,
    SendResult,
    SendSizeError,
)
from emlisten.sender.compose import ComposedMessage

__all__ = ["GraphSender"]

log = logging.getLogger(__name__)

#: MIME up to this size goes in one ``sendMail`` (base64 keeps it under Graph's 4 MB requests).
DIRECT_SEND_LIMIT = 3 * 1024 * 1024
#: The draft's MIME (without the attachments taken out) must stay under this.
DRAFT_LIMIT = 2 * 1024 * 1024
#: Attachments at least this big go through an upload session (Graph: 3 MB to 150 MB).
UPLOAD_SESSION_MIN = 3 * 1024 * 1024
#: Upload session chunk: a multiple of 320 KiB, under 4 MB per request.
UPLOAD_CHUNK = 12 * 320 * 1024

_RECIPIENT_CODES = frozenset({"ErrorInvalidRecipients", "ErrorInvalidRecipientSubfilter"})
_SIZE_CODES = frozenset({"ErrorMessageSizeExceeded", "RequestEntityTooLarge"})


def _code_and_message(response: httpx.Response) -> tuple[str, str]:
    try:
        error = response.json().get("error", {})
        return str(error.get("code", "")), str(error.get("message", ""))
    except (ValueError, AttributeError):
        return "", ""


def _answer_error(response: httpx.Response, message: ComposedMessage, where: str) -> SendError:
    code, text = _code_and_message(response)
    summary = _graph_error(response)
    if code in _RECIPIENT_CODES:
        return rejected_recipients_error(code, text, message.recipients, where)
    if response.status_code == 413 or code in _SIZE_CODES:
        return SendSizeError(f"{where}: the message is too large ({summary})", code=None)
    if response.status_code == 404:
        return SendAuthError(f"{where}: the mailbox was not found ({summary})")
    return SendRejectedError(f"{where} did not send the message: {summary}")


@dataclass(frozen=True)
class _Detached:
    """An attachment taken out of the MIME, to be added to the draft."""

    name: str
    content_type: str
    data: bytes
    inline: bool
    content_id: str


def _leaves(message: Message) -> Iterator[tuple[Message, Message]]:
    """(parent, part) for every non-multipart part below a multipart."""
    if not message.is_multipart():
        return
    payload = message.get_payload()
    assert isinstance(payload, list)
    for part in payload:
        if not isinstance(part, Message):
            continue
        if part.is_multipart():
            yield from _leaves(part)
        else:
            yield message, part


def split_attachments(mime: bytes, limit: int = DRAFT_LIMIT) -> tuple[bytes, list[_Detached]]:
    """``mime`` without its biggest attachments (largest first) until it is at most ``limit``
    bytes, and those attachments. Parts without a file name (bodies) always stay."""
    message = email.message_from_bytes(mime, policy=email.policy.SMTP)
    candidates = []
    for parent, part in _leaves(message):
        if part.get_filename() is None and part.get_content_disposition() != "attachment":
            continue
        data = part.get_payload(decode=True)
        if isinstance(data, bytes):
            candidates.append((len(data), parent, part, data))
    candidates.sort(key=lambda c: c[0], reverse=True)
    detached: list[_Detached] = []
    current = mime
    for _size, parent, part, data in candidates:
        if len(current) <= limit:
            break
        payload = parent.get_payload()
        assert isinstance(payload, list)
        payload.remove(part)
        content_id = str(part.get("Content-ID", "")).strip().strip("<>")
        detached.append(
            _Detached(
                name=part.get_filename() or "attachment",
                content_type=part.get_content_type(),
                data=data,
                inline=part.get_content_disposition() == "inline",
                content_id=content_id,
            )
        )
        current = message.as_bytes()
    return current, detached


class _LargeSend:
    """Draft, attachments, send: for MIME too big for one ``sendMail``."""

    def __init__(self, session: GraphSession, where: str) -> None:
        self.session = session
        self.where = where
        self.user = session.user

    def _messages(self, tail: str = "") -> str:
        return self.session.url(f"/users/{self.user}/messages{tail}")

    async def send(self, mime: bytes, message: ComposedMessage) -> None:
        # Parsing 25 MB of MIME takes a while: not on the event loop other mailboxes share.
        draft_mime, detached = await trio.to_thread.run_sync(split_attachments, mime)
        if len(draft_mime) > DRAFT_LIMIT:
            raise SendSizeError(
                f"{self.where}: the message without its attachments is still over "
                f"{DRAFT_LIMIT // (1024 * 1024)} MB",
                code=None,
            )
        response = await self.session.request(
            "POST",
            self._messages(),
            content=base64.b64encode(draft_mime),
            headers={"Content-Type": "text/plain"},
        )
        if response.status_code not in (200, 201):
            raise _answer_error(response, message, self.where)
        try:
            draft_id = str(response.json()["id"])
        except (ValueError, KeyError, TypeError):
            raise SendError(f"{self.where}: the draft was created without an id") from None
        sent = False
        try:
            for attachment in detached:
                await self._attach(draft_id, attachment, message)
            response = await self.session.request("POST", self._messages(f"/{quote(draft_id, safe='')}/send"))
            if not 200 <= response.status_code < 300:
                raise _answer_error(response, message, self.where)
            sent = True
        finally:
            if not sent:
                with trio.CancelScope(shield=True), trio.move_on_after(self.session.settings.close_timeout):
                    try:
                        await self.session.request("DELETE", self._messages(f"/{quote(draft_id, safe='')}"))
                    except MailSourceError as exc:
                        log.info("could not delete the unsent Graph draft: %s", exc)

    async def _attach(self, draft_id: str, attachment: _Detached, message: ComposedMessage) -> None:
        item: dict[str, Any] = {
            "name": attachment.name,
            "contentType": attachment.content_type,
            "isInline": attachment.inline,
        }
        if attachment.content_id:
            item["contentId"] = attachment.content_id
        base = f"/{quote(draft_id, safe='')}/attachments"
        if len(attachment.data) < UPLOAD_SESSION_MIN:
            body = {
                "@odata.type": "#microsoft.graph.fileAttachment",
                **item,
                "contentBytes": base64.b64encode(attachment.data).decode("ascii"),
            }
            response = await self.session.request("POST", self._messages(base), json_body=body)
            if not 200 <= response.status_code < 300:
                raise _answer_error(response, message, self.where)
            return
        session_body = {"AttachmentItem": {"attachmentType": "file", **item, "size": len(attachment.data)}}
        response = await self.session.request(
            "POST", self._messages(base + "/createUploadSession"), json_body=session_body
        )
        if not 200 <= response.status_code < 300:
            raise _answer_error(response, message, self.where)
        try:
            upload_url = str(response.json()["uploadUrl"])
        except (ValueError, KeyError, TypeError):
            raise SendError(f"{self.where}: the upload session came without an uploadUrl") from None
        if urlsplit(upload_url).scheme not in ("https", "http"):
            raise SendError(f"{self.where}: the upload session's URL is not http(s)")
        await self._upload(upload_url, attachment.data, message)

    async def _upload(self, upload_url: str, data: bytes, message: ComposedMessage) -> None:
        """PUT the chunks. The URL is pre-authenticated: no Authorization header (Graph refuses
        one), and it is never logged (it is a credential for this upload)."""
        settings = self.session.settings
        total = len(data)
        start = 0
        retries = 0
        while start < total:
            end = min(start + UPLOAD_CHUNK, total)
            try:
                response = await self.session.http.put(
                    upload_url,
                    content=data[start:end],
                    headers={"Content-Range": f"bytes {start}-{end - 1}/{total}"},
                    timeout=settings.request_timeout,
                )
            except httpx.HTTPError as exc:
                raise SendConnectError(
                    f"{self.where}: upload: {type(exc).__name__}", phase="disconnected"
                ) from None
            status = response.status_code
            if status in (429, 503) or status >= 500:
                wait = retry_after_seconds(
                    response.headers.get("Retry-After"),
                    default=settings.default_retry_after,
                    cap=float("inf"),
                )
                retries += 1
                if retries > settings.throttle_retries or wait > settings.max_retry_after:
                    raise SendConnectError(f"{self.where}: upload throttled (HTTP {status})", phase="timeout")
                await trio.sleep(wait)
                continue
            if status not in (200, 201):
                raise _answer_error(response, message, self.where)
            retries = 0
            start = end
            if status == 200:
                start = _next_expected(response, start)


def _next_expected(response: httpx.Response, default: int) -> int:
    """The first byte the server still expects (``nextExpectedRanges``), else ``default``."""
    try:
        ranges = response.json().get("nextExpectedRanges") or []
        return int(str(ranges[0]).split("-", 1)[0]) if ranges else default
    except (ValueError, AttributeError, IndexError, TypeError):
        return default


class GraphSender:
    """A ``MessageSender`` for Graph mailboxes (``emlisten.api.send``), over ``source``'s sessions."""

    def __init__(self, source: GraphSource | None = None) -> None:
        self.source = source if source is not None else GraphSource()

    async def send_message(self, mailbox: MailboxConfig, message: ComposedMessage) -> SendResult:
        mime = exchange_mime(message)
        where = "Graph"
        try:
            async with self.source.session(mailbox) as session:
                where = f"Graph {urlsplit(session.origin).netloc}"
                if len(mime) > DIRECT_SEND_LIMIT:
                    await _LargeSend(session, where).send(mime, message)
                    return self._sent(mailbox, message, "an upload session")
                response = await session.request(
                    "POST",
                    session.url(f"/users/{session.user}/sendMail"),
                    content=base64.b64encode(mime),
                    headers={"Content-Type": "text/plain"},
                )
        except MailAuthError as error:
            if "ErrorSendAsDenied" in str(error):
                raise SendRejectedError(f"{where} did not send the message: {error}") from None
            raise SendAuthError(f"{where}: {error}") from None
        except MailConnectError as error:
            raise SendConnectError(f"{where}: {error}", phase="connect") from None
        except MailSourceError as error:
            raise SendError(f"{where}: {error}") from None
        if not 200 <= response.status_code < 300:
            raise _answer_error(response, message, where)
        return self._sent(mailbox, message, "sendMail")

    @staticmethod
    def _sent(mailbox: MailboxConfig, message: ComposedMessage, how: str) -> SendResult:
        log.info(
            "mailbox %s: sent %s through Graph (%s) to %d recipient(s)",
            mailbox.id,
            message.message_id,
            how,
            len(message.recipients),
        )
        return SendResult(message.message_id, saved_to_sent=True, sent_folder=EXCHANGE_SENT_FOLDER)
