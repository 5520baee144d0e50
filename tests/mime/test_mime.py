# ruff: noqa: RUF001 -- non-ASCII look-alike characters are this module's test data
"""emlisten.mail.mime.to_email: exact results on a hand-written corpus and on built messages."""

from __future__ import annotations

import base64
import json
import textwrap
import tracemalloc
import uuid
from dataclasses import asdict
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emlisten.mail import mime
from emlisten.mail.mime import decode_words, to_email
from emlisten.models import Attachment, Email, Importance, RawMessage

CORPUS = Path(__file__).parent / "corpus"
EMAIL_ID = "8d6f0c1e-0000-4000-8000-000000000001"


def corpus(name: str) -> bytes:
    """A corpus file with CRLF line ends, as IMAP delivers it (the files are stored with LF)."""

    return (CORPUS / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def mail(text: str, *, encoding: str = "utf-8") -> bytes:
    return textwrap.dedent(text).lstrip("\n").replace("\n", "\r\n").encode(encoding)


def convert(data: bytes, *, internal_date: datetime | None = None, **kwargs: int) -> Email:
    return to_email(RawMessage(uid=7, data=data, internal_date=internal_date), email_id=EMAIL_ID, **kwargs)


def attachment_id(index: int) -> str:
    return str(uuid.uuid5(mime._ATTACHMENT_NAMESPACE, f"{EMAIL_ID}/{index}"))


def as_json(email: Email) -> str:
    """What a sink would send: must succeed (no lone surrogates) for any input."""

    data = asdict(email)
    for attachment in data["attachments"]:
        attachment["data"] = base64.b64encode(attachment["data"]).decode()
    data["send_date"] = email.send_date.isoformat() if email.send_date else None
    return json.dumps(data, ensure_ascii=False)


# --- corpus ----------------------------------------------------------------------------------


def test_plain_ascii_every_field() -> None:
    email = convert(corpus("plain_ascii.eml"))

    assert email == Email(
        id=EMAIL_ID,
        subject="Quarterly report, folded over two lines",
        body="Hi Bob,\n\nthe report is attached.\n\n-- \nAlice\n",
        is_html_body=False,
        sender='"Alice Example" <alice@example.com>',
        recipients=['"Bob" <bob@example.org>', "carol@example.org"],
        copy_recipients=['"Dave, Jr." <dave@example.net>'],
        blind_copy_recipients=[],
        headers=[
            ("Return-Path", "<alice@example.com>"),
            (
                "Received",
                "from mx.example.com (mx.example.com [192.0.2.1])\tby imap.example.org with"
                " ESMTP id 12345\tfor <bob@example.org>; Tue, 01 Jul 2025 10:00:05 +0200",
            ),
            ("From", "Alice Example <alice@example.com>"),
            ("To", "Bob <bob@example.org>, carol@example.org"),
            ("Cc", '"Dave, Jr." <dave@example.net>'),
            ("Subject", "Quarterly report, folded over two lines"),
            ("Date", "Tue, 01 Jul 2025 10:00:00 +0200"),
            ("Message-ID", "<20250701100000.1234@example.com>"),
            ("In-Reply-To", "<prev-1@example.org>"),
            ("References", "<root-0@example.org> <prev-1@example.org>"),
            ("MIME-Version", "1.0"),
            ("Content-Type", "text/plain; charset=us-ascii"),
            ("Content-Transfer-Encoding", "7bit"),
        ],
        importance=Importance.NORMAL,
        attachments=[],
        send_date=datetime(2025, 7, 1, 8, 0, tzinfo=UTC),
        message_id="<20250701100000.1234@example.com>",
        in_reply_to="<prev-1@example.org>",
        references=["<root-0@example.org>", "<prev-1@example.org>"],
        truncated=False,
    )
    assert email.send_date is not None and email.send_date.tzinfo is UTC


def test_bare_lf_line_ends_give_the_same_email() -> None:
    crlf = convert(corpus("plain_ascii.eml"))
    lf = convert(corpus("plain_ascii.eml").replace(b"\r\n", b"\n"))

    assert lf == crlf


def test_multipart_alternative_prefers_html() -> None:
    email = convert(corpus("alternative.eml"))

    assert email.body == "<html><body><p>HTML version: café</p></body></html>"
    assert email.is_html_body is True
    assert email.attachments == []
    assert email.sender == "news@example.com"
    assert email.send_date == datetime(2025, 7, 2, 12, 30, tzinfo=UTC)


def test_alternative_without_html_takes_plain() -> None:
    data = mail(
        """
        Content-Type: multipart/alternative; boundary=x

        --x
        Content-Type: text/plain

        only plain
        --x
        Content-Type: text/enriched

        <bold>rich</bold>
        --x--
        """
    )
    email = convert(data)

    assert (email.body, email.is_html_body) == ("only plain", False)
    # text/enriched is neither body type: it is kept, not lost
    assert [(a.name, a.content_type, a.data) for a in email.attachments] == [
        ("attachment-2.bin", "text/enriched", b"<bold>rich</bold>")
    ]


def test_nested_mixed_related_alternative_with_inline_cid_image() -> None:
    email = convert(corpus("nested_related.eml"))

    assert email.body == '<p>See the logo below.</p><img src="cid:logo.png@01DB0000">'
    assert email.is_html_body is True
    assert email.sender == '"Designer" <design@example.com>'
    # parts: 0 mixed, 1 related, 2 alternative, 3 plain, 4 html, 5 png, 6 gif, 7 pdf
    assert email.attachments == [
        Attachment(
            id=attachment_id(5),
            name="logo.png",
            data=base64.b64decode(
                "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9"
                "awAAAABJRU5ErkJggg=="
            ),
            content_type="image/png",
            is_inline=True,
            content_id="logo.png@01DB0000",
        ),
        Attachment(
            id=attachment_id(6),
            name="attachment-6.gif",
            data=base64.b64decode("R0lGODlhAQABAAAAACw="),
            content_type="image/gif",
            is_inline=False,  # in the related part, but the body never references it
            content_id="unused@01DB0000",
        ),
        Attachment(
            id=attachment_id(7),
            name="spec.pdf",
            data=b"%PDF-1.4\n%\xc7\xec\x8f\xa2\n%%EOF\n",
            content_type="application/pdf",
            is_inline=False,
            content_id=None,
        ),
    ]


def test_rfc2231_rfc2047_and_missing_attachment_names() -> None:
    email = convert(corpus("rfc2231_filename.eml"))

    assert email.subject == "Отчёт"  # windows-1251 encoded word
    assert email.body == "Отчёт во вложении."
    assert email.send_date == datetime(2025, 7, 4, 6, 15, tzinfo=UTC)
    assert [(a.id, a.name, a.content_type, a.data, a.is_inline) for a in email.attachments] == [
        (attachment_id(2), "Отчёт 2025.pdf", "application/pdf", b"%PDF-1.4\n", False),
        (attachment_id(3), "Данные.csv", "text/csv", b"a,b\r\n1,2", False),  # filename*0*/*1*
        (attachment_id(4), "Договор.docx", "application/octet-stream", b"PK\x03\x04", False),
        (attachment_id(5), "attachment-5.bin", "application/octet-stream", b"\x00\x01\x02", False),
    ]


def test_message_rfc822_attachment_keeps_inner_bytes() -> None:
    data = corpus("forwarded.eml")
    inner_start = data.index(b"From: chef@example.net")
    inner_end = data.index(b"\r\n--outer--")
    email = convert(data)

    assert email.body == "See below."
    assert email.attachments == [
        Attachment(
            id=attachment_id(2),
            name="Lunch — today.eml",
            data=data[inner_start:inner_end],
            content_type="message/rfc822",
        )
    ]


def test_message_rfc822_without_subject_and_base64_encoded() -> None:
    inner = b"From: a@example.com\r\nTo: b@example.com\r\n\r\nno subject here\r\n"
    with_subject = inner.replace(b"To:", b"Subject: Hi/there\r\nTo:")
    encoded = base64.b64encode(with_subject).decode()
    data = mail(
        f"""
        Content-Type: multipart/mixed; boundary=zz

        --zz
        Content-Type: message/rfc822

        From: a@example.com
        To: b@example.com

        no subject here

        --zz
        Content-Type: message/rfc822
        Content-Transfer-Encoding: base64

        {encoded}
        --zz--
        """
    )
    email = convert(data)

    assert [(a.name, a.data) for a in email.attachments] == [
        ("attachment-1.eml", inner),
        ("Hi_there.eml", with_subject),
    ]
    assert email.body == ""


def test_missing_closing_boundary_keeps_what_is_there() -> None:
    email = convert(corpus("broken_boundary.eml"))

    assert email.subject == "No closing boundary"
    assert email.body == "First part text."
    assert [(a.name, a.data) for a in email.attachments] == [("cut.bin", bytes(range(9)))]


# --- charsets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["Привет, мир! Съешь же ещё этих булок.", "你好，世界。邮件测试", "Party 🎉🥳 tonight 👍🏽", "ascii"],
)
@pytest.mark.parametrize("transfer_encoding", ["8bit", "base64", "quoted-printable"])
def test_utf8_bodies(text: str, transfer_encoding: str) -> None:
    encoded = text.encode("utf-8")
    if transfer_encoding == "base64":
        payload = base64.encodebytes(encoded)
    elif transfer_encoding == "quoted-printable":
        import quopri

        payload = quopri.encodestring(encoded)
    else:
        payload = encoded
    data = (
        mail(
            f"""
            Subject: =?UTF-8?B?{base64.b64encode(encoded).decode()}?=
            Content-Type: text/plain; charset="UTF-8"
            Content-Transfer-Encoding: {transfer_encoding}

            """
        )
        + payload
    )
    email = convert(data)

    assert email.subject == text
    assert email.body == text


