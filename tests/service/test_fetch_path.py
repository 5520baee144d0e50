"""Where mail is fetched: on the listening session in ``--role=all`` (one login per mailbox),
by a reader only for what the listener could not carry."""

from __future__ import annotations

import re

import trio

from emlisten.models import MailboxState
from tests.imap.test_prefetch import EXISTS_LINE
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot, MailUser, make_message
from tests.servers.faultproxy import FaultProxy
from tests.service.conftest import RunningService, running_service


async def metric(service: RunningService, name: str, **labels: str) -> float:
    """Sum of a counter's samples in /metrics whose labels include ``labels``."""
    text = (await service.http.get("/metrics")).text
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


async def logins(service: RunningService) -> float:
    return sum(
        [
            await metric(service, "emlisten_imap_commands_total", command=command, outcome="ok")
            for command in ("LOGIN", "AUTHENTICATE")
        ]
    )


async def test_mail_is_fetched_on_the_listening_session(
    service: RunningService, make_mail_user: object
) -> None:
    users: list[MailUser] = [make_mail_user() for _ in range(3)]  # type: ignore[operator]
    creds = [service.credentials(user) for user in users]
    assert (await service.create(*creds)).status_code == 200
    for c in creds:
        await service.wait_state(c["Id"], MailboxState.LISTENING)
    assert await logins(service) == len(users)

    for round_ in range(3):
        for user in users:
            await service.dovecot.aappend(user, make_message(subject=f"{user.name} {round_}"))
        for c in creds:
            emails = await service.creatio.wait_for_emails(c["Id"], round_ + 1, timeout=15)
            assert [e["Subject"] for e in emails][-1].endswith(str(round_))

    # Nine mails, and still one session per mailbox: no reader was ever opened.
    assert await logins(service) == len(users)
    assert await metric(service, "emlisten_prefetched_emails_total") == 9


async def test_large_mail_goes_through_a_reader(service: RunningService, make_mail_user: object) -> None:
    user: MailUser = make_mail_user()  # type: ignore[operator]
    c = service.credentials(user)
    assert (await service.create(c)).status_code == 200
    await service.wait_state(c["Id"], MailboxState.LISTENING)
    big = make_message(subject="big", body="y" * 400_000 + "\r\n")  # above the 256 KiB default
    await service.dovecot.aappend(user, big)
    await service.dovecot.aappend(user, make_message(subject="small after big"))
    emails = await service.creatio.wait_for_emails(c["Id"], 2, timeout=15)
    assert [e["Subject"] for e in emails] == ["big", "small after big"]  # in UID order
    assert await logins(service) == 2  # the listener, and one reader for the big one
    # Exactly once: a later mail arrives alone.
    await service.dovecot.aappend(user, make_message(subject="last"))
    emails = await service.creatio.wait_for_emails(c["Id"], 3, timeout=15)
    assert [e["Subject"] for e in emails] == ["big", "small after big", "last"]


async def test_a_mail_the_server_does_not_announce_is_found_by_a_look(
    dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery, make_mail_user: object
) -> None:
    """The server drops ``* n EXISTS`` (as Dovecot does while hibernating a session): a look on
    a side session finds the mail within seconds, and it is fetched on the listening session,
    not with the next mail or the keepalive."""
    proxy = FaultProxy(dovecot.host, dovecot.imap_port)
    await nursery.start(proxy.serve)
    async with running_service(dovecot, creatio, nursery, recheck_seconds=0.5) as service:
        user: MailUser = make_mail_user()  # type: ignore[operator]
        c = service.credentials(user, security="plain", Port=proxy.port)
        assert (await service.create(c)).status_code == 200
        await service.wait_state(c["Id"], MailboxState.LISTENING)
        await service.dovecot.aappend(user, make_message(subject="announced"))
        await service.creatio.wait_for_emails(c["Id"], 1, timeout=15)

        proxy.drop_server_lines = EXISTS_LINE
        await service.dovecot.aappend(user, make_message(subject="never announced"))
        appended = trio.current_time()
        emails = await service.creatio.wait_for_emails(c["Id"], 2, timeout=15)
        assert [e["Subject"] for e in emails] == ["announced", "never announced"]
        assert trio.current_time() - appended < 5
        assert proxy.dropped_lines >= 1
        assert await metric(service, "emlisten_imap_looks_total", outcome="found") >= 1
        assert await metric(service, "emlisten_prefetched_emails_total") == 2  # no reader
        assert (await service.http.get("/api/listeners/status")).json()["Readers"] == 0


async def test_a_look_during_a_held_delivery_does_not_deliver_again(
    dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery, make_mail_user: object
) -> None:
    """A look while Creatio still holds the delivery of the mail before it: the mail was
    handed on already, so the look finds nothing new and nothing goes out twice."""
    async with running_service(dovecot, creatio, nursery, recheck_seconds=0.2) as service:
        user: MailUser = make_mail_user()  # type: ignore[operator]
        c = service.credentials(user)
        assert (await service.create(c)).status_code == 200
        await service.wait_state(c["Id"], MailboxState.LISTENING)
        creatio.hold_next("ProcessFullEmail")
        await service.dovecot.aappend(user, make_message(subject="held"))
        await creatio.wait_held()
        # The look is due 0.2 s after the mail; it must not deliver the held mail again.
        with trio.fail_after(10):
            while not await metric(service, "emlisten_imap_looks_total", outcome="nothing"):
                await trio.sleep(0.05)
        assert not creatio.accepted_calls("ProcessFullEmail"), "the held mail went out twice"
        creatio.release()
        await service.creatio.wait_for_emails(c["Id"], 1, timeout=15)
        await service.dovecot.aappend(user, make_message(subject="next"))
        emails = await service.creatio.wait_for_emails(c["Id"], 2, timeout=15)
        assert [e["Subject"] for e in emails] == ["held", "next"]
