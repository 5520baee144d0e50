"""The listener's fetch goes out as DONE, UID FETCH and IDLE in one write, and what the FETCH's
answer says besides the mail is acted on.

Against Dovecot where it shows the behaviour, and against tests/servers/scripted_imap.py (a real
server on a socket) for what the RFCs allow and Dovecot does not do on demand: mail announced at
the end of a FETCH, and a server that refuses pipelined IDLE.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from emlisten.mail.imap import ImapClient, ImapSource
from emlisten.models import MailboxConfig, Security, ServerEndpoint
from tests.imap.test_prefetch import listen, prefetch
from tests.imap.test_source import Sink
from tests.servers.dovecot import Dovecot, MailUser, make_message
from tests.servers.scripted_imap import ScriptedImapServer


async def test_idle_pipelined_behind_the_fetch(dovecot: Dovecot, mail_user: MailUser) -> None:
    """After DONE + UID FETCH + IDLE in one write the session is idling again: the next mail is
    announced on it, and IDLE ends cleanly."""
    async with ImapClient(
        ServerEndpoint(dovecot.host, dovecot.imaps_port, Security.SSL_ON_CONNECT),
        ca_file=str(dovecot.ca_file),
        command_timeout=30,
    ) as client:
        await client.login(mail_user.name, mail_user.password)
        await client.select("INBOX", readonly=True)
        await client.idle_start()
        uid = await dovecot.aappend(mail_user, make_message(subject="first"))
        while (response := await client.idle_wait(30)) is None or response.type != "EXISTS":
            pass
        _, fetched = await client.idle_done_uid_fetch(f"{uid}:*", "(UID BODY.PEEK[])", idle_again=True)
        assert [m.uid for m in fetched] == [uid]
        assert fetched[0].body is not None and b"Subject: first" in fetched[0].body
        assert client.idling
        await dovecot.aappend(mail_user, make_message(subject="second"))
        while (response := await client.idle_wait(30)) is None or response.type != "EXISTS":
            pass
        assert response.number == 2
        await client.idle_done()
        assert not client.idling
        await client.noop()


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedImapServer]:
    server = ScriptedImapServer()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


def scripted_mailbox(server: ScriptedImapServer, mailbox_id: str = "mb-scripted") -> MailboxConfig:
    return MailboxConfig(
        id=mailbox_id,
        user_name="someone",
        password="secret",
        imap=ServerEndpoint(server.host, server.port, Security.NONE),
        bpm_endpoint="http://127.0.0.1:1/",
    )


def quiet_source() -> ImapSource:
    """No looks: what is delivered is what the listening session itself did."""
    return ImapSource(command_timeout=10, recheck_seconds=0, recheck_after_connect=False)


async def test_mail_announced_at_the_end_of_a_fetch_is_fetched_next(scripted: ScriptedImapServer) -> None:
    """A mail that lands while the FETCH runs is announced in its answer, not in IDLE after it:
    it is fetched at once, not left for the next mail (which might not come for days)."""
    sink = Sink()
    async with trio.open_nursery() as nursery:
        await listen(nursery, quiet_source(), scripted_mailbox(scripted), sink, prefetch())
        assert (await sink.next()).reason == "catch-up"
        scripted.land_during_next_fetch = [make_message(subject="landed during the fetch")]
        first = make_message(subject="first")
        await scripted.land(first)
        task = await sink.next(timeout=5)
        assert [m.data for m in task.prefetched] == [first]
        task = await sink.next(timeout=5)
        assert task.reason == "exists"
        assert [m.uid for m in task.prefetched] == [2]
        assert task.prefetched[0].data == scripted.messages[1]
        assert scripted.pipelined_idles >= 2  # both fetches had IDLE behind them
        nursery.cancel_scope.cancel()


async def test_a_server_that_refuses_pipelined_idle_gets_it_on_its_own(scripted: ScriptedImapServer) -> None:
    scripted.refuse_pipelined_idle = True
    sink = Sink()
    async with trio.open_nursery() as nursery:
        await listen(nursery, quiet_source(), scripted_mailbox(scripted), sink, prefetch())
        await sink.next()
        for number in range(1, 4):
            raw = make_message(subject=f"mail {number}")
            await scripted.land(raw)
            task = await sink.next(timeout=5)
            assert [(m.uid, m.data) for m in task.prefetched] == [(number, raw)]
        nursery.cancel_scope.cancel()
    # Asked once, refused, never again: every later IDLE went out on its own.
    assert scripted.pipelined_idles == 1
    assert scripted.commands.count("IDLE") == 4 + 1  # the first, the refused one, one per mail
    assert scripted.commands.count("LOGIN") == 1  # the session was kept


async def test_sessions_told_of_mail_at_once_each_fetch_in_one_write(scripted: ScriptedImapServer) -> None:
    """Sessions told of mail together (a backlog after a pause) wait for their turn to wake, and
    each takes the memory for its fetch when its turn comes: every one fetches in the one write
    (DONE, UID FETCH, IDLE). Taken before the turn, the memory ran out while most sessions still
    waited, and those went the long way, DONE, FETCH and IDLE a round trip each (seen at 10,000
    mailboxes: nine in ten)."""
    sessions = 6
    # Memory for one worst-case fetch (1 MiB, prefetch()'s limit) at a time; one wakes at a time.
    source = ImapSource(
        command_timeout=10,
        recheck_seconds=0,
        recheck_after_connect=False,
        prefetch_budget_bytes=2 * 1024 * 1024,
        max_concurrent_wakeups=1,
    )
    sinks = [Sink() for _ in range(sessions)]
    async with trio.open_nursery() as nursery:
        for number, sink in enumerate(sinks):
            await listen(nursery, source, scripted_mailbox(scripted, f"mb-{number}"), sink, prefetch())
            assert (await sink.next()).reason == "catch-up"
        raw = make_message(subject="to every session")
        async with source._wakeups:  # every session's turn waits until all have been told
            await scripted.land(raw)
            with trio.fail_after(5):
                while source._wakeups.statistics().tasks_waiting < sessions:
                    await trio.sleep(0.01)
        for sink in sinks:
            task = await sink.next(timeout=5)
            assert [m.data for m in task.prefetched] == [raw]
        nursery.cancel_scope.cancel()
    assert scripted.pipelined_idles == sessions
