"""Sending mail for a mailbox: compose (``compose``), submit over SMTP and keep a copy in Sent (``smtp``).

This package holds the errors and result types shared by its modules; the SMTP adapter
(``emlisten.sender.smtp``) is the only place that touches aiosmtplib, always through the
trio-asyncio bridge. Error messages never contain passwords or tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from emlisten.errors import EmlistenError

__all__ = [
    "SendAuthError",
    "SendConnectError",
    "SendError",
    "SendRejectedError",
    "SendRejectedRecipients",
    "SendResult",
    "SendSizeError",
]


class SendError(EmlistenError):
    """The message was not sent. ``code`` is the SMTP reply code when the server gave one."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class SendConnectError(SendError):
    """DNS, TCP, TLS/STARTTLS failure, a timeout, or the connection died.

    ``phase`` says which: ``"dns"``, ``"connect"``, ``"tls"``, ``"starttls"``, ``"timeout"``,
    ``"disconnected"``.
    """

    def __init__(self, message: str, *, phase: str, code: int | None = None) -> None:
        super().__init__(message, code=code)
        self.phase = phase


class SendAuthError(SendError):
    """The SMTP server rejected the credentials (or offers no usable mechanism)."""


class SendRejectedRecipients(SendError):
    """The server refused some recipients; nothing was sent (the transaction was reset).

    ``recipients`` maps each refused address to the server's reply (``"550 5.1.1 no such user"``).
    """

    def __init__(self, recipients: Mapping[str, str], message: str) -> None:
        super().__init__(message, code=None)
        self.recipients = dict(recipients)


class SendSizeError(SendError):
    """The message is larger than the server accepts (SMTP 552). ``limit`` from EHLO SIZE, if any."""

    def __init__(self, message: str, *, limit: int | None = None, code: int | None = 552) -> None:
        super().__init__(message, code=code)
        self.limit = limit


class SendRejectedError(SendError):
    """The server refused the sender or the message for another reason (e.g. 550 policy, 554)."""


@dataclass(frozen=True, slots=True)
class SendResult:
    """A sent message: it left over SMTP; ``saved_to_sent`` tells whether the Sent copy exists."""

    message_id: str
    saved_to_sent: bool
    sent_folder: str | None = None
    sent_uid: int | None = None
    #: Why the Sent copy is missing (the send itself succeeded).
    warning: str | None = None
