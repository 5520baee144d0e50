"""validate(): every failure category, distinguishable, against real servers (Dovecot, aiosmtpd,
and raw TCP listeners for the network failures)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from emlisten.mail.imap import ImapSource
from emlisten.mail.validate import validate
from emlisten.models import MailboxConfig, Security, ServerEndpoint
from tests.servers.dovecot import Dovecot, MailUser, free_port, mailbox_for, make_tls_files
from tests.servers.smtp import SmtpServer
from tests.servers.tokeninfo import TokenInfoServer

pytestmark = pytest.mark.dovecot


def source_for(ca_file: Path | str | None, *, connect_timeout: float = 10) -> ImapSource:
    return ImapSource(
        ca_file=None if ca_file is None else str(ca_file), connect_timeout=connect_timeout, command_timeout=10
    )


async def test_valid_imap(dovecot: Dovecot, mail_user: MailUser) -> None:
    result = await validate(mailbox_for(dovecot, mail_user), source_for(dovecot.ca_file), check_smtp=True)
    assert result.is_valid, result
    assert result.to_json() == {
        "IsValid": True,
        "Message": "IMAP settings are valid",
        "Data": {"Imap": {"Server": f"127.0.0.1:{dovecot.imaps_port}", "Folders": ["INBOX"]}, "Smtp": None},
    }


async def test_dns_failure(dovecot: Dovecot, mail_user: MailUser) -> None:
    mailbox = mailbox_for(
        dovecot, mail_user, imap=ServerEndpoint("imap.nonexistent.invalid", 993, Security.SSL_ON_CONNECT)
    )
    result = await validate(mailbox, source_for(dovecot.ca_file), check_smtp=False)
    assert not result.is_valid
    assert result.message.startswith("IMAP: cannot resolve imap.nonexistent.invalid")
    assert result.data == {"Stage": "imap", "Category": "dns", "Server": "imap.nonexistent.invalid:993"}


async def test_connection_refused(dovecot: Dovecot, mail_user: MailUser) -> None:
    port = free_port()
    mailbox = mailbox_for(dovecot, mail_user, imap=ServerEndpoint("127.0.0.1", port, Security.NONE))
    result = await validate(mailbox, source_for(dovecot.ca_file), check_smtp=False)
    assert not result.is_valid
    assert result.data is not None and result.data["Category"] == "connect"
    assert "refused" in result.message.lower()


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A TCP listener that accepts and never says a word (a hung server)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    held: list[trio.SocketStream] = []

    async def accept_forever() -> None:
        while True:
            held.append(await listeners[0].accept())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_forever)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()
    for stream in held:
        await stream.aclose()
    await listeners[0].aclose()


async def test_timeout(dovecot: Dovecot, mail_user: MailUser, silent_server: int) -> None:
    mailbox = mailbox_for(dovecot, mail_user, imap=ServerEndpoint("127.0.0.1", silent_server, Security.NONE))
    result = await validate(mailbox, source_for(dovecot.ca_file, connect_timeout=0.5), check_smtp=False)
    assert not result.is_valid
    assert result.data is not None and result.data["Category"] == "timeout"
    assert "timed out" in result.message


@pytest.fixture(scope="module")
def foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ca, _, _ = make_tls_files(tmp_path_factory.mktemp("foreign-ca"))
    return ca


async def test_tls_certificate_not_trusted(dovecot: Dovecot, mail_user: MailUser, foreign_ca: Path) -> None:
    result = await validate(mailbox_for(dovecot, mail_user), source_for(foreign_ca), check_smtp=False)
    assert not result.is_valid
    assert result.data is not None and result.data["Category"] == "tls"
    assert "certificate verification failed" in result.message


async def test_tls_handshake_against_a_plain_port(dovecot: Dovecot, mail_user: MailUser) -> None:
    # SSL-on-connect to the plain IMAP port: the server greets in clear text.
    mailbox = mailbox_for(
        dovecot, mail_user, imap=ServerEndpoint(dovecot.host, dovecot.imap_port, Security.SSL_ON_CONNECT)
    )
    result = await validate(mailbox, source_for(dovecot.ca_file), check_smtp=False)
    assert not result.is_valid
    assert result.data is not None and result.data["Category"] == "tls"
    assert "TLS handshake" in result.message


async def test_authentication_rejected(dovecot: Dovecot, mail_user: MailUser) -> None:
    mailbox = mailbox_for(dovecot, mail_user, password="wrong-password-123")
    result = await validate(mailbox, source_for(dovecot.ca_file), check_smtp=False)
    assert not result.is_valid
    assert result.data is not None and result.data["Category"] == "authentication"
    assert "AUTHENTICATIONFAILED" in result.message
    assert "wrong-password-123" not in result.message


async def test_oauth_token_rejected(oauth_dovecot: Dovecot, tokeninfo: TokenInfoServer) -> None:
    user = "validate-oauth@example.test"
    token = tokeninfo.issue(user)
    tokeninfo.revoke(token)
    mailbox = MailboxConfig(
        id="mb-oauth",
        user_name=user,
        imap=ServerEndpoint(oauth_dovecot.host, oauth_dovecot.imap_port, Security.NONE),
        bpm_endpoint="http://127.0.0.1:1/",
        access_token=token,
        use_oauth=True,
    )
    result = await validate(mailbox, source_for(oauth_dovecot.ca_file), check_smtp=False)
    assert not result.is_valid
    assert result.data is not None and result.data["Category"] == "token"
    assert token not in result.message

    good = mailbox.replace(access_token=tokeninfo.issue(user))
    assert (await validate(good, source_for(oauth_dovecot.ca_file), check_smtp=False)).is_valid


async def test_missing_folders_are_named(dovecot: Dovecot, mail_user: MailUser) -> None:
    mailbox = mailbox_for(dovecot, mail_user, folders=("INBOX", "Nope", "Sent", "Gone/Too"))
    result = await validate(mailbox, source_for(dovecot.ca_file), check_smtp=False)
    assert not result.is_valid
    assert result.data is not None and result.data["Category"] == "folder"
    assert "'Nope'" in result.message and "'Gone/Too'" in result.message
    assert "'Sent'" not in result.message


# -- SMTP -------------------------------------------------------------------------------------


@pytest.fixture(params=["plain", "starttls"])
def smtp_server(request: pytest.FixtureRequest, mail_user: MailUser) -> Iterator[SmtpServer]:
    with SmtpServer(
        mode=request.param, users={mail_user.name: mail_user.password}, oauth_tokens={}
    ) as server:
        yield server


def smtp_endpoint(server: SmtpServer) -> ServerEndpoint:
    security = {"plain": Security.NONE, "starttls": Security.STARTTLS, "tls": Security.SSL_ON_CONNECT}[
        server.mode
    ]
    return ServerEndpoint(server.host, server.port, security)


@pytest.fixture
def ca_bundle(tmp_path: Path, dovecot: Dovecot, smtp_server: SmtpServer) -> Path:
    """One CA file trusting both test servers (the service has one CA setting for both)."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(dovecot.ca_file.read_text() + smtp_server.ca_file.read_text())
    return bundle


