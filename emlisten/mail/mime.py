"""Turn the RFC 5322 / MIME bytes of one message into an :class:`emlisten.models.Email`.

:func:`to_email` is pure (no I/O) and never raises: broken MIME still yields an ``Email``; in the
worst case the headers are decoded as far as possible and the raw text becomes a plain body.

Choices made here (the Creatio contract leaves them open):

* **Addresses** (``sender``, ``recipients``, ``copy_recipients``, ``blind_copy_recipients``) are
  formatted ``"Display Name" <addr@example.com>`` when a display name exists (decoded from RFC 2047,
  ``\\`` and ``"`` backslash-escaped) and ``addr@example.com`` otherwise. Groups are flattened,
  empty groups (``undisclosed-recipients:;``) vanish. ``sender`` is the first ``From`` address
  (``Sender`` when ``From`` is missing).
* **Headers** keep their order and names; values are unfolded, RFC 2047-decoded and stripped.
  Raw 8-bit header bytes are read as UTF-8, else cp1252.
* **Ids**: ``message_id`` and ``in_reply_to`` are the header values as written (angle brackets
  kept, surrounding whitespace stripped); ``references`` lists each ``<id>`` of ``References``.
* **Dates**: ``send_date`` is ``Date:`` as an aware UTC datetime (no zone or ``-0000`` means UTC),
  else ``RawMessage.internal_date`` (naive means UTC), else ``None``.
* **Importance**: ``Importance:``, then ``X-Priority:`` (1-2 high, 3 normal, 4-5 low), then
  ``X-MSMail-Priority:``, then ``Priority:`` (urgent / non-urgent); the first one understood wins.
* **Body**: in ``multipart/alternative`` the last HTML alternative wins, else the first plain one;
  ``multipart/related`` uses its root (``start`` parameter, else the first part); in
  ``multipart/mixed`` (and any other multipart) the first body-like part is the body and later
  *inline, unnamed* text parts of the same kind (plain after plain, HTML after HTML) are appended to
  it (e.g. mailing-list footers, text after an inline image); other unnamed inline text parts are
  dropped. Line endings are normalised to ``\\n``.
* **Text decoding**: the declared charset, then UTF-8, then (declared charset with replacement
  characters, when it is a known non-UTF-8 charset), then cp1252, then latin-1. Unknown charset
  names are skipped; a few common mislabels are mapped to their superset (gb2312 -> gb18030,
  ks_c_5601-1987 / euc-kr -> cp949, shift_jis -> cp932, iso-8859-8-i -> iso-8859-8). Undeclared HTML
  also tries its ``<meta charset>``. NUL characters are removed and lone surrogates replaced.
* **Attachments**: every leaf part that is not the body and has ``Content-Disposition: attachment``,
  a ``filename``/``name`` parameter, or a type other than ``text/plain`` / ``text/html`` (images,
  ``text/calendar``, ...). ``message/*`` parts are attachments holding the inner message's bytes,
  named ``<inner subject>.eml``. Missing names are synthesised as ``attachment-<part index><ext>``.
  ``id`` is ``uuid5`` of ``email_id`` and the part's depth-first index, so it is stable.
  ``is_inline`` is set when the part's Content-ID is referenced (``cid:``) by the HTML body, or when
  it is ``Content-Disposition: inline`` *inside multipart/related*. An inline-disposition part
  elsewhere (e.g. a PDF Apple Mail shows inline in ``multipart/mixed``) stays a normal attachment:
  Creatio hides inline attachments from the attachment list, and nothing in the body shows it.
* **Size limit**: above ``max_size`` bytes only the header block and the first
  ``min(max_size, 1 MiB)`` bytes are parsed; the body comes from that prefix, a one-line note is
  appended, attachments are dropped and ``truncated`` is True.
"""

from __future__ import annotations

import binascii
import codecs
import functools
import html
import io
import mimetypes
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from email import utils as email_utils
from email.generator import BytesGenerator, Generator
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from urllib.parse import unquote

from emlisten.models import Attachment, Email, Importance, RawMessage

__all__ = ["DEFAULT_MAX_SIZE", "to_email"]

