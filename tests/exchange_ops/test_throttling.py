"""Throttling while listening: a mailbox the server throttles (EWS ``ErrorServerBusy`` with
``BackOffMilliseconds``, Graph 429 with ``Retry-After``) waits as asked; the other mailboxes of the
same node and server keep their pace."""

from __future__ import annotations

import time

import trio

from emlisten.models import MailboxState
from tests.ews.test_source import mime
from tests.exchange_ops.conftest import ews_account, ews_credentials, graph_account, graph_credentials
from tests.graph.conftest import GraphService
from tests.secret_scan import register_secret
from tests.servers.ews import EwsSimulator
from tests.servers.graph import GraphSimulator

#: How long the throttled mailbox is told to wait (seconds). The others must be delivered
#: before it ends: had the wait spread to them, they would come after it.
BACK_OFF = 3.0


async def create_listening(node: GraphService, *bodies: dict[str, object]) -> None:
    response = await node.http.post("/api/listeners/create", json=list(bodies))
    assert response.status_code == 200, response.text
    for body in bodies:
        await node.wait_state(str(body["Id"]), MailboxState.LISTENING)


async def delivered_within(node: GraphService, mailbox_id: str, started: float) -> float:
    """Seconds from ``started`` (time.monotonic) until the mailbox's first mail reached Creatio."""
    await node.creatio.wait_for_emails(mailbox_id, 1, timeout=15)
    return time.monotonic() - started


async def test_ews_server_busy_slows_only_the_throttled_mailbox(
    node: GraphService, ews_sim: EwsSimulator
) -> None:
    throttled, others = ews_account(ews_sim), [ews_account(ews_sim) for _ in range(3)]
    bodies = [ews_credentials(ews_sim, a, node.creatio) for a in [throttled, *others]]
    await create_listening(node, *bodies)

    # Busy for every request of that mailbox until the back-off has passed.
    ews_sim.throttle(throttled.address, back_off_ms=int(BACK_OFF * 1000), count=1)
    started = time.monotonic()
    for account in [throttled, *others]:
        ews_sim.add_message(account.address, mime(f"for {account.address}"))
    times: dict[str, float] = {}
    async with trio.open_nursery() as nursery:

        async def measure(mailbox_id: str) -> None:
            times[mailbox_id] = await delivered_within(node, mailbox_id, started)

        for body in bodies:
            nursery.start_soon(measure, str(body["Id"]))
    throttled_time = times.pop(str(bodies[0]["Id"]))
    assert all(t < BACK_OFF for t in times.values()), times
    assert throttled_time >= BACK_OFF, throttled_time
    busy = [r for r in ews_sim.requests if r.busy]
    assert busy and {r.mailbox for r in busy} == {throttled.address.lower()}


async def test_ews_server_busy_of_one_impersonated_mailbox_spares_the_others(
    node: GraphService, ews_sim: EwsSimulator
) -> None:
    """A service account's mailboxes share its connections: the throttled one waits without
    holding them."""
    service = ews_sim.add_account(can_impersonate=True)
    register_secret(service.password)
    targets = [ews_account(ews_sim) for _ in range(4)]
    bodies = [
        ews_credentials(
            ews_sim,
            service,
            node.creatio,
            SenderEmailAddress=target.address,
            ImpersonatedUser=target.address,
        )
        for target in targets
    ]
    await create_listening(node, *bodies)

    ews_sim.throttle(targets[0].address, back_off_ms=int(BACK_OFF * 1000), count=1)
    started = time.monotonic()
    for target in targets:
        ews_sim.add_message(target.address, mime(f"for {target.address}"))
    times: dict[str, float] = {}
    async with trio.open_nursery() as nursery:

        async def measure(mailbox_id: str) -> None:
            times[mailbox_id] = await delivered_within(node, mailbox_id, started)

        for body in bodies:
            nursery.start_soon(measure, str(body["Id"]))
    throttled_time = times.pop(str(bodies[0]["Id"]))
    assert all(t < BACK_OFF for t in times.values()), times
    assert throttled_time >= BACK_OFF, throttled_time
    busy = [r for r in ews_sim.requests if r.busy]
    assert busy and {r.mailbox for r in busy} == {targets[0].address.lower()}


async def test_graph_429_slows_only_the_throttled_mailbox(
    node: GraphService, graph_sim: GraphSimulator
) -> None:
    users = [graph_account(graph_sim) for _ in range(4)]
    bodies = [graph_credentials(graph_sim, address, token, node.creatio) for address, token in users]
    await create_listening(node, *bodies)

    throttled = users[0][0]
    graph_sim.throttle(1, retry_after=str(int(BACK_OFF)), user=throttled)
    started = time.monotonic()
    for address, _ in users:
        graph_sim.add_message(address, mime(f"for {address}"))
    times: dict[str, float] = {}
    async with trio.open_nursery() as nursery:

        async def measure(mailbox_id: str) -> None:
            times[mailbox_id] = await delivered_within(node, mailbox_id, started)

        for body in bodies:
            nursery.start_soon(measure, str(body["Id"]))
    throttled_time = times.pop(str(bodies[0]["Id"]))
    assert all(t < BACK_OFF for t in times.values()), times
    assert throttled_time >= BACK_OFF, throttled_time
    refused = [r for r in graph_sim.requests if r.status == 429]
    assert len(refused) == 1 and throttled in refused[0].path