async def test_smtp_valid(
    dovecot: Dovecot, mail_user: MailUser, smtp_server: SmtpServer, ca_bundle: Path
) -> None:
    mailbox = mailbox_for(dovecot, mail_user, smtp=smtp_endpoint(smtp_server))
    result = await validate(mailbox, source_for(ca_bundle), check_smtp=True)
    assert result.is_valid, result
    assert result.message == "IMAP and SMTP settings are valid"
    assert result.data is not None
    assert result.data["Smtp"] == {"Server": f"127.0.0.1:{smtp_server.port}", "Authenticated": True}
    # check_smtp=False skips it.
    skipped = await validate(mailbox, source_for(ca_bundle), check_smtp=False)
    assert skipped.is_valid and skipped.data is not None and skipped.data["Smtp"] is None


async def test_smtp_wrong_password(
    dovecot: Dovecot, mail_user: MailUser, smtp_server: SmtpServer, ca_bundle: Path
) -> None:
    smtp_server.users[mail_user.name] = "another-password"
    mailbox = mailbox_for(dovecot, mail_user, smtp=smtp_endpoint(smtp_server))
    result = await validate(mailbox, source_for(ca_bundle), check_smtp=True)
    assert not result.is_valid
    assert result.data == {
        "Stage": "smtp",
        "Category": "authentication",
        "Server": f"127.0.0.1:{smtp_server.port}",
    }
    assert result.message.startswith("SMTP: authentication rejected")
    assert mail_user.password not in result.message


