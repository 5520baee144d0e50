"""NTLM and Negotiate against an EWS simulator that demands them (pyspnego as the acceptor)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import spnego._ntlm as spnego_ntlm
import spnego._ntlm_raw.crypto as ntlm_crypto
import trio
from spnego.channel_bindings import GssChannelBindings

from emlisten.errors import MailAuthError, MailConnectError
from emlisten.mail.ews import EWS_UIDVALIDITY, EwsSource, _auth, _kerberos, _soap
from emlisten.mail.ews._auth import AuthMode, choose_scheme
from emlisten.mail.ews._kerberos import forget_realm_failures
from emlisten.models import Checkpoint
from tests.ews.conftest import Node, ews_credentials, ews_mailbox, wait_listening
from tests.ews.test_source import Tasks, mime, read_new, start_listening
from tests.secret_scan import register_secret
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import make_tls_files
from tests.servers.ews import NTLM_DOMAIN, EwsSimulator, running_ews_simulator
from tests.servers.kdc import krb5_conf


@pytest.fixture
async def ntlm_ews() -> AsyncIterator[EwsSimulator]:
    """An EWS server with Windows authentication only (Negotiate and NTLM, as IIS offers them)."""
    async with running_ews_simulator(
        minute_seconds=0.4, keepalive_seconds=0.1, auth=("negotiate", "ntlm")
    ) as simulator:
        yield simulator


def ntlm_source(mode: AuthMode = AuthMode.AUTO, **options: object) -> EwsSource:
    return EwsSource(
        connection_timeout_minutes=1,
        stream_idle_timeout=5,
        request_timeout=10,
        default_back_off=0.05,
        auth_mode=mode,
        **options,  # type: ignore[arg-type]
    )


def test_scheme_choice() -> None:
    offered = {"negotiate": "", "ntlm": "", "basic": 'realm="x"'}
    assert choose_scheme(AuthMode.AUTO, offered) == "negotiate"
    assert choose_scheme(AuthMode.AUTO, {"ntlm": "", "basic": ""}) == "ntlm"
    assert choose_scheme(AuthMode.AUTO, {"basic": ""}) == "basic"
    assert choose_scheme(AuthMode.NTLM, offered) == "ntlm"
    assert choose_scheme(AuthMode.BASIC, {"negotiate": "", "ntlm": ""}) is None
    assert choose_scheme(AuthMode.NEGOTIATE, {"ntlm": ""}) is None
    with pytest.raises(ValueError, match="basic, ntlm, negotiate"):
        AuthMode.parse("kerberos")


async def test_basic_only_client_is_refused(ntlm_ews: EwsSimulator) -> None:
    account = ntlm_ews.add_account()
    source = ntlm_source(AuthMode.BASIC)
    async with source.open_reader(ews_mailbox(ntlm_ews, account)) as reader:
        with pytest.raises(MailAuthError) as refused:
            await reader.current_position("INBOX")  # type: ignore[attr-defined]
    assert "HTTP 401" in str(refused.value) and "NTLM" in str(refused.value)
    assert account.password not in str(refused.value)
    # The server saw Basic, refused it, and no handshake ever completed.
    assert [r.authorization_scheme for r in ntlm_ews.requests if r.status == 401] == ["basic"]
    assert ntlm_ews.handshakes == 0


@pytest.mark.parametrize("mode", [AuthMode.AUTO, AuthMode.NTLM, AuthMode.NEGOTIATE])
async def test_handshake_once_then_the_connection_serves_every_request(
    ntlm_ews: EwsSimulator, mode: AuthMode
) -> None:
    account = ntlm_ews.add_account()
    for n in range(3):
        ntlm_ews.add_message(account.address, mime(f"old {n}"))
    source = ntlm_source(mode)
    mailbox = ews_mailbox(ntlm_ews, account)
    async with source.open_reader(mailbox) as reader:
        for _ in range(5):
            await reader.current_position("INBOX")  # type: ignore[attr-defined]
    ok = [r for r in ntlm_ews.requests if r.status == 200]
    assert len(ok) == 5
    # One handshake: its last leg carried the first request, the other four went without.
    assert ntlm_ews.handshakes == 1
    expected = "ntlm" if mode is AuthMode.NTLM else "negotiate"
    assert [r.authorization_scheme for r in ok] == [expected] + ["connection"] * 4


async def test_wrong_password_is_an_auth_error_quickly(ntlm_ews: EwsSimulator) -> None:
    account = ntlm_ews.add_account()
    mailbox = ews_mailbox(ntlm_ews, account, Password="not-the-password")
    started = trio.current_time()
    async with ntlm_source().open_reader(mailbox) as reader:
        with pytest.raises(MailAuthError, match="HTTP 401"):
            await reader.current_position("INBOX")  # type: ignore[attr-defined]
    assert trio.current_time() - started < 2
    assert ntlm_ews.handshakes == 0


async def test_listens_and_reads_on_an_ntlm_only_server(
    ntlm_ews: EwsSimulator, nursery: trio.Nursery
) -> None:
    account = ntlm_ews.add_account()
    mailbox = ews_mailbox(ntlm_ews, account)
    source = ntlm_source()
    tasks = Tasks()
    scope = await start_listening(nursery, source, mailbox, tasks)
    (catch_up,) = tasks.of("catch-up")
    ntlm_ews.add_message(account.address, mime("över NTLM"))
    await tasks.wait("exists", 1)
    (data,), _ = await read_new(source, mailbox, Checkpoint(EWS_UIDVALIDITY, 0, catch_up.seed_cursor or ""))
    assert b"NTLM" in data
    # The stream went on the connection Subscribe authenticated; the reader, while the stream
    # holds that one, needed a second: two handshakes, two connections.
    assert ntlm_ews.handshakes == 2
    assert source.authenticated_connections() == 2
    scope.cancel()


async def test_a_dropped_connection_authenticates_again(
    ntlm_ews: EwsSimulator, nursery: trio.Nursery
) -> None:
    account = ntlm_ews.add_account()
    mailbox = ews_mailbox(ntlm_ews, account)
    source = ntlm_source()
    tasks = Tasks()
    failed = trio.Event()

    async def listen_until_dropped() -> None:
        with pytest.raises(MailConnectError):
            await source.listen(mailbox, "INBOX", tasks)
        failed.set()

    # The pool outlives one listen when a reader holds it open (as the worker's reader does).
    async with source.open_reader(mailbox):
        nursery.start_soon(listen_until_dropped)
        await ntlm_ews.wait_until(lambda: ntlm_ews.open_streams(account.address) == 1, what="stream open")
        before = ntlm_ews.handshakes
        assert ntlm_ews.drop_streams(account.address) == 1
        await failed.wait()
        # Listening again (as the supervisor does): the stream's new TCP connection is refused
        # without credentials and authenticates again; delivery goes on.
        scope = await start_listening(nursery, source, mailbox, tasks)
        ntlm_ews.add_message(account.address, mime("after the drop"))
        await tasks.wait("exists", 1)
        assert ntlm_ews.handshakes == before + 1
        scope.cancel()


async def test_server_closing_every_connection_costs_a_handshake_each_time() -> None:
    async with running_ews_simulator(auth=("ntlm",), close_connections=True) as server:
        account = server.add_account()
        source = ntlm_source()
        async with source.open_reader(ews_mailbox(server, account)) as reader:
            for _ in range(3):
                await reader.current_position("INBOX")  # type: ignore[attr-defined]
        assert server.handshakes == 3
        assert [r.status for r in server.requests].count(200) == 3


async def test_connections_are_bounded_per_account_not_per_reader(ntlm_ews: EwsSimulator) -> None:
    account = ntlm_ews.add_account()
    mailbox = ews_mailbox(ntlm_ews, account)
    source = ntlm_source(connections_per_account=2)
    seen: list[int] = []

    async def read() -> None:
        async with source.open_reader(mailbox) as reader:
            for _ in range(3):
                await reader.current_position("INBOX")  # type: ignore[attr-defined]
                seen.append(source.authenticated_connections())

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(read)
    assert max(seen) <= 2
    assert ntlm_ews.handshakes <= 2
    assert len([r for r in ntlm_ews.requests if r.status == 200]) == 30


async def test_ntlm_only_mailbox_delivers_through_the_service_and_survives_a_drop(
    ntlm_ews: EwsSimulator, creatio: CreatioStandIn, node: Node
) -> None:
    account = ntlm_ews.add_account()
    register_secret(account.password)
    creds = ews_credentials(ntlm_ews, account, BpmEndpoint=creatio.endpoint())
    assert (await node.http.post("/api/listeners/create", json=[creds])).status_code == 200
    await wait_listening(node.adapters, creds["Id"])
    attachment = bytes(range(256)) * 40
    ntlm_ews.add_message(account.address, mime("över NTLM", "body ✓\n", attachment))
    (email,) = await creatio.wait_for_emails(creds["Id"], 1, timeout=15)
    assert email["Subject"] == "över NTLM" and "body ✓" in email["Body"]
    assert base64.b64decode(email["Attachments"][0]["Base64Data"]) == attachment
    # Windows authentication only: nothing was ever sent with Basic, every answer came after
    # a handshake on its connection.
    assert {r.authorization_scheme for r in ntlm_ews.requests if r.status == 200} <= {
        "negotiate",
        "connection",
    }
    before = ntlm_ews.handshakes

    # The server drops the stream's connection: the supervisor listens again, the new
    # connection authenticates again, and mail keeps coming.
    assert ntlm_ews.drop_streams(account.address) == 1
    await ntlm_ews.wait_until(lambda: ntlm_ews.handshakes > before, what="a new handshake")
    await ntlm_ews.wait_until(lambda: ntlm_ews.open_streams(account.address) == 1, what="stream again")
    ntlm_ews.add_message(account.address, mime("after the drop"))
    emails = await creatio.wait_for_emails(creds["Id"], 2, timeout=15)
    assert [e["Subject"] for e in emails] == ["över NTLM", "after the drop"]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_tls_files(tmp_path_factory.mktemp("ews-tls"))


async def test_extended_protection_binds_the_handshake_to_the_tls_certificate(
    tls_files: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = tls_files
    async with running_ews_simulator(
        auth=("negotiate", "ntlm"), tls=(str(cert), str(key)), channel_binding=True
    ) as server:
        account = server.add_account()
        mailbox = ews_mailbox(server, account)
        assert mailbox.service_url.startswith("https://")
        async with ntlm_source(ca_file=str(ca)).open_reader(mailbox) as reader:
            await reader.current_position("INBOX")  # type: ignore[attr-defined]
        assert server.handshakes == 1

        # The same client without channel bindings is refused by this server (EPA "Require").
        monkeypatch.setattr(_auth, "channel_bindings", lambda response: None)
        async with ntlm_source(ca_file=str(ca)).open_reader(mailbox) as reader:
            with pytest.raises(MailAuthError, match="HTTP 401"):
                await reader.current_position("INBOX")  # type: ignore[attr-defined]
        assert server.handshakes == 1


async def test_autodiscover_authenticates_with_ntlm_too(
    ntlm_ews: EwsSimulator, nursery: trio.Nursery
) -> None:
    account = ntlm_ews.add_account()
    mailbox = ews_mailbox(ntlm_ews, account, ServiceUrl=None, IsAutodiscover=True)
    source = ntlm_source(autodiscover_bases={"ews.example.test": [ntlm_ews.base_url]})
    tasks = Tasks()
    scope = await start_listening(nursery, source, mailbox, tasks)
    assert source.discovered_url(mailbox.id) == ntlm_ews.url
    (found,) = [r for r in ntlm_ews.requests if r.operation == "Autodiscover" and r.status == 200]
    assert found.authorization_scheme == "negotiate"
    ntlm_ews.add_message(account.address, mime("found over NTLM"))
    await tasks.wait("exists", 1)
    # Basic was never sent to either endpoint.
    assert "basic" not in {r.authorization_scheme for r in ntlm_ews.requests}
    scope.cancel()


@pytest.mark.parametrize("login", ["user", "domain", "upn"])
async def test_windows_user_name_forms(ntlm_ews: EwsSimulator, login: str) -> None:
    account = ntlm_ews.add_account()
    user_name = {"user": account.user, "domain": f"{NTLM_DOMAIN}\\{account.user}", "upn": account.address}[
        login
    ]
    async with ntlm_source().open_reader(ews_mailbox(ntlm_ews, account, UserName=user_name)) as reader:
        await reader.current_position("INBOX")  # type: ignore[attr-defined]
    assert ntlm_ews.handshakes == 1


async def test_a_wrong_password_is_tried_once_per_request(ews: EwsSimulator) -> None:
    # Account lockout policies count failed logins: each request costs at most one.
    account = ews.add_account()
    source = ntlm_source()
    async with source.open_reader(ews_mailbox(ews, account)) as reader:
        await reader.current_position("INBOX")  # type: ignore[attr-defined]  # learns "basic"
    before = len(ews.requests)
    async with source.open_reader(ews_mailbox(ews, account, Password="wrong-password-1")) as reader:
        with pytest.raises(MailAuthError):
            await reader.current_position("INBOX")  # type: ignore[attr-defined]
    assert [(r.status, r.authorization_scheme) for r in ews.requests[before:]] == [(401, "basic")]


async def test_a_large_request_is_sent_once_on_a_new_ntlm_connection(ntlm_ews: EwsSimulator) -> None:
    account = ntlm_ews.add_account()
    message = mime("big over NTLM", attachment=bytes(range(256)) * 8192)  # 2 MiB
    message = message.replace(b"sender@example.test", account.address.encode())
    body = _soap.envelope(_soap.create_item_send(base64.b64encode(message).decode("ascii"), save_copy=False))
    # The scheme is known (as after the mailbox's first request); the connection is new.
    pool = _auth.AuthenticatedPool(
        _auth.Credentials(account.user, account.password), schemes={ntlm_ews.base_url: "negotiate"}
    )
    async with httpx.AsyncClient(transport=pool) as http:
        response = await http.post(
            ntlm_ews.url,
            content=body,
            headers={"Content-Type": "text/xml; charset=utf-8", "X-AnchorMailbox": account.address},
        )
    assert response.status_code == 200 and b"NoError" in response.content
    assert ntlm_ews.handshakes == 1
    # The body crossed the wire once (the handshake went on a small request).
    assert len(body) <= ntlm_ews.bytes_received < len(body) + 4096
    (sent,) = ntlm_ews.sent
    assert sent.mime == message


async def test_a_new_connection_starts_the_handshake_with_its_first_request(ntlm_ews: EwsSimulator) -> None:
    account = ntlm_ews.add_account()
    source = ntlm_source(connections_per_account=2)
    mailbox = ews_mailbox(ntlm_ews, account)
    async with source.open_reader(mailbox) as reader:
        await reader.current_position("INBOX")  # type: ignore[attr-defined]  # learns "negotiate"
    first = [(r.status, r.authorization_scheme) for r in ntlm_ews.requests]
    # The first connection to the server asks without credentials to learn its schemes.
    assert first == [(401, ""), (401, "negotiate"), (200, "negotiate")]

    # Later connections (here two at once, of another pool) know the scheme: the handshake's
    # first leg goes with the first request, so each costs one 401, not two.
    before = len(ntlm_ews.requests)
    async with source.open_reader(ews_mailbox(ntlm_ews, account)) as reader, trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(reader.current_position, "INBOX")  # type: ignore[attr-defined]
    later = [(r.status, r.authorization_scheme) for r in ntlm_ews.requests[before:]]
    assert sorted(later) == [(200, "negotiate"), (200, "negotiate"), (401, "negotiate"), (401, "negotiate")]
    assert ntlm_ews.handshakes == 3


async def test_a_server_that_dropped_ntlm_for_basic_is_answered_with_basic(ews: EwsSimulator) -> None:
    # The process learnt "negotiate" for this origin; the server now takes Basic only.
    account = ews.add_account()
    schemes = {ews.base_url: "negotiate"}
    pool = _auth.AuthenticatedPool(_auth.Credentials(account.user, account.password), schemes=schemes)
    async with httpx.AsyncClient(transport=pool) as http:
        response = await http.post(ews.url, content=_soap.envelope(_soap.get_folders(["inbox"])))
    assert response.status_code == 200
    assert schemes == {ews.base_url: "basic"}
    assert [(r.status, r.authorization_scheme) for r in ews.requests] == [(401, "negotiate"), (200, "basic")]


async def test_a_new_connection_showing_another_certificate_binds_its_handshake_again(
    tls_files: tuple[Path, Path, Path],
) -> None:
    ca, cert, key = tls_files
    async with running_ews_simulator(
        auth=("negotiate", "ntlm"), tls=(str(cert), str(key)), channel_binding=True
    ) as server:
        account = server.add_account()
        source = ntlm_source(ca_file=str(ca))
        mailbox = ews_mailbox(server, account)
        async with source.open_reader(mailbox) as reader:
            await reader.current_position("INBOX")  # type: ignore[attr-defined]
        # As if the origin had shown another certificate last (a renewed one, another node
        # behind the balancer): the first leg is bound to it, the server's 401 shows this one.
        source._bindings[server.base_url] = GssChannelBindings(
            application_data=b"tls-server-end-point:" + bytes(32)
        )
        before = len(server.requests)
        async with source.open_reader(mailbox) as reader:
            await reader.current_position("INBOX")  # type: ignore[attr-defined]
        # Started over with the right binding before the credential-bearing leg: one extra
        # first leg, no refusal.
        assert [(r.status, r.authorization_scheme) for r in server.requests[before:]] == [
            (401, "negotiate"),
            (401, "negotiate"),
            (200, "negotiate"),
        ]
        assert server.handshakes == 2
        # Learnt again: the next new connection costs one 401.
        before = len(server.requests)
        async with source.open_reader(mailbox) as reader:
            await reader.current_position("INBOX")  # type: ignore[attr-defined]
        assert [r.status for r in server.requests[before:]] == [401, 200]


async def test_the_nt_hash_is_computed_once_per_credential_group(
    ntlm_ews: EwsSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = ntlm_ews.add_account()
    calls: list[str] = []

    def counting(name: str, function: Callable[[str], bytes]) -> Callable[[str], bytes]:
        def hashed(password: str) -> bytes:
            calls.append(name)
            return function(password)

        return hashed

    # Where pyspnego's client (and the simulator's acceptor) would hash a password.
    monkeypatch.setattr(ntlm_crypto, "ntowfv1", counting("nt", ntlm_crypto.ntowfv1))
    monkeypatch.setattr(spnego_ntlm, "ntowfv1", counting("nt", getattr(spnego_ntlm, "ntowfv1")))  # noqa: B009
    monkeypatch.setattr(spnego_ntlm, "lmowfv1", counting("lm", getattr(spnego_ntlm, "lmowfv1")))  # noqa: B009
    source = ntlm_source(connections_per_account=3)
    async with source.open_reader(ews_mailbox(ntlm_ews, account)) as reader, trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(reader.current_position, "INBOX")  # type: ignore[attr-defined]
    assert ntlm_ews.handshakes == 3
    # Three handshakes, one NT hash, no LM hash (NTLMv2 does not use it).
    assert calls == ["nt"]


async def test_once_the_realm_failed_ntlm_handshakes_need_no_worker_thread(
    ntlm_ews: EwsSimulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # scripts/install-test-deps installs the kerberos extra; without it this path never runs.
    assert _kerberos.AVAILABLE, "the kerberos extra (pyspnego[kerberos]) is missing from the test install"
    # A realm without a KDC: Negotiate's first handshake asks for a TGT (in a worker thread,
    # the KDC talk blocks), fails, and that is remembered for the realm.
    conf = tmp_path / "krb5.conf"
    conf.write_text(krb5_conf("NOKDC.TEST", None))
    monkeypatch.setenv("KRB5_CONFIG", str(conf))
    forget_realm_failures()
    threads: list[object] = []
    run_sync = trio.to_thread.run_sync

    async def counting(function: Callable[[], object], **options: object) -> object:
        threads.append(function)
        return await run_sync(function, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    source = ntlm_source()
    try:
        for _ in range(4):
            async with source.open_reader(ews_mailbox(ntlm_ews, ntlm_ews.add_account())) as reader:
                await reader.current_position("INBOX")  # type: ignore[attr-defined]
    finally:
        forget_realm_failures()
    # Four users' NTLM handshakes; only the first went through a worker thread.
    assert ntlm_ews.handshake_mechanisms == ["ntlm"] * 4
    assert len(threads) == 1


def test_the_nt_hash_comes_from_pyspnego_as_expected() -> None:
    """_nt_hash leans on pyspnego's private MD4 (spnego._ntlm_raw.crypto.ntowfv1): a pyspnego
    that moved or changed it must fail here, not silently hash the password at every handshake
    again (or send a wrong hash). MD4 of UTF-16LE "password" is a published value."""
    from emlisten.mail.ews._auth import _nt_hash

    assert _nt_hash("password") == "8846f7eaee8fb117ad06bdd830b7586c"
