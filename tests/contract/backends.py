"""Real-server adapters for the contract suites, each isolated per test and cleaned up after.

Redis: a uuid key prefix per test, every key under it deleted at the end (SCAN + DEL). The store
is pure Trio (no asyncio bridge); the tests look at what it wrote with redis-py, an independent
client (synchronous, in a worker thread: usable with or without a bridge).
RabbitMQ: a uuid queue name per test, its queues deleted at the end; it opens the asyncio bridge
loop itself, as the service's root nursery does.
SQLite: a data directory under the test's own tmp_path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import redis
import trio

from emlisten._bridge import open_asyncio_bridge
from emlisten.queue.rabbitmq import RabbitMQQueue
from emlisten.store.redis import RedisStore
from emlisten.store.sqlite import SqliteStore

REDIS_URL = os.environ.get("EMLISTEN_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("EMLISTEN_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
TEST_SECRET_KEY = "contract-test-secret-key"

T = TypeVar("T")


def unique_prefix() -> str:
    return f"emlisten-test:{uuid.uuid4().hex}:"


def unique_queue_name() -> str:
    return f"emlisten-test.{uuid.uuid4().hex}"


async def with_redis_py(action: Callable[[redis.Redis], T]) -> T:
    """``action`` on a fresh synchronous redis-py client, in a worker thread."""

    def run() -> T:
        client = redis.Redis.from_url(REDIS_URL)
        try:
            return action(client)
        finally:
            client.close()

    return await trio.to_thread.run_sync(run)


async def delete_redis_keys(prefix: str) -> int:
    """Delete every key under ``prefix``. Returns how many were deleted."""

    return await with_redis_py(
        lambda client: sum(int(client.delete(key)) for key in client.scan_iter(match=f"{prefix}*", count=500))
    )


async def redis_key_count(prefix: str) -> int:
    return await with_redis_py(lambda client: len(list(client.scan_iter(match=f"{prefix}*", count=500))))


@asynccontextmanager
async def redis_store(
    *, prefix: str | None = None, secret_key: str = TEST_SECRET_KEY
) -> AsyncIterator[RedisStore]:
    """A store on a key prefix of its own, without an asyncio bridge (the store needs none)."""
    prefix = prefix or unique_prefix()
    try:
        async with RedisStore.open(REDIS_URL, prefix=prefix, secret_key=secret_key) as store:
            yield store
    finally:
        await delete_redis_keys(prefix)


@asynccontextmanager
async def sqlite_store(
    directory: str | os.PathLike[str], *, secret_key: str = TEST_SECRET_KEY
) -> AsyncIterator[SqliteStore]:
    """The durable embedded store in ``directory`` (a test's own tmp_path)."""
    async with SqliteStore.open(directory, secret_key=secret_key) as store:
        yield store


@asynccontextmanager
async def rabbitmq_queue(
    *, name: str | None = None, quorum: bool = False, connection_name: str | None = None
) -> AsyncIterator[RabbitMQQueue]:
    """A queue of this test's own (named ``name`` or a fresh uuid name), deleted at the end.

    Opens its own bridge loop; the connection is named ``connection_name`` (default: the queue
    name) so :func:`close_broker_connections` can find it.
    """
    name = name or unique_queue_name()
    async with (
        open_asyncio_bridge(),
        RabbitMQQueue.open(
            AMQP_URL, queue_name=name, quorum=quorum, connection_name=connection_name or name
        ) as queue,
    ):
        try:
            yield queue
        finally:
            await queue.delete_queues()


def _rabbitmqctl() -> str:
    for candidate in ("rabbitmqctl", "/usr/sbin/rabbitmqctl"):
        found = shutil.which(candidate)
        if found:
            return found
    raise RuntimeError("rabbitmqctl not found: run scripts/install-test-deps")


async def close_broker_connections(connection_name: str, reason: str = "test") -> int:
    """Make the broker close every connection named ``connection_name`` (as if it restarted)."""
    ctl = _rabbitmqctl()
    listing = await trio.run_process(
        [ctl, "list_connections", "pid", "client_properties", "-q"], capture_stdout=True
    )
    closed = 0
    for line in listing.stdout.decode().splitlines():
        pid, _, properties = line.partition("\t")
        if f'{{"connection_name","{connection_name}"}}' in properties:
            await trio.run_process([ctl, "close_connection", pid, reason], capture_stdout=True)
            closed += 1
    return closed


@asynccontextmanager
async def broker_refuses_publishes(queue_name: str) -> AsyncIterator[None]:
    """Inside, the broker refuses (nacks) every publish to ``queue_name``, as it does for a full
    queue: a policy caps it at 0 messages with ``overflow: reject-publish``. Per queue, so the
    tests beside it are untouched."""
    ctl = _rabbitmqctl()
    policy = f"refuse-{queue_name}"
    definition = json.dumps({"max-length": 0, "overflow": "reject-publish"})
    pattern = f"^{re.escape(queue_name)}$"
    await trio.run_process(
        [ctl, "set_policy", policy, pattern, definition, "--apply-to", "queues", "--priority", "100"],
        capture_stdout=True,
    )
    try:
        yield
    finally:
        await trio.run_process([ctl, "clear_policy", policy], capture_stdout=True)
