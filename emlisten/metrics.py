"""Prometheus metrics of one process, in a registry of its own (several nodes may share a
process in tests). Gauges are computed at scrape time from the live objects, so the hot paths
only increment counters."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: From loopback (a few ms) to a Creatio that takes its time (minutes).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


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
        self.reconnects = Counter(
            "emlisten_reconnects",
            "Mailbox sessions re-established after a failure",
            ["reason"],
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
