"""The streaming response parser against hand-written server transcripts (no I/O)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from emlisten.errors import MailProtocolError
from emlisten.mail.imap._parser import (
    Response,
    ResponseKind,
    ResponseParser,
    decode_mailbox_name,
    encode_mailbox_name,
    fetch_attributes,
    parse_internal_date,
)

BODY = (
    b"From: a@example.test\r\nTo: b@example.test\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b'\r\nHello {5}\r\n"quoted" (paren) \xc3\xa4\xc3\xb6\xc3\xbc\r\n'
)

DOVECOT_SESSION = (
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN] "
    b"Dovecot (Debian) ready.\r\n"
    b"A1 OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY "
    b"THREAD=REFERENCES MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS "
    b"LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES WITHIN CONTEXT=SEARCH "
    b"LIST-STATUS BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW STATUS=SIZE SAVEDATE "
    b"LITERAL+ NOTIFY SPECIAL-USE] Logged in\r\n"
    b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n"
    b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags permitted.\r\n"
    b"* 2 EXISTS\r\n"
    b"* 0 RECENT\r\n"
    b"* OK [UNSEEN 1] First unseen.\r\n"
    b"* OK [UIDVALIDITY 1718000000] UIDs valid\r\n"
    b"* OK [UIDNEXT 3] Predicted next UID\r\n"
    b"* OK [HIGHESTMODSEQ 5] Highest\r\n"
    b"A2 OK [READ-WRITE] Select completed (0.002 + 0.000 + 0.001 secs).\r\n"
    b"+ idling\r\n"
    b"* 3 EXISTS\r\n"
    b"* OK Still here\r\n"
    b"A3 OK Idle completed (0.001 + 12.532 + 12.531 secs).\r\n"
    b"* 3 FETCH (UID 7 RFC822.SIZE " + str(len(BODY)).encode() + b" INTERNALDATE "
    b'" 7-Jul-2024 02:44:25 -0700" BODY[] {' + str(len(BODY)).encode() + b"}\r\n" + BODY + b")\r\n"
    b"A4 OK Fetch completed (0.001 + 0.000 secs).\r\n"
    b"* SEARCH 1 2 3 7\r\n"
    b"A5 OK Search completed (0.001 + 0.000 secs).\r\n"
    b'* LIST (\\HasNoChildren \\Sent) "/" Sent\r\n'
    b'* LIST (\\HasNoChildren) "/" "Entw&APw-rfe"\r\n'
    b'* LIST (\\HasNoChildren) "/" {11}\r\nodd "name")\r\n'
    b'* LIST (\\Noselect \\HasChildren) NIL ""\r\n'
    b"A6 OK List completed (0.001 + 0.000 secs).\r\n"
    b"* BYE Logging out\r\n"
    b"A7 OK Logout completed (0.001 + 0.000 secs).\r\n"
)


def parse_all(data: bytes, chunks: list[int] | None = None) -> list[Response]:
    parser = ResponseParser()
    responses: list[Response] = []
    if chunks is None:
        responses.extend(parser.feed(data))
    else:
        pos = 0
        for size in chunks:
            responses.extend(parser.feed(data[pos : pos + size]))
            pos += size
        responses.extend(parser.feed(data[pos:]))
    assert parser.idle
    assert parser.buffered_bytes == 0
    return responses


def test_dovecot_session_in_one_piece() -> None:
    responses = parse_all(DOVECOT_SESSION)
    greeting = responses[0]
    assert greeting.kind is ResponseKind.UNTAGGED
    assert greeting.tag == "*"
    assert greeting.type == "OK"
    assert greeting.code == "CAPABILITY"
    assert "IDLE" in greeting.code_args
    assert greeting.text == "Dovecot (Debian) ready."

    login = responses[1]
    assert (login.kind, login.tag, login.type, login.code) == (ResponseKind.TAGGED, "A1", "OK", "CAPABILITY")
    assert login.text == "Logged in"

    flags = responses[2]
    assert flags.type == "FLAGS"
    assert flags.data == [["\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"]]

    permanent = responses[3]
    assert permanent.code == "PERMANENTFLAGS"
    assert permanent.code_args == [["\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft", "\\*"]]
    assert permanent.text == "Flags permitted."

    exists = responses[4]
    assert (exists.type, exists.number, exists.data) == ("EXISTS", 2, [])
    assert responses[5].type == "RECENT"
    assert responses[7].code == "UIDVALIDITY"
    assert responses[7].code_args == [1718000000]
    assert (responses[8].code, responses[8].code_args) == ("UIDNEXT", [3])

    select_done = responses[10]
    assert (select_done.tag, select_done.code, select_done.code_args) == ("A2", "READ-WRITE", [])

    idling = responses[11]
    assert idling.kind is ResponseKind.CONTINUATION
    assert idling.tag == "+"
    assert idling.text == "idling"
    assert (responses[12].type, responses[12].number) == ("EXISTS", 3)
    assert (responses[13].type, responses[13].text, responses[13].code) == ("OK", "Still here", None)

    fetch = responses[15]
    assert (fetch.type, fetch.number) == ("FETCH", 3)
    attributes = fetch_attributes(fetch)
    assert attributes["UID"] == 7
    assert attributes["RFC822.SIZE"] == len(BODY)
    assert attributes["BODY[]"] == BODY
    assert parse_internal_date(attributes["INTERNALDATE"]) == datetime(
        2024, 7, 7, 2, 44, 25, tzinfo=timezone(-timedelta(hours=7))
    )

    search = responses[17]
    assert (search.type, search.data) == ("SEARCH", [1, 2, 3, 7])

    lists = responses[19:23]
    assert lists[0].data == [["\\HasNoChildren", "\\Sent"], b"/", "Sent"]
    assert lists[1].data == [["\\HasNoChildren"], b"/", b"Entw&APw-rfe"]
    assert lists[2].data == [["\\HasNoChildren"], b"/", b'odd "name")']
    assert lists[3].data == [["\\Noselect", "\\HasChildren"], None, b""]

    bye = responses[24]
    assert (bye.type, bye.text) == ("BYE", "Logging out")
    assert responses[25].tag == "A7"
    assert len(responses) == 26


def test_byte_by_byte_equals_one_piece() -> None:
    whole = parse_all(DOVECOT_SESSION)
    assert parse_all(DOVECOT_SESSION, [1] * len(DOVECOT_SESSION)) == whole


@pytest.mark.parametrize("seed", range(20))
def test_random_chunks_equal_one_piece(seed: int) -> None:
    rng = random.Random(seed)
    chunks = [rng.randint(1, 64) for _ in range(len(DOVECOT_SESSION) // 8)]
    assert parse_all(DOVECOT_SESSION, chunks) == parse_all(DOVECOT_SESSION)


def test_fetch_split_at_every_boundary() -> None:
    body = b"line one\r\nline {2}\r\n" + bytes(range(256))
    data = (
        b"* 12 FETCH (UID 99 BODY[] {"
        + str(len(body)).encode()
        + b"}\r\n"
        + body
        + b' INTERNALDATE "17-Jul-1996 02:44:25 +0200" RFC822.SIZE 278)\r\n'
    )
    expected = parse_all(data)
    assert fetch_attributes(expected[0])["BODY[]"] == body
    for cut in range(1, len(data)):
        parser = ResponseParser()
        first = parser.feed(data[:cut])
        second = parser.feed(data[cut:])
        assert first + second == expected, cut


def test_gmail_style_fetch_and_flags() -> None:
    data = (
        b"* 1 FETCH (X-GM-THRID 1278455344230334865 X-GM-MSGID 1278455344230334865 "
        b'X-GM-LABELS (\\Important "Some Label") UID 1 FLAGS (\\Seen) MODSEQ (4127))\r\n'
    )
    (response,) = parse_all(data)
    attributes = fetch_attributes(response)
    assert attributes["X-GM-THRID"] == 1278455344230334865
    assert attributes["X-GM-LABELS"] == ["\\Important", b"Some Label"]
    assert attributes["MODSEQ"] == [4127]


def test_exchange_style_responses() -> None:
    data = (
        b"* OK The Microsoft Exchange IMAP4 service is ready. [QQBNADgAUAAyADIAMQ==]\r\n"
        b"* CAPABILITY IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS ID UNSELECT "
        b"CHILDREN IDLE NAMESPACE LITERAL+\r\n"
        b"A1 OK CAPABILITY completed.\r\n"
        b"A2 NO AUTHENTICATE failed.\r\n"
        b"* 1 FETCH (UID 5 BODY[HEADER.FIELDS (SUBJECT FROM)] {21}\r\nSubject: x\r\nFrom: y\r\n)\r\n"
        b"A3 BAD Command Error. 10\r\n"
    )
    greeting, capability, _done, auth, fetch, bad = parse_all(data)
    assert greeting.text == "The Microsoft Exchange IMAP4 service is ready. [QQBNADgAUAAyADIAMQ==]"
    assert greeting.code is None
    assert capability.type == "CAPABILITY"
    assert "AUTH=XOAUTH2" in capability.data
    assert (auth.tag, auth.type, auth.text) == ("A2", "NO", "AUTHENTICATE failed.")
    assert fetch_attributes(fetch)["BODY[HEADER.FIELDS (SUBJECT FROM)]"] == (b"Subject: x\r\nFrom: y\r\n")
    assert (bad.type, bad.text) == ("BAD", "Command Error. 10")


def test_quoted_strings_with_escapes() -> None:
    (response,) = parse_all(b'* LIST () "\\\\" "a \\"quoted\\" \\\\ name"\r\n')
    assert response.data == [[], b"\\", b'a "quoted" \\ name']


def test_nested_lists_and_nil() -> None:
    data = b'* NAMESPACE (("" "/")("Other Users/" "/" "X-PARAM" ("a" NIL))) NIL (("#shared/" "/"))\r\n'
    (response,) = parse_all(data)
    assert response.data == [
        [[b"", b"/"], [b"Other Users/", b"/", b"X-PARAM", [b"a", None]]],
        None,
        [[b"#shared/", b"/"]],
    ]


def test_status_and_id_and_enabled() -> None:
    data = (
        b'* STATUS "INBOX" (MESSAGES 231 UIDNEXT 44292 UIDVALIDITY 1 UNSEEN 0)\r\n'
        b'* ID ("name" "Dovecot" "version" NIL)\r\n'
        b"* ENABLED CONDSTORE UTF8=ACCEPT\r\n"
    )
    status, ident, enabled = parse_all(data)
    assert status.data == [b"INBOX", ["MESSAGES", 231, "UIDNEXT", 44292, "UIDVALIDITY", 1, "UNSEEN", 0]]
    assert ident.data == [[b"name", b"Dovecot", b"version", None]]
    assert enabled.data == ["CONDSTORE", "UTF8=ACCEPT"]


def test_literal_variants() -> None:
    data = b"* 1 FETCH (BINARY[] ~{3}\r\n\x00\x01\x02 BODY[1] {0}\r\n BODY[2] {2+}\r\nab)\r\n"
    (response,) = parse_all(data)
    assert fetch_attributes(response) == {
        "BINARY[]": b"\x00\x01\x02",
        "BODY[1]": b"",
        "BODY[2]": b"ab",
    }


def test_body_section_with_origin() -> None:
    (response,) = parse_all(b"* 2 FETCH (BODY[]<0> {3}\r\nabc UID 4)\r\n")
    assert fetch_attributes(response) == {"BODY[]<0>": b"abc", "UID": 4}


def test_response_codes() -> None:
    data = (
        b"A1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
        b"A2 NO [NONEXISTENT] Mailbox doesn't exist: Nope (0.001 + 0.000 secs).\r\n"
        b"A3 OK [APPENDUID 1718000000 45] Append completed.\r\n"
        b"A4 OK [COPYUID 38505 304,319:320 3956:3958] Done\r\n"
        b"* OK [ALERT] System shutdown in 10 minutes\r\n"
        b"* NO [WEBALERT https://accounts.google.com/x?a=b&c=d] Web login required.\r\n"
        b'* OK [BADCHARSET (UTF-8 "US-ASCII")] x\r\n'
        b"A5 OK [READ-ONLY]\r\n"
        b"A6 OK\r\n"
    )
    auth, nonexistent, appenduid, copyuid, alert, webalert, badcharset, readonly, bare = parse_all(data)
    assert (auth.type, auth.code, auth.text) == ("NO", "AUTHENTICATIONFAILED", "Authentication failed.")
    assert nonexistent.code == "NONEXISTENT"
    assert appenduid.code_args == [1718000000, 45]
    assert copyuid.code_args == [38505, "304,319:320", "3956:3958"]
    assert (alert.code, alert.code_args, alert.text) == ("ALERT", [], "System shutdown in 10 minutes")
    assert webalert.code_args == ["https://accounts.google.com/x?a=b&c=d"]
    assert badcharset.code_args == [["UTF-8", b"US-ASCII"]]
    assert (readonly.code, readonly.text) == ("READ-ONLY", "")
    assert (bare.type, bare.text, bare.code) == ("OK", "", None)


def test_status_text_ending_in_braces_is_not_a_literal() -> None:
    # Status responses never carry literals; "{5}" at the end is text, not a literal marker.
    (response,) = parse_all(b"A1 NO weird text {5}\r\n")
    assert response.text == "weird text {5}"


def test_continuations() -> None:
    plain, empty, bare, challenge = parse_all(b"+ idling\r\n+ \r\n+\r\n+ eyJzdGF0dXMiOiI0MDEifQ==\r\n")
    assert all(r.kind is ResponseKind.CONTINUATION for r in (plain, empty, bare, challenge))
    assert (plain.text, empty.text, bare.text) == ("idling", "", "")
    assert challenge.text == "eyJzdGF0dXMiOiI0MDEifQ=="


def test_lowercase_keywords() -> None:
    (response,) = parse_all(b"* 4 exists\r\n")
    assert (response.type, response.number) == ("EXISTS", 4)
    (response,) = parse_all(b"a1 ok [uidnext 5] fine\r\n")
    assert (response.type, response.code, response.code_args) == ("OK", "UIDNEXT", [5])
    (response,) = parse_all(b"* 1 FETCH (uid 5 flags ())\r\n")
    assert fetch_attributes(response) == {"UID": 5, "FLAGS": []}
    (response,) = parse_all(b"* LIST () nil INBOX\r\n")
    assert response.data == [[], None, "INBOX"]


def test_bye() -> None:
    (response,) = parse_all(b"* BYE Disconnected for inactivity in reading our output\r\n")
    assert (response.kind, response.type) == (ResponseKind.UNTAGGED, "BYE")
    assert response.text.startswith("Disconnected")


def test_partial_input_is_kept_until_complete() -> None:
    parser = ResponseParser()
    assert parser.feed(b"* 3 FETCH (BODY[] {10}\r\n12345") == []
    assert not parser.idle
    assert parser.buffered_bytes == len(b"* 3 FETCH (BODY[] {10}") + 5
    assert parser.feed(b"67890") == []
    (response,) = parser.feed(b")\r\n")
    assert fetch_attributes(response) == {"BODY[]": b"1234567890"}
    assert parser.idle and parser.buffered_bytes == 0


def test_cr_at_chunk_end() -> None:
    parser = ResponseParser()
    assert parser.feed(b"* 1 EXISTS\r") == []
    (response,) = parser.feed(b"\n")
    assert response.number == 1


@pytest.mark.parametrize(
    "data",
    [
        b"\r\n",
        b" * OK\r\n",
        b"*\r\n",
        b"* \r\n",
        b"* 1\r\n",
        b"A1\r\n",
        b"A1 FETCH (UID 1)\r\n",
        b'* LIST (\\Noselect "/" x\r\n',
        b'* LIST () "/ x\r\n',
        b"* LIST ) x\r\n",
        b"* OK [UIDVALIDITY 3 text\r\n",
        b"* OK [] text\r\n",
        b"* 1 FETCH (BODY[x 1)\r\n",
        b"* 1 FETCH (UID 123456789012345678901234)\r\n",
        b"* 123456789012345678901234 EXISTS\r\n",
        b"* 1 FETCH (BODY[] x{3}\r\nabc)\r\n",
        b"* 1 FETCH (BODY[] {3}x\r\n",
        b"* \xff\xfe\r\n",
        b"\xff OK\r\n",
        b"* SEARCH " + b"(" * 100 + b")" * 100 + b"\r\n",
    ],
)
def test_malformed_input_raises_protocol_error(data: bytes) -> None:
    parser = ResponseParser()
    with pytest.raises(MailProtocolError):
        parser.feed(data)
    # A failed parser stays failed: the connection cannot be trusted any more.
    with pytest.raises(MailProtocolError):
        parser.feed(b"* 1 EXISTS\r\n")


def test_line_length_bound() -> None:
    parser = ResponseParser(max_line_bytes=100)
    parser.feed(b"* SEARCH" + b" 1" * 40)
    with pytest.raises(MailProtocolError, match="longer than 100"):
        parser.feed(b" 1" * 20)
    assert parser.buffered_bytes == 0


def test_line_length_bound_counts_all_lines_of_a_response() -> None:
    parser = ResponseParser(max_line_bytes=100)
    with pytest.raises(MailProtocolError, match="longer than 100"):
        parser.feed((b"* 1 FETCH (" + b"BODY[] {1}\r\nx " * 20) + b")\r\n")


def test_literal_size_bound() -> None:
    parser = ResponseParser(max_literal_bytes=1000)
    with pytest.raises(MailProtocolError, match="larger than 1000"):
        parser.feed(b"* 1 FETCH (BODY[] {1001}\r\n")
    parser = ResponseParser(max_literal_bytes=1000)
    with pytest.raises(MailProtocolError, match="larger than 1000"):
        parser.feed(b"* 1 FETCH (BODY[1] {600}\r\n" + b"x" * 600 + b" BODY[2] {600}\r\n")
    parser = ResponseParser(max_literal_bytes=1000)
    (response,) = parser.feed(b"* 1 FETCH (BODY[] {1000}\r\n" + b"x" * 1000 + b")\r\n")
    assert len(fetch_attributes(response)["BODY[]"]) == 1000  # type: ignore[arg-type]


def test_huge_literal_announcement_is_refused_not_allocated() -> None:
    parser = ResponseParser()
    with pytest.raises(MailProtocolError):
        parser.feed(b"* 1 FETCH (BODY[] {99999999999999999999}\r\n")


def test_buffer_released_after_large_response() -> None:
    parser = ResponseParser()
    body = b"y" * 500_000
    (response,) = parser.feed(b"* 1 FETCH (BODY[] {500000}\r\n" + body + b")\r\n")
    assert fetch_attributes(response)["BODY[]"] == body
    assert parser.idle
    assert parser._buffer == bytearray()
    assert parser._buffer.__sizeof__() < 100


def test_fetch_attributes_rejects_non_fetch() -> None:
    (response,) = parse_all(b"* 1 FETCH (UID)\r\n")
    with pytest.raises(MailProtocolError):
        fetch_attributes(response)
    (response,) = parse_all(b"* SEARCH 1\r\n")
    with pytest.raises(MailProtocolError):
        fetch_attributes(response)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("01-Jan-2024 00:00:00 +0000", datetime(2024, 1, 1, tzinfo=UTC)),
        (
            " 1-Feb-2024 13:14:15 +0130",
            datetime(2024, 2, 1, 13, 14, 15, tzinfo=timezone(timedelta(hours=1, minutes=30))),
        ),
        (
            "31-dec-1999 23:59:59 -1200",
            datetime(1999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-12))),
        ),
    ],
)
def test_internal_date(text: str, expected: datetime) -> None:
    assert parse_internal_date(text.encode()) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "32-Jan-2024 00:00:00 +0000",
        "01-Foo-2024 00:00:00 +0000",
        "01-Jan-2024 00:00:00 UTC",
    ],
)
def test_bad_internal_date(text: str) -> None:
    with pytest.raises(MailProtocolError):
        parse_internal_date(text.encode())


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("INBOX", b"INBOX"),
        ("Entwürfe", b"Entw&APw-rfe"),
        ("A & B", b"A &- B"),
        ("日本語/メール", b"&ZeVnLIqe-/&MOEw,DDr-"),
        ("~peter/mail/台北/日本語", b"~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
    ],
)
def test_modified_utf7(name: str, wire: bytes) -> None:
    assert encode_mailbox_name(name) == wire
    assert decode_mailbox_name(wire) == name


def test_modified_utf7_malformed_is_kept() -> None:
    assert decode_mailbox_name(b"a&!!!-b") == "a&!!!-b"
    assert decode_mailbox_name(b"a&b") == "a&b"