DEFAULT_MAX_SIZE = 25 * 1024 * 1024
#: How much of an over-sized message is parsed for its body (bounded time and memory).
TRUNCATED_PARSE_LIMIT = 1024 * 1024
#: Deeper MIME trees are not descended into (defence against hostile nesting).
MAX_DEPTH = 64

_ATTACHMENT_NAMESPACE = uuid.UUID("2c9f4b5e-7d1a-4c3e-9f6b-8a0d2e4c6b13")

# compat32 keeps header values and payloads as written, which is what we want to decode ourselves;
# the modern policy's header parser is much slower and has raised on hostile headers.
_PARSER = BytesParser(policy=compat32)

_HEADER_BLOCK_END = re.compile(rb"\r?\n\r?\n")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_LINE_BREAKS = re.compile(r"[\r\n]+")
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?]*)\?=")
_SURROGATES = re.compile("[\ud800-\udfff]")
_MSG_ID = re.compile(r"<[^<>]*>")
_CID_REFERENCE = re.compile(r"cid:([^\"'\s<>)]+)", re.IGNORECASE)
_META_CHARSET = re.compile(rb"<meta[^>]{0,200}?charset\s*=\s*[\"']?\s*([A-Za-z0-9_.:-]+)", re.I)
_UNSAFE_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f/\\]+")
_BASE64_JUNK = bytes(b for b in range(256) if not (chr(b).isalnum() and b < 128) and b not in b"+/")

_BODY_TYPES = frozenset({"text/plain", "text/html"})
_MESSAGE_ATTACHMENT_TYPES = frozenset({"message/rfc822", "message/global"})

_CHARSET_ALIASES = {
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "euc-cn": "gb18030",
    "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949",
    "euc-kr": "cp949",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "windows-31j": "cp932",
    "iso-8859-8-i": "iso-8859-8",
    "iso-8859-8-e": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "iso-8859-6-e": "iso-8859-6",
    "x-mac-cyrillic": "mac-cyrillic",
    "x-mac-roman": "mac-roman",
    "macintosh": "mac-roman",
    "windows-874": "cp874",
    "tis-620": "cp874",
    "utf8": "utf-8",
    "unicode-1-1-utf-8": "utf-8",
    "x-unicode20utf8": "utf-8",
}

# Deterministic extensions for common types (the system mime.types would vary between hosts).
_EXTENSIONS = {
    "application/octet-stream": ".bin",
    "application/pdf": ".pdf",
    "application/zip": ".zip",
    "application/json": ".json",
    "application/xml": ".xml",
    "application/msword": ".doc",
    "application/vnd.ms-excel": ".xls",
    "application/vnd.ms-powerpoint": ".ppt",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": ".docx",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": ".xlsx",
    "application/vnd.openxmlformats-officedocument.presentationml.presentation": ".pptx",
    "application/pgp-signature": ".asc",
    "application/pkcs7-signature": ".p7s",
    "application/x-pkcs7-signature": ".p7s",
    "application/ms-tnef": ".dat",
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/pjpeg": ".jpg",
    "image/png": ".png",
    "image/gif": ".gif",
    "image/bmp": ".bmp",
    "image/webp": ".webp",
    "image/svg+xml": ".svg",
    "image/tiff": ".tif",
    "audio/mpeg": ".mp3",
    "audio/wav": ".wav",
    "video/mp4": ".mp4",
    "text/plain": ".txt",
    "text/html": ".html",
    "text/calendar": ".ics",
    "text/csv": ".csv",
    "text/xml": ".xml",
    "text/rfc822-headers": ".txt",
    "message/rfc822": ".eml",
    "message/global": ".eml",
    "message/delivery-status": ".txt",
    "message/disposition-notification": ".txt",
}


def to_email(raw: RawMessage, *, email_id: str, max_size: int = DEFAULT_MAX_SIZE) -> Email:
    """Convert one fetched message to an :class:`Email`; never raises (see the module doc)."""

    data = raw.data
    truncated = len(data) > max_size
    if truncated:
        data = _bounded_prefix(data, max(0, min(max_size, TRUNCATED_PARSE_LIMIT)))
    try:
        email = _convert(data, raw, email_id)
    except Exception:
        email = _convert_leniently(data, raw, email_id)
    if truncated:
        email.truncated = True
        email.attachments = []
        email.body = _with_truncation_note(email.body, email.is_html_body, len(raw.data), max_size)
    return email


