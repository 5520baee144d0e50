"""POX Autodiscover against the EWS simulator (a real HTTP server), and through the service."""

from __future__ import annotations

import pytest
import trio

from emlisten.api.credentials import AUTODISCOVER_NEEDS_ADDRESS, parse_credentials
from emlisten.errors import (
    MailAuthError,
    MailConnectError,
    MailProtocolError,
    MailTokenRejectedError,
    ValidationError,
)
from emlisten.mail.ews import EWS_UIDVALIDITY, EwsSource
from emlisten.mail.ews.autodiscover import (
    MAX_REDIRECTS,
    AutodiscoverError,
    autodiscover_url_hint,
    candidate_urls,
    parse_answer,
)
from emlisten.models import INBOX, Checkpoint, MailboxConfig, MailboxState, Security
from tests.ews.conftest import ews_credentials, ews_mailbox
from tests.ews.test_source import Tasks, mime, read_new, start_listening
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot
from tests.servers.ews import AUTODISCOVER_PATH, EwsAccount, EwsSimulator
from tests.service.conftest import running_service

DOMAIN = "ews.example.test"


def discovering_source(ews: EwsSimulator, *bases: str) -> EwsSource:
    """A source whose Autodiscover candidates for the simulator's domain are ``bases``."""
    return EwsSource(
        connection_timeout_minutes=1,
        stream_idle_timeout=5,
        request_timeout=10,
        default_back_off=0.05,
        autodiscover_bases={DOMAIN: list(bases or [ews.base_url])},
    )


def autodiscover_mailbox(ews: EwsSimulator, account: EwsAccount, **fields: object) -> MailboxConfig:
    return ews_mailbox(ews, account, ServiceUrl=None, IsAutodiscover=True, **fields)


def autodiscover_requests(ews: EwsSimulator) -> int:
    """Authenticated Autodiscover requests (``auto`` probes a server once without credentials)."""
    return sum(1 for r in ews.requests if r.operation == "Autodiscover" and r.status != 401)


# ------------------------------------------------------------------------------------------
# Pure logic


def test_candidates_for_a_domain() -> None:
    assert candidate_urls("contoso.com") == [
        "https://contoso.com/autodiscover/autodiscover.xml",
        "https://autodiscover.contoso.com/autodiscover/autodiscover.xml",
    ]
    assert candidate_urls(
        "contoso.com", hint="https://ad.corp/x.xml", bases={"contoso.com": ["http://h:1/"]}
    ) == [
        "https://ad.corp/x.xml",
        "http://h:1/autodiscover/autodiscover.xml",
    ]


def test_answer_prefers_exch_then_expr_and_rejects_non_autodiscover_xml() -> None:
    answer = parse_answer(
        b'<Autodiscover xmlns="a"><Response xmlns="b"><Account><Action>settings</Action>'
        b"<Protocol><Type>WEB</Type></Protocol>"
        b"<Protocol><Type>EXPR</Type><EwsUrl>https://ext/EWS/Exchange.asmx</EwsUrl></Protocol>"
        b"<Protocol><Type>EXCH</Type><EwsUrl>https://int/EWS/Exchange.asmx</EwsUrl></Protocol>"
        b"</Account></Response></Autodiscover>"
    )
    assert answer.ews_url == "https://int/EWS/Exchange.asmx"
    with pytest.raises(MailProtocolError, match="no Autodiscover root"):
        parse_answer(b"<html><body>company web site</body></html>")
    with pytest.raises(MailProtocolError, match="not well-formed"):
        parse_answer(b'<!DOCTYPE x [<!ENTITY a "b">]><Autodiscover>&a;</Autodiscover>')


