"""Scenario ``failover``: a primary is SIGKILLed; how long until its mailboxes listen again on the
survivors, and whether the mail that arrived meanwhile is delivered exactly once.

Three primaries and one secondary (``--primaries``, ``--secondaries``) run as separate processes
on the real Redis and RabbitMQ, with a key prefix and a queue name of this run's own (both
deleted at the end). N mailboxes are registered through the first primary; the bench waits until
all listen, spread evenly over the primaries (each primary holding as many IDLE connections to
Dovecot as it holds leases). Then the last primary gets SIGKILL - no clean hand-over, its leases
expire after the lease TTL - and right after the kill one mail is appended to each of its
mailboxes (or ``--mails`` of them) while nobody listens to them.

- failover = SIGKILL -> the moment ``GET /v1/mailboxes`` shows all N mailboxes ``listening``
  with a ``node`` (lease holder) other than the dead one. ``state`` is the last status written,
  so for the dead node's mailboxes only a ``listening`` written after the kill counts (its
  ``updated_at``), not the dead node's stale one. That moment is the latest ``updated_at`` of
  the mailboxes taken over, confirmed by a poll of ``/v1/mailboxes`` (on the secondary, or on the
  first primary without one) showing all N so; the poll's own time is reported next to it,
  since one such call over N mailboxes takes a while;
- claim rounds: when each lease was claimed, by whom (read straight from Redis, diagnostics);
- per mailbox taken over: the time its new owner wrote ``listening`` (``updated_at`` - kill);
- lost = mails appended - distinct mails delivered; duplicated = repeated ``Email.Id``s.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench._harness import (
    Appender,
    BenchError,
    CallbackIndex,
    ClusterStack,
    Progress,
    Result,
    add_cluster_arguments,
    add_common_arguments,
    bench_dovecot,
    bench_message,
    close_all,
    common_params,
    connect_appenders,
    create_users,
    machine_facts,
    open_cluster,
    prepare_mailboxes,
    say,
    summary_ms,
)
from tests.servers.dovecot import Dovecot, MailUser

TARGET_FAILOVER_SECONDS = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, mailboxes=1000)
    add_cluster_arguments(parser)
    parser.add_argument("--primaries", type=int, default=3, help="primary nodes (default 3)")
    parser.add_argument("--secondaries", type=int, default=1, help="secondary nodes (default 1)")
    parser.add_argument(
        "--lease-ttl", type=float, default=6.0, help="EMLISTEN_LEASE_TTL_SECONDS (default 6, production's)"
    )
    parser.add_argument(
        "--lease-renew",
        type=float,
        default=0.0,
        help="EMLISTEN_LEASE_RENEW_SECONDS (default: a third of the TTL, production's 2 s for 6 s)",
    )
    parser.add_argument(
        "--mails",
        type=int,
        default=0,
        help="mails appended after the kill, one per mailbox of the killed node (default 0: all of them)",
    )
    parser.add_argument("--parallel", type=int, default=8, help="concurrent APPEND connections (default 8)")
    parser.add_argument(
        "--failover-timeout", type=float, default=120.0, help="give up waiting for the takeover (default 120)"
    )
    parser.add_argument(
        "--callback-timeout",
        type=float,
        default=60.0,
        help="give up when no callback arrived for this long (default 60)",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.1,
        help="pause between two GET /v1/mailboxes polls after the kill (default 0.1)",
    )
    parser.add_argument(
        "--duplicate-grace",
        type=float,
        default=3.0,
        help="seconds to keep watching for duplicate deliveries once all mails arrived (default 3)",
    )


def lease_renew_seconds(args: argparse.Namespace) -> float:
    return float(args.lease_renew) if args.lease_renew > 0 else args.lease_ttl / 3


def run(args: argparse.Namespace) -> Result:
    if args.primaries < 2:
        raise BenchError("failover needs at least 2 primaries (one is killed)")
    if args.mailboxes < args.primaries:
        raise BenchError("failover needs at least one mailbox per primary")
    if lease_renew_seconds(args) > args.lease_ttl / 2:
        raise BenchError("--lease-renew must be at most half of --lease-ttl (emlisten refuses it)")
    with bench_dovecot(args) as dovecot:
        users = create_users(dovecot, args.mailboxes)
        return trio.run(_measure, args, dovecot, users)


# -- observing ownership -----------------------------------------------------------------------


def fair_share_bounds(mailboxes: int, primaries: int) -> tuple[int, int]:
    """(least, most) mailboxes a primary holds once the cluster is balanced: each claims up to
    ceil(N / primaries), so the last one gets what is left."""
    most = math.ceil(mailboxes / primaries)
    return max(0, mailboxes - (primaries - 1) * most), most


def listening_owners(items: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Mailbox id -> lease holder, for the mailboxes whose last status is ``listening``."""
    return {m["id"]: m["node"] for m in items if m.get("state") == "listening" and m.get("node")}


