"""OAuth (XOAUTH2, OAUTHBEARER) logins against Dovecot's oauth2 passdb and a real tokeninfo server."""

from __future__ import annotations

import uuid

import pytest
import trio

from emlisten.errors import MailAuthError, MailTokenRejectedError
from emlisten.mail.imap import ImapClient, ImapSource
from emlisten.models import FolderInfo, MailboxConfig, Security, ServerEndpoint, SyncTask
from tests.servers.dovecot import Dovecot, MailUser, make_message
from tests.servers.tokeninfo import TokenInfoServer

pytestmark = pytest.mark.dovecot


def oauth_user() -> str:
    return f"oauth-{uuid.uuid4().hex[:12]}@example.test"


def endpoint(dovecot: Dovecot, security: Security = Security.NONE) -> ServerEndpoint:
    port = dovecot.imaps_port if security is Security.SSL_ON_CONNECT else dovecot.imap_port
    return ServerEndpoint(dovecot.host, port, security)


def oauth_mailbox(
    dovecot: Dovecot, user: str, token: str, security: Security = Security.NONE
) -> MailboxConfig:
    return MailboxConfig(
        id=f"mb-{user}",
        user_name=user,
        imap=endpoint(dovecot, security),
        bpm_endpoint="http://127.0.0.1:1/",
        access_token=token,
        use_oauth=True,
    )


async def connected(dovecot: Dovecot) -> ImapClient:
    client = ImapClient(endpoint(dovecot), ca_file=str(dovecot.ca_file), command_timeout=30)
    await client.connect()
    return client


async def test_server_offers_both_mechanisms(oauth_dovecot: Dovecot) -> None:
    client = await connected(oauth_dovecot)
    try:
        assert client.has_capability("AUTH=XOAUTH2")
        assert client.has_capability("AUTH=OAUTHBEARER")
        assert client.has_capability("SASL-IR")
    finally:
        await client.close()


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
async def test_valid_token_logs_in(
    oauth_dovecot: Dovecot, tokeninfo: TokenInfoServer, mechanism: str
) -> None:
    user = oauth_user()
    token = tokeninfo.issue(user)
    client = await connected(oauth_dovecot)
    try:
        if mechanism == "xoauth2":
            await client.authenticate_xoauth2(user, token)
        else:
            await client.authenticate_oauthbearer(user, token, oauth_dovecot.host, oauth_dovecot.imap_port)
        info = await client.examine("INBOX")
        assert info.exists == 0
    finally:
        await client.close()


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
async def test_revoked_token_is_rejected_with_the_servers_error(
    oauth_dovecot: Dovecot, tokeninfo: TokenInfoServer, mechanism: str
) -> None:
    user = oauth_user()
    token = tokeninfo.issue(user)
    tokeninfo.revoke(token)
    client = await connected(oauth_dovecot)
    try:
        with pytest.raises(MailTokenRejectedError) as caught:
            if mechanism == "xoauth2":
                await client.authenticate_xoauth2(user, token)
            else:
                await client.authenticate_oauthbearer(
                    user, token, oauth_dovecot.host, oauth_dovecot.imap_port
                )
        message = str(caught.value)
        assert token not in message
        assert "AUTHENTICATIONFAILED" in message
        # Dovecot's JSON error: XOAUTH2 {"status":"401","schemes":"bearer","scope":...},
        # OAUTHBEARER {"status":"invalid_token"}.
        assert ("status=401" in message) if mechanism == "xoauth2" else ("status=invalid_token" in message)
        assert isinstance(caught.value, MailAuthError)
    finally:
        await client.close()


async def test_token_for_another_user_is_rejected(oauth_dovecot: Dovecot, tokeninfo: TokenInfoServer) -> None:
    token = tokeninfo.issue(oauth_user())
    client = await connected(oauth_dovecot)
    try:
        with pytest.raises(MailTokenRejectedError):
            await client.authenticate_xoauth2(oauth_user(), token)
    finally:
        await client.close()


async def test_source_prefers_oauthbearer_and_asks_tokeninfo_on_every_login(
    oauth_dovecot: Dovecot, tokeninfo: TokenInfoServer
) -> None:
    user = oauth_user()
    token = tokeninfo.issue(user)
    source = ImapSource(ca_file=str(oauth_dovecot.ca_file), command_timeout=30)
    mailbox = oauth_mailbox(oauth_dovecot, user, token, Security.SSL_ON_CONNECT)
    before = tokeninfo.requests
    async with source.open_reader(mailbox) as reader:
        await reader.select("INBOX")
    assert tokeninfo.requests == before + 1
    assert f"user=<{user}>, method=OAUTHBEARER" in oauth_dovecot.log_text()

    # Expired since: the next login is refused, as the server asked tokeninfo again.
    tokeninfo.expire(token)
    with pytest.raises(MailTokenRejectedError) as caught:
        await source.connect(mailbox)
    assert token not in str(caught.value)
    assert tokeninfo.requests == before + 2


async def test_source_without_token_is_rejected_before_connecting(oauth_dovecot: Dovecot) -> None:
    source = ImapSource(ca_file=str(oauth_dovecot.ca_file))
    with pytest.raises(MailTokenRejectedError):
        await source.connect(oauth_mailbox(oauth_dovecot, oauth_user(), ""))


async def test_listen_with_oauth(oauth_dovecot: Dovecot, tokeninfo: TokenInfoServer) -> None:
    user = oauth_user()
    token = tokeninfo.issue(user)
    source = ImapSource(ca_file=str(oauth_dovecot.ca_file), command_timeout=30)
    send, receive = trio.open_memory_channel[SyncTask](10)

    async def on_new_mail(task: SyncTask) -> None:
        await send.send(task)

    # The OAuth user's mail: append through a password session of the same name is not
    # possible, so append through our own OAuth-authenticated client.
    async with trio.open_nursery() as nursery:
        info: FolderInfo = await nursery.start(
            source.listen, oauth_mailbox(oauth_dovecot, user, token), "INBOX", on_new_mail
        )
        assert info.name == "INBOX"
        with trio.fail_after(30):
            assert (await receive.receive()).reason == "catch-up"
        writer = await connected(oauth_dovecot)
        try:
            await writer.authenticate_xoauth2(user, token)
            assert writer.connected
            await _append(writer, make_message(subject="via oauth"))
        finally:
            await writer.close()
        with trio.fail_after(30):
            assert (await receive.receive()).reason == "exists"
        nursery.cancel_scope.cancel()


async def _append(client: ImapClient, message: bytes) -> None:
    # The IMAP client's APPEND belongs to the sender work; a raw command keeps this test
    # independent of it: LITERAL+ is advertised by Dovecot.
    from emlisten.mail.imap._client import Literal

    result = await client._command(b"APPEND", b"INBOX", Literal(message))
    assert result.status.type == "OK", result.status


async def test_password_users_still_log_in(oauth_dovecot: Dovecot) -> None:
    user: MailUser = oauth_dovecot.add_user()
    source = ImapSource(ca_file=str(oauth_dovecot.ca_file))
    mailbox = MailboxConfig(
        id="mb-pw",
        user_name=user.name,
        password=user.password,
        imap=endpoint(oauth_dovecot),
        bpm_endpoint="http://127.0.0.1:1/",
    )
    async with source.open_reader(mailbox) as reader:
        assert (await reader.select("INBOX")).exists == 0
