"""Pure logic: notification routes, clientState checks, the hub, Retry-After, the delta cursor."""

from __future__ import annotations

import json
import time
from email.utils import formatdate

import trio

from emlisten.mail.graph.delta import MAX_SEEN, DeltaCursor, item_hash, parse_time
from emlisten.mail.graph.notifications import (
    CREATED,
    MISSED,
    REMOVED,
    GraphEvent,
    NotificationHub,
    RouteSigner,
    notification_items,
    retry_after_seconds,
)
from emlisten.models import SyncTask


def test_route_round_trip_names_mailbox_and_folder() -> None:
    signer = RouteSigner(b"k" * 32)
    route = signer.new_route("mailbox-1", "AAMkFolder==/x")
    parsed = signer.parse(route.token)
    assert parsed is not None
    assert (parsed.mailbox_id, parsed.folder) == ("mailbox-1", "AAMkFolder==/x")
    assert parsed.client_state == route.client_state
    assert route.notification_path == "/v1/graph/notifications/" + route.token
    assert route.lifecycle_path == "/v1/graph/lifecycle/" + route.token
    # The secret never shows in a repr (logs) and is not part of the URL.
    assert route.client_state not in repr(route)
    assert route.client_state not in route.token


def test_routes_are_unique_per_subscription() -> None:
    signer = RouteSigner(b"k" * 32)
    first, second = signer.new_route("m", "INBOX"), signer.new_route("m", "INBOX")
    assert first.token != second.token
    assert first.client_state != second.client_state


def test_tampered_or_foreign_routes_are_refused() -> None:
    signer = RouteSigner(b"k" * 32)
    route = signer.new_route("mailbox-1", "INBOX")
    payload, _, mac = route.token.partition(".")
    assert signer.parse(payload) is None
    assert signer.parse(payload + ".AAAAAAAAAAAAAAAAAAAAAA") is None
    assert signer.parse("not base64!." + mac) is None
    other = RouteSigner(b"x" * 32)
    assert other.parse(route.token) is None
    # Every node with the same EMLISTEN_SECRET_KEY accepts the route and its clientState.
    same_key = RouteSigner.from_setting("shared-secret-key")
    made = RouteSigner.from_setting("shared-secret-key").new_route("m", "INBOX")
    parsed = same_key.parse(made.token)
    assert parsed is not None and same_key.verify_client_state(parsed, made.client_state)


def test_client_state_check() -> None:
    signer = RouteSigner(b"k" * 32)
    route = signer.new_route("m", "INBOX")
    assert signer.verify_client_state(route, route.client_state)
    last = route.client_state[-1]
    tampered = route.client_state[:-1] + ("B" if last == "A" else "A")
    assert not signer.verify_client_state(route, tampered)
    assert not signer.verify_client_state(route, None)
    assert not signer.verify_client_state(route, 42)
    assert not signer.verify_client_state(route, signer.new_route("m", "INBOX").client_state)


def test_notification_items_tolerates_garbage() -> None:
    assert notification_items(None) == []
    assert notification_items({"value": "x"}) == []
    assert notification_items({"value": [1, {"a": 1}]}) == [{"a": 1}]


async def test_hub_publishes_verified_notifications_only() -> None:
    hub = NotificationHub(RouteSigner(b"k" * 32))
    route = hub.signer.new_route("mailbox-1", "INBOX")
    published: list[SyncTask] = []

    async def publish(task: SyncTask) -> None:
        published.append(task)

    forged = {"value": [{"subscriptionId": "s", "clientState": "forged", "changeType": "created"}]}
    result = await hub.handle(route, forged, publish, lifecycle=False)
    assert (result.accepted, result.rejected, published) == (0, 1, [])

    good = {
        "value": [
            {"subscriptionId": "s", "clientState": route.client_state, "changeType": "created"},
            {"subscriptionId": "s", "clientState": route.client_state, "changeType": "created"},
        ]
    }
    result = await hub.handle(route, good, publish, lifecycle=False)
    assert result.accepted == 2
    # Two notifications of one request: one nudge is enough (the worker syncs from the checkpoint).
    assert [(t.mailbox_id, t.folder, t.reason) for t in published] == [("mailbox-1", "INBOX", "exists")]

    missed = {"value": [{"subscriptionId": "s", "clientState": route.client_state, "lifecycleEvent": MISSED}]}
    await hub.handle(route, missed, publish, lifecycle=True)
    assert published[-1].reason == "missed"

    unknown = {"value": [{"subscriptionId": "s", "clientState": route.client_state, "lifecycleEvent": "odd"}]}
    before = len(published)
    await hub.handle(route, unknown, publish, lifecycle=True)
    assert len(published) == before


