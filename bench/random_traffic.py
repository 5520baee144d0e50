"""Scenario ``random-traffic``: mail to random mailboxes at a fixed rate, for minutes.

With N mailboxes listening (default 100) on the bench's hibernating Dovecot (2 s), one mail every
``--interval`` seconds (default 0.2) goes to a mailbox picked at random (``--seed``), for
``--minutes`` (default 5). Mails to one mailbox thus come at random gaps, some of them about the
hibernation timeout apart. For each mail: APPEND done -> callback. Reported: p50, p99, max, and
how many mails **waited for the next one**: delivered only after a later mail to the same mailbox
had been appended (what an unannounced mail looks like: the next mail's EXISTS reveals it; judged
only where that later mail came at least 1 s after, so that a mail followed within its ordinary
delivery time does not count; the count over every pair is reported too), or delivered more than
5 s after their APPEND, or not at all within ``--max-wait`` after the last APPEND (the last mail
of a mailbox has no later one to reveal it). Target: none.

Next to it, unless ``--no-floor``: a bare IDLE client per mailbox (bench/latency.py's floor
probe), and the same count for Dovecot's own announcements, to tell emlisten's delays from the
server's.

Topologies as in burst: ``--topology all`` (default) or ``primary+secondary`` (``--cluster``:
Redis + RabbitMQ, production lease settings).
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from collections import Counter
from collections.abc import Sequence

import trio

from bench._harness import (
    BenchError,
    Progress,
    Result,
    add_common_arguments,
    bench_dovecot,
    bench_message,
    close_all,
    common_params,
    connect_appenders,
    create_users,
    prepare_mailboxes,
    say,
    summary_ms,
)
from bench._rawimap import RawImap
from bench._traffic import (
    WAITED_SECONDS,
    CallbackWatcher,
    Deployment,
    Probes,
    add_topology_arguments,
    hibernate_seconds,
    note_nodes,
    open_deployment,
    seconds_text,
)
from tests.servers.dovecot import Dovecot, MailUser

#: A mail delivered after the next mail to its mailbox was appended counts as having waited for
#: it only when that next mail came at least this long after it; closer pairs (a few percent of
#: all at the default rate) would count a mail delivered in ordinary time.
MIN_GAP_SECONDS = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, mailboxes=100)
    add_topology_arguments(parser)
    parser.add_argument("--minutes", type=float, default=5.0, help="how long the traffic runs (default 5)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between mails (default 0.2)")
    parser.add_argument(
        "--max-wait",
        type=float,
        default=300.0,
        help="wait this long after the last APPEND for the callbacks; later ones count as not "
        "delivered (default 300: past EMLISTEN_KEEPALIVE_SECONDS, 240)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a random one)")
    parser.add_argument(
        "--no-floor", dest="floor", action="store_false", help="no bare IDLE probe per mailbox"
    )


def run(args: argparse.Namespace) -> Result:
    if args.mailboxes < 1 or args.interval <= 0 or args.minutes <= 0:
        raise BenchError("--mailboxes, --interval and --minutes must be positive")
    if args.seed is None:
        args.seed = random.randrange(2**32)
    with bench_dovecot(args) as dovecot:
        users = create_users(dovecot, args.mailboxes)
        return trio.run(_measure, args, dovecot, users)


class _Traffic:
    def __init__(self, watcher: CallbackWatcher) -> None:
        self.watcher = watcher
        self.mailbox: list[int] = []
        self.nth: list[int] = []  # 1-based: the how-many-th mail of the run to its mailbox
        self.done: list[float] = []
        self.behind = 0.0  # worst lag of an APPEND behind its schedule
        self.complete = False


async def _measure(args: argparse.Namespace, dovecot: Dovecot, users: Sequence[MailUser]) -> Result:
    n = len(users)
    result = Result(
        "random-traffic",
        {
            **common_params(args),
            "topology": args.topology,
            "minutes": args.minutes,
            "interval_s": args.interval,
            "max_wait_s": args.max_wait,
            "seed": args.seed,
            "floor": args.floor,
        },
    )
    await prepare_mailboxes(dovecot, users)
    async with open_deployment(args, dovecot, users) as deployment:
        appenders = await connect_appenders(deployment, users)
        try:
            async with trio.open_nursery() as nursery:
                probes = Probes(n)
                if args.floor:
                    await probes.start(nursery, deployment, users)
                await trio.sleep(hibernate_seconds(args) + 1.0)
                traffic = await _run_traffic(args, deployment, appenders, nursery)
                nursery.cancel_scope.cancel()
        finally:
            await close_all(appenders)
        _report(result, args, deployment, traffic, probes if args.floor else None)
        result.notes += note_nodes(deployment)
    return result


async def _run_traffic(
    args: argparse.Namespace, deployment: Deployment, appenders: Sequence[RawImap], nursery: trio.Nursery
) -> _Traffic:
    n = len(appenders)
    total = max(1, round(args.minutes * 60 / args.interval))
    rng = random.Random(args.seed)
    run_tag = uuid.uuid4().hex[:8]
    watcher = CallbackWatcher(deployment.standin, run_tag)
    await nursery.start(watcher.run)
    traffic = _Traffic(watcher)
    counts: Counter[int] = Counter()
    say(f"{total} mails over {n} mailboxes, one every {args.interval:g} s ({args.minutes:g} min)")
    progress = Progress("appending", total)
    start = trio.current_time()
    for j in range(total):
        k = rng.randrange(n)
        counts[k] += 1
        traffic.behind = max(traffic.behind, trio.current_time() - (start + j * args.interval))
        await appenders[k].append(bench_message(run_tag, j))
        traffic.done.append(time.monotonic())
        traffic.mailbox.append(k)
        traffic.nth.append(counts[k])
        progress.update(j + 1, f"{len(watcher.index.first_seen)} called back")
        await trio.sleep_until(start + (j + 1) * args.interval)
    progress.close(total)
    traffic.complete = await watcher.wait_all(range(total), args.max_wait, "callbacks")
    return traffic


def _waiting(
    done: Sequence[float],
    delays: Sequence[float | None],
    next_append: Sequence[float | None],
    at: Sequence[float | None],
) -> dict[str, int]:
    """Which mails waited: not delivered (announced), over 5 s, or only after the next mail to
    the same mailbox had been appended when that one came at least ``MIN_GAP_SECONDS`` later
    (``after_next_any`` counts every such pair, however close)."""
    counts = dict.fromkeys(("waited", "after_next", "after_next_any", "over_5s", "missing"), 0)
    for appended, delay, later, seen in zip(done, delays, next_append, at, strict=True):
        after_next = later is not None and seen is not None and seen >= later
        strict = after_next and later is not None and later - appended >= MIN_GAP_SECONDS
        counts["after_next_any"] += after_next
        counts["after_next"] += strict
        counts["over_5s"] += delay is not None and delay > WAITED_SECONDS
        counts["missing"] += delay is None
        counts["waited"] += delay is None or delay > WAITED_SECONDS or strict
    return counts


def _waiting_text(w: dict[str, int], total: int) -> str:
    return (
        f"{w['waited']} of {total} ({w['after_next']} after the next, {w['over_5s']} over "
        f"{WAITED_SECONDS:g} s, {w['missing']} never; after any later mail: {w['after_next_any']})"
    )


def _report(
    result: Result, args: argparse.Namespace, deployment: Deployment, traffic: _Traffic, probes: Probes | None
) -> None:
    total = len(traffic.done)
    index = traffic.watcher.index
    next_append: list[float | None] = [None] * total
    last_of: dict[int, int] = {}
    for j in range(total - 1, -1, -1):
        k = traffic.mailbox[j]
        later = last_of.get(k)
        next_append[j] = traffic.done[later] if later is not None else None
        last_of[k] = j
    received = [traffic.watcher.received(j) for j in range(total)]
    delays = [None if r is None else r - d for r, d in zip(received, traffic.done, strict=True)]
    waiting = _waiting(traffic.done, delays, next_append, received)
    em = summary_ms([d for d in delays if d is not None])
    duplicated = index.duplicated
    result.metrics.update(
        {
            "mails": total,
            "cold_start_seconds": round(deployment.cold_start_seconds, 3),
            "emlisten_ms": em,
            "waiting": waiting,
            "min_gap_s": MIN_GAP_SECONDS,
            "duplicated": duplicated,
            "callbacks": index.calls,
            "append_behind_schedule_max_s": round(traffic.behind, 3),
            "complete": traffic.complete,
            "nodes": deployment.node_report(),
            "per_mail": [
                {"mailbox": k, "nth": nth, "callback_ms": None if d is None else round(1000 * d, 1)}
                for k, nth, d in zip(traffic.mailbox, traffic.nth, delays, strict=True)
            ],
        }
    )
    if em:
        missing = waiting["missing"]
        result.row(
            "APPEND -> callback p50 / p99 / max",
            seconds_text(em, "p50", "p99", "max")
            + (f" (of the {total - missing} delivered)" if missing else ""),
        )
    result.row(
        f"mails that waited: for the next mail to their mailbox (>= {MIN_GAP_SECONDS:g} s later), over "
        f"{WAITED_SECONDS:g} s, or not delivered within {args.max_wait:g} s",
        _waiting_text(waiting, total),
        "0",
        waiting["waited"] == 0,
    )
    if probes is not None:
        announced = [probes.announced(traffic.mailbox[j], traffic.nth[j]) for j in range(total)]
        floor_delays = [None if a is None else a - d for a, d in zip(announced, traffic.done, strict=True)]
        floor_waiting = _waiting(traffic.done, floor_delays, next_append, announced)
        fl = summary_ms([d for d in floor_delays if d is not None])
        result.metrics.update({"floor_ms": fl, "floor_waiting": floor_waiting})
        value = "waited: " + _waiting_text(floor_waiting, total)
        if fl:
            value += f"; p50 / p99 / max {seconds_text(fl, 'p50', 'p99', 'max')}"
        result.row("floor: Dovecot's EXISTS to a bare IDLE client", value)
    result.row("duplicated", str(duplicated), "0", duplicated == 0)
    result.row("APPENDs: most behind schedule", f"{traffic.behind:.3f} s")
    result.row("cold start: register -> all listening", f"{deployment.cold_start_seconds:.2f} s")
    result.notes.append(
        f"{len(set(traffic.mailbox))} of {args.mailboxes} mailboxes got mail; topology "
        f"{args.topology}; Dovecot imap_hibernate_timeout {args.hibernate_timeout}; seed {args.seed}."
    )
