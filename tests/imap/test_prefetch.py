"""Fetching on the listening session, and the recheck that makes up for dropped notifications.

Against the real Dovecot of the test fixture; a fault proxy in front of it plays a server that
fails to announce new mail (drops ``* n EXISTS``), as Dovecot does while it hands a session to
imap-hibernate.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Awaitable, Callable

import pytest
import trio

from emlisten.abc import Prefetch
from emlisten.mail.imap import ImapSource
from emlisten.mail.imap.source import _LookSlots
from emlisten.models import Checkpoint, FolderInfo, MailboxConfig, Security, SyncTask
from tests.imap.test_source import Sink
from tests.servers.dovecot import Dovecot, MailUser, mailbox_for, make_message
from tests.servers.faultproxy import FaultProxy

pytestmark = pytest.mark.dovecot

EXISTS_LINE = re.compile(rb"\* \d+ EXISTS\r\n")


def checkpoint_of(value: Checkpoint | None) -> Callable[[str], Awaitable[Checkpoint | None]]:
    async def read(folder: str) -> Checkpoint | None:
        return value

    return read


def prefetch(
    checkpoint: Checkpoint | None = None, *, max_bytes: int = 1024 * 1024, max_messages: int = 20
) -> Prefetch:
    return Prefetch(
        max_message_bytes=max_bytes, max_messages=max_messages, checkpoint=checkpoint_of(checkpoint)
    )


def imap_source(dovecot: Dovecot, **changes: float) -> tuple[ImapSource, list[str]]:
    """A source whose commands are recorded (name of each command, in order)."""
    source = ImapSource(ca_file=str(dovecot.ca_file), command_timeout=30, **changes)  # type: ignore[arg-type]
    commands: list[str] = []
    source.command_observer = lambda command, outcome, seconds: commands.append(command)
    return source, commands


async def listen(
    nursery: trio.Nursery, source: ImapSource, mailbox: MailboxConfig, sink: Sink, policy: Prefetch | None
) -> FolderInfo:
    async def run(task_status: trio.TaskStatus[FolderInfo]) -> None:
        await source.listen(mailbox, "INBOX", sink, prefetch=policy, task_status=task_status)

    info: FolderInfo = await nursery.start(run)
    return info


async def test_new_mail_is_fetched_on_the_listening_session(dovecot: Dovecot, mail_user: MailUser) -> None:
    source, commands = imap_source(dovecot)
    sink = Sink()
    mailbox = mailbox_for(dovecot, mail_user)
    async with trio.open_nursery() as nursery:
        info = await listen(nursery, source, mailbox, sink, prefetch())
        assert (await sink.next()).reason == "catch-up"  # a new subscription: nothing to fetch
        first, second = make_message(subject="first"), make_message(subject="second")
        for raw in (first, second):
            await dovecot.aappend(mail_user, raw)
            task = await sink.next()
            assert task.reason == "exists" and task.has_prefetch
            (message,) = task.prefetched
            assert message.data == raw  # the whole message, byte for byte
            assert (task.prefetch_from, task.prefetch_to, task.uid_hint) == (message.uid,) * 3
            assert message.key == f"{info.uidvalidity}/{message.uid}"
            assert message.position == Checkpoint(info.uidvalidity, message.uid)
        # The process's looks learn how fast mail is fetched (they hold back during a drain).
        assert source._looks.fetched.in_last_second(trio.current_time()) >= 1
        nursery.cancel_scope.cancel()
    # One login for everything: the fetches ran on the session that listens.
    assert sum(c in ("LOGIN", "AUTHENTICATE") for c in commands) == 1
    assert commands.count("UID FETCH") >= 2


async def test_catch_up_of_a_few_mails_is_fetched_on_the_session(
    dovecot: Dovecot, mail_user: MailUser
) -> None:
    # Three mails; the stored checkpoint says the first was delivered before the restart.
    raws = [make_message(subject=f"m{i}") for i in range(3)]
    uids = [await dovecot.aappend(mail_user, raw) for raw in raws]
    source, _ = imap_source(dovecot)
    sink = Sink()
    async with trio.open_nursery() as nursery:
        probe = await listen(nursery, source, mailbox_for(dovecot, mail_user), Sink(), None)
        nursery.cancel_scope.cancel()
    uidvalidity = probe.uidvalidity
    assert probe.uidnext == uids[-1] + 1

    async with trio.open_nursery() as nursery:
        await listen(
            nursery, source, mailbox_for(dovecot, mail_user), sink, prefetch(Checkpoint(uidvalidity, uids[0]))
        )
        (task,) = sink.pending()  # handed on before started()
        assert task.reason == "catch-up"
        assert [m.data for m in task.prefetched] == raws[1:]
        assert (task.prefetch_from, task.prefetch_to, task.uid_hint) == (uids[0] + 1, uids[2], uids[2])
        nursery.cancel_scope.cancel()


async def test_a_backlog_larger_than_one_fetch_is_left_to_a_reader(
    dovecot: Dovecot, mail_user: MailUser
) -> None:
    uids = [await dovecot.aappend(mail_user, make_message()) for _ in range(3)]
    source, _ = imap_source(dovecot)
    sink = Sink()
    async with trio.open_nursery() as nursery:
        info = await listen(
            nursery, source, mailbox_for(dovecot, mail_user), sink, prefetch(Checkpoint(0, 0), max_messages=2)
        )
        (task,) = sink.pending()
        nursery.cancel_scope.cancel()
    # The checkpoint's UIDVALIDITY (0) is not the folder's: only a reader can sort that out.
    assert not task.has_prefetch and task.uid_hint == uids[-1]

    async with trio.open_nursery() as nursery:
        checkpoint = Checkpoint(info.uidvalidity, 0)
        await listen(
            nursery, source, mailbox_for(dovecot, mail_user), sink, prefetch(checkpoint, max_messages=2)
        )
        (task,) = sink.pending()
        assert (task.reason, task.has_prefetch, task.uid_hint) == ("catch-up", False, uids[-1])
        nursery.cancel_scope.cancel()


async def test_large_mail_is_left_to_a_reader(dovecot: Dovecot, mail_user: MailUser) -> None:
    source, _ = imap_source(dovecot)
    sink = Sink()
    async with trio.open_nursery() as nursery:
        await listen(nursery, source, mailbox_for(dovecot, mail_user), sink, prefetch(max_bytes=2000))
        await sink.next()
        big = make_message(body="x" * 5000 + "\r\n")
        big_uid = await dovecot.aappend(mail_user, big)
        task = await sink.next()
        # Announced (uid_hint) but not carried: the worker reads it with a session of its own.
        assert (task.has_prefetch, task.uid_hint) == (False, big_uid)
        small = make_message()
        small_uid = await dovecot.aappend(mail_user, small)
        task = await sink.next()
        assert [m.data for m in task.prefetched] == [small]
        assert task.prefetch_from == big_uid + 1 == small_uid
        nursery.cancel_scope.cancel()


@pytest.fixture
async def proxy(dovecot: Dovecot, nursery: trio.Nursery) -> FaultProxy:
    proxy = FaultProxy(dovecot.host, dovecot.imap_port)
    await nursery.start(proxy.serve)
    return proxy


def proxied_mailbox(dovecot: Dovecot, user: MailUser, proxy: FaultProxy) -> MailboxConfig:
    mailbox = mailbox_for(dovecot, user, Security.NONE)
    return mailbox.replace(imap=mailbox.imap.__class__(proxy.host, proxy.port, Security.NONE))


class Looks:
    """Records the outcome of every look at a folder ("found", "nothing", "failed")."""

    def __init__(self, source: ImapSource) -> None:
        self.send, self.receive = trio.open_memory_channel[str](100)
        source.look_observer = self.send.send_nowait

    async def next(self, timeout: float = 10) -> str:
        with trio.fail_after(timeout):
            return await self.receive.receive()

    async def none_within(self, seconds: float) -> None:
        with trio.move_on_after(seconds):
            outcome = await self.receive.receive()
            pytest.fail(f"a look without new mail: {outcome}")


@pytest.mark.parametrize("with_prefetch", [True, False])
async def test_a_look_finds_mail_the_server_did_not_announce(
    dovecot: Dovecot, mail_user: MailUser, proxy: FaultProxy, with_prefetch: bool
) -> None:
    """The safety net: a few seconds after new mail, a look at the folder on a short session of
    its own (STATUS) finds mail whose notification the server dropped; it is then fetched on
    the listening session (prefetch) or handed on as new mail."""
    source, commands = imap_source(dovecot, recheck_seconds=0.3)
    looks = Looks(source)
    sink = Sink()
    mailbox = proxied_mailbox(dovecot, mail_user, proxy)
    async with trio.open_nursery() as nursery:
        await listen(nursery, source, mailbox, sink, prefetch() if with_prefetch else None)
        await sink.next()  # catch-up
        await dovecot.aappend(mail_user, make_message(subject="announced"))
        assert (await sink.next()).reason == "exists"
        # From now on the server "forgets" to announce new mail; only a look can find it.
        proxy.drop_server_lines = EXISTS_LINE
        unannounced = make_message(subject="not announced")
        uid = await dovecot.aappend(mail_user, unannounced)
        started = trio.current_time()
        task = await sink.next(timeout=10)
        assert trio.current_time() - started < 5
        assert await looks.next() == "found"
        assert "STATUS" in commands
        assert task.reason == "exists"
        if with_prefetch:
            assert [(m.uid, m.data) for m in task.prefetched] == [(uid, unannounced)]
        nursery.cancel_scope.cancel()


async def test_without_recheck_an_unannounced_mail_waits(
    dovecot: Dovecot, mail_user: MailUser, proxy: FaultProxy
) -> None:
    """The failure the look repairs: with it off, a mail the server does not announce is
    not seen (until the keepalive probe, minutes later, or the next announced mail)."""
    source, _ = imap_source(dovecot, recheck_seconds=0)
    sink = Sink()
    async with trio.open_nursery() as nursery:
        await listen(nursery, source, proxied_mailbox(dovecot, mail_user, proxy), sink, prefetch())
        await sink.next()
        await dovecot.aappend(mail_user, make_message())
        await sink.next()
        proxy.drop_server_lines = EXISTS_LINE
        await dovecot.aappend(mail_user, make_message())
        with trio.move_on_after(2):
            await sink.next()
            pytest.fail("an unannounced mail was reported without a look")
        # The next announced mail brings both.
        proxy.drop_server_lines = None
        await dovecot.aappend(mail_user, make_message())
        task = await sink.next()
        assert len(task.prefetched) == 2
        nursery.cancel_scope.cancel()


async def test_one_look_per_activity_and_none_for_a_quiet_mailbox(
    dovecot: Dovecot, mail_user: MailUser
) -> None:
    """Bounded work per mail: one look after the last new mail, nothing while quiet (but the
    one look after the session's first IDLE, here after 12 s), and the listening session stays
    in IDLE for it."""
    source, commands = imap_source(dovecot, recheck_seconds=0.2)
    looks = Looks(source)
    sink = Sink()
    async with trio.open_nursery() as nursery:
        await listen(nursery, source, mailbox_for(dovecot, mail_user), sink, prefetch())
        await sink.next()
        await looks.none_within(0.6)
        for _ in range(2):
            await dovecot.aappend(mail_user, make_message())
            assert (await sink.next()).reason == "exists"
            fetches = commands.count("UID FETCH")
            assert await looks.next() == "nothing"
            await looks.none_within(0.6)
            assert commands.count("UID FETCH") == fetches  # the look did not wake the session
        assert sink.pending() == []
        nursery.cancel_scope.cancel()


async def test_a_late_look_finds_mail_that_landed_after_the_first_one(
    dovecot: Dovecot, mail_user: MailUser, proxy: FaultProxy
) -> None:
    """Under load a server hands a session to hibernation late, after the first look: mail
    landing then goes unannounced, and only the second, later look finds it. Then nothing
    more until new mail."""
    source, _ = imap_source(dovecot, recheck_seconds=0.2, recheck_late_seconds=0.8)
    looks = Looks(source)
    sink = Sink()
    async with trio.open_nursery() as nursery:
        await listen(nursery, source, proxied_mailbox(dovecot, mail_user, proxy), sink, prefetch())
        await sink.next()  # catch-up
        await dovecot.aappend(mail_user, make_message(subject="announced"))
        assert (await sink.next()).reason == "exists"
        proxy.drop_server_lines = EXISTS_LINE
        assert await looks.next() == "nothing"
        uid = await dovecot.aappend(mail_user, make_message(subject="after the first look"))
        late = await sink.next(timeout=5)
        assert await looks.next() == "found"
        assert [m.uid for m in late.prefetched] == [uid]
        # The mail it found counts as new mail: one more pair of looks, then quiet.
        assert await looks.next() == "nothing"
        assert await looks.next() == "nothing"
        await looks.none_within(1.2)
        nursery.cancel_scope.cancel()


async def test_the_first_and_the_late_look_share_one_side_session(
    dovecot: Dovecot, mail_user: MailUser
) -> None:
    """A mail schedules two looks, seconds apart: the side session of the first is kept for the
    second (one login per mail, not two: each is a TLS handshake and a login for both sides),
    and closed after it."""
    source, commands = imap_source(dovecot, recheck_seconds=0.2, recheck_late_seconds=0.8)
    looks = Looks(source)
    sink = Sink()
    async with trio.open_nursery() as nursery:
        await listen(nursery, source, mailbox_for(dovecot, mail_user), sink, prefetch())
        await sink.next()  # catch-up
        assert await looks.next() == "nothing"  # the look after the first IDLE: a session of its own
        sent = len(commands)
        await dovecot.aappend(mail_user, make_message())
        assert (await sink.next()).reason == "exists"
        assert await looks.next() == "nothing"
        assert await looks.next() == "nothing"
        await looks.none_within(1.2)
        after = commands[sent:]
        assert after.count("STATUS") == 2
        assert after.count("AUTHENTICATE") + after.count("LOGIN") == 1
        assert after.count("LOGOUT") == 1 and after[-1] == "LOGOUT"  # closed after the late look
        nursery.cancel_scope.cancel()


async def test_the_first_idle_of_a_session_is_looked_at_once(
    dovecot: Dovecot, mail_user: MailUser, proxy: FaultProxy
) -> None:
    """Mail landing in the hand-off window of a session's first IDLE (1.5-2 s after a connect
    or reconnect) has no new mail before it to schedule a look: in the soak such mail, right
    after a cold start, waited for the next one (90-139 s). The session schedules one look
    itself, after the late hand-off."""
    source, _ = imap_source(dovecot, recheck_seconds=0.2, recheck_late_seconds=0.6)
    looks = Looks(source)
    sink = Sink()
    proxy.drop_server_lines = EXISTS_LINE  # the server announces nothing
    async with trio.open_nursery() as nursery:
        await listen(nursery, source, proxied_mailbox(dovecot, mail_user, proxy), sink, prefetch())
        assert (await sink.next()).reason == "catch-up"
        uid = await dovecot.aappend(mail_user, make_message(subject="in the first window"))
        task = await sink.next(timeout=5)
        assert await looks.next() == "found"
        assert (task.reason, [m.uid for m in task.prefetched]) == ("exists", [uid])
        nursery.cancel_scope.cancel()


async def test_no_look_after_the_first_idle_when_turned_off(
    dovecot: Dovecot, mail_user: MailUser, proxy: FaultProxy
) -> None:
    source, _ = imap_source(dovecot, recheck_seconds=0.2, recheck_late_seconds=0.6)
    source.settings = dataclasses.replace(source.settings, recheck_after_connect=False)
    looks = Looks(source)
    sink = Sink()
    async with trio.open_nursery() as nursery:
        await listen(nursery, source, proxied_mailbox(dovecot, mail_user, proxy), sink, prefetch())
        assert (await sink.next()).reason == "catch-up"
        await looks.none_within(1.5)
        nursery.cancel_scope.cancel()


async def test_a_look_that_cannot_log_in_leaves_the_listener_alone(
    dovecot: Dovecot, mail_user: MailUser, proxy: FaultProxy
) -> None:
    """A failed look (here: the server refuses the side session) is a missed safety net, not a
    failed listener: the listening session goes on and announced mail still arrives."""
    source, _ = imap_source(dovecot, recheck_seconds=0.2, recheck_late_seconds=0)
    looks = Looks(source)
    sink = Sink()
    async with trio.open_nursery() as nursery:
        await listen(nursery, source, proxied_mailbox(dovecot, mail_user, proxy), sink, prefetch())
        await sink.next()
        proxy.refuse_new()  # sessions already open go on; new ones are refused
        await dovecot.aappend(mail_user, make_message())
        assert (await sink.next()).reason == "exists"
        assert await looks.next() == "failed"
        await dovecot.aappend(mail_user, make_message())
        assert (await sink.next()).reason == "exists"
        nursery.cancel_scope.cancel()


async def test_catch_up_past_expunged_mail_needs_no_bodies(dovecot: Dovecot, mail_user: MailUser) -> None:
    uids = [await dovecot.aappend(mail_user, make_message()) for _ in range(3)]
    # The two newest are gone before we reconnect; the checkpoint is at the first.
    await trio.to_thread.run_sync(
        dovecot.doveadm, "expunge", "-u", mail_user.name, "mailbox", "INBOX", "uid", f"{uids[1]}:{uids[2]}"
    )
    source, commands = imap_source(dovecot)
    sink = Sink()
    async with trio.open_nursery() as nursery:
        probe = await listen(nursery, source, mailbox_for(dovecot, mail_user), Sink(), None)
        nursery.cancel_scope.cancel()
    commands.clear()
    async with trio.open_nursery() as nursery:
        checkpoint = Checkpoint(probe.uidvalidity, uids[0])
        await listen(nursery, source, mailbox_for(dovecot, mail_user), sink, prefetch(checkpoint))
        (task,) = sink.pending()
        # The task moves the checkpoint past the expunged UIDs, with nothing to deliver.
        assert (task.prefetch_from, task.prefetch_to, task.prefetched) == (uids[1], uids[2], ())
        assert commands.count("UID FETCH") == 1  # the listing only, no bodies
        nursery.cancel_scope.cancel()


async def test_without_memory_to_spare_the_mail_is_left_to_a_reader(
    dovecot: Dovecot, mail_user: MailUser
) -> None:
    """The prefetch memory budget is taken without waiting: when it is spent (other sessions
    fetching, maybe from a slow server), the listener announces the mail instead of waiting."""
    source = ImapSource(ca_file=str(dovecot.ca_file), command_timeout=30, prefetch_budget_bytes=100)
    sink = Sink()
    async with trio.open_nursery() as nursery:
        await listen(nursery, source, mailbox_for(dovecot, mail_user), sink, prefetch(max_bytes=2000))
        await sink.next()
        uid = await dovecot.aappend(mail_user, make_message())
        task = await sink.next()
        assert (task.reason, task.has_prefetch, task.uid_hint) == ("exists", False, uid)
        nursery.cancel_scope.cancel()


async def test_when_the_worst_case_does_not_fit_the_real_sizes_are_asked(
    dovecot: Dovecot, mail_user: MailUser
) -> None:
    """The budget is taken for the worst case (every new mail at the size limit); when that does
    not fit but the real sizes do, the listener asks them on its own session and still carries
    the mail: one round trip there instead of a reader's connect and login."""
    message = make_message(subject="small")
    source, commands = imap_source(dovecot, prefetch_budget_bytes=len(message) + 2048)
    sink = Sink()
    async with trio.open_nursery() as nursery:
        await listen(nursery, source, mailbox_for(dovecot, mail_user), sink, prefetch(max_bytes=200_000))
        await sink.next()
        sent = len(commands)
        uid = await dovecot.aappend(mail_user, message)
        task = await sink.next()
        assert (task.reason, task.has_prefetch, task.uid_hint) == ("exists", True, uid)
        assert [m.data for m in task.prefetched] == [message]
        assert commands[sent : sent + 2] == ["UID FETCH", "UID FETCH"]  # the sizes, then the mail
        assert "LOGIN" not in commands[sent:] and "AUTHENTICATE" not in commands[sent:]
        nursery.cancel_scope.cancel()


