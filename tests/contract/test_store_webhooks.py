"""The Store's webhook outboxes and dead letters, run against every adapter (memory, Redis, SQLite)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator

import pytest
import redis

from emlisten.abc import Store
from emlisten.models import WebhookEvent
from emlisten.store.memory import MemoryStore
from emlisten.store.redis import RedisStore
from tests.contract.backends import REDIS_URL, redis_store, sqlite_store, with_redis_py


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis), "sqlite"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "redis":
        async with redis_store() as adapter:
            yield adapter
        return
    if request.param == "sqlite":
        async with sqlite_store(request.getfixturevalue("tmp_path")) as durable:
            yield durable
        return
    memory: Store = MemoryStore()
    yield memory
    await memory.aclose()


def event(
    event_id: str, *, endpoint: str = "ep-a", mailbox_id: str = "m1", **changes: object
) -> WebhookEvent:
    made = WebhookEvent(
        id=event_id,
        endpoint=endpoint,
        url=f"https://hooks.example.com/{endpoint}?token=t0k3n",
        mailbox_id=mailbox_id,
        type="message.new",
        payload=json.dumps({"type": "message.new", "id": event_id, "data": {"subject": "café"}}),
        created_at=1000.0,
    )
    return dataclasses.replace(made, **changes)  # type: ignore[arg-type]


async def test_outbox_keeps_order_per_endpoint(store: Store) -> None:
    assert await store.outbox_add([event("e1"), event("x1", endpoint="ep-b"), event("e2"), event("e3")]) == 4
    assert [e.id for e in await store.outbox_peek("ep-a", 10)] == ["e1", "e2", "e3"]
    assert [e.id for e in await store.outbox_peek("ep-a", 2)] == ["e1", "e2"]
    assert [e.id for e in await store.outbox_peek("ep-b", 10)] == ["x1"]
    assert await store.outbox_peek("ep-c", 10) == []
    assert sorted(await store.outbox_endpoints()) == ["ep-a", "ep-b"]
    assert await store.outbox_count("ep-a") == 3
    assert (await store.outbox_peek("ep-a", 1))[0] == event("e1")


async def test_outbox_skips_an_event_already_waiting(store: Store) -> None:
    assert await store.outbox_add([event("e1"), event("e2")]) == 2
    # The same mail delivered again (a redelivered task): queued once, its place kept.
    assert await store.outbox_add([event("e3"), event("e1", payload="{}")]) == 1
    waiting = await store.outbox_peek("ep-a", 10)
    assert [e.id for e in waiting] == ["e1", "e2", "e3"]
    assert waiting[0].payload == event("e1").payload


async def test_retry_records_the_attempt_and_keeps_the_place(store: Store) -> None:
    await store.outbox_add([event("e1"), event("e2")])
    failed = event("e1", attempts=2, next_attempt_at=2000.5, last_error="HTTP 503")
    assert await store.outbox_retry(failed) is True
    first, second = await store.outbox_peek("ep-a", 10)
    assert (first.id, first.attempts, first.next_attempt_at, first.last_error) == (
        "e1",
        2,
        2000.5,
        "HTTP 503",
    )
    assert second == event("e2")
    assert await store.outbox_retry(event("gone", attempts=1)) is False


async def test_done_removes_and_empties_the_endpoint(store: Store) -> None:
    await store.outbox_add([event("e1"), event("e2")])
    assert await store.outbox_done("ep-a", "e1") is True
    assert await store.outbox_done("ep-a", "e1") is False
    assert [e.id for e in await store.outbox_peek("ep-a", 10)] == ["e2"]
    assert await store.outbox_done("ep-a", "e2") is True
    assert await store.outbox_endpoints() == []
    assert await store.outbox_count("ep-a") == 0
    # Delivered events may be queued again (a history load of the same mail).
    assert await store.outbox_add([event("e1")]) == 1


async def test_dead_letters_list_get_and_drop(store: Store) -> None:
    await store.outbox_add([event("e1"), event("e2"), event("e3")])
    assert (
        await store.outbox_dead_letter(event("e2", attempts=9, last_error="HTTP 410", dead_at=50.0)) is True
    )
    assert (
        await store.outbox_dead_letter(event("e1", attempts=1, last_error="HTTP 400", dead_at=60.0)) is True
    )
    assert await store.outbox_dead_letter(event("e1", dead_at=70.0)) is False  # no longer waiting
    assert [e.id for e in await store.outbox_peek("ep-a", 10)] == ["e3"]
    count, page = await store.list_dead_letters()
    assert count == 2
    assert [(e.id, e.attempts, e.last_error, e.dead_at) for e in page] == [
        ("e2", 9, "HTTP 410", 50.0),
        ("e1", 1, "HTTP 400", 60.0),
    ]
    assert page[0].payload == event("e2").payload
    assert (await store.list_dead_letters(offset=1, limit=5))[1][0].id == "e1"
    assert await store.list_dead_letters(offset=2) == (2, [])
    dead = await store.get_dead_letter("e2")
    assert dead is not None and dead.url == event("e2").url
    assert await store.get_dead_letter("e3") is None
    # A dead event is not queued again by a redelivery of its mail: only a replay re-sends it.
    assert await store.outbox_add([event("e2")]) == 0
    assert await store.drop_dead_letter("e2") is True
    assert await store.drop_dead_letter("e2") is False
    assert await store.get_dead_letter("e2") is None
    assert (await store.list_dead_letters())[0] == 1


async def test_replay_moves_back_to_the_end_of_the_outbox(store: Store) -> None:
    await store.outbox_add([event("e1"), event("e2")])
    await store.outbox_dead_letter(
        event("e1", attempts=9, next_attempt_at=99.0, last_error="timeout", dead_at=5.0)
    )
    replayed = await store.replay_dead_letter("e1")
    assert replayed is not None
    assert (replayed.id, replayed.attempts, replayed.next_attempt_at, replayed.dead_at) == ("e1", 0, 0.0, 0.0)
    assert replayed.last_error == "timeout"
    assert [e.id for e in await store.outbox_peek("ep-a", 10)] == ["e2", "e1"]
    assert await store.get_dead_letter("e1") is None
    assert await store.replay_dead_letter("e1") is None
    assert await store.replay_dead_letter("never") is None


async def test_replay_reopens_an_emptied_endpoint(store: Store) -> None:
    await store.outbox_add([event("x1", endpoint="ep-b")])
    await store.outbox_dead_letter(event("x1", endpoint="ep-b", dead_at=1.0))
    assert await store.outbox_endpoints() == []
    assert await store.replay_dead_letter("x1") is not None
    assert await store.outbox_endpoints() == ["ep-b"]


@pytest.mark.redis
async def test_redis_outbox_and_dead_letters_survive_a_restart_encrypted() -> None:
    async with redis_store() as first:
        await first.outbox_add([event("e1"), event("e2")])
        await first.outbox_dead_letter(event("e1", last_error="HTTP 500", dead_at=3.0))
        prefix = first.prefix

        def raw(client: redis.Redis) -> dict[bytes, bytes]:
            waiting: dict[bytes, bytes] = client.hgetall(f"{prefix}wh:events:ep-a")
            dead: dict[bytes, bytes] = client.hgetall(f"{prefix}wh:dead")
            return {**waiting, **dead}

        blobs = await with_redis_py(raw)
        assert sorted(blobs) == [b"e1", b"e2"]
        for blob in blobs.values():
            assert b"caf" not in blob and b"t0k3n" not in blob and b"hooks.example.com" not in blob
        # A new process (a new client on the same prefix) sees both.
        async with RedisStore.open(REDIS_URL, secret_key="contract-test-secret-key", prefix=prefix) as second:
            assert [e.id for e in await second.outbox_peek("ep-a", 10)] == ["e2"]
            dead = await second.get_dead_letter("e1")
            assert dead is not None and dead.last_error == "HTTP 500"
