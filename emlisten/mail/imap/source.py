"""The IMAP ``MailSource``: IDLE listeners and message readers on emlisten's own client.

Authentication: LOGIN / AUTHENTICATE PLAIN with the password, or, when ``MailboxConfig.use_oauth``,
OAUTHBEARER (RFC 7628) when the server offers it, else XOAUTH2, with ``access_token``. A rejected
token raises :class:`emlisten.errors.MailTokenRejectedError` (a ``MailAuthError``), whose message
summarises the server's JSON error (status, scope) and never contains the token: the service
should then ask Creatio for a fresh token (``RefreshToken``).

Marking mail as synchronized (Creatio's ``FeatureValues.MarkEmailsAsSynchronized``):
``ImapReader.mark(uids)`` adds the keyword :data:`SYNCED_KEYWORD` (``$CreatioSynced``) with
``UID STORE +FLAGS.SILENT``. A keyword, not ``\\Seen``: the mailbox owner still sees the mail as
unread. Readers EXAMINE folders (read-only) by default; ``mark`` re-opens the selected folder
with SELECT first (and refuses when its UIDVALIDITY changed meanwhile). Servers that do not allow
new keywords (no ``\\*`` in PERMANENTFLAGS) answer STORE with NO: ``MailProtocolError``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from emlisten.abc import MailReader, MailSource, NewMailCallback, Prefetch
from emlisten.errors import MailAuthError, MailProtocolError, MailSourceError, MailTokenRejectedError
from emlisten.mail.imap._client import FetchedMessage, ImapClient
from emlisten.mail.imap._parser import Response
from emlisten.models import Checkpoint, FolderInfo, MailboxConfig, RawMessage, SyncTask

log = logging.getLogger(__name__)

#: RFC 2177: servers may drop an IDLE after 30 minutes without a client command.
DEFAULT_IDLE_RENEW_SECONDS = 25 * 60
#: UIDs per UID FETCH command (keeps command lines and responses reasonably sized).
FETCH_BATCH = 200
#: Keyword set by ``ImapReader.mark`` for Creatio's ``FeatureValues.MarkEmailsAsSynchronized``:
#: a ``$`` keyword (RFC 5788 style) that mail clients do not show, unlike ``\Seen`` which
#: would hide the mail from its owner's "unread" view.
SYNCED_KEYWORD = "$CreatioSynced"


#: What a listener in IDLE acts on (see _Listener.note); the server's keepalives and flag changes
#: are passed over inside the wait, without waking the listener: Dovecot sends its keepalive to
#: every session of one client address in the same second.
_LISTENED_FOR = frozenset({"EXISTS", "EXPUNGE"})


@dataclass(frozen=True, slots=True)
class ImapSettings:
    """Timing of IMAP sessions (seconds)."""

    #: Re-issue IDLE this often (RFC 2177 says before 29 minutes).
    idle_renew_seconds: float = DEFAULT_IDLE_RENEW_SECONDS
    #: No server traffic for this long while idling: probe with DONE + NOOP (each listener
    #: waits up to a quarter less, drawn at random, see _Listener.quiet_allowance).
    keepalive_seconds: float = 5 * 60
    #: How long the probe may take before the connection is declared dead.
    keepalive_timeout: float = 30.0
    #: NOOP interval for servers without IDLE.
    poll_seconds: float = 30.0
    connect_timeout: float = 30.0
    command_timeout: float = 60.0
    #: LOGOUT/DONE on shutdown; shielded, so keep it short.
    close_timeout: float = 5.0
    #: Safety net for notifications a server drops: this long after new mail was handled on
    #: a session, look at the folder once on a short session of its own (STATUS), leaving the
    #: listening session in IDLE (0 disables).
    recheck_seconds: float = 4.0
    #: A second, later look (0: none): under load a server can hand a session to hibernation
    #: seconds after it usually does, after the first recheck has looked.
    recheck_late_seconds: float = 12.0
    #: One look after the first IDLE of every session (a connect or reconnect), whose hand-off
    #: window no new mail follows to schedule one: a login per connect.
    recheck_after_connect: bool = True


#: Looks after first IDLEs asked per second per process, at most (see _LookSlots).
CONNECT_LOOKS_PER_SECOND = 25.0
#: A look after a first IDLE that cannot start within this long of its window is left out.
CONNECT_LOOK_MAX_LATENESS_SECONDS = 60.0
#: Looks (side sessions) per process: at most this many at once, and started this often.
LOOK_CONCURRENCY = 4
LOOKS_PER_SECOND = 25.0
#: While the process's listening sessions fetch this many mails a second, a backlog drains:
#: looks start one a second only, and none waits longer than _LOOK_MAX_HOLD_SECONDS for that.
_LOOK_BUSY_FETCHES_PER_SECOND = 16
_LOOK_MAX_HOLD_SECONDS = 30.0
#: One warning about failed looks per this many seconds at most.
_LOOK_FAILED_LOG_SECONDS = 60.0
#: After looks failed in a row, the gap between looks doubles per failure up to this: a server
#: that refuses more sessions (seen at 10,000 TLS sessions: it ended the handshakes) is not
#: asked 25 times a second for one it will refuse; the first look that succeeds resets it.
_LOOK_FAILED_MAX_GAP_SECONDS = 5.0


class _LookSlots:
    """Spreads the looks after sessions' first IDLEs: a cold start or a reconnect storm starts
    thousands of sessions within a minute, and a look each at the same moment would open as
    many side sessions at once. Each look takes the next free slot, at most ``per_second`` a
    second; never waiting, only scheduled later.

    A look whose slot would come more than ``max_lateness`` seconds after its window is not
    scheduled: the session's keepalive probe (minutes) finds what the window hid anyway, and at
    10,000 sessions the looks, 25 a second, would keep the server logging in for 400 s after
    a cold start, most of them after the keepalive had looked already."""

    __slots__ = ("_gap", "_max_lateness", "_next_free")

    def __init__(
        self,
        per_second: float = CONNECT_LOOKS_PER_SECOND,
        *,
        max_lateness: float = CONNECT_LOOK_MAX_LATENESS_SECONDS,
    ) -> None:
        self._gap = 1.0 / per_second if per_second > 0 else 0.0
        self._max_lateness = max_lateness
        self._next_free = -math.inf

    def reserve(self, earliest: float) -> float | None:
        """The time of the look, or None when it would come too late to be worth a login."""
        slot = max(earliest, self._next_free)
        if slot - earliest > self._max_lateness:
            return None
        self._next_free = slot + self._gap
        return slot


class _RecentCount:
    """Events in the current and the previous whole second (cheap, no timestamps kept)."""

    __slots__ = ("current", "previous", "second")

    def __init__(self) -> None:
        self.second = 0
        self.current = 0
        self.previous = 0

    def _roll(self, now: float) -> None:
        second = int(now)
        if second != self.second:
            self.previous = self.current if second == self.second + 1 else 0
            self.current = 0
            self.second = second

    def add(self, now: float, count: int = 1) -> None:
        self._roll(now)
        self.current += count

    def in_last_second(self, now: float) -> int:
        self._roll(now)
        return max(self.current, self.previous)


class _LookGate:
    """The process's looks share this: a few side sessions at once, a bounded login rate, and
    while a backlog drains (the listening sessions fetch many mails a second) one look a second
    only, so that the looks do not slow the drain they protect (500+ logins had taken a fifth
    of a 1,000-mailbox drain's CPU); none is held longer than ``_LOOK_MAX_HOLD_SECONDS``."""

    __slots__ = (
        "_gap",
        "_next_start",
        "failed",
        "failed_in_a_row",
        "failed_said_at",
        "fetched",
        "observer",
        "slots",
    )

    def __init__(self, *, concurrency: int = LOOK_CONCURRENCY, per_second: float = LOOKS_PER_SECOND) -> None:
        self.slots = trio.CapacityLimiter(concurrency)
        self._gap = 1.0 / per_second if per_second > 0 else 0.0
        self._next_start = -math.inf
        #: Mails fetched on listening sessions, for "a backlog drains".
        self.fetched = _RecentCount()
        #: Looks failed since the last warning about them.
        self.failed = 0
        self.failed_said_at = -math.inf
        #: Looks failed since the last one that did not: slows the looks down.
        self.failed_in_a_row = 0
        #: Told the outcome of every look ("found", "nothing", "failed"): metrics.
        self.observer: Callable[[str], None] | None = None

    async def wait_turn(self, asked_at: float) -> None:
        """Return when a look asked at ``asked_at`` may start (the caller holds a slot)."""
        while True:
            now = trio.current_time()
            if now < self._next_start:
                await trio.sleep_until(self._next_start)
                continue
            draining = self.fetched.in_last_second(now) >= _LOOK_BUSY_FETCHES_PER_SECOND
            held_long_enough = now - asked_at >= _LOOK_MAX_HOLD_SECONDS
            gap = 1.0 if draining and not held_long_enough else self._gap
            if self.failed_in_a_row:
                backoff = self._gap * 2.0 ** min(self.failed_in_a_row, 16)
                gap = max(gap, min(backoff, _LOOK_FAILED_MAX_GAP_SECONDS))
            self._next_start = now + gap
            return

    def outcome(self, outcome: str) -> None:
        self.failed_in_a_row = self.failed_in_a_row + 1 if outcome == "failed" else 0
        if self.observer is not None:
            self.observer(outcome)

    def left_out(self) -> None:
        """A look after a first IDLE was not scheduled: it would have come too late."""
        if self.observer is not None:
            self.observer("too_late")

    def failed_look(self, exc: MailSourceError, mailbox_id: str, folder: str) -> None:
        """A failed look is a missed safety net, not a failed listener: the listening session
        is fine. Said once a minute at most (a server refusing logins fails thousands)."""
        self.outcome("failed")
        self.failed += 1
        now = trio.current_time()
        if now - self.failed_said_at < _LOOK_FAILED_LOG_SECONDS:
            return
        log.warning(
            "%d look(s) at folders failed since the last such warning (the last: %s)",
            self.failed,
            exc,
            extra={"mailbox": mailbox_id, "folder": folder},
        )
        self.failed = 0
        self.failed_said_at = now


class ImapSource(MailSource):
    """Listens with IDLE (NOOP polling when the server has no IDLE) and reads with UID FETCH.

    ``ca_file`` adds trusted CAs for verified TLS (default: ``EMLISTEN_TLS_CA_FILE``).
    """

    def __init__(
        self,
        *,
        idle_renew_seconds: float = DEFAULT_IDLE_RENEW_SECONDS,
        keepalive_seconds: float = 5 * 60,
        keepalive_timeout: float = 30.0,
        poll_seconds: float = 30.0,
        connect_timeout: float = 30.0,
        command_timeout: float = 60.0,
        close_timeout: float = 5.0,
        recheck_seconds: float = 4.0,
        recheck_late_seconds: float = 12.0,
        recheck_after_connect: bool = True,
        prefetch_budget_bytes: int = 256 * 1024 * 1024,
        max_concurrent_wakeups: int = 128,
        ca_file: str | None = None,
        client_id: dict[str, str] | None = None,
    ) -> None:
        self.settings = ImapSettings(
            idle_renew_seconds=idle_renew_seconds,
            keepalive_seconds=keepalive_seconds,
            keepalive_timeout=keepalive_timeout,
            poll_seconds=poll_seconds,
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
            close_timeout=close_timeout,
            recheck_seconds=recheck_seconds,
            recheck_late_seconds=recheck_late_seconds,
            recheck_after_connect=recheck_after_connect,
        )
        #: Bounds the memory of message bodies being fetched on listening sessions at once.
        self._prefetch_budget = ByteBudget(prefetch_budget_bytes)
        #: Bounds the sessions ending IDLE at once: see Settings.max_concurrent_wakeups.
        self._wakeups = trio.CapacityLimiter(max_concurrent_wakeups)
        self._look_slots = _LookSlots()
        self._looks = _LookGate()
        self.ca_file = ca_file
        #: Sent with ID (RFC 2971) when the server supports it; None disables ID.
        self.client_id = client_id
        #: Told (command, outcome) after every IMAP command of every session (metrics).
        self.command_observer: Callable[[str, str, float], None] | None = None

    @property
    def look_observer(self) -> Callable[[str], None] | None:
        """Told the outcome of every look at a folder ("found", "nothing", "failed")."""
        return self._looks.observer

    @look_observer.setter
    def look_observer(self, observer: Callable[[str], None] | None) -> None:
        self._looks.observer = observer

    async def connect(self, mailbox: MailboxConfig) -> ImapClient:
        """A connected, authenticated client for ``mailbox`` (closed again on failure)."""
        settings = self.settings
        client = ImapClient(
            mailbox.imap,
            connect_timeout=settings.connect_timeout,
            command_timeout=settings.command_timeout,
            ca_file=self.ca_file,
            observer=self.command_observer,
        )
        try:
            await client.connect()
            await _authenticate(client, mailbox)
            if self.client_id and client.has_capability("ID"):
                await client.id(self.client_id)
        except BaseException:
            await client.aclose()
            raise
        return client

    async def listen(
        self,
        mailbox: MailboxConfig,
        folder: str,
        on_new_mail: NewMailCallback,
        *,
        prefetch: Prefetch | None = None,
        task_status: trio.TaskStatus[FolderInfo] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        client = await self.connect(mailbox)
        look_session = _LookSession(functools.partial(self.connect, mailbox), self.settings.close_timeout)
        try:
            info = await client.examine(folder)
            async with trio.open_nursery() as looks:
                listener = _Listener(
                    client,
                    mailbox.id,
                    info,
                    on_new_mail,
                    settings=self.settings,
                    prefetch=prefetch,
                    budget=self._prefetch_budget,
                    wakeups=self._wakeups,
                    look_slots=self._look_slots,
                    looks=_Looks(looks, self._looks, look_session),
                )
                try:
                    # Mail that arrived while we were away: queued before we report "started".
                    await listener.catch_up()
                    if client.has_capability("IDLE"):
                        await listener.idle_forever(task_status)
                    else:
                        await listener.poll_forever(task_status)
                finally:
                    looks.cancel_scope.cancel()  # a look ends with its listener
        finally:
            if client.idling:
                # In IDLE, the session is closed without DONE and LOGOUT (either side may end a
                # connection, RFC 9051 3.4): a server that hibernates idle sessions (Dovecot)
                # would have to wake each one to answer them, every session of the node at once
                # on shutdown (10,000 process starts on the mail server for a rolling restart).
                await client.aclose()
            else:
                # DONE + LOGOUT when the connection is still healthy; shielded, bounded.
                await client.close(timeout=self.settings.close_timeout)
            await look_session.aclose()

    @asynccontextmanager
    async def open_reader(self, mailbox: MailboxConfig) -> AsyncIterator[MailReader]:
        client = await self.connect(mailbox)
        reader = ImapReader(client, close_timeout=self.settings.close_timeout)
        try:
            yield reader
        finally:
            await reader.aclose()


async def _authenticate(client: ImapClient, mailbox: MailboxConfig) -> None:
    if mailbox.use_oauth:
        await _authenticate_oauth(client, mailbox)
        return
    if client.has_capability("AUTH=PLAIN") and not client.has_capability("LOGINDISABLED"):
        await client.authenticate_plain(mailbox.user_name, mailbox.password)
    else:
        await client.login(mailbox.user_name, mailbox.password)


async def _authenticate_oauth(client: ImapClient, mailbox: MailboxConfig) -> None:
    """OAUTHBEARER (the standard) when offered, else XOAUTH2. A rejected token raises
    MailTokenRejectedError: the caller asks for a fresh token (Creatio's RefreshToken)."""
    if not mailbox.access_token:
        raise MailTokenRejectedError(f"no OAuth access token for {mailbox.user_name!r}")
    if client.has_capability("AUTH=OAUTHBEARER"):
        endpoint = client.endpoint
        await client.authenticate_oauthbearer(
            mailbox.user_name, mailbox.access_token, endpoint.host, endpoint.port
        )
    elif client.has_capability("AUTH=XOAUTH2"):
        await client.authenticate_xoauth2(mailbox.user_name, mailbox.access_token)
    else:
        raise MailAuthError(
            f"{client.endpoint.host}:{client.endpoint.port} offers neither OAUTHBEARER nor XOAUTH2"
        )


def _reservation(messages: Sequence[FetchedMessage], max_message_bytes: int) -> int:
    """Prefetch memory for these messages by their RFC822.SIZE (the fetch cuts bodies at
    ``max_message_bytes + 1``; unknown sizes count as that), plus the parsed form's overhead."""
    cut = max_message_bytes + 1
    return sum(min(m.size if m.size is not None else cut, cut) + 1024 for m in messages)


#: How long a listener waits for prefetch memory once it knows the real sizes of its new mail.
_REAL_SIZE_PATIENCE = 2.0


class ByteBudget:
    """Memory for message bodies in flight. A listener that cannot get it hands the mail to a
    reader instead, so a slow server never holds up the others for long: the worst case is
    taken without waiting, real sizes with a short patience (see _Listener._weight_by_size)."""

    __slots__ = ("_freed", "available", "total")

    def __init__(self, total: int) -> None:
        self.total = total
        self.available = total
        self._freed = trio.Event()

    def try_take(self, size: int) -> bool:
        if size > self.available:
            return False
        self.available -= size
        return True

    async def take(self, size: int, *, patience: float) -> bool:
        """Wait up to ``patience`` seconds for ``size`` bytes; False if they did not come."""
        if size > self.total:
            return False
        with trio.move_on_after(patience):
            while not self.try_take(size):
                await self._freed.wait()
            return True
        return False

    def give_back(self, size: int) -> None:
        self.available = min(self.total, self.available + size)
        self._freed.set()
        self._freed = trio.Event()


class _Held:
    """Prefetch memory one fetch holds: the worst case until the answer is in, then only what
    the fetched mail really takes, until the task carrying it has been handed on."""

    __slots__ = ("_budget", "size")

    def __init__(self, budget: ByteBudget, size: int) -> None:
        self._budget = budget
        self.size = size

    def shrink_to(self, size: int) -> None:
        # A backlog's worst case (max size for each new mail) is some 50 times its real size:
        # held across a slow hand-on (a RabbitMQ confirm), it left hundreds of listeners without
        # memory and sent them the long way (sizes first, then the fetch).
        if size < self.size:
            self._budget.give_back(self.size - size)
            self.size = size

    def release(self) -> None:
        self._budget.give_back(self.size)
        self.size = 0


class _LookSession:
    """The side session a listener looks at its folder on. Kept open from one look to the next
    when another is already scheduled (the late look follows the first within seconds), so that
    a mail costs one extra login, not one per look; closed after the last."""

    __slots__ = ("_client", "_close_timeout", "_connect")

    def __init__(self, connect: Callable[[], Awaitable[ImapClient]], close_timeout: float) -> None:
        self._connect = connect
        self._close_timeout = close_timeout
        self._client: ImapClient | None = None

    async def status(self, folder: str, *, keep: bool) -> dict[str, int]:
        """STATUS of ``folder``; ``keep``: another look follows soon, hold the session for it."""
        client, self._client = self._client, None
        if client is not None:
            try:
                answer = await client.status(folder, _LOOK_ITEMS)
            except MailSourceError:
                # The server may end a session it finds idle: one new session, then report.
                await client.aclose()
            except BaseException:
                await client.aclose()
                raise
            else:
                return await self._after(client, answer, keep)
        client = await self._connect()
        try:
            answer = await client.status(folder, _LOOK_ITEMS)
        except BaseException:
            await client.close(timeout=self._close_timeout)
            raise
        return await self._after(client, answer, keep)

    async def _after(self, client: ImapClient, answer: dict[str, int], keep: bool) -> dict[str, int]:
        if keep:
            self._client = client
        else:
            await client.close(timeout=self._close_timeout)
        return answer

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close(timeout=self._close_timeout)


_LOOK_ITEMS = ("MESSAGES", "UIDNEXT", "UIDVALIDITY")
#: The share of ``keepalive_seconds`` by which listeners' silence windows differ (_Listener).
_QUIET_SPREAD = 0.25


@dataclass(frozen=True, slots=True)
class _Looks:
    """What a listener needs to look at its folder on a side session."""

    nursery: trio.Nursery  # the listener's: a look ends with it
    gate: _LookGate  # the process's
    session: _LookSession  # the listener's side session


class _Listener:
    """Turns the untagged responses of one selected folder into SyncTasks.

    With a ``Prefetch`` policy it also fetches the new mail on this session (DONE, UID FETCH,
    IDLE again) and attaches it to the task, so that delivery needs no second session. It keeps
    ``next_uid``, the lowest UID not handed on yet, and ``fetched_exists``, how many messages of
    the folder lie below it, so that it knows how many new messages an EXISTS announces.
    """

    __slots__ = (
        "budget",
        "client",
        "exists",
        "fetched_exists",
        "idle_wait_scope",
        "info",
        "look_asked_at",
        "look_found",
        "look_saw",
        "look_slots",
        "look_timer",
        "looking",
        "looks",
        "mailbox_id",
        "next_uid",
        "on_new_mail",
        "prefetch",
        "quiet_allowance",
        "recheck_at",
        "recheck_late_at",
        "seen_at",
        "settings",
        "wakeups",
        "wanted",
    )

    def __init__(
        self,
        client: ImapClient,
        mailbox_id: str,
        info: FolderInfo,
        on_new_mail: NewMailCallback,
        *,
        settings: ImapSettings,
        prefetch: Prefetch | None = None,
        budget: ByteBudget | None = None,
        wakeups: trio.CapacityLimiter | None = None,
        look_slots: _LookSlots | None = None,
        looks: _Looks | None = None,
    ) -> None:
        self.client = client
        self.mailbox_id = mailbox_id
        self.info = info
        self.exists = info.exists
        self.on_new_mail = on_new_mail
        self.settings = settings
        self.prefetch = prefetch
        self.budget = budget or ByteBudget(256 * 1024 * 1024)
        self.wakeups = wakeups or trio.CapacityLimiter(128)
        self.look_slots = look_slots or _LookSlots()
        self.next_uid = max(info.uidnext, 1)
        self.fetched_exists = info.exists
        #: The server announced mail that was not fetched yet (prefetch mode).
        self.wanted = False
        self.seen_at = 0.0
        self.recheck_at = math.inf
        self.recheck_late_at = math.inf
        #: None: the listener cannot look (tests of the listening alone).
        self.looks = looks
        #: When a look was asked that has not started yet (None: none asked).
        self.look_asked_at: float | None = None
        self.looking = False
        #: While a task waits for ``recheck_at`` (so that the listener is not woken for it):
        #: the scope it waits in, whose deadline follows ``recheck_at``.
        self.look_timer: trio.CancelScope | None = None
        #: A look found mail this session was not told of (fetched after a NOOP).
        self.look_found = False
        #: The STATUS the last look saw, until the listener acted on it.
        self.look_saw: dict[str, int] | None = None
        #: Cancelled by a look that found unannounced mail, to end the wait in IDLE.
        self.idle_wait_scope: trio.CancelScope | None = None
        #: How long the server may stay silent before the session is probed: up to a quarter
        #: below ``keepalive_seconds``, drawn per listener. The server's keepalives move every
        #: session's ``last_heard`` in the same second (Dovecot times them to the client's
        #: address), so equal windows would end, and wake every listener, in one pass too.
        self.quiet_allowance = settings.keepalive_seconds * (1 - _QUIET_SPREAD * random.random())

    def _task(self, **fields: Any) -> SyncTask:
        return SyncTask(
            mailbox_id=self.mailbox_id, folder=self.info.name, uidvalidity=self.info.uidvalidity, **fields
        )

    def note(self, responses: Iterable[Response]) -> bool:
        """Bookkeeping of EXISTS/EXPUNGE; True when the folder grew."""
        grew = False
        for response in responses:
            if response.type == "EXISTS" and response.number is not None:
                if response.number > self.exists:
                    grew = True
                self.exists = response.number
            elif response.type == "EXPUNGE":
                self.exists = max(self.exists - 1, 0)
                if response.number is not None and response.number <= self.fetched_exists:
                    self.fetched_exists -= 1
        return grew

    async def handle(self, responses: Sequence[Response]) -> None:
        if not self.note(responses):
            return
        if not self.seen_at:
            self.seen_at = time.time()
        if self.prefetch is not None:
            self.wanted = True  # fetched as soon as IDLE is ended
            return
        await self._announce(self._task(uid_hint=0, reason="exists"))

    # -- catch-up and fetching on this session --------------------------------------------------

    async def catch_up(self) -> None:
        """After a (re)connect: hand on what arrived while we were away, fetched here when it is a
        few small mails, else as a nudge for a reader."""
        newest = max(self.info.uidnext - 1, 0)
        plain = self._task(uid_hint=newest, reason="catch-up")
        prefetch = self.prefetch
        if prefetch is None:
            await self.on_new_mail(plain)
            return
        checkpoint = await prefetch.checkpoint(self.info.name)
        if plain.covered_by(checkpoint):
            return  # nothing arrived while we were away: the receiver would only read it again
        if (
            checkpoint is None  # a new subscription, seeded from this task
            or checkpoint.cursor
            or checkpoint.uidvalidity != self.info.uidvalidity
            or checkpoint.last_uid >= newest
        ):
            await self.on_new_mail(plain)
            return
        first = checkpoint.last_uid + 1
        listed, new = await self._sizes_from(first)
        uids = sorted(m.uid for m in new)
        self.exists = max([self.exists, *(m.sequence for m in listed)])
        weight = _reservation(new, prefetch.max_message_bytes)
        if len(uids) > prefetch.max_messages or (uids and not self.budget.try_take(weight)):
            # A real backlog (a reader pages through it), or no memory to spare for it now.
            await self.on_new_mail(plain)
            self._advance(listed)
            return
        if not uids:
            # Only expunged mail since the checkpoint: move it on without asking for bodies
            # ("n:*" would send the newest message again).
            self._advance(listed)
            await self.on_new_mail(
                self._task(uid_hint=newest, reason="catch-up", prefetch_from=first, prefetch_to=newest)
            )
            return
        self.next_uid = first
        self.fetched_exists = self.exists - len(uids)
        held = _Held(self.budget, weight)
        try:
            await self._fetch(held, reason="catch-up", covers_to=newest)
        finally:
            held.release()

    def _fetch_weight(self) -> int | None:
        """Memory taken from the ByteBudget for fetching what the server announced, or None
        when a reader should fetch it instead: more than one fetch should hold, or no memory to
        spare now (never wait for it: a slow server must not hold up the others)."""
        assert self.prefetch is not None
        expected = self.exists - self.fetched_exists
        weight = max(1, expected) * (self.prefetch.max_message_bytes + 1)
        if expected > self.prefetch.max_messages or not self.budget.try_take(weight):
            return None
        return weight

    async def _sizes_from(self, first: int) -> tuple[list[FetchedMessage], list[FetchedMessage]]:
        """``UID FETCH first:* (UID RFC822.SIZE)``: what the server listed, and of it the
        messages from ``first`` on ("n:*" also lists the newest message when n is above every
        UID)."""
        unsolicited: list[Response] = []
        listed = await self.client.uid_fetch(f"{first}:*", "(UID RFC822.SIZE)", unsolicited=unsolicited)
        self.note(unsolicited)
        return listed, [m for m in listed if m.uid >= first]

    async def _weight_by_size(self) -> int | None:
        """When the worst case does not fit the ByteBudget: ask the sizes of the new mail (one
        round trip on this session, far cheaper than a reader's connect and login) and take
        what they need. None: too much, or no memory to spare even so (a reader fetches)."""
        assert self.prefetch is not None
        if self.exists - self.fetched_exists > self.prefetch.max_messages:
            return None
        _, new = await self._sizes_from(self.next_uid)
        if not new or len(new) > self.prefetch.max_messages:
            return None
        weight = _reservation(new, self.prefetch.max_message_bytes)
        # Others' worst-case reservations free within a round trip: worth a short wait.
        return weight if await self.budget.take(weight, patience=_REAL_SIZE_PATIENCE) else None

    async def fetch_new(self) -> None:
        """Fetch what the server announced (prefetch mode), and hand it on."""
        self.wanted = False
        weight = self._fetch_weight()
        if weight is None:
            weight = await self._weight_by_size()
        if weight is None:
            # Only learn the newest UID, and let a reader fetch.
            newest = await self.client.last_uid()
            if newest is not None and newest.uid >= self.next_uid:
                self._advance([newest])
                await self._announce(self._task(uid_hint=newest.uid, reason="exists"))
            return
        held = _Held(self.budget, weight)
        try:
            await self._fetch(held, reason="exists", covers_to=0)
        finally:
            held.release()

    async def end_idle_and_fetch(self, wait_seconds: float) -> bool:
        """The common case of new mail while idling: DONE, the fetch and IDLE again in one
        write. False (IDLE still on) when the fetch should go to a reader: the caller ends IDLE.

        The memory is taken when this session's turn to wake has come, not before: 10,000
        sessions told of mail at once (a backlog after a pause) took the whole budget in the
        order they were told, and nine in ten, finding none left, went the long way (DONE, a
        FETCH and IDLE, a round trip each) while the budget sat with sessions waiting their turn."""
        held: _Held | None = None
        try:
            async with self.wakeups:  # until the server answered, not while it is handed on
                weight = self._fetch_weight()
                if weight is None:
                    return False
                self.wanted = False
                held = _Held(self.budget, weight)
                first = self.next_uid
                unsolicited: list[Response] = []
                before, fetched = await self.client.idle_done_uid_fetch(
                    f"{first}:*",
                    self._fetch_items(),
                    timeout=wait_seconds,
                    unsolicited=unsolicited,
                    idle_again=True,
                )
            self.note(before)
            await self._hand_on(held, fetched, unsolicited, first=first, reason="exists", covers_to=0)
        finally:
            if held is not None:
                held.release()
                self.client.answer_handed_on()  # IDLE is on again: no next command gives it back
        return True

    def _fetch_items(self) -> str:
        """The new mail whole, cut just past the size limit (a longer one is left to a reader)."""
        assert self.prefetch is not None
        return f"(UID RFC822.SIZE INTERNALDATE BODY.PEEK[]<0.{self.prefetch.max_message_bytes + 1}>)"

    async def _fetch(self, held: _Held, *, reason: str, covers_to: int) -> None:
        """UID FETCH next_uid:* (the session is not in IDLE) and hand on what is complete.

        ``held``: the caller's memory for it, shrunk to what the answer really takes.
        ``covers_to``: the task may claim the folder up to this UID even when nothing newer is
        there (a catch-up past expunged mail)."""
        first = self.next_uid
        unsolicited: list[Response] = []
        fetched = await self.client.uid_fetch(f"{first}:*", self._fetch_items(), unsolicited=unsolicited)
        await self._hand_on(held, fetched, unsolicited, first=first, reason=reason, covers_to=covers_to)

    async def _hand_on(
        self,
        held: _Held,
        fetched: list[FetchedMessage],
        unsolicited: list[Response],
        *,
        first: int,
        reason: str,
        covers_to: int,
    ) -> None:
        """Hand on a fetch's answer. Mail the server announced in it (Dovecot, like most
        servers, tells of mail that landed meanwhile at the end of any command) is not in it:
        it is wanted next, not left for the next notification."""
        announced_meanwhile = self.note(unsolicited)
        await self._fetched(held, fetched, first=first, reason=reason, covers_to=covers_to)
        if announced_meanwhile and self.exists > self.fetched_exists:
            self.wanted = True
            self.seen_at = self.seen_at or time.time()

    async def _fetched(
        self, held: _Held, fetched: list[FetchedMessage], *, first: int, reason: str, covers_to: int
    ) -> None:
        """Hand on what a fetch from ``first`` brought (see _hand_on)."""
        prefetch = self.prefetch
        assert prefetch is not None
        limit = prefetch.max_message_bytes
        held.shrink_to(sum(len(m.body or b"") + 1024 for m in fetched))  # as _reservation counts
        # "n:*" also matches the newest message when n is above every UID: filter it out.
        new = sorted((m for m in fetched if m.uid >= first), key=lambda m: m.uid)
        uidvalidity = self.info.uidvalidity
        complete: list[RawMessage] = []
        for message in new[: prefetch.max_messages]:
            if message.body is None or len(message.body) > limit:
                break  # too big to carry: this one and the rest are left to a reader
            complete.append(
                RawMessage(
                    uid=message.uid,
                    data=message.body,
                    internal_date=message.internal_date,
                    size=message.size,
                    key=f"{uidvalidity}/{message.uid}",
                    position=Checkpoint(uidvalidity, message.uid),
                )
            )
        self._advance(fetched)
        if new and self.looks is not None:
            self.looks.gate.fetched.add(trio.current_time(), len(new))  # "a backlog drains"
        if not new and covers_to < first:
            return  # announced, then gone (expunged), or already handed on
        newest = max([covers_to, *(m.uid for m in new)])
        # The task speaks for the folder up to the last complete message (all of them: newest).
        prefetch_to = newest if len(complete) == len(new) else (complete[-1].uid if complete else first - 1)
        task = self._task(uid_hint=newest, reason=reason)
        if prefetch_to >= first:
            task = dataclasses.replace(
                task, prefetched=tuple(complete), prefetch_from=first, prefetch_to=prefetch_to
            )
        await self._announce(task, activity=bool(new))

    async def _announce(self, task: SyncTask, *, activity: bool = True) -> None:
        """Hand on new mail, stamped with when it was seen; new mail schedules a recheck."""
        task = dataclasses.replace(task, seen_at=self.seen_at)
        self.seen_at = 0.0
        if activity:
            self._activity()
        await self.on_new_mail(task)

    def _advance(self, fetched: Iterable[FetchedMessage]) -> None:
        """Everything up to the newest of these has been handed on."""
        for message in fetched:
            if message.uid >= self.next_uid:
                self.next_uid = message.uid + 1
                self.fetched_exists = max(self.fetched_exists, message.sequence)
            self.exists = max(self.exists, message.sequence)

    # -- the safety net for dropped notifications -----------------------------------------------

    def _activity(self) -> None:
        """New mail was handled: have the folder looked at again a little later, in case the
        server failed to announce what came next (Dovecot drops notifications while it hands a
        session to imap-hibernate, about two seconds after IDLE began)."""
        first, late = self.settings.recheck_seconds, self.settings.recheck_late_seconds
        now = trio.current_time()
        self.recheck_at = now + first if first > 0 else math.inf
        self.recheck_late_at = now + late if late > first else math.inf
        if first <= 0 and late > 0:
            self.recheck_at, self.recheck_late_at = now + late, math.inf
        self._time_the_looks()

    def _time_the_looks(self) -> None:
        """Have the looks asked at ``recheck_at`` by a task of their own: a listener woken from
        its wait in IDLE only to ask was a cancellation and a new wait per look, twice per mail."""
        if self.looks is None or self.recheck_at == math.inf:
            return
        if self.look_timer is not None:
            self.look_timer.deadline = self.recheck_at  # new mail moved the look
            return
        self.look_timer = trio.CancelScope(deadline=self.recheck_at)
        self.looks.nursery.start_soon(self._look_timer, self.look_timer, name=f"look timer:{self.mailbox_id}")

    async def _look_timer(self, scope: trio.CancelScope) -> None:
        try:
            while True:
                with scope:
                    await trio.sleep_forever()
                if trio.current_time() >= self.recheck_at:  # else newer mail moved it on
                    self.recheck()  # the next one is the late look, if any
                    if self.recheck_at == math.inf:
                        return
                scope = self.look_timer = trio.CancelScope(deadline=self.recheck_at)
        finally:
            self.look_timer = None

    def _check_the_first_window(self) -> None:
        """The first IDLE of a session opens a hand-off window like any other, without new mail
        to schedule a look after it: mail landing 1.5-2 s after a (re)connect waited for the
        next mail (seen in the soak, right after a cold start). One look, after the late
        hand-off; none when the catch-up already scheduled one."""
        if self.recheck_at != math.inf or not self.settings.recheck_after_connect:
            return
        window = self.settings.recheck_late_seconds or self.settings.recheck_seconds
        if window > 0:
            slot = self.look_slots.reserve(trio.current_time() + window)
            if slot is not None:
                self.recheck_at = slot
                self._time_the_looks()
            elif self.looks is not None:
                self.looks.gate.left_out()

    def recheck(self) -> None:
        """Have the folder looked at on a side session; the late look, if any, comes next.

        Not on the listening session: ending IDLE to ask would start a new IDLE, and with it a
        new hand-off window in which mail can go unannounced, and it would keep the session
        from hibernating. Not by a worker either: a queued look dies with the worker that took
        it, and a cold start's looks flooded RabbitMQ; here a look dies only with its listener,
        whose successor catches up anyway."""
        self.recheck_at, self.recheck_late_at = self.recheck_late_at, math.inf
        if self.looks is None:
            return
        if self.look_asked_at is None:
            self.look_asked_at = trio.current_time()
        if not self.looking:
            self.looking = True
            self.looks.nursery.start_soon(self._look, name=f"look:{self.mailbox_id}")

    async def _look(self) -> None:
        """Look until no look is asked any more: one asked while a look waits for its turn is
        covered by it; one asked after the STATUS went out gets a look of its own."""
        assert self.looks is not None
        gate = self.looks.gate
        try:
            while self.look_asked_at is not None:
                async with gate.slots:
                    await gate.wait_turn(self.look_asked_at)
                    self.look_asked_at = None
                    try:
                        # Another look already scheduled (the late one, or new mail's): keep the
                        # side session for it.
                        keep = self.recheck_at != math.inf
                        self.look_saw = await self.looks.session.status(self.info.name, keep=keep)
                    except MailSourceError as exc:
                        gate.failed_look(exc, self.mailbox_id, self.info.name)
                        continue
                if self.idle_wait_scope is not None:
                    self.idle_wait_scope.cancel()  # the listener acts on it (_act_on_look)
        finally:
            self.looking = False

    async def _act_on_look(self) -> None:
        """In the listener's task: act on what a look saw, against what this session knows now
        (mail the server announced meanwhile is no news)."""
        assert self.looks is not None
        status, self.look_saw = self.look_saw, None
        if status is None:
            return
        if status.get("UIDVALIDITY", self.info.uidvalidity) != self.info.uidvalidity:
            # The folder was re-created: only a new session sees it as it is now.
            raise MailProtocolError(
                f"the UIDVALIDITY of {self.info.name!r} changed while listening: reconnecting"
            )
        messages, uidnext = status.get("MESSAGES", 0), status.get("UIDNEXT", 0)
        unannounced = messages > self.exists or (self.prefetch is not None and uidnext > self.next_uid)
        if self.wanted or not unannounced:
            self.looks.gate.outcome("nothing")
            return
        self.looks.gate.outcome("found")
        log.info(
            "a look found mail the server did not announce",
            extra={"mailbox": self.mailbox_id, "folder": self.info.name},
        )
        if not self.seen_at:
            self.seen_at = time.time()
        if self.prefetch is not None:
            self.wanted = self.look_found = True  # fetched on this session, after a NOOP
            return
        self.exists = max(self.exists, messages)
        await self._announce(self._task(uid_hint=0, reason="exists"))

    # -- the session loops ----------------------------------------------------------------------

    async def idle_forever(self, task_status: trio.TaskStatus[FolderInfo]) -> None:
        client = self.client
        settings = self.settings
        started = False
        while True:
            # IDLE may have gone out already, behind the last fetch (idle_done_uid_fetch).
            initial = [] if client.idling else await client.idle_start()
            if not started:
                task_status.started(self.info)
                started = True
                self._check_the_first_window()
            await self.handle(initial)
            renew_at = trio.current_time() + settings.idle_renew_seconds
            probe = False
            while not self.wanted:
                if self.look_saw is not None:
                    await self._act_on_look()
                    continue
                now = trio.current_time()
                # Anything the server sent (its keepalives, passed over in idle_wait) proves it alive.
                quiet_until = client.last_heard + self.quiet_allowance
                if now >= renew_at:
                    break
                if now >= quiet_until:
                    probe = True
                    break
                response = None
                with trio.CancelScope() as self.idle_wait_scope:
                    # The silence window moves with every word of the server (the keepalives
                    # the shared reader passes over included) without waking this task.
                    # The looks have a timer of their own (_look_timer).
                    response = await client.idle_wait(
                        renew_at - now, only=_LISTENED_FOR, silence=self.quiet_allowance
                    )
                self.idle_wait_scope = None
                if response is not None:
                    await self.handle((response,))
            # DONE doubles as a liveness probe: a dead peer never sends the tagged OK.
            timeout = settings.keepalive_timeout if probe else settings.command_timeout
            # A wake-up token is held until the server answered (it has woken the session by
            # then), not while the answer is handed on: a queue that blocks (RabbitMQ retrying
            # an unreachable broker) would otherwise keep every other session in IDLE, its
            # renewals and liveness probes included.
            # Mail a look found was not announced to this session, whose view of the folder
            # may not hold it yet (Dovecot syncs it at the end of the next command, after a
            # FETCH would have run): a NOOP first.
            sync_first, self.look_found = self.look_found, False
            if not (self.wanted and not probe and not sync_first and await self.end_idle_and_fetch(timeout)):
                async with self.wakeups:
                    answer = await client.idle_done(timeout=timeout)
                await self.handle(answer)
            if probe or sync_first:
                await self.handle(await client.noop(timeout=settings.keepalive_timeout))
            while self.wanted and not client.idling:
                await self.fetch_new()

    async def poll_forever(self, task_status: trio.TaskStatus[FolderInfo]) -> None:
        task_status.started(self.info)
        while True:
            await trio.sleep(self.settings.poll_seconds)  # polling needs no recheck
            await self.handle(await self.client.noop())
            while self.wanted:
                await self.fetch_new()


class ImapReader(MailReader):
    """A ``MailReader`` over one authenticated client.

    Folders are opened read-only (EXAMINE) by default; :meth:`mark` re-opens the selected folder
    read-write (SELECT) when it has to set a keyword.
    """

    __slots__ = ("_client", "_close_timeout", "_selected", "_writable")

    def __init__(self, client: ImapClient, *, close_timeout: float = 5.0) -> None:
        self._client = client
        self._close_timeout = close_timeout
        self._selected: FolderInfo | None = None
        self._writable = False

    @property
    def client(self) -> ImapClient:
        return self._client

    async def select(self, folder: str, *, writable: bool = False) -> FolderInfo:
        """EXAMINE ``folder`` (SELECT when ``writable``)."""
        self._selected = await self._client.select(folder, readonly=not writable)
        self._writable = writable
        return self._selected

    async def mark(self, uids: Sequence[int], keyword: str = SYNCED_KEYWORD) -> None:
        """Add ``keyword`` to these messages of the selected folder (``UID STORE +FLAGS.SILENT``),
        leaving every other flag (``\\Seen`` included) as it is. Vanished UIDs are ignored."""
        self._require_selected()
        if not uids:
            return
        assert self._selected is not None
        if not self._writable:
            folder = self._selected.name
            reopened = await self.select(folder, writable=True)
            if reopened.uidvalidity != self._selected.uidvalidity:
                raise MailProtocolError(f"UIDVALIDITY of {folder!r} changed: not marking")
        for start in range(0, len(uids), FETCH_BATCH):
            await self._client.uid_store(uids[start : start + FETCH_BATCH], "+FLAGS.SILENT", [keyword])

    def _require_selected(self) -> None:
        if self._selected is None:
            raise MailProtocolError("no folder selected")

    async def uids_after(self, uid: int) -> list[int]:
        self._require_selected()
        found = await self._client.uid_search(f"UID {uid + 1}:*")
        # "n:*" also matches the highest UID when n is above it: filter.
        return [u for u in found if u > uid]

    async def fetch(self, uids: Sequence[int]) -> list[RawMessage]:
        self._require_selected()
        if not uids:
            return []
        wanted = list(dict.fromkeys(uids))
        found: dict[int, RawMessage] = {}
        for start in range(0, len(wanted), FETCH_BATCH):
            batch = wanted[start : start + FETCH_BATCH]
            batch_set = set(batch)
            for message in await self._client.uid_fetch(batch):
                if message.body is None or message.uid not in batch_set:
                    continue
                assert self._selected is not None
                uidvalidity = self._selected.uidvalidity
                found[message.uid] = RawMessage(
                    uid=message.uid,
                    data=message.body,
                    internal_date=message.internal_date,
                    size=message.size,
                    key=f"{uidvalidity}/{message.uid}",
                    position=Checkpoint(uidvalidity, message.uid),
                )
        return [found[uid] for uid in wanted if uid in found]

    async def current_position(self, folder: str) -> Checkpoint:
        info = await self.select(folder)
        return Checkpoint(info.uidvalidity, info.uidnext - 1)

    async def fetch_new(
        self, folder: str, checkpoint: Checkpoint, *, limit: int
    ) -> tuple[list[RawMessage], Checkpoint]:
        info = await self.select(folder)
        if info.uidvalidity != checkpoint.uidvalidity:
            log.warning(
                "UIDVALIDITY of %r changed (%d -> %d): the folder was rebuilt on the server; "
                "continuing from its current end (load older mail with /api/email/synchronize)",
                folder,
                checkpoint.uidvalidity,
                info.uidvalidity,
            )
            return [], Checkpoint(info.uidvalidity, info.uidnext - 1)
        newest = info.uidnext - 1
        if newest <= checkpoint.last_uid:
            return [], checkpoint  # UIDNEXT says nothing arrived: no search needed
        if newest - checkpoint.last_uid <= limit:
            # Few new UIDs at most: fetch them in one command instead of SEARCH then FETCH
            # (one round trip less on the hot path of every new mail).
            messages = await self._fetch_from(checkpoint.last_uid + 1, info.uidvalidity)
            return messages, Checkpoint(info.uidvalidity, max([newest, *(m.uid for m in messages)]))
        uids = (await self.uids_after(checkpoint.last_uid))[:limit]
        if not uids:
            return [], checkpoint
        # Past the last UID asked for, even if some vanished (expunged) before the FETCH.
        return await self.fetch(uids), Checkpoint(info.uidvalidity, uids[-1])

    async def _fetch_from(self, first_uid: int, uidvalidity: int) -> list[RawMessage]:
        """Every message with UID >= ``first_uid`` ("n:*" also matches the highest message when n
        is above it: filtered out)."""
        found = [
            RawMessage(
                uid=message.uid,
                data=message.body,
                internal_date=message.internal_date,
                size=message.size,
                key=f"{uidvalidity}/{message.uid}",
                position=Checkpoint(uidvalidity, message.uid),
            )
            for message in await self._client.uid_fetch(f"{first_uid}:*")
            if message.body is not None and message.uid >= first_uid
        ]
        return sorted(found, key=lambda m: m.uid)

    async def aclose(self) -> None:
        await self._client.close(timeout=self._close_timeout)


__all__ = ["DEFAULT_IDLE_RENEW_SECONDS", "SYNCED_KEYWORD", "ImapReader", "ImapSettings", "ImapSource"]
