"""Negotiate with real Kerberos: a private MIT KDC (``tests/servers/kdc.py``), the EWS simulator
accepting Kerberos inside SPNEGO with ``HTTP/127.0.0.1``'s key, emlisten getting its tickets
from the mailbox's user name and password (no kinit, no ticket cache on the host)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import krb5
import pytest
import trio
from spnego.channel_bindings import GssChannelBindings

from emlisten.errors import MailAuthError
from emlisten.mail.ews import EwsSource, _auth, _kerberos
from emlisten.mail.ews._auth import AuthMode
from emlisten.mail.ews._kerberos import TicketCache, forget_realm_failures, kerberos_principal
from emlisten.mail.imap import ImapSource
from emlisten.mail.validate import validate
from tests.ews.conftest import Node, ews_credentials, ews_mailbox, wait_listening
from tests.ews.test_source import Tasks, mime, start_listening
from tests.secret_scan import register_secret
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import make_tls_files
from tests.servers.ews import EwsAccount, EwsSimulator, running_ews_simulator
from tests.servers.kdc import Kdc, krb5_conf

pytestmark = pytest.mark.kerberos


@pytest.fixture(autouse=True)
def _realms_tried_afresh() -> None:
    # Failures of a realm are remembered process-wide (``_kerberos``): tests that ran before
    # the KDC started (NTLM tests: the realm had no KDC then) must not keep it from these.
    forget_realm_failures()


@pytest.fixture
async def kerberos_ews(kdc: Kdc) -> AsyncIterator[EwsSimulator]:
    """An EWS server whose Negotiate takes Kerberos only (a domain with NTLM disabled)."""
    async with running_ews_simulator(
        minute_seconds=0.4, keepalive_seconds=0.1, auth=("negotiate",), kerberos_only=True
    ) as simulator:
        yield simulator


def domain_account(simulator: EwsSimulator, kdc: Kdc) -> EwsAccount:
    """An account that is also a user of the realm (same name and password)."""
    account = simulator.add_account()
    kdc.add_user(account.user, account.password)
    return account


def kerberos_source(mode: AuthMode = AuthMode.AUTO, **options: object) -> EwsSource:
    return EwsSource(
        connection_timeout_minutes=1,
        stream_idle_timeout=5,
        request_timeout=10,
        default_back_off=0.05,
        auth_mode=mode,
        **options,  # type: ignore[arg-type]
    )


def tickets_for(kdc: Kdc, user: str) -> tuple[int, int]:
    """(TGTs, service tickets for HTTP/127.0.0.1) the KDC issued to ``user``."""
    principal = f"{user}@{kdc.realm}"
    issued = [line for line in kdc.requests() if "ISSUE" in line and f" {principal} for " in line]
    tgts = sum(1 for line in issued if f"for krbtgt/{kdc.realm}@" in line)
    services = sum(1 for line in issued if f"for HTTP/127.0.0.1@{kdc.realm}" in line)
    return tgts, services


def test_user_names_map_to_principals() -> None:
    # What Creatio sends as UserName, and the principal emlisten asks the KDC for.
    assert kerberos_principal("alice") == "alice"
    assert kerberos_principal("CONTOSO\\alice") == "alice"
    assert kerberos_principal("alice@contoso.com") == "alice@CONTOSO.COM"
    assert kerberos_principal("alice@CONTOSO.COM") == "alice@CONTOSO.COM"


def test_a_malformed_user_name_is_the_users_failure_not_the_realms(kdc: Kdc) -> None:
    # Remembered for its own group only: other users of the realm still get tickets at once.
    for user in ("", "EMLISTEN\\", "a@b@EMLISTEN.TEST"):
        assert TicketCache(user, "x").credential() is None
    assert _kerberos._realm_failures == {}
    kdc.add_user("well-formed", "well-formed-password-1")
    cache = TicketCache("well-formed", "well-formed-password-1")
    assert cache.credential() is not None
    cache.close()


@pytest.mark.parametrize("mode", [AuthMode.AUTO, AuthMode.NEGOTIATE])
async def test_kerberos_handshake_once_then_the_connection_serves_every_request(
    kerberos_ews: EwsSimulator, kdc: Kdc, mode: AuthMode
) -> None:
    account = domain_account(kerberos_ews, kdc)
    async with kerberos_source(mode).open_reader(ews_mailbox(kerberos_ews, account)) as reader:
        for _ in range(5):
            await reader.current_position("INBOX")  # type: ignore[attr-defined]
    ok = [r for r in kerberos_ews.requests if r.status == 200]
    assert [r.authorization_scheme for r in ok] == ["negotiate"] + ["connection"] * 4
    assert kerberos_ews.handshake_mechanisms == ["kerberos"]
    # The KDC saw the password turned into a TGT and one ticket for the EWS server's SPN.
    assert tickets_for(kdc, account.user) == (1, 1)


async def test_concurrent_first_connections_share_one_service_ticket(
    kerberos_ews: EwsSimulator, kdc: Kdc
) -> None:
    account = domain_account(kerberos_ews, kdc)
    source, mailbox = kerberos_source(connections_per_account=3), ews_mailbox(kerberos_ews, account)
    async with source.open_reader(mailbox) as reader, trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(reader.current_position, "INBOX")  # type: ignore[attr-defined]
    assert kerberos_ews.handshake_mechanisms == ["kerberos"] * 3
    assert tickets_for(kdc, account.user) == (1, 1)


@pytest.mark.parametrize("form", ["user", "realm", "upn", "domain"])
async def test_user_name_forms_get_a_ticket(kerberos_ews: EwsSimulator, kdc: Kdc, form: str) -> None:
    account = domain_account(kerberos_ews, kdc)
    user_name = {
        "user": account.user,
        "realm": f"{account.user}@{kdc.realm}",
        "upn": f"{account.user}@{kdc.realm.lower()}",
        "domain": f"EMLISTEN\\{account.user}",
    }[form]
    mailbox = ews_mailbox(kerberos_ews, account, UserName=user_name)
    async with kerberos_source().open_reader(mailbox) as reader:
        await reader.current_position("INBOX")  # type: ignore[attr-defined]
    assert kerberos_ews.handshake_mechanisms == ["kerberos"]


async def test_a_user_unknown_to_the_kdc_is_refused_by_a_kerberos_only_server(
    kerberos_ews: EwsSimulator, kdc: Kdc
) -> None:
    # The server really demands Kerberos: without a principal emlisten falls back to NTLM
    # inside SPNEGO, which this server refuses.
    account = kerberos_ews.add_account()
    async with kerberos_source().open_reader(ews_mailbox(kerberos_ews, account)) as reader:
        with pytest.raises(MailAuthError, match="HTTP 401"):
            await reader.current_position("INBOX")  # type: ignore[attr-defined]
    assert kerberos_ews.handshakes == 0


async def test_wrong_password_validates_as_authentication_quickly(
    kerberos_ews: EwsSimulator, kdc: Kdc
) -> None:
    account = domain_account(kerberos_ews, kdc)
    source = kerberos_source()
    started = trio.current_time()
    bad = await validate(
        ews_mailbox(kerberos_ews, account, Password="wrong-password"),
        ImapSource(),
        check_smtp=False,
        ews=source,
    )
    took = trio.current_time() - started
    assert not bad.is_valid and bad.data["Category"] == "authentication", bad
    assert took < 2.0
    good = await validate(ews_mailbox(kerberos_ews, account), ImapSource(), check_smtp=False, ews=source)
    assert good.is_valid and good.data["Ews"]["Authentication"] == "negotiate", good
    assert kerberos_ews.handshake_mechanisms == ["kerberos"]
    # The wrong password cost the KDC one refused pre-authentication, and no ticket.
    assert tickets_for(kdc, account.user) == (1, 1)
    assert sum(1 for line in kdc.requests() if "PREAUTH_FAILED" in line and account.user in line) == 1


async def test_a_silent_kdc_holds_up_neither_the_event_loop_nor_validate(
    kerberos_ews: EwsSimulator, kdc: Kdc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A KDC that takes the connection and never answers: libkrb5 waits ~25 s. That wait is in
    # a worker thread, so validate's own time limit still ends the check on time. (A realm of
    # its own: the abandoned attempt's failure, remembered for the realm, touches no other test.)
    account = domain_account(kerberos_ews, kdc)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        conf = tmp_path / "krb5.conf"
        conf.write_text(krb5_conf("SILENT.TEST", silent.getsockname()[1]))
        monkeypatch.setenv("KRB5_CONFIG", str(conf))
        started = trio.current_time()
        result = await validate(
            ews_mailbox(kerberos_ews, account, UserName=f"{account.user}@SILENT.TEST"),
            ImapSource(),
            check_smtp=False,
            ews=kerberos_source(),
            time_limit=1.0,
        )
        took = trio.current_time() - started
    assert not result.is_valid and result.data["Category"] == "timeout", result
    assert took < 5.0  # the time limit, with room for a loaded machine: not libkrb5's 25 s
    assert kerberos_ews.handshakes == 0


async def test_a_kdc_wait_takes_no_thread_of_trios_default_limiter(
    kerberos_ews: EwsSimulator, kdc: Kdc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Trio's default thread limiter also resolves host names for every connection: a thread
    # waiting for a silent KDC (up to ~25 s, holding its token even once abandoned) must hold
    # a token of Kerberos's own limiter instead, or a cold start stops the process's DNS.
    account = domain_account(kerberos_ews, kdc)
    silent = trio.socket.socket()
    await silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    conf = tmp_path / "krb5.conf"
    conf.write_text(krb5_conf("QUIET.TEST", silent.getsockname()[1]))
    monkeypatch.setenv("KRB5_CONFIG", str(conf))
    mailbox = ews_mailbox(kerberos_ews, account, UserName=f"{account.user}@QUIET.TEST")
    source = kerberos_source()

    async def read() -> None:
        async with source.open_reader(mailbox) as reader:
            await reader.current_position("INBOX")  # type: ignore[attr-defined]

    with silent:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            with trio.fail_after(10):
                asking, _ = await silent.accept()  # the worker thread is at the KDC
            with asking:
                assert _kerberos.thread_limiter().borrowed_tokens == 1
                assert trio.to_thread.current_default_thread_limiter().borrowed_tokens == 0
                nursery.cancel_scope.cancel()


async def test_ntlm_still_works_where_the_server_accepts_it(kdc: Kdc) -> None:
    # A Negotiate server that also takes NTLM: a user with no principal in the realm (or a
    # KDC emlisten cannot reach) authenticates with NTLM inside SPNEGO, a realm user with
    # Kerberos, on the same server.
    async with running_ews_simulator(auth=("negotiate", "ntlm")) as server:
        local = server.add_account()
        domain = domain_account(server, kdc)
        source = kerberos_source()
        for account in (local, domain):
            async with source.open_reader(ews_mailbox(server, account)) as reader:
                await reader.current_position("INBOX")  # type: ignore[attr-defined]
        assert server.handshake_mechanisms == ["ntlm", "kerberos"]


async def test_a_ticket_near_its_end_is_replaced_before_a_handshake(kdc: Kdc) -> None:
    # Tickets of 4 minutes are always within the 5 minutes before their end: every new
    # connection (this server closes each after its answer) gets a new TGT first.
    async with running_ews_simulator(
        auth=("negotiate",), kerberos_only=True, close_connections=True
    ) as server:
        account = server.add_account()
        kdc.add_user(account.user, account.password, max_life="4m")
        source = kerberos_source()
        async with source.open_reader(ews_mailbox(server, account)) as reader:
            for _ in range(3):
                await reader.current_position("INBOX")  # type: ignore[attr-defined]
            (pool,) = source.pools()
            assert pool.tickets.tgts == 3
        assert server.handshake_mechanisms == ["kerberos"] * 3
        assert tickets_for(kdc, account.user) == (3, 3)


async def test_listens_and_reads_on_a_kerberos_only_server(
    kerberos_ews: EwsSimulator, kdc: Kdc, nursery: trio.Nursery
) -> None:
    account = domain_account(kerberos_ews, kdc)
    mailbox = ews_mailbox(kerberos_ews, account)
    source = kerberos_source()
    tasks = Tasks()
    scope = await start_listening(nursery, source, mailbox, tasks)
    kerberos_ews.add_message(account.address, mime("über Kerberos"))
    await tasks.wait("exists", 1)
    # A dropped stream: its new connection authenticates again with the ticket already held
    # (Kerberos is per connection on Exchange too), no new TGT.
    before = kerberos_ews.handshakes
    assert kerberos_ews.drop_streams(account.address) == 1
    scope.cancel()
    scope = await start_listening(nursery, source, mailbox, tasks)
    kerberos_ews.add_message(account.address, mime("after the drop"))
    await tasks.wait("exists", 2)
    assert kerberos_ews.handshakes > before
    assert set(kerberos_ews.handshake_mechanisms) == {"kerberos"}
    (pool,) = source.pools()
    assert pool.handshakes >= 2 and pool.tickets.tgts == 1
    assert tickets_for(kdc, account.user) == (1, 1)
    scope.cancel()


async def test_a_kerberos_only_mailbox_delivers_through_the_service(
    kerberos_ews: EwsSimulator, kdc: Kdc, creatio: CreatioStandIn, node: Node
) -> None:
    account = domain_account(kerberos_ews, kdc)
    register_secret(account.password)
    creds = ews_credentials(
        kerberos_ews, account, UserName=f"{account.user}@{kdc.realm}", BpmEndpoint=creatio.endpoint()
    )
    assert (await node.http.post("/api/listeners/create", json=[creds])).status_code == 200
    await wait_listening(node.adapters, creds["Id"])
    kerberos_ews.add_message(account.address, mime("über Kerberos", "body ✓\n"))
    (email,) = await creatio.wait_for_emails(creds["Id"], 1, timeout=15)
    assert email["Subject"] == "über Kerberos" and "body ✓" in email["Body"]
    assert kerberos_ews.handshake_mechanisms and set(kerberos_ews.handshake_mechanisms) == {"kerberos"}
    assert {r.authorization_scheme for r in kerberos_ews.requests if r.status == 200} <= {
        "negotiate",
        "connection",
    }


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_tls_files(tmp_path_factory.mktemp("ews-kerberos-tls"))


async def test_kerberos_with_extended_protection_over_https(
    kdc: Kdc, tls_files: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = tls_files
    async with running_ews_simulator(
        auth=("negotiate",), kerberos_only=True, tls=(str(cert), str(key)), channel_binding=True
    ) as server:
        account = domain_account(server, kdc)
        mailbox = ews_mailbox(server, account)
        async with kerberos_source(ca_file=str(ca)).open_reader(mailbox) as reader:
            await reader.current_position("INBOX")  # type: ignore[attr-defined]
        assert server.handshake_mechanisms == ["kerberos"]

        # The authenticator carries the bindings: those of another certificate are refused.
        # (MIT's acceptor takes an authenticator without any, unlike Windows with EPA Require.)
        other = GssChannelBindings(application_data=b"tls-server-end-point:" + bytes(32))
        monkeypatch.setattr(_auth, "channel_bindings", lambda response: other)
        async with kerberos_source(ca_file=str(ca)).open_reader(mailbox) as reader:
            with pytest.raises(MailAuthError, match="HTTP 401"):
                await reader.current_position("INBOX")  # type: ignore[attr-defined]
        assert server.handshake_mechanisms == ["kerberos"]


def test_the_tickets_go_with_their_pool(kdc: Kdc) -> None:
    kdc.add_user("ticket-holder", "holder-password-1")
    cache = TicketCache("ticket-holder", "holder-password-1")
    held = cache.credential()
    assert held is not None and cache.tgts == 1
    assert cache.credential() == held  # still valid: no new TGT
    context = krb5.init_context()

    def tickets() -> list[object]:
        try:
            return list(krb5.cc_resolve(context, held.ccache.encode()))
        except krb5.Krb5Error:
            return []

    assert len(tickets()) == 1
    cache.close()
    assert tickets() == []
    assert cache.credential() is None and cache.tgts == 1
