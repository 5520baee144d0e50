"""End to end: /v1 registration -> IMAP IDLE on the real Dovecot -> signed events at a real receiver.

Signatures are checked with the real ``standardwebhooks`` and ``svix`` verifier libraries.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncIterator
from email.message import EmailMessage
from typing import Any

import pytest
import standardwebhooks
import svix.webhooks
import trio

from tests.secret_scan import register_secret
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot, MailUser
from tests.servers.ews import running_ews_simulator
from tests.servers.webhook import WebhookCall, WebhookReceiver
from tests.service.conftest import RunningService, running_service

SECRET = register_secret("whsec_" + base64.b64encode(b"webhook-test-key-0123456789abcdef").decode())
OLD_SECRET = register_secret("whsec_" + base64.b64encode(b"previous-webhook-key-0123456789ab").decode())
ATTACHMENT = bytes(range(256)) * 8
#: Short enough for a test, long enough (10 s) to outlast a receiver restart.
SHORT_SCHEDULE = ",".join(["0.2"] * 50)


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> WebhookReceiver:
    server = WebhookReceiver()
    await server.start(nursery)
    return server


@pytest.fixture
async def service(
    dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery
) -> AsyncIterator[RunningService]:
    async with running_service(dovecot, creatio, nursery, webhook_retry_schedule=SHORT_SCHEDULE) as running:
        yield running


def mail(subject: str, *, attachment: bool = False) -> bytes:
    message = EmailMessage()
    message["From"] = "Zoë Sender <zoe@example.test>"
    message["To"] = "Ivan <ivan@example.test>"
    message["Subject"] = subject
    message["Date"] = "Tue, 03 Jan 2023 10:00:00 +0100"
    message["Message-ID"] = f"<{uuid.uuid4().hex}@example.test>"
    message.set_content(f"Body of {subject} ✓\n")
    if attachment:
        message.add_attachment(
            ATTACHMENT, maintype="application", subtype="octet-stream", filename="data.bin"
        )
    return message.as_bytes()


async def register(service: RunningService, user: MailUser, url: str, secret: Any = SECRET) -> str:
    body = {
        "protocol": "imap",
        "host": service.dovecot.host,
        "port": service.dovecot.imaps_port,
        "tls": True,
        "username": user.name,
        "password": user.password,
        "folders": ["INBOX"],
        "webhook": {"url": url, "secret": secret},
    }
    response = await service.http.post("/v1/mailboxes", json=body)
    assert response.status_code == 201, response.text
    mailbox_id: str = response.json()["id"]
    with trio.fail_after(15):
        while (await service.http.get(f"/v1/mailboxes/{mailbox_id}")).json()["state"] != "listening":
            await trio.sleep(0.02)
    return mailbox_id


def verified(call: WebhookCall, secret: str = SECRET) -> Any:
    """The event, after both verifier libraries accepted the call's signature."""
    svix.webhooks.Webhook(secret).verify(call.body, call.headers)
    return standardwebhooks.Webhook(secret).verify(call.body, call.headers)


async def test_new_mail_reaches_the_webhook_signed(
    service: RunningService, receiver: WebhookReceiver, make_mail_user: Any
) -> None:
    user: MailUser = make_mail_user()
    mailbox_id = await register(service, user, receiver.url("/hooks/a"), secret=[SECRET, OLD_SECRET])
    appended_at = time.time()
    await service.dovecot.aappend(user, mail("Привет ✓", attachment=True))
    (call,) = await receiver.wait_accepted("/hooks/a", 1)
    # Both secrets sign during a rotation: a receiver on either one accepts the call.
    event = verified(call)
    assert verified(call, OLD_SECRET) == event
    assert len(call.headers["webhook-signature"].split()) == 2
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(
            call.body, call.headers
        )
    assert call.headers["webhook-id"] == event["id"] and event["id"].startswith("msg_")
    assert abs(int(call.headers["webhook-timestamp"]) - time.time()) < 60
    assert (event["type"], event["mailbox"], event["version"]) == ("message.new", mailbox_id, 1)
    data = event["data"]
    assert data["subject"] == "Привет ✓"
    assert "zoe@example.test" in data["from"]
    assert any("ivan@example.test" in to for to in data["to"])
    assert data["date"] == "2023-01-03T09:00:00.000Z"
    assert data["message_id"].endswith("@example.test>")
    assert data["text"] == "Body of Привет ✓ ✓\n" and data["html"] is None
    assert data["folder"] == "INBOX"
    (attachment,) = data["attachments"]
    assert (attachment["filename"], attachment["size"]) == ("data.bin", len(ATTACHMENT))
    assert base64.b64decode(attachment["content"]) == ATTACHMENT
    assert call.received_at - appended_at < 10
    # The mailbox answers with its state, never its secrets.
    shown = await service.http.get(f"/v1/mailboxes/{mailbox_id}")
    assert SECRET not in shown.text and user.password not in shown.text


