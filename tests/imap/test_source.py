"""ImapSource (listen + reader) against the real Dovecot started by the test fixture."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import trio

from emlisten.errors import FolderNotFoundError, MailAuthError, MailConnectError
from emlisten.mail.imap import ImapClient, ImapSource
from emlisten.models import FolderInfo, Security, SyncTask
from tests.servers.dovecot import Dovecot, MailUser, mailbox_for, make_message

pytestmark = pytest.mark.dovecot


def source_for(
    dovecot: Dovecot,
    *,
    idle_renew_seconds: float = 25 * 60,
    keepalive_seconds: float = 300,
    poll_seconds: float = 30,
) -> ImapSource:
    return ImapSource(
        ca_file=str(dovecot.ca_file),
        idle_renew_seconds=idle_renew_seconds,
        keepalive_seconds=keepalive_seconds,
        poll_seconds=poll_seconds,
        command_timeout=30,
    )


class Sink:
    """on_new_mail callback backed by a memory channel: tests await tasks, never sleep."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[SyncTask](100)

    async def __call__(self, task: SyncTask) -> None:
        await self.send.send(task)

    async def next(self, timeout: float = 30) -> SyncTask:
        with trio.fail_after(timeout):
            return await self.receive.receive()

    def pending(self) -> list[SyncTask]:
        tasks = []
        while True:
            try:
                tasks.append(self.receive.receive_nowait())
            except trio.WouldBlock:
                return tasks


@pytest.mark.parametrize("security", [Security.SSL_ON_CONNECT, Security.STARTTLS, Security.NONE])
async def test_listen_catch_up_then_new_mail(
    dovecot: Dovecot, mail_user: MailUser, security: Security
) -> None:
    await dovecot.aappend(mail_user, make_message())  # there before we connect
    mailbox = mailbox_for(dovecot, mail_user, security)
    sink = Sink()
    async with trio.open_nursery() as nursery:
        info: FolderInfo = await nursery.start(source_for(dovecot).listen, mailbox, "INBOX", sink)
        assert (info.name, info.exists, info.uidnext) == ("INBOX", 1, 2)
        # The catch-up task was queued before started() returned.
        assert sink.pending() == [
            SyncTask(mailbox.id, "INBOX", info.uidvalidity, uid_hint=1, reason="catch-up")
        ]
        # started() means the server confirmed IDLE: new mail is reported without polling.
        await dovecot.aappend(mail_user, make_message())
        task = await sink.next()
        assert task.seen_at > 0  # when the listener saw it (the latency metric starts there)
        assert dataclasses.replace(task, seen_at=0.0) == SyncTask(
            mailbox.id, "INBOX", info.uidvalidity, uid_hint=0, reason="exists"
        )
        await dovecot.aappend(mail_user, make_message())
        assert (await sink.next()).reason == "exists"
        nursery.cancel_scope.cancel()


async def test_listen_other_folder(dovecot: Dovecot, mail_user: MailUser) -> None:
    await dovecot.acreate_folder(mail_user, "Work")
    sink = Sink()
    async with trio.open_nursery() as nursery:
        info = await nursery.start(source_for(dovecot).listen, mailbox_for(dovecot, mail_user), "Work", sink)
        assert (info.name, info.exists) == ("Work", 0)
        assert (await sink.next()).reason == "catch-up"
        await dovecot.aappend(mail_user, make_message())  # INBOX: not our folder
        await dovecot.aappend(mail_user, make_message(), folder="Work")
        task = await sink.next()
        assert (task.folder, task.reason) == ("Work", "exists")
        nursery.cancel_scope.cancel()
    assert sink.pending() == []


