"""The store loses its data while mail flows (the soak's ``redis-wipe``: Redis restarted empty):
the primaries register again the mailboxes they run, with the checkpoints they know, and mail
keeps coming without Creatio re-creating anything (the stand-in here runs no failover job).

Before this, every registration, checkpoint and lease was gone until Creatio's 1-minute failover
job re-created the mailboxes: mail waited 60-85 s in the soak.

The checkpoints a primary knows lag the ones the workers wrote; the workers put theirs back when
they see the new incarnation, before the primaries restore, so no mail is delivered twice even
when the primary knows only what its sessions read when they connected."""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest
import redis
import trio

from tests.cluster.nodes import NodeProcess
from tests.cluster.test_cluster import eventually, owners
from tests.cluster.test_faults import (
    Figures,
    MailFlow,
    Proxied,
    count,
    proxied,
    report,
    settled,
    start_listening,
    start_nodes,
)
from tests.contract.backends import REDIS_URL
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot

__all__ = ["proxied"]  # the fixture, shared with the other fault tests

RESTORED = "the store lost its data (new incarnation): restoring"
PUT_BACK = re.compile(r"the store lost its data \(new incarnation\): put back (\d+) of the (\d+) checkpoint")
STEPPED_BACK = "lost contact with the store: stopping all mailboxes"


def _wipe(prefix: str) -> int:
    """Delete every key of the cluster (its private prefix): what Redis restarted empty is."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        return int(client.delete(*keys)) if keys else 0
    finally:
        client.close()


def _delivered_at(creatio: CreatioStandIn, subject: str) -> float | None:
    """When the first accepted ProcessFullEmail carrying ``subject`` arrived (time.monotonic)."""
    for call in creatio.accepted_calls("ProcessFullEmail"):
        for email in call.body.get("Emails", []) if isinstance(call.body, dict) else []:
            if email.get("Subject") == subject:
                return call.received_at
    return None


def _subjects(flow: MailFlow, label: str) -> list[str]:
    return [s for subjects in flow.sent.values() for s in subjects if s.startswith(f"{label}-")]


async def _refreshes(node: NodeProcess) -> int:
    """How many times the node re-read its mailboxes' checkpoints (its /metrics)."""
    async with httpx.AsyncClient(base_url=node.url, timeout=10) as http:
        text = (await http.get("/metrics")).text
    found = re.search(r"^emlisten_checkpoint_refreshes_total (\S+)$", text, re.MULTILINE)
    return int(float(found.group(1))) if found else 0


@dataclass(frozen=True)
class Wipe:
    name: str
    primaries: tuple[str, ...]
    #: EMLISTEN_CHECKPOINT_REFRESH_SECONDS of the nodes.
    refresh: str
    #: Every Redis connection reset as well, as a Redis restart does: the change feed is
    #: re-subscribed (its resync looks at the store too) while the balancing tick runs.
    cut: bool = False
    #: Redis unreachable for longer than the lease TTL around the wipe, as in the soak's
    #: redis-wipe (killed, started empty 5 s later): the primaries stop every mailbox first, and
    #: restore and restart them when the store is back.
    outage: bool = False


WIPES = [
    # The primary knows only the checkpoints its sessions read when they connected: the mail
    # the secondary delivered since then would come again without the secondary putting back
    # the checkpoints it wrote.
    Wipe("connect-only (refresh off)", ("p1",), refresh="0", cut=False),
    # It re-read them after that mail was delivered.
    Wipe("refreshed", ("p1",), refresh="0.3", cut=False),
    Wipe("two primaries, connections reset", ("p1", "p2"), refresh="0.3", cut=True),
    Wipe("unreachable past the lease TTL", ("p1",), refresh="0.3", outage=True),
]


