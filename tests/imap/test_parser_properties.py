"""Property tests of the response parser: it never crashes, never over-buffers, round-trips."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from emlisten.errors import MailProtocolError
from emlisten.mail.imap._parser import (
    Response,
    ResponseKind,
    ResponseParser,
    Value,
    decode_mailbox_name,
    encode_mailbox_name,
)
from tests.imap.test_parser import DOVECOT_SESSION

MAX_LINE = 300
MAX_LITERAL = 500

# -- generating valid responses ---------------------------------------------------------------

atoms = st.from_regex(r"\\?[A-Za-z][A-Za-z0-9.\-]{0,15}", fullmatch=True).filter(lambda a: a.upper() != "NIL")
section_atoms = st.sampled_from(
    ["BODY[]", "BODY[TEXT]", "BODY[1.2.MIME]", "BODY[HEADER.FIELDS (SUBJECT FROM)]", "BODY[]<0>"]
)
numbers = st.integers(min_value=0, max_value=2**63)
strings = st.binary(max_size=80)


def values(max_leaves: int = 12) -> st.SearchStrategy[Value]:
    leaves: st.SearchStrategy[Value] = st.one_of(st.none(), numbers, atoms, section_atoms, strings)
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=5), max_leaves=max_leaves)


def encode(value: Value) -> bytes:
    """Serialize a value the way a server would (quoted when possible, else a literal)."""
    if value is None:
        return b"NIL"
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes):
        if all(0x20 <= b < 0x7F for b in value) and len(value) < 40:
            return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        return b"{%d}\r\n" % len(value) + value
    return b"(" + b" ".join(encode(v) for v in value) + b")"


printable_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).filter(
    lambda t: not t.startswith(("[", " "))
)


@st.composite
def data_responses(draw: st.DrawFn) -> tuple[bytes, Response]:
    items = draw(st.lists(values(), max_size=6))
    if draw(st.booleans()):
        number = draw(st.integers(min_value=0, max_value=10**9))
        kind = draw(st.sampled_from(["FETCH", "EXISTS", "EXPUNGE", "X-CUSTOM"]))
        head = b"* %d %s" % (number, kind.encode())
    else:
        number = None
        kind = draw(st.sampled_from(["SEARCH", "LIST", "FLAGS", "CAPABILITY", "X-CUSTOM"]))
        head = b"* " + kind.encode()
    wire = head + b"".join(b" " + encode(v) for v in items) + b"\r\n"
    expected = Response(ResponseKind.UNTAGGED, "*", type=kind, number=number, data=items)
    return wire, expected


@st.composite
def status_responses(draw: st.DrawFn) -> tuple[bytes, Response]:
    tagged = draw(st.booleans())
    tag = draw(st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,6}", fullmatch=True)) if tagged else "*"
    kind = draw(st.sampled_from(["OK", "NO", "BAD"] + ([] if tagged else ["BYE", "PREAUTH"])))
    code = draw(st.none() | st.from_regex(r"[A-Z][A-Z0-9\-]{0,12}", fullmatch=True))
    args: list[Value] = []
    if code is not None:
        args = draw(st.lists(st.one_of(numbers, atoms, st.lists(atoms, max_size=3)), max_size=3))
    text = draw(printable_text)
    wire = tag.encode() + b" " + kind.encode()
    if code is not None:
        wire += b" [" + code.encode() + b"".join(b" " + encode(a) for a in args) + b"]"
    if text or code is None:
        wire += b" " + text.encode()
    elif draw(st.booleans()):
        wire += b" "
    expected = Response(
        ResponseKind.TAGGED if tagged else ResponseKind.UNTAGGED,
        tag,
        type=kind,
        code=code,
        code_args=args,
        text=text,
    )
    return wire + b"\r\n", expected


@st.composite
def continuations(draw: st.DrawFn) -> tuple[bytes, Response]:
    text = draw(printable_text)
    return b"+ " + text.encode() + b"\r\n", Response(ResponseKind.CONTINUATION, "+", text=text)


transcripts = st.lists(st.one_of(data_responses(), status_responses(), continuations()), max_size=8)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points:
        pieces.append(data[last:point])
        last = point
    pieces.append(data[last:])
    return pieces


# -- properties -------------------------------------------------------------------------------


@given(transcript=transcripts, cuts=st.lists(st.integers(min_value=0), max_size=20))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_in_any_chunking(transcript: list[tuple[bytes, Response]], cuts: list[int]) -> None:
    wire = b"".join(w for w, _ in transcript)
    parser = ResponseParser()
    parsed: list[Response] = []
    for piece in split(wire, cuts):
        parsed.extend(parser.feed(piece))
    assert parsed == [expected for _, expected in transcript]
    assert parser.idle


@given(transcript=transcripts, cut=st.integers(min_value=0))
@settings(max_examples=200)
def test_truncated_valid_transcript_never_errors(transcript: list[tuple[bytes, Response]], cut: int) -> None:
    wire = b"".join(w for w, _ in transcript)
    cut %= len(wire) + 1
    parser = ResponseParser()
    parsed = parser.feed(wire[:cut])
    assert parsed == [expected for _, expected in transcript][: len(parsed)]
    assert parser.feed(wire[cut:]) == [expected for _, expected in transcript][len(parsed) :]


@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(min_value=0), max_size=10))
@settings(max_examples=500)
@example(data=b"* 1 FETCH (BODY[] {400}\r\n" + b"x" * 400, cuts=[])
@example(data=b"* SEARCH" + b" 1" * 200, cuts=[3])
@example(data=b"(" * 1000 + b"\r\n", cuts=[])
def test_random_bytes_only_raise_protocol_error_and_stay_bounded(data: bytes, cuts: list[int]) -> None:
    parser = ResponseParser(max_line_bytes=MAX_LINE, max_literal_bytes=MAX_LITERAL)
    try:
        for piece in split(data, cuts):
            parser.feed(piece)
            assert parser.buffered_bytes <= MAX_LINE + MAX_LITERAL
    except MailProtocolError:
        pass


@given(
    prefix=st.binary(max_size=200),
    noise=st.binary(max_size=200),
    cut=st.integers(min_value=0, max_value=len(DOVECOT_SESSION)),
)
@settings(max_examples=300)
def test_mutated_transcripts_only_raise_protocol_error(prefix: bytes, noise: bytes, cut: int) -> None:
    data = prefix + DOVECOT_SESSION[:cut] + noise + DOVECOT_SESSION[cut:]
    parser = ResponseParser(max_line_bytes=4096, max_literal_bytes=4096)
    try:
        parser.feed(data)
        assert parser.buffered_bytes <= 8192
    except MailProtocolError:
        pass


@given(st.text(max_size=30))
def test_mailbox_names_round_trip(name: str) -> None:
    wire = encode_mailbox_name(name)
    assert wire.isascii()
    assert decode_mailbox_name(wire) == name