def test_iso_8859_1_quoted_printable() -> None:
    data = mail(
        """
        Subject: =?ISO-8859-1?Q?Gr=FC=DFe_aus_K=F6ln?=
        Content-Type: text/plain; charset=iso-8859-1
        Content-Transfer-Encoding: quoted-printable

        Gr=FC=DFe aus K=F6ln, =E7a va? =D1and=FA =A9 2025
        """
    )
    email = convert(data)

    assert email.subject == "Grüße aus Köln"
    assert email.body == "Grüße aus Köln, ça va? Ñandú © 2025\n"


def test_koi8r_8bit_body() -> None:
    data = mail(
        """
        Subject: =?koi8-r?B?8NLJ18XU?=
        Content-Type: text/plain; charset=KOI8-R
        Content-Transfer-Encoding: 8bit

        """
    ) + "Привет из КОИ-8.\r\n".encode("koi8-r")
    email = convert(data)

    assert email.subject == "Привет"
    assert email.body == "Привет из КОИ-8.\n"


def test_windows_1251_and_split_utf8_encoded_words() -> None:
    cp1251 = base64.b64encode("Счёт №15".encode("cp1251")).decode()
    utf8 = "Ёлка".encode()
    first, second = base64.b64encode(utf8[:3]).decode(), base64.b64encode(utf8[3:]).decode()
    data = mail(
        f"""
        Subject: Re: =?windows-1251?B?{cp1251}?=
         =?utf-8?B?{first}?= =?utf-8?B?{second}?= end
        To: =?utf-8?Q?J=C3=B6rg_M=C3=BCller?= <jm@example.de>

        x
        """
    )
    email = convert(data)

    # whitespace between encoded words vanishes; the split UTF-8 sequence is rejoined
    assert email.subject == "Re: Счёт №15Ёлка end"
    assert email.headers == [
        ("Subject", "Re: Счёт №15Ёлка end"),
        ("To", "Jörg Müller <jm@example.de>"),
    ]
    assert email.recipients == ['"Jörg Müller" <jm@example.de>']


