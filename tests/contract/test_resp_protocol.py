"""The RESP2 encoder and parser of the store's own Redis client (emlisten.store._resp): pure
logic, in memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emlisten.store._resp import (
    MAX_BULK,
    ProtocolError,
    Reply,
    ReplyError,
    _Incomplete,
    encode_command,
    parse_url,
)
from emlisten.store._resp import Parser as RespParser


def wire(reply: Reply) -> bytes:
    """How Redis would send ``reply`` (bytes as bulk strings)."""
    if reply is None:
        return b"$-1\r\n"
    if isinstance(reply, ReplyError):
        return b"-" + str(reply).encode() + b"\r\n"
    if isinstance(reply, int):
        return b":%d\r\n" % reply
    if isinstance(reply, bytes):
        return b"$%d\r\n%s\r\n" % (len(reply), reply)
    return b"*%d\r\n" % len(reply) + b"".join(wire(item) for item in reply)


def same(a: Reply, b: Reply) -> bool:
    if isinstance(a, ReplyError) or isinstance(b, ReplyError):
        return type(a) is type(b) and str(a) == str(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def parse_all(chunks: list[bytes]) -> list[Reply]:
    parser = RespParser()
    replies: list[Reply] = []
    for chunk in chunks:
        parser.feed(chunk)
        while not isinstance(reply := parser.get(), _Incomplete):
            replies.append(reply)
    assert not parser.pending
    return replies


def test_commands_are_arrays_of_bulk_strings() -> None:
    assert encode_command(["SET", "k", "v"]) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"
    assert encode_command(["HSET", b"\x00\xff\r\n", 42, -7, 1.5, "é"]) == (
        b"*6\r\n$4\r\nHSET\r\n$4\r\n\x00\xff\r\n\r\n$2\r\n42\r\n$2\r\n-7\r\n$3\r\n1.5\r\n$2\r\n\xc3\xa9\r\n"
    )
    assert encode_command(["GET", ""]) == b"*2\r\n$3\r\nGET\r\n$0\r\n\r\n"
    with pytest.raises(TypeError):
        encode_command(["SET", "k", True])
    with pytest.raises(TypeError):
        encode_command(["SET", "k", None])  # type: ignore[list-item]


SAMPLE = (
    b"+OK\r\n"
    b":-12\r\n"
    b"$5\r\nhello\r\n"
    b"$0\r\n\r\n"
    b"$-1\r\n"
    b"*-1\r\n"
    b"*0\r\n"
    b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
    b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n*2\r\n$-1\r\n*1\r\n:1\r\n"
    b"$4\r\na\r\nb\r\n"  # CRLF inside a bulk string
)
EXPECTED: list[Reply] = [
    b"OK",
    -12,
    b"hello",
    b"",
    None,
    None,
    [],
    ReplyError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    [b"message", b"ch", [None, [1]]],
    b"a\r\nb",
]


def test_every_kind_of_reply_in_one_read() -> None:
    replies = parse_all([SAMPLE])
    assert len(replies) == len(EXPECTED)
    assert all(same(a, b) for a, b in zip(replies, EXPECTED, strict=True))
    error = replies[7]
    assert isinstance(error, ReplyError) and error.code == "WRONGTYPE"


def test_split_at_every_byte_boundary() -> None:
    for cut in range(1, len(SAMPLE)):
        replies = parse_all([SAMPLE[:cut], SAMPLE[cut:]])
        assert all(same(a, b) for a, b in zip(replies, EXPECTED, strict=True)), cut
        assert len(replies) == len(EXPECTED), cut


def test_one_byte_at_a_time() -> None:
    replies = parse_all([SAMPLE[i : i + 1] for i in range(len(SAMPLE))])
    assert all(same(a, b) for a, b in zip(replies, EXPECTED, strict=True))


def test_a_big_bulk_string_in_many_reads() -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB, CRLFs inside
    data = wire([payload, b"after"])
    replies = parse_all([data[i : i + 65536] for i in range(0, len(data), 65536)])
    assert replies == [[payload, b"after"]]


def test_a_big_array_in_many_reads_is_not_parsed_again_from_its_start() -> None:
    items: list[Reply] = [b"%d" % n for n in range(50_000)]
    data = wire(items)
    parser = RespParser()
    chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    for number, chunk in enumerate(chunks[:-1]):
        parser.feed(chunk)
        assert isinstance(parser.get(), _Incomplete)
        if number == len(chunks) // 2:
            # The elements read so far are kept (not parsed again on the next read), and the
            # buffer holds only what follows them.
            assert len(parser._stack[0][0]) > 20_000
            assert len(parser._buf) - parser._pos < 4096 + 16
    parser.feed(chunks[-1])
    assert parser.get() == items


@given(
    st.recursive(
        st.none()
        | st.integers(min_value=-(2**63), max_value=2**63 - 1)
        | st.binary(max_size=40)
        | st.from_regex(r"[A-Z]+ [a-z ]{0,20}", fullmatch=True).map(ReplyError),
        lambda children: st.lists(children, max_size=5),
        max_leaves=30,
    ),
    st.lists(st.integers(min_value=1, max_value=30), max_size=10),
)
@settings(max_examples=300, deadline=None)
def test_any_reply_split_anywhere(reply: Reply, cuts: list[int]) -> None:
    data = wire(reply) + b"+NEXT\r\n"
    chunks, position = [], 0
    for size in cuts:
        chunks.append(data[position : position + size])
        position += size
    chunks.append(data[position:])
    replies = parse_all([chunk for chunk in chunks if chunk])
    assert len(replies) == 2
    assert same(replies[0], reply)
    assert replies[1] == b"NEXT"


@pytest.mark.parametrize(
    "data",
    [
        b"!3\r\nfoo\r\n",  # not RESP2
        b"$abc\r\n",
        b":12x\r\n",
        b"$3\r\nfooXY",  # bulk string without its CRLF
        b"$%d\r\n" % (MAX_BULK + 1),
        b"+" + b"x" * (70 * 1024),  # a line without an end
    ],
)
def test_what_is_not_resp_is_a_protocol_error(data: bytes) -> None:
    parser = RespParser()
    parser.feed(data)
    with pytest.raises(ProtocolError):
        parser.get()


def test_urls() -> None:
    plain = parse_url("redis://127.0.0.1:6379/3")
    assert (plain.host, plain.port, plain.db, plain.username, plain.password, plain.tls) == (
        "127.0.0.1",
        6379,
        3,
        None,
        None,
        False,
    )
    auth = parse_url("redis://:p%40ss%20w%3Ard%2F%2B@redis.db:6380/2")
    assert (auth.username, auth.password, auth.db) == (None, "p@ss w:rd/+", 2)
    assert "p@ss" not in repr(auth) and "p@ss" not in str(auth)
    user = parse_url("redis://alice:secret@redis")
    assert (user.username, user.password, user.port, user.db) == ("alice", "secret", 6379, 0)
    tls = parse_url("rediss://redis.db:6380/2")
    assert tls.tls and tls.ssl_context is not None and tls.ssl_context.check_hostname
    relaxed = parse_url("rediss://redis.db/0?ssl_cert_reqs=none")
    assert relaxed.ssl_context is not None and not relaxed.ssl_context.check_hostname
    for bad in (
        "http://127.0.0.1:6379",
        "redis://",
        "redis://host:port/0",
        "redis://host/db",
        "redis://host/0?socket_timeout=3",
        "rediss://host/0?ssl_cert_reqs=maybe",
    ):
        with pytest.raises(ValueError):
            parse_url(bad)
    with pytest.raises(ValueError) as caught:
        parse_url("redis://:hunter2-secret@host:notaport/0")
    assert "hunter2" not in str(caught.value)
