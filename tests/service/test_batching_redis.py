"""The supervisors' coalesced store calls against a real Redis that becomes unreachable."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
import trio

from emlisten._bridge import open_asyncio_bridge
from emlisten.errors import StoreError
from emlisten.models import MailboxState, MailboxStatus
from emlisten.service.batching import StoreBatcher
from emlisten.store.redis import RedisStore
from tests.contract.backends import REDIS_URL, TEST_SECRET_KEY, delete_redis_keys, unique_prefix
from tests.servers.faultproxy import FaultProxy

pytestmark = pytest.mark.redis


async def test_state_writes_during_a_redis_outage_fail_after_one_round_of_retries(
    nursery: trio.Nursery,
) -> None:
    """Two supervisors' state writes in one batch while Redis is unreachable: the bulk write
    fails after the client's retries, and each supervisor is told so then. They used to ask again
    one by one and wait out the retries a second time (a supervisor blocked twice as long before
    it could reconnect; the cluster outage test ran past its 60 s under load). Counted in
    connection attempts, not seconds: those of one lone write, not three times as many."""
    target = urlsplit(REDIS_URL)
    proxy = FaultProxy(target.hostname or "127.0.0.1", target.port or 6379)
    await nursery.start(proxy.serve)
    prefix = unique_prefix()
    status = MailboxStatus(MailboxState.CONNECT_ERROR, last_error="the session ended")
    async with open_asyncio_bridge():
        try:
            async with RedisStore.open(
                proxy.url("redis", path=target.path or "/0"), prefix=prefix, secret_key=TEST_SECRET_KEY
            ) as store:
                batched = StoreBatcher(store)
                await batched.set_status(("m-0", status))  # reachable: written
                proxy.block()
                refused = proxy.refused
                with pytest.raises(StoreError):
                    await store.set_status("m-lone", status)
                lone = proxy.refused - refused
                assert lone > 0

                refused = proxy.refused
                errors: list[BaseException] = []

                async def write(mailbox_id: str) -> None:
                    try:
                        await batched.set_status((mailbox_id, status))
                    except StoreError as exc:
                        errors.append(exc)

                async with trio.open_nursery() as writers:
                    writers.start_soon(write, "m-1")
                    writers.start_soon(write, "m-2")
                assert len(errors) == 2
                # One bulk write's attempts (the lone write's, give or take the retries'
                # timing), not the bulk's and then two more writes' (about three times as many).
                assert proxy.refused - refused < 2 * lone
                proxy.unblock()
        finally:
            await delete_redis_keys(prefix)
