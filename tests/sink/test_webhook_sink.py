"""The webhook sink on its own: signatures, stable ids, the durable outbox across restarts (Redis),
one sender per receiver across nodes, settings. Real HTTP receiver, real stores."""

from __future__ import annotations

import base64
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import standardwebhooks
import svix.webhooks
import trio
from hypothesis import given
from hypothesis import strategies as st

from emlisten._bridge import open_asyncio_bridge
from emlisten.abc import Store
from emlisten.config import load_settings
from emlisten.errors import ConfigError
from emlisten.models import (
    Attachment,
    Email,
    MailboxConfig,
    Security,
    ServerEndpoint,
    WebhookTarget,
    email_id,
)
from emlisten.sink.webhook import WebhookSink, endpoint_key, html_to_text, message_payload, sign
from emlisten.store.memory import MemoryStore
from emlisten.store.redis import RedisStore
from tests.contract.backends import REDIS_URL, TEST_SECRET_KEY, delete_redis_keys, unique_prefix
from tests.secret_scan import register_secret
from tests.servers.webhook import WebhookReceiver

SECRET = register_secret("whsec_" + base64.b64encode(b"sink-test-key-0123456789abcdef!!").decode())


def mailbox(url: str, mailbox_id: str = "0f8fad5b-d9cb-469f-a165-70867728950e") -> MailboxConfig:
    return MailboxConfig(
        id=mailbox_id,
        user_name="alice@example.com",
        imap=ServerEndpoint("imap.example.com", 993, Security.SSL_ON_CONNECT),
        bpm_endpoint="",
        webhook=WebhookTarget(url, (SECRET,)),
    )


def message(mailbox_id: str, uid: int, *, attachment: bytes = b"") -> Email:
    made = Email(
        id=email_id(mailbox_id, "INBOX", f"7/{uid}"), subject=f"mail {uid}", body="hi", folder="INBOX"
    )
    if attachment:
        made.attachments.append(Attachment(id="a1", name="a.bin", data=attachment))
    return made


@asynccontextmanager
async def running(sink: WebhookSink, store: Store) -> AsyncIterator[WebhookSink]:
    sink.bind(store, node_id="n1")
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        yield sink
        nursery.cancel_scope.cancel()
    await sink.aclose()


@given(
    secret=st.binary(min_size=24, max_size=64),
    msg_id=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=40),
    body=st.text(max_size=200),
)
def test_signatures_verify_with_both_libraries(secret: bytes, msg_id: str, body: str) -> None:
    whsec = "whsec_" + base64.b64encode(secret).decode()
    other = "whsec_" + base64.b64encode(secret[::-1] + b"x").decode()
    timestamp = int(time.time())
    payload = json.dumps({"text": body}, ensure_ascii=False).encode()  # verifiers parse JSON
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign([other, whsec], msg_id, timestamp, payload),
    }
    standardwebhooks.Webhook(whsec).verify(payload, headers)
    svix.webhooks.Webhook(whsec).verify(payload, headers)
    tampered = dict(headers, **{"webhook-id": msg_id + "x"})
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(whsec).verify(payload, tampered)


async def test_the_same_mail_carries_the_same_event_id(nursery: trio.Nursery) -> None:
    receiver = WebhookReceiver()
    await receiver.start(nursery)
    target = mailbox(receiver.url("/same"))
    async with running(WebhookSink(retry_delays=(0.05,)), MemoryStore()) as sink:
        await sink.store.put_mailbox(target)
        await sink.deliver(target, [message(target.id, 1)], idempotency_key="k")
        await sink.deliver(target, [message(target.id, 1)], idempotency_key="k")  # queued once
        await receiver.wait_accepted("/same", 1)
        with trio.fail_after(5):  # the sender records the answer just after the receiver sent it
            while await sink.store.outbox_endpoints():
                await trio.sleep(0.01)
        # Delivered already: the same mail queued again (a redelivery) goes again, same id.
        await sink.deliver(target, [message(target.id, 1), message(target.id, 2)], idempotency_key="k2")
        calls = await receiver.wait_accepted("/same", 3)
    ids = [call.headers["webhook-id"] for call in calls]
    assert ids[0] == ids[1] != ids[2]
    assert [call.event["data"]["subject"] for call in calls] == ["mail 1", "mail 1", "mail 2"]
    assert ids[0] == "msg_" + email_id(target.id, "INBOX", "7/1").replace("-", "")


