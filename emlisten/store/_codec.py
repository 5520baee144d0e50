"""MailboxConfig, MailboxStatus, Checkpoint and NodeInfo to and from JSON: the store's wire format.

Pure functions, no I/O. Every document carries a format version ``"v"`` so a later release can
read what an earlier one wrote. Tuples (``folders``) come back as tuples; the free-form mappings
(``feature_values``, ``context``, ``extra``) come back as plain dicts of JSON values, which is what
the API put in them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from emlisten.models import (
    Checkpoint,
    MailboxConfig,
    MailboxState,
    MailboxStatus,
    NodeInfo,
    Security,
    ServerEndpoint,
    WebhookEvent,
    WebhookTarget,
)

FORMAT_VERSION = 1


class CodecError(ValueError):
    """A stored document is not in a format this release understands."""


def _dumps(document: Mapping[str, Any]) -> bytes:
    # Compact and sorted: stable bytes for the same value. ASCII-only, because JSON from the API
    # may carry lone surrogates ("\ud800"), which a UTF-8 encode would refuse.
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def _loads(data: bytes | str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CodecError(f"not JSON: {exc.__class__.__name__}") from None
    if not isinstance(document, dict):
        raise CodecError("not a JSON object")
    version = document.get("v", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise CodecError(f"unknown format version {version!r}")
    return document


def endpoint_to_dict(endpoint: ServerEndpoint) -> dict[str, Any]:
    return {
        "host": endpoint.host,
        "port": endpoint.port,
        "security": endpoint.security.value,
        "verify_certificate": endpoint.verify_certificate,
    }


def endpoint_from_dict(data: Mapping[str, Any]) -> ServerEndpoint:
    return ServerEndpoint(
        host=str(data["host"]),
        port=int(data["port"]),
        security=Security(data["security"]),
        verify_certificate=bool(data.get("verify_certificate", True)),
    )


def mailbox_to_dict(mailbox: MailboxConfig) -> dict[str, Any]:
    return {
        "v": FORMAT_VERSION,
        "id": mailbox.id,
        "user_name": mailbox.user_name,
        "imap": endpoint_to_dict(mailbox.imap),
        "bpm_endpoint": mailbox.bpm_endpoint,
        "password": mailbox.password,
        "access_token": mailbox.access_token,
        "use_oauth": mailbox.use_oauth,
        "sender_email": mailbox.sender_email,
        "folders": list(mailbox.folders),
        "use_full_email": mailbox.use_full_email,
        "protocol": mailbox.protocol,
        "service_url": mailbox.service_url,
        "bpm_user": mailbox.bpm_user,
        "bpm_user_workspace": mailbox.bpm_user_workspace,
        "bpm_user_time_zone": mailbox.bpm_user_time_zone,
        "smtp": endpoint_to_dict(mailbox.smtp) if mailbox.smtp is not None else None,
        "feature_values": dict(mailbox.feature_values),
        "context": dict(mailbox.context),
        "extra": dict(mailbox.extra),
        "revision": mailbox.revision,
        "webhook": (
            None
            if mailbox.webhook is None
            else {"url": mailbox.webhook.url, "secrets": list(mailbox.webhook.secrets)}
        ),
    }


def mailbox_from_dict(data: Mapping[str, Any]) -> MailboxConfig:
    try:
        smtp = data.get("smtp")
        webhook = data.get("webhook")
        return MailboxConfig(
            id=str(data["id"]),
            user_name=str(data["user_name"]),
            imap=endpoint_from_dict(data["imap"]),
            bpm_endpoint=str(data["bpm_endpoint"]),
            password=str(data.get("password", "")),
            access_token=str(data.get("access_token", "")),
            use_oauth=bool(data.get("use_oauth", False)),
            sender_email=str(data.get("sender_email", "")),
            folders=tuple(str(f) for f in data.get("folders", ("INBOX",))),
            use_full_email=bool(data.get("use_full_email", True)),
            protocol=str(data.get("protocol", "imap")),
            service_url=str(data.get("service_url", "")),
            bpm_user=str(data.get("bpm_user", "")),
            bpm_user_workspace=str(data.get("bpm_user_workspace", "")),
            bpm_user_time_zone=str(data.get("bpm_user_time_zone", "")),
            smtp=endpoint_from_dict(smtp) if smtp is not None else None,
            feature_values=dict(data.get("feature_values", {})),
            context=dict(data.get("context", {})),
            extra=dict(data.get("extra", {})),
            revision=int(data.get("revision", 0)),
            webhook=(
                None
                if webhook is None
                else WebhookTarget(
                    url=str(webhook.get("url", "")),
                    secrets=tuple(str(secret) for secret in webhook.get("secrets", ())),
                )
            ),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # The message names the problem, never the values (they may hold credentials).
        raise CodecError(f"bad mailbox document: {exc.__class__.__name__}") from None


def encode_mailbox(mailbox: MailboxConfig) -> bytes:
    return _dumps(mailbox_to_dict(mailbox))


def decode_mailbox(data: bytes | str) -> MailboxConfig:
    return mailbox_from_dict(_loads(data))


def status_to_dict(status: MailboxStatus) -> dict[str, Any]:
    return {
        "v": FORMAT_VERSION,
        "state": status.state.value,
        "last_error": status.last_error,
        "updated_at": status.updated_at,
        "delivered": status.delivered,
        "node": status.node,
    }


def status_from_dict(data: Mapping[str, Any]) -> MailboxStatus:
    try:
        last_error = data.get("last_error")
        node = data.get("node")
        return MailboxStatus(
            state=MailboxState(data["state"]),
            last_error=None if last_error is None else str(last_error),
            updated_at=float(data.get("updated_at", 0.0)),
            delivered=int(data.get("delivered", 0)),
            node=None if node is None else str(node),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CodecError(f"bad status document: {exc.__class__.__name__}") from None


def encode_status(status: MailboxStatus) -> bytes:
    return _dumps(status_to_dict(status))


def decode_status(data: bytes | str) -> MailboxStatus:
    return status_from_dict(_loads(data))


def checkpoint_to_dict(checkpoint: Checkpoint) -> dict[str, Any]:
    # No "v" here: the Lua scripts read the first two fields; "cursor" is optional (IMAP has none).
    data: dict[str, Any] = {"uidvalidity": checkpoint.uidvalidity, "last_uid": checkpoint.last_uid}
    if checkpoint.cursor:
        data["cursor"] = checkpoint.cursor
    return data


def checkpoint_from_dict(data: Mapping[str, Any]) -> Checkpoint:
    try:
        return Checkpoint(
            uidvalidity=int(data["uidvalidity"]),
            last_uid=int(data["last_uid"]),
            cursor=str(data.get("cursor", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CodecError(f"bad checkpoint document: {exc.__class__.__name__}") from None


def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    return _dumps(checkpoint_to_dict(checkpoint))


def decode_checkpoint(data: bytes | str) -> Checkpoint:
    return checkpoint_from_dict(_loads(data))


def node_to_dict(node: NodeInfo) -> dict[str, Any]:
    return {
        "v": FORMAT_VERSION,
        "id": node.id,
        "role": node.role,
        "mailboxes": node.mailboxes,
        "seen_at": node.seen_at,
        "started_at": node.started_at,
        "version": node.version,
    }


def node_from_dict(data: Mapping[str, Any]) -> NodeInfo:
    try:
        return NodeInfo(
            id=str(data["id"]),
            role=str(data["role"]),
            mailboxes=int(data.get("mailboxes", 0)),
            seen_at=float(data.get("seen_at", 0.0)),
            started_at=float(data.get("started_at", 0.0)),
            version=str(data.get("version", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CodecError(f"bad node document: {exc.__class__.__name__}") from None


def encode_node(node: NodeInfo) -> bytes:
    return _dumps(node_to_dict(node))


def decode_node(data: bytes | str) -> NodeInfo:
    return node_from_dict(_loads(data))


def webhook_event_to_dict(event: WebhookEvent) -> dict[str, Any]:
    return {
        "v": FORMAT_VERSION,
        "id": event.id,
        "endpoint": event.endpoint,
        "url": event.url,
        "mailbox_id": event.mailbox_id,
        "type": event.type,
        "payload": event.payload,
        "created_at": event.created_at,
        "attempts": event.attempts,
        "next_attempt_at": event.next_attempt_at,
        "last_error": event.last_error,
        "dead_at": event.dead_at,
        "secrets": list(event.secrets),
    }


def webhook_event_from_dict(data: Mapping[str, Any]) -> WebhookEvent:
    try:
        return WebhookEvent(
            id=str(data["id"]),
            endpoint=str(data["endpoint"]),
            url=str(data["url"]),
            mailbox_id=str(data["mailbox_id"]),
            type=str(data["type"]),
            payload=str(data["payload"]),
            created_at=float(data["created_at"]),
            attempts=int(data.get("attempts", 0)),
            next_attempt_at=float(data.get("next_attempt_at", 0.0)),
            last_error=str(data.get("last_error", "")),
            dead_at=float(data.get("dead_at", 0.0)),
            secrets=tuple(str(secret) for secret in data.get("secrets", ())),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CodecError(f"bad webhook event document: {exc.__class__.__name__}") from None


def encode_webhook_event(event: WebhookEvent) -> bytes:
    return _dumps(webhook_event_to_dict(event))


def decode_webhook_event(data: bytes | str) -> WebhookEvent:
    return webhook_event_from_dict(_loads(data))
