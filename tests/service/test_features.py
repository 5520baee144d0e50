"""Per-mailbox options Creatio sets: FeatureValues.MarkEmailsAsSynchronized, UseFullEmail=false."""

from __future__ import annotations

from emlisten.mail.imap.source import SYNCED_KEYWORD
from emlisten.models import MailboxState
from tests.servers.dovecot import MailUser
from tests.service.conftest import RunningService


async def test_mark_emails_as_synchronized(service: RunningService, mail_user: MailUser) -> None:
    creds = service.credentials(mail_user, FeatureValues={"MarkEmailsAsSynchronized": True})
    assert (await service.create(creds)).status_code == 200
    await service.wait_state(creds["Id"], MailboxState.LISTENING)
    uid = await service.dovecot.aappend(mail_user, b"Subject: mark me\r\n\r\nbody\r\n")
    await service.creatio.wait_for_emails(creds["Id"], 1, timeout=15)

    def flags() -> bytes:
        with service.dovecot.imap(mail_user) as imap:
            imap.select("INBOX", readonly=True)
            typ, data = imap.uid("FETCH", str(uid), "(FLAGS)")
            assert typ == "OK"
            return b" ".join(part for part in data if isinstance(part, bytes))

    import trio

    # Marking follows the 2xx: poll briefly for it.
    with trio.fail_after(10):
        while SYNCED_KEYWORD.encode() not in (current := await trio.to_thread.run_sync(flags)):
            await trio.sleep(0.05)
    assert b"\\Seen" not in current


async def test_without_the_feature_nothing_is_marked(service: RunningService, mail_user: MailUser) -> None:
    creds = service.credentials(mail_user)
    assert (await service.create(creds)).status_code == 200
    await service.wait_state(creds["Id"], MailboxState.LISTENING)
    uid = await service.dovecot.aappend(mail_user, b"Subject: leave me\r\n\r\nbody\r\n")
    await service.creatio.wait_for_emails(creds["Id"], 1, timeout=15)
    with service.dovecot.imap(mail_user) as imap:
        imap.select("INBOX", readonly=True)
        _typ, data = imap.uid("FETCH", str(uid), "(FLAGS)")
    assert SYNCED_KEYWORD.encode() not in b" ".join(p for p in data if isinstance(p, bytes))


async def test_use_full_email_false_sends_ids_through_new_email(
    service: RunningService, mail_user: MailUser
) -> None:
    creds = service.credentials(mail_user, UseFullEmail=False)
    assert (await service.create(creds)).status_code == 200
    await service.wait_state(creds["Id"], MailboxState.LISTENING)
    uid = await service.dovecot.aappend(mail_user, b"Subject: ids only\r\n\r\nbody\r\n")
    (call,) = await service.creatio.wait_for_calls("NewEmail", 1, timeout=15)
    event = call.body["newEvent"]
    assert event["Id"] == creds["Id"]
    assert len(event["UniqueIds"]) == 1 and event["UniqueIds"][0].endswith(f"/{uid}")
    assert service.creatio.calls("ProcessFullEmail") == []
