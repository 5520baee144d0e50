"""SmtpSender against a real SMTP server (aiosmtpd) and the test Dovecot for the Sent copy."""

from __future__ import annotations

import base64
import email
import email.policy
from email.message import EmailMessage
from typing import Any

import pytest
import trio

from emlisten.models import MailboxConfig, Security, ServerEndpoint
from emlisten.sender import (
    SendAuthError,
    SendConnectError,
    SendRejectedRecipients,
    SendSizeError,
)
from emlisten.sender.compose import ComposedMessage, compose
from emlisten.sender.smtp import SmtpSender, smtp_endpoint
from tests.sender.conftest import MakeSmtpServer, mailbox_for, with_bridge
from tests.servers.dovecot import Dovecot, MailUser, free_port

ATTACHMENT = bytes(range(256)) * 40


def composed_for(user: MailUser, **fields: Any) -> ComposedMessage:
    data: dict[str, Any] = {
        "Subject": "Quarterly report",
        "Body": "<p>Hello <b>Bob</b></p>",
        "IsHtmlBody": True,
        "Sender": f"Alice <{user.email}>",
        "Recepients": ["bob@example.test"],
        "Attachments": [{"Name": "report.bin", "Base64Data": base64.b64encode(ATTACHMENT).decode()}],
    }
    data.update(fields)
    return compose(data)


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


@pytest.mark.parametrize("mode", ["plain", "starttls", "tls"])
@with_bridge
async def test_send_over_each_transport(
    mode: str, make_smtp_server: MakeSmtpServer, dovecot: Dovecot, mail_user: MailUser
) -> None:
    server = make_smtp_server(mode=mode, users={mail_user.name: mail_user.password})
    sender = SmtpSender(ca_file=str(server.ca_file), save_to_sent=False)
    mailbox = mailbox_for(mail_user, dovecot, server)
    composed = composed_for(mail_user)
    await sender.send(mailbox, composed.data, composed.envelope_from, composed.recipients)
    [received] = await server.await_messages(1)
    assert received.auth_user == mail_user.name
    assert received.mail_from == mail_user.email
    assert received.rcpt_tos == ["bob@example.test"]
    assert received.data == composed.data
    message = parse(received.data)
    assert [p.get_content_type() for p in message.walk()] == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "application/octet-stream",
    ]
    [attachment] = list(message.iter_attachments())
    assert attachment.get_content() == ATTACHMENT


@with_bridge
async def test_size_is_announced_in_mail_from(
    make_smtp_server: MakeSmtpServer, dovecot: Dovecot, mail_user: MailUser
) -> None:
    server = make_smtp_server(users={mail_user.name: mail_user.password}, size_limit=10_000_000)
    composed = composed_for(mail_user)
    await SmtpSender(save_to_sent=False).send(
        mailbox_for(mail_user, dovecot, server), composed.data, composed.envelope_from, composed.recipients
    )
    [received] = await server.await_messages(1)
    assert f"SIZE={len(composed.data)}" in received.mail_options


@with_bridge
async def test_cc_and_bcc_go_to_the_envelope_only(
    make_smtp_server: MakeSmtpServer, dovecot: Dovecot, mail_user: MailUser
) -> None:
    server = make_smtp_server(users={mail_user.name: mail_user.password})
    composed = composed_for(
        mail_user,
        Recepients=["to@example.test"],
        CopyRecepients=["cc@example.test"],
        BlindCopyRecepients=["secret@example.test"],
        InReplyTo="<parent@example.test>",
        References="<root@example.test>",
    )
    await SmtpSender(save_to_sent=False).send(
        mailbox_for(mail_user, dovecot, server), composed.data, composed.envelope_from, composed.recipients
    )
    [received] = await server.await_messages(1)
    assert received.rcpt_tos == ["to@example.test", "cc@example.test", "secret@example.test"]
    assert b"secret@example.test" not in received.data
    message = parse(received.data)
    assert message["Cc"] == "cc@example.test"
    assert message["Bcc"] is None
    assert message["In-Reply-To"] == "<parent@example.test>"
    assert message["References"] == "<root@example.test> <parent@example.test>"


@with_bridge
async def test_rejected_recipient_sends_nothing(
    make_smtp_server: MakeSmtpServer, dovecot: Dovecot, mail_user: MailUser
) -> None:
    server = make_smtp_server(users={mail_user.name: mail_user.password}, rejected={"nobody@example.test"})
    composed = composed_for(mail_user, Recepients=["bob@example.test", "nobody@example.test"])
    with pytest.raises(SendRejectedRecipients) as caught:
        await SmtpSender(save_to_sent=False).send(
            mailbox_for(mail_user, dovecot, server),
            composed.data,
            composed.envelope_from,
            composed.recipients,
        )
    assert list(caught.value.recipients) == ["nobody@example.test"]
    assert caught.value.recipients["nobody@example.test"].startswith("550 5.1.1")
    assert "nobody@example.test" in caught.value.message
    # The transaction was reset: nothing reached anyone. A later send on a new session works.
    ok = composed_for(mail_user)
    await SmtpSender(save_to_sent=False).send(
        mailbox_for(mail_user, dovecot, server), ok.data, ok.envelope_from, ok.recipients
    )
    [received] = await server.await_messages(1)
    assert received.data == ok.data


