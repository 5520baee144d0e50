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
"""

from __future__ import annotations

import base64
import logging
from urllib.parse import urlsplit

import httpx

from emlisten.errors import MailAuthError, MailConnectError, MailSourceError
from emlisten.mail.ews.send import EXCHANGE_SENT_FOLDER, exchange_mime, rejected_recipients_error
from emlisten.mail.graph.source import GraphSource, _graph_error
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


class GraphSender:
    """A ``MessageSender`` for Graph mailboxes (``emlisten.api.send``), over ``source``'s sessions."""

    def __init__(self, source: GraphSource | None = None) -> None:
        self.source = source if source is not None else GraphSource()

    async def send_message(self, mailbox: MailboxConfig, message: ComposedMessage) -> SendResult:
        body = base64.b64encode(exchange_mime(message))
        where = "Graph"
        try:
            async with self.source.session(mailbox) as session:
                where = f"Graph {urlsplit(session.origin).netloc}"
                response = await session.request(
                    "POST",
                    session.url(f"/users/{session.user}/sendMail"),
                    content=body,
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
        log.info(
            "mailbox %s: sent %s through Graph to %d recipient(s)",
            mailbox.id,
            message.message_id,
            len(message.recipients),
        )
        return SendResult(message.message_id, saved_to_sent=True, sent_folder=EXCHANGE_SENT_FOLDER)
