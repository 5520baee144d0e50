"""Webhooks in a cluster of real processes on the real Redis and RabbitMQ: one sender per receiver
(every event arrives once whichever node reads the mail), dead letters kept in Redis across a
restart of every node, and replayed from a node that was not there when they died."""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks
import trio

from tests.cluster.nodes import Cluster, NodeProcess, cluster
from tests.cluster.test_cluster import _delete_queues
from tests.contract.backends import delete_redis_keys
from tests.secret_scan import register_secret
from tests.servers.dovecot import Dovecot, MailUser
from tests.servers.webhook import WebhookReceiver

pytestmark = [pytest.mark.redis, pytest.mark.rabbitmq]

SECRET = register_secret("whsec_" + base64.b64encode(b"cluster-webhook-key-0123456789ab").decode())


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


async def start(c: Cluster, node_id: str) -> NodeProcess:
    env = c.env(node_id, "all") | {"EMLISTEN_WEBHOOK_RETRY_SCHEDULE": "0.05,0.05"}
    node = NodeProcess(node_id, "all", env, c.log_dir / f"{node_id}.log")
    await trio.to_thread.run_sync(node.start)
    c.nodes[node_id] = node
    return node


def mail(subject: str) -> bytes:
    message = EmailMessage()
    message["From"] = "sender@example.test"
    message["To"] = "rcpt@example.test"
    message["Subject"] = subject
    message.set_content("hello\n")
    return message.as_bytes()


async def register(node: NodeProcess, dovecot: Dovecot, user: MailUser, url: str) -> str:
    body = {
        "host": dovecot.host,
        "port": dovecot.imaps_port,
        "username": user.name,
        "password": user.password,
        "webhook": {"url": url, "secret": SECRET},
    }
    response = await node.post("/v1/mailboxes", body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def wait_listening(node: NodeProcess, ids: list[str]) -> None:
    with trio.fail_after(30):
        while True:
            states = {m["id"]: m["state"] for m in (await node.get("/v1/mailboxes"))["items"]}
            if all(states.get(i) == "listening" for i in ids):
                return
            await trio.sleep(0.05)


async def test_once_per_event_in_a_cluster_and_dead_letters_outlive_every_node(
    running_cluster: Cluster, dovecot: Dovecot, nursery: trio.Nursery
) -> None:
    c = running_cluster
    receiver = WebhookReceiver()
    await receiver.start(nursery)
    p1, p2 = await start(c, "p1"), await start(c, "p2")
    users = [dovecot.add_user() for _ in range(4)]
    ids = [await register(p1, dovecot, user, receiver.url("/hooks/cluster")) for user in users]
    await wait_listening(p2, ids)

    for round_ in range(2):
        for user in users:
            await dovecot.aappend(user, mail(f"round {round_} {user.name}"))
    calls = await receiver.wait_accepted("/hooks/cluster", 8, timeout=30)
    for call in calls:
        standardwebhooks.Webhook(SECRET).verify(call.body, call.headers)
    # Whichever node read the mail, each event was sent once, in order per mailbox.
    assert Counter(call.headers["webhook-id"] for call in calls).most_common(1)[0][1] == 1
    for user in users:
        subjects = [c_.event["data"]["subject"] for c_ in calls if user.name in c_.event["data"]["subject"]]
        assert subjects == [f"round 0 {user.name}", f"round 1 {user.name}"]

    receiver.behave("/hooks/cluster", status=410)
    await dovecot.aappend(users[0], mail("refused"))
    with trio.fail_after(30):
        while not (await p2.get("/v1/dead-letters"))["items"]:
            await trio.sleep(0.05)

    # Every node dies; a new one, on the same Redis, still has the dead letter and replays it.
    p1.kill()
    p2.kill()
    p3 = await start(c, "p3")
    (dead,) = (await p3.get("/v1/dead-letters"))["items"]
    assert (dead["mailbox"], dead["last_error"], dead["event"]["data"]["subject"]) == (
        ids[0],
        "HTTP 410",
        "refused",
    )
    receiver.behave("/hooks/cluster", status=204)
    replay: Any = await p3.post(f"/v1/dead-letters/{dead['id']}/replay", {})
    assert replay.status_code == 202
    calls = await receiver.wait_accepted("/hooks/cluster", 9, timeout=30)
    assert calls[-1].headers["webhook-id"] == dead["id"]
    assert (await p3.get("/v1/dead-letters"))["total"] == 0