@pytest.mark.parametrize(
    ("encoded", "decoded"),
    [
        ("=?x-unknown-charset?Q?caf=C3=A9?=", "café"),  # unknown charset: UTF-8 fallback
        ("=?utf-8?B?0J/RgNC40LLQtdGC?=", "Привет"),
        ("=?utf-8?B?0J/RgNC40LLQtdGC?=", "Привет"),
        ("=?utf-8?B?0J/RgNC40LLQtd?=", "Приве"),  # truncated base64: lenient
        ("=?utf-8*en?Q?hello_world?=", "hello world"),  # RFC 2231 language suffix
        ("=?us-ascii?Q?caf=E9?=", "café"),  # wrong charset: cp1252 fallback
        ("plain =?bogus", "plain =?bogus"),
        ("=?utf-8?q?a?= b =?utf-8?q?c?=", "a b c"),
    ],
)
def test_decode_words(encoded: str, decoded: str) -> None:
    assert decode_words(encoded) == decoded


def test_undeclared_8bit_body_and_headers() -> None:
    utf8 = mail(
        """
        Subject: Заявка №5
        From: Jürgen <j@example.de>

        Тело письма без charset.
        """
    )
    cp1252 = mail(
        """
        Subject: café – naïve

        Grüße – “quoted”
        """,
        encoding="cp1252",
    )

    utf8_email = convert(utf8)
    cp1252_email = convert(cp1252)

    assert utf8_email.subject == "Заявка №5"
    assert utf8_email.sender == '"Jürgen" <j@example.de>'
    assert utf8_email.body == "Тело письма без charset.\n"
    assert cp1252_email.subject == "café – naïve"
    assert cp1252_email.headers == [("Subject", "café – naïve")]
    assert cp1252_email.body == "Grüße – “quoted”\n"


