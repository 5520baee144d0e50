"""Secure defaults: where the API listens, who needs the token, where emlisten may connect to,
what validate and availability tell a caller without the token, rate limits, 413s."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from quart import Blueprint, Response

from emlisten import _egress
from emlisten.api._guard import ApiAccess, RateLimiter
from emlisten.api.admin import admin_blueprint
from emlisten.api.app import create_app
from emlisten.api.mailbox import mailbox_blueprint
from emlisten.api.server import serve_api
from emlisten.config import load_settings
from emlisten.errors import ConfigError, DeliveryError, MailConnectError
from emlisten.mail.imap.source import ImapSource
from emlisten.models import Email, MailboxConfig, Security, ServerEndpoint
from emlisten.sender import SendConnectError
from emlisten.sender.smtp import SmtpSender
from emlisten.sink.creatio import CreatioSink
from tests.api.test_http import TOKEN, RecordingControl, creds
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot, MailUser, make_message
from tests.service.conftest import running_service

# ------------------------------------------------------------------------------------------
# Where the API listens


def test_a_bare_serve_listens_on_loopback_only() -> None:
    assert load_settings({}).host == "127.0.0.1"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "emlisten.example.com"])
def test_beyond_loopback_needs_a_token_or_an_explicit_opt_out(host: str) -> None:
    with pytest.raises(ConfigError, match=r"EMLISTEN_API_TOKEN.*EMLISTEN_ALLOW_UNAUTHENTICATED"):
        load_settings({"EMLISTEN_HOST": host})
    assert load_settings({"EMLISTEN_HOST": host, "EMLISTEN_API_TOKEN": "t"}).host == host
    opted_out = {"EMLISTEN_HOST": host, "EMLISTEN_ALLOW_UNAUTHENTICATED": "true"}
    assert load_settings(opted_out).allow_unauthenticated


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "[::1]", "localhost"])
def test_loopback_needs_no_token(host: str) -> None:
    assert load_settings({"EMLISTEN_HOST": host}).api_token is None


def test_serve_refuses_to_start_open_to_all() -> None:
    env = {"PATH": "/usr/bin:/bin", "EMLISTEN_HOST": "0.0.0.0", "EMLISTEN_PORT": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "emlisten", "serve"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "EMLISTEN_API_TOKEN" in done.stderr and "EMLISTEN_ALLOW_UNAUTHENTICATED" in done.stderr


@pytest.mark.parametrize(
    "text",
    ["10.0.0.0/33", "http://x/", "exa*mple.com", "a/b"],
)
def test_a_bad_allow_list_entry_is_a_configuration_error(text: str) -> None:
    with pytest.raises(ConfigError, match="EMLISTEN_CALLBACK_ALLOW"):
        load_settings({"EMLISTEN_CALLBACK_ALLOW": text})


# ------------------------------------------------------------------------------------------
# The token: Creatio's routes stay open, ours need it


def _own_routes() -> Blueprint:
    blueprint = Blueprint("own_routes_under_test", __name__)

    @blueprint.get("/v1/anything")
    async def anything() -> Response:
        return Response("{}", content_type="application/json")

    return blueprint


@asynccontextmanager
async def running_app(
    *,
    api_token: str | None = TOKEN,
    access: ApiAccess | None = None,
    source: ImapSource | None = None,
    control: RecordingControl | None = None,
    max_body_bytes: int = 10 * 1024 * 1024,
    availability_timeout: float = 10.0,
) -> AsyncIterator[httpx.AsyncClient]:
    control = control or RecordingControl()
    app = create_app(
        control,  # type: ignore[arg-type]
        api_token=api_token,
        access=access,
        max_body_bytes=max_body_bytes,
        blueprints=[
            _own_routes(),
            admin_blueprint(_Ready()),  # type: ignore[arg-type]
            mailbox_blueprint(source, check_smtp=False, availability_timeout=availability_timeout),
        ],
    )
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(serve_api, app, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
        nursery.cancel_scope.cancel()


class _Ready:
    async def readiness(self) -> dict[str, str]:
        return {"store": "ok", "queue": "ok"}


BEARER = {"Authorization": f"Bearer {TOKEN}"}
ID = "0F8FAD5B-D9CB-469F-A165-70867728950E"


async def test_creatio_routes_answer_without_the_token_and_own_routes_need_it() -> None:
    async with running_app() as client:
        created = await client.post(
            "/api/listeners/create", json=[creds("0F8FAD5B-D9CB-469F-A165-70867728950E")]
        )
        assert created.status_code == 200
        assert (await client.get("/v1/anything")).status_code == 401
        assert (await client.get("/v1/anything", headers=BEARER)).status_code == 200
        assert (await client.get("/ui/api/overview")).status_code in (401, 404)


async def test_open_routes_are_said_at_start_and_in_readyz(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="emlisten.api.app")
    async with running_app(api_token=None, access=ApiAccess(listen_host="0.0.0.0")) as client:
        ready = (await client.get("/readyz")).json()
    assert ready["ready"] is True
    opened = ready["open_without_token"]
    assert any("Creatio" in item for item in opened) and any("/v1" in item for item in opened)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("0.0.0.0" in w and "/v1" in w and "without a token" in w for w in warnings)


async def test_with_a_token_only_creatios_routes_are_said_to_be_open() -> None:
    async with running_app(access=ApiAccess(listen_host="0.0.0.0")) as client:
        opened = (await client.get("/readyz")).json()["open_without_token"]
    assert len(opened) == 1 and "Creatio" in opened[0]
    strict = ApiAccess(listen_host="0.0.0.0", creatio_routes_need_token=True)
    async with running_app(access=strict) as client:
        assert "open_without_token" not in (await client.get("/readyz")).json()
    async with running_app(api_token=None) as client:  # loopback: nothing to say
        assert "open_without_token" not in (await client.get("/readyz")).json()


def test_status_shows_open_routes() -> None:
    from rich.console import Console

    from emlisten._status import render

    console = Console(width=200, record=True, no_color=True)
    snapshot: dict[str, Any] = {
        "nodes": [],
        "mailboxes": [],
        "open_without_token": ["Creatio's routes (/api/...)"],
    }
    render(console, snapshot, limit=5)
    assert "open to anyone without a token: Creatio's routes (/api/...)" in console.export_text()


# ------------------------------------------------------------------------------------------
# Outbound allow-lists


def test_allow_list_matching() -> None:
    allow = _egress.AllowList.parse("creatio.example.com, *.corp.example 10.0.0.0/8 [2001:db8::]/32")
    ip = _egress._address
    assert allow.permits("anything", ip("10.1.2.3"))
    assert allow.permits("anything", ip("2001:db8::1"))
    assert allow.permits("creatio.example.com", ip("203.0.113.5"))
    assert allow.permits("crm.corp.example", ip("203.0.113.5"))
    assert not allow.permits("corp.example.evil", ip("203.0.113.5"))
    assert not allow.permits("other.example.com", ip("203.0.113.5"))
    # A name on the list still never reaches link-local or metadata addresses...
    assert not allow.permits("creatio.example.com", ip("169.254.169.254"))
    assert not allow.permits("creatio.example.com", ip("::ffff:169.254.169.254"))
    # ...unless a network entry names them.
    assert _egress.AllowList.parse("169.254.0.0/16").permits("x", ip("169.254.169.254"))
    default = _egress.AllowList.parse(None)
    assert default.permits("localhost", ip("127.0.0.1")) and default.permits("x", ip("10.0.0.1"))
    for blocked in ("169.254.169.254", "fe80::1", "fd00:ec2::254", "100.100.100.200"):
        assert not default.permits("x", ip(blocked)), blocked


@pytest.mark.parametrize("host", ["169.254.169.254", "[fe80::1]", "metadata.google.internal"])
async def test_metadata_addresses_are_refused_by_default(host: str) -> None:
    with pytest.raises(_egress.EgressDenied):
        await _egress.resolve_checked(host.strip("[]"), 80, "callback")
    with pytest.raises(_egress.EgressDenied):
        await _egress.resolve_checked(host.strip("[]"), 993, "mail")


def _mailbox_for(endpoint: str, **changes: Any) -> MailboxConfig:
    return MailboxConfig(
        id="0f8fad5b-d9cb-469f-a165-70867728950e",
        user_name="alice",
        password="pw-not-used-here",
        imap=ServerEndpoint("127.0.0.1", 1, Security.NONE),
        bpm_endpoint=endpoint,
    ).replace(**changes)


async def test_creatio_callbacks_only_reach_allowed_addresses(creatio: CreatioStandIn) -> None:
    mailbox = _mailbox_for(creatio.endpoint())
    email = Email(id="e1", subject="s", body="b")
    sink = CreatioSink(timeout=10)
    try:
        with (
            _egress.configured(callback_allow="10.0.0.0/8, creatio.example.com"),
            pytest.raises(DeliveryError, match=r"not allowed .*EMLISTEN_CALLBACK_ALLOW"),
        ):
            await sink.deliver(mailbox, [email], idempotency_key="k1")
        assert creatio.calls() == []
        with _egress.configured(callback_allow="127.0.0.0/8"):
            await sink.deliver(mailbox, [email], idempotency_key="k2")
        await sink.deliver(mailbox, [email], idempotency_key="k3")  # default: loopback is fine
        assert len(creatio.accepted_calls("ProcessFullEmail")) == 2
        # Default: a link-local (metadata) callback is never called.
        metadata = _mailbox_for("http://169.254.169.254/latest/meta-data/ProcessFullEmail")
        with pytest.raises(DeliveryError, match="link-local or metadata"):
            await sink.deliver(metadata, [email], idempotency_key="k4")
    finally:
        await sink.aclose()


async def test_a_host_entry_allows_a_name_at_its_resolved_address(creatio: CreatioStandIn) -> None:
    mailbox = _mailbox_for(creatio.endpoint().replace("127.0.0.1", "localhost"))
    sink = CreatioSink(timeout=10)
    try:
        with _egress.configured(callback_allow="localhost"):
            await sink.deliver(mailbox, [Email(id="e1", subject="s", body="b")], idempotency_key="k")
    finally:
        await sink.aclose()
    assert len(creatio.accepted_calls("ProcessFullEmail")) == 1


async def test_imap_connect_honours_the_mail_allow_list(dovecot: Dovecot, mail_user: MailUser) -> None:
    source = ImapSource(ca_file=str(dovecot.ca_file))
    mailbox = _mailbox_for(
        "http://127.0.0.1/x",
        user_name=mail_user.name,
        password=mail_user.password,
        imap=ServerEndpoint(dovecot.host, dovecot.imap_port, Security.NONE),
    )
    with (
        _egress.configured(mail_allow="192.0.2.0/24"),
        pytest.raises(MailConnectError, match=r"not allowed .*EMLISTEN_MAIL_ALLOW"),
    ):
        await source.connect(mailbox)
    with _egress.configured(mail_allow=f"{dovecot.host}/32"):
        client = await source.connect(mailbox)
        await client.close()


async def test_smtp_submission_honours_the_mail_allow_list() -> None:
    sender = SmtpSender()
    mailbox = _mailbox_for("http://127.0.0.1/x", smtp=ServerEndpoint("127.0.0.1", 2525, Security.NONE))
    with (
        _egress.configured(mail_allow="192.0.2.0/24"),
        pytest.raises(SendConnectError, match="not allowed"),
    ):
        await sender.send(mailbox, b"Subject: x\r\n\r\nx\r\n", "a@example.com", ["b@example.com"])


# ------------------------------------------------------------------------------------------
# validate and availability: closed and silent ports look the same without the token


@asynccontextmanager
async def silent_port() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never says a word."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _validate_body(port: int) -> dict[str, Any]:
    return {"UserName": "alice", "Password": "pw", "ServiceUrl": "127.0.0.1", "Port": port, "SecureOption": 0}


async def test_validate_tells_no_unauthenticated_caller_a_closed_port_from_a_silent_one() -> None:
    floor = 1.0
    source = ImapSource(connect_timeout=floor)
    answers: list[tuple[dict[str, Any], float]] = []
    async with silent_port() as quiet, running_app(source=source) as client:
        for port in (closed_port(), quiet):
            started = trio.current_time()
            response = await client.post("/api/mailbox/validate", json=_validate_body(port))
            answers.append((response.json(), trio.current_time() - started))
        closed, silent = (answer for answer, _ in answers)
        assert closed["Data"]["Category"] == silent["Data"]["Category"] == "connect"
        assert closed["Message"].replace(str(answers[0][0]["Data"]["Server"]), "S") == silent[
            "Message"
        ].replace(str(silent["Data"]["Server"]), "S")
        assert all(elapsed >= floor for _, elapsed in answers)
        # With the token, the details are there.
        detailed = await client.post(
            "/api/mailbox/validate", json=_validate_body(closed_port()), headers=BEARER
        )
        assert "refused" in detailed.json()["Message"].lower()


async def test_availability_answers_alike_for_refused_and_forbidden_addresses() -> None:
    timeout = 0.5
    async with running_app(availability_timeout=timeout) as client:
        bodies = []
        for url in (f"http://127.0.0.1:{closed_port()}/", "http://169.254.169.254/latest/meta-data/"):
            started = trio.current_time()
            response = await client.post("/api/availability/app", json={"Url": url})
            assert response.status_code == 502
            assert trio.current_time() - started >= timeout
            bodies.append(response.json()["Message"].split(" from ")[0])
        assert bodies[0] == bodies[1]
        forbidden = await client.post(
            "/api/availability/app", json={"Url": "http://169.254.169.254/"}, headers=BEARER
        )
        assert "not allowed" in forbidden.json()["Message"]


# ------------------------------------------------------------------------------------------
# Rate limit, 413


def test_rate_limiter_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, clock=lambda: now[0])
    assert limiter.take("a") == 0 and limiter.take("a") == 0
    assert limiter.take("a") == pytest.approx(1.0)
    assert limiter.take("b") == 0  # per client
    now[0] = 1.0
    assert limiter.take("a") == 0
    assert RateLimiter(0, 0).take("a") == 0  # off


async def test_registration_and_probes_are_rate_limited_per_client() -> None:
    access = ApiAccess(
        rate_limit_per_minute=1,
        rate_limit_burst=2,
        validate_rate_limit_per_minute=1,
        validate_rate_limit_burst=1,
    )
    async with running_app(access=access) as client:
        body = [creds(ID)]
        statuses = [(await client.post("/api/listeners/create", json=body)).status_code for _ in range(2)]
        assert statuses == [200, 200]
        limited = await client.post("/api/listeners/update", json=body)
        assert limited.status_code == 429
        assert int(limited.headers["Retry-After"]) >= 1
        # Probes have a bucket of their own.
        assert (await client.post("/api/mailbox/validate", json={})).status_code == 200  # IsValid false
        assert (await client.post("/api/mailbox/folders", json={})).status_code == 429
        # Other routes and callers with the token are not limited.
        assert (await client.post("/api/listeners/close", json=[])).status_code == 200
        assert (await client.post("/api/listeners/create", json=body, headers=BEARER)).status_code == 200


def test_the_default_limits_let_creatios_failover_burst_through() -> None:
    # Creatio's failover job re-creates every closed mailbox at once, one request each.
    settings = load_settings({})
    limits = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst, clock=lambda: 0.0)
    assert all(limits.take("creatio") == 0 for _ in range(2000))
    probes = RateLimiter(settings.validate_rate_limit_per_minute, settings.validate_rate_limit_burst)
    assert [probes.take("scanner") == 0 for _ in range(21)].count(False) == 1


async def test_a_413_closes_the_connection_and_the_service_goes_on() -> None:
    async with running_app(max_body_bytes=1000) as client:
        port = client.base_url.port
        assert port is not None
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        body = b"[" + b"1," * 5000 + b"1]"
        request = (
            b"POST /api/listeners/close HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        await stream.send_all(request + body[:2000])
        received = b""
        with trio.fail_after(10):
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break  # the server closed the connection
                received += chunk
        await stream.aclose()
        assert received.startswith(b"HTTP/1.1 413")
        assert b"connection: close" in received.lower()
        assert (await client.get("/api/listeners/status")).status_code == 200


# ------------------------------------------------------------------------------------------
# XML from Exchange: no DTDs, no entity expansion, no external resources

_ENVELOPE = (
    b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>&%s;</s:Body></s:Envelope>'
)
_LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE s:Envelope [<!ENTITY a "ha">'
    + b"".join(b'<!ENTITY %c "%s">' % (ord("b") + i, (b"&%c;" % (ord("a") + i)) * 10) for i in range(8))
    + b"]>"
)
_EXTERNAL = b'<?xml version="1.0"?><!DOCTYPE s:Envelope [<!ENTITY e SYSTEM "file:///etc/passwd">]>'


@pytest.mark.parametrize(
    "document", [_LAUGHS + _ENVELOPE % b"i", _EXTERNAL + _ENVELOPE % b"e"], ids=["billion-laughs", "external"]
)
def test_exchange_xml_is_parsed_without_entities(document: bytes) -> None:
    from emlisten.errors import MailProtocolError
    from emlisten.mail.ews._soap import parse
    from emlisten.mail.ews.autodiscover import parse_answer

    with pytest.raises(MailProtocolError, match="malformed XML"):
        parse(document)
    with pytest.raises(MailProtocolError, match="not well-formed"):
        parse_answer(document.replace(b"s:Envelope", b"Autodiscover"))


# ------------------------------------------------------------------------------------------
# Log lines: a failing callback is a warning with its status; hostile values are cut short


async def test_a_failing_callback_is_a_warning_with_its_status(
    dovecot: Dovecot,
    creatio: CreatioStandIn,
    nursery: trio.Nursery,
    mail_user: MailUser,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from emlisten.models import MailboxState

    caplog.set_level(logging.INFO)
    async with running_service(dovecot, creatio, nursery) as service:
        creds = service.credentials(mail_user)
        assert (await service.create(creds)).status_code == 200
        await service.wait_state(creds["Id"], MailboxState.LISTENING)
        creatio.fail_next("ProcessFullEmail", status=500, count=1)
        await dovecot.aappend(mail_user, make_message(subject="after a 500"))
        await creatio.wait_for_emails(creds["Id"], 1, timeout=20)
    failures = [r for r in caplog.records if "delivery failed" in r.getMessage()]
    assert failures and all(r.levelno == logging.WARNING and r.exc_info is None for r in failures)
    assert "HTTP 500" in failures[0].getMessage()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_availability_logs_and_answers_cut_hostile_host_names(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_app(availability_timeout=0.2) as client:
        long_host = "h" * 1500 + ".invalid"
        response = await client.post("/api/availability/app", json={"Url": f"http://{long_host}/"})
        assert response.status_code == 502
        assert len(response.text) < 400
        too_long = await client.post("/api/availability/app", json="http://" + "h" * 3000 + "/")
        assert too_long.status_code == 422
        assert too_long.json()["Errors"][0]["Field"] == "Url"
    # emlisten's own lines (the service keeps httpx and httpcore at WARNING: emlisten._logging).
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("emlisten")]
    assert ours and max(len(line) for line in ours) < 400


async def test_folders_tell_no_unauthenticated_caller_a_closed_port_from_a_silent_one() -> None:
    floor = 1.0
    answers = []
    async with silent_port() as quiet, running_app(source=ImapSource(connect_timeout=floor)) as client:
        for port in (closed_port(), quiet):
            started = trio.current_time()
            response = await client.post("/api/mailbox/folders", json=_validate_body(port))
            assert response.status_code == 502
            assert trio.current_time() - started >= floor
            answers.append(response.json()["Message"].replace(str(port), "PORT"))
        assert answers[0] == answers[1] == "no mail server answered at 127.0.0.1:PORT"
        detailed = await client.post(
            "/api/mailbox/folders", json=_validate_body(closed_port()), headers=BEARER
        )
        assert "refused" in detailed.json()["Message"].lower()


async def test_every_hop_of_a_redirect_is_checked(nursery: trio.Nursery) -> None:
    from tests.servers._http import lifespan_or_other, serve_app, server_config

    async def redirector(scope: Any, receive: Any, send: Any) -> None:
        if await lifespan_or_other(scope, receive, send):
            return
        target = b"http://169.254.169.254/latest/meta-data/" if scope["path"] == "/out" else b"/out"
        await send({"type": "http.response.start", "status": 302, "headers": [(b"location", target)]})
        await send({"type": "http.response.body", "body": b""})

    port = await nursery.start(serve_app, redirector, server_config("127.0.0.1"))
    transport = _egress.http_transport("callback")
    async with httpx.AsyncClient(transport=transport, follow_redirects=True, timeout=10) as client:
        with pytest.raises(httpx.ConnectError) as caught:
            await client.get(f"http://127.0.0.1:{port}/in")  # -> /out (allowed) -> metadata (not)
    denied = _egress.denial(caught.value)
    assert denied is not None and "link-local or metadata" in str(denied.strerror)


async def test_ordinary_requests_keep_their_connection_alive() -> None:
    # The body-draining middleware must only close connections whose request it did not read.
    async with running_app() as client:
        answers = []
        for _ in range(50):
            answers.append(await client.get("/api/listeners/status"))
            answers.append(await client.post("/api/listeners/subscriptionsstate", json=[ID]))
        assert [a.headers.get("connection") for a in answers if a.headers.get("connection")] == []
        unauthorised = await client.post("/v1/anything", json={"a": 1})
        assert unauthorised.status_code in (401, 405)


class _RebindingResolver(trio.abc.HostnameResolver):
    """A name that first resolves to loopback, then to the metadata address (DNS rebinding)."""

    def __init__(self) -> None:
        self.lookups = 0

    async def getaddrinfo(
        self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> Any:
        self.lookups += 1
        address = "127.0.0.1" if self.lookups == 1 else "169.254.169.254"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port)))]

    async def getnameinfo(self, sockaddr: Any, flags: int) -> Any:
        raise NotImplementedError


async def test_the_checked_address_is_the_one_connected_to(creatio: CreatioStandIn) -> None:
    resolver = _RebindingResolver()
    previous = trio.socket.set_custom_hostname_resolver(resolver)
    try:
        endpoint = creatio.endpoint().replace("127.0.0.1", "rebinding.test")
        sink = CreatioSink(timeout=10)
        try:
            await sink.deliver(_mailbox_for(endpoint), [Email(id="e1")], idempotency_key="k")
        finally:
            await sink.aclose()
    finally:
        trio.socket.set_custom_hostname_resolver(previous)
    # One lookup, checked, and the connection made to that address: a second lookup (which
    # would have answered the metadata address) never happened.
    assert resolver.lookups == 1
    assert len(creatio.accepted_calls("ProcessFullEmail")) == 1
