"""The store's own Redis client (emlisten.store._resp) against the real Redis: the pool's bound,
connections killed by the server, cancelled requests, scripts Redis does not have, pipelines,
credentials. redis-py is the independent client that looks at (and kills) what ours does."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import trio
import trio.testing

from emlisten.errors import StoreError
from emlisten.store._resp import (
    RETRIES,
    Client,
    CommandTimeout,
    ConnectTimeout,
    RedisConnectionError,
    RedisError,
    ReplyError,
    parse_url,
)
from emlisten.store.redis import RedisStore
from tests.contract.backends import REDIS_URL, TEST_SECRET_KEY, unique_prefix, with_redis_py
from tests.secret_scan import register_secret
from tests.servers.faultproxy import FaultProxy

pytestmark = pytest.mark.redis


def client_ids(client: redis.Redis, name: str) -> list[int]:
    return [int(info["id"]) for info in client.client_list() if info.get("name") == name]


def kill_by_name(client: redis.Redis, name: str) -> int:
    killed = 0
    for client_id in client_ids(client, name):
        client.execute_command("CLIENT", "KILL", "ID", client_id)
        killed += 1
    return killed


@asynccontextmanager
async def resp_client(url: str = REDIS_URL, **options: Any) -> AsyncIterator[tuple[Client, str, str]]:
    """A client with a name of its own, and a key prefix of its own (deleted afterwards)."""
    name = f"emlisten-test-{uuid.uuid4().hex[:12]}"
    prefix = unique_prefix()
    client = Client(parse_url(url), client_name=name, **options)
    try:
        yield client, name, prefix
    finally:
        await client.aclose()
        await with_redis_py(lambda r: [r.delete(key) for key in r.scan_iter(match=f"{prefix}*")])


async def test_commands_and_reply_kinds() -> None:
    async with resp_client() as (client, name, prefix):
        assert await client.execute("PING") == b"PONG"
        assert await client.execute("SET", f"{prefix}k", "v\r\né") == b"OK"
        assert await client.execute("GET", f"{prefix}k") == "v\r\né".encode()
        assert await client.execute("GET", f"{prefix}missing") is None
        assert await client.execute("HSET", f"{prefix}h", "a", 1, "b", b"\x00\xff") == 2
        assert await client.execute("HGETALL", f"{prefix}h") == [b"a", b"1", b"b", b"\x00\xff"]
        with pytest.raises(ReplyError, match="WRONGTYPE"):
            await client.execute("GET", f"{prefix}h")
        big = b"x" * 3_000_000
        await client.execute("SET", f"{prefix}big", big)
        assert await client.execute("GET", f"{prefix}big") == big
        # CLIENT SETNAME was sent on the connection.
        assert len(await with_redis_py(lambda r: client_ids(r, name))) == 1
        assert client.idle_count == 1 and client.in_use == 0


async def test_select_and_auth_with_a_user() -> None:
    """AUTH with a user name and SELECT of another database, on every new connection."""
    user = f"emlisten-test-{uuid.uuid4().hex[:12]}"
    password = register_secret(f"acl-password-{uuid.uuid4().hex}")
    await with_redis_py(
        lambda r: r.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")
    )
    try:
        target = urlsplit(REDIS_URL)
        url = f"redis://{user}:{password}@{target.hostname}:{target.port or 6379}/5"
        async with resp_client(url) as (client, _, prefix):
            key = f"{prefix}in-db-5"
            await client.execute("SET", key, "here")
            assert await client.execute("ACL", "WHOAMI") == user.encode()
            assert await with_redis_py(lambda r: r.get(key)) is None  # not in db 0
            in_db_5 = redis.Redis(host=target.hostname or "127.0.0.1", port=target.port or 6379, db=5)
            try:
                assert await trio.to_thread.run_sync(in_db_5.getdel, key) == b"here"
            finally:
                in_db_5.close()

        wrong = f"redis://{user}:not-{password}@{target.hostname}:{target.port or 6379}/0"
        async with resp_client(wrong) as (client, _, _):
            with pytest.raises(ReplyError) as caught:
                await client.execute("PING")
        assert password not in str(caught.value) and "WRONGPASS" in str(caught.value)
        assert client.in_use == 0

        with pytest.raises(StoreError) as store_error:
            async with RedisStore.open(wrong, secret_key=TEST_SECRET_KEY):
                pass
        assert password not in str(store_error.value) and "AUTH failed" in str(store_error.value)
    finally:
        await with_redis_py(lambda r: r.execute_command("ACL", "DELUSER", user))


async def test_callers_beyond_the_bound_wait_then_time_out() -> None:
    async with resp_client(max_connections=2, pool_timeout=0.5) as (client, name, prefix):
        order: list[str] = []

        async def blocked(label: str, seconds: float) -> None:
            await client.execute("BLPOP", f"{prefix}never", seconds)
            order.append(label)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked, "first", 0.3)
            nursery.start_soon(blocked, "second", 0.3)
            await trio.sleep(0.05)
            assert client.in_use == 2
            # A third caller waits for one of the two and then goes through.
            assert await client.execute("PING") == b"PONG"
            order.append("ping")
        assert order[-1] == "ping" and sorted(order[:2]) == ["first", "second"]
        assert len(await with_redis_py(lambda r: client_ids(r, name))) == 2  # never more

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked, "long-1", 1.5)
            nursery.start_soon(blocked, "long-2", 1.5)
            await trio.sleep(0.05)
            with pytest.raises(RedisConnectionError, match=r"free within 0.5 s \(max_connections=2\)"):
                await client.execute("PING")


async def test_the_store_reports_an_exhausted_pool_clearly() -> None:
    prefix = unique_prefix()
    async with RedisStore.open(
        REDIS_URL, prefix=prefix, secret_key=TEST_SECRET_KEY, max_connections=1
    ) as store:
        store._client.pool_timeout = 0.2
        async with store.changes():  # the subscription holds the only connection
            with pytest.raises(StoreError, match=r"^redis: .*free within 0.2 s \(max_connections=1\)"):
                await store.get_mailbox("m-1")
        assert await store.get_mailbox("m-1") is None  # given back with the subscription


async def test_a_connection_killed_by_the_server_is_replaced_transparently() -> None:
    async with resp_client() as (client, name, prefix):
        await client.execute("SET", f"{prefix}k", "v")
        (before,) = await with_redis_py(lambda r: client_ids(r, name))
        assert await with_redis_py(lambda r: kill_by_name(r, name)) == 1
        assert await client.execute("GET", f"{prefix}k") == b"v"
        (after,) = await with_redis_py(lambda r: client_ids(r, name))
        assert after != before


async def test_an_idle_connection_found_dead_is_replaced_before_use() -> None:
    """Idle past the health-check interval: PING first, so a dead one is not sent a command."""
    async with resp_client(health_check_interval=0.0, retries=0) as (client, name, prefix):
        await client.execute("SET", f"{prefix}k", "v")
        await with_redis_py(lambda r: kill_by_name(r, name))
        # Without retries, only the health check can save this call.
        assert await client.execute("GET", f"{prefix}k") == b"v"


async def test_a_cancelled_request_does_not_poison_the_pool() -> None:
    async with resp_client(max_connections=1) as (client, name, prefix):
        with trio.move_on_after(0.2) as scope:
            await client.execute("BLPOP", f"{prefix}list", 5)
        assert scope.cancelled_caught
        assert (client.in_use, client.idle_count) == (0, 0)  # closed, not given back
        # Had the connection gone back to the pool, its BLPOP would take this value and the
        # next command would read BLPOP's late reply instead of its own.
        await with_redis_py(lambda r: r.rpush(f"{prefix}list", "late"))
        assert await client.execute("ECHO", "mine") == b"mine"
        assert await with_redis_py(lambda r: r.lrange(f"{prefix}list", 0, -1)) == [b"late"]
        assert len(await with_redis_py(lambda r: client_ids(r, name))) == 1


async def test_a_script_redis_does_not_have_is_sent_whole() -> None:
    """NOSCRIPT (a restarted or flushed Redis; here a script never sent) falls back to EVAL, which
    caches it again. A script of this test's own, not SCRIPT FLUSH: other clients share this Redis
    (test_resp_tls.py flushes a private one)."""
    async with resp_client() as (client, _, prefix):
        script = client.register_script(f"-- {prefix}\nreturn {{KEYS[1], ARGV[1], tonumber(ARGV[2]) + 1}}")
        assert await with_redis_py(lambda r: r.script_exists(script.sha)) == [False]
        script.loaded = True  # as if Redis had lost it: EVALSHA first
        assert await script([f"{prefix}k"], ["a", 41]) == [f"{prefix}k".encode(), b"a", 42]
        assert await with_redis_py(lambda r: r.script_exists(script.sha)) == [True]
        assert await script([f"{prefix}k"], ["b", 1]) == [f"{prefix}k".encode(), b"b", 2]

        failing = client.register_script(f"-- {prefix}\nreturn redis.call('GET', KEYS[1], 'extra')")
        with pytest.raises(ReplyError, match="ERR"):
            await failing([f"{prefix}k"])


async def test_pipelines_and_transactions() -> None:
    async with resp_client() as (client, _, prefix):
        fresh = client.register_script(f"-- {prefix} pipeline\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])")
        pipe = client.pipeline()
        pipe.command("SET", f"{prefix}a", 1)
        pipe.script(fresh, [f"{prefix}a"], [10])  # not known to be loaded: sent whole (EVAL)
        pipe.command("GET", f"{prefix}a")
        pipe.command("HGET", f"{prefix}a", "field")  # WRONGTYPE
        pipe.script(fresh, [f"{prefix}a"], [100])
        replies = await pipe.execute(raise_on_error=False)
        assert replies[:3] == [b"OK", 11, b"11"]  # in order
        assert isinstance(replies[3], ReplyError) and replies[3].code == "WRONGTYPE"
        assert replies[4] == 111
        assert fresh.loaded

        # Believed loaded but not (Redis flushed or restarted since): the NOSCRIPT ones, which
        # did not run, run again on their own, once each.
        source = f"-- {prefix} unknown\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])"
        unknown = client.register_script(source)
        unknown.loaded = True
        pipe = client.pipeline()
        pipe.script(unknown, [f"{prefix}a"], [1000]).command("INCR", f"{prefix}b")
        pipe.script(unknown, [f"{prefix}a"], [10000])
        assert await pipe.execute() == [1111, 1, 11111]
        assert await client.execute("GET", f"{prefix}a") == b"11111"
        with pytest.raises(ReplyError, match="WRONGTYPE"):
            await client.pipeline().command("HGET", f"{prefix}a", "f").execute()

        many = client.pipeline()
        for n in range(5000):
            many.command("RPUSH", f"{prefix}list", n)
        assert await many.execute() == list(range(1, 5001))

        multi = client.pipeline(transaction=True)
        multi.command("INCR", f"{prefix}a").command("DEL", f"{prefix}list")
        assert await multi.execute() == [11112, 1]
        assert client.idle_count == 1


async def test_redis_unreachable_fails_after_the_retries() -> None:
    target = urlsplit(REDIS_URL)
    async with trio.open_nursery() as nursery:
        proxy = FaultProxy(target.hostname or "127.0.0.1", target.port or 6379)
        await nursery.start(proxy.serve)
        async with resp_client(proxy.url("redis", path="/0")) as (client, _, _):
            assert await client.execute("PING") == b"PONG"
            proxy.block()
            with trio.fail_after(10), pytest.raises(RedisConnectionError, match="cannot connect"):
                await client.execute("PING")
            # The pooled connection was cut (one attempt), then RETRIES reconnects refused.
            assert proxy.refused == RETRIES
            proxy.unblock()
            assert await client.execute("PING") == b"PONG"
        nursery.cancel_scope.cancel()


async def test_a_subscription_that_cannot_come_back_ends_with_a_store_error() -> None:
    target = urlsplit(REDIS_URL)
    prefix = unique_prefix()
    async with trio.open_nursery() as nursery:
        proxy = FaultProxy(target.hostname or "127.0.0.1", target.port or 6379)
        await nursery.start(proxy.serve)
        url = proxy.url("redis", path="/0")
        try:
            async with (
                RedisStore.open(url, prefix=prefix, secret_key=TEST_SECRET_KEY) as store,
                store.changes() as changes,
            ):
                await store.publish_change("m-1")
                with trio.fail_after(5):
                    assert await anext(changes) == "m-1"
                proxy.block()
                with trio.fail_after(10), pytest.raises(StoreError, match="redis: change subscription lost"):
                    await anext(changes)
        finally:
            await with_redis_py(lambda r: [r.delete(key) for key in r.scan_iter(match=f"{prefix}*")])
        nursery.cancel_scope.cancel()


async def test_a_closed_client_refuses_at_once() -> None:
    async with resp_client() as (client, _, _):
        assert await client.execute("PING") == b"PONG"
        await client.aclose()
        assert client.idle_count == 0
        with trio.fail_after(1), pytest.raises(RedisError, match="closed"):  # not retried
            await client.execute("PING")


async def test_requests_cancelled_at_any_moment_leave_no_stale_reply_behind() -> None:
    """Cancelled before the send, during it, or while the replies arrive: whatever connection
    goes back to the pool answers the next request with that request's own replies."""
    async with resp_client(max_connections=2) as (client, _, _):
        payload = "x" * 200_000  # big enough that sending and reading take several steps

        async def pipeline(label: str) -> None:
            pipe = client.pipeline()
            for n in range(20):
                pipe.command("ECHO", f"{label}-{n}-{payload}")
            assert len(await pipe.execute()) == 20

        started = trio.current_time()
        await pipeline("timing")
        took = trio.current_time() - started
        outcomes = []
        for attempt in range(60):  # deadlines from 0 to three times what one pipeline took
            with trio.move_on_after(took * attempt / 20) as scope:
                await pipeline(str(attempt))
            outcomes.append(scope.cancelled_caught)
            token = f"check-{attempt}"
            assert await client.execute("ECHO", token) == token.encode()
        assert client.in_use == 0
        assert True in outcomes and False in outcomes