async def test_receiver_down_then_back_gets_everything_once_in_order(
    service: RunningService, receiver: WebhookReceiver, make_mail_user: Any, nursery: trio.Nursery
) -> None:
    user: MailUser = make_mail_user()
    mailbox_id = await register(service, user, receiver.url("/hooks/down"))
    store = service.adapters.store
    await receiver.stop()
    subjects = [f"while down {n}" for n in range(5)]
    for subject in subjects:
        await service.dovecot.aappend(user, mail(subject))
    # The mail is read and queued while the receiver is down: the checkpoint moves on.
    outbox = None
    with trio.fail_after(15):
        while True:
            checkpoint = await store.get_checkpoint(mailbox_id, "INBOX")
            endpoints = await store.outbox_endpoints()
            if endpoints and checkpoint is not None and checkpoint.last_uid >= 5:
                (outbox,) = endpoints
                waiting = await store.outbox_peek(outbox, 10)
                if len(waiting) == 5 and waiting[0].attempts >= 1:
                    break
            await trio.sleep(0.02)
    assert "cannot reach the receiver" in waiting[0].last_error
    await receiver.start(nursery)
    calls = await receiver.wait_accepted("/hooks/down", 5)
    events = [verified(call) for call in calls]
    assert [e["data"]["subject"] for e in events] == subjects
    assert len({e["id"] for e in events}) == 5
    with trio.fail_after(5):  # the sender records each answer just after the receiver sent it
        while await store.outbox_count(outbox):
            await trio.sleep(0.02)
    # Nothing more: a later mail arrives alone.
    await service.dovecot.aappend(user, mail("after"))
    calls = await receiver.wait_accepted("/hooks/down", 6)
    assert [c.event["data"]["subject"] for c in calls] == [*subjects, "after"]
    assert len(receiver.calls_to("/hooks/down")) == 6


async def test_a_slow_receiver_does_not_delay_another(
    service: RunningService, receiver: WebhookReceiver, make_mail_user: Any
) -> None:
    slow_user, fast_user = make_mail_user(), make_mail_user()
    gate = trio.Event()
    receiver.behave("/hooks/slow", gate=gate)
    await register(service, slow_user, receiver.url("/hooks/slow"))
    await register(service, fast_user, receiver.url("/hooks/fast"))
    await service.dovecot.aappend(slow_user, mail("slow 1"))
    await service.dovecot.aappend(slow_user, mail("slow 2"))
    await receiver.wait_until(lambda: receiver.in_progress.get("/hooks/slow", 0) == 1)
    await service.dovecot.aappend(fast_user, mail("fast"))
    (fast,) = await receiver.wait_accepted("/hooks/fast", 1)
    assert fast.event["data"]["subject"] == "fast"
    # The slow receiver still holds its first call, and its mailbox's second event waits (order).
    assert receiver.in_progress["/hooks/slow"] == 1 and receiver.calls_to("/hooks/slow") == []
    gate.set()
    slow = await receiver.wait_accepted("/hooks/slow", 2)
    assert [c.event["data"]["subject"] for c in slow] == ["slow 1", "slow 2"]


async def test_429_retry_after_is_honoured(
    dovecot: Dovecot,
    creatio: CreatioStandIn,
    nursery: trio.Nursery,
    receiver: WebhookReceiver,
    make_mail_user: Any,
) -> None:
    # The schedule alone would wait a minute: only Retry-After explains a retry within seconds.
    async with running_service(dovecot, creatio, nursery, webhook_retry_schedule="60,60") as service:
        user: MailUser = make_mail_user()
        receiver.behave("/hooks/busy", answers=[(429, {"Retry-After": "1"})])
        await register(service, user, receiver.url("/hooks/busy"))
        await service.dovecot.aappend(user, mail("busy"))
        await receiver.wait_accepted("/hooks/busy", 1, timeout=20)
        first, second = receiver.calls_to("/hooks/busy")
        assert (first.status, second.accepted) == (429, True)
        assert 0.9 <= second.received_at - first.received_at < 10
        assert first.headers["webhook-id"] == second.headers["webhook-id"]