@pytest.mark.parametrize(
    ("charset", "payload", "body"),
    [
        ("utf-8", b"caf\xe9 cr\xe8me", "café crème"),  # latin-1 bytes labelled UTF-8
        ("us-ascii", "naïve — ok".encode(), "naïve — ok"),  # UTF-8 labelled ASCII
        ("x-no-such-charset", "Ünïcödé".encode(), "Ünïcödé"),  # unknown name
        ('"utf-8"', "quoted ✓".encode(), "quoted ✓"),
        ("base64", b"not a text codec \xc3\xa9", "not a text codec é"),  # non-text codec name
        ("utf-8", b"a\x81b\x8dc\xff", "a\x81b\x8dc\xff"),  # neither UTF-8 nor cp1252: latin-1
        ("gb2312", "邮件".encode("gb18030"), "邮件"),  # mapped to its superset
        ("shift_jis", b"\x82\xa0\x82", "あ\ufffd"),  # broken: declared, replaced
    ],
)
def test_wrong_or_unknown_declared_charset(charset: str, payload: bytes, body: str) -> None:
    data = mail(f"Content-Type: text/plain; charset={charset}\n\n") + payload
    assert convert(data).body == body


def test_html_without_charset_uses_meta() -> None:
    html = '<html><head><meta charset="windows-1251"></head><body>Привет</body></html>'
    data = mail("Content-Type: text/html\n\n") + html.encode("cp1251")
    email = convert(data)

    assert (email.body, email.is_html_body) == (html, True)


def test_quoted_printable_soft_line_breaks() -> None:
    data = mail(
        """
        Content-Type: text/plain; charset=utf-8
        Content-Transfer-Encoding: quoted-printable

        This line is long and was wrapped by the encoder =
        and continues here, with an equals sign =3D and caf=C3=
        =A9 split mid-character.
        Second line.=
        """
    )
    assert convert(data).body == (
        "This line is long and was wrapped by the encoder and continues here, "
        "with an equals sign = and café split mid-character.\nSecond line."
    )


# --- addresses, ids, dates, importance -------------------------------------------------------


def test_address_lists_groups_and_display_names() -> None:
    data = mail(
        """
        From: "Smith, John \\"JJ\\"" <john@example.com>
        To: Team: a@example.com, "B B" <b@example.com>;, c@example.com
        To: =?utf-8?B?0JDQvdC90LA=?= <anna@example.ru>
        Cc: undisclosed-recipients:;
        Bcc: hidden@example.com, <angle@example.com>

        x
        """
    )
    email = convert(data)

    assert email.sender == '"Smith, John \\"JJ\\"" <john@example.com>'
    assert email.recipients == [
        "a@example.com",
        '"B B" <b@example.com>',
        "c@example.com",
        '"Анна" <anna@example.ru>',
    ]
    assert email.copy_recipients == []
    assert email.blind_copy_recipients == ["hidden@example.com", "angle@example.com"]


def test_sender_header_when_from_is_missing() -> None:
    assert convert(mail("Sender: Bot <bot@example.com>\n\nx")).sender == '"Bot" <bot@example.com>'
    assert convert(mail("Subject: none\n\nx")).sender == ""


def test_message_ids_whitespace_and_references() -> None:
    data = mail(
        """
        Message-ID:
          <id-1@example.com>
        In-Reply-To:   <parent@example.com>
        References: <a@example.com>
        \t<b@example.com><c@example.com>
          <d@example.com>

        x
        """
    )
    email = convert(data)

    assert email.message_id == "<id-1@example.com>"
    assert email.in_reply_to == "<parent@example.com>"
    assert email.references == [
        "<a@example.com>",
        "<b@example.com>",
        "<c@example.com>",
        "<d@example.com>",
    ]


