"""The IMAP ``MailSource``: IDLE listeners and message readers on emlisten's own client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from emlisten.abc import MailReader, MailSource, NewMailCallback
from emlisten.errors import MailAuthError, MailProtocolError
from emlisten.mail.imap._client import ImapClient
from emlisten.mail.imap._parser import Response
from emlisten.models import FolderInfo, MailboxConfig, RawMessage, SyncTask

#: RFC 2177: servers may drop an IDLE after 30 minutes without a client command.
DEFAULT_IDLE_RENEW_SECONDS = 25 * 60
#: UIDs per UID FETCH command (keeps command lines and responses reasonably sized).
FETCH_BATCH = 200


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

    async def connect(self, mailbox: MailboxConfig) -> ImapClient:
        """A connected, authenticated client for ``mailbox`` (closed again on failure)."""
        settings = self.settings
        client = ImapClient(
            mailbox.imap,
            connect_timeout=settings.connect_timeout,
            command_timeout=settings.command_timeout,
            ca_file=self.ca_file,
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
        # XOAUTH2/OAUTHBEARER: ImapClient.authenticate() is ready; token refresh is not yet.
        raise MailAuthError("OAuth authentication for IMAP is not supported yet")
    if client.has_capability("AUTH=PLAIN") and not client.has_capability("LOGINDISABLED"):
        await client.authenticate_plain(mailbox.user_name, mailbox.password)
    else:
        await client.login(mailbox.user_name, mailbox.password)


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
    """A ``MailReader`` over one authenticated client (folders are opened read-only)."""

    __slots__ = ("_client", "_close_timeout", "_selected")

    def __init__(self, client: ImapClient, *, close_timeout: float = 5.0) -> None:
        self._client = client
        self._close_timeout = close_timeout
        self._selected: FolderInfo | None = None

    @property
    def client(self) -> ImapClient:
        return self._client

    async def select(self, folder: str) -> FolderInfo:
        self._selected = await self._client.examine(folder)
        return self._selected

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
                found[message.uid] = RawMessage(
                    uid=message.uid,
                    data=message.body,
                    internal_date=message.internal_date,
                    size=message.size,
                )
        return [found[uid] for uid in wanted if uid in found]

    async def aclose(self) -> None:
        await self._client.close(timeout=self._close_timeout)


__all__ = ["DEFAULT_IDLE_RENEW_SECONDS", "ImapReader", "ImapSettings", "ImapSource"]