# --- whole message ---------------------------------------------------------------------------


def _convert(data: bytes, raw: RawMessage, email_id: str) -> Email:
    message = _parse(data)
    headers = [(name, _header_text(value)) for name, value in message.raw_items()]
    email = _email_from_headers(headers, raw, email_id)
    leaves, is_html = _choose_body(message, 0) or ([], False)
    email.is_html_body = is_html
    email.body = "\n".join(_clean(_part_text(leaf, is_html)) for leaf in leaves)
    linesep = "\r\n" if b"\r\n" in data[:4096] else "\n"
    email.attachments = _attachments(message, {id(leaf) for leaf in leaves}, email, linesep)
    return email


def _parse(data: bytes) -> Message:
    """``_PARSER.parsebytes(data)``, without its line-by-line walk through a single-part body.

    The feed parser splits the whole message into lines and joins the body's lines again (a
    third of a 5 KB mail's conversion). For a body that is neither multipart nor message/* it
    would make the payload the text after the blank line as it is: only the header block is
    parsed here and that text set as the payload. Anything else, and any header block the parser
    does not end exactly at that blank line (a non-header line before it, a lone CR), is parsed
    whole as before."""

    end = _HEADER_BLOCK_END.search(data)
    if end is not None:
        message = _PARSER.parsebytes(data[: end.end()])
        if message._payload == "" and message.get_content_maintype() not in ("multipart", "message"):  # type: ignore[attr-defined]
            # What BytesParser makes of the body: ASCII, other bytes surrogate-escaped.
            message.set_payload(data[end.end() :].decode("ascii", "surrogateescape"))
            return message
    return _PARSER.parsebytes(data)


def _convert_leniently(data: bytes, raw: RawMessage, email_id: str) -> Email:
    """Last resort when the MIME parser or the tree walk failed: headers plus the raw text."""

    try:
        headers, body_offset = _split_headers(data)
        email = _email_from_headers(headers, raw, email_id)
        email.body = _clean(_decode_text(data[body_offset:], None).replace("\r\n", "\n"))
        return email
    except Exception:
        return Email(id=email_id, body=_clean(data.decode("utf-8", "replace")))


def _email_from_headers(headers: list[tuple[str, str]], raw: RawMessage, email_id: str) -> Email:
    """Every field that comes from the header block; ``headers`` values are unfolded, undecoded."""

    by_name: dict[str, list[str]] = {}
    for name, value in headers:
        by_name.setdefault(name.strip().lower(), []).append(value)

    def first(name: str) -> str:
        values = by_name.get(name)
        return values[0].strip() if values else ""

    senders = _addresses(by_name.get("from", [])) or _addresses(by_name.get("sender", []))
    return Email(
        id=email_id,
        subject=_clean(decode_words(first("subject")).strip()),
        sender=senders[0] if senders else "",
        recipients=_addresses(by_name.get("to", [])),
        copy_recipients=_addresses(by_name.get("cc", [])),
        blind_copy_recipients=_addresses(by_name.get("bcc", [])),
        headers=[(_clean(name), _clean(decode_words(value).strip())) for name, value in headers],
        importance=_importance(first),
        send_date=_parse_date(first("date")) or _as_utc(raw.internal_date),
        message_id=_clean(first("message-id")),
        in_reply_to=_clean(first("in-reply-to")),
        references=_message_ids(first("references")),
    )


def _bounded_prefix(data: bytes, limit: int) -> bytes:
    """The first ``limit`` bytes cut at a line end, extended to the whole header block if needed."""

    header_end = _HEADER_BLOCK_END.search(data, 0, TRUNCATED_PARSE_LIMIT)
    if header_end is not None:
        limit = max(limit, header_end.end())
    prefix = data[:limit]
    line_end = prefix.rfind(b"\n")
    return prefix[: line_end + 1] if line_end >= 0 else prefix


def _with_truncation_note(body: str, is_html: bool, size: int, max_size: int) -> str:
    note = (
        f"[emlisten: this message ({size} bytes) exceeds the {max_size}-byte limit; "
        "its body was cut and its attachments were omitted]"
    )
    if is_html:
        return f"{body}\n<p>{html.escape(note)}</p>"
    return f"{body}\n\n{note}" if body else note


