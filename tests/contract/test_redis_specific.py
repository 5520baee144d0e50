"""What the Store contract cannot say about Redis: encryption at rest, key layout and cleanup,
errors, many nodes sharing one Redis, and the cancel-safety of the change subscription."""

from __future__ import annotations

import pytest
import redis
import trio

from emlisten._bridge import open_asyncio_bridge
from emlisten.errors import ConfigError, StoreError
from emlisten.models import (
    Checkpoint,
    MailboxConfig,
    MailboxState,
    MailboxStatus,
    Security,
    ServerEndpoint,
)
from emlisten.store.redis import RedisStore
from tests.contract.backends import (
    REDIS_URL,
    TEST_SECRET_KEY,
    delete_redis_keys,
    redis_key_count,
    redis_store,
    unique_prefix,
    with_redis_py,
)

pytestmark = pytest.mark.redis


def mailbox(mailbox_id: str = "m-1", **changes: object) -> MailboxConfig:
    config = MailboxConfig(
        id=mailbox_id,
        user_name="someone@example.com",
        password="hunter2-password",
        access_token="tok-abcdef-123456",
        imap=ServerEndpoint("imap.example.com", 993, Security.SSL_ON_CONNECT),
        bpm_endpoint="https://creatio.example.com/0/ProcessFullEmail",
    )
    return config.replace(**changes)


async def raw_hash(key: str) -> dict[bytes, bytes]:
    result: dict[bytes, bytes] = await with_redis_py(lambda client: client.hgetall(key))
    return result


async def test_credentials_are_encrypted_at_rest() -> None:
    async with redis_store() as store:
        await store.put_mailbox(mailbox())
        stored = await raw_hash(f"{store.prefix}mailboxes")
        assert list(stored) == [b"m-1"]
        blob = stored[b"m-1"]
        for secret in (b"hunter2-password", b"tok-abcdef-123456", b"someone@example.com"):
            assert secret not in blob
        assert await store.get_mailbox("m-1") == mailbox()


async def test_wrong_secret_key_is_a_clear_error() -> None:
    prefix = unique_prefix()
    async with open_asyncio_bridge():
        try:
            async with RedisStore.open(REDIS_URL, prefix=prefix, secret_key="the right key") as writer:
                await writer.put_mailbox(mailbox())
            async with RedisStore.open(REDIS_URL, prefix=prefix, secret_key="another key") as reader:
                with pytest.raises(StoreError, match="wrong EMLISTEN_SECRET_KEY") as caught:
                    await reader.get_mailbox("m-1")
                assert "hunter2" not in str(caught.value)
                # What needs no decryption still works with the wrong key.
                assert await reader.list_mailbox_ids() == ["m-1"]
                # A worker's sync claim that cannot read the mailbox does not keep the lease.
                with pytest.raises(StoreError, match="wrong EMLISTEN_SECRET_KEY"):
                    await reader.claim_lease_and_read_folder("w1", "sync/m-1/INBOX", "m-1", "INBOX", 30)
                assert await reader.lease_owners(["sync/m-1/INBOX"]) == {"sync/m-1/INBOX": None}
        finally:
            await delete_redis_keys(prefix)


async def test_every_key_is_under_the_prefix_and_cleanup_removes_them() -> None:
    prefix = unique_prefix()
    async with redis_store(prefix=prefix) as store:
        await store.put_mailbox(mailbox())
        await store.set_status("m-1", MailboxStatus(MailboxState.LISTENING))
        await store.add_delivered("m-1", 1)
        await store.seed_checkpoint("m-1", "INBOX", Checkpoint(1, 1))

        assert await with_redis_py(lambda client: set(client.scan_iter(match=f"{prefix}*"))) == {
            f"{prefix}{name}".encode()
            for name in ("mailboxes", "status", "delivered", "checkpoints:m-1", "floors:m-1")
        }
    async with open_asyncio_bridge():
        assert await redis_key_count(prefix) == 0


async def test_remove_keeps_delivered_count() -> None:
    async with redis_store() as store:
        await store.put_mailbox(mailbox())
        await store.set_status("m-1", MailboxStatus(MailboxState.LISTENING))
        await store.add_delivered("m-1", 7)
        assert await store.remove_mailbox("m-1") is True
        status = (await store.get_statuses(["m-1"]))["m-1"]
        assert status is not None
        assert (status.state, status.delivered, status.updated_at) == (MailboxState.CLOSED, 7, 0.0)


