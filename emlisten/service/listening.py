"""The primary's side: one supervised task tree per mailbox, each in its own cancel scope.

```
MailboxManager.run              reconciles running supervisors with the store's registry
  supervise(mailbox)            own cancel scope; reconnects with capped backoff + jitter
    source.listen(folder) xN    one live subscription per folder (IMAP: IDLE)
```
A failing mailbox only ever affects its own scope.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import trio

from emlisten import __version__
from emlisten.abc import RESYNC, MailSource, Prefetch, Sink, Store, TaskQueue
from emlisten.config import Backoff, Role, Settings
from emlisten.errors import (
    DeliveryError,
    MailAuthError,
    MailConnectError,
    MailSourceError,
    MailTokenRejectedError,
    QueueError,
    StoreError,
)
from emlisten.metrics import Metrics
from emlisten.models import (
    Checkpoint,
    FolderInfo,
    MailboxConfig,
    MailboxState,
    MailboxStatus,
    NodeInfo,
    SyncTask,
)
from emlisten.service.backoff import Retry
from emlisten.service.batching import StoreBatcher
from emlisten.service.pacing import ConnectPacer

log = logging.getLogger(__name__)

#: Waits between attempts to queue new mail the queue refused (jittered, doubling).
_QUEUE_RETRY = Backoff(0.5, 30.0)

#: A session that stayed up this long counts as healthy: the next failure starts backoff afresh.
_HEALTHY_AFTER_SECONDS = 60.0
#: Mailboxes per read when the checkpoints of this node's mailboxes are re-read (about 12 ms of
#: the event loop each with Redis).
_CHECKPOINT_REFRESH_CHUNK = 1000
#: A renewal deadline noticed later than this (in lease TTLs) fell while the process was not
#: running, not while the store was silent (see MailboxManager._renew_loop).
_LATE_DEADLINE_TTLS = 0.1
#: How long the sync of a restored folder may wait for the queue (see _sync_restored).
_RESTORED_SYNC_PUBLISH_SECONDS = 5.0
#: How long after it first sees a new incarnation a primary restores: every worker looks at the
#: incarnation each second (DeliveryWorker) and puts back the checkpoints it wrote, newer than
#: the ones a primary knows; a restored folder synced before that would repeat the mail between.
RESTORE_DELAY_SECONDS = 2.0


@dataclass(slots=True)
class _Running:
    config: MailboxConfig
    scope: trio.CancelScope


class MailboxManager:
    """Listens to the mailboxes this node owns, and decides which those are.

    Ownership: every node heartbeats; each mailbox has a lease with a TTL held by one node.
    A node claims free leases up to its fair share (mailboxes / live primaries, capped by
    ``max_mailboxes``), renews its leases in one batch per tick, releases surplus when nodes
    join, and takes over leases that expired when a node died. A node that cannot renew stops
    its mailboxes before its leases can expire, so no mailbox is listened to twice for longer
    than one lease TTL. With one node and the in-memory store this degenerates to "all".
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        queue: TaskQueue,
        source: MailSource,
        sink: Sink,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.source = source
        self.sink = sink
        self.metrics = metrics or Metrics()
        #: The store calls every supervisor makes as it starts, gathered into bulk calls.
        self.batched = StoreBatcher(store)
        #: State of each mailbox this node runs, for metrics (the store has everyone's).
        self.local_states: dict[str, str] = {}
        self._running: dict[str, _Running] = {}
        self._owned: set[str] = set()
        self._target = 0
        self._renewed_at = -math.inf
        self._started_at = time.time()
        self._nursery: trio.Nursery | None = None
        self.pacer = ConnectPacer(
            max_concurrent=settings.max_concurrent_connects, max_per_second=settings.max_connects_per_second
        )
        #: The store's data set as this node first saw it (Store.incarnation): another one means
        #: the store lost its data (Redis restarted empty), not that mailboxes were closed.
        self._incarnation: str | None = None
        self._incarnation_lock = trio.Lock()
        #: The newest checkpoint this process read or seeded per mailbox and folder, for the
        #: restore after a store lost its data. Older than the store's (workers advance it
        #: unseen): restoring it repeats mail (same Email.Id), never skips any.
        self.known_checkpoints: dict[str, dict[str, Checkpoint]] = {}
        #: Until then no surplus is released (trio time): after a restore, the registry fills up
        #: as the other primaries restore theirs, and a share computed meanwhile is too small.
        self._keep_surplus_until = -math.inf
        #: The mailboxes (and their known checkpoints) this node stopped when it lost contact with
        #: the store: if the store comes back without its data, they are restored too. Dropped
        #: when it comes back with it (balancing takes them back then).
        self._stopped_for_outage: dict[str, tuple[MailboxConfig, dict[str, Checkpoint]]] = {}

    def prefetch_for(self, mailbox: MailboxConfig) -> Prefetch | None:
        """Fetch small new mail on the listening session and carry it in the task, whatever the
        role: in one process it saves the second session, across nodes it spares the worker
        its own login and SELECT for each mailbox of a backlog."""
        settings = self.settings
        if settings.prefetch_max_bytes <= 0:
            return None
        mailbox_id = mailbox.id

        async def checkpoint(folder: str) -> Checkpoint | None:
            found = await self.batched.get_checkpoint((mailbox_id, folder))
            self.remember_checkpoint(mailbox_id, folder, found)
            return found

        return Prefetch(
            max_message_bytes=settings.prefetch_max_bytes,
            max_messages=settings.batch_max_count,
            checkpoint=checkpoint,
        )

    def remember_checkpoint(self, mailbox_id: str, folder: str, checkpoint: Checkpoint | None) -> None:
        """Keep the newest checkpoint seen for a folder of a mailbox this node runs."""
        if checkpoint is None or mailbox_id not in self._running:
            return
        folders = self.known_checkpoints.setdefault(mailbox_id, {})
        known = folders.get(folder)
        if (
            known is None
            or known.uidvalidity != checkpoint.uidvalidity
            or known.last_uid <= checkpoint.last_uid
        ):
            folders[folder] = checkpoint

    @property
    def running_count(self) -> int:
        return len(self._running)

    @property
    def owned(self) -> frozenset[str]:
        return frozenset(self._owned)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                retry = Retry(self.settings.reconnect_backoff)
                started = False
                while True:
                    try:
                        # Subscribed before claiming or re-reading, so nothing falls in between.
                        async with self.store.changes() as feed:
                            if not started:
                                await self._renew()
                                await self._balance()
                                log.info("owning %d mailbox(es)", len(self._owned))
                                task_status.started()
                                nursery.start_soon(self._renew_loop)
                                nursery.start_soon(self._balance_loop)
                                nursery.start_soon(self._checkpoint_refresh_loop)
                                started = True
                            else:
                                await self._resync()  # what changed while the feed was down
                                log.info("change feed restored")
                            retry.reset()
                            async for mailbox_id in feed:
                                await self._on_change(mailbox_id)
                    except StoreError as exc:
                        if not started:
                            raise  # the store is unreachable at start-up: exit with the cause
                        # A store outage must not end the process: the leases decide whether
                        # we may keep listening (see _renew_loop); the feed is re-established.
                        log.warning("change feed lost, re-subscribing: %s", exc)
                    await trio.sleep(retry.next_delay())
        finally:
            await self._withdraw()

    async def _renew_loop(self) -> None:
        """Renewal has a task of its own and does nothing else, so that claiming and starting
        hundreds of mailboxes can never delay it past the lease TTL.

        This node steps back 0.8 TTL after the start of its last renewal that succeeded, and at
        that moment, not later: an attempt still waiting for the store then is given up (a store
        that stops answering holds a call up to its command timeout), and after a failed attempt
        the next one is due no later than that moment. After a pause past the TTL the moment is
        gone before the renewal could run: that renewal runs unbounded, as it may re-take the
        leases nobody took. A pause that falls in an attempt shows as its deadline noticed late:
        the store then gets one more attempt rather than the blame.

        With a store no other node uses (``Store.shared`` false) there is no moment to step
        back: nobody can take the leases, and a renewal that ends late is this process's own
        loop running behind (a 10,000-mailbox node woken from a pause, on a slow day, took over
        4 s for one), where stepping back would close every session only to open them again."""
        ttl, period = self.settings.lease_ttl_seconds, self.settings.lease_renew_seconds
        failing = False
        while True:
            step_back_at = self._renewed_at + ttl * 0.8 if self.store.shared else math.inf
            now = trio.current_time()
            await trio.sleep_until(
                min(now + period, step_back_at) if failing and step_back_at > now else now + period
            )
            now = trio.current_time()
            if failing and now >= step_back_at:
                self._step_back()
            error, timed_out = await self._attempt_renewal(step_back_at if now < step_back_at else math.inf)
            if timed_out and trio.current_time() - step_back_at > ttl * _LATE_DEADLINE_TTLS:
                # The moment to step back fell while this process was not running (frozen, or
                # its event loop held): the store was not watched for the whole budget and may
                # well have answered. One more attempt with a fresh budget decides.
                error, _ = await self._attempt_renewal(trio.current_time() + ttl * 0.8)
            failing = error is not None
            if error is not None:
                log.warning("cannot renew leases: %s", error)
                if trio.current_time() >= step_back_at:
                    self._step_back()

    async def _attempt_renewal(self, deadline: float) -> tuple[str | None, bool]:
        """Renew by ``deadline`` (trio time): what went wrong (None if nothing), and whether
        it was the deadline."""
        with trio.move_on_at(deadline) as attempt:
            try:
                await self._renew()
            except StoreError as exc:
                return str(exc), False
        if attempt.cancelled_caught:
            budget = self.settings.lease_ttl_seconds * 0.8
            return f"no answer from the store within {budget:g} s of the last renewal", True
        return None, False

    def _step_back(self) -> None:
        """Our leases may expire any moment and another node take over: stop every mailbox."""
        if not self._owned:
            return
        log.error("lost contact with the store: stopping all mailboxes of this node")
        for mailbox_id in self._owned:
            if (running := self._running.get(mailbox_id)) is not None:
                known = dict(self.known_checkpoints.get(mailbox_id, {}))
                self._stopped_for_outage[mailbox_id] = (running.config, known)
        self._stop(list(self._owned))
        self._owned.clear()

    async def _balance_loop(self) -> None:
        while True:
            await trio.sleep(self.settings.lease_renew_seconds)
            if trio.current_time() - self._renewed_at >= self.settings.lease_ttl_seconds * 0.8:
                # Renewal is overdue (this node was paused, or the store is unreachable): what we
                # own is unknown until it runs, so balancing now could release the wrong leases.
                continue
            try:
                await self._balance()
            except StoreError as exc:
                log.warning("cannot rebalance mailboxes: %s", exc)

    async def _checkpoint_refresh_loop(self) -> None:
        """Re-read the checkpoints of the mailboxes this node runs now and then: workers move
        them on unseen by this node, and a restore after the store lost its data repeats the
        mail delivered after the checkpoint it restores. Also covers mailboxes whose session is
        down (it read none)."""
        period = self.settings.checkpoint_refresh_seconds
        if period <= 0 or not self.store.remote:
            # An in-process store's data lives and dies with this process: there is never a
            # restore to feed, and re-reading 10,000 checkpoints was 4 % of an idle node's CPU.
            return
        while True:
            await trio.sleep(period)
            try:
                await self._refresh_known_checkpoints()
            except StoreError as exc:
                log.debug("could not re-read checkpoints: %s", exc)  # the renewal says it louder

    async def _refresh_known_checkpoints(self) -> None:
        ids = sorted(self._running)
        found: dict[str, dict[str, Checkpoint]] = {}
        for start in range(0, len(ids), _CHECKPOINT_REFRESH_CHUNK):
            found.update(await self.store.get_checkpoints_of(ids[start : start + _CHECKPOINT_REFRESH_CHUNK]))
            # The in-memory store answers without waiting: let the mailboxes' mail through
            # between chunks (10,000 mailboxes in one step held the event loop 50-300 ms).
            await trio.lowlevel.checkpoint()
        # The identity is read after the checkpoints: still the data set this node knows, so are
        # they (a store that lost its data has a new one from the first look after the loss on).
        if self._incarnation is None or await self.store.incarnation() != self._incarnation:
            return
        for index, (mailbox_id, folders) in enumerate(found.items(), 1):
            for folder, checkpoint in folders.items():
                self.remember_checkpoint(mailbox_id, folder, checkpoint)
            if index % _CHECKPOINT_REFRESH_CHUNK == 0:
                await trio.lowlevel.checkpoint()
        self.metrics.checkpoint_refreshes.inc()

    def _node_info(self) -> NodeInfo:
        return NodeInfo(
            id=self.settings.node_id,
            role=self.settings.role.value,
            mailboxes=len(self._owned),
            seen_at=time.time(),
            started_at=self._started_at,
            version=__version__,
        )

    async def _renew(self) -> None:
        """Heartbeat and renew every lease we hold, in two batched calls. Renewing re-takes the
        leases that expired with nobody taking them (this node was paused past the TTL), so only
        a lease another node holds is lost, and the sessions of the others are left alone."""

        node_id, ttl = self.settings.node_id, self.settings.lease_ttl_seconds
        started = trio.current_time()
        held = set(self._owned)
        if held:
            kept = set(await self.store.renew_leases(node_id, list(held), ttl))
            # Only what we asked about and still own can be lost; claims made meanwhile stay.
            lost = (held - kept) & self._owned
            if lost:
                log.warning("lost %d lease(s) to other nodes", len(lost))
                self._stop(lost)
                self._owned -= lost
            # Given up while the renewal was in flight: if Redis ran the release first, the
            # renewal re-took the lease; free it again rather than block it for a TTL.
            stale = kept - self._owned
            if stale:
                await self.store.release_leases(node_id, sorted(stale))
        await self.store.heartbeat(self._node_info(), ttl)
        self._renewed_at = started

    async def _balance(self) -> None:
        """Claim free mailboxes up to the fair share, or release the surplus."""

        settings = self.settings
        node_id, ttl = settings.node_id, settings.lease_ttl_seconds
        await self._restore_if_store_lost()
        primaries = [n for n in await self.store.list_nodes() if Role(n.role).listens]
        node_count = max(1, len(primaries) + (0 if any(n.id == node_id for n in primaries) else 1))
        all_ids = await self.store.list_mailbox_ids()
        gone = self._owned - set(all_ids)
        # Checked again after the read: a wipe just before it must not read as "closed".
        if gone and await self._restore_if_store_lost():
            all_ids = await self.store.list_mailbox_ids()
            gone = self._owned - set(all_ids)
        if gone:
            await self._give_up(gone)
        self._target = math.ceil(len(all_ids) / node_count)
        if settings.max_mailboxes:
            self._target = min(self._target, settings.max_mailboxes)

        if len(self._owned) < self._target:
            owners = await self.store.lease_owners(all_ids)
            free = [mid for mid, owner in owners.items() if owner is None]
            random.shuffle(free)  # nodes claiming at once rarely collide
            wanted = free[: self._target - len(self._owned)]
            if wanted:
                claimed = await self.store.claim_leases(node_id, wanted, ttl)
                self._owned.update(claimed)
                await self._start_claimed(claimed)
        elif len(self._owned) > self._target and trio.current_time() >= self._keep_surplus_until:
            surplus = sorted(self._owned)[: len(self._owned) - self._target]
            log.info("releasing %d mailbox(es) to other nodes", len(surplus))
            await self._give_up(surplus)

    async def _resync(self) -> None:
        """Many mailboxes changed at once (a bulk create or recreate): restart the owned ones whose
        configuration changed, stop the removed ones, then claim our share of the new ones."""

        await self._restore_if_store_lost()
        configs = await self.store.get_mailboxes(sorted(self._owned))
        if len(configs) < len(self._owned) and await self._restore_if_store_lost():
            configs = await self.store.get_mailboxes(sorted(self._owned))
        for mailbox_id in list(self._owned):
            config = configs.get(mailbox_id)
            running = self._running.get(mailbox_id)
            if config is None:
                await self._give_up([mailbox_id])
            elif running is not None and running.config != config:
                running.scope.cancel()
                del self._running[mailbox_id]
        for mailbox_id, config in configs.items():
            if mailbox_id in self._owned and mailbox_id not in self._running:
                self._start(config)  # configs already read: no second round trip
        await self._balance()

    async def _restore_if_store_lost(self) -> bool:
        """When the store holds another data set than the one this node started with (Redis
        restarted empty), register again the mailboxes this node runs, with the newest
        checkpoints it knows, instead of giving them up and waiting for Creatio's failover job
        (every minute) to re-create them. True when it restored.

        The sessions keep running. Every node does this for its own mailboxes at once: the
        store registers only what is absent and moves checkpoints only forward, so what another
        node, the API or a worker (which puts back the checkpoints it wrote) wrote meanwhile
        stays. It waits ``RESTORE_DELAY_SECONDS`` first, so that the workers' come first."""

        seen_before = self._incarnation
        async with self._incarnation_lock:
            current = await self.store.incarnation()
            if self._incarnation is None or current == self._incarnation:
                self._incarnation = current
                self._stopped_for_outage.clear()  # the store kept its data
                # Restored by another caller while this one waited for the lock: the caller's
                # reads from before are stale all the same.
                return seen_before is not None and current != seen_before
            current = await self._wait_for_workers(current)
            running = [running.config for running in self._running.values()]
            checkpoints = {config.id: dict(self.known_checkpoints.get(config.id, {})) for config in running}
            # Redis restarted empty is first an outage: past 0.8 lease TTL this node stopped
            # everything (see _renew_loop). Those mailboxes are this node's to restore as well.
            stopped = {
                mailbox_id: entry
                for mailbox_id, entry in self._stopped_for_outage.items()
                if mailbox_id not in checkpoints
            }
            for mailbox_id, (config, known) in stopped.items():
                running.append(config)
                checkpoints[mailbox_id] = known
            log.warning(
                "the store lost its data (new incarnation): restoring %d mailbox(es) this node runs "
                "(%d of them stopped while the store was unreachable)",
                len(running),
                len(stopped),
            )
            # A folder whose checkpoint this process never read (its session never got up) would
            # start at the server's current position, and a mailbox the store knows is one
            # Creatio's failover job leaves alone: the mail that arrived meanwhile would be lost.
            # Those mailboxes are given up as before: the job re-creates them and loads their
            # history.
            unknown = [config.id for config in running if set(config.folders) - set(checkpoints[config.id])]
            if unknown:
                log.warning(
                    "no checkpoint known for every folder of %d mailbox(es) (%s%s): left to Creatio's "
                    "failover job, which re-creates them and loads their history",
                    len(unknown),
                    ", ".join(unknown[:5]),
                    ", ..." if len(unknown) > 5 else "",
                )
            left = set(unknown)
            candidates = {config.id: config for config in running if config.id not in left}
            # The leases first: once a mailbox is registered again, other nodes may claim it. A
            # lease another node holds means that node runs the mailbox (our renewal stops ours).
            settings = self.settings
            held = await self.store.claim_leases(
                settings.node_id, sorted(candidates), settings.lease_ttl_seconds
            )
            restoring = [candidates[mailbox_id] for mailbox_id in held]
            restored = await self.store.restore_mailboxes(restoring, checkpoints)
            for config in restoring:
                if config.id in stopped:
                    self._owned.add(config.id)
                    if config.id not in self._running:
                        self._start(config)  # a new session: its catch-up starts at the checkpoint
            await self._record_restored_states(restored)
            self.metrics.restored_mailboxes.inc(len(restored))
            self._incarnation = current
            self._stopped_for_outage.clear()
            # Every primary sees the change within a renewal period and restores in one step.
            self._keep_surplus_until = trio.current_time() + 2 * settings.lease_ttl_seconds
            log.info(
                "restored %d mailbox(es) (%d already registered again by others)",
                len(restored),
                len(restoring) - len(restored),
            )
        await self._sync_restored(restoring, checkpoints)
        return True

    async def _wait_for_workers(self, current: str) -> str:
        """Give the workers ``RESTORE_DELAY_SECONDS`` from the moment this node first saw the new
        incarnation to put back their checkpoints before it restores (the mailboxes stay
        unregistered meanwhile: workers drop their tasks, the restore queues a sync per folder).
        Returns the incarnation to restore into (a second loss meanwhile restarts the wait)."""
        while True:
            await trio.sleep(RESTORE_DELAY_SECONDS)
            latest = await self.store.incarnation()
            if latest == current:
                return current
            current = latest

    async def _record_restored_states(self, mailbox_ids: Sequence[str]) -> None:
        """The states went with the data: write what the sessions are in now (for the API)."""
        now = time.time()
        statuses = {
            mailbox_id: MailboxStatus(MailboxState(state), updated_at=now, node=self.settings.node_id)
            for mailbox_id in mailbox_ids
            if (state := self.local_states.get(mailbox_id)) is not None
        }
        if statuses:
            await self.store.set_statuses(statuses)

    async def _sync_restored(
        self, mailboxes: Sequence[MailboxConfig], checkpoints: Mapping[str, Mapping[str, Checkpoint]]
    ) -> None:
        """One sync per restored folder: workers skipped the tasks of the mailboxes the store did
        not know, so the mail after the restored checkpoint is delivered now, not with the
        folder's next mail."""
        failed = 0
        for config in mailboxes:
            for folder in config.folders:
                known = checkpoints.get(config.id, {}).get(folder)
                task = SyncTask(config.id, folder, known.uidvalidity if known else 0, 0, reason="restored")
                try:
                    with trio.fail_after(_RESTORED_SYNC_PUBLISH_SECONDS):
                        await self.queue.publish(task)
                except (QueueError, trio.TooSlowError):
                    failed += 1
        if failed:
            # Not lost: the folder's next mail, or the next reconnect's catch-up, syncs it.
            log.warning("could not queue the sync of %d restored folder(s)", failed)

    async def _start_claimed(self, mailbox_ids: Sequence[str]) -> None:
        """Start supervisors for newly claimed mailboxes, reading their configs in one call."""

        configs = await self.store.get_mailboxes(mailbox_ids)
        for mailbox_id in mailbox_ids:
            mailbox = configs.get(mailbox_id)
            if mailbox is not None and mailbox_id in self._owned and mailbox_id not in self._running:
                self._start(mailbox)

    async def _on_change(self, mailbox_id: str) -> None:
        """A mailbox was created, changed or closed somewhere: react within the second."""

        if mailbox_id == RESYNC:
            await self._resync()
            return
        if mailbox_id in self._owned:
            if await self.store.get_mailbox(mailbox_id) is None and not (
                await self._restore_if_store_lost() and await self.store.get_mailbox(mailbox_id) is not None
            ):
                await self._give_up([mailbox_id])
            else:
                await self.reconcile(mailbox_id)
            return
        # A new mailbox: claim it if we are not above our share (+1, so that a burst of creates
        # is picked up at once; the next tick rebalances).
        if len(self._owned) <= self._target and await self.store.get_mailbox(mailbox_id) is not None:
            claimed = await self.store.claim_leases(
                self.settings.node_id, [mailbox_id], self.settings.lease_ttl_seconds
            )
            if claimed:
                self._owned.add(mailbox_id)
                self._target = max(self._target, len(self._owned))
                await self.reconcile(mailbox_id)

    async def _give_up(self, mailbox_ids: Iterable[str]) -> None:
        ids = list(mailbox_ids)
        self._stop(ids)
        self._owned.difference_update(ids)
        await self.store.release_leases(self.settings.node_id, ids)

    def _stop(self, mailbox_ids: Iterable[str]) -> None:
        for mailbox_id in mailbox_ids:
            running = self._running.pop(mailbox_id, None)
            if running is not None:
                running.scope.cancel()
                log.info("stopped listening", extra={"mailbox": mailbox_id})

    async def _withdraw(self) -> None:
        """Clean shutdown: hand our mailboxes over at once instead of after the lease TTL."""

        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await self.store.release_leases(self.settings.node_id, sorted(self._owned))
                await self.store.remove_node(self.settings.node_id)
            except StoreError as exc:
                log.warning("could not release leases on shutdown: %s", exc)
        self._owned.clear()

    async def reconcile(self, mailbox_id: str) -> None:
        """Make what runs for an owned mailbox match the store: start, restart or stop."""

        assert self._nursery is not None
        mailbox = await self.store.get_mailbox(mailbox_id)
        running = self._running.get(mailbox_id)
        if running is not None:
            if mailbox is not None and mailbox == running.config:
                return
            running.scope.cancel()
            del self._running[mailbox_id]
            log.info("stopped listening" if mailbox is None else "restarting", extra={"mailbox": mailbox_id})
        if mailbox is not None and mailbox_id in self._owned:
            self._start(mailbox)

    def _start(self, mailbox: MailboxConfig) -> None:
        """A supervisor for ``mailbox`` in a cancel scope of its own."""
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._running[mailbox.id] = _Running(mailbox, scope)
        self._nursery.start_soon(self._supervise_in_scope, mailbox, scope, name=f"mailbox:{mailbox.id}")

    async def _supervise_in_scope(self, mailbox: MailboxConfig, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await MailboxSupervisor(self, mailbox).run()
        finally:
            running = self._running.get(mailbox.id)
            if running is None or running.scope is scope:
                self._running.pop(mailbox.id, None)
                self.local_states.pop(mailbox.id, None)
                self.known_checkpoints.pop(mailbox.id, None)


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
        self.refresh_requested_at: float | None = None
        self._written: tuple[MailboxState, str | None] | None = None

    async def _set_state(self, state: MailboxState, error: str | None = None) -> None:
        # The same state again (a retry failing the same way): no write, so "since" stays the
        # time the mailbox entered the state, and the store is not written on every retry.
        if (state, error) == self._written:
            return
        self._written = (state, error)
        self.m.local_states[self.mailbox.id] = state.value
        self.m.metrics.activity.state_changed(self.mailbox.id, state.value, error)
        status = MailboxStatus(state, last_error=error, updated_at=time.time(), node=self.m.settings.node_id)
        try:
            await self.m.batched.set_status((self.mailbox.id, status))
        except StoreError as exc:
            # The status is for the API, not for the mail: a store outage must not end the
            # supervisor (the error would stop the whole node). Written at the next change.
            self._written = None
            log.warning(
                "could not record the state %s: %s", state.value, exc, extra={"mailbox": self.mailbox.id}
            )

    async def run(self) -> None:
        settings = self.m.settings
        mailbox_id = self.mailbox.id
        connect_retry = Retry(settings.reconnect_backoff)
        auth_retry = Retry(settings.auth_backoff)
        # A restart (e.g. /update with a new password) inherits "Creatio was told it is broken",
        # so that the recovery is reported too.
        try:
            previous = await self.m.batched.get_status(mailbox_id)
        except StoreError as error:
            log.warning("could not read the last state: %s", error, extra={"mailbox": mailbox_id})
            previous = None
        self.reported_unavailable = (
            previous is not None and previous.state is MailboxState.AUTHENTICATION_ERROR
        )
        failed_before = False
        last_failure = ""
        while True:
            if not failed_before:
                # A retry keeps showing the error until it succeeds, so status and metrics
                # report a failing mailbox as failing, not as flickering "connecting".
                await self._set_state(MailboxState.CONNECTING)
            started_at = math.inf
            try:
                async with trio.open_nursery() as nursery:
                    async with self.m.pacer.attempt() as attempt:
                        try:
                            for folder in self.mailbox.folders:
                                info: FolderInfo = await nursery.start(self._listen_folder, folder)
                                log.debug(
                                    "folder live",
                                    extra={"mailbox": mailbox_id, "folder": folder, "uidnext": info.uidnext},
                                )
                        except MailConnectError:
                            attempt.failed()  # the server may be overloaded: slow down
                            raise
                        attempt.succeeded()
                    started_at = trio.current_time()
                    await self._set_state(MailboxState.LISTENING)
                    if failed_before:
                        self.m.metrics.reconnects.labels(reason=last_failure).inc()
                        failed_before = False
                    log.info("listening", extra={"mailbox": mailbox_id, "folders": len(self.mailbox.folders)})
                    auth_retry.reset()
                    if self.reported_unavailable:
                        await self._report(available=True)
                # Listeners only return when the server ended the session cleanly; reconnect.
                delay = connect_retry.next_delay()
            except Exception as group:  # classified below; never escapes the supervisor
                exc = _most_significant(group)
                last_failure = type(exc).__name__
                failed_before = True
                if isinstance(exc, MailTokenRejectedError) and self.mailbox.use_oauth:
                    self.m.metrics.auth_failures.inc()
                    delay = await self._token_rejected(exc, auth_retry)
                elif isinstance(exc, MailAuthError):
                    self.m.metrics.auth_failures.inc()
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

    async def _token_rejected(self, exc: MailTokenRejectedError, auth_retry: Retry) -> float:
        """OAuth: ask Creatio for a new token (it comes back through /update, which restarts this
        supervisor); report the mailbox unavailable only if none arrives in time."""

        settings = self.m.settings
        now = trio.current_time()
        await self._set_state(MailboxState.AUTHENTICATION_ERROR, f"{exc}; a new token was requested")
        first = self.refresh_requested_at is None
        if first:
            self.refresh_requested_at = now
        waited = now - (self.refresh_requested_at or now)
        if first or waited >= settings.token_refresh_wait_seconds:
            try:
                with trio.fail_after(30):
                    await self.m.sink.request_token_refresh(self.mailbox)
                log.info(
                    "OAuth token rejected: asked Creatio for a new one", extra={"mailbox": self.mailbox.id}
                )
            except (DeliveryError, trio.TooSlowError) as error:
                log.warning(
                    "could not ask Creatio for a new token: %s", error, extra={"mailbox": self.mailbox.id}
                )
        if waited >= settings.token_refresh_wait_seconds:
            if not self.reported_unavailable:
                await self._report(
                    available=False,
                    error_class="AuthenticationException",
                    message=f"{exc}; no new token within {settings.token_refresh_wait_seconds:.0f}s",
                )
            return auth_retry.next_delay()
        # Until the deadline, wake up at it (a new token restarts us sooner).
        return max(0.05, settings.token_refresh_wait_seconds - waited)

    async def _listen_folder(
        self, folder: str, *, task_status: trio.TaskStatus[FolderInfo] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self.m.source.listen(
            self.mailbox,
            folder,
            self._on_new_mail,
            prefetch=self.m.prefetch_for(self.mailbox),
            task_status=task_status,
        )

    async def _on_new_mail(self, task: SyncTask) -> None:
        if not task.seen_at:
            task = dataclasses.replace(task, seen_at=time.time())
        if task.reason == "catch-up":
            # First contact with this folder: a new subscription starts at the current UIDNEXT
            # (history is loaded through /api/email/synchronize), so seed the checkpoint.
            seed = Checkpoint(task.uidvalidity, task.uid_hint, task.seed_cursor)
            if await self.m.store.seed_checkpoint(task.mailbox_id, task.folder, seed):
                self.m.remember_checkpoint(task.mailbox_id, task.folder, seed)
                return  # a new subscription: nothing to catch up on
            checkpoint = await self.m.batched.get_checkpoint((task.mailbox_id, task.folder))
            self.m.remember_checkpoint(task.mailbox_id, task.folder, checkpoint)
            if task.covered_by(checkpoint):
                # Nothing arrived while we were away: skip the fetch session altogether (at a
                # cold start with thousands of mailboxes this halves the connections).
                return
        await self._queue(task)

    async def _queue(self, task: SyncTask) -> None:
        """Queue new mail for delivery, trying again while the queue refuses it. The session
        stays open meanwhile: a failed publish used to end the listener and its session, and at
        10,000 mailboxes a slow broker (publishes past their timeout) turned into 9,000
        reconnects. Nothing is lost if the node dies first: the checkpoint has not moved, so the
        next session's catch-up queues the mail again."""
        retry: Retry | None = None
        while True:
            try:
                await self.m.queue.publish(task)
            except QueueError as exc:
                self.m.metrics.queue_publish_failures.inc()
                first = retry is None
                retry = retry or Retry(_QUEUE_RETRY)
                delay = retry.next_delay()
                # One warning per stretch of failures and mailbox: a broker outage at 10,000
                # mailboxes must not write a line per mailbox per attempt.
                log.log(
                    logging.WARNING if first else logging.DEBUG,
                    "could not queue new mail, trying again in %.1fs (the session stays open): %s",
                    delay,
                    exc,
                    extra={"mailbox": task.mailbox_id, "folder": task.folder},
                )
                await trio.sleep(delay)
                continue
            if retry is not None:
                log.info(
                    "queued new mail after %d failed attempt(s)",
                    retry.attempts,
                    extra={"mailbox": task.mailbox_id, "folder": task.folder},
                )
            return

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