async def test_kick_raises_connect_error(dovecot: Dovecot, mail_user: MailUser) -> None:
    sink = Sink()
    with pytest.raises(ExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            await nursery.start(source_for(dovecot).listen, mailbox_for(dovecot, mail_user), "INBOX", sink)
            await dovecot.akick(mail_user)
    assert caught.group_contains(MailConnectError, match="closed the session")


async def test_cancel_ends_listen_quietly(dovecot: Dovecot, mail_user: MailUser) -> None:
    sink = Sink()
    source = source_for(dovecot)
    commands: list[str] = []
    source.command_observer = lambda command, outcome, seconds: commands.append(command)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(source.listen, mailbox_for(dovecot, mail_user), "INBOX", sink)
            scope.cancel()
    assert scope.cancelled_caught
    # Closed in IDLE (started() says it is) without LOGOUT, which a hibernating server would
    # wake the session for.
    assert "EXAMINE" in commands and "LOGOUT" not in commands
    # The connection is gone: Dovecot no longer lists a session for this user.
    with trio.fail_after(10):
        while mail_user.name in await trio.to_thread.run_sync(dovecot.doveadm, "who"):
            await trio.sleep(0.05)


async def test_wrong_password_fails_before_started(dovecot: Dovecot, mail_user: MailUser) -> None:
    sink = Sink()
    mailbox = mailbox_for(dovecot, mail_user, password="wrong")
    async with trio.open_nursery() as nursery:
        with pytest.raises(MailAuthError):
            await nursery.start(source_for(dovecot).listen, mailbox, "INBOX", sink)
    assert sink.pending() == []


async def test_oauth_is_not_supported_yet(dovecot: Dovecot, mail_user: MailUser) -> None:
    async with trio.open_nursery() as nursery:
        with pytest.raises(MailAuthError, match="OAuth"):
            await nursery.start(
                source_for(dovecot).listen,
                mailbox_for(dovecot, mail_user, use_oauth=True),
                "INBOX",
                Sink(),
            )


async def test_missing_folder(dovecot: Dovecot, mail_user: MailUser) -> None:
    async with trio.open_nursery() as nursery:
        with pytest.raises(FolderNotFoundError):
            await nursery.start(source_for(dovecot).listen, mailbox_for(dovecot, mail_user), "Nope", Sink())


async def test_idle_renew_and_keepalive_probe_keep_listening(dovecot: Dovecot, mail_user: MailUser) -> None:
    # Re-issue IDLE and probe with DONE + NOOP many times; mail is still reported afterwards.
    source = source_for(dovecot, idle_renew_seconds=0.05, keepalive_seconds=0.02)
    sink = Sink()
    async with trio.open_nursery() as nursery:
        await nursery.start(source.listen, mailbox_for(dovecot, mail_user), "INBOX", sink)
        assert (await sink.next()).reason == "catch-up"
        for _ in range(3):
            await dovecot.aappend(mail_user, make_message())
            assert (await sink.next()).reason == "exists"
        nursery.cancel_scope.cancel()


@pytest.fixture(scope="module")
def dovecot_without_idle() -> Iterator[Dovecot]:
    server = Dovecot(extra_config="imap_capability = IMAP4rev1 LITERAL+ SASL-IR ID\n")
    server.start()
    try:
        yield server
    finally:
        server.close()


async def test_polls_with_noop_when_server_lacks_idle(dovecot_without_idle: Dovecot) -> None:
    dovecot = dovecot_without_idle
    user = dovecot.add_user()
    async with ImapClient(mailbox_for(dovecot, user).imap, ca_file=str(dovecot.ca_file)) as client:
        await client.login(user.name, user.password)
        assert not client.has_capability("IDLE")
    sink = Sink()
    source = source_for(dovecot, poll_seconds=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(source.listen, mailbox_for(dovecot, user), "INBOX", sink)
        assert (await sink.next()).reason == "catch-up"
        await dovecot.aappend(user, make_message())
        assert (await sink.next()).reason == "exists"
        nursery.cancel_scope.cancel()


async def test_reader_fetches_exact_bytes_in_uid_order(dovecot: Dovecot, mail_user: MailUser) -> None:
    small = make_message(subject="Grüße", body="Ünïcödé ✓\r\n")
    # (No bare CR/LF: the appending client, imaplib, normalizes line ends.)
    binary_ish = make_message(body="tab\there, {7}\r\n") + b"\xff\xfe 8-bit\r\n"
    large = make_message(body=("The quick brown fox " * 50 + "\r\n") * 1000)
    uids = [await dovecot.aappend(mail_user, m) for m in (small, binary_ish, large)]
    async with source_for(dovecot).open_reader(mailbox_for(dovecot, mail_user)) as reader:
        info = await reader.select("INBOX")
        assert (info.exists, info.uidnext) == (3, uids[-1] + 1)
        assert await reader.uids_after(0) == uids
        assert await reader.uids_after(uids[0]) == uids[1:]
        # "UID n:*" with n above the highest UID matches the highest one: filtered out.
        assert await reader.uids_after(uids[-1]) == []
        assert await reader.uids_after(uids[-1] + 10) == []
        messages = await reader.fetch([uids[2], uids[0], uids[1]])
        assert [m.uid for m in messages] == [uids[2], uids[0], uids[1]]
        assert [m.data for m in messages] == [large, small, binary_ish]
        assert messages[0].size == len(large)
        assert all(m.internal_date is not None for m in messages)
        # Vanished UIDs are skipped.
        assert [m.uid for m in await reader.fetch([uids[0], 999])] == [uids[0]]
        assert await reader.fetch([]) == []
    # BODY.PEEK: nothing was marked \Seen.
    with dovecot.imap(mail_user) as conn:
        conn.select("INBOX", readonly=True)
        _typ, data = conn.search(None, "UNSEEN")
        assert data[0].split() == [b"1", b"2", b"3"]


async def test_reader_missing_folder(dovecot: Dovecot, mail_user: MailUser) -> None:
    async with source_for(dovecot).open_reader(mailbox_for(dovecot, mail_user)) as reader:
        with pytest.raises(FolderNotFoundError):
            await reader.select("Nope")
        assert (await reader.select("INBOX")).exists == 0


async def test_reader_wrong_password(dovecot: Dovecot, mail_user: MailUser) -> None:
    with pytest.raises(MailAuthError):
        async with source_for(dovecot).open_reader(mailbox_for(dovecot, mail_user, password="wrong")):
            pass