async def test_attachment_size_limit_and_state_events(nursery: trio.Nursery) -> None:
    receiver = WebhookReceiver()
    await receiver.start(nursery)
    target = mailbox(receiver.url("/state"))
    async with running(WebhookSink(inline_attachment_bytes=10), MemoryStore()) as sink:
        await sink.store.put_mailbox(target)
        await sink.deliver(target, [message(target.id, 1, attachment=b"0123456789")], idempotency_key="a")
        await sink.deliver(target, [message(target.id, 2, attachment=b"0123456789X")], idempotency_key="b")
        await sink.report_state(
            target, available=False, error_class="AuthenticationException", message="refused"
        )
        calls = await receiver.wait_accepted("/state", 3)
    small, large = (call.event["data"]["attachments"][0] for call in calls[:2])
    assert base64.b64decode(small["content"]) == b"0123456789" and small["size"] == 10
    assert large["content"] is None and large["size"] == 11
    state = standardwebhooks.Webhook(SECRET).verify(calls[2].body, calls[2].headers)
    assert state["type"] == "mailbox.state" and state["mailbox"] == target.id
    assert state["data"] == {
        "available": False,
        "error_class": "AuthenticationException",
        "message": "refused",
    }


async def test_many_mailboxes_failing_at_random_each_arrive_once_in_order(nursery: trio.Nursery) -> None:
    receiver = WebhookReceiver()
    await receiver.start(nursery)
    rng = random.Random(14)
    # Every call draws its answer: a third fail (503, retried), the rest are accepted.
    receiver.behave("/many", answers=[(503 if rng.random() < 0.33 else 204, {}) for _ in range(3000)])
    targets = [mailbox(receiver.url("/many"), str(uuid.UUID(int=n))) for n in range(20)]
    sink = WebhookSink(retry_delays=(0.01,) * 40, concurrency=4)
    async with running(sink, MemoryStore()) as sink:
        for target in targets:
            await sink.store.put_mailbox(target)
        for uid in range(1, 31):
            for target in targets:
                await sink.deliver(target, [message(target.id, uid)], idempotency_key=f"{target.id}/{uid}")
        calls = await receiver.wait_accepted("/many", 600, timeout=60)
    by_mailbox: dict[str, list[str]] = {}
    for call in calls:
        by_mailbox.setdefault(call.event["mailbox"], []).append(call.event["data"]["subject"])
    assert by_mailbox == {target.id: [f"mail {uid}" for uid in range(1, 31)] for target in targets}
    assert len({call.headers["webhook-id"] for call in calls}) == 600
    assert 1 < receiver.most_in_progress["/many"] <= 4


async def test_a_receiver_back_from_a_long_outage_gets_its_mail_at_once(nursery: trio.Nursery) -> None:
    receiver = WebhookReceiver()
    await receiver.start(nursery)
    target = mailbox(receiver.url("/back"))
    await receiver.stop()
    # An hour between attempts: only the reachability test explains a delivery within seconds.
    sink = WebhookSink(retry_delays=(3600.0,) * 3, probe_seconds=0.2)
    async with running(sink, MemoryStore()) as sink:
        await sink.store.put_mailbox(target)
        others = [mailbox(receiver.url("/back"), str(uuid.UUID(int=n))) for n in range(1, 4)]
        for other in [target, *others]:
            await sink.store.put_mailbox(other)
            await sink.deliver(other, [message(other.id, 1), message(other.id, 2)], idempotency_key="k")
        endpoint = endpoint_key(target.webhook.url if target.webhook else "")
        with trio.fail_after(10):
            while not all(e.attempts for e in (await sink.store.outbox_peek(endpoint, 10))[::2]):
                await trio.sleep(0.02)
        await receiver.start(nursery)
        calls = await receiver.wait_accepted("/back", 8, timeout=10)
    assert len({call.headers["webhook-id"] for call in calls}) == 8
    assert len(receiver.calls_to("/back")) == 8  # nothing was sent while it was down


