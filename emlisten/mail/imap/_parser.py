"""Streaming IMAP response parser (RFC 3501 / RFC 9051), free of I/O.

Feed it the bytes read from the server; it returns every response completed by them. It keeps
only the bytes of the response in progress, and refuses (``MailProtocolError``) lines longer than
``max_line_bytes`` or literals larger than ``max_literal_bytes`` instead of buffering without
bound. After an error the parser stays failed: the connection must be dropped.

Parsed values (``Value``) are: ``int`` (numbers), ``str`` (atoms, e.g. ``\\Seen``, ``BODY[]``,
``UID``), ``bytes`` (quoted strings and literals: they may be binary), ``None`` (NIL) and
``list`` (parenthesized lists).
"""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TypeAlias

from emlisten.errors import MailProtocolError

Value: TypeAlias = "int | str | bytes | list[Value] | None"

DEFAULT_MAX_LINE_BYTES = 64 * 1024
DEFAULT_MAX_LITERAL_BYTES = 64 * 1024 * 1024
#: Literal bytes of one command's whole answer (every response until the tagged one): a FETCH
#: of many messages is many responses, each under the literal cap. emlisten's own fetches stay
#: far below (batches of EMLISTEN_BATCH_MAX_BYTES, messages cut at EMLISTEN_MAX_MESSAGE_BYTES).
DEFAULT_MAX_ANSWER_BYTES = 64 * 1024 * 1024
#: Literal bytes all the connections of the process may hold at once (see ByteBudget).
DEFAULT_MAX_PROCESS_BYTES = 512 * 1024 * 1024