def taken_over(
    items: Sequence[dict[str, Any]], dead: str, dead_mailboxes: set[str], killed_wall: float
) -> set[str]:
    """Mailboxes listening on a live node: a lease holder other than ``dead`` and, for the dead
    node's mailboxes, a ``listening`` status written after the kill (not the dead node's stale one)."""
    return {
        m["id"]
        for m in items
        if m.get("state") == "listening"
        and m.get("node") not in (None, dead)
        and (m["id"] not in dead_mailboxes or float(m.get("updated_at") or 0) >= killed_wall)
    }


async def _wait_spread(
    cluster: ClusterStack, observer: str, ids: Sequence[str], within: float
) -> tuple[dict[str, str], float]:
    """Until every mailbox listens, the primaries hold their fair share each, and each primary
    holds at least one mail connection per lease (the statuses are the truth of the last writer,
    the connections that of the process). Returns (owners, seconds)."""
    primaries = cluster.names("primary")
    least, most = fair_share_bounds(len(ids), len(primaries))
    started = time.monotonic()
    progress = Progress("listening, spread over the primaries", len(ids))
    owners: dict[str, str] = {}
    with trio.move_on_after(within):
        while True:
            owners = listening_owners(await cluster.mailboxes(observer))
            per_node = Counter(owners.values())
            progress.update(len(owners), " ".join(f"{p}={per_node.get(p, 0)}" for p in primaries))
            if len(owners) == len(ids) and all(least <= per_node.get(p, 0) <= most for p in primaries):
                connections = {p: cluster.nodes[p].connections_to(cluster.mail_ports) for p in primaries}
                if all(connections[p] >= per_node[p] for p in primaries):
                    progress.close(len(owners))
                    return owners, time.monotonic() - started
            await trio.sleep(0.2)
    progress.close(len(owners), "timed out")
    raise BenchError(
        f"the mailboxes did not spread over the primaries within {within:.0f}s: "
        f"{dict(Counter(owners.values()))} listening of {len(ids)}; logs in {cluster.log_dir}"
    )


@dataclass
class Takeover:
    """What the polls of ``/v1/mailboxes`` (and ``/v1/nodes``) saw after the kill, in seconds
    after it (each at the time the poll's answer arrived)."""

    seconds: float | None = None
    polls: list[tuple[float, float]] = field(default_factory=list)  # (answered after kill, took)
    leases_free: float | None = None  # no mailbox held by the dead node any more
    first_claim: float | None = None  # a dead node's mailbox held by a survivor
    heartbeat_gone: float | None = None  # the dead node no longer in /v1/nodes
    final: list[dict[str, Any]] = field(default_factory=list)