@asynccontextmanager
async def through_proxy() -> AsyncIterator[FaultProxy]:
    target = urlsplit(REDIS_URL)
    async with trio.open_nursery() as nursery:
        proxy = FaultProxy(target.hostname or "127.0.0.1", target.port or 6379)
        await nursery.start(proxy.serve)
        try:
            yield proxy
        finally:
            proxy.restore()
            nursery.cancel_scope.cancel()


async def test_a_redis_that_stops_answering_fails_the_call_instead_of_hanging_it() -> None:
    """A stopped Redis, or a path that drops packets without a reset: the connection stays up
    and no answer comes. The call fails after the command timeout, once (it may have run: not
    retried), and its connection is not given back (its late reply would answer the next)."""
    async with (
        through_proxy() as proxy,
        resp_client(proxy.url("redis", path="/0"), command_timeout=0.5, connect_timeout=0.5) as (
            client,
            _,
            prefix,
        ),
    ):
        assert await client.execute("SET", f"{prefix}n", 0) == b"OK"
        proxy.black_hole()
        started = trio.current_time()
        with trio.fail_after(10), pytest.raises(CommandTimeout, match=r"no answer from .* within 0.5 s"):
            await client.execute("INCR", f"{prefix}n")
        assert trio.current_time() - started < 3
        assert (client.in_use, client.idle_count) == (0, 0)
        assert proxy.accepted == 1  # no second attempt
        proxy.restore()
        assert await client.execute("ECHO", "mine") == b"mine"
        assert await client.execute("GET", f"{prefix}n") == b"1"  # the INCR ran once, late