class ByteBudget:
    """Literal bytes buffered at once by every IMAP connection of the process.

    A parser takes a literal's size when the server announces it, before buffering a byte, and
    gives it back when its client starts the next command or closes. A server that sends more
    than the budget allows makes its own connection fail (and be retried later), never the
    process run out of memory.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used = max(0, self.used - size)


#: The process-wide budget every parser uses unless given another.
PROCESS_BUDGET = ByteBudget(DEFAULT_MAX_PROCESS_BYTES)

#: Deeper nesting is never sent by a real server; bounding it keeps recursion safe.
MAX_NESTING = 32
#: 2**64 has 20 digits: longer numbers are malformed (and ``int()`` of huge strings is slow).
_MAX_NUMBER_DIGITS = 20

STATUS_TYPES = frozenset({"OK", "NO", "BAD", "BYE", "PREAUTH"})
_STATUS_TYPES_BYTES = frozenset(t.encode() for t in STATUS_TYPES)

_SP = 0x20
_LPAREN = 0x28
_RPAREN = 0x29
_LBRACKET = 0x5B
_RBRACKET = 0x5D
_DQUOTE = 0x22
_BACKSLASH = 0x5C
_LBRACE = 0x7B
_TILDE = 0x7E


class ResponseKind(enum.Enum):
    TAGGED = "tagged"
    UNTAGGED = "untagged"
    CONTINUATION = "continuation"


@dataclass(slots=True)
class Response:
    """One complete server response.

    - tagged ``A1 OK [READ-WRITE] done``: ``tag="A1"``, ``type="OK"``, ``code="READ-WRITE"``.
    - untagged ``* 12 EXISTS``: ``tag="*"``, ``number=12``, ``type="EXISTS"``.
    - untagged data ``* LIST (\\Noselect) "/" foo``: ``type="LIST"``, ``data=[["\\Noselect"], b"/", "foo"]``.
    - continuation ``+ idling``: ``tag="+"``, ``text="idling"``.

    ``code``/``code_args``/``text`` are set for status responses (OK, NO, BAD, BYE, PREAUTH);
    ``data`` for the others.
    """

    kind: ResponseKind
    tag: str
    type: str = ""
    number: int | None = None
    code: str | None = None
    code_args: list[Value] = field(default_factory=list)
    text: str = ""
    data: list[Value] = field(default_factory=list)

    @property
    def is_status(self) -> bool:
        return self.type in STATUS_TYPES


def _error(message: str) -> MailProtocolError:
    return MailProtocolError(f"malformed IMAP response: {message}")


class ResponseParser:
    """Incremental framing + parsing of server responses. Not thread/task safe (one reader)."""

    __slots__ = (
        "_answer_bytes",
        "_buffer",
        "_failed",
        "_in_literal",
        "_line_bytes",
        "_lines",
        "_literal_bytes",
        "_literal_chunks",
        "_literal_remaining",
        "_literals",
        "_scan_from",
        "budget",
        "max_answer_bytes",
        "max_line_bytes",
        "max_literal_bytes",
    )

    def __init__(
        self,
        *,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_literal_bytes: int = DEFAULT_MAX_LITERAL_BYTES,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
        budget: ByteBudget | None = None,
    ) -> None:
        self.max_line_bytes = max_line_bytes
        self.max_literal_bytes = max_literal_bytes
        self.max_answer_bytes = max_answer_bytes
        self.budget = budget if budget is not None else PROCESS_BUDGET
        #: Literal bytes announced since end_answer(), taken from the budget.
        self._answer_bytes = 0
        self._buffer = bytearray()
        self._scan_from = 0
        self._failed = False
        # The response in progress: lines[i] is followed by literals[i] (one fewer literal).
        self._lines: list[bytes] = []
        self._literals: list[bytes] = []
        self._line_bytes = 0
        self._literal_bytes = 0
        self._in_literal = False
        self._literal_remaining = 0
        self._literal_chunks: list[bytes] = []

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for the response in progress (for tests and metrics)."""
        return (
            len(self._buffer)
            + sum(len(x) for x in self._lines)
            + sum(len(x) for x in self._literals)
            + sum(len(x) for x in self._literal_chunks)
        )

    @property
    def idle(self) -> bool:
        """True when no partial response is buffered."""
        return not self._buffer and not self._lines and not self._in_literal

    def feed(self, data: bytes | bytearray | memoryview) -> list[Response]:
        """Consume ``data``; return the responses it completed, in order."""
        if self._failed:
            raise MailProtocolError("IMAP response parser failed earlier; connection unusable")
        try:
            return self._feed(data)
        except MailProtocolError:
            self._fail()
            raise
        except (ValueError, IndexError, RecursionError) as exc:  # defensive: never leak others
            self._fail()
            raise _error(type(exc).__name__) from None

    def end_answer(self) -> None:
        """The answer read so far is consumed: give its literal bytes back to the budget."""
        self.budget.give(self._answer_bytes)
        self._answer_bytes = 0

    def _fail(self) -> None:
        self._failed = True
        self.end_answer()
        self._buffer = bytearray()
        self._lines = []
        self._literals = []
        self._literal_chunks = []

    def _feed(self, data: bytes | bytearray | memoryview) -> list[Response]:
        out: list[Response] = []
        buf = self._buffer
        buf += data
        while buf:
            if self._in_literal:
                take = min(self._literal_remaining, len(buf))
                self._literal_chunks.append(bytes(buf[:take]))
                del buf[:take]
                self._literal_remaining -= take
                if self._literal_remaining == 0:
                    self._literals.append(b"".join(self._literal_chunks))
                    self._literal_chunks = []
                    self._in_literal = False
                continue
            end = buf.find(b"\r\n", self._scan_from)
            if end < 0:
                if self._line_bytes + len(buf) > self.max_line_bytes:
                    raise MailProtocolError(f"IMAP response line longer than {self.max_line_bytes} bytes")
                # A CR at the very end may be completed by the next feed.
                self._scan_from = max(0, len(buf) - 1)
                break
            self._scan_from = 0
            line = bytes(buf[:end])
            del buf[: end + 2]
            self._line_bytes += end + 2
            if self._line_bytes > self.max_line_bytes:
                raise MailProtocolError(f"IMAP response line longer than {self.max_line_bytes} bytes")
            literal_size = self._literal_size(line)
            self._lines.append(line)
            if literal_size is None:
                out.append(_parse_response(self._lines, self._literals))
                self._lines = []
                self._literals = []
                self._line_bytes = 0
                self._literal_bytes = 0
                continue
            self._literal_bytes += literal_size
            if literal_size > self.max_literal_bytes or self._literal_bytes > self.max_literal_bytes:
                raise MailProtocolError(f"IMAP literal larger than {self.max_literal_bytes} bytes")
            if self._answer_bytes + literal_size > self.max_answer_bytes:
                raise MailProtocolError(
                    f"IMAP answer with more than {self.max_answer_bytes} bytes of literals"
                )
            if not self.budget.take(literal_size):
                raise MailProtocolError(
                    f"IMAP literals buffered by this process would exceed {self.budget.limit} bytes"
                )
            self._answer_bytes += literal_size
            if literal_size == 0:
                self._literals.append(b"")
            else:
                self._in_literal = True
                self._literal_remaining = literal_size
        if not buf:
            # Drop the (possibly large) allocation so an idle session holds nothing.
            self._buffer = bytearray()
            self._scan_from = 0
        return out

    def _literal_size(self, line: bytes) -> int | None:
        """The size announced by a ``{n}``/``{n+}`` at the end of ``line``, if it has one."""
        if not line.endswith(b"}"):
            return None
        if not self._lines and not _may_carry_literals(line):
            return None
        start = line.rfind(b"{")
        if start < 0:
            return None
        digits = line[start + 1 : -1]
        if digits.endswith(b"+"):
            digits = digits[:-1]
        if not digits.isdigit() or len(digits) > _MAX_NUMBER_DIGITS:
            return None
        return int(digits)