async def test_remove_of_never_seen_mailbox_reads_closed_with_zero() -> None:
    async with redis_store() as store:
        assert await store.remove_mailbox("ghost") is False
        status = (await store.get_statuses(["ghost"]))["ghost"]
        assert status is not None
        assert (status.state, status.delivered) == (MailboxState.CLOSED, 0)


async def test_add_delivered_without_status_does_nothing() -> None:
    async with redis_store() as store:
        await store.add_delivered("m-1", 3)
        assert await store.get_statuses(["m-1"]) == {"m-1": None}


async def test_a_counter_redis_cannot_add_to_never_fails_the_checkpoint() -> None:
    """The delivered count rides on the checkpoint's write: a counter HINCRBY refuses (not an
    integer: written by hand, or by another version) must not cost the checkpoint of mail the
    receiver already accepted."""
    async with redis_store() as store:
        await store.put_mailbox(mailbox())
        await store.set_status("m-1", MailboxStatus(MailboxState.LISTENING))
        await store.seed_checkpoint("m-1", "INBOX", Checkpoint(5, 10))

        await with_redis_py(lambda client: client.hset(f"{store.prefix}delivered", "m-1", "not a number"))
        assert await store.advance_checkpoint("m-1", "INBOX", Checkpoint(5, 12), delivered=2) is True
        assert await store.get_checkpoint("m-1", "INBOX") == Checkpoint(5, 12)
        assert (await raw_hash(f"{store.prefix}delivered"))[b"m-1"] == b"not a number"


async def test_existing_many_ids_and_duplicates() -> None:
    async with redis_store() as store:
        for n in range(0, 200, 2):
            await store.put_mailbox(mailbox(f"m-{n}"))
        asked = [f"m-{n}" for n in range(200)] + ["m-0", "m-1"]
        assert await store.existing(asked) == {f"m-{n}" for n in range(0, 200, 2)}
        assert await store.existing([]) == set()
        assert await store.get_statuses([]) == {}


async def test_statuses_of_many_mailboxes_in_one_call() -> None:
    async with redis_store() as store:
        ids = [f"m-{n}" for n in range(5000)]
        for mid in ids[::1000]:
            await store.set_status(mid, MailboxStatus(MailboxState.LISTENING))
            await store.add_delivered(mid, 7)
        statuses = await store.get_statuses(ids)
        assert len(statuses) == 5000
        assert {mid for mid, status in statuses.items() if status is not None} == set(ids[::1000])
        assert all(status.delivered == 7 for status in statuses.values() if status is not None)


async def test_two_nodes_share_state_and_changes() -> None:
    """Two stores on one prefix, as two nodes: data and change notifications cross over."""
    prefix = unique_prefix()
    async with open_asyncio_bridge():
        try:
            async with (
                RedisStore.open(REDIS_URL, prefix=prefix, secret_key=TEST_SECRET_KEY) as node_a,
                RedisStore.open(REDIS_URL, prefix=prefix, secret_key=TEST_SECRET_KEY) as node_b,
                node_b.changes() as changes_on_b,
            ):
                await node_a.put_mailbox(mailbox())
                await node_a.publish_change("m-1")
                with trio.fail_after(5):
                    assert await anext(changes_on_b) == "m-1"
                assert await node_b.get_mailbox("m-1") == mailbox()
                await node_b.seed_checkpoint("m-1", "INBOX", Checkpoint(3, 4))
                assert await node_a.advance_checkpoint("m-1", "INBOX", Checkpoint(3, 9)) is True
                assert await node_b.get_checkpoint("m-1", "INBOX") == Checkpoint(3, 9)
        finally:
            await delete_redis_keys(prefix)


async def test_prefixes_isolate_deployments() -> None:
    # One bridge loop for both stores: a client belongs to the loop it was created in, and a
    # nested loop would take over the context (see the report on the bridge).
    prefixes = [unique_prefix(), unique_prefix()]
    async with open_asyncio_bridge():
        try:
            async with (
                RedisStore.open(REDIS_URL, prefix=prefixes[0], secret_key=TEST_SECRET_KEY) as first,
                RedisStore.open(REDIS_URL, prefix=prefixes[1], secret_key=TEST_SECRET_KEY) as second,
            ):
                await check_isolation(first, second)
        finally:
            for prefix in prefixes:
                await delete_redis_keys(prefix)