async def test_a_health_check_or_a_connect_that_gets_no_answer_does_not_hang_the_call() -> None:
    async with (
        through_proxy() as proxy,
        resp_client(
            proxy.url("redis", path="/0"),
            command_timeout=0.5,
            connect_timeout=0.5,
            health_check_interval=0.0,
            max_connections=4,
        ) as (client, _, _),
    ):
        async with trio.open_nursery() as nursery:  # four idle connections, all to be checked
            for _ in range(4):
                nursery.start_soon(client.execute, "BLPOP", f"{uuid.uuid4().hex}", 0.1)
        assert (client.idle_count, proxy.accepted) == (4, 4)
        proxy.black_hole()
        started = trio.current_time()
        # One check times out (the others, idle as long, are dropped unchecked), then the new
        # connection gets no answer either: its connect timeout, not retried (each retry would
        # wait as long again).
        with trio.fail_after(10), pytest.raises(ConnectTimeout, match=r"timed out after 0\.5 s"):
            await client.execute("PING")
        assert trio.current_time() - started < 2.5
        assert (client.in_use, client.idle_count, proxy.accepted) == (0, 0, 5)
        proxy.restore()
        assert await client.execute("PING") == b"PONG"


async def test_the_store_fails_a_call_to_a_silent_redis_with_a_store_error() -> None:
    prefix = unique_prefix()
    async with through_proxy() as proxy:
        try:
            async with RedisStore.open(
                proxy.url("redis", path="/0"), prefix=prefix, secret_key=TEST_SECRET_KEY, command_timeout=0.5
            ) as store:
                assert await store.claim_leases("n-1", ["m-1"], 5) == ["m-1"]
                proxy.black_hole()
                expected = r"^redis: CommandTimeout: no answer"
                with trio.fail_after(10), pytest.raises(StoreError, match=expected):
                    await store.renew_leases("n-1", ["m-1"], 5)
                proxy.restore()
                assert await store.renew_leases("n-1", ["m-1"], 5) == ["m-1"]
        finally:
            await with_redis_py(lambda r: [r.delete(key) for key in r.scan_iter(match=f"{prefix}*")])