@pytest.mark.redis
@pytest.mark.rabbitmq
@pytest.mark.parametrize("wipe", WIPES, ids=[w.name for w in WIPES])
async def test_mail_flows_on_after_the_store_lost_its_data(
    wipe: Wipe, proxied: Proxied, dovecot: Dovecot, creatio: CreatioStandIn
) -> None:
    c = proxied.cluster
    base_env = c.env

    def env(node_id: str, role: str) -> dict[str, str]:
        return {**base_env(node_id, role), "EMLISTEN_CHECKPOINT_REFRESH_SECONDS": wipe.refresh}

    c.env = env  # type: ignore[method-assign]
    await start_nodes(c, {**dict.fromkeys(wipe.primaries, "primary"), "s1": "secondary"})
    alive = (*wipe.primaries, "s1")
    flow = await start_listening(c, dovecot, creatio, mailboxes=2 * len(wipe.primaries))

    async def shared_fairly() -> bool:
        # Rebalancing restarts sessions: let it end before the sessions are watched.
        held = Counter((await owners(c, "p1")).values())
        return sorted(held.values()) == [2] * len(wipe.primaries) and set(held) == set(wipe.primaries)

    await eventually(shared_fairly, "each primary runs its share")
    await flow.append("before")
    assert await settled(flow, creatio, c, "p1", alive) is None
    primaries = [c.nodes[name] for name in wipe.primaries]
    if wipe.refresh != "0":
        # Two reads that began after every checkpoint covered the mail (settled says so).
        seen = {node.node_id: await _refreshes(node) for node in primaries}

        async def read_twice_more() -> bool:
            counts = [await _refreshes(node) - seen[node.node_id] for node in primaries]
            return min(counts) >= 2

        await eventually(read_twice_more, "two more checkpoint reads on every primary", timeout=20)
    offsets = {node.node_id: len(node.log_text()) for node in primaries}
    secondary_offset = len(c.nodes["s1"].log_text())

    if wipe.outage:
        proxied.redis.block()
        with trio.fail_after(60):  # the Redis client's retries first (seconds on a busy machine)
            while not all(STEPPED_BACK in node.log_text()[offsets[node.node_id] :] for node in primaries):
                await trio.sleep(0.05)
        wiped_at = time.monotonic()
        wiped = await trio.to_thread.run_sync(_wipe, c.prefix)
        await flow.append("in-the-window")
        back_at = time.monotonic()
        proxied.redis.unblock()
    else:
        # The window between the wipe and the restore, made certain: the primaries are frozen
        # while the store is emptied and mail arrives, so none can have restored before it.
        for node in primaries:
            assert node.process is not None
            node.process.send_signal(signal.SIGSTOP)
        try:
            wiped_at = time.monotonic()
            wiped = await trio.to_thread.run_sync(_wipe, c.prefix)
            if wipe.cut:
                proxied.redis.cut()
            await flow.append("in-the-window")
        finally:
            for node in primaries:
                assert node.process is not None
                node.process.send_signal(signal.SIGCONT)
        back_at = time.monotonic()
    assert wiped > 0

    with trio.fail_after(20):
        while not all(RESTORED in node.log_text()[offsets[node.node_id] :] for node in primaries):
            await trio.sleep(0.05)
    await flow.append("after-the-restore")
    problem = await settled(flow, creatio, c, "p1", alive)

    figures = Figures(f"redis wipe, restored by the primaries ({wipe.name})")
    copies: Counter[str] = Counter()
    for mailbox_id, subjects in flow.sent.items():
        emails = creatio.emails_for(mailbox_id)
        copies.update(e["Id"] for e in emails)
        got = {e.get("Subject") for e in emails}
        figures.sent += len(subjects)
        figures.delivered += len(set(subjects) & got)
        figures.lost += len(set(subjects) - got)
    figures.duplicated = sum(n - 1 for n in copies.values())
    delays = {
        label: max((_delivered_at(creatio, s) or float("inf")) - wiped_at for s in _subjects(flow, label))
        for label in ("in-the-window", "after-the-restore")
    }
    figures.notes = [f"wipe to delivery: {label} {delay:.2f}s" for label, delay in delays.items()]
    figures.notes.append(f"store back to delivery: {max(delays.values()) - (back_at - wiped_at):.2f}s")
    print(f"\n{figures}")
    assert problem is None, f"{figures}: {problem}"
    assert (figures.lost, figures.delivered) == (0, figures.sent), str(figures)
    # Nothing waited for Creatio's 1-minute job (the stand-in has none; it would be 60-85 s).
    assert max(delays.values()) < 20, figures.notes

    # No mail came twice: not even the mail the secondary delivered before the wipe, whose
    # checkpoints a primary that reads none since its sessions connected does not know (the
    # secondary put them back).
    repeated = {e.get("Subject") for m in flow.users for e in creatio.emails_for(m) if copies[e["Id"]] > 1}
    assert repeated == set(), repeated
    put_back = PUT_BACK.search(c.nodes["s1"].log_text()[secondary_offset:])
    assert put_back is not None, "the secondary did not put its checkpoints back"
    if wipe.refresh == "0":
        assert int(put_back.group(1)) > 0, put_back.group(0)  # the primary's would be older

    if wipe.outage:
        return  # the primaries stopped their sessions when they lost the store (see _renew_loop)
    # The sessions were never restarted: no "listening" again (each connect logs it), nothing
    # stopped or restarted, on any primary.
    for node in primaries:
        after = node.log_text()[offsets[node.node_id] :]
        for sign in ("] listening mailbox=", "restarting", "stopped listening"):
            assert sign not in after, f"{node.node_id} logged {sign!r} after the wipe:\n{after[-6000:]}"


@pytest.mark.redis
@pytest.mark.rabbitmq
async def test_mail_accepted_while_the_store_was_down_for_a_wipe_is_not_delivered_again(
    proxied: Proxied, dovecot: Dovecot, creatio: CreatioStandIn
) -> None:
    """Creatio accepts a delivery while Redis is down (and comes back empty): the secondary
    records that checkpoint into a store that no longer knows the mailbox, possibly after it put
    back the others. The primary, which reads no checkpoints after connecting, restores one older
    than both mails; neither comes again."""
    c = proxied.cluster
    base_env = c.env

    def env(node_id: str, role: str) -> dict[str, str]:
        return {**base_env(node_id, role), "EMLISTEN_CHECKPOINT_REFRESH_SECONDS": "0"}

    c.env = env  # type: ignore[method-assign]
    await start_nodes(c, {"p1": "primary", "s1": "secondary"})
    flow = await start_listening(c, dovecot, creatio, mailboxes=1)
    await flow.append("before")
    assert await settled(flow, creatio, c, "p1", ("p1", "s1")) is None

    creatio.hold_next("ProcessFullEmail")
    await flow.append("accepted-while-down")
    await creatio.wait_held(timeout=20)
    offsets = {name: len(c.nodes[name].log_text()) for name in ("p1", "s1")}
    proxied.redis.block()
    creatio.release()  # Creatio has the mail; the secondary cannot record it
    with trio.fail_after(60):
        while "could not record the checkpoint" not in c.nodes["s1"].log_text()[offsets["s1"] :]:
            assert c.nodes["s1"].alive, c.nodes["s1"].log_text()[-3000:]
            await trio.sleep(0.05)
    assert await trio.to_thread.run_sync(_wipe, c.prefix) > 0
    proxied.redis.unblock()

    with trio.fail_after(30):
        while RESTORED not in c.nodes["p1"].log_text()[offsets["p1"] :]:
            await trio.sleep(0.05)
    await flow.append("after")
    problem = await settled(flow, creatio, c, "p1", ("p1", "s1"))
    report(count("a delivery accepted while the store was down for a wipe", flow, creatio), problem)
