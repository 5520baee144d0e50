"""Found reviewing the flaky duplicates of test_store_outage / test_store_wipe: a secondary whose
checkpoint write of delivered mail is being retried through a Redis outage also renews the
folder's sync lease meanwhile. That renewal's StoreError ended the sync, and with it the
checkpoint write's retries: the task was retried from the old checkpoint once Redis was back and
delivered the mail a second time. The renewal now keeps trying; the write goes through."""

from __future__ import annotations

import pytest
import trio

from tests.cluster.test_faults import Proxied, count, proxied, report, settled, start_listening, start_nodes
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot

__all__ = ["proxied"]  # the fixture, shared with the other fault tests


@pytest.mark.redis
@pytest.mark.rabbitmq
async def test_a_sync_lease_renewal_failing_in_an_outage_does_not_deliver_the_mail_again(
    proxied: Proxied, dovecot: Dovecot, creatio: CreatioStandIn
) -> None:
    c = proxied.cluster
    await start_nodes(c, {"p1": "primary", "s1": "secondary"})
    flow = await start_listening(c, dovecot, creatio, mailboxes=1)
    await flow.append("before")
    await settled(flow, creatio, c, "p1", ("p1", "s1"))

    creatio.hold_next("ProcessFullEmail")
    await flow.append("accepted during the outage")
    await creatio.wait_held(timeout=20)
    s1 = c.nodes["s1"]
    offset = len(s1.log_text())
    proxied.redis.block()
    creatio.release()  # Creatio accepts the mail; the secondary cannot record it
    # Redis stays away until the sync lease's renewal (every TTL / 3) has failed as well, after
    # the client's retries: either it says so and goes on, or the sync ends ("delivery failed").
    with trio.fail_after(60):
        while not (
            "could not record the checkpoint" in (log := s1.log_text()[offset:])
            and any(line in log for line in ("cannot renew the sync lease", "delivery failed"))
        ):
            assert s1.alive, s1.log_text()[-3000:]
            await trio.sleep(0.05)
    proxied.redis.unblock()

    await flow.append("after")
    problem = await settled(flow, creatio, c, "p1", ("p1", "s1"))
    report(count("sync lease renewal failing during a Redis outage", flow, creatio), problem)
    assert "delivery failed" not in s1.log_text()[offset:]