async def test_final_4xx_and_exhausted_retries_become_dead_letters_and_replay(
    dovecot: Dovecot,
    creatio: CreatioStandIn,
    nursery: trio.Nursery,
    receiver: WebhookReceiver,
    make_mail_user: Any,
) -> None:
    async with running_service(dovecot, creatio, nursery, webhook_retry_schedule="0.05,0.05") as service:
        gone_user, failing_user = make_mail_user(), make_mail_user()
        receiver.behave("/hooks/gone", status=410)
        receiver.behave("/hooks/failing", status=503)
        gone = await register(service, gone_user, receiver.url("/hooks/gone"))
        failing = await register(service, failing_user, receiver.url("/hooks/failing"))
        await service.dovecot.aappend(gone_user, mail("gone 1"))
        await service.dovecot.aappend(failing_user, mail("failing 1"))

        async def dead_letters() -> list[dict[str, Any]]:
            items: list[dict[str, Any]] = (await service.http.get("/v1/dead-letters")).json()["items"]
            return items

        with trio.fail_after(15):
            while len(await dead_letters()) < 2:
                await trio.sleep(0.02)
        by_mailbox = {item["mailbox"]: item for item in await dead_letters()}
        # 410 is final: one attempt. 503 is retried: the first attempt and the two retries.
        assert (by_mailbox[gone]["attempts"], by_mailbox[gone]["last_error"]) == (1, "HTTP 410")
        assert (by_mailbox[failing]["attempts"], by_mailbox[failing]["last_error"]) == (3, "HTTP 503")
        assert len(receiver.calls_to("/hooks/gone")) == 1 and len(receiver.calls_to("/hooks/failing")) == 3
        assert by_mailbox[gone]["event"]["data"]["subject"] == "gone 1"

        # A dead letter does not block the mailbox: its next mail goes (and is refused) too.
        await service.dovecot.aappend(gone_user, mail("gone 2"))
        with trio.fail_after(15):
            while len(await dead_letters()) < 3:
                await trio.sleep(0.02)

        receiver.behave("/hooks/gone", status=200)
        receiver.behave("/hooks/failing", status=200)
        one = await service.http.post(f"/v1/dead-letters/{by_mailbox[failing]['id']}/replay")
        assert one.status_code == 202
        (replayed,) = await receiver.wait_accepted("/hooks/failing", 1)
        assert replayed.headers["webhook-id"] == by_mailbox[failing]["id"]
        assert verified(replayed)["data"]["subject"] == "failing 1"

        everything = await service.http.post("/v1/dead-letters/replay")
        assert everything.json() == {"replayed": 2}
        calls = await receiver.wait_accepted("/hooks/gone", 2)
        assert [c.event["data"]["subject"] for c in calls] == ["gone 1", "gone 2"]
        assert await dead_letters() == []


async def test_refused_credentials_and_the_fix_are_mailbox_state_events(
    service: RunningService, receiver: WebhookReceiver, make_mail_user: Any
) -> None:
    user: MailUser = make_mail_user()
    body = {
        "host": service.dovecot.host,
        "port": service.dovecot.imaps_port,
        "username": user.name,
        "password": "wrong-password-123",
        "webhook": {"url": receiver.url("/hooks/state"), "secret": SECRET},
    }
    created = await service.http.post("/v1/mailboxes", json=body)
    assert created.status_code == 201, created.text
    mailbox_id = created.json()["id"]
    (refused,) = await receiver.wait_accepted("/hooks/state", 1)
    event = verified(refused)
    assert (event["type"], event["mailbox"]) == ("mailbox.state", mailbox_id)
    assert event["data"]["available"] is False
    assert event["data"]["error_class"] == "AuthenticationException"
    assert (await service.http.get(f"/v1/mailboxes/{mailbox_id}")).json()["state"] == "authenticationError"

    fixed = await service.http.patch(f"/v1/mailboxes/{mailbox_id}", json={"password": user.password})
    assert fixed.status_code == 200, fixed.text
    calls = await receiver.wait_accepted("/hooks/state", 2)
    assert verified(calls[1])["data"]["available"] is True
    await service.dovecot.aappend(user, mail("after the fix"))
    calls = await receiver.wait_accepted("/hooks/state", 3)
    assert verified(calls[2])["data"]["subject"] == "after the fix"


async def test_an_ews_mailbox_registered_through_v1_reaches_the_webhook(
    service: RunningService, receiver: WebhookReceiver
) -> None:
    async with running_ews_simulator(minute_seconds=0.4, keepalive_seconds=0.1) as simulator:
        account = simulator.add_account()
        body = {
            "protocol": "ews",
            "service_url": simulator.url,
            "username": account.user,
            "password": account.password,
            "email": account.address,
            "webhook": {"url": receiver.url("/hooks/ews"), "secret": SECRET},
        }
        created = await service.http.post("/v1/mailboxes", json=body)
        assert created.status_code == 201, created.text
        mailbox_id = created.json()["id"]
        with trio.fail_after(15):
            while (await service.http.get(f"/v1/mailboxes/{mailbox_id}")).json()["state"] != "listening":
                await trio.sleep(0.02)
        simulator.add_message(account.address, mail("over EWS"))
        (call,) = await receiver.wait_accepted("/hooks/ews", 1)
    event = verified(call)
    assert (event["mailbox"], event["data"]["subject"]) == (mailbox_id, "over EWS")