@pytest.mark.parametrize(
    ("date_header", "internal_date", "expected"),
    [
        ("Tue, 01 Jul 2025 10:00:00 +0200", None, datetime(2025, 7, 1, 8, 0, tzinfo=UTC)),
        ("Tue, 1 Jul 2025 10:00:00 -0000", None, datetime(2025, 7, 1, 10, 0, tzinfo=UTC)),
        ("1 Jul 25 10:00:00 GMT", None, datetime(2025, 7, 1, 10, 0, tzinfo=UTC)),
        ("Tue, 01 Jul 2025 10:00:00", None, datetime(2025, 7, 1, 10, 0, tzinfo=UTC)),
        ("Tue, 01 Jul 2025 23:59:60 +0000", None, datetime(2025, 7, 1, 23, 59, 59, tzinfo=UTC)),
        # missing Date: the server's INTERNALDATE, converted to UTC
        (
            None,
            datetime(2025, 7, 3, 9, 0, tzinfo=timezone(timedelta(hours=3))),
            datetime(2025, 7, 3, 6, 0, tzinfo=UTC),
        ),
        (None, datetime(2025, 7, 3, 9, 0), datetime(2025, 7, 3, 9, 0, tzinfo=UTC)),
        (None, None, None),
        # malformed Date: same fallbacks
        ("not a date at all", datetime(2025, 1, 2, tzinfo=UTC), datetime(2025, 1, 2, tzinfo=UTC)),
        ("Tue, 31 Feb 2025 10:00:00 +0000", None, None),
        ("Tue, 01 Jul 2025 10:00:00 +9999", None, None),
        ("", None, None),
    ],
)
def test_send_date(
    date_header: str | None, internal_date: datetime | None, expected: datetime | None
) -> None:
    header = f"Date: {date_header}\n" if date_header is not None else ""
    email = convert(mail(f"{header}Subject: d\n\nx"), internal_date=internal_date)

    assert email.send_date == expected
    if expected is not None:
        assert email.send_date is not None and email.send_date.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("headers", "importance"),
    [
        ("", Importance.NORMAL),
        ("X-Priority: 1 (Highest)", Importance.HIGH),
        ("X-Priority: 2", Importance.HIGH),
        ("X-Priority: 3 (Normal)", Importance.NORMAL),
        ("X-Priority: 4", Importance.LOW),
        ("X-Priority: 5 (Lowest)", Importance.LOW),
        ("X-Priority: junk", Importance.NORMAL),
        ("Importance: High", Importance.HIGH),
        ("Importance: low", Importance.LOW),
        ("Importance: normal\nX-Priority: 1", Importance.NORMAL),  # Importance wins
        ("X-MSMail-Priority: High", Importance.HIGH),
        ("X-MSMail-Priority: Low", Importance.LOW),
        ("Priority: urgent", Importance.HIGH),
        ("Priority: non-urgent", Importance.LOW),
        ("Importance: weird\nX-Priority: 5", Importance.LOW),  # first understood wins
    ],
)
def test_importance(headers: str, importance: Importance) -> None:
    assert convert(mail(f"{headers}\nSubject: p\n\nx".lstrip())).importance is importance


# --- attachments -----------------------------------------------------------------------------


def test_unnamed_parts_get_names_and_inline_rules() -> None:
    data = mail(
        """
        Content-Type: multipart/mixed; boundary=b

        --b
        Content-Type: text/plain

        first text
        --b
        Content-Type: image/jpeg
        Content-Disposition: inline
        Content-Transfer-Encoding: base64

        /9j/4A==
        --b
        Content-Type: text/plain

        second text
        --b
        Content-Type: text/plain; name="notes.txt"

        a named text part
        --b
        Content-Type: text/html

        <p>html after plain is dropped</p>
        --b
        Content-Type: text/calendar; method=REQUEST

        BEGIN:VCALENDAR
        --b--
        """
    )
    email = convert(data)

    assert email.body == "first text\nsecond text"
    assert [(a.id, a.name, a.content_type, a.data, a.is_inline) for a in email.attachments] == [
        # inline disposition outside multipart/related: still listed as a normal attachment
        (attachment_id(2), "attachment-2.jpg", "image/jpeg", b"\xff\xd8\xff\xe0", False),
        (attachment_id(4), "notes.txt", "text/plain", b"a named text part", False),
        (attachment_id(6), "attachment-6.ics", "text/calendar", b"BEGIN:VCALENDAR", False),
    ]