class CountingLimiter:
    """A CapacityLimiter that counts how often it was taken (the listener only uses
    ``async with``)."""

    def __init__(self, tokens: int) -> None:
        self.limiter = trio.CapacityLimiter(tokens)
        self.taken = 0

    async def __aenter__(self) -> None:
        await self.limiter.acquire()
        self.taken += 1

    async def __aexit__(self, *exc: object) -> None:
        self.limiter.release()


async def test_sessions_end_idle_a_bounded_number_at_once(dovecot: Dovecot) -> None:
    # After an outage every session has mail at once; each DONE makes a hibernating server
    # start a process. With one wake-up at a time, all four mailboxes still get their mail.
    users = [dovecot.add_user() for _ in range(4)]
    source, _ = imap_source(dovecot)
    limiter = CountingLimiter(1)
    source._wakeups = limiter  # type: ignore[assignment]
    sinks = [Sink() for _ in users]
    async with trio.open_nursery() as nursery:
        for user, sink in zip(users, sinks, strict=True):
            await listen(nursery, source, mailbox_for(dovecot, user), sink, prefetch())
            assert (await sink.next()).reason == "catch-up"
        raws = [make_message(subject=f"to {user.name}") for user in users]
        for user, raw in zip(users, raws, strict=True):
            await dovecot.aappend(user, raw)
        for sink, raw in zip(sinks, raws, strict=True):
            task = await sink.next()
            assert task.reason == "exists"
            assert [m.data for m in task.prefetched] == [raw]
        nursery.cancel_scope.cancel()
    assert limiter.taken >= len(users)  # every fetch went through it


