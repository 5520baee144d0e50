"""A server's IDLE keepalives: heard (liveness), but not handed to a listener that did not ask.

Dovecot sends ``* OK Still here`` to every session of one client address in the same second
(``imap_idle_notify_interval``); at 10,000 sessions, waking every listener for it held the event
loop for 1-2 s every two minutes. Here the server sends it every second.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio

from emlisten.mail.imap import ImapClient, ImapSource
from emlisten.mail.imap._client import _is_bare_ok_line
from emlisten.mail.imap._idle_reader import shared_reader
from emlisten.mail.imap.source import ImapSettings, _Listener
from emlisten.models import FolderInfo, MailboxConfig, Security, ServerEndpoint, SyncTask
from tests.servers.dovecot import Dovecot, make_message

LISTENED_FOR = frozenset({"EXISTS"})


@pytest.fixture(scope="module")
def chatty_dovecot() -> Iterator[Dovecot]:
    server = Dovecot(extra_config="imap_idle_notify_interval = 1 secs\n")
    server.start()
    try:
        yield server
    finally:
        server.close()


async def test_idle_wait_passes_over_keepalives_but_hears_them(chatty_dovecot: Dovecot) -> None:
    dovecot = chatty_dovecot
    user = dovecot.add_user()
    endpoint = ServerEndpoint(dovecot.host, dovecot.imaps_port, Security.SSL_ON_CONNECT)
    async with ImapClient(endpoint, ca_file=str(dovecot.ca_file)) as client:
        await client.login(user.name, user.password)
        await client.select("INBOX")
        await client.idle_start()
        idle_began = client.last_heard
        # Unfiltered, the keepalive is what the server sends while nothing happens.
        keepalive = await client.idle_wait(5)
        assert keepalive is not None and keepalive.type == "OK", keepalive
        first_heard = client.last_heard
        assert first_heard > idle_began
        # Filtered, the wait runs to its end over two or three keepalives, and they count as heard.
        reader = shared_reader()
        assert reader is not None
        passed_over = reader.passed_over
        assert await client.idle_wait(2.5, only=LISTENED_FOR) is None
        assert client.last_heard > first_heard
        # ... by the shared reader, over TLS, without waking this task for them.
        assert reader.passed_over >= passed_over + 2
        # What is asked for still comes.
        await dovecot.aappend(user, make_message())
        exists = await client.idle_wait(30, only=LISTENED_FOR)
        assert exists is not None and (exists.type, exists.number) == ("EXISTS", 1)
        await client.idle_done()


async def test_a_listener_counts_keepalives_as_signs_of_life(chatty_dovecot: Dovecot) -> None:
    """With keepalives arriving every second, a liveness window of 1.5-2 s never runs out: the
    listener stays in its first IDLE instead of ending it to probe the server."""
    dovecot = chatty_dovecot
    user = dovecot.add_user()
    source = ImapSource(
        ca_file=str(dovecot.ca_file), keepalive_seconds=2.0, recheck_after_connect=False, recheck_seconds=0
    )
    commands: list[str] = []
    source.command_observer = lambda command, outcome, seconds: commands.append(command)
    mailbox = MailboxConfig(
        id="chatty",
        user_name=user.name,
        password=user.password,
        imap=ServerEndpoint(dovecot.host, dovecot.imaps_port, Security.SSL_ON_CONNECT),
        bpm_endpoint="",
    )

    async def on_new_mail(task: SyncTask) -> None:
        pass

    async with trio.open_nursery() as nursery:
        await nursery.start(source.listen, mailbox, "INBOX", on_new_mail)
        await trio.sleep(6)  # three liveness windows, on the server's real clock
        nursery.cancel_scope.cancel()
    # A probe is DONE + NOOP (IDLE and DONE are not observed commands; NOOP is).
    assert "EXAMINE" in commands and "NOOP" not in commands, commands


@pytest.mark.parametrize(
    ("data", "bare"),
    [
        (b"* OK Still here\r\n", True),
        (b"* OK [ALERT] the server goes down at noon\r\n", False),  # a code: for the parser
        (b"* OK Still here\r\n* 3 EXISTS\r\n", False),  # more than the keepalive
        (b"* OK Still he", False),  # a part of a line
        (b"* 3 EXISTS\r\n", False),
        (b"* NO Still here\r\n", False),
    ],
)
def test_only_a_whole_bare_ok_line_is_passed_over_unparsed(data: bytes, bare: bool) -> None:
    assert _is_bare_ok_line(data) is bare


def test_listeners_end_their_silence_windows_apart() -> None:
    """A keepalive wave moves every session's ``last_heard`` in the same second: the windows
    after it must not end together (they did: 10,012 listeners woke in one 1.1 s pass, 240 s
    after a wave), nor later than ``keepalive_seconds``."""
    settings = ImapSettings(keepalive_seconds=240.0)
    info = FolderInfo("INBOX", uidvalidity=1, uidnext=1, exists=0)

    async def on_new_mail(task: SyncTask) -> None:
        pass

    allowances = [
        _Listener(None, f"m{i}", info, on_new_mail, settings=settings).quiet_allowance  # type: ignore[arg-type]
        for i in range(1000)
    ]
    assert min(allowances) >= 180.0 and max(allowances) <= 240.0
    assert max(allowances) - min(allowances) > 50.0  # spread over the quarter


async def _idling(dovecot: Dovecot, client: ImapClient) -> None:
    user = dovecot.add_user()
    await client.login(user.name, user.password)
    await client.select("INBOX")
    await client.idle_start()


async def test_a_silence_window_moves_with_every_keepalive(chatty_dovecot: Dovecot) -> None:
    """The listener's liveness window: the server's keepalives (every second here) keep moving
    it, from the shared reader, so the wait runs to its own timeout instead of waking the
    listener every window."""
    endpoint = ServerEndpoint(chatty_dovecot.host, chatty_dovecot.imaps_port, Security.SSL_ON_CONNECT)
    async with ImapClient(endpoint, ca_file=str(chatty_dovecot.ca_file)) as client:
        await _idling(chatty_dovecot, client)
        began = trio.current_time()
        assert await client.idle_wait(4.5, only=LISTENED_FOR, silence=1.8) is None
        assert trio.current_time() - began >= 4.4
        await client.idle_done()


async def test_a_silent_server_ends_the_wait_after_the_silence_window(dovecot: Dovecot) -> None:
    endpoint = ServerEndpoint(dovecot.host, dovecot.imaps_port, Security.SSL_ON_CONNECT)
    async with ImapClient(endpoint, ca_file=str(dovecot.ca_file)) as client:
        await _idling(dovecot, client)  # Dovecot's own keepalive: every 2 minutes
        began = trio.current_time()
        assert await client.idle_wait(60, only=LISTENED_FOR, silence=0.5) is None
        assert 0.4 <= trio.current_time() - began < 10
        await client.idle_done()
