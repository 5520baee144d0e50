"""The conversion's shortcuts give exactly what the general code gives: a single-part message's
header block parsed alone (``mime._parse``) and simple address lists read without
``email.utils.getaddresses`` (``mime._simple_addresses``)."""

from __future__ import annotations

from email import utils as email_utils
from email.message import Message
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emlisten.mail import mime
from emlisten.mail.mime import to_email
from emlisten.models import RawMessage

CORPUS = Path(__file__).parent / "corpus"


def _shape(message: Message) -> object:
    """Everything the conversion reads from a parsed message, as comparable data."""

    payload = message._payload  # type: ignore[attr-defined]
    if isinstance(payload, list):
        payload = [_shape(part) for part in payload]
    return (
        list(message.raw_items()),
        payload,
        message.preamble,
        message.epilogue,
        [type(defect) for defect in message.defects],
        message.get_unixfrom(),
    )


def _assert_same(data: bytes) -> None:
    assert _shape(mime._parse(data)) == _shape(mime._PARSER.parsebytes(data))


def _full_parse_email(data: bytes, monkeypatch: pytest.MonkeyPatch) -> object:
    with monkeypatch.context() as patched:
        patched.setattr(mime, "_parse", mime._PARSER.parsebytes)
        patched.setattr(mime, "_simple_addresses", lambda values: None)
        return to_email(RawMessage(uid=1, data=data), email_id="x")


_HEADERS = [
    b"From: A <a@example.com>",
    b"To: b@example.com, C D <c@example.com>",
    b'To: "Doe, J" <j@example.com>',
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=",
    b"Subject: folded\r\n continued",
    b"Subject: folded\n\tcontinued",
    b"Content-Type: text/plain; charset=utf-8",
    b"Content-Type: text/html",
    b'Content-Type: multipart/mixed; boundary="b1"',
    b"Content-Type: multipart/alternative; boundary=b1",
    b"Content-Type: multipart",
    b"Content-Type: message/rfc822",
    b"Content-Type: message/delivery-status",
    b"Content-Type: application/pdf; name=x.pdf",
    b"Content-Type: text/plain; charset=\xff",
    b"Content-Transfer-Encoding: base64",
    b"Content-Transfer-Encoding: quoted-printable",
    b"X-Raw: caf\xc3\xa9 \xe9",
    b"not a header line",
    b"From someone@example.com Mon Jan  1 00:00:00 2024",
    b" leading continuation",
    b"",
]
_BODY = [
    b"Hello\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b"--b1\r\nContent-Type: text/plain\r\n\r\npart one\r\n",
    b"--b1--\r\n",
    b"SGVsbG8=\r\n",
    b"caf=C3=A9=\r\n",
    b"\xff\xfe raw 8-bit\r\n",
    b"From: inner@example.com\r\nSubject: inner\r\n\r\ninner body\r\n",
    b"line without end",
]
_SEPARATORS = [b"\r\n", b"\n", b"\r", b"\r\r\n"]


@st.composite
def _messages(draw: st.DrawFn) -> bytes:
    headers = draw(st.lists(st.sampled_from(_HEADERS), max_size=8))
    newline = draw(st.sampled_from(_SEPARATORS))
    blank = draw(st.sampled_from(_SEPARATORS))
    body = b"".join(draw(st.lists(st.sampled_from(_BODY), max_size=10)))
    return newline.join(headers) + newline + blank + body


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_messages())
def test_parse_equals_the_full_parse(data: bytes) -> None:
    _assert_same(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_parse_equals_the_full_parse_on_junk(data: bytes) -> None:
    _assert_same(data)


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.eml")), ids=lambda p: p.name)
def test_corpus_converts_as_before(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for data in (path.read_bytes(), path.read_bytes().replace(b"\n", b"\r\n")):
        _assert_same(data)
        assert to_email(RawMessage(uid=1, data=data), email_id="x") == _full_parse_email(data, monkeypatch)


def test_single_part_mail_converts_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    data = (
        b"From: Bench Sender <sender@example.test>\r\nTo: rcpt@example.test, Two  Names <t@x.test>\r\n"
        b"Subject: bench\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + "Grüße\r\n".encode() * 50
    )
    assert mime._parse(data).get_payload() == mime._PARSER.parsebytes(data).get_payload()
    converted = to_email(RawMessage(uid=1, data=data), email_id="x")
    assert converted == _full_parse_email(data, monkeypatch)
    assert converted.recipients == ["rcpt@example.test", '"Two Names" <t@x.test>']
    assert converted.body.startswith("Grüße\n")


_ADDRESS_TEXT = st.text(alphabet=' \tab.@<>,"()\\;:[]=?_-!~\u00e9', max_size=40)
_ADDRESS_PIECES = st.lists(
    st.sampled_from(
        [
            "a@b.c",
            "x.y@example.com",
            "Name <n@example.com>",
            "Two  Names\t<t@x>",
            "=?utf-8?b?w6k=?= <e@x>",
            " spaced@x ",
            '"Quoted, Name" <q@x>',
            "John Q. Public <j@x>",
            "(comment) c@x",
            "group: g@x;",
            "bare",
            "",
            "a@[127.0.0.1]",
            "<angle@x>",
            "Name <a@x",
        ]
    ),
    min_size=1,
    max_size=4,
).map(", ".join)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.one_of(_ADDRESS_TEXT, _ADDRESS_PIECES), min_size=1, max_size=3))
def test_simple_addresses_equal_getaddresses(values: list[str]) -> None:
    fast = mime._simple_addresses(values)
    if fast is not None:
        assert fast == email_utils.getaddresses(values)


def test_simple_addresses_take_the_common_forms() -> None:
    assert mime._simple_addresses(["Bench Sender <sender@example.test>", "b@x, C <c@y.z>"]) == [
        ("Bench Sender", "sender@example.test"),
        ("", "b@x"),
        ("C", "c@y.z"),
    ]
    for other in ('"Doe, J" <j@x>', "undisclosed-recipients:;", "a@b,", "J. Doe <j@x>"):
        assert mime._simple_addresses([other]) is None