async def check_isolation(first: RedisStore, second: RedisStore) -> None:
    await first.put_mailbox(mailbox())
    assert await second.get_mailbox("m-1") is None
    async with second.changes() as changes:
        await first.publish_change("m-1")
        await second.publish_change("m-2")
        with trio.fail_after(5):
            assert await anext(changes) == "m-2"


async def test_cancelled_anext_leaves_changes_usable() -> None:
    async with redis_store() as store, store.changes() as changes:
        with trio.move_on_after(0.05) as scope:
            await anext(changes)
        assert scope.cancelled_caught
        await store.publish_change("after-cancel")
        with trio.fail_after(5):
            assert await anext(changes) == "after-cancel"


async def test_concurrent_seeds_only_one_wins() -> None:
    async with redis_store() as store:
        await store.put_mailbox(mailbox())
        results: list[bool] = []

        async def seed(uid: int) -> None:
            results.append(await store.seed_checkpoint("m-1", "INBOX", Checkpoint(1, uid)))

        async with trio.open_nursery() as nursery:
            for uid in range(20):
                nursery.start_soon(seed, uid)
        assert results.count(True) == 1


async def kill_client_connections(client_name: str) -> int:
    def kill(client: redis.Redis) -> int:
        killed = 0
        for info in client.client_list():
            if info.get("name") == client_name:
                client.execute_command("CLIENT", "KILL", "ID", info["id"])
                killed += 1
        return killed

    return await with_redis_py(kill)


async def test_store_and_subscription_survive_dropped_connections() -> None:
    prefix = unique_prefix()
    client_name = f"emlisten-test-{prefix.split(':')[1]}"
    async with open_asyncio_bridge():
        try:
            async with (
                RedisStore.open(
                    REDIS_URL, prefix=prefix, secret_key=TEST_SECRET_KEY, client_name=client_name
                ) as store,
                store.changes() as changes,
            ):
                await store.put_mailbox(mailbox())
                assert await kill_client_connections(client_name) >= 2  # the pool's and pubsub's
                assert await store.get_mailbox("m-1") == mailbox()  # reconnects transparently
                with trio.fail_after(10):
                    # The subscription reconnects and resubscribes on its own; publish until it
                    # is back (what was published while it was away is lost, as documented).
                    received = None
                    while received is None:
                        await store.publish_change("after-kill")
                        with trio.move_on_after(0.2):
                            received = await anext(changes)
                    assert received == "after-kill"
        finally:
            await delete_redis_keys(prefix)


async def test_unreachable_redis_is_a_store_error() -> None:
    async with open_asyncio_bridge():
        with pytest.raises(StoreError, match="redis"):
            async with RedisStore.open("redis://127.0.0.1:1/0", secret_key="k"):
                pass


async def test_wrong_password_is_a_store_error_without_the_password() -> None:
    async with open_asyncio_bridge():
        with pytest.raises(StoreError) as caught:
            async with RedisStore.open(
                "redis://no-such-user:not-the-password-xyz@127.0.0.1:6379/0", secret_key="k"
            ):
                pass
        assert "not-the-password-xyz" not in str(caught.value)


async def test_bad_configuration_is_a_config_error() -> None:
    async with open_asyncio_bridge():
        with pytest.raises(ConfigError):
            async with RedisStore.open(REDIS_URL, secret_key=""):
                pass
        with pytest.raises(ConfigError):
            async with RedisStore.open("http://127.0.0.1:6379", secret_key="k"):
                pass


async def test_repr_hides_secrets() -> None:
    async with redis_store(secret_key="super-secret-store-key") as store:
        assert "super-secret-store-key" not in repr(store)
        assert store.name == "redis"


async def test_states_are_counted_in_redis_whatever_the_last_error_says() -> None:
    """``state_counts`` matches the state in the stored documents inside Redis (one small answer,
    not every status): a last error that quotes a state must not be taken for it."""
    async with redis_store() as store:
        for n in range(3):
            await store.put_mailbox(mailbox(f"m-{n}"))
        await store.set_status(
            "m-0",
            MailboxStatus(MailboxState.AUTHENTICATION_ERROR, last_error='server said: "state":"listening"'),
        )
        await store.set_status("m-1", MailboxStatus(MailboxState.LISTENING))
        await store.set_status("closed-long-ago", MailboxStatus(MailboxState.LISTENING))
        assert await store.state_counts() == (3, {"authenticationError": 1, "listening": 1, "starting": 1})
