"""Creatio ``Email`` JSON (the send request) -> RFC 5322 message bytes. Pure: no I/O.

Field names are matched case-insensitively; errors are :class:`emlisten.errors.ValidationError`
naming the field the way Creatio spells it (``Email.Recepients[1]``,
``Email.Attachments[2].Base64Data``).

Fields understood
-----------------
``Subject``, ``Body``, ``IsHtmlBody``, ``Sender`` (default: the mailbox's ``SenderEmailAddress``,
then its ``UserName`` when that is an address), ``Recepients``, ``CopyRecepients``,
``BlindCopyRecepients`` (each an array of addresses, or one string separated by ``;`` or ``,``;
``Name <addr>`` forms accepted; at least one recipient overall), ``Attachments``
(``[{Name, Base64Data, IsInline, ContentId | Id, ContentType?}]``; the send request may also carry
them beside ``Email``: both lists are used), ``Importance`` (0/1/2 or Low/Normal/High),
``MessageId`` (generated when missing: ``<uuid@sender-domain>``), ``InReplyTo``, ``References``
(a space-separated string or an array), ``Headers`` (``[{Name, Value}]``, extra headers; the ones
this module writes itself are ignored there).

Message shape
-------------
- plain body: ``text/plain``;
- HTML body: ``multipart/alternative`` (``text/plain`` derived from the HTML by a simple tag strip,
  then ``text/html``); inline attachments make the HTML part ``multipart/related`` with each
  image's ``Content-ID``;
- other attachments: the whole becomes ``multipart/mixed``; file names use RFC 2231 when not ASCII
  (``Content-Disposition: attachment; filename*=utf-8''...``), also as ``Content-Type; name=``;
- ``Bcc`` is never written: those addresses are only in :attr:`ComposedMessage.recipients`
  (the SMTP envelope);
- ``Date`` is the composing time; ``Importance: high`` + ``X-Priority: 1 (Highest)`` for High,
  ``Importance: low`` + ``X-Priority: 5 (Lowest)`` for Low, nothing for Normal.

Addresses must have an ASCII local part (a non-ASCII domain is IDNA-encoded): SMTPUTF8 is not
used.
"""

from __future__ import annotations

import base64
import binascii
import html
import mimetypes
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy as email_policy
from email.headerregistry import Address
from email.message import EmailMessage, MIMEPart
from email.utils import format_datetime, formataddr, getaddresses
from html.parser import HTMLParser
from typing import Any

from emlisten.errors import ValidationError
from emlisten.models import Importance, MailboxConfig

__all__ = [
    "ComposedMessage",
    "OutgoingAttachment",
    "compose",
    "html_to_text",
    "parse_address",
]

EMAIL_FIELD = "Email"
DEFAULT_ATTACHMENT_NAME = "attachment"

#: Headers this module writes (or must never be copied from ``Headers``).
_RESERVED_HEADERS = frozenset(
    {
        "from",
        "sender",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-disposition",
        "content-id",
        "importance",
        "x-priority",
        "return-path",
        "received",
    }
)
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 ftext
_MSG_ID_TEXT = re.compile(r"^[!-=?-~]+@[!-=?-~]+$")  # printable ASCII without < > and space
_LOCAL_PART = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")
_DOMAIN_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_LIST_SEPARATORS = re.compile(r"[;\r\n]+")


@dataclass(frozen=True, slots=True)
class OutgoingAttachment:
    name: str
    data: bytes = field(repr=False)
    content_type: str = "application/octet-stream"
    is_inline: bool = False
    content_id: str | None = None


@dataclass(frozen=True, slots=True)
class ComposedMessage:
    """The bytes to send plus the SMTP envelope."""

    data: bytes = field(repr=False)
    message_id: str
    envelope_from: str
    #: To + Cc + Bcc addresses, without repeats, in that order.
    recipients: list[str]


# -- field access --------------------------------------------------------------------------


def _lower_keys(data: Mapping[Any, Any]) -> dict[str, Any]:
    return {str(key).lower(): value for key, value in data.items()}


