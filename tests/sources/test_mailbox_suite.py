"""One mailbox-level suite, run against every MailSource: IMAP (Dovecot) today, and the Exchange
adapters (EWS and Graph simulators) as they join the `backend` fixture's parameters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from email.message import EmailMessage
from email.utils import make_msgid

import httpx
import pytest
import trio

from emlisten.models import MailboxState
from emlisten.service.node import build_local_adapters, run_node
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot
from tests.service.conftest import fast_settings
from tests.sources.backends import Account, ImapBackend, MailServerBackend


@pytest.fixture(params=["imap", "ews", "graph"])
async def backend(request: pytest.FixtureRequest, dovecot: Dovecot) -> AsyncIterator[MailServerBackend]:
    if request.param == "graph":
        from tests.servers.graph import running_graph_simulator
        from tests.sources.backend_graph import GraphBackend

        async with running_graph_simulator() as graph_simulator:
            yield GraphBackend(graph_simulator)
        return
    if request.param == "ews":
        from tests.servers.ews import running_ews_simulator
        from tests.sources.backend_ews import EwsBackend

        async with running_ews_simulator() as simulator:
            yield EwsBackend(simulator)
        return
    yield ImapBackend(dovecot)


@pytest.fixture
async def api(
    dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery
) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    settings = fast_settings(dovecot)
    adapters = build_local_adapters(settings)
    shutdown = trio.Event()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        await run_node(settings, adapters, handle_signals=False, shutdown=shutdown, task_status=task_status)

    port = await nursery.start(run)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        yield http, adapters
    shutdown.set()


def message(subject: str, body: str, attachment: bytes | None = None) -> tuple[bytes, str]:
    msg = EmailMessage()
    msg["From"] = "Sender <sender@example.test>"
    msg["To"] = "rcpt@example.test"
    msg["Subject"] = subject
    msg["Date"] = "Wed, 04 Jan 2023 09:00:00 +0000"
    message_id = make_msgid(domain="example.test")
    msg["Message-ID"] = message_id
    msg.set_content(body)
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="pdf", filename="report.pdf")
    return msg.as_bytes(), message_id


async def wait_listening(adapters: object, mailbox_id: str) -> None:
    store = adapters.store  # type: ignore[attr-defined]
    with trio.fail_after(20):
        while True:
            status = (await store.get_statuses([mailbox_id]))[mailbox_id]
            if status is not None and status.state is MailboxState.LISTENING:
                return
            await trio.sleep(0.02)


async def subscribe(
    api: tuple[httpx.AsyncClient, object], backend: MailServerBackend, creatio: CreatioStandIn
) -> tuple[Account, str]:
    http, adapters = api
    account = await backend.new_account()
    creds = backend.credentials(account, creatio)
    response = await http.post("/api/listeners/create", json=[creds])
    assert response.status_code == 200, response.text
    await wait_listening(adapters, creds["Id"])
    return account, creds["Id"]


async def test_new_mail_delivered_once_and_intact(
    api: tuple[httpx.AsyncClient, object], backend: MailServerBackend, creatio: CreatioStandIn
) -> None:
    account, mailbox_id = await subscribe(api, backend, creatio)
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 8
    raw, message_id = message("Grüße aus Köln", "Schöne Grüße ✓\n", pdf)
    await backend.deliver(account, raw)
    (email,) = await creatio.wait_for_emails(mailbox_id, 1, timeout=20)
    assert email["Subject"] == "Grüße aus Köln"
    assert "Schöne Grüße ✓" in email["Body"]
    assert email["MessageId"] == message_id
    import base64

    (attachment,) = email["Attachments"]
    assert attachment["Name"] == "report.pdf"
    assert base64.b64decode(attachment["Base64Data"]) == pdf


async def test_mail_while_disconnected_is_caught_up(
    api: tuple[httpx.AsyncClient, object], backend: MailServerBackend, creatio: CreatioStandIn
) -> None:
    account, mailbox_id = await subscribe(api, backend, creatio)
    await backend.deliver(account, message("one", "1\n")[0])
    await creatio.wait_for_emails(mailbox_id, 1, timeout=20)
    await backend.cut_connections(account)
    await backend.deliver(account, message("two", "2\n")[0])
    await backend.deliver(account, message("three", "3\n")[0])
    emails = await creatio.wait_for_emails(mailbox_id, 3, timeout=20)
    assert [e["Subject"] for e in emails] == ["one", "two", "three"]


async def test_closed_mailbox_gets_no_more_mail(
    api: tuple[httpx.AsyncClient, object], backend: MailServerBackend, creatio: CreatioStandIn
) -> None:
    http, _ = api
    closing, closing_id = await subscribe(api, backend, creatio)
    staying, staying_id = await subscribe(api, backend, creatio)
    assert (await http.post("/api/listeners/close", json=[closing_id])).status_code == 200
    await backend.deliver(closing, message("ignored", "x\n")[0])
    await backend.deliver(staying, message("kept", "y\n")[0])
    (email,) = await creatio.wait_for_emails(staying_id, 1, timeout=20)
    assert email["Subject"] == "kept"
    assert creatio.emails_for(closing_id) == []