def _may_carry_literals(first_line: bytes) -> bool:
    """Continuations and status responses (OK/NO/BAD/BYE/PREAUTH) are single lines by grammar."""
    if first_line.startswith(b"+"):
        return False
    parts = first_line.split(b" ", 3)
    if len(parts) < 2:
        return True
    kind = parts[1]
    if parts[0] == b"*" and kind.isdigit() and len(parts) > 2:
        kind = parts[2]
    return kind.upper() not in _STATUS_TYPES_BYTES


class _Cursor:
    """Walks the lines and literals of one complete response."""

    __slots__ = ("index", "line", "lines", "literals", "pos")

    def __init__(self, lines: list[bytes], literals: list[bytes]) -> None:
        self.lines = lines
        self.literals = literals
        self.index = 0
        self.line = lines[0]
        self.pos = 0

    def at_line_end(self) -> bool:
        return self.pos >= len(self.line)

    def at_end(self) -> bool:
        return self.at_line_end() and self.index == len(self.lines) - 1

    def peek(self) -> int | None:
        return self.line[self.pos] if self.pos < len(self.line) else None

    def skip_spaces(self) -> None:
        line = self.line
        while self.pos < len(line) and line[self.pos] == _SP:
            self.pos += 1

    def expect_space(self) -> None:
        if self.peek() != _SP:
            raise _error(f"expected a space at offset {self.pos}")
        self.pos += 1

    def token(self) -> bytes:
        """Bytes up to the next space or the end of the line."""
        end = self.line.find(b" ", self.pos)
        if end < 0:
            end = len(self.line)
        token = self.line[self.pos : end]
        self.pos = end
        return token

    def rest(self) -> bytes:
        rest = self.line[self.pos :]
        self.pos = len(self.line)
        return rest

    def values_to_end(self) -> list[Value]:
        values: list[Value] = []
        while True:
            self.skip_spaces()
            if self.at_end():
                return values
            if self.at_line_end():
                raise _error("literal announced in an unexpected place")
            values.append(self.value(0))

    def value(self, depth: int) -> Value:
        byte = self.peek()
        if byte is None:
            raise _error("unexpected end of response")
        if byte == _LPAREN:
            return self.parenthesized(depth + 1)
        if byte == _DQUOTE:
            return self.quoted()
        if byte == _LBRACE or (byte == _TILDE and self.line[self.pos + 1 : self.pos + 2] == b"{"):
            return self.literal()
        if byte == _RPAREN:
            raise _error("unexpected ')'")
        return self.atom()

    def parenthesized(self, depth: int) -> list[Value]:
        if depth > MAX_NESTING:
            raise _error("lists nested too deeply")
        self.pos += 1
        items: list[Value] = []
        while True:
            self.skip_spaces()
            byte = self.peek()
            if byte is None:
                raise _error("unterminated list")
            if byte == _RPAREN:
                self.pos += 1
                return items
            items.append(self.value(depth))

    def quoted(self) -> bytes:
        line = self.line
        pos = self.pos + 1
        out = bytearray()
        while True:
            if pos >= len(line):
                raise _error("unterminated quoted string")
            byte = line[pos]
            if byte == _DQUOTE:
                self.pos = pos + 1
                return bytes(out)
            if byte == _BACKSLASH:
                pos += 1
                if pos >= len(line):
                    raise _error("unterminated quoted string")
                byte = line[pos]
            out.append(byte)
            pos += 1

    def literal(self) -> bytes:
        line = self.line
        start = self.pos + (1 if line[self.pos] == _TILDE else 0)
        if not line.endswith(b"}") or line.rfind(b"{") != start:
            raise _error("literal marker must end the line")
        if self.index >= len(self.literals):
            raise _error("literal data missing")
        data = self.literals[self.index]
        self.index += 1
        self.line = self.lines[self.index]
        self.pos = 0
        return data

    def atom(self) -> int | str | None:
        line = self.line
        start = pos = self.pos
        depth = 0
        while pos < len(line):
            byte = line[pos]
            if byte == _LBRACKET:
                depth += 1
            elif byte == _RBRACKET:
                if depth == 0:
                    break
                depth -= 1
            elif depth == 0 and byte in (_SP, _LPAREN, _RPAREN):
                break
            pos += 1
        if depth:
            raise _error("unterminated '['")
        if pos == start:
            raise _error(f"expected a value at offset {start}")
        self.pos = pos
        token = line[start:pos]
        if token.isdigit():
            if len(token) > _MAX_NUMBER_DIGITS:
                raise _error("number too large")
            return int(token)
        if token.upper() == b"NIL":
            return None
        return token.decode("utf-8", "replace")


