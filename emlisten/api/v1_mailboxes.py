"""``/v1/mailboxes`` requests -> validated :class:`MailboxConfig`, and mailboxes -> ``/v1`` JSON.

The ``/v1`` body is emlisten's own (snake_case, see docs/api.md); it is translated to Creatio's
``SynchronizationCredentials`` and read by the same parser (:mod:`emlisten.api.credentials`), so
both APIs accept and refuse the same servers, ports and security settings. Errors name the
``/v1`` field (``host``, ``webhook.url``, ``folders[2]``), never a value.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from emlisten.api.credentials import parse_credentials
from emlisten.errors import ValidationError
from emlisten.models import (
    Checkpoint,
    MailboxConfig,
    MailboxState,
    MailboxStatus,
    Security,
    WebhookTarget,
)

__all__ = ["MAILBOX_FIELDS", "mailbox_to_v1", "parse_v1_mailbox", "redact_url", "v1_body_of"]

#: Fields a ``POST``/``PATCH /v1/mailboxes`` body may carry.
MAILBOX_FIELDS = (
    "id",
    "protocol",
    "host",
    "port",
    "tls",
    "security",
    "verify_certificate",
    "username",
    "password",
    "oauth",
    "access_token",
    "email",
    "service_url",
    "folders",
    "webhook",
)

_SECURITY_NAMES = {
    "none": "None",
    "ssl_on_connect": "SslOnConnect",
    "starttls": "StartTls",
    "starttls_when_available": "StartTlsWhenAvailable",
}

#: Creatio field (as the parser names it in errors) -> ``/v1`` field.
_FIELD_NAMES = {
    "Id": "id",
    "Protocol": "protocol",
    "Port": "port",
    "UseSsl": "tls",
    "SecureOption": "security",
    "VerifyCertificate": "verify_certificate",
    "UserName": "username",
    "Password": "password",
    "UseOAuth": "oauth",
    "AccessToken": "access_token",
    "SenderEmailAddress": "email",
    "FolderIds": "folders",
}

# The Creatio parser requires a callback URL; /v1 mailboxes deliver to their webhook instead.
_NO_CREATIO = "https://webhook.invalid/"


def _error(field: str, message: str) -> ValidationError:
    return ValidationError(field, message)


def redact_url(url: str) -> str:
    """``scheme://host[:port]/path``: no user info, query or fragment (they may hold tokens)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return ""
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _webhook_secret(value: Any, field: str) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values:
        raise _error(field, 'must be a "whsec_..." string, or a list of them (the current one first)')
    secrets = []
    for position, secret in enumerate(values):
        name = field if isinstance(value, str) else f"{field}[{position}]"
        if not isinstance(secret, str) or not secret.startswith("whsec_"):
            raise _error(name, 'must start with "whsec_" (Standard Webhooks secret)')
        try:
            key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            raise _error(name, 'must be "whsec_" followed by base64') from None
        # Standard Webhooks recommends 24 to 64 bytes; the verifier libraries take any length.
        if not 1 <= len(key) <= 64:
            raise _error(name, "must hold 1 to 64 bytes of key (base64 after whsec_; 24 or more recommended)")
        secrets.append(secret)
    return tuple(dict.fromkeys(secrets))


def _webhook(value: Any, default: WebhookTarget) -> WebhookTarget:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise _error("webhook", 'must be an object {"url", "secret"}')
    unknown = [key for key in value if key not in ("url", "secret")]
    if unknown:
        raise _error(f"webhook.{unknown[0]}", "unknown field")
    url = value.get("url")
    if url is None or url == "":
        if not default.url:
            raise _error("webhook.url", "required (no EMLISTEN_WEBHOOK_URL default is set)")
        url = ""
    elif not isinstance(url, str):
        raise _error("webhook.url", "must be an absolute http(s) URL")
    else:
        try:
            parts = urlsplit(url.strip())
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise _error("webhook.url", "must be an absolute http(s) URL") from None
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise _error("webhook.url", "must be an absolute http(s) URL")
        if parts.fragment:
            raise _error("webhook.url", "must not have a fragment")
        url = url.strip()
    secret = value.get("secret")
    if secret is None or secret == "":
        if not default.secrets:
            raise _error("webhook.secret", "required (no EMLISTEN_WEBHOOK_SECRET default is set)")
        secrets: tuple[str, ...] = ()
    else:
        secrets = _webhook_secret(secret, "webhook.secret")
    return WebhookTarget(url=url, secrets=secrets)