async def _watch_takeover(
    cluster: ClusterStack,
    observer: str,
    dead: str,
    dead_mailboxes: set[str],
    total: int,
    killed: float,
    killed_wall: float,
    within: float,
    interval: float,
) -> Takeover:
    seen = Takeover()
    progress = Progress("listening on the survivors", total)
    with trio.move_on_after(within):
        while True:
            asked = time.monotonic()
            items = await cluster.mailboxes(observer)
            nodes = await cluster.get_json(observer, "/v1/nodes")
            answered = time.monotonic()
            after = answered - killed
            seen.polls.append((round(after, 3), round(answered - asked, 3)))
            holders = {m["id"]: m.get("node") for m in items}
            if seen.leases_free is None and all(holders.get(i) != dead for i in dead_mailboxes):
                seen.leases_free = after
            if seen.first_claim is None and any(holders.get(i) not in (None, dead) for i in dead_mailboxes):
                seen.first_claim = after
            if seen.heartbeat_gone is None and all(n["id"] != dead for n in nodes["nodes"]):
                seen.heartbeat_gone = after
            done = taken_over(items, dead, dead_mailboxes, killed_wall)
            progress.update(len(done), f"{after:5.1f}s after the kill")
            if len(done) >= total:
                seen.seconds = after
                seen.final = items
                progress.close(total)
                return seen
            await trio.sleep(interval)
    progress.close(0, "timed out")
    seen.final = await cluster.mailboxes(observer)
    return seen


class LeaseWatch:
    """Diagnostics straight from Redis (the store's documented key layout, ``<prefix>lease:<id>``),
    one MGET + PTTLs every 100 ms from the kill until the run ends: when each of the dead node's
    leases was freed and claimed, how close each holder's leases came to expiring (a renewal
    that came late), and how often leases changed hands. The scenario's figures do not depend on it."""

    def __init__(
        self, cluster: ClusterStack, dead: str, all_ids: Sequence[str], dead_ids: Sequence[str]
    ) -> None:
        self.url = cluster.backends.redis_url
        self.ids = list(all_ids)
        self.keys = [f"{cluster.backends.prefix}lease:{i}" for i in self.ids]
        self.dead_ids = set(dead_ids)
        self.dead = dead
        self.freed: dict[str, float] = {}  # dead node's mailbox -> seconds after the kill
        self.claimed: dict[str, tuple[str, float]] = {}  # dead node's mailbox -> (node, seconds)
        self.min_ttl_ms: dict[str, int] = {}  # holder -> least remaining lease TTL seen
        self.moves = 0  # a lease going from one live holder to another (or lapsing and back)
        self.lapsed = 0  # a survivor's lease seen free after the takeover had begun
        self.error = ""
        self._holder: dict[str, str | None] = {}

    def _read(self, client: Any) -> tuple[list[str | None], list[int]]:
        pipe = client.pipeline(transaction=False)
        pipe.mget(self.keys)
        for key in self.keys:
            pipe.pttl(key)
        values, *ttls = pipe.execute()
        return [None if v is None else v.decode() for v in values], [int(t) for t in ttls]

    async def run(self, killed: float) -> None:
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=5)
        try:
            while True:
                holders, ttls = await trio.to_thread.run_sync(self._read, client)
                after = round(time.monotonic() - killed, 3)
                for mailbox_id, holder, ttl in zip(self.ids, holders, ttls, strict=True):
                    previous = self._holder.get(
                        mailbox_id, self.dead if mailbox_id in self.dead_ids else holder
                    )
                    if mailbox_id in self.dead_ids and holder != self.dead:
                        self.freed.setdefault(mailbox_id, after)
                        if holder is not None:
                            self.claimed.setdefault(mailbox_id, (holder, after))
                    if holder is None and previous not in (None, self.dead):
                        self.lapsed += 1
                    if holder is not None and previous not in (None, self.dead, holder):
                        self.moves += 1
                    if holder is not None and holder != self.dead and ttl >= 0:
                        self.min_ttl_ms[holder] = min(ttl, self.min_ttl_ms.get(holder, ttl))
                    self._holder[mailbox_id] = holder
                await trio.sleep(0.1)
        except redis.RedisError as exc:
            self.error = str(exc)
        finally:
            client.close()

    def claim_rounds(self, gap: float = 0.3) -> list[dict[str, Any]]:
        """Claims grouped per node into rounds (claims less than ``gap`` apart)."""
        rounds: list[dict[str, Any]] = []
        for node in sorted({n for n, _ in self.claimed.values()}):
            times = sorted(at for n, at in self.claimed.values() if n == node)
            for at in times:
                last = rounds[-1] if rounds else None
                if last is not None and last["node"] == node and at - last["last_s"] <= gap:
                    last["mailboxes"] += 1
                    last["last_s"] = at
                else:
                    rounds.append({"node": node, "first_s": at, "last_s": at, "mailboxes": 1})
        return sorted(rounds, key=lambda r: float(r["first_s"]))


