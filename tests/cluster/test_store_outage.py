"""Found by the chaos soak (bench/soak.py, seed 7): Redis restarted while listeners reconnect.

A listener that fails while the store is unreachable records its new state in the store; that
write failed too, the StoreError left the mailbox's supervisor and stopped the whole node (exit
3), and with it every mailbox it listened to, until something restarted it. Both primaries of
the soak went down this way in one Redis restart."""

from __future__ import annotations

import pytest
import trio

from tests.cluster.test_faults import Proxied, count, proxied, report, settled, start_listening, start_nodes
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot

__all__ = ["proxied"]  # the fixture, shared with the other fault tests


@pytest.mark.redis
@pytest.mark.rabbitmq
async def test_listeners_failing_while_redis_is_down_do_not_stop_the_node(
    proxied: Proxied, dovecot: Dovecot, creatio: CreatioStandIn
) -> None:
    c = proxied.cluster
    # Leases that outlast the state writes' failure (the Redis client's retries, 1.5 s and
    # more): with the suite's 2 s TTL the node could lose contact and stop its mailboxes first,
    # cancelling the very writes this test is about (seen: the line never came).
    c.env_overrides.update({"EMLISTEN_LEASE_TTL_SECONDS": "30", "EMLISTEN_LEASE_RENEW_SECONDS": "1"})
    await start_nodes(c, {"p1": "primary", "s1": "secondary"})
    flow = await start_listening(c, dovecot, creatio, mailboxes=2)
    log_offset = len(c.nodes["p1"].log_text())

    proxied.redis.block()
    # The IMAP sessions end while Redis is unreachable: each supervisor records the failure.
    for user in flow.users.values():
        await dovecot.akick(user)
    # The write fails only after the Redis client's own retries (5, with connect timeouts),
    # which can take over 20 s on a busy machine.
    with trio.fail_after(60):
        while "could not record the state" not in c.nodes["p1"].log_text()[log_offset:]:
            assert c.nodes["p1"].alive, c.nodes["p1"].log_text()[-3000:]
            await trio.sleep(0.05)
    proxied.redis.unblock()

    await flow.append("after-outage")
    problem = await settled(flow, creatio, c, "p1", ("p1", "s1"))
    report(count("listeners failing during a Redis outage", flow, creatio), problem)
    assert c.nodes["p1"].alive


@pytest.mark.redis
@pytest.mark.rabbitmq
async def test_a_checkpoint_lost_to_a_redis_outage_is_written_later_not_delivered_twice(
    proxied: Proxied, dovecot: Dovecot, creatio: CreatioStandIn
) -> None:
    """Found by the chaos soak: Creatio accepted a delivery while Redis was down, the checkpoint
    write failed, and the retry delivered the mail again from the old checkpoint. Now the write
    is retried until Redis is back; the mail stays delivered once."""
    c = proxied.cluster
    await start_nodes(c, {"p1": "primary", "s1": "secondary"})
    flow = await start_listening(c, dovecot, creatio, mailboxes=1)
    await flow.append("before")
    await settled(flow, creatio, c, "p1", ("p1", "s1"))

    creatio.hold_next("ProcessFullEmail")
    await flow.append("accepted during the outage")
    await creatio.wait_held(timeout=20)
    log_offset = len(c.nodes["s1"].log_text())
    proxied.redis.block()
    creatio.release()  # Creatio accepts the mail; the secondary cannot record it
    with trio.fail_after(60):
        while "could not record the checkpoint" not in c.nodes["s1"].log_text()[log_offset:]:
            assert c.nodes["s1"].alive, c.nodes["s1"].log_text()[-3000:]
            await trio.sleep(0.05)
    proxied.redis.unblock()

    await flow.append("after")
    problem = await settled(flow, creatio, c, "p1", ("p1", "s1"))
    report(count("checkpoint write during a Redis outage", flow, creatio), problem)