@with_bridge
async def test_wrong_password(
    make_smtp_server: MakeSmtpServer, dovecot: Dovecot, mail_user: MailUser
) -> None:
    server = make_smtp_server(mode="starttls", users={mail_user.name: mail_user.password})
    wrong = "Wrong-Pa55word-xyz"
    mailbox = mailbox_for(mail_user, dovecot, server, password=wrong)
    composed = composed_for(mail_user)
    with pytest.raises(SendAuthError) as caught:
        await SmtpSender(ca_file=str(server.ca_file), save_to_sent=False).send(
            mailbox, composed.data, composed.envelope_from, composed.recipients
        )
    assert caught.value.code == 535
    assert wrong not in str(caught.value) and wrong not in repr(caught.value.args)
    assert server.messages == []


@with_bridge
async def test_size_limit(make_smtp_server: MakeSmtpServer, dovecot: Dovecot, mail_user: MailUser) -> None:
    server = make_smtp_server(users={mail_user.name: mail_user.password}, size_limit=2000)
    composed = composed_for(mail_user)
    assert len(composed.data) > 2000
    with pytest.raises(SendSizeError) as caught:
        await SmtpSender(save_to_sent=False).send(
            mailbox_for(mail_user, dovecot, server),
            composed.data,
            composed.envelope_from,
            composed.recipients,
        )
    assert caught.value.code == 552
    assert caught.value.limit == 2000
    assert server.messages == []


@with_bridge
async def test_connection_refused(dovecot: Dovecot, mail_user: MailUser) -> None:
    port = free_port()  # nothing listens there
    mailbox = mailbox_for(mail_user, dovecot, None, smtp=ServerEndpoint("127.0.0.1", port, Security.NONE))
    composed = composed_for(mail_user)
    with pytest.raises(SendConnectError) as caught:
        await SmtpSender(save_to_sent=False).send(
            mailbox, composed.data, composed.envelope_from, composed.recipients
        )
    assert caught.value.phase == "connect"
    assert f"127.0.0.1:{port}" in caught.value.message


@with_bridge
async def test_dns_failure(dovecot: Dovecot, mail_user: MailUser) -> None:
    mailbox = mailbox_for(
        mail_user, dovecot, None, smtp=ServerEndpoint("no-such-host.invalid", 587, Security.STARTTLS)
    )
    composed = composed_for(mail_user)
    with pytest.raises(SendConnectError) as caught:
        await SmtpSender(save_to_sent=False).send(
            mailbox, composed.data, composed.envelope_from, composed.recipients
        )
    assert caught.value.phase == "dns"


@with_bridge
async def test_untrusted_certificate(
    make_smtp_server: MakeSmtpServer, dovecot: Dovecot, mail_user: MailUser
) -> None:
    server = make_smtp_server(mode="tls", users={mail_user.name: mail_user.password})
    composed = composed_for(mail_user)
    with pytest.raises(SendConnectError) as caught:
        # dovecot's CA is not the SMTP server's: verification must fail.
        await SmtpSender(ca_file=str(dovecot.ca_file), save_to_sent=False).send(
            mailbox_for(mail_user, dovecot, server),
            composed.data,
            composed.envelope_from,
            composed.recipients,
        )
    assert caught.value.phase == "tls"
    assert "certificate verification failed" in caught.value.message
    # VerifyCertificate=false accepts it.
    mailbox = mailbox_for(
        mail_user,
        dovecot,
        None,
        smtp=ServerEndpoint(server.host, server.port, Security.SSL_ON_CONNECT, False),
    )
    await SmtpSender(ca_file=str(dovecot.ca_file), save_to_sent=False).send(
        mailbox, composed.data, composed.envelope_from, composed.recipients
    )
    await server.await_messages(1)


@with_bridge
async def test_starttls_required_but_not_offered(
    make_smtp_server: MakeSmtpServer, dovecot: Dovecot, mail_user: MailUser
) -> None:
    server = make_smtp_server(mode="plain", users={mail_user.name: mail_user.password})
    mailbox = mailbox_for(
        mail_user, dovecot, None, smtp=ServerEndpoint(server.host, server.port, Security.STARTTLS)
    )
    composed = composed_for(mail_user)
    with pytest.raises(SendConnectError) as caught:
        await SmtpSender(save_to_sent=False).send(
            mailbox, composed.data, composed.envelope_from, composed.recipients
        )
    assert caught.value.phase == "starttls"
    assert server.messages == []