@pytest.mark.parametrize("mode", ["starttls", "tls"])
async def test_smtp_untrusted_certificate(dovecot: Dovecot, mail_user: MailUser, mode: str) -> None:
    with SmtpServer(mode=mode, users={mail_user.name: mail_user.password}) as server:  # type: ignore[arg-type]
        mailbox = mailbox_for(dovecot, mail_user, smtp=smtp_endpoint(server))
        # Dovecot's CA only: IMAP passes, the SMTP server's certificate is not trusted.
        result = await validate(mailbox, source_for(dovecot.ca_file), check_smtp=True)
    assert not result.is_valid
    assert result.data is not None and (result.data["Stage"], result.data["Category"]) == ("smtp", "tls")
    assert "certificate verification failed" in result.message


async def test_smtp_implicit_tls(dovecot: Dovecot, mail_user: MailUser, tmp_path: Path) -> None:
    """Implicit TLS (465): the probe upgrades at once, then authenticates."""
    with SmtpServer(mode="tls", users={mail_user.name: mail_user.password}) as server:
        bundle = tmp_path / "bundle.pem"
        bundle.write_text(dovecot.ca_file.read_text() + server.ca_file.read_text())
        mailbox = mailbox_for(dovecot, mail_user, smtp=smtp_endpoint(server))
        result = await validate(mailbox, source_for(bundle), check_smtp=True)
    assert result.is_valid, result
    assert result.data is not None
    assert result.data["Smtp"] == {"Server": f"127.0.0.1:{server.port}", "Authenticated": True}


async def test_smtp_refused_and_dns(dovecot: Dovecot, mail_user: MailUser) -> None:
    closed = ServerEndpoint("127.0.0.1", free_port(), Security.NONE)
    result = await validate(
        mailbox_for(dovecot, mail_user, smtp=closed), source_for(dovecot.ca_file), check_smtp=True
    )
    assert not result.is_valid
    assert result.data is not None and (result.data["Stage"], result.data["Category"]) == ("smtp", "connect")
    assert "refused" in result.message.lower()

    unknown = ServerEndpoint("smtp.nonexistent.invalid", 587, Security.STARTTLS)
    result = await validate(
        mailbox_for(dovecot, mail_user, smtp=unknown), source_for(dovecot.ca_file), check_smtp=True
    )
    assert result.data is not None and (result.data["Stage"], result.data["Category"]) == ("smtp", "dns")
    assert "cannot resolve smtp.nonexistent.invalid" in result.message


async def test_smtp_oauth(dovecot: Dovecot, mail_user: MailUser) -> None:
    # IMAP by password user on the plain Dovecot, SMTP by XOAUTH2: validate uses the token for
    # both when use_oauth, so check the SMTP probe part directly.
    from emlisten.mail.validate import CheckFailed, probe_smtp

    with SmtpServer(mode="plain", oauth_tokens={"carol": "good-token"}) as server:
        endpoint = ServerEndpoint(server.host, server.port, Security.NONE)
        assert await probe_smtp(endpoint, "carol", "good-token", use_oauth=True) is True
        # A plain-only server cannot take the token.
    with SmtpServer(mode="plain", users={"carol": "pw"}) as server:
        server_without_xoauth2 = ServerEndpoint(server.host, server.port, Security.NONE)
        # (The test server always offers XOAUTH2; its failure path never answers the client's
        # empty response, so the rejected-token case is covered on IMAP only.)
        with pytest.raises(CheckFailed) as caught:
            await probe_smtp(server_without_xoauth2, "carol", "wrong", use_oauth=False)
        assert caught.value.category == "authentication"
        assert "wrong" not in caught.value.message
