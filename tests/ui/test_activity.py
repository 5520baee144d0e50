"""The console's in-memory activity of a node: minute buckets and per-mailbox event rings."""

from __future__ import annotations

from emlisten.metrics import Activity, DeliverySeries, MailboxEvents
from emlisten.models import WebhookEvent

T0 = 1_800_000_000.0  # a multiple of 60


def test_series_counts_per_minute_and_keeps_one_hour() -> None:
    series = DeliverySeries(minutes=60)
    series.delivered(3, 0.2, now=T0 + 5)
    series.delivered(1, 0.4, now=T0 + 50)
    series.failed(now=T0 + 51)
    series.delivered(2, None, now=T0 + 61)

    minutes = series.snapshot(now=T0 + 61)
    assert len(minutes) == 60
    assert [m["t"] for m in minutes[-2:]] == [T0, T0 + 60]
    first, second = minutes[-2:]
    assert (first["delivered"], first["failed"]) == (4, 1)
    assert first["latency_avg"] == 0.25  # (3 x 0.2 + 0.4) / 4
    assert (first["latency_p50"], first["latency_max"]) == (0.2, 0.4)
    assert second["delivered"] == 2 and second["latency_avg"] is None
    assert all(m["delivered"] == 0 for m in minutes[:-2])

    # An hour later the first minute has left the window; the buckets are bounded.
    series.delivered(1, 0.1, now=T0 + 3600)
    later = series.snapshot(now=T0 + 3600)
    assert later[0]["t"] == T0 + 60 and later[0]["delivered"] == 2
    assert sum(m["delivered"] for m in later) == 3
    assert len(series._buckets) <= 60


def test_latency_percentiles_from_a_bounded_sample() -> None:
    series = DeliverySeries()
    for i in range(1, 2001):
        series.delivered(1, i / 1000, now=T0)
    minute = series.snapshot(now=T0)[-1]
    assert minute["delivered"] == 2000 and minute["latency_max"] == 2.0
    assert abs(minute["latency_avg"] - 1.0005) < 1e-6
    # p95 of a 512-sample reservoir of 0.001..2.0: within a few percent of 1.9.
    assert 1.75 < minute["latency_p95"] <= 2.0


def test_event_rings_are_bounded_per_mailbox_and_in_all() -> None:
    events = MailboxEvents(per_mailbox=3, in_all=7)
    for i in range(5):
        events.add("a", "state", now=T0 + i, state=f"s{i}")
    assert [e["state"] for e in events.recent("a")] == ["s4", "s3", "s2"]  # newest first
    events.add("b", "delivered", now=T0, count=1)
    events.add("c", "delivered", now=T0, count=1)
    events.add("c", "delivered", now=T0, count=2)
    assert events._count == 6
    events.add("d", "delivered", now=T0, count=1)
    events.add("d", "delivered", now=T0, count=1)  # 8 > 7: the quietest mailbox ("a") goes
    assert events.recent("a") == []
    assert [len(events.recent(m)) for m in "bcd"] == [1, 2, 2]
    events.forget("c")
    assert events.recent("c") == [] and events._count == 3


def test_activity_records_deliveries_failures_and_states() -> None:
    activity = Activity()
    activity.state_changed("m1", "connecting")
    activity.state_changed("m1", "authenticationError", "LOGIN rejected")
    activity.delivery_failed("m1", "INBOX", "HTTP 503")
    activity.delivered("m1", "INBOX", 2, 0.05)
    recent = activity.events.recent("m1")
    kinds = [(e["kind"], e.get("state") or e.get("error") or e.get("count")) for e in recent]
    assert kinds == [
        ("delivered", 2),
        ("delivery_failed", "HTTP 503"),
        ("state", "authenticationError"),
        ("state", "connecting"),
    ]
    assert "m1" in activity.events.last_delivery
    minute = activity.series.snapshot()[-1]
    assert (minute["delivered"], minute["failed"]) == (2, 1)


def test_activity_records_webhook_outcomes() -> None:
    activity = Activity()
    event = WebhookEvent("msg_1", "e", "https://hooks.example.test/", "m1", "message.new", "{}", T0)
    event.attempts, event.last_error = 1, "HTTP 503"
    activity.webhook_outcome(event, "retry")
    event.attempts, event.last_error = 2, "HTTP 410"
    activity.webhook_outcome(event, "dead_letter")
    activity.webhook_outcome(event, "delivered")
    recent = activity.events.recent("m1")
    assert [(e["outcome"], e["attempts"], e["error"]) for e in recent] == [
        ("delivered", 2, None),
        ("dead_letter", 2, "HTTP 410"),
        ("retry", 1, "HTTP 503"),
    ]
    assert activity.series.snapshot()[-1]["failed"] == 2