class SlowHandOff:
    """A listener whose hand-off of new mail ("exists") blocks until ``go_on`` is set, beside a
    listener on another mailbox of the same source that hands on at once."""

    def __init__(self) -> None:
        self.handing_on, self.go_on = trio.Event(), trio.Event()
        self.blocked_sink, self.other_sink = Sink(), Sink()

    async def start(
        self,
        nursery: trio.Nursery,
        dovecot: Dovecot,
        source: ImapSource,
        users: tuple[MailUser, MailUser],
        policy: Prefetch,
    ) -> None:
        blocked_user, other_user = users

        async def blocking(task: SyncTask) -> None:
            if task.reason == "exists":
                self.handing_on.set()
                await self.go_on.wait()
            await self.blocked_sink(task)

        async def run(task_status: trio.TaskStatus[FolderInfo]) -> None:
            mailbox = mailbox_for(dovecot, blocked_user)
            await source.listen(mailbox, "INBOX", blocking, prefetch=policy, task_status=task_status)

        await nursery.start(run)
        await listen(nursery, source, mailbox_for(dovecot, other_user), self.other_sink, policy)
        assert (await self.blocked_sink.next()).reason == "catch-up"
        assert (await self.other_sink.next()).reason == "catch-up"
        await dovecot.aappend(blocked_user, make_message(subject="handed on slowly"))
        with trio.fail_after(30):
            await self.handing_on.wait()

    async def release(self) -> None:
        self.go_on.set()
        assert (await self.blocked_sink.next()).reason == "exists"