def test_cid_reference_marks_inline_even_outside_related() -> None:
    data = mail(
        """
        Content-Type: multipart/mixed; boundary=b

        --b
        Content-Type: text/html

        <img src="CID:Image001.PNG@X">
        --b
        Content-Type: image/png; name="image001.png"
        Content-ID: <image001.png@x>
        Content-Transfer-Encoding: base64

        iVBORw==
        --b--
        """
    )
    [attachment] = convert(data).attachments

    assert (attachment.name, attachment.is_inline, attachment.content_id) == (
        "image001.png",
        True,
        "image001.png@x",
    )


def test_related_start_parameter_and_inline_disposition() -> None:
    data = mail(
        """
        Content-Type: multipart/related; boundary=r; start="<root@x>"

        --r
        Content-Type: image/png
        Content-ID: <img@x>
        Content-Disposition: inline
        Content-Transfer-Encoding: base64

        iVBORw==
        --r
        Content-Type: text/html
        Content-ID: <root@x>

        <p>root</p>
        --r--
        """
    )
    email = convert(data)

    assert email.body == "<p>root</p>"
    assert [(a.name, a.is_inline) for a in email.attachments] == [("attachment-1.png", True)]


def test_broken_base64_attachment_is_decoded_leniently() -> None:
    data = mail(
        """
        Content-Type: multipart/mixed; boundary=b

        --b
        Content-Type: application/octet-stream; name=a.bin
        Content-Transfer-Encoding: BASE64

        AAEC*AwQ=FBg
        ===c!
        --b--
        """
    )
    [attachment] = convert(data).attachments

    assert attachment.data == base64.b64decode("AAECAwQFBgc=")


def test_attachment_ids_are_stable_uuid5() -> None:
    first = convert(corpus("nested_related.eml"))
    second = convert(corpus("nested_related.eml"))
    other = to_email(RawMessage(uid=7, data=corpus("nested_related.eml")), email_id="other")

    assert [a.id for a in first.attachments] == [a.id for a in second.attachments]
    assert first.attachments[0].id == "7ce654c2-2d7b-526e-8513-375bcebdd248"  # never change it
    assert {uuid.UUID(a.id).version for a in first.attachments} == {5}
    assert not {a.id for a in first.attachments} & {a.id for a in other.attachments}


def test_unsafe_attachment_names_are_cleaned() -> None:
    data = mail(
        """
        Content-Type: multipart/mixed; boundary=b

        --b
        Content-Type: application/pdf; name="..\\\\..\\\\evil\\x01.pdf"
        Content-Disposition: attachment; filename="../../etc/passwd"

        x
        --b
        Content-Type: application/pdf
        Content-Disposition: attachment; filename="  "

        y
        --b--
        """
    )
    assert [a.name for a in convert(data).attachments] == ["passwd", "attachment-2.pdf"]


# --- broken input, size, speed ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "subject", "body"),
    [
        (b"", "", ""),
        (b"just some text without headers", "", "just some text without headers"),
        (b"Subject: only headers\r\n", "only headers", ""),
        (
            b"Subject: no boundary\r\nContent-Type: multipart/mixed\r\n\r\nraw text\r\n",
            "no boundary",
            "raw text\n",
        ),
        (
            b"Subject: garbage\r\nContent-Type: ;;;===\r\nContent-Transfer-Encoding: \xff\r\n\r\nok",
            "garbage",
            "ok",
        ),
        (b"\x00\xff\xfe\x00Subject: x\r\n\r\n", "", "\xff\xfeSubject: x\n\n"),
    ],
)
def test_broken_messages_still_convert(data: bytes, subject: str, body: str) -> None:
    email = convert(data)

    assert (email.subject, email.body) == (subject, body)
    as_json(email)


def test_lenient_fallback_without_the_mime_parser() -> None:
    data = mail(
        """
        From ignored@mbox Tue Jul  1 10:00:00 2025
        Subject: =?utf-8?q?caf=C3=A9?=
        From: A <a@example.com>
        Date: Tue, 01 Jul 2025 10:00:00 +0000
         (folded comment)

        raw body
        """
    )
    email = mime._convert_leniently(data, RawMessage(uid=1, data=data), EMAIL_ID)

    assert email.subject == "café"
    assert email.sender == '"A" <a@example.com>'
    assert email.send_date == datetime(2025, 7, 1, 10, 0, tzinfo=UTC)
    assert email.headers == [
        ("Subject", "café"),
        ("From", "A <a@example.com>"),
        ("Date", "Tue, 01 Jul 2025 10:00:00 +0000 (folded comment)"),
    ]
    assert email.body == "raw body\n"