async def test_events_of_a_removed_mailbox_are_signed_with_its_secret(nursery: trio.Nursery) -> None:
    receiver = WebhookReceiver()
    await receiver.start(nursery)
    target = mailbox(receiver.url("/removed"))
    store = MemoryStore()
    sink = WebhookSink()
    sink.bind(store)
    await store.put_mailbox(target)
    await sink.deliver(target, [message(target.id, 1), message(target.id, 2)], idempotency_key="k")
    await store.remove_mailbox(target.id)  # DELETE /v1/mailboxes/{id} before the sender ran
    async with running(sink, store):
        calls = await receiver.wait_accepted("/removed", 2)
    for call in calls:
        standardwebhooks.Webhook(SECRET).verify(call.body, call.headers)
    assert SECRET not in repr(await store.outbox_peek("x", 1)) and "secrets" not in repr(calls[0])


async def test_an_unusable_url_is_a_dead_letter_not_a_crash(nursery: trio.Nursery) -> None:
    receiver = WebhookReceiver()
    await receiver.start(nursery)
    broken = mailbox("http://[::1/hook", str(uuid.UUID(int=7)))  # httpx: InvalidURL
    fine = mailbox(receiver.url("/fine"))
    async with running(WebhookSink(), MemoryStore()) as sink:
        for target in (broken, fine):
            await sink.store.put_mailbox(target)
            await sink.deliver(target, [message(target.id, 1)], idempotency_key="k")
        await receiver.wait_accepted("/fine", 1)
        with trio.fail_after(10):
            while not (await sink.store.list_dead_letters())[1]:
                await trio.sleep(0.01)
        (dead,) = (await sink.store.list_dead_letters())[1]
    assert (dead.mailbox_id, dead.attempts, dead.last_error) == (
        broken.id,
        1,
        "the webhook URL cannot be used",
    )


async def test_a_lone_surrogate_in_the_mail_still_sends_a_verifiable_event(nursery: trio.Nursery) -> None:
    receiver = WebhookReceiver()
    await receiver.start(nursery)
    target = mailbox(receiver.url("/odd"))
    odd = message(target.id, 1)
    odd.subject = "bad \ud800 text"
    async with running(WebhookSink(), MemoryStore()) as sink:
        await sink.store.put_mailbox(target)
        await sink.deliver(target, [odd], idempotency_key="k")
        (call,) = await receiver.wait_accepted("/odd", 1)
    event = standardwebhooks.Webhook(SECRET).verify(call.body, call.headers)
    assert event["data"]["subject"] == "bad ? text"


def test_html_bodies_also_come_as_text() -> None:
    html = (
        "<html><head><title>T</title><style>p {color: red}</style></head><body>"
        "<p>Hello <b>world</b>&nbsp;&amp; you</p><div>Line 2<br>Line 3</div>"
        "<script>alert(1)</script><ul><li>one</li><li>two</li></ul></body></html>"
    )
    assert html_to_text(html) == "Hello world & you\n\nLine 2\nLine 3\n\none\n\ntwo"
    message_ = Email(id="e", body=html, is_html_body=True)
    data = message_payload("m", message_, created_at=0.0, inline_limit=0)["data"]
    assert (data["html"], data["text"]) == (html, "Hello world & you\n\nLine 2\nLine 3\n\none\n\ntwo")
    plain = message_payload("m", Email(id="e", body="just text"), created_at=0.0, inline_limit=0)["data"]
    assert (plain["text"], plain["html"]) == ("just text", None)


