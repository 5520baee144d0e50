"""compose(): Creatio Email JSON -> message bytes, checked by parsing them back with the stdlib."""

from __future__ import annotations

import base64
import email
import email.policy
import re
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import pytest

from emlisten.errors import ValidationError
from emlisten.models import MailboxConfig, Security, ServerEndpoint
from emlisten.sender.compose import compose, html_to_text, parse_address

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
PDF = b"%PDF-1.4\n" + bytes(range(255, -1, -1)) * 3


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def base_email(**fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "Subject": "Hello",
        "Body": "Plain body\nsecond line",
        "IsHtmlBody": False,
        "Sender": "Alice <alice@example.test>",
        "Recepients": ["bob@example.test"],
    }
    data.update(fields)
    return data


def structure(message: EmailMessage) -> list[str]:
    return [part.get_content_type() for part in message.walk()]


def test_plain_text_message() -> None:
    composed = compose(base_email(), now=datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC))
    assert composed.data.count(b"\n") == composed.data.count(b"\r\n")  # CRLF only
    message = parse(composed.data)
    assert structure(message) == ["text/plain"]
    assert message["From"] == "Alice <alice@example.test>"
    assert message["To"] == "bob@example.test"
    assert message["Subject"] == "Hello"
    assert message["Date"] == "Mon, 06 May 2024 07:08:09 +0000"
    assert message["Message-ID"] == composed.message_id
    assert composed.message_id.startswith("<") and composed.message_id.endswith("@example.test>")
    assert message.get_content().replace("\r\n", "\n") == "Plain body\nsecond line\n"
    assert composed.envelope_from == "alice@example.test"
    assert composed.recipients == ["bob@example.test"]
    for absent in ("Bcc", "Importance", "X-Priority", "In-Reply-To", "References"):
        assert message[absent] is None


def test_keys_are_case_insensitive() -> None:
    composed = compose(
        {"subject": "lower", "body": "b", "sender": "a@example.test", "RECEPIENTS": ["c@example.test"]}
    )
    message = parse(composed.data)
    assert message["Subject"] == "lower"
    assert composed.recipients == ["c@example.test"]


def test_html_with_plain_alternative_inline_image_and_attachments() -> None:
    html = (
        "<html><head><style>p {color: red}</style><title>T</title></head><body>"
        "<p>Hello &amp; <b>welcome</b></p><p>Line one<br>Line two</p>"
        '<img src="cid:logo123"></body></html>'
    )
    composed = compose(
        base_email(
            Body=html,
            IsHtmlBody=True,
            Attachments=[
                {"Name": "logo.png", "Base64Data": b64(PNG), "IsInline": True, "Id": "logo123"},
                {"Name": "Отчёт за май.pdf", "Base64Data": b64(PDF), "IsInline": False},
            ],
        )
    )
    message = parse(composed.data)
    assert structure(message) == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "multipart/related",
        "text/html",
        "image/png",
        "application/pdf",
    ]
    plain = message.get_body(("plain",))
    html_part = message.get_body(("html",))
    assert plain is not None and html_part is not None
    text = plain.get_content().replace("\r\n", "\n")
    assert "Hello & welcome" in text
    assert "Line one\nLine two" in text
    assert "color" not in text and "<" not in text
    assert html_part.get_content().strip() == html
    image = next(p for p in message.walk() if p.get_content_type() == "image/png")
    assert image["Content-ID"] == "<logo123>"
    assert image.get_content_disposition() == "inline"
    assert image.get_content() == PNG
    pdf = next(p for p in message.walk() if p.get_content_type() == "application/pdf")
    assert pdf.get_content_disposition() == "attachment"
    assert pdf.get_filename() == "Отчёт за май.pdf"
    assert re.search(rb"filename\*(0\*)?=utf-8''", composed.data)  # RFC 2231 on the wire
    assert pdf.get_content() == PDF
    # Only the root says MIME-Version.
    assert composed.data.count(b"MIME-Version:") == 1


def test_attachments_beside_email_are_added() -> None:
    composed = compose(
        base_email(Attachments=[{"Name": "a.txt", "Base64Data": b64(b"inside")}]),
        extra_attachments=[{"name": "b.bin", "base64data": b64(b"\x00beside\xff")}],
    )
    message = parse(composed.data)
    assert structure(message) == ["multipart/mixed", "text/plain", "text/plain", "application/octet-stream"]
    files = {part.get_filename(): part.get_content() for part in message.iter_attachments()}
    assert files == {"a.txt": "inside", "b.bin": b"\x00beside\xff"}