# --- headers ---------------------------------------------------------------------------------


def _header_text(value: object) -> str:
    """A parsed header value as unfolded text: raw 8-bit bytes decoded, encoded words kept."""

    text = value if isinstance(value, str) else str(value)
    if not text.isascii() and _SURROGATES.search(text):
        # BytesParser smuggles raw 8-bit bytes as surrogate escapes; give them a real charset.
        text = _decode_text(text.encode("utf-8", "surrogateescape"), None)
    return _LINE_BREAKS.sub(" ", _FOLD.sub("", text))


def _split_headers(data: bytes) -> tuple[list[tuple[str, str]], int]:
    """Minimal header-block splitter that cannot fail: (headers, offset of the body)."""

    headers: list[tuple[str, list[bytes]]] = []
    offset = 0
    if data.startswith(b"From "):  # mbox separator line
        offset = data.find(b"\n") + 1 or len(data)
    while offset < len(data):
        end = data.find(b"\n", offset)
        end = len(data) if end < 0 else end + 1
        line = data[offset:end].rstrip(b"\r\n")
        if not line:
            offset = end
            break
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1][1].append(line)  # folded: unfolding keeps the leading whitespace
        else:
            name, colon, value = line.partition(b":")
            name = name.strip()
            if not colon or not name or b" " in name:
                break  # not a header line: the body starts here
            headers.append((name.decode("latin-1"), [value.lstrip()]))
        offset = end
    return [(name, _decode_text(b"".join(lines), None)) for name, lines in headers], offset


def decode_words(text: str) -> str:
    """Decode RFC 2047 encoded words leniently (unknown charsets and bad base64 never raise).

    Adjacent encoded words in one charset are joined before decoding, so a multi-byte character
    split across two words survives; whitespace between encoded words is dropped.
    """

    if "=?" not in text:
        return text
    pieces: list[str] = []
    pending_charset: str | None = None
    pending = bytearray()
    position = 0

    def flush() -> None:
        nonlocal pending_charset
        if pending_charset is not None:
            pieces.append(_decode_text(bytes(pending), pending_charset))
            pending.clear()
            pending_charset = None

    for match in _ENCODED_WORD.finditer(text):
        between = text[position : match.start()]
        if between and not (pending_charset is not None and between.isspace()):
            flush()
            pieces.append(between)
        charset = match.group(1).split("*", 1)[0].lower()  # RFC 2231 language suffix
        encoded = match.group(3)
        if match.group(2) in "bB":
            word = _lenient_base64(encoded.encode("ascii", "replace"))
        else:
            word = binascii.a2b_qp(encoded.encode("ascii", "replace"), header=True)
        if charset != pending_charset:
            flush()
            pending_charset = charset
        pending += word
        position = match.end()
    flush()
    pieces.append(text[position:])
    return "".join(pieces)


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = rf"{_ATEXT}(?:\.{_ATEXT})*"
#: One address the way most mail writes it: ``addr@example.com`` or ``Display Name <addr@...>``
#: with a name of plain atoms (RFC 2047 words included). Nothing quoted, commented or grouped.
_SIMPLE_ADDRESS = re.compile(
    rf"[ \t]*(?:(?P<bare>{_DOT_ATOM}@{_DOT_ATOM})"
    rf"|(?P<name>{_ATEXT}(?:[ \t]+{_ATEXT})*)[ \t]*<(?P<address>{_DOT_ATOM}@{_DOT_ATOM})>)[ \t]*"
)
_WHITESPACE = re.compile(r"[ \t]+")


def _simple_addresses(values: list[str]) -> list[tuple[str, str]] | None:
    """What ``email.utils.getaddresses(values)`` returns, for values made only of simple
    addresses separated by commas (its parser walks every character in Python: a tenth of a
    plain mail's conversion); None for anything else, which goes to getaddresses."""

    found: list[tuple[str, str]] = []
    for value in values:
        for piece in value.split(","):
            match = _SIMPLE_ADDRESS.fullmatch(piece)
            if match is None:
                return None
            if match["bare"] is not None:
                found.append(("", match["bare"]))
            else:
                found.append((_WHITESPACE.sub(" ", match["name"]), match["address"]))
    return found


