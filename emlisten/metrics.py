"""Prometheus metrics of one process, in a registry of its own (several nodes may share a
process in tests). Gauges are computed at scrape time from the live objects, so the hot paths
only increment counters."""

from __future__ import annotations

import math
import random
import time
from collections import Counter as Tally
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from emlisten.models import WebhookEvent

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: From loopback (a few ms) to a Creatio that takes its time (minutes).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: A round trip to a server or a receiver: from a loopback millisecond to a timeout.
_CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


class _LiveGauges(Collector):
    def __init__(
        self,
        node_id: str,
        states: Callable[[], Mapping[str, str]],
        leases: Callable[[], int],
        queue_depth: Callable[[], int | None],
    ) -> None:
        self.node_id = node_id
        self.states = states
        self.leases = leases
        self.queue_depth = queue_depth

    def collect(self) -> Iterator[Metric]:
        subscriptions = GaugeMetricFamily(
            "emlisten_active_subscriptions",
            "Mailboxes this node listens to, by state",
            labels=["node", "state"],
        )
        counts = Tally(self.states().values())
        for state in ("starting", "connecting", "listening", "authenticationError", "connectError"):
            subscriptions.add_metric([self.node_id, state], counts.get(state, 0))
        yield subscriptions
        leases = GaugeMetricFamily("emlisten_leases", "Mailbox leases held by this node", labels=["node"])
        leases.add_metric([self.node_id], self.leases())
        yield leases
        depth = self.queue_depth()
        if depth is not None:
            gauge = GaugeMetricFamily("emlisten_queue_depth", "Sync tasks waiting in the queue")
            gauge.add_metric([], depth)
            yield gauge


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.deliveries = Counter(
            "emlisten_deliveries",
            "ProcessFullEmail calls by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.delivered_emails = Counter(
            "emlisten_delivered_emails", "Emails Creatio accepted", registry=self.registry
        )
        self.prefetched_emails = Counter(
            "emlisten_prefetched_emails",
            "Emails delivered as fetched on the listening session (no reading session needed)",
            registry=self.registry,
        )
        self.delivery_latency = Histogram(
            "emlisten_delivery_latency_seconds",
            "From the server's new-mail notification to Creatio's 2xx",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.delivery_calls = Histogram(
            "emlisten_delivery_call_seconds",
            "How long the receiving application took to answer one delivery call (ProcessFullEmail, "
            "or the new-ids notification), whatever the outcome",
            buckets=_CALL_BUCKETS,
            registry=self.registry,
        )
        self.reconnects = Counter(
            "emlisten_reconnects",
            "Mailbox sessions re-established after a failure",
            ["reason"],
            registry=self.registry,
        )
        self.queue_publish_failures = Counter(
            "emlisten_queue_publish_failures",
            "Attempts to queue new mail for delivery that the task queue refused or timed out "
            "(each is tried again; the mailbox's session stays open)",
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "emlisten_auth_failures", "Logins the mail server rejected", registry=self.registry
        )
        self.imap_commands = Counter(
            "emlisten_imap_commands",
            "IMAP commands by outcome",
            ["command", "outcome"],
            registry=self.registry,
        )
        self.imap_command_seconds = Histogram(
            "emlisten_imap_command_seconds",
            "From an IMAP command's first byte sent to its tagged answer, by command (the DONE that "
            "ends IDLE and the UID FETCH sent with it count as UID FETCH): how fast the mail server "
            "answers",
            ["command"],
            buckets=_CALL_BUCKETS,
            registry=self.registry,
        )
        self.gc_pauses = Histogram(
            "emlisten_gc_pause_seconds",
            "Python's garbage collections, by generation: the event loop stops for their length",
            ["generation"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self.imap_looks = Counter(
            "emlisten_imap_looks",
            "Looks at a listening folder on a side session (the safety net for notifications a "
            "server drops) by outcome: found (mail the server did not announce), nothing, failed",
            ["outcome"],
            registry=self.registry,
        )
        self.checkpoint_refreshes = Counter(
            "emlisten_checkpoint_refreshes",
            "Reads of the checkpoints of the mailboxes this node runs, kept in memory to register "
            "them again if the store loses its data",
            registry=self.registry,
        )
        self.restored_mailboxes = Counter(
            "emlisten_restored_mailboxes",
            "Mailboxes this node registered again after the store lost its data",
            registry=self.registry,
        )
        #: The web console's view of this node: deliveries per minute and recent events per
        #: mailbox (in memory, the last hour; see docs/console.md).
        self.activity = Activity()

    def gc_pause(self, generation: int, seconds: float) -> None:
        self.gc_pauses.labels(str(generation)).observe(seconds)

    def imap_command(self, command: str, outcome: str, seconds: float) -> None:
        """The IMAP sources' command observer."""
        self.imap_commands.labels(command, outcome).inc()
        self.imap_command_seconds.labels(command).observe(seconds)

    def watch(
        self,
        node_id: str,
        *,
        states: Callable[[], Mapping[str, str]],
        leases: Callable[[], int],
        queue_depth: Callable[[], int | None],
    ) -> None:
        self.registry.register(_LiveGauges(node_id, states, leases, queue_depth))

    def render(self) -> bytes:
        return generate_latest(self.registry)


# -- the web console's activity (docs/console.md) ------------------------------------------------

#: Minutes of delivery history kept per node (the console's chart spans one hour).
SERIES_MINUTES = 60
#: Latency samples kept per minute for its percentiles (a uniform sample past that).
_SAMPLES_PER_MINUTE = 512
#: Recent events kept per mailbox, and in all: the mailboxes quiet the longest are forgotten
#: first, so memory stays bounded (~100,000 small records) whatever the number of mailboxes.
EVENTS_PER_MAILBOX = 20
EVENTS_IN_ALL = 100_000


@dataclass
class _Minute:
    start: int  # Unix seconds, a multiple of 60
    delivered: int = 0
    failed: int = 0
    latency_count: int = 0
    latency_sum: float = 0.0
    latency_max: float = 0.0
    samples: list[float] = field(default_factory=list)

    def observe(self, latency: float, count: int) -> None:
        for _ in range(count):
            self.latency_count += 1
            if len(self.samples) < _SAMPLES_PER_MINUTE:
                self.samples.append(latency)
            else:  # reservoir sampling keeps a uniform sample of the minute
                slot = random.randrange(self.latency_count)
                if slot < _SAMPLES_PER_MINUTE:
                    self.samples[slot] = latency
        self.latency_sum += latency * count
        self.latency_max = max(self.latency_max, latency)

    def as_dict(self) -> dict[str, Any]:
        ordered = sorted(self.samples)

        def percentile(fraction: float) -> float | None:
            if not ordered:
                return None
            return round(ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)], 4)

        return {
            "t": self.start,
            "delivered": self.delivered,
            "failed": self.failed,
            "latency_avg": round(self.latency_sum / self.latency_count, 4) if self.latency_count else None,
            "latency_p50": percentile(0.5),
            "latency_p95": percentile(0.95),
            "latency_max": round(self.latency_max, 4) if self.latency_count else None,
        }


class DeliverySeries:
    """Emails delivered (and failed deliveries) per wall-clock minute, with the seen-to-delivered
    latency of each minute, for the last ``SERIES_MINUTES`` minutes."""

    def __init__(self, minutes: int = SERIES_MINUTES) -> None:
        self.minutes = minutes
        self._buckets: deque[_Minute] = deque()

    def _bucket(self, now: float) -> _Minute:
        start = int(now // 60) * 60
        if self._buckets and self._buckets[-1].start >= start:
            return self._buckets[-1]  # this minute (or the wall clock stepped back: count it here)
        self._buckets.append(_Minute(start))
        while self._buckets[0].start <= start - self.minutes * 60:
            self._buckets.popleft()
        return self._buckets[-1]

    def delivered(self, count: int, latency: float | None, now: float | None = None) -> None:
        bucket = self._bucket(time.time() if now is None else now)
        bucket.delivered += count
        if latency is not None:
            bucket.observe(latency, count)

    def failed(self, now: float | None = None) -> None:
        self._bucket(time.time() if now is None else now).failed += 1

    def snapshot(self, now: float | None = None) -> list[dict[str, Any]]:
        """One entry per minute of the last hour, oldest first, the current minute last
        (minutes without deliveries included, with zeros)."""
        current = int((time.time() if now is None else now) // 60) * 60
        by_start = {bucket.start: bucket for bucket in self._buckets}
        return [
            (by_start.get(start) or _Minute(start)).as_dict()
            for start in range(current - (self.minutes - 1) * 60, current + 60, 60)
        ]


class MailboxEvents:
    """The last few events of each mailbox on this node (state changes, deliveries, failures)."""

    def __init__(self, per_mailbox: int = EVENTS_PER_MAILBOX, in_all: int = EVENTS_IN_ALL) -> None:
        self.per_mailbox = per_mailbox
        self.in_all = in_all
        self._events: OrderedDict[str, deque[dict[str, Any]]] = OrderedDict()
        self._count = 0
        #: When this node last delivered mail of each mailbox (Unix seconds).
        self.last_delivery: dict[str, float] = {}

    def add(self, mailbox_id: str, kind: str, now: float | None = None, **details: Any) -> None:
        ring = self._events.get(mailbox_id)
        if ring is None:
            ring = self._events[mailbox_id] = deque(maxlen=self.per_mailbox)
        else:
            self._events.move_to_end(mailbox_id)
        self._count -= len(ring)
        ring.append({"at": time.time() if now is None else now, "kind": kind, **details})
        self._count += len(ring)
        while self._count > self.in_all and len(self._events) > 1:
            forgotten_id, forgotten = self._events.popitem(last=False)
            self._count -= len(forgotten)
            self.last_delivery.pop(forgotten_id, None)

    def recent(self, mailbox_id: str) -> list[dict[str, Any]]:
        """Newest first."""
        return list(reversed(self._events.get(mailbox_id, ())))

    def forget(self, mailbox_id: str) -> None:
        ring = self._events.pop(mailbox_id, None)
        if ring is not None:
            self._count -= len(ring)
        self.last_delivery.pop(mailbox_id, None)


class Activity:
    """What the web console shows of this node. The service calls these from its hot paths:
    each call is a few dictionary operations, no I/O."""

    def __init__(self) -> None:
        self.series = DeliverySeries()
        self.events = MailboxEvents()

    def delivered(self, mailbox_id: str, folder: str, count: int, latency: float | None) -> None:
        now = time.time()
        self.series.delivered(count, latency, now)
        details: dict[str, Any] = {"folder": folder, "count": count}
        if latency is not None:
            details["latency"] = round(latency, 4)
        self.events.add(mailbox_id, "delivered", now, **details)
        self.events.last_delivery[mailbox_id] = now

    def delivery_failed(self, mailbox_id: str, folder: str, error: str) -> None:
        now = time.time()
        self.series.failed(now)
        self.events.add(mailbox_id, "delivery_failed", now, folder=folder, error=error)

    def state_changed(self, mailbox_id: str, state: str, error: str | None = None) -> None:
        self.events.add(mailbox_id, "state", state=state, error=error)

    def webhook_outcome(self, event: WebhookEvent, outcome: str) -> None:
        """A webhook call's outcome: "delivered", "retry" or "dead_letter" (emlisten.sink.webhook)."""
        now = time.time()
        if outcome != "delivered":
            self.series.failed(now)
        self.events.add(
            event.mailbox_id,
            "webhook",
            now,
            outcome=outcome,
            type=event.type,
            event=event.id,
            attempts=event.attempts,
            error=event.last_error if outcome != "delivered" else None,
        )