async def test_no_connection_is_leaked_by_cancelled_failed_or_timed_out_calls() -> None:
    """Counted on the server (CLIENT LIST by the client's name): after many calls cancelled at
    every stage, error replies, connections killed under it and timeouts, Redis sees exactly the
    connections the pool keeps idle, and never more than the bound."""
    async with resp_client(max_connections=4, command_timeout=0.3) as (client, name, prefix):
        script = client.register_script(f"-- {prefix}\nreturn redis.call('INCR', KEYS[1])")

        async def one(n: int) -> None:
            with trio.move_on_after((n % 7) * 0.002 if n % 5 != 2 else 1.0):
                if n % 5 == 0:
                    with pytest.raises(ReplyError):
                        await client.execute("HGET", f"{prefix}n", "f")  # WRONGTYPE once n exists
                elif n % 5 == 1:
                    await script([f"{prefix}n"])
                elif n % 5 == 2:
                    with pytest.raises(CommandTimeout):
                        await client.execute("BLPOP", f"{prefix}never", 1)
                else:
                    await client.pipeline().command("INCR", f"{prefix}n").command("PING").execute()

        await client.execute("SET", f"{prefix}n", 0)
        for round_ in range(5):
            if round_ == 2:  # the idle ones die under the pool: found out as they are used
                await with_redis_py(lambda r: kill_by_name(r, name))
            async with trio.open_nursery() as nursery:
                for n in range(40):
                    nursery.start_soon(one, n + round_)
            assert client.in_use == 0
            on_server = len(await with_redis_py(lambda r: client_ids(r, name)))
            assert on_server == client.idle_count <= 4


