"""One MailSource in front of several: each mailbox goes to the source of its protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import trio

from emlisten.abc import MailReader, MailSource, NewMailCallback, Prefetch
from emlisten.errors import MailSourceError
from emlisten.models import FolderInfo, MailboxConfig


class UnsupportedProtocolError(MailSourceError):
    """No source is configured for the mailbox's protocol."""

    retry_slowly = True


class RoutingSource(MailSource):
    def __init__(self, sources: Mapping[str, MailSource]) -> None:
        self.sources = dict(sources)

    def source_for(self, mailbox: MailboxConfig) -> MailSource:
        try:
            return self.sources[mailbox.protocol]
        except KeyError:
            raise UnsupportedProtocolError(
                f"no mail source for protocol {mailbox.protocol!r} (have: {', '.join(sorted(self.sources))})"
            ) from None

    async def listen(
        self,
        mailbox: MailboxConfig,
        folder: str,
        on_new_mail: NewMailCallback,
        *,
        prefetch: Prefetch | None = None,
        task_status: trio.TaskStatus[FolderInfo] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await self.source_for(mailbox).listen(
            mailbox, folder, on_new_mail, prefetch=prefetch, task_status=task_status
        )

    @asynccontextmanager
    async def open_reader(self, mailbox: MailboxConfig) -> AsyncIterator[MailReader]:
        async with self.source_for(mailbox).open_reader(mailbox) as reader:
            yield reader