def test_inline_attachment_without_html_is_a_regular_part() -> None:
    composed = compose(
        base_email(
            Attachments=[{"Name": "x.png", "Base64Data": b64(PNG), "IsInline": True, "ContentId": "<c1>"}]
        )
    )
    message = parse(composed.data)
    assert structure(message) == ["multipart/mixed", "text/plain", "image/png"]


def test_cc_bcc_and_string_recipient_lists() -> None:
    composed = compose(
        base_email(
            Recepients='bob@example.test; "Smith, Carol" <carol@example.test>',
            CopyRecepients=["Dave <dave@example.test>", "bob@example.test"],
            BlindCopyRecepients="eve@example.test",
        )
    )
    message = parse(composed.data)
    assert message["To"] == 'bob@example.test, "Smith, Carol" <carol@example.test>'
    assert message["Cc"] == "Dave <dave@example.test>, bob@example.test"
    assert message["Bcc"] is None
    assert b"eve@example.test" not in composed.data
    assert composed.recipients == [
        "bob@example.test",
        "carol@example.test",
        "dave@example.test",
        "eve@example.test",
    ]


def test_bcc_only_gets_undisclosed_recipients() -> None:
    composed = compose(base_email(Recepients=[], BlindCopyRecepients=["hidden@example.test"]))
    message = parse(composed.data)
    assert message["To"] == "undisclosed-recipients:;"
    assert b"hidden@example.test" not in composed.data
    assert composed.recipients == ["hidden@example.test"]


def test_reply_headers_and_given_message_id() -> None:
    composed = compose(
        base_email(
            MessageId="own-id@example.test",
            InReplyTo="<parent@example.test>",
            References="<root@example.test> <middle@example.test>",
        )
    )
    message = parse(composed.data)
    assert composed.message_id == "<own-id@example.test>"
    assert message["Message-ID"] == "<own-id@example.test>"
    assert message["In-Reply-To"] == "<parent@example.test>"
    assert message["References"] == "<root@example.test> <middle@example.test> <parent@example.test>"


def test_references_as_array_without_duplicates() -> None:
    composed = compose(
        base_email(InReplyTo="p@example.test", References=["<r@example.test>", "p@example.test"])
    )
    message = parse(composed.data)
    assert message["References"] == "<r@example.test> <p@example.test>"


@pytest.mark.parametrize(
    ("importance", "expected"),
    [
        (2, ("high", "1 (Highest)")),
        ("High", ("high", "1 (Highest)")),
        (0, ("low", "5 (Lowest)")),
        ("low", ("low", "5 (Lowest)")),
        (1, (None, None)),
        (None, (None, None)),
    ],
)
def test_importance(importance: Any, expected: tuple[str | None, str | None]) -> None:
    message = parse(compose(base_email(Importance=importance)).data)
    assert (message["Importance"], message["X-Priority"]) == expected


def test_extra_headers_reserved_ones_ignored() -> None:
    message = parse(
        compose(
            base_email(
                Headers=[
                    {"Name": "X-Creatio-Activity", "Value": "42"},
                    {"Name": "Bcc", "Value": "leak@example.test"},
                    {"Name": "From", "Value": "evil@example.test"},
                ]
            )
        ).data
    )
    assert message["X-Creatio-Activity"] == "42"
    assert message["Bcc"] is None
    assert message["From"] == "Alice <alice@example.test>"


def test_non_ascii_subject_names_and_idn_domain() -> None:
    composed = compose(
        base_email(
            Subject="Привет, мир", Sender="Иван <ivan@пример.рф>", Recepients=["Пётр <petr@example.test>"]
        )
    )
    assert composed.data.isascii()
    message = parse(composed.data)
    assert message["Subject"] == "Привет, мир"
    assert message["From"].addresses[0].display_name == "Иван"
    assert composed.envelope_from == "ivan@xn--e1afmkfd.xn--p1ai"
    assert message["To"].addresses[0].display_name == "Пётр"


def test_subject_line_breaks_are_flattened() -> None:
    message = parse(compose(base_email(Subject="a\r\nBcc: x@example.test")).data)
    assert message["Subject"] == "a Bcc: x@example.test"
    assert message["Bcc"] is None


