"""End to end: Creatio API -> IMAP IDLE on a real Dovecot -> ProcessFullEmail on the stand-in."""

from __future__ import annotations

import base64
import os
import uuid
from email.message import EmailMessage
from email.utils import make_msgid

import trio

from emlisten.models import MailboxState
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot, MailUser
from tests.service.conftest import RunningService, running_service

ATTACHMENT = bytes(range(256)) * 40  # binary, every byte value


def rich_message(subject: str, body: str) -> tuple[bytes, str]:
    msg = EmailMessage()
    msg["From"] = "Zoë Sender <zoe@example.test>"
    msg["To"] = "Ivan <ivan@example.test>, second@example.test"
    msg["Cc"] = "copy@example.test"
    msg["Subject"] = subject
    msg["Date"] = "Tue, 03 Jan 2023 10:00:00 +0100"
    message_id = make_msgid(domain="example.test")
    msg["Message-ID"] = message_id
    msg.set_content(body)
    msg.add_attachment(ATTACHMENT, maintype="application", subtype="octet-stream", filename="data.bin")
    return msg.as_bytes(), message_id


async def test_new_mail_reaches_creatio_once_per_mailbox(
    service: RunningService, make_mail_user: object
) -> None:
    users: list[MailUser] = [make_mail_user() for _ in range(3)]  # type: ignore[operator]
    creds = [
        service.credentials(users[0], security="tls"),
        service.credentials(users[1], security="starttls"),
        service.credentials(users[2], security="plain"),
    ]
    response = await service.create(*creds)
    assert response.status_code == 200, response.text
    for c in creds:
        await service.wait_state(c["Id"], MailboxState.LISTENING)
    assert set((await service.subscription_states(*(c["Id"] for c in creds))).values()) == {"exists"}

    sent = {}
    for user, c in zip(users, creds, strict=True):
        subject = f"Привет, {user.name} — 你好 ✓"
        raw, message_id = rich_message(subject, f"Тело письма для {user.name}: ünïcødé ✓\n")
        await service.dovecot.aappend(user, raw)
        sent[c["Id"]] = (subject, message_id, user)

    for mailbox_id, (subject, message_id, user) in sent.items():
        (email,) = await service.creatio.wait_for_emails(mailbox_id, 1, timeout=15)
        assert email["Subject"] == subject
        assert f"Тело письма для {user.name}: ünïcødé ✓" in email["Body"]
        assert email["IsHtmlBody"] is False
        assert "zoe@example.test" in email["Sender"]
        assert any("ivan@example.test" in r for r in email["Recepients"])
        assert any("second@example.test" in r for r in email["Recepients"])
        assert any("copy@example.test" in r for r in email["CopyRecepients"])
        assert email["MessageId"] == message_id
        (attachment,) = email["Attachments"]
        assert attachment["Name"] == "data.bin"
        assert base64.b64decode(attachment["Base64Data"]) == ATTACHMENT
        assert attachment["IsInline"] is False

    # Exactly once: nothing more arrives for any mailbox (checked after a later mail got through).
    probe_user = users[0]
    await service.dovecot.aappend(probe_user, rich_message("probe", "probe\n")[0])
    await service.creatio.wait_for_emails(creds[0]["Id"], 2, timeout=15)
    for c in creds[1:]:
        assert len(service.creatio.emails_for(c["Id"])) == 1


async def test_close_stops_delivery(service: RunningService, make_mail_user: object) -> None:
    closing: MailUser = make_mail_user()  # type: ignore[operator]
    staying: MailUser = make_mail_user()  # type: ignore[operator]
    c_closing, c_staying = service.credentials(closing), service.credentials(staying)
    assert (await service.create(c_closing, c_staying)).status_code == 200
    await service.wait_state(c_closing["Id"], MailboxState.LISTENING)
    await service.wait_state(c_staying["Id"], MailboxState.LISTENING)

    response = await service.http.post("/api/listeners/close", json=[c_closing["Id"]])
    assert response.status_code == 200
    assert await service.subscription_states(c_closing["Id"], c_staying["Id"]) == {
        c_closing["Id"]: "closed",
        c_staying["Id"]: "exists",
    }
    await service.dovecot.aappend(closing, rich_message("after close", "x\n")[0])
    await service.dovecot.aappend(staying, rich_message("still here", "y\n")[0])
    (email,) = await service.creatio.wait_for_emails(c_staying["Id"], 1, timeout=15)
    assert email["Subject"] == "still here"
    assert service.creatio.emails_for(c_closing["Id"]) == []