class _Fields:
    def __init__(self, data: Mapping[Any, Any], prefix: str) -> None:
        self._fields = _lower_keys(data)
        self.prefix = prefix

    def error(self, field: str, message: str) -> ValidationError:
        return ValidationError(f"{self.prefix}.{field}", message)

    def get(self, field: str) -> Any:
        return self._fields.get(field.lower())

    def string(self, field: str) -> str:
        value = self.get(field)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self.error(field, "must be a string")
        return value

    def boolean(self, field: str) -> bool:
        value = self.get(field)
        if value is None or value == "":
            return False
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "0", "1"):
            return value.strip().lower() in ("true", "1")
        raise self.error(field, "must be a boolean")


# -- addresses -----------------------------------------------------------------------------


def _ascii_domain(domain: str) -> str | None:
    try:
        ascii_domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        return None
    if ascii_domain.startswith("[") and ascii_domain.endswith("]"):
        return ascii_domain  # address literal, e.g. [127.0.0.1]
    labels = ascii_domain.rstrip(".").split(".")
    if len(ascii_domain) > 253 or not all(_DOMAIN_LABEL.match(label) for label in labels):
        return None
    return ascii_domain.rstrip(".")


def parse_address(text: str, field: str) -> Address:
    """One ``addr`` or ``Name <addr>``; ValidationError(field) when it is not a usable address."""

    stripped = text.strip()
    if not stripped:
        raise ValidationError(field, "empty address")
    if any(ch in stripped for ch in "\r\n\0"):
        raise ValidationError(field, "must not contain line breaks")
    parsed = getaddresses([stripped])
    if len(parsed) != 1 or not parsed[0][1]:
        raise ValidationError(field, f"not an email address: {stripped[:100]!r}")
    display_name, addr_spec = parsed[0]
    local, at, domain = addr_spec.rpartition("@")
    if not at or not local or not domain:
        raise ValidationError(field, f"not an email address: {stripped[:100]!r}")
    if not _LOCAL_PART.match(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        raise ValidationError(
            field,
            f"unsupported local part in {addr_spec[:100]!r}"
            " (ASCII letters, digits and .!#$%&'*+/=?^_`{|}~- only)",
        )
    ascii_domain = _ascii_domain(domain)
    if ascii_domain is None:
        raise ValidationError(field, f"bad domain in {addr_spec[:100]!r}")
    return Address(display_name=display_name.strip(), username=local, domain=ascii_domain)


def _address_list(fields: _Fields, field: str) -> list[Address]:
    value = fields.get(field)
    if value is None or value == "":
        return []
    items: list[tuple[str, str]]
    if isinstance(value, str):
        # Creatio keeps recipients as "a@x; b@y"; commas also separate unless inside quotes.
        items = []
        for chunk in _LIST_SEPARATORS.split(value):
            if not chunk.strip():
                continue
            pairs = [(name, addr) for name, addr in getaddresses([chunk]) if name or addr]
            if not pairs or any(not addr for _, addr in pairs):
                items.append((f"{field}[{len(items)}]", chunk))  # parse_address reports it
                continue
            for name, addr in pairs:
                items.append((f"{field}[{len(items)}]", formataddr((name, addr))))
    elif isinstance(value, list):
        items = []
        for position, item in enumerate(value):
            if not isinstance(item, str):
                raise fields.error(f"{field}[{position}]", "must be a string")
            if item.strip():
                items.append((f"{field}[{position}]", item))
    else:
        raise fields.error(field, "must be an array of addresses or a string")
    return [parse_address(text, f"{fields.prefix}.{name}") for name, text in items]


# -- attachments ---------------------------------------------------------------------------


def _decode_base64(text: str, field: str) -> bytes:
    compact = re.sub(r"\s+", "", text)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(field, "not valid base64") from None


def _content_id(value: str) -> str:
    return value.strip().removeprefix("<").removesuffix(">").strip()


def _attachments(value: Any, prefix: str) -> list[OutgoingAttachment]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValidationError(prefix, "must be an array")
    result: list[OutgoingAttachment] = []
    for position, item in enumerate(value):
        item_prefix = f"{prefix}[{position}]"
        if not isinstance(item, Mapping):
            raise ValidationError(item_prefix, "must be an object")
        fields = _Fields(item, item_prefix)
        name = fields.string("Name").strip().replace("\r", " ").replace("\n", " ")
        data = _decode_base64(fields.string("Base64Data"), f"{item_prefix}.Base64Data")
        is_inline = fields.boolean("IsInline")
        content_id = fields.get("ContentId")
        if not isinstance(content_id, str) or not content_id.strip():
            content_id = fields.get("Id")
        if content_id is not None and not isinstance(content_id, str):
            raise fields.error("ContentId", "must be a string")
        content_id = _content_id(content_id) if content_id else None
        if content_id is not None and not re.fullmatch(r"[!-;=?-~]+", content_id):
            raise fields.error("ContentId", "must be printable ASCII without spaces or <>")
        content_type = fields.string("ContentType").strip().lower()
        if not re.fullmatch(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+", content_type):
            content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        result.append(
            OutgoingAttachment(
                name=name or DEFAULT_ATTACHMENT_NAME,
                data=data,
                content_type=content_type,
                is_inline=is_inline,
                content_id=content_id,
            )
        )
    return result


# -- HTML to text --------------------------------------------------------------------------


class _TextExtractor(HTMLParser):
    _BLOCKS = frozenset(
        {
            "p",
            "div",
            "tr",
            "li",
            "ul",
            "ol",
            "table",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "blockquote",
            "pre",
            "section",
            "article",
            "header",
            "footer",
        }
    )
    _SKIPPED = frozenset({"script", "style", "head", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIPPED:
            self._skipping += 1
        elif tag == "br" or tag in self._BLOCKS:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append("\t")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIPPED:
            self._skipping = max(self._skipping - 1, 0)
        elif tag in self._BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """A readable plain-text rendering of HTML (tags stripped, blocks on their own lines)."""

    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = html.unescape("".join(parser.parts))
    lines = [line.strip(" \t") if line.strip() else "" for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


# -- the message ---------------------------------------------------------------------------


def _message_id(value: str, field: str) -> str:
    text = value.strip()
    if not text:
        return ""
    bare = text.removeprefix("<").removesuffix(">").strip()
    if not _MSG_ID_TEXT.match(bare):
        raise ValidationError(field, "must look like <id@domain>")
    return f"<{bare}>"


def _references(value: Any, field: str) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        items = re.findall(r"<[^<>]*>|[^\s<>,]+", value)
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        items = value
    else:
        raise ValidationError(field, "must be a string or an array of strings")
    return [mid for mid in (_message_id(item, field) for item in items) if mid]


def _importance(value: Any, field: str) -> Importance:
    if value is None or value == "":
        return Importance.NORMAL
    if isinstance(value, str):
        name = value.strip().upper()
        if name.isdigit():
            value = int(name)
        elif name in Importance.__members__:
            return Importance[name]
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return Importance(value)
        except ValueError:
            pass
    raise ValidationError(field, "must be 0/Low, 1/Normal or 2/High")


def _extra_headers(value: Any, prefix: str) -> list[tuple[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValidationError(prefix, "must be an array of {Name, Value}")
    headers: list[tuple[str, str]] = []
    for position, item in enumerate(value):
        item_prefix = f"{prefix}[{position}]"
        if not isinstance(item, Mapping):
            raise ValidationError(item_prefix, "must be an object")
        fields = _Fields(item, item_prefix)
        name = fields.string("Name").strip()
        header_value = fields.get("Value")
        header_value = "" if header_value is None else str(header_value)
        if not _HEADER_NAME.match(name):
            raise fields.error("Name", "not a valid header name")
        if any(ch in header_value for ch in "\r\n\0"):
            raise fields.error("Value", "must not contain line breaks")
        if name.lower() in _RESERVED_HEADERS:
            continue
        headers.append((name, header_value))
    return headers


def _default_sender(mailbox: MailboxConfig | None) -> str:
    if mailbox is None:
        return ""
    for candidate in (mailbox.sender_email, mailbox.user_name):
        if candidate and "@" in candidate:
            return candidate
    return ""


def _attach(part: MIMEPart | EmailMessage, attachment: OutgoingAttachment, *, related: bool) -> None:
    maintype, _, subtype = attachment.content_type.partition("/")
    kwargs: dict[str, Any] = {
        "maintype": maintype,
        "subtype": subtype,
        "filename": attachment.name,
        "params": {"name": attachment.name},
        "disposition": "inline" if attachment.is_inline else "attachment",
    }
    if attachment.content_id:
        kwargs["cid"] = f"<{attachment.content_id}>"
    if related:
        part.add_related(attachment.data, **kwargs)
    else:
        part.add_attachment(attachment.data, **kwargs)


def compose(
    email: Any,
    *,
    mailbox: MailboxConfig | None = None,
    extra_attachments: Any = None,
    now: datetime | None = None,
) -> ComposedMessage:
    """Build the message for a Creatio ``Email`` object.

    ``extra_attachments`` is the request's top-level ``Attachments`` (beside ``Email``).
    """

    if not isinstance(email, Mapping):
        raise ValidationError(EMAIL_FIELD, "must be a JSON object")
    fields = _Fields(email, EMAIL_FIELD)

    sender_text = fields.string("Sender").strip() or _default_sender(mailbox)
    if not sender_text:
        raise fields.error("Sender", "required (and the mailbox has no SenderEmailAddress)")
    sender = parse_address(sender_text, f"{EMAIL_FIELD}.Sender")
    to = _address_list(fields, "Recepients")
    cc = _address_list(fields, "CopyRecepients")
    bcc = _address_list(fields, "BlindCopyRecepients")
    if not (to or cc or bcc):
        raise fields.error(
            "Recepients", "no recipients at all (Recepients, CopyRecepients, BlindCopyRecepients)"
        )

    attachments = _attachments(fields.get("Attachments"), f"{EMAIL_FIELD}.Attachments")
    attachments += _attachments(extra_attachments, "Attachments")

    subject = re.sub(r"[\r\n]+", " ", fields.string("Subject"))
    body = fields.string("Body")
    is_html = fields.boolean("IsHtmlBody")
    importance = _importance(fields.get("Importance"), f"{EMAIL_FIELD}.Importance")
    message_id = _message_id(fields.string("MessageId"), f"{EMAIL_FIELD}.MessageId")
    if not message_id:
        message_id = f"<{uuid.uuid4().hex}@{sender.domain}>"
    in_reply_to = _message_id(fields.string("InReplyTo"), f"{EMAIL_FIELD}.InReplyTo")
    references = _references(fields.get("References"), f"{EMAIL_FIELD}.References")
    if in_reply_to and in_reply_to not in references:
        references.append(in_reply_to)  # RFC 5322 3.6.4: References ends with the parent
    extra_headers = _extra_headers(fields.get("Headers"), f"{EMAIL_FIELD}.Headers")

    message = EmailMessage(policy=email_policy.SMTP)
    message["From"] = sender
    if to:
        message["To"] = to
    if cc:
        message["Cc"] = cc
    if not (to or cc):
        message["To"] = "undisclosed-recipients:;"
    message["Subject"] = subject
    message["Date"] = format_datetime(now or datetime.now(UTC))
    message["Message-ID"] = message_id
    if in_reply_to:
        message["In-Reply-To"] = in_reply_to
    if references:
        message["References"] = " ".join(references)
    if importance is Importance.HIGH:
        message["Importance"] = "high"
        message["X-Priority"] = "1 (Highest)"
    elif importance is Importance.LOW:
        message["Importance"] = "low"
        message["X-Priority"] = "5 (Lowest)"
    for name, value in extra_headers:
        message[name] = value

    inline = [a for a in attachments if a.is_inline and a.content_id] if is_html else []
    others = [a for a in attachments if a not in inline]
    if is_html:
        message.set_content(html_to_text(body))
        message.add_alternative(body, subtype="html")
        if inline:
            alternatives = message.get_payload()
            assert isinstance(alternatives, list)
            html_part = alternatives[1]
            assert isinstance(html_part, MIMEPart)
            for attachment in inline:
                _attach(html_part, attachment, related=True)
    else:
        message.set_content(body)
    for attachment in others:
        _attach(message, attachment, related=False)
    for part in message.walk():
        if part is not message:
            del part["MIME-Version"]  # the stdlib repeats it on every part; only the root needs it

    recipients = list(dict.fromkeys(a.addr_spec for a in (*to, *cc, *bcc)))
    return ComposedMessage(
        data=message.as_bytes(policy=email_policy.SMTP),
        message_id=message_id,
        envelope_from=sender.addr_spec,
        recipients=recipients,
    )
