"""EWS mailboxes through the whole service (API, supervisor, worker, Creatio stand-in)."""

from __future__ import annotations

import base64
import time

import trio

from emlisten.models import MailboxState
from tests.ews.conftest import ews_credentials
from tests.ews.test_source import mime
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot
from tests.servers.ews import EwsSimulator, running_ews_simulator
from tests.service.conftest import running_service


async def test_wrong_password_reports_the_mailbox_unavailable_then_recovers(
    ews: EwsSimulator, dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery
) -> None:
    account = ews.add_account()
    async with running_service(dovecot, creatio, nursery) as service:
        creds = ews_credentials(ews, account, Password="not-the-password", BpmEndpoint=creatio.endpoint())
        assert (await service.create(creds)).status_code == 200
        state = await creatio.wait_for_state(creds["Id"], available=False, timeout=15)
        assert state["ExceptionClassName"] == "AuthenticationException"
        assert "not-the-password" not in str(state)
        await service.wait_state(creds["Id"], MailboxState.AUTHENTICATION_ERROR)

        since = time.monotonic()
        fixed = dict(creds, Password=account.password)
        assert (await service.create(fixed, path="update")).status_code == 200
        await creatio.wait_for_state(creds["Id"], available=True, timeout=15, since=since)
        await service.wait_state(creds["Id"], MailboxState.LISTENING)


async def test_delivered_once_across_stream_reissues_and_resubscribes(
    dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery
) -> None:
    # The service asks for 29-minute streams; a "minute" of 10 ms ends each after 0.29 s.
    async with (
        running_ews_simulator(minute_seconds=0.01, keepalive_seconds=0.05) as ews,
        running_service(dovecot, creatio, nursery) as service,
    ):
        account = ews.add_account()
        creds = ews_credentials(ews, account, BpmEndpoint=creatio.endpoint())
        assert (await service.create(creds)).status_code == 200
        await service.wait_state(creds["Id"], MailboxState.LISTENING)
        attachment = bytes(range(256)) * 20
        ews.add_message(account.address, mime("first", "body ✓\n", attachment))
        (email,) = await creatio.wait_for_emails(creds["Id"], 1, timeout=15)
        assert email["Subject"] == "first" and "body ✓" in email["Body"]
        assert base64.b64decode(email["Attachments"][0]["Base64Data"]) == attachment

        ews.expire_subscriptions(account.address)
        ews.add_message(account.address, mime("second"))
        await ews.wait_until(lambda: len(ews.requests_for(account.address, "Subscribe")) >= 2)
        ews.add_message(account.address, mime("third"))
        emails = await creatio.wait_for_emails(creds["Id"], 3, timeout=15)
        assert [e["Subject"] for e in emails] == ["first", "second", "third"]
        # Stream responses keep ending (ConnectionStatus Closed) and being re-issued meanwhile.
        await ews.wait_until(lambda: len(ews.requests_for(account.address, "GetStreamingEvents")) >= 3)
        with trio.move_on_after(0.3):
            await creatio.wait_for_emails(creds["Id"], 4, timeout=1)
        assert len(creatio.emails_for(creds["Id"])) == 3