def parse_v1_mailbox(body: Any, *, default: WebhookTarget) -> MailboxConfig:
    """A ``POST /v1/mailboxes`` body -> MailboxConfig (a new id unless ``id`` is given).

    Raises ValidationError naming the ``/v1`` field."""

    if not isinstance(body, Mapping):
        raise _error("body", "must be a JSON object")
    unknown = [key for key in body if key not in MAILBOX_FIELDS]
    if unknown:
        raise _error(str(unknown[0]), "unknown field")
    protocol = body.get("protocol", "imap")
    if not isinstance(protocol, str) or protocol.strip().lower() not in ("imap", "ews", "graph"):
        raise _error("protocol", 'must be one of "imap", "ews", "graph"')
    protocol = protocol.strip().lower()
    mailbox_id = body.get("id")
    if mailbox_id is None:
        mailbox_id = str(uuid.uuid4())
    security = body.get("security")
    if security is not None:
        if not isinstance(security, str) or security.strip().lower() not in _SECURITY_NAMES:
            raise _error("security", f"must be one of {', '.join(sorted(_SECURITY_NAMES))}")
        security = _SECURITY_NAMES[security.strip().lower()]
    folders = body.get("folders")
    for key in ("host", "service_url"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise _error(key, "must be a string")
    if protocol == "imap":
        if body.get("service_url"):
            raise _error("service_url", "only for ews and graph (IMAP: host, port, tls)")
        service_url = body.get("host") or ""
        service_field = "host"
    else:
        service_url = body.get("service_url") or body.get("host") or ""
        service_field = "service_url" if body.get("service_url") else "host"
    tls = body.get("tls")
    if tls is not None and not isinstance(tls, bool):
        raise _error("tls", "must be true or false")
    credentials: dict[str, Any] = {
        "Id": mailbox_id,
        "Protocol": protocol,
        "ServiceUrl": service_url,
        "Port": body.get("port"),
        "UseSsl": tls,
        "SecureOption": security,
        "VerifyCertificate": body.get("verify_certificate"),
        "UserName": body.get("username"),
        "Password": body.get("password"),
        "UseOAuth": body.get("oauth"),
        "AccessToken": body.get("access_token"),
        "SenderEmailAddress": body.get("email"),
        "FolderIds": folders,
        "BpmEndpoint": _NO_CREATIO,
        "UseFullEmail": True,
    }
    if protocol == "imap" and tls is None and security is None:
        credentials["UseSsl"] = True  # /v1 defaults to TLS
    if isinstance(body.get("port"), bool):
        raise _error("port", "must be an integer port number")
    try:
        parsed = parse_credentials({k: v for k, v in credentials.items() if v is not None})
    except ValidationError as error:
        raise _error(_v1_field(error.field, service_field), error.message) from None
    return parsed.replace(bpm_endpoint="", extra={}, webhook=_webhook(body.get("webhook"), default))


def _v1_field(creatio_field: str, service_field: str) -> str:
    head, bracket, rest = creatio_field.partition("[")
    if head in ("ServiceUrl", "IsAutodiscover", "AutodiscoverUrl"):
        return service_field
    name = _FIELD_NAMES.get(head, head)
    return f"{name}{bracket}{rest}"


def v1_body_of(mailbox: MailboxConfig) -> dict[str, Any]:
    """The ``POST`` body that registers ``mailbox`` as it is (secrets included: never answered,
    only merged with a ``PATCH``)."""

    body: dict[str, Any] = {
        "id": mailbox.id,
        "protocol": mailbox.protocol,
        "verify_certificate": mailbox.imap.verify_certificate,
        "username": mailbox.user_name,
        "oauth": mailbox.use_oauth,
        "folders": list(mailbox.folders),
    }
    if mailbox.protocol == "imap":
        body.update(
            host=mailbox.imap.host,
            port=mailbox.imap.port,
            security=mailbox.imap.security.value,
        )
    else:
        body["service_url"] = mailbox.service_url or mailbox.imap.host
    if mailbox.password:
        body["password"] = mailbox.password
    if mailbox.access_token:
        body["access_token"] = mailbox.access_token
    if mailbox.sender_email:
        body["email"] = mailbox.sender_email
    if mailbox.webhook is not None:
        webhook: dict[str, Any] = {}
        if mailbox.webhook.url:
            webhook["url"] = mailbox.webhook.url
        if mailbox.webhook.secrets:
            webhook["secret"] = list(mailbox.webhook.secrets)
        body["webhook"] = webhook
    return body


def mailbox_to_v1(
    mailbox: MailboxConfig,
    status: MailboxStatus | None,
    *,
    owner: str | None = None,
    checkpoints: Mapping[str, Checkpoint] | None = None,
    history: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One mailbox as ``/v1`` answers it: configuration without secrets, plus its state."""

    state = status.state if status else MailboxState.STARTING
    if status is not None and owner is not None and status.node not in (None, owner):
        # Written by the previous owner: the new one has not connected yet.
        state = MailboxState.STARTING
    folders: Sequence[str] = mailbox.folders
    item: dict[str, Any] = {
        "id": mailbox.id,
        "kind": "creatio" if mailbox.webhook is None else "webhook",
        "protocol": mailbox.protocol,
        "email": mailbox.sender_email or mailbox.user_name,
        "username": mailbox.user_name,
        "host": mailbox.imap.host,
        "port": mailbox.imap.port,
        "tls": mailbox.imap.security is not Security.NONE,
        "security": mailbox.imap.security.value,
        "server": f"{mailbox.imap.host}:{mailbox.imap.port}",
        "service_url": redact_url(mailbox.service_url) if mailbox.service_url else None,
        "oauth": mailbox.use_oauth,
        "state": state.value,
        "node": owner,
        "last_error": status.last_error if status else None,
        "delivered": status.delivered if status else 0,
        "updated_at": status.updated_at if status else None,
        "webhook": None,
    }
    if mailbox.webhook is not None:
        item["webhook"] = {
            "url": redact_url(mailbox.webhook.url) if mailbox.webhook.url else None,
            "default_url": not mailbox.webhook.url,
            "secrets": len(mailbox.webhook.secrets),
        }
    if checkpoints is None:
        item["folders"] = [{"name": folder} for folder in folders]
    else:
        item["folders"] = [
            {
                "name": folder,
                "uidvalidity": cp.uidvalidity if cp else None,
                "last_uid": cp.last_uid if cp else None,
            }
            for folder in folders
            for cp in [checkpoints.get(folder)]
        ]
    item["history"] = history
    return item