async def test_a_long_failing_backlog_does_not_hide_other_mailboxes(nursery: trio.Nursery) -> None:
    receiver = WebhookReceiver()
    await receiver.start(nursery)
    # The first call (the backlog's oldest event) fails and waits a minute; the rest succeed.
    receiver.behave("/view", answers=[(503, {})])
    busy, other = mailbox(receiver.url("/view")), mailbox(receiver.url("/view"), str(uuid.UUID(int=9)))
    sink = WebhookSink(retry_delays=(60.0,))
    store = MemoryStore()
    sink.bind(store)
    for target in (busy, other):
        await store.put_mailbox(target)
    # More of the busy mailbox's events than the sender reads at once, then the other's.
    await sink.deliver(busy, [message(busy.id, uid) for uid in range(1, 1201)], idempotency_key="k")
    await sink.deliver(other, [message(other.id, uid) for uid in range(1, 4)], idempotency_key="k")
    async with running(sink, store):
        calls = await receiver.wait_accepted("/view", 3, timeout=10)
    assert [call.event["mailbox"] for call in calls] == [other.id] * 3
    assert [call.event["data"]["subject"] for call in calls] == ["mail 1", "mail 2", "mail 3"]


@pytest.mark.redis
async def test_redis_outbox_survives_a_restart_and_one_node_sends(nursery: trio.Nursery) -> None:
    receiver = WebhookReceiver()
    await receiver.start(nursery)
    url = receiver.url("/restart")
    await receiver.stop()
    prefix = unique_prefix()
    target = mailbox(url)
    async with open_asyncio_bridge():
        try:
            async with RedisStore.open(REDIS_URL, secret_key=TEST_SECRET_KEY, prefix=prefix) as store:
                await store.put_mailbox(target)
                async with running(WebhookSink(retry_delays=(0.1,) * 200), store) as first:
                    await first.deliver(
                        target, [message(target.id, n) for n in range(1, 4)], idempotency_key="k"
                    )
                    with trio.fail_after(10):
                        while not (waiting := await store.outbox_peek(endpoint_key(url), 1)) or (
                            waiting[0].attempts < 1
                        ):
                            await trio.sleep(0.02)
                # The first process is gone. Two new ones on the same Redis: the outbox is
                # still there, and only one of them sends it.
            async with (
                RedisStore.open(REDIS_URL, secret_key=TEST_SECRET_KEY, prefix=prefix) as store_a,
                RedisStore.open(REDIS_URL, secret_key=TEST_SECRET_KEY, prefix=prefix) as store_b,
                running(WebhookSink(retry_delays=(0.1,) * 200, poll_seconds=0.1), store_a),
                running(WebhookSink(retry_delays=(0.1,) * 200, poll_seconds=0.1), store_b),
            ):
                await receiver.start(nursery)
                calls = await receiver.wait_accepted("/restart", 3)
                await trio.sleep(0.5)  # would let a second sender's duplicate arrive
                assert len(receiver.calls_to("/restart")) == 3
        finally:
            await delete_redis_keys(prefix)
    assert [call.event["data"]["subject"] for call in calls] == ["mail 1", "mail 2", "mail 3"]


def test_settings_give_the_schedule_and_defaults() -> None:
    settings = load_settings(
        {
            "EMLISTEN_WEBHOOK_RETRY_SCHEDULE": "1, 2.5,10",
            "EMLISTEN_WEBHOOK_URL": "https://hooks.example.com/mail",
            "EMLISTEN_WEBHOOK_SECRET": f"{SECRET} whsec_b2xk",
        }
    )
    sink = WebhookSink.from_settings(settings)
    assert sink.retry_delays == (1.0, 2.5, 10.0)
    assert sink.default == WebhookTarget("https://hooks.example.com/mail", (SECRET, "whsec_b2xk"))
    assert sum(load_settings({}).webhook_retry_delays) >= 86400  # the default spans over a day
    for bad in ("1,x", "-1"):
        with pytest.raises(ConfigError, match="EMLISTEN_WEBHOOK_RETRY_SCHEDULE"):
            load_settings({"EMLISTEN_WEBHOOK_RETRY_SCHEDULE": bad})
    assert SECRET not in repr(settings)
    for bad in ("not-a-whsec", "whsec_!!", f"{SECRET} whsec_"):
        with pytest.raises(ConfigError, match="EMLISTEN_WEBHOOK_SECRET") as refused:
            load_settings({"EMLISTEN_WEBHOOK_SECRET": bad})
        assert SECRET not in str(refused.value) and "not-a-whsec" not in str(refused.value)