def test_deep_nesting_does_not_raise() -> None:
    depth = 3000
    opening = "".join(f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n" for i in range(depth))
    data = ("Subject: deep\r\n" + opening + "Content-Type: text/plain\r\n\r\nleaf\r\n").encode()
    email = convert(data)

    assert email.subject == "deep"


def test_truncated_message_exact() -> None:
    header = "Subject: big\r\nContent-Type: text/plain\r\n\r\n"
    lines = [f"line {n:04}\r\n" for n in range(300)]  # 11 bytes each
    data = (header + "".join(lines)).encode()
    max_size = 1000
    kept = (max_size - len(header)) // 11
    email = convert(data, max_size=max_size)

    assert email.truncated is True
    assert email.subject == "big"
    assert email.body == (
        "".join(lines[:kept]).replace("\r\n", "\n")
        + f"\n\n[emlisten: this message ({len(data)} bytes) exceeds the 1000-byte limit;"
        " its body was cut and its attachments were omitted]"
    )


def test_huge_message_is_truncated_in_bounded_memory() -> None:
    attachment = base64.encodebytes(bytes(range(256)) * (75 * 1024 * 1024 // 256))
    data = (
        mail(
            """
            From: big@example.com
            Subject: 100 MB
            Content-Type: multipart/mixed; boundary=big

            --big
            Content-Type: text/html; charset=utf-8

            <p>hello</p>
            --big
            Content-Type: application/octet-stream; name=huge.bin
            Content-Transfer-Encoding: base64

            """
        )
        + attachment
        + b"\r\n--big--\r\n"
    )
    assert len(data) > 100 * 1024 * 1024

    tracemalloc.start()
    email = convert(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert email.truncated is True
    assert email.attachments == []
    assert email.subject == "100 MB"
    assert email.is_html_body is True
    assert email.body.startswith("<p>hello</p>\n<p>[emlisten: this message (")
    # Only ~1 MiB is parsed whatever the size (speed is a benchmark matter, not a test's).
    assert peak < 40 * 1024 * 1024


# --- properties ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_random_bytes_never_raise(data: bytes) -> None:
    email = convert(data)

    assert email.id == EMAIL_ID
    as_json(email)


_FRAGMENTS = [
    b"Content-Type: multipart/mixed; boundary=q\r\n",
    b'Content-Type: multipart/alternative; boundary="q"\r\n',
    b"Content-Type: multipart/related; boundary=r; start=<x>\r\n",
    b"Content-Type: message/rfc822\r\n",
    b"Content-Type: text/html; charset=x-bogus\r\n",
    b"Content-Type: text/plain; charset=utf-16\r\n",
    b"Content-Type: image/png; name*=utf-8''%E2%9C%93%ZZ.png\r\n",
    b"Content-Disposition: attachment; filename*0*=bad'';filename*1=x\r\n",
    b"Content-Transfer-Encoding: base64\r\n",
    b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Content-Transfer-Encoding: x-uuencode\r\n",
    b"Content-ID: <x>\r\n",
    b"Subject: =?utf-8?B?8J+O?= =?koi8-r?Q?=F0=D2?=\r\n",
    b'From: "a\\" <b@c>, =?utf-8?q?=FF?= <@>, group:;\r\n',
    b"Date: Mon, 99 Foo 99999 99:99:99 +9999\r\n",
    b"X-Priority: \xff\r\n",
    b"\r\n",
    b"--q\r\n",
    b"--q--\r\n",
    b"--r\r\n",
    b"=\r\n",
    b"=C3=A9=\r\n",
    b"begin 644 x\r\n",
    b"AAAA====BBBB\r\n",
    b"\xc3\x28\xff\xfe\r\n",
    b'<img src="cid:x">\r\n',
    b" folded continuation\r\n",
    b"\x00\r\n",
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=60), st.integers(1, 4000))
def test_mime_like_fragments_never_raise(fragments: list[bytes], max_size: int) -> None:
    email = convert(b"".join(fragments), max_size=max_size)

    assert email.id == EMAIL_ID
    as_json(email)
