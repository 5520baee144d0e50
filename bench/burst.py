"""Scenario ``burst``: how fast a backlog drains, and that nothing is lost or doubled.

APPEND runs at only some hundreds of mails per second on one machine (Dovecot writes and fsyncs
each one), slower than the rate to measure. So emlisten is frozen (SIGSTOP) while M mails of
about 5 KB are appended over the N listening mailboxes (parallel APPEND connections); Dovecot's
EXISTS notifications wait in the sockets. Then SIGCONT, and:

- drain rate = mails delivered / (last callback received - SIGCONT);
- lost = expected - distinct mails delivered (must be 0);
- duplicated = deliveries of an Email.Id already delivered (must be 0);
- IMAP sessions opened during the drain: LOGIN/AUTHENTICATE answered OK, from each process's
  ``/metrics`` (``emlisten_imap_commands_total``) read before the freeze and after the drain, next
  to how many of the mail connections held before the freeze are still open after it (the same
  socket) and the "lost N lease(s)" lines the processes logged meanwhile.

``python -m bench backlog`` is the same measurement in the N mailboxes x M mails shape
(bench/backlog.py).

Topologies (``--topology``):

- ``all`` (default): one ``--role=all`` process with the in-memory store and queue;
- ``primary+secondary`` (``--cluster``): one ``--role=primary`` process (IDLE, publishes the
  fetch tasks) and one ``--role=secondary`` process (fetches and calls back) on the real Redis
  and RabbitMQ, with a key prefix and queue of the run's own, deleted at the end. BOTH processes
  are frozen and thawed together. The lease TTL is raised (``--lease-ttl``, default 60 s) so
  that the freeze does not let the primary's leases lapse: that would be a failover, not a burst.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import trio

from bench._harness import (
    Appender,
    BenchError,
    CallbackIndex,
    ClusterStack,
    EmlistenProcess,
    Progress,
    Result,
    SessionCounts,
    add_cluster_arguments,
    add_common_arguments,
    bench_dovecot,
    bench_message,
    close_all,
    common_params,
    connect_appenders,
    connect_appenders_to,
    create_users,
    established_inodes,
    lost_leases,
    open_cluster,
    open_stack,
    prepare_mailboxes,
    say,
    session_counts,
)
from bench._rawimap import RawImap, RawImapError
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot, MailUser

TARGET_MAILS_PER_SECOND = 1000.0
TOPOLOGIES = ("all", "primary+secondary")


def add_arguments(parser: argparse.ArgumentParser, *, mailboxes: int = 100) -> None:
    add_common_arguments(parser, mailboxes=mailboxes)
    add_cluster_arguments(parser)
    parser.add_argument("--mails", type=int, default=2000, help="mails in the burst (default 2000)")
    parser.add_argument("--size", type=int, default=5000, help="approximate bytes per mail (default 5000)")
    parser.add_argument("--parallel", type=int, default=8, help="concurrent APPEND connections (default 8)")
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        help="give up when no callback arrived for this long (default 30)",
    )
    parser.add_argument(
        "--topology",
        choices=TOPOLOGIES,
        default="all",
        help="'all': one --role=all process (default); 'primary+secondary': a primary and a "
        "secondary on Redis + RabbitMQ",
    )
    parser.add_argument(
        "--cluster",
        dest="topology",
        action="store_const",
        const="primary+secondary",
        help="the same as --topology primary+secondary",
    )
    parser.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="after emlisten's drain, measure the server's own floor on the same Dovecot: a bare "
        "client with one IDLE session per mailbox, idle (so hibernated) while the same backlog is "
        "appended, then DONE / UID FETCH / IDLE on every session, at most --floor-wakeups at once",
    )
    parser.add_argument(
        "--floor-wakeups",
        type=int,
        default=128,
        help="the floor client's sessions ending IDLE at once (default 128, as emlisten's "
        "EMLISTEN_MAX_CONCURRENT_WAKEUPS; 0: all at once)",
    )
    parser.add_argument(
        "--thaw-delay",
        type=float,
        default=1.0,
        help="seconds between the last APPEND and the thaw (and the floor client's drain), for "
        "the server to tell the idle sessions of the backlog (default 1; 45 at 10,000 x 1 "
        "changed nothing: docs/performance.md, session 14)",
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=60.0,
        help="EMLISTEN_LEASE_TTL_SECONDS for primary+secondary, renewal a third of it (default 60: "
        "longer than the freeze, so no lease lapses while the nodes are stopped)",
    )


def run(args: argparse.Namespace) -> Result:
    return run_scenario(
        args, "burst", {"all": TARGET_MAILS_PER_SECOND, "primary+secondary": TARGET_MAILS_PER_SECOND}
    )


def run_scenario(args: argparse.Namespace, scenario: str, targets: Mapping[str, float]) -> Result:
    """The burst measurement under the name ``scenario``, with a drain-rate target per topology
    (``args.mails`` mails round-robin over ``args.mailboxes`` mailboxes)."""
    with bench_dovecot(args) as dovecot:
        users = create_users(dovecot, args.mailboxes)
        measure = _measure_cluster if args.topology == "primary+secondary" else _measure_all
        return trio.run(measure, args, dovecot, users, scenario, targets[args.topology])


async def _append_all(
    appenders: Sequence[Appender], run_tag: str, mails: int, size: int, parallel: int
) -> None:
    """Mail i goes to mailbox i % N; worker w serves the mailboxes with index % parallel == w, so
    no connection is used by two tasks at once."""
    n = len(appenders)
    progress = Progress("appending", mails)
    done = 0

    async def worker(w: int) -> None:
        nonlocal done
        for i in range(mails):
            if (i % n) % parallel == w:
                await appenders[i % n].append(bench_message(run_tag, i, size))
                done += 1
                progress.update(done)

    async with trio.open_nursery() as nursery:
        for w in range(min(parallel, n)):
            nursery.start_soon(worker, w)
    progress.close(done)


def _params(args: argparse.Namespace) -> dict[str, Any]:
    params = {
        **common_params(args),
        "topology": args.topology,
        "mails": args.mails,
        "size_bytes": args.size,
        "parallel_appends": args.parallel,
        "thaw_delay_seconds": args.thaw_delay,
    }
    if getattr(args, "mails_per_mailbox", None):
        params["mails_per_mailbox"] = args.mails_per_mailbox
    return params


async def _freeze_append_thaw(
    processes: Mapping[str, EmlistenProcess],
    standin: CreatioStandIn,
    appenders: Sequence[Appender],
    args: argparse.Namespace,
    *,
    http: httpx.AsyncClient,
    mail_ports: Sequence[int],
) -> dict[str, Any]:
    """Freeze every process, append the backlog, thaw them all, wait for the drain. Returns the
    raw figures (shared by every topology)."""
    m = args.mails
    run_tag = uuid.uuid4().hex[:8]
    index = CallbackIndex(standin, run_tag)
    sessions_before = {name: await session_counts(http, p.url) for name, p in processes.items()}
    held_before = {name: established_inodes(p.pid, mail_ports) for name, p in processes.items()}
    log_offsets = {name: p.log_size() for name, p in processes.items()}
    names = ", ".join(f"{name} (pid {p.pid})" for name, p in processes.items())
    say(f"freezing {names} (SIGSTOP)")
    frozen_at = time.monotonic()
    for process in processes.values():
        process.freeze()
    try:
        append_started = time.monotonic()
        await _append_all(appenders, run_tag, m, args.size, args.parallel)
        append_seconds = time.monotonic() - append_started
        # Dovecot notifies IDLE sessions asynchronously (and un-hibernates them first).
        await trio.sleep(args.thaw_delay)
        index.update()
        if index.first_seen:
            raise BenchError("callbacks arrived while emlisten was frozen: the freeze did not hold")
        cpu_before = {name: p.cpu_seconds() for name, p in processes.items()}
    finally:
        for process in processes.values():
            process.thaw()
    thawed_at = time.monotonic()
    say(f"thawed {', '.join(processes)} (SIGCONT) after {thawed_at - frozen_at:.1f} s")
    complete = await index.wait_for(m, args.stall_timeout, "delivered")
    cpu_used = {name: p.cpu_seconds() - cpu_before[name] for name, p in processes.items()}
    held_after = {name: established_inodes(p.pid, mail_ports) for name, p in processes.items()}
    sessions = {
        name: await session_counts(http, p.url) - sessions_before[name] for name, p in processes.items()
    }
    leases = {name: lost_leases(p, log_offsets[name]) for name, p in processes.items()}
    delivered = len(index.first_seen)
    drain_seconds = index.last_received - thawed_at if delivered else 0.0
    return {
        "frozen_seconds": thawed_at - frozen_at,
        "append_seconds": append_seconds,
        "drain_seconds": drain_seconds,
        "delivered": delivered,
        "duplicated": index.duplicated,
        "callbacks": index.calls,
        "emails": index.emails,
        "cpu_used": cpu_used,
        "complete": complete,
        "sessions": sessions,
        "connections_before": {name: len(held) for name, held in held_before.items()},
        "connections_survived": {name: len(held & held_after[name]) for name, held in held_before.items()},
        "connections_after": {name: len(held) for name, held in held_after.items()},
        "lost_leases": leases,
    }


def _per_process(values: Mapping[str, int]) -> str:
    return "" if len(values) < 2 else " (" + ", ".join(f"{k} {v}" for k, v in values.items()) + ")"


def _report(result: Result, raw: Mapping[str, Any], mails: int, target: float) -> None:
    """Metrics and table rows from :func:`_freeze_append_thaw`'s figures."""
    delivered, drain_seconds = raw["delivered"], raw["drain_seconds"]
    rate = delivered / drain_seconds if drain_seconds > 0 else 0.0
    lost = mails - delivered
    cpu_used: dict[str, float] = raw["cpu_used"]
    cpu_total = sum(cpu_used.values())
    calls, emails = raw["callbacks"], raw["emails"]
    per_call = round(emails / calls, 2) if calls else None
    result.metrics.update(
        {
            "frozen_seconds": round(raw["frozen_seconds"], 3),
            "append_seconds": round(raw["append_seconds"], 3),
            "append_rate_per_second": round(mails / raw["append_seconds"], 1),
            "drain_seconds": round(drain_seconds, 3),
            "drain_rate_per_second": round(rate, 1),
            "delivered": delivered,
            "lost": lost,
            "duplicated": raw["duplicated"],
            "callbacks": calls,
            "emails_per_callback": per_call,
            "emlisten_cpu_seconds_during_drain": round(cpu_total, 3),
            "emlisten_cpu_seconds_during_drain_per_process": {k: round(v, 3) for k, v in cpu_used.items()},
            "emlisten_cpu_ms_per_mail": round(1000 * cpu_total / delivered, 3) if delivered else None,
            "complete": raw["complete"],
            "sessions_opened_during_drain": {k: v.as_dict() for k, v in raw["sessions"].items()},
            "mail_connections_before_freeze": raw["connections_before"],
            "mail_connections_survived_drain": raw["connections_survived"],
            "mail_connections_after_drain": raw["connections_after"],
            "lost_lease_log_lines": {
                k: {"lines": v[0], "leases": v[1]} for k, v in raw["lost_leases"].items()
            },
        }
    )
    result.row(
        "drain rate (SIGCONT -> last callback)",
        f"{rate:.0f} mails/s ({delivered} in {drain_seconds:.2f} s)",
        f">= {target:g} mails/s",
        rate >= target,
    )
    result.row("lost", str(lost), "0", lost == 0)
    result.row("duplicated", str(raw["duplicated"]), "0", raw["duplicated"] == 0)
    result.row("callbacks / emails per callback", f"{calls} / {per_call}")
    per_mail = f"{1000 * cpu_total / delivered:.2f} ms" if delivered else "-"
    if len(cpu_used) > 1:
        per_mail += " (" + ", ".join(f"{k} {v:.2f} s" for k, v in cpu_used.items()) + ")"
    result.row("emlisten CPU per mail during the drain", per_mail)
    result.row("APPEND rate while frozen (for reference)", f"{mails / raw['append_seconds']:.0f} mails/s")
    result.row("frozen for (APPEND + the thaw delay)", f"{raw['frozen_seconds']:.1f} s")
    sessions: dict[str, SessionCounts] = raw["sessions"]
    opened = sum((s for s in sessions.values()), SessionCounts())
    result.row(
        "IMAP sessions opened, SIGSTOP -> drained (LOGIN/AUTHENTICATE OK, /metrics)",
        f"{opened.logins}{_per_process({k: v.logins for k, v in sessions.items()})}",
    )
    before, survived = raw["connections_before"], raw["connections_survived"]
    result.row(
        "mail connections held before the freeze / still open after the drain",
        f"{sum(before.values())} / {sum(survived.values())}",
    )
    if opened.reconnects:
        result.row("reconnects during the drain (emlisten_reconnects_total)", str(opened.reconnects))
    leases = raw["lost_leases"]
    lapse_lines, lapsed = sum(v[0] for v in leases.values()), sum(v[1] for v in leases.values())
    result.row("'lost N lease(s)' in the logs during the run", f"{lapse_lines} lines, {lapsed} leases")
    result.notes.append(
        "APPEND itself runs at only some hundreds of mails/s on this machine, below the rate to "
        "measure, so emlisten is frozen (SIGSTOP) while the backlog is appended and thawed (SIGCONT) "
        "to drain it."
    )
    result.notes.append(
        "The stand-in receiving the callbacks and Dovecot share the machine's 2 cores with emlisten."
    )


