"""The mailbox routes over real HTTP (serve_api on port 0, httpx), against the real Dovecot."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import quart_trio
import trio

from emlisten.api.mailbox import mailbox_blueprint
from emlisten.api.server import serve_api
from emlisten.mail.imap import ImapSource
from emlisten.mail.imap._parser import encode_mailbox_name
from tests.servers.dovecot import Dovecot, MailUser, free_port

pytestmark = pytest.mark.dovecot


@dataclass
class Api:
    client: httpx.AsyncClient
    port: int


async def start(
    nursery: trio.Nursery,
    dovecot: Dovecot,
    *,
    availability_timeout: float = 10.0,
    connect_timeout: float = 10,
) -> int:
    app = quart_trio.QuartTrio(__name__)
    source = ImapSource(ca_file=str(dovecot.ca_file), connect_timeout=connect_timeout, command_timeout=10)
    app.register_blueprint(mailbox_blueprint(source, availability_timeout=availability_timeout))
    port: int = await nursery.start(serve_api, app, "127.0.0.1", 0)
    return port


@pytest.fixture
async def api(nursery: trio.Nursery, dovecot: Dovecot) -> AsyncIterator[Api]:
    port = await start(nursery, dovecot)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        yield Api(client, port)


def creds(dovecot: Dovecot, user: MailUser, **overrides: Any) -> dict[str, Any]:
    # What Creatio sends when a user checks a new mailbox: no Id yet, no BpmEndpoint.
    data: dict[str, Any] = {
        "UserName": user.name,
        "Password": user.password,
        "ServiceUrl": dovecot.host,
        "Port": dovecot.imap_port,
        "UseSsl": False,
        "FolderClassName": "IPF.Note",
    }
    data.update(overrides)
    return data


# -- validate ---------------------------------------------------------------------------------


async def test_validate_ok(api: Api, dovecot: Dovecot, mail_user: MailUser) -> None:
    response = await api.client.post("/api/mailbox/validate", json=creds(dovecot, mail_user))
    assert response.status_code == 200
    body = response.json()
    assert body["IsValid"] is True
    assert body["Message"] == "IMAP settings are valid"
    assert body["Data"]["Imap"]["Folders"] == ["INBOX"]


async def test_validate_wrong_password_is_200_invalid(
    api: Api, dovecot: Dovecot, mail_user: MailUser
) -> None:
    response = await api.client.post(
        "/api/mailbox/validate", json=creds(dovecot, mail_user, Password="not-it-42")
    )
    assert response.status_code == 200
    body = response.json()
    assert body["IsValid"] is False
    assert body["Data"]["Category"] == "authentication"
    assert "not-it-42" not in response.text


async def test_validate_bad_field_is_200_invalid(api: Api, dovecot: Dovecot, mail_user: MailUser) -> None:
    response = await api.client.post("/api/mailbox/validate", json=creds(dovecot, mail_user, ServiceUrl=""))
    assert response.status_code == 200
    assert response.json() == {
        "IsValid": False,
        "Message": "ServiceUrl: required",
        "Data": {"Stage": "input", "Category": "input", "Field": "ServiceUrl"},
    }


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "Malformed JSON"),
        (b"", "Empty body: a JSON value was expected"),
        (b"42", "Invalid body"),
    ],
)
async def test_validate_malformed_is_400(api: Api, content: bytes, message: str) -> None:
    response = await api.client.post("/api/mailbox/validate", content=content)
    assert response.status_code == 400
    assert response.json()["Message"] == message


# -- folders ----------------------------------------------------------------------------------


async def test_folders(api: Api, dovecot: Dovecot, mail_user: MailUser) -> None:
    await dovecot.acreate_folder(mail_user, encode_mailbox_name("Ablage/Größe").decode("ascii"))
    response = await api.client.post(
        "/api/mailbox/folders", json=[creds(dovecot, mail_user, Id="0F8FAD5B-D9CB-469F-A165-70867728950E")]
    )
    assert response.status_code == 200
    items = {item["Id"]: item for item in response.json()}
    assert items["Ablage/Größe"] == {
        "Id": "Ablage/Größe",
        "Name": "Größe",
        "ParentId": "Ablage",
        "Selectable": True,
        "SpecialUse": None,
    }
    assert items["Trash"]["SpecialUse"] == "\\Trash"


async def test_folders_login_failure_is_502(api: Api, dovecot: Dovecot, mail_user: MailUser) -> None:
    response = await api.client.post(
        "/api/mailbox/folders", json=creds(dovecot, mail_user, Password="nope-77")
    )
    assert response.status_code == 502
    body = response.json()
    assert "AUTHENTICATIONFAILED" in body["Message"]
    assert body["Category"] == "MailAuthError"
    assert "nope-77" not in response.text


async def test_folders_unreachable_is_502_and_bad_input_400(
    nursery: trio.Nursery, dovecot: Dovecot, mail_user: MailUser
) -> None:
    port = await start(nursery, dovecot, connect_timeout=0.5)
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
    closed = free_port()
    response = await client.post("/api/mailbox/folders", json=creds(dovecot, mail_user, Port=closed))
    assert response.status_code == 502
    # Without the API token: the same answer as a silent port (tests/api/test_security.py).
    assert response.json() == {
        "Message": f"no mail server answered at {dovecot.host}:{closed}",
        "Category": "MailConnectError",
    }

    response = await client.post("/api/mailbox/folders", json=creds(dovecot, mail_user, Port="x"))
    assert response.status_code == 400
    assert response.json()["Errors"][0]["Field"] == "Port"
    await client.aclose()


# -- availability -----------------------------------------------------------------------------


async def test_availability_pong_for_any_http_answer(api: Api) -> None:
    # The API itself is an HTTP server: a 404/405 is still an answer.
    url = f"http://127.0.0.1:{api.port}/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail"
    for body in (url, {"Url": url}, {"url": url}):
        response = await api.client.post("/api/availability/app", json=body)
        assert response.status_code == 200
        assert response.json() == "pong"


async def test_availability_closed_port_is_502(nursery: trio.Nursery, dovecot: Dovecot) -> None:
    port = await start(nursery, dovecot, availability_timeout=0.5)
    closed = free_port()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        response = await client.post(
            "/api/availability/app", json=f"http://user:secret@127.0.0.1:{closed}/x?token=abc"
        )
    assert response.status_code == 502
    message = response.json()["Message"]
    # Without the API token: the same answer as a silent port (tests/api/test_security.py).
    assert message == f"no HTTP response from 127.0.0.1:{closed} within 0.5s"
    assert "secret" not in message and "token" not in message


@pytest.mark.parametrize("body", ["ftp://127.0.0.1/x", "not a url", "", 12, {"Other": 1}, "http://"])
async def test_availability_rejects_non_http_urls(api: Api, body: Any) -> None:
    response = await api.client.post("/api/availability/app", json=body)
    assert response.status_code == 400


async def test_availability_silent_server_times_out(nursery: trio.Nursery, dovecot: Dovecot) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    held: list[trio.SocketStream] = []

    async def accept_forever() -> None:
        while True:
            held.append(await listeners[0].accept())

    nursery.start_soon(accept_forever)
    silent = listeners[0].socket.getsockname()[1]
    port = await start(nursery, dovecot, availability_timeout=0.5)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        response = await client.post("/api/availability/app", json=f"http://127.0.0.1:{silent}/")
    assert response.status_code == 502
    assert response.json()["Message"] == f"no HTTP response from 127.0.0.1:{silent} within 0.5s"
    for stream in held:
        await stream.aclose()
