"""The exceptions emlisten raises. Adapters convert their libraries' exceptions to these."""

from __future__ import annotations


class EmlistenError(Exception):
    """Base of every error emlisten raises on purpose."""


class ConfigError(EmlistenError):
    """Bad configuration (flags or environment)."""


class ValidationError(EmlistenError):
    """Bad input from an API client; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class MailSourceError(EmlistenError):
    """A mail server could not be used. ``retry_slowly`` marks errors that a retry will not fix soon."""

    retry_slowly = False


class MailConnectError(MailSourceError):
    """DNS, TCP or TLS failure, or the connection died."""


class MailAuthError(MailSourceError):
    """The server rejected the credentials."""

    retry_slowly = True


class MailProtocolError(MailSourceError):
    """The server said something we cannot parse, or answered a command with NO/BAD."""


class FolderNotFoundError(MailSourceError):
    """A folder listed in FolderIds does not exist on the server."""

    retry_slowly = True


class DeliveryError(EmlistenError):
    """The sink (Creatio) did not accept a delivery. ``status`` is the HTTP status when there was
    one; ``retry_after`` the seconds the receiver asked to wait (``Retry-After``), if it did;
    ``origin`` the receiver (``scheme://host:port``) when known: deliveries waiting to retry on
    the same receiver are retried as soon as one of them gets through again."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        origin: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.origin = origin


class StoreError(EmlistenError):
    """The store is unreachable or failed."""


class QueueError(EmlistenError):
    """The task queue is unreachable or failed."""


class MailTokenRejectedError(MailAuthError):
    """The server rejected an OAuth access token (expired or revoked): ask for a fresh one
    (Creatio's ``RefreshToken``) rather than only reporting the mailbox as failing."""