async def bare_client_drain(
    dovecot: Dovecot, users: Sequence[MailUser], args: argparse.Namespace, *, tls: bool
) -> dict[str, Any]:
    """The server's floor for the drain: what a client doing nothing but DONE, one
    ``UID FETCH next:* (UID BODY.PEEK[])`` and IDLE again on each of its IDLE sessions gets,
    after the same backlog was appended while the sessions sat in IDLE (hibernated, where the
    server hibernates them) exactly as emlisten's sat while frozen. No delivery, no parsing."""
    context = dovecot.client_ssl_context() if tls else None
    port = dovecot.imaps_port if tls else dovecot.imap_port
    sessions: list[tuple[RawImap, int, bytes, MailUser]] = []
    progress = Progress(f"floor: {len(users)} bare IDLE sessions", len(users))

    async def open_one(user: MailUser, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            client = await RawImap.connect(dovecot.host, port, context)
            try:
                await client.login(user.name, user.password)
                _, uidnext = await client.select_with_uidnext("INBOX")
                sessions.append((client, uidnext, await client.idle_start(), user))
            except BaseException:
                await client.aclose()
                raise
        progress.update(len(sessions))

    fetched = 0
    finished_at = 0.0
    closed_by_server = 0
    refetch_limiter = trio.CapacityLimiter(64)

    async def refetch(user: MailUser, uidnext: int) -> int:
        """What any client does when the server dropped its session: a new one, and fetch."""
        async with refetch_limiter:
            for _ in range(20):
                try:
                    client = await RawImap.connect(dovecot.host, port, context)
                except OSError:
                    await trio.sleep(0.5)
                    continue
                try:
                    await client.login(user.name, user.password)
                    await client.select_with_uidnext("INBOX")
                    count, _ = await client.uid_fetch_bodies(uidnext)
                    return count
                except (RawImapError, OSError, trio.BrokenResourceError):
                    await trio.sleep(0.5)
                finally:
                    await client.aclose()
        raise BenchError(f"floor: {user.name}: no session for 20 attempts")

    wakeups = trio.CapacityLimiter(args.floor_wakeups if args.floor_wakeups > 0 else len(users) or 1)

    async def drain_one(client: RawImap, uidnext: int, tag: bytes, user: MailUser) -> None:
        nonlocal fetched, finished_at, closed_by_server
        try:
            async with wakeups:
                await client.idle_done(tag)
                count, _ = await client.uid_fetch_bodies(uidnext)
            await client.idle_start()
        except (RawImapError, OSError, trio.BrokenResourceError):
            # Dovecot failing to un-hibernate thousands at once closes sessions.
            closed_by_server += 1
            count = await refetch(user, uidnext)
        fetched += count
        finished_at = max(finished_at, time.monotonic())

    appenders: list[Appender] = []
    try:
        limiter = trio.CapacityLimiter(64)
        async with trio.open_nursery() as nursery:
            for user in users:
                nursery.start_soon(open_one, user, limiter)
        progress.close(len(sessions))
        appenders = await connect_appenders_to(dovecot, users)
        # Let every session settle into IDLE (and into imap-hibernate) before the backlog lands.
        await trio.sleep(_settle_seconds(args))
        started = time.monotonic()
        await _append_all(appenders, uuid.uuid4().hex[:8], args.mails, args.size, args.parallel)
        await trio.sleep(args.thaw_delay)  # as emlisten's freeze: notifications wait in the sockets
        at_once = args.floor_wakeups or "all"
        say(f"floor: DONE / UID FETCH / IDLE on {len(sessions)} sessions, {at_once} at once")
        thawed_at = time.monotonic()
        with trio.move_on_after(args.stall_timeout * 10):
            async with trio.open_nursery() as nursery:
                for client, uidnext, tag, user in sessions:
                    nursery.start_soon(drain_one, client, uidnext, tag, user)
        seconds = finished_at - thawed_at if fetched else 0.0
        return {
            "fetched": fetched,
            "drain_seconds": seconds,
            "rate": fetched / seconds if seconds > 0 else 0.0,
            "idle_seconds_before_drain": thawed_at - started,
            "sessions_closed_by_server": closed_by_server,
            "wakeups_at_once": args.floor_wakeups,
        }
    finally:
        await close_all([client for client, _, _, _ in sessions] + appenders)


def _settle_seconds(args: argparse.Namespace) -> float:
    hibernate = str(args.hibernate_timeout).lower()
    if hibernate in ("", "none", "off"):
        return 1.0
    return float(hibernate.rstrip("s")) + 2.0


def _report_floor(result: Result, floor: Mapping[str, Any], emlisten_rate: float) -> None:
    result.metrics["floor"] = {
        "fetched": floor["fetched"],
        "drain_seconds": round(floor["drain_seconds"], 3),
        "drain_rate_per_second": round(floor["rate"], 1),
        "idle_seconds_before_drain": round(floor["idle_seconds_before_drain"], 3),
        "sessions_closed_by_server": floor.get("sessions_closed_by_server", 0),
        "wakeups_at_once": floor.get("wakeups_at_once", 0),
    }
    ratio = f", emlisten at {emlisten_rate / floor['rate']:.2f} x the floor" if floor["rate"] else ""
    result.row(
        "floor: bare client DONE / UID FETCH / IDLE on every session, same server",
        f"{floor['rate']:.0f} mails/s ({floor['fetched']} in {floor['drain_seconds']:.2f} s){ratio}",
    )
    if floor.get("sessions_closed_by_server"):
        result.row(
            "floor: sessions the server closed during its drain (the bare client re-logged in)",
            str(floor["sessions_closed_by_server"]),
        )


async def _measure_all(
    args: argparse.Namespace, dovecot: Dovecot, users: Sequence[MailUser], scenario: str, target: float
) -> Result:
    result = Result(scenario, _params(args))
    await prepare_mailboxes(dovecot, users)
    async with open_stack(args, dovecot) as stack:
        await stack.start_listening(users)
        appenders = await connect_appenders(stack, users)
        try:
            raw = await _freeze_append_thaw(
                {"emlisten": stack.emlisten},
                stack.standin,
                appenders,
                args,
                http=stack.http,
                mail_ports=stack.mail_ports,
            )
        finally:
            await close_all(appenders)
    _report(result, raw, args.mails, target)
    if args.floor:
        floor = await bare_client_drain(dovecot, users, args, tls=args.tls)
        rate = raw["delivered"] / raw["drain_seconds"] if raw["drain_seconds"] > 0 else 0.0
        _report_floor(result, floor, rate)
    return result


async def wait_cluster_listening(cluster: ClusterStack, via: str, ids: Sequence[str], within: float) -> float:
    """Until every mailbox's last status is ``listening`` and the primary holds an IDLE
    connection for each. Returns the seconds waited."""
    primary = cluster.names("primary")[0]
    started = time.monotonic()
    progress = Progress("listening", len(ids))
    listening = 0
    with trio.move_on_after(within):
        while True:
            # The status counts states in place; the full listing (which names each mailbox's
            # node) cost the answering node most of a core at 10,000 mailboxes every 0.2 s, and
            # with it the cold start being measured. It is asked only once the counts agree.
            status = await cluster.get_json(via, "/api/listeners/status")
            listening = int(status.get("Connections", {}).get("listening", 0))
            progress.update(listening)
            connections = cluster.nodes[primary].connections_to(cluster.mail_ports)
            if listening >= len(ids) and connections >= len(ids):
                items = await cluster.mailboxes(via)
                held = sum(1 for m in items if m.get("state") == "listening" and m.get("node") == primary)
                if held >= len(ids):
                    progress.close(listening)
                    return time.monotonic() - started
            await trio.sleep(0.2)
    progress.close(listening, "timed out")
    raise BenchError(f"only {listening}/{len(ids)} listening after {within:.0f}s; logs in {cluster.log_dir}")


async def _measure_cluster(
    args: argparse.Namespace, dovecot: Dovecot, users: Sequence[MailUser], scenario: str, target: float
) -> Result:
    ttl = args.lease_ttl
    renew = ttl / 3
    result = Result(scenario, {**_params(args), "lease_ttl_s": ttl, "lease_renew_s": round(renew, 3)})
    env = {
        # As role=all runs it: a node's INFO lines per mailbox are not part of the figure.
        "EMLISTEN_LOG_LEVEL": "WARNING",
        "EMLISTEN_LEASE_TTL_SECONDS": f"{ttl:g}",
        "EMLISTEN_LEASE_RENEW_SECONDS": f"{renew:g}",
    }
    await prepare_mailboxes(dovecot, users)
    async with open_cluster(args, dovecot, primaries=1, secondaries=1, env=env) as cluster:
        result.params["backends"] = cluster.backends.describe()
        credentials = [cluster.credentials(u) for u in users]
        ids = [c["Id"] for c in credentials]
        primary, secondary = cluster.names("primary")[0], cluster.names("secondary")[0]
        started = time.monotonic()
        await cluster.register(credentials, via=primary)
        await wait_cluster_listening(
            cluster, secondary, ids, args.listen_timeout or max(120.0, len(ids) * 0.3)
        )
        cold_start = time.monotonic() - started
        appenders = await connect_appenders(cluster, users)
        try:
            raw = await _freeze_append_thaw(
                cluster.nodes,
                cluster.standin,
                appenders,
                args,
                http=cluster.http,
                mail_ports=cluster.mail_ports,
            )
        finally:
            await close_all(appenders)
        if raw["frozen_seconds"] >= ttl:
            result.notes.append(
                f"the nodes were frozen {raw['frozen_seconds']:.1f} s, longer than the lease TTL "
                f"({ttl:g} s): leases may have lapsed during the run (raise --lease-ttl)"
            )
        owners = Counter(m.get("node") for m in await cluster.mailboxes(secondary))
        problems = {name: node.log_problems() for name, node in cluster.nodes.items()}
        log_dir = cluster.log_dir
    _report(result, raw, args.mails, target)
    result.metrics.update(
        {
            "cold_start_seconds": round(cold_start, 3),
            "lease_holders_after": {str(k): v for k, v in owners.items()},
            "log_problem_lines": problems,
            "clean_up": cluster.clean_up_outcome,
        }
    )
    result.row("cold start: register (through the primary) -> all listening", f"{cold_start:.2f} s")
    result.notes.insert(
        0,
        f"primary + secondary (--role=primary, --role=secondary) on Redis + RabbitMQ (own key prefix "
        f"and queue, deleted afterwards); both processes frozen and thawed together; "
        f"EMLISTEN_LEASE_TTL_SECONDS={ttl:g} (renew {renew:g}) so no lease lapses while frozen.",
    )
    if any(problems.values()):
        result.notes.append(
            "warning/error lines in the node logs: " + ", ".join(f"{k} {v}" for k, v in problems.items())
        )
    result.notes.append(f"node logs: {log_dir}")
    return result
