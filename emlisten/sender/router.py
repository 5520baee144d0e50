"""One ``MessageSender`` in front of several: each mailbox sends through its own protocol.

``imap`` mailboxes send over SMTP (:class:`emlisten.sender.smtp.SmtpSender`), ``ews`` mailboxes
through EWS ``CreateItem`` (:class:`emlisten.mail.ews.send.EwsSender`) and ``graph`` mailboxes
through Graph ``/sendMail`` (:class:`emlisten.mail.graph.send.GraphSender`). The protocol is the
mailbox's (chosen from the credentials, see docs/protocols.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Protocol

from emlisten.models import MailboxConfig
from emlisten.sender import SendError, SendResult
from emlisten.sender.compose import ComposedMessage

__all__ = ["ProtocolSender", "SenderLike"]


class SenderLike(Protocol):
    def send_message(self, mailbox: MailboxConfig, message: ComposedMessage) -> Awaitable[SendResult]: ...


class ProtocolSender:
    """Dispatches ``send_message`` by ``mailbox.protocol`` to ``senders[protocol]``."""

    def __init__(self, senders: Mapping[str, SenderLike]) -> None:
        self.senders = dict(senders)

    def sender_for(self, mailbox: MailboxConfig) -> SenderLike:
        try:
            return self.senders[mailbox.protocol]
        except KeyError:
            raise SendError(
                f"sending is not available for {mailbox.protocol!r} mailboxes "
                f"(have: {', '.join(sorted(self.senders))})"
            ) from None

    async def send_message(self, mailbox: MailboxConfig, message: ComposedMessage) -> SendResult:
        return await self.sender_for(mailbox).send_message(mailbox, message)