async def test_unknown_ids_read_closed(service: RunningService) -> None:
    unknown = str(uuid.uuid4())
    assert await service.subscription_states(unknown) == {unknown: "closed"}


async def test_mail_during_disconnect_is_delivered_after_reconnect(
    service: RunningService, mail_user: MailUser
) -> None:
    creds = service.credentials(mail_user)
    assert (await service.create(creds)).status_code == 200
    await service.wait_state(creds["Id"], MailboxState.LISTENING)
    await service.dovecot.aappend(mail_user, rich_message("before", "1\n")[0])
    await service.creatio.wait_for_emails(creds["Id"], 1, timeout=15)

    # Cut the session, then deliver straight into the Maildir while the listener reconnects.
    await service.dovecot.akick(mail_user)
    await service.dovecot.aappend(mail_user, rich_message("during", "2\n")[0])
    emails = await service.creatio.wait_for_emails(creds["Id"], 2, timeout=15)
    assert [e["Subject"] for e in emails] == ["before", "during"]
    await service.wait_state(creds["Id"], MailboxState.LISTENING)
    await service.dovecot.aappend(mail_user, rich_message("after", "3\n")[0])
    emails = await service.creatio.wait_for_emails(creds["Id"], 3, timeout=15)
    assert [e["Subject"] for e in emails] == ["before", "during", "after"]


async def test_creatio_errors_delay_but_lose_and_double_nothing(
    service: RunningService, mail_user: MailUser
) -> None:
    creds = service.credentials(mail_user)
    assert (await service.create(creds)).status_code == 200
    await service.wait_state(creds["Id"], MailboxState.LISTENING)
    service.creatio.fail_next("ProcessFullEmail", status=500, count=4)
    subjects = [f"mail {n}" for n in range(5)]
    for subject in subjects:
        await service.dovecot.aappend(mail_user, rich_message(subject, "x\n")[0])
    await service.creatio.wait_for_emails(creds["Id"], 5, timeout=20)
    emails = service.creatio.emails_for(creds["Id"])
    assert [e["Subject"] for e in emails] == subjects
    rejected = [c for c in service.creatio.calls("ProcessFullEmail") if not c.accepted]
    assert len(rejected) == 4


async def test_failing_creatio_endpoint_does_not_slow_other_mailboxes(
    service: RunningService, make_mail_user: object
) -> None:
    failing: MailUser = make_mail_user()  # type: ignore[operator]
    healthy: MailUser = make_mail_user()  # type: ignore[operator]
    c_failing, c_healthy = service.credentials(failing), service.credentials(healthy)
    service.creatio.fail_mailbox(c_failing["Id"], 503)
    assert (await service.create(c_failing, c_healthy)).status_code == 200
    await service.wait_state(c_failing["Id"], MailboxState.LISTENING)
    await service.wait_state(c_healthy["Id"], MailboxState.LISTENING)
    await service.dovecot.aappend(failing, rich_message("stuck", "x\n")[0])
    await service.creatio.wait_for_calls("ProcessFullEmail", 1, timeout=15)
    for n in range(3):
        await service.dovecot.aappend(healthy, rich_message(f"flows {n}", "y\n")[0])
    emails = await service.creatio.wait_for_emails(c_healthy["Id"], 3, timeout=15)
    assert [e["Subject"] for e in emails] == ["flows 0", "flows 1", "flows 2"]
    # Now the failing endpoint recovers: the held mail arrives, once.
    service.creatio.clear_failures()
    (stuck,) = await service.creatio.wait_for_emails(c_failing["Id"], 1, timeout=15)
    assert stuck["Subject"] == "stuck"


