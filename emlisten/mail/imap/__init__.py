"""emlisten's own Trio-native IMAP client and the IMAP ``MailSource``."""

from emlisten.mail.imap._client import (
    CommandResult,
    FetchedMessage,
    IdleSession,
    ImapClient,
    ListEntry,
)
from emlisten.mail.imap._parser import Response, ResponseKind, ResponseParser, Value
from emlisten.mail.imap.source import ImapReader, ImapSettings, ImapSource

__all__ = [
    "CommandResult",
    "FetchedMessage",
    "IdleSession",
    "ImapClient",
    "ImapReader",
    "ImapSettings",
    "ImapSource",
    "ListEntry",
    "Response",
    "ResponseKind",
    "ResponseParser",
    "Value",
]