async def test_a_session_handing_on_its_mail_holds_no_wake_up(dovecot: Dovecot) -> None:
    # The wake-up bound is for the server's work (ending IDLE, the fetch), not for handing the
    # mail on: a queue that blocks there (RabbitMQ retrying an unreachable broker) must not
    # keep every other session in IDLE. One wake-up at a time; the first mailbox's hand-off
    # blocks, the second still gets its mail.
    users = dovecot.add_user(), dovecot.add_user()
    source, _ = imap_source(dovecot)
    source._wakeups = trio.CapacityLimiter(1)
    slow = SlowHandOff()
    async with trio.open_nursery() as nursery:
        await slow.start(nursery, dovecot, source, users, prefetch())
        raw = make_message(subject="not held up")
        await dovecot.aappend(users[1], raw)
        task = await slow.other_sink.next(timeout=10)
        assert task.reason == "exists" and [m.data for m in task.prefetched] == [raw]
        await slow.release()
        nursery.cancel_scope.cancel()


async def test_a_mail_being_handed_on_holds_only_its_real_size(dovecot: Dovecot) -> None:
    # The worst case (every new mail at the size limit) is taken for the fetch; once the answer
    # is in, only what the mail really takes is held while it is handed on. Held whole across a
    # slow hand-off (RabbitMQ confirms in a backlog), it left other sessions without memory, and
    # each took the long way: the sizes first, then the mail.
    max_bytes = 200_000
    users = dovecot.add_user(), dovecot.add_user()
    source, commands = imap_source(dovecot, prefetch_budget_bytes=max_bytes + 1 + 10_000)
    slow = SlowHandOff()
    async with trio.open_nursery() as nursery:
        await slow.start(nursery, dovecot, source, users, prefetch(max_bytes=max_bytes))
        sent = len(commands)
        raw = make_message(subject="fetched at once")
        await dovecot.aappend(users[1], raw)
        task = await slow.other_sink.next(timeout=10)
        assert task.reason == "exists" and [m.data for m in task.prefetched] == [raw]
        assert commands[sent:].count("UID FETCH") == 1  # DONE + UID FETCH, no sizes first
        await slow.release()
        nursery.cancel_scope.cancel()
    assert source._prefetch_budget.available == source._prefetch_budget.total  # all given back


