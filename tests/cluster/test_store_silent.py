"""A Redis that stops answering (stopped, or behind a path that drops packets without a reset):
connections stay up and no reply comes. The store's calls used to wait for ever, so the lease
renewal never failed and the primary never stepped back while its leases ran out and another
node could take its mailboxes over. Now it steps back 0.8 TTL after its last renewal, before the
leases expire, and comes back when Redis answers again."""

from __future__ import annotations

import pytest
import trio

from tests.cluster.test_faults import (
    Proxied,
    all_listening,
    count,
    proxied,
    report,
    settled,
    start_listening,
    start_nodes,
)
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot

__all__ = ["proxied"]  # the fixture, shared with the other fault tests

TTL = 5.0


@pytest.mark.redis
@pytest.mark.rabbitmq
async def test_a_primary_whose_redis_stops_answering_steps_back_before_its_leases_expire(
    proxied: Proxied, dovecot: Dovecot, creatio: CreatioStandIn
) -> None:
    c = proxied.cluster
    c.env_overrides.update({"EMLISTEN_LEASE_TTL_SECONDS": f"{TTL:g}", "EMLISTEN_LEASE_RENEW_SECONDS": "1"})
    await start_nodes(c, {"p1": "primary", "s1": "secondary"})
    flow = await start_listening(c, dovecot, creatio, mailboxes=2)
    await flow.append("before")
    await settled(flow, creatio, c, "p1", ("p1", "s1"))
    offset = len(c.nodes["p1"].log_text())

    proxied.redis.black_hole()
    started = trio.current_time()
    with trio.fail_after(30):
        while "lost contact with the store" not in c.nodes["p1"].log_text()[offset:]:
            assert c.nodes["p1"].alive, c.nodes["p1"].log_text()[-3000:]
            await trio.sleep(0.05)
    took = trio.current_time() - started
    # The last renewal began before the black hole, and its leases live a TTL from then at
    # least; stepping back is due 0.8 TTL after it began.
    assert took < TTL, f"stepped back {took:.1f} s after Redis stopped answering (TTL {TTL:g} s)"
    proxied.redis.restore()

    await all_listening(c, flow, "p1")
    await flow.append("after")
    problem = await settled(flow, creatio, c, "p1", ("p1", "s1"))
    report(count("redis stops answering", flow, creatio), problem)
    assert c.nodes["p1"].alive
