"""/api/mailbox/validate for EWS and Graph mailboxes: their own protocol (never IMAP), the IMAP
answer shape, every category, fast - against the EWS and Graph test servers (real HTTP)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import quart_trio
import trio

from emlisten.api.credentials import parse_credentials
from emlisten.api.mailbox import mailbox_blueprint
from emlisten.api.server import serve_api
from emlisten.mail.ews import EwsSource
from emlisten.mail.graph import GraphSource
from emlisten.mail.graph.source import AppCredentials
from emlisten.mail.imap import ImapSource
from emlisten.mail.validate import ValidationResult, validate
from emlisten.models import MailboxConfig
from tests.secret_scan import register_secret
from tests.servers.dovecot import free_port
from tests.servers.ews import EwsAccount, EwsSimulator, running_ews_simulator
from tests.servers.graph import GraphSimulator

#: What "within a second or two" means on a loaded 2-core CI machine.
FAST = 2.0


@pytest.fixture
async def ews() -> AsyncIterator[EwsSimulator]:
    async with running_ews_simulator() as simulator:
        yield simulator


@pytest.fixture
async def ntlm_ews() -> AsyncIterator[EwsSimulator]:
    async with running_ews_simulator(auth=("negotiate", "ntlm")) as simulator:
        yield simulator


@pytest.fixture
async def graph(nursery: trio.Nursery) -> AsyncIterator[GraphSimulator]:
    simulator = GraphSimulator()
    await nursery.start(simulator.serve)
    yield simulator


def ews_creds(simulator: EwsSimulator | str, account: EwsAccount, **fields: Any) -> dict[str, Any]:
    # What Creatio sends when a user checks a new Exchange mailbox: no Id yet, no BpmEndpoint.
    register_secret(account.password)
    body: dict[str, Any] = {
        "UserName": account.user,
        "Password": account.password,
        "SenderEmailAddress": account.address,
        "ServiceUrl": simulator if isinstance(simulator, str) else simulator.url,
        "FolderIds": [],
    }
    body.update(fields)
    return body


def graph_creds(simulator: GraphSimulator, address: str, token: str, **fields: Any) -> dict[str, Any]:
    register_secret(token)
    body: dict[str, Any] = {
        "UserName": address,
        "UseOAuth": True,
        "AccessToken": token,
        "SenderEmailAddress": address,
        "Protocol": "graph",
        "ServiceUrl": simulator.base_url,
        "FolderIds": [],
    }
    body.update(fields)
    return body


def mailbox_of(body: dict[str, Any]) -> MailboxConfig:
    return parse_credentials(
        {"Id": str(uuid.uuid4()), "BpmEndpoint": "http://127.0.0.1:9/0/ServiceModel/x.svc", **body}
    )


async def check(body: dict[str, Any], **options: Any) -> tuple[ValidationResult, float]:
    started = trio.current_time()
    result = await validate(
        mailbox_of(body),
        ImapSource(),
        check_smtp=True,
        ews=options.pop("ews_source", EwsSource()),
        graph=GraphSource(),
        **options,
    )
    return result, trio.current_time() - started


def category(result: ValidationResult) -> str:
    assert result.data is not None
    return str(result.data.get("Category", ""))


# -- EWS ---------------------------------------------------------------------------------------


async def test_ews_right_credentials(ews: EwsSimulator) -> None:
    account = ews.add_account()
    result, took = await check(ews_creds(ews, account))
    assert result.to_json() == {
        "IsValid": True,
        "Message": "EWS settings are valid",
        "Data": {
            "Ews": {"Server": f"127.0.0.1:{ews.port}", "Folders": ["INBOX"], "Authentication": "basic"},
            "Smtp": None,
        },
    }
    assert took < FAST
    # Spoken in EWS: a GetFolder (after the one unauthenticated probe of `auto`).
    assert [r.operation for r in ews.requests if r.status == 200] == ["GetFolder"]


async def test_ews_right_credentials_on_an_ntlm_only_server(ntlm_ews: EwsSimulator) -> None:
    account = ntlm_ews.add_account()
    folder = ntlm_ews.add_folder(account.address, "Projects")
    result, took = await check(ews_creds(ntlm_ews, account, FolderIds=["INBOX", folder]))
    assert result.is_valid, result
    assert result.data == {
        "Ews": {
            "Server": f"127.0.0.1:{ntlm_ews.port}",
            "Folders": ["INBOX", folder],
            "Authentication": "negotiate",
        },
        "Smtp": None,
    }
    assert took < FAST
    assert ntlm_ews.handshakes == 1


@pytest.mark.parametrize("windows_auth", [False, True])
async def test_ews_wrong_password_is_authentication(
    ews: EwsSimulator, ntlm_ews: EwsSimulator, windows_auth: bool
) -> None:
    server = ntlm_ews if windows_auth else ews
    account = server.add_account()
    result, took = await check(ews_creds(server, account, Password="wrong-password-123"))
    assert not result.is_valid
    assert result.data == {"Stage": "ews", "Category": "authentication", "Server": f"127.0.0.1:{server.port}"}
    assert result.message.startswith("EWS: authentication failed") and "HTTP 401" in result.message
    assert "wrong-password-123" not in result.message
    assert took < FAST


async def test_ews_wrong_token_is_token(ews: EwsSimulator) -> None:
    account = ews.add_account()
    token = ews.issue_token(account.address)
    ews.revoke_token(token)
    register_secret(token)
    result, took = await check(ews_creds(ews, account, UseOAuth=True, AccessToken=token, Password=None))
    assert category(result) == "token", result
    assert token not in result.message
    assert took < FAST


async def test_ews_unknown_folder_is_folder(ews: EwsSimulator) -> None:
    account = ews.add_account()
    result, _ = await check(ews_creds(ews, account, FolderIds=["INBOX", "AQMkAfolder-gone"]))
    assert category(result) == "folder", result
    assert result.message == "EWS: folder 'AQMkAfolder-gone' not found"


async def test_ews_impersonation_refused_is_authentication(ews: EwsSimulator) -> None:
    account, other = ews.add_account(), ews.add_account()
    result, _ = await check(ews_creds(ews, account, ImpersonatedUser=other.address))
    assert category(result) == "authentication", result
    assert "ErrorImpersonateUserDenied" in result.message


async def test_ews_closed_port_is_connect(ews: EwsSimulator) -> None:
    account = ews.add_account()
    port = free_port()
    result, took = await check(ews_creds(f"http://127.0.0.1:{port}/EWS/Exchange.asmx", account))
    assert result.data == {"Stage": "ews", "Category": "connect", "Server": f"127.0.0.1:{port}"}
    assert "refused" in result.message.lower()
    assert took < FAST


async def test_ews_tls_against_a_plain_http_server_is_tls(ews: EwsSimulator) -> None:
    account = ews.add_account()
    url = f"https://127.0.0.1:{ews.port}/EWS/Exchange.asmx"
    result, _ = await check(ews_creds(url, account))
    assert category(result) == "tls", result


async def test_ews_not_an_ews_url_is_protocol(ews: EwsSimulator) -> None:
    account = ews.add_account()
    result, _ = await check(ews_creds(f"http://127.0.0.1:{ews.port}/owa/", account))
    assert category(result) == "protocol", result
    assert "HTTP 404" in result.message


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """Accepts connections and never answers (a hung server)."""
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


async def test_ews_silent_server_waits_only_the_time_limit(ews: EwsSimulator, silent_port: int) -> None:
    account = ews.add_account()
    url = f"http://127.0.0.1:{silent_port}/EWS/Exchange.asmx"
    result, took = await check(ews_creds(url, account), time_limit=0.5, connect_timeout=0.3)
    assert category(result) == "timeout", result
    assert 0.5 <= took < FAST


# -- Graph -------------------------------------------------------------------------------------


async def test_graph_right_token(graph: GraphSimulator) -> None:
    address, token = graph.add_user()
    result, took = await check(graph_creds(graph, address, token))
    assert result.to_json() == {
        "IsValid": True,
        "Message": "Graph settings are valid",
        "Data": {"Graph": {"Server": f"127.0.0.1:{graph.port}", "Folders": ["INBOX"]}, "Smtp": None},
    }
    assert took < FAST


async def test_graph_wrong_token_is_token(graph: GraphSimulator) -> None:
    address, token = graph.add_user()
    graph.revoke_token(token)
    result, took = await check(graph_creds(graph, address, token))
    assert result.data == {"Stage": "graph", "Category": "token", "Server": f"127.0.0.1:{graph.port}"}
    assert token not in result.message
    assert took < FAST


async def test_graph_another_users_mailbox_is_authentication(graph: GraphSimulator) -> None:
    address, token = graph.add_user()
    other, _ = graph.add_user()
    result, _ = await check(graph_creds(graph, address, token, SenderEmailAddress=other))
    assert category(result) == "authentication", result


async def test_graph_unknown_folder_is_folder(graph: GraphSimulator) -> None:
    address, token = graph.add_user()
    folder = graph.add_folder(address, "Projects")
    result, _ = await check(graph_creds(graph, address, token, FolderIds=[folder, "AAMkAgone"]))
    assert category(result) == "folder", result
    assert result.message == "GRAPH: folder 'AAMkAgone' not found"


async def test_graph_closed_port_is_connect() -> None:
    port = free_port()
    body = {
        "UserName": "someone@contoso.test",
        "UseOAuth": True,
        "AccessToken": "eyJ0eXAi.not-used",
        "Protocol": "graph",
        "ServiceUrl": f"http://127.0.0.1:{port}",
    }
    result, took = await check(body)
    assert result.data == {"Stage": "graph", "Category": "connect", "Server": f"127.0.0.1:{port}"}
    assert took < FAST


# -- through the route -------------------------------------------------------------------------


async def test_route_answers_for_ews_without_imap(nursery: trio.Nursery, ntlm_ews: EwsSimulator) -> None:
    app = quart_trio.QuartTrio(__name__)
    app.register_blueprint(mailbox_blueprint(ImapSource(), ews=EwsSource(), graph=GraphSource()))
    port: int = await nursery.start(serve_api, app, "127.0.0.1", 0)
    account = ntlm_ews.add_account()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        started = trio.current_time()
        good = (await client.post("/api/mailbox/validate", json=ews_creds(ntlm_ews, account))).json()
        bad = (
            await client.post(
                "/api/mailbox/validate", json=ews_creds(ntlm_ews, account, Password="nope-nope")
            )
        ).json()
        took = trio.current_time() - started
    assert good["IsValid"] is True and good["Data"]["Ews"]["Authentication"] == "negotiate"
    assert bad["IsValid"] is False and bad["Data"]["Category"] == "authentication"
    assert took < 2 * FAST
    # Every request the server saw was EWS over HTTP (an IMAP client would have sent none).
    assert {r.operation for r in ntlm_ews.requests if r.status == 200} == {"GetFolder"}


async def test_route_pads_an_unreachable_ews_server_only_to_the_validate_limit(
    nursery: trio.Nursery, ews: EwsSimulator
) -> None:
    # Callers without the API token learn only "not reachable", after the check's own time
    # limit (never the IMAP connect timeout of 30 s).
    app = quart_trio.QuartTrio(__name__)
    app.register_blueprint(mailbox_blueprint(ImapSource(), ews=EwsSource(), validate_timeout=1.0))
    port: int = await nursery.start(serve_api, app, "127.0.0.1", 0)
    account = ews.add_account()
    closed = f"http://127.0.0.1:{free_port()}/EWS/Exchange.asmx"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        started = trio.current_time()
        answer = (await client.post("/api/mailbox/validate", json=ews_creds(closed, account))).json()
        took = trio.current_time() - started
    assert answer["IsValid"] is False and answer["Data"]["Category"] == "connect"
    assert 1.0 <= took < 1.0 + FAST


@pytest.mark.parametrize("secret_ok", [True, False])
async def test_graph_app_only(graph: GraphSimulator, secret_ok: bool) -> None:
    tenant = "11111111-2222-4333-8444-555555555555"
    graph.register_app(tenant, "client-v", register_secret("app-secret-value-v1"))
    secret = "app-secret-value-v1" if secret_ok else register_secret("not-the-app-secret")
    app = AppCredentials(tenant, "client-v", secret, authority=graph.base_url)
    address, _ = graph.add_user()
    body = graph_creds(graph, address, "", UseOAuth=False, AccessToken=None, Password="unused-pw")
    started = trio.current_time()
    result = await validate(
        mailbox_of(body), ImapSource(), check_smtp=True, graph=GraphSource(app_credentials=app)
    )
    assert trio.current_time() - started < FAST
    if secret_ok:
        assert result.is_valid, result
    else:
        # The app's token request itself was refused: the app's credentials, not a user token.
        assert category(result) == "authentication", result
        assert "not-the-app-secret" not in result.message