async def test_hub_hands_local_subscriptions_to_their_listener() -> None:
    hub = NotificationHub(RouteSigner(b"k" * 32))
    route = hub.signer.new_route("mailbox-1", "INBOX")
    send, receive = trio.open_memory_channel[GraphEvent](4)
    hub.register("sub-1", route, send)
    published: list[SyncTask] = []

    async def publish(task: SyncTask) -> None:
        published.append(task)

    body = {
        "value": [{"subscriptionId": "sub-1", "clientState": route.client_state, "changeType": "created"}]
    }
    await hub.handle(route, body, publish, lifecycle=False)
    removed = {
        "value": [{"subscriptionId": "sub-1", "clientState": route.client_state, "lifecycleEvent": REMOVED}]
    }
    await hub.handle(route, removed, publish, lifecycle=True)
    assert published == []
    assert [receive.receive_nowait().kind for _ in range(2)] == [CREATED, REMOVED]

    hub.unregister("sub-1")
    await hub.handle(route, body, publish, lifecycle=False)
    assert len(published) == 1  # no listener here any more: straight to the queue


def test_retry_after() -> None:
    assert retry_after_seconds("5", default=1, cap=60) == 5
    assert retry_after_seconds("0", default=1, cap=60) == 0
    assert retry_after_seconds(None, default=2, cap=60) == 2
    assert retry_after_seconds("soon", default=3, cap=60) == 3
    assert retry_after_seconds("999", default=1, cap=60) == 60
    assert retry_after_seconds("-4", default=1, cap=60) == 0
    in_ten = retry_after_seconds(formatdate(time.time() + 10, usegmt=True), default=1, cap=60)
    assert 8 <= in_ten <= 10.5


def test_parse_time() -> None:
    assert parse_time("2024-05-01T10:00:00Z") == 1714557600.0
    assert parse_time("2024-05-01T10:00:00.5+00:00") == 1714557600.5
    assert parse_time("nope") is None
    assert parse_time(None) is None


def test_cursor_round_trip_and_garbage() -> None:
    cursor = DeltaCursor(link="https://graph/x?$deltatoken=1", initial=False, floor=10.0, seen={"ab": 12.0})
    assert DeltaCursor.load(cursor.dump()) == cursor
    assert DeltaCursor.load("") is None
    assert DeltaCursor.load("not json") is None
    assert DeltaCursor.load(json.dumps({"v": 99})) is None


def test_first_round_delivers_only_mail_after_the_floor() -> None:
    cursor = DeltaCursor.starting_at(parse_time("2024-05-01T10:00:00Z") or 0)
    old = {"id": "old", "receivedDateTime": "2024-05-01T09:59:59Z"}
    new = {"id": "new", "receivedDateTime": "2024-05-01T10:00:00Z"}
    removed = {"id": "gone", "@removed": {"reason": "deleted"}}
    assert not cursor.is_new(old, initial=True)
    assert cursor.is_new(new, initial=True)
    assert not cursor.is_new(removed, initial=True)
    # In later rounds (changeType=created) a message moved in with an old date is new too.
    assert cursor.is_new(old, initial=False)


def test_delivered_messages_are_never_new_again() -> None:
    start = parse_time("2024-05-01T10:00:00Z") or 0
    cursor = DeltaCursor.starting_at(start)
    item = {"id": "m1", "receivedDateTime": "2024-05-01T10:05:00Z"}
    after = cursor.after_page(
        next_link=None, delta_link="https://g/d1", initial=True, delivered=[("m1", start + 300)]
    )
    assert after.link == "https://g/d1" and not after.initial
    assert not after.is_new(item, initial=False)
    assert not after.restart_round().is_new(item, initial=True)
    # A nextLink keeps the round "initial".
    paging = cursor.after_page(next_link="https://g/n1", delta_link=None, initial=True, delivered=[])
    assert paging.initial and paging.link == "https://g/n1"


def test_floor_follows_the_newest_delivery_and_seen_stays_bounded() -> None:
    cursor = DeltaCursor.starting_at(0.0)
    after = cursor.after_page(
        next_link=None, delta_link="d", initial=False, delivered=[("a", 100.0), ("b", 5000.0)], window=600
    )
    assert after.floor == 4400.0
    assert set(after.seen) == {item_hash("b")}  # "a" is older than the floor
    many = [(f"m{i}", float(i)) for i in range(MAX_SEEN + 50)]
    big = cursor.after_page(next_link=None, delta_link="d", initial=False, delivered=many, window=1e9)
    assert len(big.seen) == MAX_SEEN
    assert big.floor == 50.0
