"""``POST /apiv2/email/send``: Creatio's Send call, as a Quart blueprint.

The message is composed here and handed to the ``MessageSender``; the node's sender routes by
the mailbox's protocol (``emlisten.sender.router.ProtocolSender``): SMTP for IMAP mailboxes, EWS
``CreateItem`` and Graph ``/sendMail`` for Exchange ones. "SMTP server" below stands for
whichever server sends; EWS and Graph failures map onto the same answers.

Body: ``{"Email": {...Creatio Email...}, "Credentials": {...SynchronizationCredentials...}}``,
attachments inside ``Email.Attachments`` and/or beside it as a top-level ``Attachments``
(both are sent). Keys are case-insensitive. ``BpmEndpoint`` is not needed to send, so it may be
missing from these credentials.

Responses (the Creatio contract only says the body is a string; docs/api.md has the table):

- ``200`` ``"<message-id@domain>"``: the JSON string of the sent message's ``Message-ID``. Headers
  ``X-Emlisten-Saved-To-Sent: true|false`` and, when false because of a failure,
  ``X-Emlisten-Warning``; the Sent folder in ``X-Emlisten-Sent-Folder``.
- ``400`` ``{"Message": "Invalid request", "Errors": [{"Index": null, "Id": null, "Field", "Message"}]}``:
  malformed JSON, bad credentials, bad email fields (``Field`` names it: ``Email.Recepients``,
  ``Email.Attachments[2].Base64Data``, ``Credentials.Password``...).
- ``422`` ``{"Message": ..., "RejectedRecipients": {"addr": "550 ..."}}``: the SMTP server refused
  recipients (nothing sent); also the message too large (``"MaxSize": n | null``) or refused by
  policy (``"SmtpCode"``).
- ``502`` ``{"Message": ..., "Reason": "authentication" | "connection"}``: the SMTP server rejected
  the mailbox's credentials, or could not be reached (DNS, TCP, TLS, timeout).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol
from urllib.parse import quote

import quart
from quart import Response, request

from emlisten.api.credentials import parse_credentials
from emlisten.errors import ValidationError
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
from emlisten.sender.compose import ComposedMessage, compose

__all__ = ["SEND_PATH", "MessageSender", "send_blueprint"]

log = logging.getLogger(__name__)

SEND_PATH = "/apiv2/email/send"
#: Stands in for ``BpmEndpoint`` when the send request's credentials lack it (never called).
_UNUSED_CALLBACK = "http://127.0.0.1/emlisten-send-unused"


class MessageSender(Protocol):
    """What the route needs (``emlisten.sender.smtp.SmtpSender`` is one)."""

    def send_message(self, mailbox: MailboxConfig, message: ComposedMessage) -> Awaitable[SendResult]: ...


def _json(payload: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(payload, ensure_ascii=False), status=status, content_type="application/json; charset=utf-8"
    )


def _invalid(field: str, message: str) -> Response:
    return _json(
        {
            "Message": "Invalid request",
            "Errors": [{"Index": None, "Id": None, "Field": field, "Message": message}],
        },
        400,
    )


def _lower_keys(data: Mapping[Any, Any]) -> dict[str, Any]:
    return {str(key).lower(): value for key, value in data.items()}


def _parse_send_credentials(value: Any) -> MailboxConfig:
    if not isinstance(value, Mapping):
        raise ValidationError("Credentials", "required: a SynchronizationCredentials object")
    data = dict(value)
    bpm = _lower_keys(data).get("bpmendpoint")
    if bpm is None or (isinstance(bpm, str) and not bpm.strip()):
        for key in [k for k in data if str(k).lower() == "bpmendpoint"]:
            del data[key]
        data["BpmEndpoint"] = _UNUSED_CALLBACK
    try:
        return parse_credentials(data)
    except ValidationError as error:
        field = error.field if error.field != "body" else ""
        raise ValidationError(f"Credentials.{field}".rstrip("."), error.message) from None


def _error_response(error: SendError) -> Response:
    if isinstance(error, SendRejectedRecipients):
        return _json({"Message": error.message, "RejectedRecipients": error.recipients}, 422)
    if isinstance(error, SendSizeError):
        return _json({"Message": error.message, "MaxSize": error.limit, "SmtpCode": error.code}, 422)
    if isinstance(error, SendAuthError):
        return _json({"Message": error.message, "Reason": "authentication", "SmtpCode": error.code}, 502)
    if isinstance(error, SendConnectError):
        return _json({"Message": error.message, "Reason": "connection", "Phase": error.phase}, 502)
    if isinstance(error, SendRejectedError):
        return _json({"Message": error.message, "SmtpCode": error.code}, 422)
    return _json({"Message": error.message}, 502)


def send_blueprint(sender_factory: Callable[[], MessageSender]) -> quart.Blueprint:
    """The blueprint with ``POST /apiv2/email/send``; ``sender_factory()`` is called per request
    (pass ``lambda: sender`` to share one sender)."""

    blueprint = quart.Blueprint("emlisten_send", __name__)

    @blueprint.post(SEND_PATH)
    async def send_email() -> Response:
        raw = await request.get_data(cache=False, as_text=False)
        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        if not raw.strip():
            return _invalid("body", "empty: a JSON object was expected")
        try:
            body = json.loads(raw.decode("utf-8-sig"))
        except UnicodeDecodeError:
            return _invalid("body", "body is not UTF-8")
        except json.JSONDecodeError as error:
            where = f"line {error.lineno} column {error.colno}"
            return _invalid("body", f"malformed JSON: {error.msg} at {where}")
        if not isinstance(body, Mapping):
            return _invalid("body", 'expected {"Email": {...}, "Credentials": {...}}')
        fields = _lower_keys(body)
        try:
            mailbox = _parse_send_credentials(fields.get("credentials"))
            if fields.get("email") is None:
                raise ValidationError("Email", "required")
            message = compose(
                fields.get("email"), mailbox=mailbox, extra_attachments=fields.get("attachments")
            )
        except ValidationError as error:
            log.info("send: invalid request (%s)", error.field)
            return _invalid(error.field, error.message)
        try:
            result = await sender_factory().send_message(mailbox, message)
        except SendError as error:
            log.warning("send: mailbox %s: %s: %s", mailbox.id, type(error).__name__, error.message)
            return _error_response(error)
        response = _json(result.message_id)
        response.headers["X-Emlisten-Saved-To-Sent"] = "true" if result.saved_to_sent else "false"
        if result.sent_folder:
            # Percent-encoded UTF-8: header values must stay ASCII.
            response.headers["X-Emlisten-Sent-Folder"] = quote(result.sent_folder, safe=" /[]._-")
        if result.warning:
            response.headers["X-Emlisten-Warning"] = (
                " ".join(result.warning.split())[:500].encode("ascii", "replace").decode("ascii")
            )
        return response

    return blueprint