@with_bridge
async def test_xoauth2(make_smtp_server: MakeSmtpServer, dovecot: Dovecot, mail_user: MailUser) -> None:
    token = "ya29.test-token-value"
    server = make_smtp_server(mode="starttls", oauth_tokens={mail_user.name: token})
    composed = composed_for(mail_user)
    sender = SmtpSender(ca_file=str(server.ca_file), save_to_sent=False)
    good = mailbox_for(mail_user, dovecot, server, use_oauth=True, access_token=token, password="")
    await sender.send(good, composed.data, composed.envelope_from, composed.recipients)
    [received] = await server.await_messages(1)
    assert received.auth_user == mail_user.name

    bad_token = "ya29.expired-token"
    bad = good.replace(access_token=bad_token)
    with pytest.raises(SendAuthError) as caught:
        await sender.send(bad, composed.data, composed.envelope_from, composed.recipients)
    assert bad_token not in str(caught.value)
    assert caught.value.code == 535


@with_bridge
async def test_send_message_saves_a_seen_copy_in_sent(
    make_smtp_server: MakeSmtpServer, dovecot: Dovecot, mail_user: MailUser
) -> None:
    server = make_smtp_server(mode="starttls", users={mail_user.name: mail_user.password})
    sender = SmtpSender(ca_file=str(server.ca_file))
    composed = composed_for(mail_user)
    result = await sender.send_message(mailbox_for(mail_user, dovecot, server), composed)
    assert result.saved_to_sent is True
    assert result.sent_folder == "Sent"
    assert result.message_id == composed.message_id
    assert result.warning is None
    uids = await dovecot.auids(mail_user, "Sent")
    assert uids == [result.sent_uid]

    def fetch() -> tuple[bytes, bytes]:
        with dovecot.imap(mail_user) as conn:
            conn.select('"Sent"', readonly=True)
            typ, data = conn.uid("FETCH", str(result.sent_uid), "(FLAGS BODY.PEEK[])")
            assert typ == "OK"
            first = data[0]
            assert isinstance(first, tuple)
            return first[0], first[1]

    meta, body = await trio.to_thread.run_sync(fetch)
    assert body == composed.data
    assert rb"\Seen" in meta
    [received] = await server.await_messages(1)
    assert received.data == body


@with_bridge
async def test_sent_copy_failure_is_a_warning(
    make_smtp_server: MakeSmtpServer, dovecot: Dovecot, mail_user: MailUser
) -> None:
    # SMTP accepts the password, IMAP (Dovecot) does not: the mail leaves, the copy fails.
    server = make_smtp_server(users={mail_user.name: "smtp-only-password"})
    mailbox = mailbox_for(mail_user, dovecot, server, password="smtp-only-password")
    composed = composed_for(mail_user)
    result = await SmtpSender().send_message(mailbox, composed)
    assert result.saved_to_sent is False
    assert result.warning is not None and "Sent" in result.warning
    assert "smtp-only-password" not in result.warning
    await server.await_messages(1)
    assert await dovecot.auids(mail_user, "Sent") == []


@with_bridge
async def test_save_to_sent_can_be_turned_off_per_mailbox(
    make_smtp_server: MakeSmtpServer, dovecot: Dovecot, mail_user: MailUser
) -> None:
    server = make_smtp_server(users={mail_user.name: mail_user.password})
    mailbox = mailbox_for(mail_user, dovecot, server, extra={"saveToSent": "false"})
    result = await SmtpSender().send_message(mailbox, composed_for(mail_user))
    assert (result.saved_to_sent, result.warning) == (False, None)
    assert await dovecot.auids(mail_user, "Sent") == []


def test_smtp_endpoint_defaults() -> None:
    def mailbox(security: Security, port: int, smtp: ServerEndpoint | None = None) -> MailboxConfig:
        return MailboxConfig(
            id="0f8fad5b-d9cb-469f-a165-70867728950e",
            user_name="u",
            imap=ServerEndpoint("mail.example.test", port, security, verify_certificate=False),
            bpm_endpoint="http://crm.example.test/",
            smtp=smtp,
        )

    assert smtp_endpoint(mailbox(Security.SSL_ON_CONNECT, 993)) == ServerEndpoint(
        "mail.example.test", 465, Security.SSL_ON_CONNECT, False
    )
    assert smtp_endpoint(mailbox(Security.STARTTLS, 143)) == ServerEndpoint(
        "mail.example.test", 587, Security.STARTTLS, False
    )
    assert smtp_endpoint(mailbox(Security.NONE, 143)).security is Security.STARTTLS_WHEN_AVAILABLE
    explicit = ServerEndpoint("smtp.example.test", 2525, Security.NONE)
    assert smtp_endpoint(mailbox(Security.SSL_ON_CONNECT, 993, explicit)) is explicit
