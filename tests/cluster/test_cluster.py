"""Three primaries and one secondary as separate processes, sharing real Redis and RabbitMQ:
ownership, spreading, delivery once, failover on SIGKILL, stand-in delivery, full restart."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.cluster.nodes import Cluster, cluster
from tests.contract.backends import delete_redis_keys
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot, MailUser

pytestmark = [pytest.mark.redis, pytest.mark.rabbitmq]


@pytest.fixture
async def running_cluster(dovecot: Dovecot, tmp_path: Path) -> AsyncIterator[Cluster]:
    from emlisten._bridge import open_asyncio_bridge

    with cluster(dovecot, tmp_path) as c:
        try:
            yield c
        finally:
            c.stop_all()
            async with open_asyncio_bridge():
                await delete_redis_keys(c.prefix)
            await _delete_queues(c.queue)


async def _delete_queues(name: str) -> None:
    from emlisten._bridge import open_asyncio_bridge
    from emlisten.queue.rabbitmq import RabbitMQQueue
    from tests.contract.backends import AMQP_URL

    async with open_asyncio_bridge(), RabbitMQQueue.open(AMQP_URL, queue_name=name) as queue:
        await queue.delete_queues()


def credentials(dovecot: Dovecot, user: MailUser, creatio: CreatioStandIn) -> dict[str, Any]:
    return {
        "Id": str(uuid.uuid4()),
        "UserName": user.name,
        "Password": user.password,
        "SenderEmailAddress": user.email,
        "ServiceUrl": dovecot.host,
        "Port": dovecot.imaps_port,
        "UseSsl": True,
        "BpmEndpoint": creatio.endpoint(),
    }


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30) -> None:
    with trio.move_on_after(timeout):
        while not await check():
            await trio.sleep(0.1)
        return
    raise AssertionError(f"timed out after {timeout}s waiting until {what}")


async def owners(c: Cluster, node: str) -> dict[str, str | None]:
    body = await c.nodes[node].get("/v1/mailboxes")
    return {m["id"]: m["node"] for m in body["mailboxes"] if m["state"] == "listening"}


async def test_cluster_spreads_delivers_once_and_fails_over(
    running_cluster: Cluster, dovecot: Dovecot, creatio: CreatioStandIn
) -> None:
    c = running_cluster
    for name in ("p1", "p2", "p3"):
        await c.start(name, "primary")
    await c.start("s1", "secondary")

    users = [dovecot.add_user() for _ in range(9)]
    creds = [credentials(dovecot, u, creatio) for u in users]
    ids = [cr["Id"] for cr in creds]
    response = await c.nodes["p1"].post("/api/listeners/create", creds)
    assert response.status_code == 200, response.text

    # Another node answers "exists" for mailboxes created on p1.
    states = (await c.nodes["p3"].post("/api/listeners/subscriptionsstate", ids)).json()
    assert {v["State"] for v in states.values()} == {"exists"}

    async def spread_over_three() -> bool:
        current = await owners(c, "p2")
        return len(current) == 9 and sorted(Counter(current.values()).values()) == [3, 3, 3]

    await eventually(spread_over_three, "9 mailboxes listen, 3 per primary")
    nodes = {n["id"]: n for n in (await c.nodes["p1"].get("/v1/nodes"))["nodes"]}
    assert set(nodes) == {"p1", "p2", "p3", "s1"}
    assert nodes["s1"]["role"] == "secondary"

    for user in users:
        await dovecot.aappend(user, b"Subject: first\r\n\r\nbody\r\n")
    for mailbox_id in ids:
        await creatio.wait_for_emails(mailbox_id, 1, timeout=30)

    # SIGKILL a primary: no clean hand-over; its leases expire and the others take over.
    victim_mailboxes = {m for m, n in (await owners(c, "p1")).items() if n == "p3"}
    assert len(victim_mailboxes) == 3
    await trio.to_thread.run_sync(c.nodes["p3"].kill)
    killed_at = trio.current_time()

    async def two_primaries_listen_to_all() -> bool:
        current = await owners(c, "p1")
        return len(current) == 9 and set(current.values()) == {"p1", "p2"}

    await eventually(two_primaries_listen_to_all, "p1 and p2 listen to all 9 mailboxes")
    failover_seconds = trio.current_time() - killed_at
    assert failover_seconds < 10, failover_seconds

    for user in users:
        await dovecot.aappend(user, b"Subject: second\r\n\r\nbody\r\n")
    for mailbox_id in ids:
        emails = await creatio.wait_for_emails(mailbox_id, 2, timeout=30)
        assert [e["Subject"] for e in emails] == ["first", "second"]

    # The secondary dies: the primaries deliver themselves. Killed at a quiet moment (every
    # checkpoint written): a worker killed between Creatio's 2xx and its checkpoint write would
    # deliver that mail again, with the same Email.Id (the documented at-least-once window).
    async def checkpoints_written() -> bool:
        body = await c.nodes["p1"].get("/v1/mailboxes")
        return all(m["delivered"] == 2 for m in body["mailboxes"])

    await eventually(checkpoints_written, "every delivery is checkpointed")
    await trio.to_thread.run_sync(c.nodes["s1"].kill)
    for user in users[:3]:
        await dovecot.aappend(user, b"Subject: third\r\n\r\nbody\r\n")
    for mailbox_id in ids[:3]:
        emails = await creatio.wait_for_emails(mailbox_id, 3, timeout=30)
        assert [e["Subject"] for e in emails] == ["first", "second", "third"]

    # Nothing was delivered twice anywhere.
    delivered = [
        (mailbox_id, e["Id"], e["Subject"]) for mailbox_id in ids for e in creatio.emails_for(mailbox_id)
    ]
    per_mailbox = Counter((d[0][:8], d[2]) for d in delivered)
    assert len(delivered) == len({d[1] for d in delivered}) == 21, {
        k: v for k, v in per_mailbox.items() if v > 1
    }


async def test_full_cluster_restart_resumes_without_recreate(
    running_cluster: Cluster, dovecot: Dovecot, creatio: CreatioStandIn
) -> None:
    c = running_cluster
    await c.start("p1", "primary")
    await c.start("s1", "secondary")
    users = [dovecot.add_user() for _ in range(3)]
    creds = [credentials(dovecot, u, creatio) for u in users]
    ids = [cr["Id"] for cr in creds]
    assert (await c.nodes["p1"].post("/api/listeners/create", creds)).status_code == 200

    async def all_listen() -> bool:
        return len(await owners(c, "p1")) == 3

    await eventually(all_listen, "3 mailboxes listen")
    for user in users:
        await dovecot.aappend(user, b"Subject: before\r\n\r\nbody\r\n")
    for mailbox_id in ids:
        await creatio.wait_for_emails(mailbox_id, 1, timeout=30)

    # Everything stops cleanly; mail arrives while nothing runs.
    # In a thread: the Creatio stand-in shares this test's event loop and must keep answering.
    assert await trio.to_thread.run_sync(c.nodes["p1"].terminate) == 0
    assert await trio.to_thread.run_sync(c.nodes["s1"].terminate) == 0
    for user in users:
        await dovecot.aappend(user, b"Subject: while down\r\n\r\nbody\r\n")

    await c.start("p1", "primary")
    await c.start("s1", "secondary")
    for mailbox_id in ids:
        emails = await creatio.wait_for_emails(mailbox_id, 2, timeout=30)
        assert [e["Subject"] for e in emails] == ["before", "while down"]
    states = (await c.nodes["p1"].post("/api/listeners/subscriptionsstate", ids)).json()
    assert {v["State"] for v in states.values()} == {"exists"}