def _decode_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _parse_response(lines: list[bytes], literals: list[bytes]) -> Response:
    first = lines[0]
    if first.startswith(b"+"):
        text = first[1:]
        if text.startswith(b" "):
            text = text[1:]
        return Response(ResponseKind.CONTINUATION, "+", text=_decode_text(text))
    cursor = _Cursor(lines, literals)
    raw_tag = cursor.token()
    if not raw_tag:
        raise _error("empty tag")
    if not raw_tag.isascii():
        raise _error("non-ASCII tag")
    tag = raw_tag.decode("ascii")
    cursor.expect_space()
    if tag == "*":
        response = Response(ResponseKind.UNTAGGED, tag)
        kind = cursor.token()
        if kind.isdigit():
            if len(kind) > _MAX_NUMBER_DIGITS:
                raise _error("number too large")
            response.number = int(kind)
            cursor.expect_space()
            kind = cursor.token()
    else:
        response = Response(ResponseKind.TAGGED, tag)
        kind = cursor.token()
    if not kind or not kind.isascii():
        raise _error("missing or invalid response type")
    response.type = kind.decode("ascii").upper()
    if response.type in STATUS_TYPES:
        _parse_resp_text(cursor, response)
    elif response.kind is ResponseKind.TAGGED:
        raise _error(f"tagged response must be OK, NO or BAD, not {response.type[:20]!r}")
    else:
        response.data = cursor.values_to_end()
    return response


def _parse_resp_text(cursor: _Cursor, response: Response) -> None:
    rest = cursor.rest()
    if rest.startswith(b" "):
        rest = rest[1:]
    if rest.startswith(b"["):
        close = rest.find(b"]")
        if close < 0:
            raise _error("unterminated response code")
        inner = rest[1:close]
        code, _, args = inner.partition(b" ")
        if not code or not code.isascii():
            raise _error("empty or invalid response code")
        response.code = code.decode("ascii").upper()
        if args:
            response.code_args = _parse_code_args(args)
        rest = rest[close + 1 :]
        if rest.startswith(b" "):
            rest = rest[1:]
    response.text = _decode_text(rest)


