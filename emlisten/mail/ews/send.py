"""Sending mail through Exchange Web Services: ``CreateItem`` with the MIME and ``SendAndSaveCopy``.

The message is the MIME that :func:`emlisten.sender.compose.compose` produced, sent as base64
``MimeContent``; Exchange takes the recipients from its headers and files a copy in Sent Items
(``SavedItemFolderId`` = ``sentitems``). Bcc recipients are not in compose's headers (SMTP
carries them in the envelope), so :func:`exchange_mime` adds a ``Bcc`` header: Exchange turns it
into Bcc recipients and never transmits it (MS-OXCMAIL 2.1.3.1.1.2); the Sent Items copy keeps it,
as Outlook's does. ``"SaveToSent": false`` in the credentials sends with ``SendOnly``.

Errors become the sender errors the send route maps to HTTP answers: authentication (HTTP
401/403, ``ErrorAccessDenied``...) -> :class:`SendAuthError`; unreachable, throttled past the
retries, or an answer we cannot read -> :class:`SendConnectError` / :class:`SendError`;
``ErrorInvalidRecipients`` -> :class:`SendRejectedRecipients`; ``ErrorMessageSizeExceeded`` ->
:class:`SendSizeError`; other refusals (``ErrorSendAsDenied``...) -> :class:`SendRejectedError`.
A request that failed in transit is never re-sent (Exchange may have sent it).
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Sequence
from email.headerregistry import Address
from email.parser import BytesHeaderParser
from email.policy import SMTP, default
from email.utils import getaddresses

from emlisten.errors import MailAuthError, MailConnectError, MailSourceError
from emlisten.mail.ews import _soap
from emlisten.mail.ews.source import EwsResponseError, EwsSource
from emlisten.models import MailboxConfig
from emlisten.sender import (
    SendAuthError,
    SendConnectError,
    SendError,
    SendRejectedError,
    SendRejectedRecipients,
    SendResult,
    SendSizeError,
)
from emlisten.sender.compose import ComposedMessage

__all__ = [
    "EXCHANGE_SENT_FOLDER",
    "EwsSender",
    "bcc_recipients",
    "exchange_mime",
    "save_to_sent_wanted",
]

log = logging.getLogger(__name__)

#: The well-known name of Sent Items (EWS ``DistinguishedFolderId``, Graph well-known folder).
EXCHANGE_SENT_FOLDER = "sentitems"
#: Credentials extension field shared with the SMTP sender (``emlisten.sender.smtp``).
_SAVE_TO_SENT = "savetosent"

_RECIPIENT_CODES = frozenset({"ErrorInvalidRecipients", "ErrorInvalidRecipientSubfilter"})
_SIZE_CODES = frozenset({"ErrorMessageSizeExceeded", "ErrorRequestTooLarge"})
_ADDRESS = re.compile(r"[^\s<>\"'(),;:]+@[^\s<>\"'(),;:]+")


def save_to_sent_wanted(mailbox: MailboxConfig) -> bool:
    """The ``SaveToSent`` extension field (default true: Exchange files sent mail itself)."""
    for key, value in mailbox.extra.items():
        if key.lower() == _SAVE_TO_SENT and value not in (None, ""):
            if isinstance(value, str):
                return value.strip().lower() in ("true", "1")
            return bool(value)
    return True


def bcc_recipients(message: ComposedMessage) -> list[str]:
    """The recipients that are in neither ``To`` nor ``Cc`` of the message: its Bcc."""
    headers = BytesHeaderParser(policy=default).parsebytes(message.data)
    shown = {
        address.lower()
        for _, address in getaddresses([str(v) for name in ("To", "Cc") for v in headers.get_all(name, [])])
        if address
    }
    return [r for r in message.recipients if r.lower() not in shown]


def exchange_mime(message: ComposedMessage) -> bytes:
    """The MIME to hand to Exchange (EWS or Graph): compose's bytes, plus a ``Bcc`` header when
    the message has Bcc recipients (Exchange reads recipients from the headers only)."""
    bcc = bcc_recipients(message)
    if not bcc:
        return message.data
    addresses = [Address(addr_spec=a) for a in bcc]
    header = SMTP.header_factory("Bcc", ", ".join(str(a) for a in addresses))
    folded = SMTP.fold_binary("Bcc", header)
    data = message.data
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data + b"\r\n" + folded  # pragma: no cover - compose always has a body
    return data[: end + 2] + folded + data[end + 2 :]


def _mentioned(text: str, recipients: Sequence[str]) -> list[str]:
    lowered = {r.lower(): r for r in recipients}
    found = [lowered[m.lower()] for m in _ADDRESS.findall(text) if m.lower() in lowered]
    return list(dict.fromkeys(found))


def rejected_recipients_error(
    code: str, text: str, recipients: Sequence[str], where: str
) -> SendRejectedRecipients:
    """The server refused recipients. It names them only in its message text (if at all): the
    ones it names, else every recipient, each with the server's answer."""
    reply = f"{code}: {text}" if text else code
    named = _mentioned(text, recipients) or list(recipients)
    return SendRejectedRecipients({r: reply for r in named}, f"{where} refused the recipients ({reply})")


def send_error_from_ews(error: MailSourceError, message: ComposedMessage, where: str) -> SendError:
    """An EWS failure as the sender error the send route understands."""
    text = str(error)
    if isinstance(error, MailAuthError):
        return SendAuthError(f"{where}: {text}")
    if isinstance(error, MailConnectError):
        phase = "timeout" if "in time" in text else "connect"
        return SendConnectError(f"{where}: {text}", phase=phase)
    if isinstance(error, EwsResponseError):
        detail = text.partition(": ")[2]
        if error.code in _RECIPIENT_CODES:
            return rejected_recipients_error(error.code, detail, message.recipients, f"EWS {where}")
        if error.code in _SIZE_CODES:
            return SendSizeError(f"EWS {where}: the message is too large ({text})", code=None)
        return SendRejectedError(f"EWS {where} did not send the message: {text}")
    return SendError(f"EWS {where}: {text}")


class EwsSender:
    """A ``MessageSender`` for EWS mailboxes (``emlisten.api.send``), over ``source``'s clients."""

    def __init__(self, source: EwsSource | None = None) -> None:
        self.source = source if source is not None else EwsSource()

    async def send_message(self, mailbox: MailboxConfig, message: ComposedMessage) -> SendResult:
        save_copy = save_to_sent_wanted(mailbox)
        body = _soap.create_item_send(
            base64.b64encode(exchange_mime(message)).decode("ascii"), save_copy=save_copy
        )
        where = mailbox.service_url or "(no URL)"
        try:
            async with self.source.client(mailbox) as client:
                where = client.where
                await client.call_one(body)
        except MailSourceError as error:
            raise send_error_from_ews(error, message, where) from None
        log.info(
            "mailbox %s: sent %s through EWS to %d recipient(s)",
            mailbox.id,
            message.message_id,
            len(message.recipients),
        )
        return SendResult(
            message.message_id,
            saved_to_sent=save_copy,
            sent_folder=EXCHANGE_SENT_FOLDER if save_copy else None,
        )
