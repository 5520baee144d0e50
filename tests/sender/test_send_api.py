"""POST /apiv2/email/send end to end: real Hypercorn, real SMTP server (aiosmtpd), real Dovecot."""

from __future__ import annotations

import base64
import email
import email.policy
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from emlisten.api._guard import ApiAccess
from emlisten.api.app import create_app
from emlisten.api.send import SEND_PATH, send_blueprint
from emlisten.api.server import serve_api
from emlisten.sender.smtp import SmtpSender
from tests.api.test_http import RecordingControl
from tests.sender.conftest import MakeSmtpServer, with_bridge
from tests.servers.dovecot import Dovecot, MailUser, free_port
from tests.servers.smtp import SmtpServer

MAILBOX_ID = "0F8FAD5B-D9CB-469F-A165-70867728950E"
FILE = bytes(range(256)) * 10


@asynccontextmanager
async def running_api(
    sender_factory: Callable[[], SmtpSender], *, api_token: str | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    # The token on Creatio's routes too: the set-up with a reverse proxy adding it.
    access = ApiAccess(creatio_routes_need_token=True)
    app = create_app(RecordingControl(), api_token=api_token, access=access)  # type: ignore[arg-type]
    app.register_blueprint(send_blueprint(sender_factory))
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(serve_api, app, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
        nursery.cancel_scope.cancel()


def credentials(user: MailUser, dovecot: Dovecot, smtp_port: int, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "Id": MAILBOX_ID,
        "UserName": user.name,
        "Password": user.password,
        "SenderEmailAddress": user.email,
        "ServiceUrl": dovecot.host,
        "Port": dovecot.imap_port,
        "UseSsl": False,
        "SecureOption": 0,
        "SmtpServer": "127.0.0.1",
        "SmtpPort": smtp_port,
        "SmtpSecureOption": "StartTls",
    }
    data.update(overrides)
    return data


def email_json(user: MailUser, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "Subject": "From Creatio",
        "Body": "<p>Dear customer</p>",
        "IsHtmlBody": True,
        "Sender": user.email,
        "Recepients": ["customer@example.test"],
        "CopyRecepients": [],
        "BlindCopyRecepients": ["audit@example.test"],
        "Importance": 2,
        "Attachments": [
            {"Name": "inside.bin", "Base64Data": base64.b64encode(FILE).decode(), "IsInline": False}
        ],
    }
    data.update(overrides)
    return data


def sender_for(server: SmtpServer) -> Callable[[], SmtpSender]:
    sender = SmtpSender(ca_file=str(server.ca_file))
    return lambda: sender


@with_bridge
async def test_send_end_to_end(
    make_smtp_server: MakeSmtpServer, dovecot: Dovecot, mail_user: MailUser
) -> None:
    server = make_smtp_server(mode="starttls", users={mail_user.name: mail_user.password})
    body = {
        "email": email_json(mail_user),
        "Credentials": credentials(mail_user, dovecot, server.port),  # no BpmEndpoint: not needed to send
        "Attachments": [{"Name": "beside.txt", "Base64Data": base64.b64encode(b"beside").decode()}],
    }
    async with running_api(sender_for(server)) as client:
        response = await client.post(SEND_PATH, content=json.dumps(body))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    message_id = response.json()
    assert (
        isinstance(message_id, str) and message_id.startswith("<") and message_id.endswith("@example.test>")
    )
    assert response.headers["X-Emlisten-Saved-To-Sent"] == "true"
    assert response.headers["X-Emlisten-Sent-Folder"] == "Sent"

    [received] = await server.await_messages(1)
    assert received.rcpt_tos == ["customer@example.test", "audit@example.test"]
    message = email.message_from_bytes(received.data, policy=email.policy.default)
    assert message["Message-ID"] == message_id
    assert message["Bcc"] is None
    assert message["X-Priority"] == "1 (Highest)"
    files = {part.get_filename(): part.get_content() for part in message.iter_attachments()}
    assert files == {"inside.bin": FILE, "beside.txt": "beside"}
    assert len(await dovecot.auids(mail_user, "Sent")) == 1


def error_of(response: httpx.Response) -> dict[str, Any]:
    payload = response.json()
    assert isinstance(payload, dict)
    return payload


@with_bridge
async def test_validation_errors(
    make_smtp_server: MakeSmtpServer, dovecot: Dovecot, mail_user: MailUser
) -> None:
    server = make_smtp_server(users={mail_user.name: mail_user.password})
    creds = credentials(mail_user, dovecot, server.port)
    cases: list[tuple[Any, str]] = [
        (
            {"Email": email_json(mail_user, Recepients=[], BlindCopyRecepients=[]), "Credentials": creds},
            "Email.Recepients",
        ),
        (
            {
                "Email": email_json(mail_user, Attachments=[{"Name": "x", "Base64Data": "@@@"}]),
                "Credentials": creds,
            },
            "Email.Attachments[0].Base64Data",
        ),
        ({"Email": email_json(mail_user), "Credentials": {**creds, "Password": ""}}, "Credentials.Password"),
        (
            {"Email": email_json(mail_user), "Credentials": {**creds, "SmtpPort": 70000}},
            "Credentials.SmtpPort",
        ),
        ({"Email": email_json(mail_user)}, "Credentials"),
        ({"Credentials": creds}, "Email"),
        ([1, 2], "body"),
    ]
    async with running_api(sender_for(server)) as client:
        for body, field in cases:
            response = await client.post(SEND_PATH, json=body)
            assert response.status_code == 400, (field, response.text)
            payload = error_of(response)
            assert payload["Message"] == "Invalid request"
            assert payload["Errors"][0]["Field"] == field
        response = await client.post(SEND_PATH, content=b'{"Email": ')
        assert response.status_code == 400
        assert error_of(response)["Errors"][0]["Field"] == "body"
    assert server.messages == []


@with_bridge
async def test_rejected_recipient_is_422(
    make_smtp_server: MakeSmtpServer, dovecot: Dovecot, mail_user: MailUser
) -> None:
    server = make_smtp_server(users={mail_user.name: mail_user.password}, rejected={"gone@example.test"})
    body = {
        "Email": email_json(mail_user, Recepients=["customer@example.test", "gone@example.test"]),
        "Credentials": credentials(mail_user, dovecot, server.port, SmtpSecureOption="None"),
    }
    async with running_api(sender_for(server)) as client:
        response = await client.post(SEND_PATH, json=body)
    assert response.status_code == 422
    payload = error_of(response)
    assert list(payload["RejectedRecipients"]) == ["gone@example.test"]
    assert payload["RejectedRecipients"]["gone@example.test"].startswith("550")
    assert server.messages == []


@with_bridge
async def test_size_limit_is_422(
    make_smtp_server: MakeSmtpServer, dovecot: Dovecot, mail_user: MailUser
) -> None:
    server = make_smtp_server(users={mail_user.name: mail_user.password}, size_limit=1000)
    body = {
        "Email": email_json(mail_user),
        "Credentials": credentials(mail_user, dovecot, server.port, SmtpSecureOption=0),
    }
    async with running_api(sender_for(server)) as client:
        response = await client.post(SEND_PATH, json=body)
    assert response.status_code == 422
    payload = error_of(response)
    assert (payload["MaxSize"], payload["SmtpCode"]) == (1000, 552)


@with_bridge
async def test_upstream_auth_and_connect_failures_are_502(
    make_smtp_server: MakeSmtpServer, dovecot: Dovecot, mail_user: MailUser
) -> None:
    server = make_smtp_server(mode="tls", users={mail_user.name: mail_user.password})
    wrong = "not-the-Password-123"
    bad_auth = {
        "Email": email_json(mail_user),
        "Credentials": credentials(
            mail_user, dovecot, server.port, Password=wrong, SmtpSecureOption="SslOnConnect"
        ),
    }
    refused_port = free_port()
    unreachable = {
        "Email": email_json(mail_user),
        "Credentials": credentials(mail_user, dovecot, refused_port, SmtpSecureOption="None"),
    }
    async with running_api(sender_for(server)) as client:
        auth_response = await client.post(SEND_PATH, json=bad_auth)
        connect_response = await client.post(SEND_PATH, json=unreachable)
    assert auth_response.status_code == 502
    assert error_of(auth_response)["Reason"] == "authentication"
    assert wrong not in auth_response.text
    assert connect_response.status_code == 502
    payload = error_of(connect_response)
    assert (payload["Reason"], payload["Phase"]) == ("connection", "connect")
    assert f"127.0.0.1:{refused_port}" in payload["Message"]


@with_bridge
async def test_bearer_token_applies_to_send(
    make_smtp_server: MakeSmtpServer, dovecot: Dovecot, mail_user: MailUser
) -> None:
    server = make_smtp_server(users={mail_user.name: mail_user.password})
    async with running_api(sender_for(server), api_token="tok-123") as client:
        response = await client.post(SEND_PATH, json={})
        assert response.status_code == 401
        response = await client.post(SEND_PATH, json={}, headers={"Authorization": "Bearer tok-123"})
        assert response.status_code == 400