def test_looks_after_first_idles_are_spread() -> None:
    """A cold start of thousands of sessions asks a look after each first IDLE within a minute:
    they are scheduled one slot apart, never all at the same moment."""
    slots = _LookSlots(25.0)
    times = [slots.reserve(12.0) for _ in range(100)]
    assert times[0] == 12.0
    assert all(abs((b - a) - 0.04) < 1e-9 for a, b in itertools.pairwise(times))
    # A session connecting long after the storm is looked at on time.
    assert slots.reserve(100.0) == 100.0


def test_looks_after_first_idles_that_would_come_too_late_are_left_out() -> None:
    """10,000 first IDLEs at 25 looks a second would keep the server logging in for 400 s: a
    look that cannot start within its lateness bound is not scheduled (the keepalive covers
    that session), and the ones after it still get theirs while they can."""
    slots = _LookSlots(25.0, max_lateness=60.0)
    times = [slots.reserve(12.0) for _ in range(2000)]
    scheduled = [t for t in times if t is not None]
    assert 1500 <= len(scheduled) <= 1501  # 0, 0.04, ..., 60.0 s late (the last by rounding)
    assert times[: len(scheduled)] == scheduled and all(t is None for t in times[len(scheduled) :])
    assert max(scheduled) - 12.0 <= 60.0 + 1e-9
    # Left-out looks take no slot: a session connecting a little later gets the next free one.
    assert slots.reserve(20.0) == scheduled[-1] + 0.04
