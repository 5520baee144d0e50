"""Exchange Web Services: the ``MailSource`` for Exchange Server (and Exchange Online while EWS lasts)."""

from emlisten.mail.ews.source import (
    EWS_UIDVALIDITY,
    EwsClient,
    EwsReader,
    EwsResponseError,
    EwsSettings,
    EwsSource,
    ServerBusyError,
    impersonated_user,
)

__all__ = [
    "EWS_UIDVALIDITY",
    "EwsClient",
    "EwsReader",
    "EwsResponseError",
    "EwsSettings",
    "EwsSource",
    "ServerBusyError",
    "impersonated_user",
]