def _addresses(values: list[str]) -> list[str]:
    if not values:
        return []
    result = []
    pairs = _simple_addresses(values)
    for name, raw_address in email_utils.getaddresses(values) if pairs is None else pairs:
        address = _clean(raw_address.strip())
        if not address:
            continue
        display = _clean(decode_words(name).strip())
        if display:
            escaped = display.replace("\\", "\\\\").replace('"', '\\"')
            result.append(f'"{escaped}" <{address}>')
        else:
            result.append(address)
    return result


_IMPORTANCE_WORDS = {
    "high": Importance.HIGH,
    "urgent": Importance.HIGH,
    "normal": Importance.NORMAL,
    "low": Importance.LOW,
    "non-urgent": Importance.LOW,
}
_PRIORITY_DIGITS = {
    "1": Importance.HIGH,
    "2": Importance.HIGH,
    "3": Importance.NORMAL,
    "4": Importance.LOW,
    "5": Importance.LOW,
}


def _importance(first: Callable[[str], str]) -> Importance:
    for name in ("importance", "x-priority", "x-msmail-priority", "priority"):
        value = first(name).lower()
        if not value:
            continue
        if value[0] in _PRIORITY_DIGITS:
            return _PRIORITY_DIGITS[value[0]]
        word = value.split(None, 1)[0].strip("()")
        if word in _IMPORTANCE_WORDS:
            return _IMPORTANCE_WORDS[word]
    return Importance.NORMAL


def _parse_date(text: str) -> datetime | None:
    if not text:
        return None
    try:
        parsed = email_utils.parsedate_tz(text)
        if parsed is None:
            return None
        year, month, day, hour, minute, second = parsed[:6]
        offset = timezone(timedelta(seconds=parsed[9] or 0))
        moment = datetime(year, month, day, hour, minute, min(second, 59), tzinfo=offset)
        return moment.astimezone(UTC)
    except (ValueError, OverflowError, TypeError, IndexError):
        return None


def _as_utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def _message_ids(text: str) -> list[str]:
    found = [re.sub(r"\s+", "", item) for item in _MSG_ID.findall(text)]
    return [_clean(item) for item in (found or text.replace(",", " ").split())]


# --- text ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _codec(charset: str | None) -> str | None:
    """The Python codec for a MIME charset name, or None when unknown or not a text codec."""

    if not charset:
        return None
    name = charset.strip().strip("\"'").lower()
    name = _CHARSET_ALIASES.get(name, name)
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError, TypeError):
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in _NON_MAIL_CODECS:
        return None
    return info.name


_NON_MAIL_CODECS = frozenset({"unicode-escape", "raw-unicode-escape", "idna", "punycode"})


def _decode_text(data: bytes, charset: str | None) -> str:
    """Decode with the declared charset, falling back as the module doc says; never raises."""

    codec = _codec(charset)
    if codec is not None:
        try:
            return data.decode(codec)
        except (UnicodeDecodeError, LookupError, ValueError):
            pass
    if data.isascii():
        return data.decode("ascii")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if codec is not None and codec not in ("utf-8", "ascii"):
        try:
            return data.decode(codec, "replace")
        except (LookupError, ValueError):
            pass
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _clean(text: str) -> str:
    """Text safe for JSON consumers: no NUL characters, no lone surrogates."""

    if text.isascii():
        return text.replace("\x00", "") if "\x00" in text else text
    return _SURROGATES.sub("\ufffd", text.replace("\x00", ""))


def _lenient_base64(data: bytes) -> bytes:
    """Base64 that tolerates junk characters, missing or misplaced padding and a stray tail."""

    cleaned = data.translate(None, _BASE64_JUNK)
    extra = len(cleaned) % 4
    if extra == 1:
        cleaned = cleaned[:-1]
    elif extra:
        cleaned += b"=" * (4 - extra)
    try:
        return binascii.a2b_base64(cleaned)
    except (binascii.Error, ValueError):
        return b""


# --- MIME tree -------------------------------------------------------------------------------


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type()
    except Exception:
        return "application/octet-stream"


def _disposition(part: Message) -> str:
    value = part.get("Content-Disposition")
    if value is None:
        return ""
    return str(value).split(";", 1)[0].strip().lower()