def _creds(**fields: object) -> dict[str, object]:
    body: dict[str, object] = {
        "Id": "0f8fad5b-d9cb-469f-a165-70867728950e",
        "UserName": "alice",
        "Password": "pw-SECRET",
        "SenderEmailAddress": "alice@contoso.test",
        "IsAutodiscover": True,
        "BpmEndpoint": "https://crm.example.com/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail",
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


def test_credentials_with_is_autodiscover_become_ews_without_url() -> None:
    mailbox = parse_credentials(_creds())
    assert (mailbox.protocol, mailbox.service_url) == ("ews", "")
    assert (mailbox.imap.host, mailbox.imap.port, mailbox.imap.security) == (
        "contoso.test",
        443,
        Security.SSL_ON_CONNECT,
    )
    assert mailbox.extra["IsAutodiscover"] is True
    # UserName as the address; Protocol "ews" too; the hint is kept in extra.
    hinted = parse_credentials(
        _creds(
            SenderEmailAddress=None,
            UserName="bob@fabrikam.test",
            Protocol="ews",
            AutodiscoverUrl="https://ad.fabrikam.test/a.xml",
        )
    )
    assert hinted.imap.host == "fabrikam.test" and hinted.service_url == ""
    assert autodiscover_url_hint(hinted.extra) == "https://ad.fabrikam.test/a.xml"
    # A ServiceUrl given anyway wins.
    assert parse_credentials(_creds(ServiceUrl="https://mail.contoso.test/EWS/Exchange.asmx")).service_url


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"SenderEmailAddress": None}, "ServiceUrl", AUTODISCOVER_NEEDS_ADDRESS),
        ({"SenderEmailAddress": "not-an-address"}, "ServiceUrl", AUTODISCOVER_NEEDS_ADDRESS),
        ({"AutodiscoverUrl": "ftp://x/y"}, "AutodiscoverUrl", "must be an absolute http(s) URL"),
        ({"AutodiscoverUrl": "https://u:p@x/y"}, "AutodiscoverUrl", "must not contain credentials"),
        ({"Protocol": "imap"}, "ServiceUrl", "required"),
    ],
)
def test_autodiscover_credentials_refused(fields: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_credentials(_creds(**fields))
    assert (info.value.field, info.value.message) == (field, message)


# ------------------------------------------------------------------------------------------
# Against the simulator


async def test_direct_answer_gives_the_ews_url_and_the_mailbox_listens(
    ews: EwsSimulator, nursery: trio.Nursery
) -> None:
    account = ews.add_account()
    mailbox = autodiscover_mailbox(ews, account)
    assert mailbox.protocol == "ews" and mailbox.service_url == ""
    source = discovering_source(ews)
    tasks = Tasks()
    scope = await start_listening(nursery, source, mailbox, tasks)
    assert source.discovered_url(mailbox.id) == ews.url
    (catch_up,) = tasks.of("catch-up")
    ews.add_message(account.address, mime("found by autodiscover"))
    await tasks.wait("exists", 1)
    (data,), _ = await read_new(source, mailbox, _checkpoint(catch_up.seed_cursor))
    assert b"found by autodiscover" in data
    # Cached for the process: the reader did not ask again.
    assert autodiscover_requests(ews) == 1
    scope.cancel()


def _checkpoint(cursor: str | None) -> Checkpoint:
    return Checkpoint(EWS_UIDVALIDITY, 0, cursor or "")


async def test_first_candidate_failing_falls_through_to_the_next(ews: EwsSimulator) -> None:
    account = ews.add_account()
    mailbox = autodiscover_mailbox(ews, account)
    # A 404 path, then a closed port, then the real endpoint.
    source = discovering_source(ews, f"{ews.base_url}/missing", "http://127.0.0.1:9", ews.base_url)
    resolved = await source.resolve(mailbox)
    assert resolved.service_url == ews.url


async def test_redirect_addr_starts_again_with_the_new_address(ews: EwsSimulator) -> None:
    account = ews.add_account()
    alias = f"alias-{account.user}@{DOMAIN}"
    ews.autodiscover_redirect_addresses[alias] = account.address
    mailbox = autodiscover_mailbox(ews, account, SenderEmailAddress=alias)
    resolved = await discovering_source(ews).resolve(mailbox)
    assert resolved.service_url == ews.url
    assert autodiscover_requests(ews) == 2


async def test_redirect_addr_to_another_domain_uses_that_domains_candidates(ews: EwsSimulator) -> None:
    account = ews.add_account()
    alias = f"{account.user}@old-domain.test"
    ews.autodiscover_redirect_addresses[alias] = account.address
    mailbox = autodiscover_mailbox(ews, account, SenderEmailAddress=alias)
    source = EwsSource(
        autodiscover_bases={"old-domain.test": [f"{ews.base_url}/old"], DOMAIN: [ews.base_url]}
    )
    ews.autodiscover_paths.add("/old" + AUTODISCOVER_PATH)
    assert (await source.resolve(mailbox)).service_url == ews.url


async def test_redirect_url_and_http_redirects_are_followed(ews: EwsSimulator) -> None:
    account = ews.add_account()
    first, moved, final = (f"/{name}{AUTODISCOVER_PATH}" for name in ("first", "moved", "final"))
    # /first answers redirectUrl -> /moved, which answers HTTP 302 -> /final, which answers.
    ews.autodiscover_redirect_urls[first] = ews.base_url + moved
    ews.autodiscover_moved[moved] = ews.base_url + final
    ews.autodiscover_paths.add(final)
    resolved = await discovering_source(ews, f"{ews.base_url}/first").resolve(
        autodiscover_mailbox(ews, account)
    )
    assert resolved.service_url == ews.url
    assert autodiscover_requests(ews) == 3


async def test_redirect_url_loop_stops_after_ten(ews: EwsSimulator) -> None:
    account = ews.add_account()
    a, b = f"/a{AUTODISCOVER_PATH}", f"/b{AUTODISCOVER_PATH}"
    ews.autodiscover_redirect_urls.update({a: ews.base_url + b, b: ews.base_url + a})
    with pytest.raises(AutodiscoverError, match=f"more than {MAX_REDIRECTS} redirects"):
        await discovering_source(ews, f"{ews.base_url}/a").resolve(autodiscover_mailbox(ews, account))
    assert autodiscover_requests(ews) == MAX_REDIRECTS + 1


async def test_redirect_addr_loop_stops_after_ten(ews: EwsSimulator) -> None:
    account = ews.add_account()
    a, b = f"a-{account.user}@{DOMAIN}", f"b-{account.user}@{DOMAIN}"
    ews.autodiscover_redirect_addresses.update({a: b, b: a})
    mailbox = autodiscover_mailbox(ews, account, SenderEmailAddress=a)
    with pytest.raises(AutodiscoverError) as info:
        await discovering_source(ews).resolve(mailbox)
    assert f"Autodiscover found no EWS URL for {DOMAIN}: more than {MAX_REDIRECTS} redirects" in str(
        info.value
    )
    assert autodiscover_requests(ews) == MAX_REDIRECTS + 1


async def test_every_candidate_failing_names_them(ews: EwsSimulator) -> None:
    account = ews.add_account()
    mailbox = autodiscover_mailbox(ews, account, SenderEmailAddress=f"nobody@{DOMAIN}")
    source = discovering_source(ews, f"{ews.base_url}/missing", ews.base_url)
    with pytest.raises(MailConnectError) as info:
        await source.resolve(mailbox)
    message = str(info.value)
    assert message.startswith(f"Autodiscover found no EWS URL for {DOMAIN}: tried ")
    assert f"{ews.base_url}/missing{AUTODISCOVER_PATH}" in message and account.password not in message


async def test_wrong_password_is_an_auth_error(ews: EwsSimulator) -> None:
    account = ews.add_account()
    mailbox = autodiscover_mailbox(ews, account, Password="not-the-password")
    with pytest.raises(MailAuthError) as info:
        await discovering_source(ews).resolve(mailbox)
    assert "not-the-password" not in str(info.value)
    assert not isinstance(info.value, MailTokenRejectedError)


async def test_bearer_token_is_used_and_a_revoked_one_is_rejected(ews: EwsSimulator) -> None:
    account = ews.add_account()
    token = ews.issue_token(account.address)
    mailbox = autodiscover_mailbox(ews, account, Password=None, UseOAuth=True, AccessToken=token)
    source = discovering_source(ews)
    assert (await source.resolve(mailbox)).service_url == ews.url
    assert ews.requests[-1].authorization_scheme == "bearer"
    ews.revoke_token(token)
    with pytest.raises(MailTokenRejectedError):
        await discovering_source(ews).resolve(mailbox)


async def test_autodiscover_url_field_is_asked_first(ews: EwsSimulator) -> None:
    account = ews.add_account()
    mailbox = autodiscover_mailbox(ews, account, AutodiscoverUrl=f"{ews.base_url}{AUTODISCOVER_PATH}")
    # No bases for the domain: the hint answers before any DNS name would be tried.
    assert (await EwsSource().resolve(mailbox)).service_url == ews.url


async def test_connect_failure_forgets_the_discovered_url(ews: EwsSimulator, nursery: trio.Nursery) -> None:
    account = ews.add_account()
    mailbox = autodiscover_mailbox(ews, account)
    source = discovering_source(ews)
    # First answer: a dead EWS URL. Using it fails to connect, which forgets it.
    ews.autodiscover_ews_url = "http://127.0.0.1:9/EWS/Exchange.asmx"
    with pytest.raises(MailConnectError):
        async with source.open_reader(mailbox) as reader:
            await reader.fetch_new(INBOX, _checkpoint(""), limit=10)
    assert source.discovered_url(mailbox.id) == ""
    ews.autodiscover_ews_url = None
    tasks = Tasks()
    scope = await start_listening(nursery, source, mailbox, tasks)
    assert source.discovered_url(mailbox.id) == ews.url
    assert autodiscover_requests(ews) == 2
    scope.cancel()


# ------------------------------------------------------------------------------------------
# Through the service's API


async def test_mailbox_created_with_is_autodiscover_receives_mail(
    ews: EwsSimulator, dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery
) -> None:
    account = ews.add_account()
    async with running_service(dovecot, creatio, nursery) as service:
        creds = ews_credentials(
            ews,
            account,
            ServiceUrl=None,
            IsAutodiscover=True,
            AutodiscoverUrl=f"{ews.base_url}{AUTODISCOVER_PATH}",
            BpmEndpoint=creatio.endpoint(),
        )
        assert (await service.create(creds)).status_code == 200
        await service.wait_state(creds["Id"], MailboxState.LISTENING)
        ews.add_message(account.address, mime("via autodiscover"))
        (email,) = await creatio.wait_for_emails(creds["Id"], 1, timeout=15)
        assert email["Subject"] == "via autodiscover"
        assert autodiscover_requests(ews) >= 1