def _parse_code_args(args: bytes) -> list[Value]:
    """Response code arguments; free-form ones (``[WEBALERT url]``) are kept as one string."""
    try:
        return _Cursor([args], []).values_to_end()
    except MailProtocolError:
        return [_decode_text(args)]


# ---------------------------------------------------------------------------------------------
# Helpers over parsed values


def fetch_attributes(response: Response) -> dict[str, Value]:
    """The ``name value`` pairs of a ``* n FETCH (...)`` response, names upper-cased."""
    if response.type != "FETCH" or len(response.data) != 1 or not isinstance(response.data[0], list):
        raise MailProtocolError("malformed FETCH response")
    items = response.data[0]
    if len(items) % 2:
        raise MailProtocolError("malformed FETCH response: odd number of items")
    attributes: dict[str, Value] = {}
    for i in range(0, len(items), 2):
        name = items[i]
        if not isinstance(name, str):
            raise MailProtocolError("malformed FETCH response: item name is not an atom")
        attributes[name.upper()] = items[i + 1]
    return attributes


_MONTHS = {
    name: number
    for number, name in enumerate(
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), 1
    )
}


def parse_internal_date(value: Value) -> datetime:
    """``"17-Jul-1996 02:44:25 -0700"`` (day may be space-padded) to an aware datetime."""
    if not isinstance(value, bytes | str):
        raise MailProtocolError("INTERNALDATE is not a string")
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    try:
        date_part, time_part, zone = text.strip().split()
        day, month, year = date_part.split("-")
        hour, minute, second = (int(x) for x in time_part.split(":"))
        if len(zone) != 5 or zone[0] not in "+-" or not zone[1:].isdigit():
            raise ValueError(zone)
        offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[3:5]))
        tz = timezone(-offset if zone[0] == "-" else offset)
        return datetime(int(year), _MONTHS[month.upper()], int(day), hour, minute, second, tzinfo=tz)
    except (ValueError, KeyError) as exc:
        raise MailProtocolError(f"bad INTERNALDATE {text[:40]!r}") from exc


def as_text(value: Value) -> str:
    """A string-ish value (atom, quoted string or literal) as text."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    raise MailProtocolError(f"expected a string, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# Modified UTF-7 mailbox names (RFC 3501 section 5.1.3)


def encode_mailbox_name(name: str) -> bytes:
    """Mailbox name in modified UTF-7: printable ASCII stays, ``&`` becomes ``&-``."""
    out = bytearray()
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.extend(b"&" + base64.b64encode(raw).rstrip(b"=").replace(b"/", b",") + b"-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.extend(b"&-" if char == "&" else char.encode("ascii"))
        else:
            pending.append(char)
    flush()
    return bytes(out)


def decode_mailbox_name(raw: bytes | str) -> str:
    """Inverse of :func:`encode_mailbox_name`; malformed sequences are kept as they are."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if "&" not in text:
        return text
    out: list[str] = []
    pos = 0
    while pos < len(text):
        amp = text.find("&", pos)
        if amp < 0:
            out.append(text[pos:])
            break
        out.append(text[pos:amp])
        dash = text.find("-", amp)
        if dash < 0:
            out.append(text[amp:])
            break
        chunk = text[amp + 1 : dash]
        if not chunk:
            out.append("&")
        else:
            try:
                padded = chunk.replace(",", "/") + "=" * (-len(chunk) % 4)
                out.append(base64.b64decode(padded, validate=True).decode("utf-16-be"))
            except (binascii.Error, UnicodeDecodeError, ValueError):
                out.append(text[amp : dash + 1])
        pos = dash + 1
    return "".join(out)


__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "DEFAULT_MAX_LITERAL_BYTES",
    "STATUS_TYPES",
    "Response",
    "ResponseKind",
    "ResponseParser",
    "Value",
    "as_text",
    "decode_mailbox_name",
    "encode_mailbox_name",
    "fetch_attributes",
    "parse_internal_date",
]