def _raw_filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except Exception:
        return None
    if name is None:
        return None
    return _header_text(name)


def _is_body_like(part: Message) -> bool:
    return (
        _content_type(part) in _BODY_TYPES
        and _disposition(part) != "attachment"
        and _raw_filename(part) is None
    )


def _children(part: Message) -> list[Message]:
    payload = part.get_payload()
    if isinstance(payload, list):
        return [child for child in payload if isinstance(child, Message)]
    return []


def _choose_body(part: Message, depth: int) -> tuple[list[Message], bool] | None:
    """The leaf part(s) forming the body and whether they are HTML, or None when there is none."""

    if depth > MAX_DEPTH:
        return None
    content_type = _content_type(part)
    if not part.is_multipart():
        if depth == 0 and content_type.startswith("multipart/"):
            return [part], False  # a multipart without a usable boundary: its raw text
        if content_type not in _BODY_TYPES or _disposition(part) == "attachment":
            return None
        # A single-part message is its own body even when its sender gave it a name.
        if depth > 0 and _raw_filename(part) is not None:
            return None
        return [part], content_type == "text/html"
    if content_type.startswith("message/"):
        return None
    children = [child for child in _children(part) if _disposition(child) != "attachment"]
    if content_type == "multipart/alternative":
        found = [body for body in (_choose_body(c, depth + 1) for c in children) if body]
        html_bodies = [body for body in found if body[1]]
        if html_bodies:
            return html_bodies[-1]
        return found[0] if found else None
    if content_type == "multipart/related":
        start = _strip_brackets(str(part.get_param("start") or ""))
        if start:
            children.sort(key=lambda child: _content_id(child) != start)
        for child in children:
            body = _choose_body(child, depth + 1)
            if body:
                return body
        return None
    for position, child in enumerate(children):
        body = _choose_body(child, depth + 1)
        if body:
            leaves, is_html = body
            return [*leaves, *_same_kind_followers(children[position + 1 :], is_html)], is_html
    return None


def _same_kind_followers(parts: list[Message], is_html: bool) -> Iterator[Message]:
    wanted = "text/html" if is_html else "text/plain"
    for part in parts:
        if not part.is_multipart() and _content_type(part) == wanted and _is_body_like(part):
            yield part


def _part_bytes(part: Message) -> bytes:
    """The part's payload with its Content-Transfer-Encoding undone (leniently)."""

    # The raw payload: get_payload() would already decode 8-bit text with the declared charset.
    payload = getattr(part, "_payload", None)
    if not isinstance(payload, str | bytes):
        return b""
    data = payload if isinstance(payload, bytes) else payload.encode("utf-8", "surrogateescape")
    encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if encoding == "base64":
        return _lenient_base64(data)
    if encoding == "quoted-printable":
        return binascii.a2b_qp(data)
    if encoding in ("x-uuencode", "uuencode", "uue", "x-uue"):
        decoded = part.get_payload(decode=True)
        return decoded if isinstance(decoded, bytes) else data
    return data


def _part_text(part: Message, is_html: bool) -> str:
    data = _part_bytes(part)
    charset = part.get_content_charset()
    if charset is None and is_html:
        meta = _META_CHARSET.search(data, 0, 4096)
        if meta is not None:
            charset = meta.group(1).decode("ascii")
    return _decode_text(data, charset).replace("\r\n", "\n")


def _content_id(part: Message) -> str | None:
    value = part.get("Content-ID")
    if value is None:
        return None
    return _strip_brackets(_header_text(value)) or None


def _strip_brackets(value: str) -> str:
    return value.strip().strip("<>").strip()


# --- attachments -----------------------------------------------------------------------------


def _walk(message: Message) -> Iterator[tuple[int, Message, str]]:
    """Depth-first parts as (index, part, parent content type); message/* is not descended."""

    stack: list[tuple[Message, str, int]] = [(message, "", 0)]
    index = 0
    while stack:
        part, parent_type, depth = stack.pop()
        yield index, part, parent_type
        index += 1
        content_type = _content_type(part)
        if depth < MAX_DEPTH and part.is_multipart() and not content_type.startswith("message/"):
            stack.extend((child, content_type, depth + 1) for child in reversed(_children(part)))