def test_sender_defaults_to_the_mailbox() -> None:
    mailbox = MailboxConfig(
        id="0f8fad5b-d9cb-469f-a165-70867728950e",
        user_name="login-name",
        imap=ServerEndpoint("imap.example.test", 993, Security.SSL_ON_CONNECT),
        bpm_endpoint="http://crm.example.test/",
        password="pw",
        sender_email="owner@example.test",
    )
    composed = compose(base_email(Sender=""), mailbox=mailbox)
    assert composed.envelope_from == "owner@example.test"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"Recepients": [], "CopyRecepients": None}, "Email.Recepients"),
        ({"Recepients": ["ok@example.test", "not-an-address"]}, "Email.Recepients[1]"),
        ({"Recepients": "ok@example.test; broken@"}, "Email.Recepients[1]"),
        ({"CopyRecepients": [5]}, "Email.CopyRecepients[0]"),
        ({"BlindCopyRecepients": {"a": 1}}, "Email.BlindCopyRecepients"),
        ({"Sender": ""}, "Email.Sender"),
        ({"Sender": "a b c"}, "Email.Sender"),
        ({"Recepients": ["bad\nx@example.test"]}, "Email.Recepients[0]"),
        ({"Recepients": ["пётр@example.test"]}, "Email.Recepients[0]"),
        ({"Subject": 5}, "Email.Subject"),
        ({"IsHtmlBody": "maybe"}, "Email.IsHtmlBody"),
        ({"Importance": 7}, "Email.Importance"),
        ({"MessageId": "no at sign"}, "Email.MessageId"),
        ({"InReplyTo": "<a b@c>"}, "Email.InReplyTo"),
        ({"References": 5}, "Email.References"),
        ({"Headers": [{"Name": "X-A", "Value": "one\r\ntwo"}]}, "Email.Headers[0].Value"),
        ({"Headers": [{"Name": "Bad Name", "Value": "v"}]}, "Email.Headers[0].Name"),
        ({"Attachments": "nope"}, "Email.Attachments"),
        (
            {
                "Attachments": [
                    {"Name": "a", "Base64Data": "QQ=="},
                    {"Name": "b", "Base64Data": "QQ=="},
                    {"Name": "c", "Base64Data": "!!not base64!!"},
                ]
            },
            "Email.Attachments[2].Base64Data",
        ),
        (
            {"Attachments": [{"Name": "a", "Base64Data": "QQ", "IsInline": True}]},
            "Email.Attachments[0].Base64Data",
        ),
        (
            {"Attachments": [{"Name": "a", "Base64Data": "QQ==", "ContentId": "a b"}]},
            "Email.Attachments[0].ContentId",
        ),
    ],
)
def test_validation_errors_name_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        compose(base_email(**fields))
    assert caught.value.field == field


def test_email_must_be_an_object() -> None:
    with pytest.raises(ValidationError) as caught:
        compose(["not", "an", "object"])
    assert caught.value.field == "Email"


def test_top_level_attachment_errors_are_named() -> None:
    with pytest.raises(ValidationError) as caught:
        compose(base_email(), extra_attachments=[{"Name": "x", "Base64Data": "%%%"}])
    assert caught.value.field == "Attachments[0].Base64Data"


def test_base64_with_line_breaks_is_accepted() -> None:
    encoded = base64.encodebytes(PDF).decode()  # MIME style, 76-char lines
    message = parse(compose(base_email(Attachments=[{"Name": "f.pdf", "Base64Data": encoded}])).data)
    [attachment] = list(message.iter_attachments())
    assert attachment.get_content() == PDF


def test_html_to_text() -> None:
    assert html_to_text("<div>a</div><div>b&nbsp;c</div><script>x()</script>") == "a\n\nb c\n"
    assert html_to_text("<table><tr><td>1</td><td>2</td></tr></table>").strip() == "1\t2"


def test_parse_address_forms() -> None:
    assert parse_address(" Bob <bob@example.test> ", "f").addr_spec == "bob@example.test"
    assert parse_address("bob+tag@example.test", "f").username == "bob+tag"
    with pytest.raises(ValidationError):
        parse_address("a@b@c", "f")
    with pytest.raises(ValidationError):
        parse_address("x@-bad-.test", "f")