async def test_wrong_password_reported_unavailable_then_recovers(
    service: RunningService, make_mail_user: object
) -> None:
    broken: MailUser = make_mail_user()  # type: ignore[operator]
    fine: MailUser = make_mail_user()  # type: ignore[operator]
    c_broken = service.credentials(broken, Password="definitely-wrong")
    c_fine = service.credentials(fine)
    assert (await service.create(c_broken, c_fine)).status_code == 200

    state = await service.creatio.wait_for_state(c_broken["Id"], False, timeout=15)
    assert state["ExceptionMessage"]
    assert "definitely-wrong" not in str(state)
    await service.wait_state(c_broken["Id"], MailboxState.AUTHENTICATION_ERROR)
    # subscriptionsstate still "exists": re-creating would not fix a password.
    assert (await service.subscription_states(c_broken["Id"]))[c_broken["Id"]] == "exists"

    await service.wait_state(c_fine["Id"], MailboxState.LISTENING)
    await service.dovecot.aappend(fine, rich_message("unaffected", "x\n")[0])
    (email,) = await service.creatio.wait_for_emails(c_fine["Id"], 1, timeout=15)
    assert email["Subject"] == "unaffected"

    # Creatio sends the right password through /update: the mailbox recovers and says so.
    fixed = dict(c_broken, Password=broken.password)
    response = await service.http.post("/api/listeners/update", json=[fixed])
    assert response.status_code == 200, response.text
    await service.creatio.wait_for_state(c_broken["Id"], True, timeout=15)
    await service.wait_state(c_broken["Id"], MailboxState.LISTENING)


async def test_malformed_requests_get_4xx_with_message(service: RunningService, mail_user: MailUser) -> None:
    response = await service.http.post(
        "/api/listeners/create", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert 400 <= response.status_code < 500
    assert response.json()["Message"]
    bad = service.credentials(mail_user)
    del bad["ServiceUrl"]
    response = await service.create(bad)
    assert response.status_code == 400
    assert "ServiceUrl" in response.text


async def test_mail_delivered_while_dovecot_was_down_arrives_after_restart(
    private_service: RunningService,
) -> None:
    dovecot = private_service.dovecot
    user = dovecot.add_user()
    creds = private_service.credentials(user)
    assert (await private_service.create(creds)).status_code == 200
    await private_service.wait_state(creds["Id"], MailboxState.LISTENING)

    await trio.to_thread.run_sync(dovecot.stop)
    await private_service.wait_state(creds["Id"], MailboxState.CONNECT_ERROR)
    # The server is down: deliver the way an MTA would, straight into the Maildir's new/.
    raw, message_id = rich_message("while down", "delivered into the Maildir\n")
    maildir_new = dovecot.mail_root / user.name / "Maildir" / "new"
    delivered = maildir_new / f"{uuid.uuid4().hex}.emlisten-test"
    delivered.write_bytes(raw)
    stat = maildir_new.stat()
    os.chown(delivered, stat.st_uid, stat.st_gid)
    await trio.to_thread.run_sync(dovecot.start)
    (email,) = await private_service.creatio.wait_for_emails(creds["Id"], 1, timeout=20)
    assert email["Subject"] == "while down"
    assert email["MessageId"] == message_id
    await private_service.wait_state(creds["Id"], MailboxState.LISTENING)


async def test_backlog_bigger_than_a_batch_arrives_in_order_once(
    dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery
) -> None:
    async with running_service(dovecot, creatio, nursery, batch_max_count=2) as service:
        user = dovecot.add_user()
        creds = service.credentials(user)
        creatio.fail_mailbox(creds["Id"], 503)  # builds a backlog while Creatio is down
        assert (await service.create(creds)).status_code == 200
        await service.wait_state(creds["Id"], MailboxState.LISTENING)
        subjects = [f"backlog {n}" for n in range(5)]
        for subject in subjects:
            await dovecot.aappend(user, rich_message(subject, "x\n")[0])
        await creatio.wait_for_calls("ProcessFullEmail", 1, timeout=15)
        creatio.clear_failures()
        emails = await creatio.wait_for_emails(creds["Id"], 5, timeout=20)
        assert [e["Subject"] for e in emails] == subjects
        accepted = [c for c in creatio.calls("ProcessFullEmail") if c.accepted]
        assert all(len(c.body["Emails"]) <= 2 for c in accepted)
