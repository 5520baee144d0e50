"""ImapClient against the real Dovecot started by the test fixture."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import pytest
import trio

from emlisten.errors import FolderNotFoundError, MailAuthError, MailConnectError, MailProtocolError
from emlisten.mail.imap import ImapClient, ResponseKind
from emlisten.mail.imap._client import astring, sequence_set
from emlisten.mail.imap._tls import CA_FILE_ENV
from emlisten.models import Security, ServerEndpoint
from tests.servers.dovecot import Dovecot, MailUser, free_port, make_message

pytestmark = pytest.mark.dovecot


def endpoint(dovecot: Dovecot, security: Security, *, verify: bool = True) -> ServerEndpoint:
    port = dovecot.imaps_port if security is Security.SSL_ON_CONNECT else dovecot.imap_port
    return ServerEndpoint(dovecot.host, port, security, verify_certificate=verify)


def client_for(dovecot: Dovecot, security: Security = Security.NONE, **kwargs: object) -> ImapClient:
    kwargs.setdefault("ca_file", str(dovecot.ca_file))
    return ImapClient(endpoint(dovecot, security), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def logged_in(dovecot: Dovecot, mail_user: MailUser) -> AsyncIterator[ImapClient]:
    async with client_for(dovecot) as client:
        await client.login(mail_user.name, mail_user.password)
        yield client


@pytest.mark.parametrize(
    ("security", "tls"),
    [
        (Security.NONE, False),
        (Security.STARTTLS, True),
        (Security.STARTTLS_WHEN_AVAILABLE, True),
        (Security.SSL_ON_CONNECT, True),
    ],
)
async def test_login_over_each_security(
    dovecot: Dovecot, mail_user: MailUser, security: Security, tls: bool
) -> None:
    async with client_for(dovecot, security) as client:
        assert client.is_tls is tls
        if security in (Security.STARTTLS, Security.STARTTLS_WHEN_AVAILABLE):
            # Capabilities were re-read after the upgrade: STARTTLS is not offered again.
            assert not client.has_capability("STARTTLS")
        await client.login(mail_user.name, mail_user.password)
        assert client.has_capability("IDLE")
        info = await client.select("INBOX")
        assert info.exists == 0
        assert info.uidnext == 1
        assert info.uidvalidity > 0


async def test_authenticate_plain(dovecot: Dovecot, mail_user: MailUser) -> None:
    async with client_for(dovecot, Security.SSL_ON_CONNECT) as client:
        assert client.has_capability("SASL-IR")
        await client.authenticate_plain(mail_user.name, mail_user.password)
        assert (await client.select("INBOX")).exists == 0


async def test_authenticate_plain_without_sasl_ir(dovecot: Dovecot, mail_user: MailUser) -> None:
    async with client_for(dovecot) as client:
        client.capabilities -= {"SASL-IR"}  # take the "wait for +" path against the real server
        await client.authenticate_plain(mail_user.name, mail_user.password)
        assert (await client.select("INBOX")).exists == 0


@pytest.mark.parametrize(
    "password",
    ['with "quotes" and \\ backslash', "ünïcödé pässwörd", "x{5}", "  spaces  ", "NIL"],
)
@pytest.mark.parametrize("literal_plus", [True, False])
async def test_login_quotes_or_literals_the_password(
    dovecot: Dovecot, password: str, literal_plus: bool
) -> None:
    user = dovecot.add_user(password=password)
    async with client_for(dovecot) as client:
        if not literal_plus:
            client.capabilities -= {"LITERAL+"}  # synchronizing literal: wait for "+"
        await client.login(user.name, password)
        assert (await client.select("INBOX")).exists == 0


@pytest.mark.parametrize("method", ["login", "authenticate_plain"])
async def test_wrong_password_is_auth_error(dovecot: Dovecot, mail_user: MailUser, method: str) -> None:
    async with client_for(dovecot) as client:
        with pytest.raises(MailAuthError) as caught:
            await getattr(client, method)(mail_user.name, "not-the-password")
        assert "not-the-password" not in str(caught.value)
        assert "AUTHENTICATIONFAILED" in str(caught.value)
        # A refused login leaves the connection usable: try again with the right password.
        await client.login(mail_user.name, mail_user.password)


async def test_unknown_ca_is_tls_connect_error(dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CA_FILE_ENV, raising=False)
    client = ImapClient(endpoint(dovecot, Security.SSL_ON_CONNECT))
    with pytest.raises(MailConnectError, match="TLS") as caught:
        await client.connect()
    assert f"{dovecot.host}:{dovecot.imaps_port}" in str(caught.value)
    assert "certificate" in str(caught.value)
    assert not client.connected


async def test_unknown_ca_on_starttls_is_tls_connect_error(
    dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(CA_FILE_ENV, raising=False)
    client = ImapClient(endpoint(dovecot, Security.STARTTLS))
    with pytest.raises(MailConnectError, match="TLS handshake"):
        await client.connect()


async def test_ca_file_from_environment(
    dovecot: Dovecot, mail_user: MailUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CA_FILE_ENV, str(dovecot.ca_file))
    async with ImapClient(endpoint(dovecot, Security.SSL_ON_CONNECT)) as client:
        await client.login(mail_user.name, mail_user.password)


async def test_unverified_tls_accepts_unknown_ca(
    dovecot: Dovecot, mail_user: MailUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(CA_FILE_ENV, raising=False)
    async with ImapClient(endpoint(dovecot, Security.SSL_ON_CONNECT, verify=False)) as client:
        assert client.is_tls
        await client.login(mail_user.name, mail_user.password)


async def test_plain_connection_to_tls_port_fails_cleanly(dovecot: Dovecot) -> None:
    client = ImapClient(ServerEndpoint(dovecot.host, dovecot.imaps_port, Security.NONE), connect_timeout=0.5)
    # The TLS server waits for a ClientHello, we wait for a greeting: the timeout ends it.
    with pytest.raises(MailConnectError, match="greeting"):
        await client.connect()


async def test_tcp_refused_is_connect_error() -> None:
    port = free_port()
    client = ImapClient(ServerEndpoint("127.0.0.1", port, Security.NONE))
    with pytest.raises(MailConnectError, match=f"TCP connect to 127.0.0.1:{port}"):
        await client.connect()


async def test_dns_failure_is_connect_error() -> None:
    client = ImapClient(ServerEndpoint("no-such-host.invalid", 143, Security.NONE))
    with pytest.raises(MailConnectError, match=r"DNS lookup of no-such-host\.invalid"):
        await client.connect()


async def test_select_missing_folder(logged_in: ImapClient) -> None:
    with pytest.raises(FolderNotFoundError, match="Nope"):
        await logged_in.select("Nope")
    with pytest.raises(FolderNotFoundError):
        await logged_in.status("Nope")
    # Still usable afterwards.
    assert (await logged_in.select("INBOX")).exists == 0


async def test_select_non_ascii_folder(dovecot: Dovecot, mail_user: MailUser) -> None:
    await dovecot.acreate_folder(mail_user, "Entw&APw-rfe")  # "Entwürfe" in modified UTF-7
    await dovecot.aappend(mail_user, make_message(), folder="Entw&APw-rfe")
    async with client_for(dovecot) as client:
        await client.login(mail_user.name, mail_user.password)
        info = await client.select("Entwürfe")
        assert (info.name, info.exists, info.uidnext) == ("Entwürfe", 1, 2)
        names = {entry.name for entry in await client.list_folders()}
        assert {"INBOX", "Entwürfe", "Sent"} <= names


async def test_fetch_exact_bytes(dovecot: Dovecot, mail_user: MailUser) -> None:
    eight_bit = make_message(subject="Grüße", body='Ünïcödé body ✓ {3}\r\n"quoted" (x)\r\n')
    large = make_message(body=("0123456789abcdef" * 64 + "\r\n") * 1000)  # ~1 MB
    assert len(large) > 1_000_000
    uid_small = await dovecot.aappend(mail_user, eight_bit)
    uid_large = await dovecot.aappend(mail_user, large)
    async with client_for(dovecot, Security.SSL_ON_CONNECT) as client:
        await client.login(mail_user.name, mail_user.password)
        info = await client.select("INBOX")
        assert (info.exists, info.uidnext) == (2, uid_large + 1)
        messages = {m.uid: m for m in await client.uid_fetch([uid_small, uid_large])}
        assert messages[uid_small].body == eight_bit
        assert messages[uid_large].body == large
        assert messages[uid_large].size == len(large)
        internal_date = messages[uid_small].internal_date
        assert internal_date is not None
        assert internal_date.tzinfo is not None
        # BODY.PEEK[] leaves \Seen alone.
        flags = await client.uid_fetch([uid_small, uid_large], "(UID FLAGS)")
        assert all(m.flags is not None and "\\Seen" not in m.flags for m in flags)


async def test_uid_search(dovecot: Dovecot, mail_user: MailUser) -> None:
    uids = [await dovecot.aappend(mail_user, make_message()) for _ in range(3)]
    async with client_for(dovecot) as client:
        await client.login(mail_user.name, mail_user.password)
        await client.select("INBOX")
        assert await client.uid_search("ALL") == uids
        assert await client.uid_search(f"UID {uids[1]}:*") == uids[1:]
        # "n:*" with n above the highest UID still matches the highest message.
        assert await client.uid_search(f"UID {uids[-1] + 5}:*") == [uids[-1]]


async def test_idle_sees_new_mail(dovecot: Dovecot, mail_user: MailUser) -> None:
    async with client_for(dovecot, Security.SSL_ON_CONNECT) as client:
        await client.login(mail_user.name, mail_user.password)
        await client.select("INBOX")
        initial = await client.idle_start()
        assert client.idling
        assert initial == []
        assert await client.idle_wait(0.01) is None  # nothing yet: the wait just times out
        await dovecot.aappend(mail_user, make_message())
        response = await client.idle_wait(30)
        while response is not None and response.type != "EXISTS":
            response = await client.idle_wait(30)
        assert response is not None
        assert (response.kind, response.number) == (ResponseKind.UNTAGGED, 1)
        await client.idle_done()
        assert not client.idling
        await client.noop()  # usable again after DONE


async def test_done_and_uid_fetch_in_one_write(dovecot: Dovecot, mail_user: MailUser) -> None:
    """New mail while idling: DONE and UID FETCH go out pipelined; both answers are read, the
    session is usable after, and a refused FETCH is an error without breaking the session."""
    async with client_for(dovecot, Security.SSL_ON_CONNECT) as client:
        await client.login(mail_user.name, mail_user.password)
        await client.select("INBOX")
        await client.idle_start()
        uid = await dovecot.aappend(mail_user, make_message(subject="pipelined"))
        response = await client.idle_wait(30)
        while response is not None and response.type != "EXISTS":
            response = await client.idle_wait(30)
        before, fetched = await client.idle_done_uid_fetch(f"{uid}:*", "(UID BODY.PEEK[])")
        assert not client.idling
        assert [m.uid for m in fetched] == [uid]
        assert fetched[0].body is not None and b"Subject: pipelined" in fetched[0].body
        assert all(r.type != "FETCH" for r in before)
        await client.noop()

        await client.idle_start()
        with pytest.raises(MailProtocolError, match="UID FETCH"):
            await client.idle_done_uid_fetch("1:*", "(NO-SUCH-ITEM)")
        assert not client.idling
        await client.noop()  # IDLE ended cleanly before the refused command


async def test_idle_context_manager(dovecot: Dovecot, mail_user: MailUser) -> None:
    async with client_for(dovecot) as client:
        await client.login(mail_user.name, mail_user.password)
        await client.select("INBOX")
        async with client.idle() as session:
            await dovecot.aappend(mail_user, make_message())
            async for response in session:
                if response.type == "EXISTS":
                    break
        assert not client.idling
        assert (await client.select("INBOX")).exists == 1


async def test_command_in_idle_is_refused(logged_in: ImapClient) -> None:
    await logged_in.select("INBOX")
    await logged_in.idle_start()
    with pytest.raises(RuntimeError):
        await logged_in.noop()
    await logged_in.idle_done()


async def test_kick_during_idle_is_connect_error(dovecot: Dovecot, mail_user: MailUser) -> None:
    async with client_for(dovecot) as client:
        await client.login(mail_user.name, mail_user.password)
        await client.select("INBOX")
        await client.idle_start()
        await dovecot.akick(mail_user)
        with pytest.raises(MailConnectError):
            while True:
                await client.idle_wait(30)
        assert not client.connected
        with pytest.raises(MailConnectError, match="closed"):
            await client.noop()


async def test_noop_reports_new_mail(dovecot: Dovecot, logged_in: ImapClient, mail_user: MailUser) -> None:
    await logged_in.select("INBOX")
    await dovecot.aappend(mail_user, make_message())
    responses = await logged_in.noop()
    assert any(r.type == "EXISTS" and r.number == 1 for r in responses)


async def test_id_enable_status(logged_in: ImapClient) -> None:
    server = await logged_in.id({"name": "emlisten", "version": "test"})
    assert server.get("name") == "Dovecot"
    assert await logged_in.enable("CONDSTORE") == {"CONDSTORE"}
    status = await logged_in.status("INBOX")
    assert status["MESSAGES"] == 0
    assert status["UIDNEXT"] == 1
    assert status["UIDVALIDITY"] > 0


async def test_logout_then_commands_fail(logged_in: ImapClient) -> None:
    await logged_in.logout()
    with pytest.raises(MailConnectError):
        await logged_in.noop()


async def test_response_line_bound_is_enforced(dovecot: Dovecot, mail_user: MailUser) -> None:
    for _ in range(30):
        await dovecot.aappend(mail_user, make_message())
    async with client_for(dovecot) as client:
        await client.login(mail_user.name, mail_user.password)
        await client.select("INBOX")
        client._parser.max_line_bytes = 80  # the greeting alone is longer
        with pytest.raises(MailProtocolError, match="longer than 80"):
            await client.uid_search("ALL")
        assert not client.connected


async def test_literal_bound_is_enforced(dovecot: Dovecot, mail_user: MailUser) -> None:
    uid = await dovecot.aappend(mail_user, make_message(body="x" * 5000))
    async with client_for(dovecot, max_literal_bytes=1000) as client:
        await client.login(mail_user.name, mail_user.password)
        await client.select("INBOX")
        with pytest.raises(MailProtocolError, match="larger than 1000"):
            await client.uid_fetch([uid])


async def _silent_imap_peer(task_status: trio.TaskStatus[int]) -> None:
    """A peer that greets and then never answers: what a dead network path looks like."""

    async def handler(stream: trio.SocketStream) -> None:
        await stream.send_all(b"* OK [CAPABILITY IMAP4rev1 IDLE] hello\r\n")
        await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def test_silent_server_times_out() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_silent_imap_peer)
        client = ImapClient(ServerEndpoint("127.0.0.1", port, Security.NONE), command_timeout=0.2)
        await client.connect()
        with pytest.raises(MailConnectError, match=r"LOGIN: no answer .* within 0\.2s"):
            await client.login("user", "secret")
        assert not client.connected
        await client.close()
        nursery.cancel_scope.cancel()


async def test_silent_server_during_connect_times_out() -> None:
    async def mute(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, mute, listeners)
        client = ImapClient(ServerEndpoint("127.0.0.1", port, Security.SSL_ON_CONNECT), connect_timeout=0.2)
        with pytest.raises(MailConnectError, match=r"TLS handshake .* timed out"):
            await client.connect()
        nursery.cancel_scope.cancel()


def test_astring_and_sequence_set() -> None:
    assert astring("user") == b"user"
    assert astring("a b") == b'"a b"'
    assert astring('a"b\\') == b'"a\\"b\\\\"'
    assert astring("") == b'""'
    literal = astring("pässwörd")
    assert not isinstance(literal, bytes)
    assert literal.data == "pässwörd".encode()
    assert "pässwörd" not in repr(literal)
    assert sequence_set([5, 1, 2, 3, 9, 10, 7]) == b"1:3,5,7,9:10"
    assert sequence_set([4]) == b"4"


async def test_an_answer_with_another_commands_tag_names_both_tags(nursery: trio.Nursery) -> None:
    """A server that mixes up tags (seen once under load, server unknown) gets a protocol error
    that says which tag came and which was awaited: "unexpected tagged response" alone could
    not be traced."""

    async def mixed_up_server(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
            received = b""
            while b"\r\n" not in received:
                received += await stream.receive_some(1024)
            tag = received.split(b" ", 1)[0]
            await stream.send_all(b"Z" + tag + b" OK not yours\r\n")
            await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, mixed_up_server, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    async with ImapClient(ServerEndpoint("127.0.0.1", port, Security.NONE)) as client:
        with pytest.raises(MailProtocolError, match=r"127\.0\.0\.1:\d+: Z(\w+) OK, waiting for \1$"):
            await client.noop(timeout=5)
