"""The primary's side: one supervised task tree per mailbox, each in its own cancel scope.

```
MailboxManager.run              reconciles running supervisors with the store's registry
  supervise(mailbox)            own cancel scope; reconnects with capped backoff + jitter
    source.listen(folder) xN    one live subscription per folder (IMAP: IDLE)
```
A failing mailbox only ever affects its own scope.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import trio

from emlisten.abc import MailSource, Sink, Store, TaskQueue
from emlisten.config import Settings
from emlisten.errors import DeliveryError, MailAuthError, MailSourceError
from emlisten.models import (
    Checkpoint,
    FolderInfo,
    MailboxConfig,
    MailboxState,
    MailboxStatus,
    SyncTask,
)
from emlisten.service.backoff import Retry

log = logging.getLogger(__name__)

#: A session that stayed up this long counts as healthy: the next failure starts backoff afresh.
_HEALTHY_AFTER_SECONDS = 60.0


@dataclass(slots=True)
class _Running:
    config: MailboxConfig
    scope: trio.CancelScope


class MailboxManager:
    """Runs one supervisor per registered mailbox (single node: all of them)."""

    def __init__(
        self, settings: Settings, store: Store, queue: TaskQueue, source: MailSource, sink: Sink
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.source = source
        self.sink = sink
        self._running: dict[str, _Running] = {}
        self._nursery: trio.Nursery | None = None
        self._connect_slots = trio.Semaphore(settings.max_concurrent_connects)

    @property
    def running_count(self) -> int:
        return len(self._running)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.store.changes() as changes, trio.open_nursery() as nursery:
            self._nursery = nursery
            # Subscribed to changes before reading the registry, so nothing falls in between.
            for mailbox_id in await self.store.list_mailbox_ids():
                await self.reconcile(mailbox_id)
            log.info("listening to %d registered mailboxes", len(self._running))
            task_status.started()
            async for mailbox_id in changes:
                await self.reconcile(mailbox_id)

    async def reconcile(self, mailbox_id: str) -> None:
        """Make what runs for this mailbox match the store: start, restart or stop."""

        assert self._nursery is not None
        mailbox = await self.store.get_mailbox(mailbox_id)
        running = self._running.get(mailbox_id)
        if running is not None:
            if mailbox is not None and mailbox == running.config:
                return
            running.scope.cancel()
            del self._running[mailbox_id]
            log.info("stopped listening" if mailbox is None else "restarting", extra={"mailbox": mailbox_id})
        if mailbox is not None:
            scope = trio.CancelScope()
            self._running[mailbox_id] = _Running(mailbox, scope)
            self._nursery.start_soon(self._supervise_in_scope, mailbox, scope, name=f"mailbox:{mailbox_id}")

    async def _supervise_in_scope(self, mailbox: MailboxConfig, scope: trio.CancelScope) -> None:
        with scope:
            await MailboxSupervisor(self, mailbox).run()
        running = self._running.get(mailbox.id)
        if running is not None and running.scope is scope:
            del self._running[mailbox.id]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _most_significant(exc: BaseException) -> BaseException:
    """The error that decides what to do when several folder sessions failed together:
    an authentication failure wins over a connection failure, which wins over anything else."""

    leaves = _leaves(exc)
    for kind in (MailAuthError, MailSourceError):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0]


class MailboxSupervisor:
    """Keeps one mailbox listening: connect, listen to every folder, report state, reconnect."""

    def __init__(self, manager: MailboxManager, mailbox: MailboxConfig) -> None:
        self.m = manager
        self.mailbox = mailbox
        self.reported_unavailable = False
        self.delivered = 0

    async def _set_state(self, state: MailboxState, error: str | None = None) -> None:
        current = (await self.m.store.get_statuses([self.mailbox.id])).get(self.mailbox.id)
        status = MailboxStatus(
            state,
            last_error=error,
            updated_at=time.time(),
            delivered=current.delivered if current else 0,
            node=self.m.settings.node_id,
        )
        await self.m.store.set_status(self.mailbox.id, status)

    async def run(self) -> None:
        settings = self.m.settings
        mailbox_id = self.mailbox.id
        connect_retry = Retry(settings.reconnect_backoff)
        auth_retry = Retry(settings.auth_backoff)
        # A restart (e.g. /update with a new password) inherits "Creatio was told it is broken",
        # so that the recovery is reported too.
        previous = (await self.m.store.get_statuses([mailbox_id])).get(mailbox_id)
        self.reported_unavailable = (
            previous is not None and previous.state is MailboxState.AUTHENTICATION_ERROR
        )
        while True:
            await self._set_state(MailboxState.CONNECTING)
            started_at = math.inf
            try:
                async with trio.open_nursery() as nursery:
                    async with self.m._connect_slots:
                        for folder in self.mailbox.folders:
                            info: FolderInfo = await nursery.start(self._listen_folder, folder)
                            log.debug(
                                "folder live",
                                extra={"mailbox": mailbox_id, "folder": folder, "uidnext": info.uidnext},
                            )
                    started_at = trio.current_time()
                    await self._set_state(MailboxState.LISTENING)
                    log.info("listening", extra={"mailbox": mailbox_id, "folders": len(self.mailbox.folders)})
                    auth_retry.reset()
                    if self.reported_unavailable:
                        await self._report(available=True)
                # Listeners only return when the server ended the session cleanly; reconnect.
                delay = connect_retry.next_delay()
            except Exception as group:  # classified below; never escapes the supervisor
                exc = _most_significant(group)
                if isinstance(exc, MailAuthError):
                    await self._set_state(MailboxState.AUTHENTICATION_ERROR, str(exc))
                    delay = auth_retry.next_delay()
                    log.warning(
                        "authentication failed, retrying in %.0fs: %s",
                        delay,
                        exc,
                        extra={"mailbox": mailbox_id},
                    )
                    if not self.reported_unavailable:
                        await self._report(
                            available=False, error_class="AuthenticationException", message=str(exc)
                        )
                elif isinstance(exc, MailSourceError):
                    if trio.current_time() - started_at > _HEALTHY_AFTER_SECONDS:
                        connect_retry.reset()
                    await self._set_state(MailboxState.CONNECT_ERROR, str(exc))
                    delay = (auth_retry if exc.retry_slowly else connect_retry).next_delay()
                    log.warning(
                        "connection lost, reconnecting in %.1fs: %s",
                        delay,
                        exc,
                        extra={"mailbox": mailbox_id},
                    )
                else:
                    # A bug must not take down the other mailboxes: log it, back off, try again.
                    log.error("listener failed unexpectedly", exc_info=exc, extra={"mailbox": mailbox_id})
                    await self._set_state(MailboxState.CONNECT_ERROR, f"internal error: {type(exc).__name__}")
                    delay = connect_retry.next_delay()
            await trio.sleep(delay)

    async def _listen_folder(
        self, folder: str, *, task_status: trio.TaskStatus[FolderInfo] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self.m.source.listen(self.mailbox, folder, self._on_new_mail, task_status=task_status)

    async def _on_new_mail(self, task: SyncTask) -> None:
        if task.reason == "catch-up":
            # First contact with this folder: a new subscription starts at the current UIDNEXT
            # (history is loaded through /api/email/synchronize), so seed the checkpoint.
            await self.m.store.seed_checkpoint(
                task.mailbox_id, task.folder, Checkpoint(task.uidvalidity, task.uid_hint)
            )
        await self.m.queue.publish(task)

    async def _report(self, *, available: bool, error_class: str = "", message: str = "") -> None:
        try:
            with trio.fail_after(30):
                await self.m.sink.report_state(
                    self.mailbox, available=available, error_class=error_class, message=message
                )
        except (DeliveryError, trio.TooSlowError) as exc:
            log.warning(
                "could not report mailbox state to Creatio: %s", exc, extra={"mailbox": self.mailbox.id}
            )
            return
        self.reported_unavailable = not available