def _attachments(message: Message, body_parts: set[int], email: Email, linesep: str) -> list[Attachment]:
    referenced = _referenced_content_ids(email.body) if email.is_html_body else set()
    result = []
    for index, part, parent_type in _walk(message):
        if id(part) in body_parts:
            continue
        try:
            attachment = _attachment(
                index,
                part,
                parent_type=parent_type,
                email_id=email.id,
                referenced=referenced,
                linesep=linesep,
            )
        except Exception:
            attachment = None  # one unreadable part must not cost the rest of the message
        if attachment is not None:
            result.append(attachment)
    return result


def _attachment(
    index: int,
    part: Message,
    *,
    parent_type: str,
    email_id: str,
    referenced: set[str],
    linesep: str,
) -> Attachment | None:
    content_type = _content_type(part)
    is_message = content_type.startswith("message/")
    if part.is_multipart() and not is_message:
        return None
    disposition = _disposition(part)
    raw_name = _raw_filename(part)
    if not (is_message or disposition == "attachment" or raw_name is not None) and (
        content_type in _BODY_TYPES
    ):
        return None  # an unnamed inline text part that is not the body (e.g. an alternative)
    if is_message:
        data = _message_bytes(part, linesep)
        name = raw_name
        if content_type in _MESSAGE_ATTACHMENT_TYPES:
            # a subject is no path: its slashes must not cut the name short
            subject = re.sub(r"[/\\]", "_", _inner_subject(data))
            name = f"{subject}.eml" if subject else name
    else:
        data = _part_bytes(part)
        name = raw_name
    content_id = _content_id(part)
    is_inline = (content_id is not None and content_id.lower() in referenced) or (
        disposition == "inline" and parent_type == "multipart/related"
    )
    return Attachment(
        id=str(uuid.uuid5(_ATTACHMENT_NAMESPACE, f"{email_id}/{index}")),
        name=_safe_name(decode_words(name) if name else "", index, content_type),
        data=data,
        content_type=content_type,
        is_inline=is_inline,
        content_id=_clean(content_id) if content_id else None,
    )


def _referenced_content_ids(body: str) -> set[str]:
    return {unquote(found).lower() for found in _CID_REFERENCE.findall(body)}


def _message_bytes(part: Message, linesep: str) -> bytes:
    """The body of a message/* part (the inner message itself), as close to the original as
    the parsed tree allows: compat32 keeps header values and payloads verbatim."""

    policy = compat32.clone(linesep=linesep)
    try:
        buffer = io.BytesIO()
        BytesGenerator(buffer, mangle_from_=False, maxheaderlen=0, policy=policy).flatten(part)
        flattened = buffer.getvalue()
    except Exception:
        # BytesGenerator trips over 8-bit text in a multipart without a usable boundary (its
        # get_payload() substitutes U+FFFD); the text generator copes, at the cost of those bytes.
        text = io.StringIO()
        Generator(text, mangle_from_=False, maxheaderlen=0, policy=policy).flatten(part)
        flattened = text.getvalue().encode("utf-8", "surrogateescape")
    separator = linesep.encode() * 2
    if flattened.startswith(linesep.encode()):
        body = flattened[len(linesep) :]
    else:
        header_end = flattened.find(separator)
        body = flattened[header_end + len(separator) :] if header_end >= 0 else b""
    encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if encoding == "base64":
        return _lenient_base64(body)
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    return body


def _inner_subject(data: bytes) -> str:
    headers, _ = _split_headers(data[:TRUNCATED_PARSE_LIMIT])
    for name, value in headers:
        if name.lower() == "subject":
            return decode_words(value).strip()
    return ""


def _safe_name(name: str, index: int, content_type: str) -> str:
    """A usable file name: no directories or control characters, bounded length."""

    name = _clean(name).replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_NAME_CHARS.sub(" ", name).strip(" .")
    if not name:
        return f"attachment-{index}{_extension(content_type)}"
    if len(name) > 200:
        stem, dot, extension = name.rpartition(".")
        name = f"{stem[:190]}.{extension[:9]}" if dot and len(extension) <= 9 else name[:200]
    return name


def _extension(content_type: str) -> str:
    if content_type in _EXTENSIONS:
        return _EXTENSIONS[content_type]
    return mimetypes.guess_extension(content_type, strict=False) or ".bin"