async def test_a_subscription_to_a_redis_that_stops_answering_ends_instead_of_hanging() -> None:
    """No message and no answer to the health check's PING: the connection counts as dropped;
    the resubscription gets no answer either (its connect timeout, not retried) and the
    subscription ends with an error rather than waiting in silence."""
    async with (
        through_proxy() as proxy,
        resp_client(proxy.url("redis", path="/0"), health_check_interval=0.3, connect_timeout=0.5) as (
            client,
            _,
            prefix,
        ),
    ):
        subscription = await client.subscribe(f"{prefix}channel")
        try:
            await client.execute("PUBLISH", f"{prefix}channel", "one")
            with trio.fail_after(5):
                assert await subscription.next_message() == b"one"
            proxy.black_hole()
            started = trio.current_time()
            with trio.fail_after(10), pytest.raises(RedisConnectionError, match=r"subscription lost: .*PING"):
                await subscription.next_message()
            assert trio.current_time() - started < 3  # two intervals and one connect timeout
        finally:
            subscription.close()
        assert client.in_use == 0


async def test_callers_waiting_for_a_connection_get_one_in_their_order() -> None:
    async with resp_client(max_connections=1) as (client, _, prefix):
        served: list[int] = []

        async def call(n: int) -> None:
            await client.execute("ECHO", str(n))
            served.append(n)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.execute, "BLPOP", f"{prefix}never", 0.3)  # holds the one
            await trio.testing.wait_all_tasks_blocked()
            for n in range(10):
                nursery.start_soon(call, n)
                await trio.testing.wait_all_tasks_blocked()  # queued in this order
        assert served == list(range(10))


@asynccontextmanager
async def slow_link(chunk: int, step: float) -> AsyncIterator[str]:
    """A relay to Redis whose replies come ``chunk`` bytes every ``step`` seconds: a slow link on
    which the bytes keep moving. Yields the URL through it."""
    target = urlsplit(REDIS_URL)

    async def relay(client: trio.SocketStream) -> None:
        async def up(upstream: trio.SocketStream, done: trio.CancelScope) -> None:
            while data := await client.receive_some(65536):
                await upstream.send_all(data)
            done.cancel()

        async def down(upstream: trio.SocketStream) -> None:
            while data := await upstream.receive_some(chunk):
                await client.send_all(data)
                await trio.sleep(step)  # the link's bandwidth

        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            async with (
                client,
                await trio.open_tcp_stream(target.hostname or "127.0.0.1", target.port or 6379) as up_s,
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(up, up_s, nursery.cancel_scope)
                nursery.start_soon(down, up_s)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, relay, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield target._replace(netloc=f"127.0.0.1:{port}").geturl()
        nursery.cancel_scope.cancel()


async def test_a_big_reply_on_a_slow_link_is_not_cut_by_the_command_timeout() -> None:
    """The command timeout is for a server that says nothing: a reply that keeps arriving is
    waited for, however long it takes in all (a webhook outbox read of many events)."""
    value = "x" * 400_000
    async with (
        slow_link(16 * 1024, 0.02) as url,
        resp_client(url, command_timeout=0.3) as (client, _, prefix),
    ):
        await client.execute("SET", f"{prefix}big", value)
        started = trio.current_time()
        assert await client.execute("GET", f"{prefix}big") == value.encode()
        assert trio.current_time() - started > 0.3  # longer in all than the timeout
        assert client.idle_count == 1