# -- the mail appended while nobody listens ------------------------------------------------------


async def _append_sample(
    appenders: Sequence[Appender], run_tag: str, parallel: int, appended_wall: list[float]
) -> None:
    """Mail i to appender i; ``parallel`` connections at a time; records each APPEND's OK time."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(appenders):
            i, next_index = next_index, next_index + 1
            await appenders[i].append(bench_message(run_tag, i))
            appended_wall[i] = time.time()

    async with trio.open_nursery() as nursery:
        for _ in range(min(parallel, len(appenders))):
            nursery.start_soon(worker)


def _lease_expiry_after_kill(cluster: ClusterStack, dead: str, mailbox_ids: Sequence[str]) -> dict[str, Any]:
    """Read straight from Redis just before the kill (diagnostics only): in how many seconds the
    dead node's leases and heartbeat would expire. Uses the store's key layout
    (``<prefix>lease:<id>``, ``<prefix>node-expiry``); empty when that cannot be read."""
    import redis

    prefix = cluster.backends.prefix
    try:
        client = redis.Redis.from_url(cluster.backends.redis_url, socket_timeout=5)
        try:
            pipe = client.pipeline(transaction=False)
            pipe.time()
            pipe.zscore(f"{prefix}node-expiry", dead)
            for mailbox_id in mailbox_ids:
                pipe.pttl(f"{prefix}lease:{mailbox_id}")
            answers = pipe.execute()
        finally:
            client.close()
    except redis.RedisError as exc:
        return {"error": str(exc)}
    (seconds, micros), heartbeat_expiry_ms, *pttls = answers
    now_ms = seconds * 1000 + micros / 1000
    remaining = [p / 1000 for p in pttls if p is not None and p >= 0]
    return {
        "heartbeat_expires_in_s": None
        if heartbeat_expiry_ms is None
        else round((float(heartbeat_expiry_ms) - now_ms) / 1000, 3),
        "leases_expire_in_s_min": round(min(remaining), 3) if remaining else None,
        "leases_expire_in_s_max": round(max(remaining), 3) if remaining else None,
    }


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


# -- the run -----------------------------------------------------------------------------------


async def _measure(args: argparse.Namespace, dovecot: Dovecot, users: Sequence[MailUser]) -> Result:
    n = len(users)
    ttl, renew = args.lease_ttl, lease_renew_seconds(args)
    run_tag = uuid.uuid4().hex[:8]
    result = Result(
        "failover",
        {
            **common_params(args),
            "primaries": args.primaries,
            "secondaries": args.secondaries,
            "lease_ttl_s": ttl,
            "lease_renew_s": round(renew, 3),
            "mails": args.mails or "one per mailbox of the killed node",
        },
    )
    # The checkout may move on during a run (results record the commit when written).
    result.params["git_commit_at_start"] = machine_facts()["git_commit"]
    lease_env = {"EMLISTEN_LEASE_TTL_SECONDS": f"{ttl:g}", "EMLISTEN_LEASE_RENEW_SECONDS": f"{renew:g}"}
    await prepare_mailboxes(dovecot, users)
    async with open_cluster(
        args, dovecot, primaries=args.primaries, secondaries=args.secondaries, env=lease_env
    ) as cluster:
        result.params["backends"] = cluster.backends.describe()
        primaries, secondaries = cluster.names("primary"), cluster.names("secondary")
        observer = secondaries[0] if secondaries else primaries[0]
        dead = primaries[-1]
        survivors = [p for p in primaries if p != dead]

        credentials = [cluster.credentials(u) for u in users]
        user_of = {c["Id"]: u for c, u in zip(credentials, users, strict=True)}
        ids = [c["Id"] for c in credentials]
        say(f"registering {n} mailboxes through {primaries[0]}")
        started = time.monotonic()
        await cluster.register(credentials, via=primaries[0])
        registered = time.monotonic() - started
        listen_timeout = args.listen_timeout or max(120.0, n * 0.3)
        owners, _ = await _wait_spread(cluster, observer, ids, listen_timeout)
        cold_start = time.monotonic() - started
        spread = Counter(owners.values())

        dead_mailboxes = [i for i in ids if owners[i] == dead]
        sample = dead_mailboxes[: args.mails] if args.mails else dead_mailboxes
        appenders = await connect_appenders(cluster, [user_of[i] for i in sample])
        index = CallbackIndex(cluster.standin, run_tag)
        leases = LeaseWatch(cluster, dead, ids, dead_mailboxes)
        others = [name for name in cluster.nodes if name != dead]
        cpu_before = {name: cluster.nodes[name].cpu_seconds() for name in others}
        dovecot_before, machine_before = cluster.dovecot_cpu_seconds(), machine_cpu_ticks()
        expiry = await trio.to_thread.run_sync(_lease_expiry_after_kill, cluster, dead, dead_mailboxes)

        say(f"SIGKILL {dead} (pid {cluster.nodes[dead].pid}), holding {len(dead_mailboxes)} mailboxes")
        load_at_kill = [round(x, 2) for x in os.getloadavg()]
        killed_wall, killed = time.time(), time.monotonic()
        cluster.nodes[dead].kill()
        appended_wall = [0.0] * len(sample)
        async with trio.open_nursery() as watching:
            watching.start_soon(leases.run, killed)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_append_sample, appenders, run_tag, args.parallel, appended_wall)
                takeover = await _watch_takeover(
                    cluster,
                    observer,
                    dead,
                    set(dead_mailboxes),
                    n,
                    killed,
                    killed_wall,
                    args.failover_timeout,
                    args.poll_interval,
                )
                if takeover.seconds is None:
                    nursery.cancel_scope.cancel()
            cpu_used = {name: cluster.nodes[name].cpu_seconds() - cpu_before[name] for name in others}
            dovecot_cpu = cluster.dovecot_cpu_seconds() - dovecot_before
            machine_after = machine_cpu_ticks()
            machine_busy = (machine_after[0] - machine_before[0]) / max(
                1, machine_after[1] - machine_before[1]
            )
            if sample:
                say(
                    f"appended {len(sample)} mails to {dead}'s mailboxes "
                    f"within {max(appended_wall) - killed_wall:.2f} s"
                )

            complete = await index.wait_for(len(sample), args.callback_timeout, "delivered")
            delivered_after = (index.last_received - killed) if index.first_seen else None
            if args.duplicate_grace > 0:
                await trio.sleep(args.duplicate_grace)  # a duplicate would come after the original
            index.update()
            watching.cancel_scope.cancel()
        await close_all(appenders)
        final_connections = {p: cluster.nodes[p].connections_to(cluster.mail_ports) for p in survivors}
        problems = {name: node.log_problems() for name, node in cluster.nodes.items()}
        log_dir = cluster.log_dir
    clean_up = cluster.clean_up_outcome

    # -- figures -----------------------------------------------------------------------------
    final = {m["id"]: m for m in takeover.final}
    complete_takeover = takeover.seconds is not None
    new_owner = Counter(final[i].get("node") for i in dead_mailboxes if i in final)
    # When each taken-over mailbox's new owner wrote 'listening' (the status /v1/mailboxes shows).
    listened_at = {
        i: float(final[i].get("updated_at") or 0) - killed_wall
        for i in dead_mailboxes
        if i in final and final[i].get("state") == "listening" and final[i].get("node") != dead
    }
    store_seconds = max(listened_at.values()) if complete_takeover and listened_at else None
    per_survivor: dict[str, dict[str, Any]] = {}
    for p in survivors:
        times = sorted(t for i, t in listened_at.items() if final[i].get("node") == p)
        claims = sorted(at for node, at in leases.claimed.values() if node == p)
        if times:
            per_survivor[p] = {
                "mailboxes": len(times),
                "claimed_from_s": claims[0] if claims else None,
                "listening_first_s": round(times[0], 3),
                "listening_last_s": round(times[-1], 3),
            }
    unowned_appends = sum(
        1
        for k, i in enumerate(sample)
        if appended_wall[k] and appended_wall[k] - killed_wall < listened_at.get(i, math.inf)
    )
    lost = len(sample) - len(index.first_seen)
    polls = summary_ms([took for _, took in takeover.polls])
    freed = sorted(leases.freed.values())
    result.metrics.update(
        {
            "register_seconds": round(registered, 3),
            "cold_start_register_to_spread_seconds": round(cold_start, 3),
            "spread_before_kill": dict(spread),
            "killed_node": dead,
            "killed_node_mailboxes": len(dead_mailboxes),
            "failover_seconds": None if store_seconds is None else round(store_seconds, 3),
            "failover_seen_by_poll_seconds": None if takeover.seconds is None else round(takeover.seconds, 3),
            "takeover_listening_after_kill_ms": summary_ms(list(listened_at.values())),
            "takeover_per_survivor": per_survivor,
            "claim_rounds": leases.claim_rounds(),
            "leases_freed_after_s": [freed[0], freed[-1]] if freed else None,
            "lease_watch_error": leases.error or None,
            "lease_min_remaining_ttl_ms_per_holder": leases.min_ttl_ms,
            "lease_moves_between_live_nodes": leases.moves,
            "lease_lapses_of_live_nodes": leases.lapsed,
            "new_owners": dict(new_owner),
            "redis_at_kill": expiry,
            "poll_leases_free_seen_after_s": takeover.leases_free,
            "poll_first_claim_seen_after_s": takeover.first_claim,
            "poll_node_gone_seen_after_s": takeover.heartbeat_gone,
            "poll_ms": polls,
            "polls_after_kill_and_duration_s": takeover.polls,
            "node_cpu_seconds_kill_to_takeover": {p: round(c, 2) for p, c in cpu_used.items()},
            "dovecot_cpu_seconds_kill_to_takeover": round(dovecot_cpu, 2),
            "machine_cpu_busy_kill_to_takeover": round(machine_busy, 3),
            "load_avg_at_kill": load_at_kill,
            "survivor_mail_connections_after": final_connections,
            "mails_appended": len(sample),
            "mails_appended_while_unowned": unowned_appends,
            "append_seconds_after_kill": round(max(appended_wall) - killed_wall, 3) if sample else None,
            "delivered": len(index.first_seen),
            "lost": lost,
            "duplicated": index.duplicated,
            "last_delivery_after_kill_s": None if delivered_after is None else round(delivered_after, 3),
            "callbacks": index.calls,
            "complete": complete,
            "log_problem_lines": problems,
            "clean_up": clean_up,
        }
    )

    result.row(
        f"failover: SIGKILL -> all {n} listening on the survivors (store)",
        "not reached" if store_seconds is None else f"{store_seconds:.2f} s",
        f"< {TARGET_FAILOVER_SECONDS:g} s",
        store_seconds is not None and store_seconds < TARGET_FAILOVER_SECONDS,
    )
    result.row(
        "  the same, seen by the bench's GET /v1/mailboxes poll",
        "not reached" if takeover.seconds is None else f"{takeover.seconds:.2f} s",
    )
    if expiry.get("leases_expire_in_s_min") is not None:
        result.row(
            "  dead node's leases / heartbeat expire (Redis TTLs at the kill)",
            f"+{expiry['leases_expire_in_s_min']:.2f}..{expiry['leases_expire_in_s_max']:.2f} s / "
            f"+{expiry['heartbeat_expires_in_s']:.2f} s",
        )
    for r in leases.claim_rounds():
        result.row(
            f"  claim round of {r['node']} (leases read from Redis every 100 ms)",
            f"{r['mailboxes']} mailboxes at +{r['first_s']:.2f}..{r['last_s']:.2f} s",
        )
    for p, figures in per_survivor.items():
        result.row(
            f"  {p}: its new mailboxes listening",
            f"{figures['mailboxes']} from +{figures['listening_first_s']:.2f} to "
            f"+{figures['listening_last_s']:.2f} s",
        )
    if leases.min_ttl_ms:
        margins = ", ".join(f"{k} {v / 1000:.2f} s" for k, v in sorted(leases.min_ttl_ms.items()))
        result.row(
            "live nodes' leases, after the kill: least TTL left seen / moves / lapses",
            f"{margins} / {leases.moves} / {leases.lapsed}",
            "> 0 / 0 / 0",
            leases.moves == 0 and leases.lapsed == 0,
        )
    result.row(
        "mails appended to the dead node's mailboxes after the kill (of them before takeover)",
        f"{len(sample)} ({unowned_appends})",
    )
    result.row(
        "delivered / lost / duplicated",
        f"{len(index.first_seen)} / {lost} / {index.duplicated}",
        "all / 0 / 0",
        lost == 0 and index.duplicated == 0,
    )
    if delivered_after is not None:
        result.row("last of those mails delivered, after the kill", f"{delivered_after:.2f} s")
    result.row(
        "cold start: register (through one node) -> all listening, spread",
        f"{cold_start:.2f} s (create calls {registered:.2f} s; "
        f"{', '.join(f'{p} {spread[p]}' for p in primaries)})",
    )
    result.row(
        "CPU from the kill to the end of the poll that saw the takeover",
        ", ".join(f"{p} {c:.1f} s" for p, c in cpu_used.items())
        + f", Dovecot {dovecot_cpu:.1f} s; machine {100 * machine_busy:.0f} % busy "
        f"(load average at the kill {load_at_kill[0]:.1f})",
    )
    result.row(
        f"GET /v1/mailboxes ({n} mailboxes) on {observer} during the takeover: p50 / max",
        f"{polls.get('p50', 0):.0f} / {polls.get('max', 0):.0f} ms" if polls else "-",
    )

    result.notes.append(
        f"{args.primaries} primaries + {args.secondaries} secondary on Redis + RabbitMQ (own key prefix and "
        f"queue, deleted afterwards); EMLISTEN_LEASE_TTL_SECONDS={ttl:g}, "
        f"EMLISTEN_LEASE_RENEW_SECONDS={renew:g}, every other setting at its default; {dead} was killed "
        f"(SIGKILL) holding {len(dead_mailboxes)} mailboxes; ownership observed through GET /v1/mailboxes "
        f"on {observer}."
    )
    result.notes.append(
        "failover (store) = the last 'listening' status written by a new owner (its updated_at) - the kill: "
        "from that moment GET /v1/mailboxes shows all N listening on the survivors, as the bench's poll "
        "then confirmed. The poll's own figure adds the time one GET /v1/mailboxes takes (the last line)."
    )
    result.notes.append(
        "A survivor claims the dead node's mailboxes at its first ownership tick (every renew interval) "
        "after both the dead node's leases and its heartbeat expired (TTL after its last renewal): between "
        f"TTL - renew and TTL + renew ({ttl - renew:g}-{ttl + renew:g} s) after a crash; then it connects "
        "them."
    )
    if any(problems.values()):
        result.notes.append(
            "warning/error lines in the node logs: " + ", ".join(f"{k} {v}" for k, v in problems.items())
        )
    if takeover.seconds is None:
        result.notes.append(f"the takeover was not complete after {args.failover_timeout:g} s")
    result.notes.append(f"node logs: {log_dir}")
    return result
