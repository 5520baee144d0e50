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

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from emlisten.abc import MailReader, MailSource, NewMailCallback
from emlisten.errors import MailAuthError, MailProtocolError, MailTokenRejectedError
from emlisten.mail.imap._client import ImapClient
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


@dataclass(frozen=True, slots=True)
class ImapSettings:
    """Timing of IMAP sessions (seconds)."""

    #: Re-issue IDLE this often (RFC 2177 says before 29 minutes).
    idle_renew_seconds: float = DEFAULT_IDLE_RENEW_SECONDS
    #: No server traffic for this long while idling: probe with DONE + NOOP.
    keepalive_seconds: float = 5 * 60
    #: How long the probe may take before the connection is declared dead.
    keepalive_timeout: float = 30.0
    #: NOOP interval for servers without IDLE.
    poll_seconds: float = 30.0
    connect_timeout: float = 30.0
    command_timeout: float = 60.0
    #: LOGOUT/DONE on shutdown; shielded, so keep it short.
    close_timeout: float = 5.0


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
        )
        self.ca_file = ca_file
        #: Sent with ID (RFC 2971) when the server supports it; None disables ID.
        self.client_id = client_id
        #: Told (command, outcome) after every IMAP command of every session (metrics).
        self.command_observer: Callable[[str, str], None] | None = None

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
        task_status: trio.TaskStatus[FolderInfo] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        client = await self.connect(mailbox)
        try:
            info = await client.examine(folder)
            listener = _Listener(client, mailbox.id, info, on_new_mail, self.settings)
            # Mail that arrived while we were away: queued before we report "started".
            await on_new_mail(
                SyncTask(
                    mailbox_id=mailbox.id,
                    folder=folder,
                    uidvalidity=info.uidvalidity,
                    uid_hint=max(info.uidnext - 1, 0),
                    reason="catch-up",
                )
            )
            if client.has_capability("IDLE"):
                await listener.idle_forever(task_status)
            else:
                await listener.poll_forever(task_status)
        finally:
            # DONE + LOGOUT when the connection is still healthy; shielded, bounded.
            await client.close(timeout=self.settings.close_timeout)

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


class _Listener:
    """Turns the untagged responses of one selected folder into SyncTasks."""

    __slots__ = ("client", "exists", "info", "mailbox_id", "on_new_mail", "settings")

    def __init__(
        self,
        client: ImapClient,
        mailbox_id: str,
        info: FolderInfo,
        on_new_mail: NewMailCallback,
        settings: ImapSettings,
    ) -> None:
        self.client = client
        self.mailbox_id = mailbox_id
        self.info = info
        self.exists = info.exists
        self.on_new_mail = on_new_mail
        self.settings = settings

    async def handle(self, responses: Sequence[Response]) -> None:
        grew = False
        for response in responses:
            if response.type == "EXISTS" and response.number is not None:
                if response.number > self.exists:
                    grew = True
                self.exists = response.number
            elif response.type == "EXPUNGE":
                self.exists = max(self.exists - 1, 0)
        if grew:
            await self.on_new_mail(
                SyncTask(
                    mailbox_id=self.mailbox_id,
                    folder=self.info.name,
                    uidvalidity=self.info.uidvalidity,
                    uid_hint=0,
                    reason="exists",
                )
            )

    async def idle_forever(self, task_status: trio.TaskStatus[FolderInfo]) -> None:
        client = self.client
        settings = self.settings
        started = False
        while True:
            initial = await client.idle_start()
            if not started:
                task_status.started(self.info)
                started = True
            await self.handle(initial)
            now = trio.current_time()
            renew_at = now + settings.idle_renew_seconds
            quiet_until = now + settings.keepalive_seconds
            probe = False
            while True:
                now = trio.current_time()
                if now >= renew_at:
                    break
                if now >= quiet_until:
                    probe = True
                    break
                response = await client.idle_wait(min(renew_at, quiet_until) - now)
                if response is not None:
                    quiet_until = trio.current_time() + settings.keepalive_seconds
                    await self.handle((response,))
            # DONE doubles as a liveness probe: a dead peer never sends the tagged OK.
            timeout = settings.keepalive_timeout if probe else settings.command_timeout
            await self.handle(await client.idle_done(timeout=timeout))
            if probe:
                await self.handle(await client.noop(timeout=settings.keepalive_timeout))

    async def poll_forever(self, task_status: trio.TaskStatus[FolderInfo]) -> None:
        task_status.started(self.info)
        while True:
            await trio.sleep(self.settings.poll_seconds)
            await self.handle(await self.client.noop())


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
