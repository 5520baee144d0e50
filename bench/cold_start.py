"""Scenario ``cold-start``: N mailboxes registered in ONE create call to a fresh process, time
until all listen, beside the bare-client floor measured in the same run.

The cold-start part of ``idle`` (bench/idle.py: the same :meth:`Stack.start_listening` and
:func:`bare_client_cold_start`), on its own and with the issue's shape: all N credentials in one
``POST /api/listeners/create`` (``--chunk 0``, the default here; idle sends 500 per call), no
steady-state or CPU window afterwards.

1. Floor (unless ``--no-floor``): the bench's bare Trio client opens N IDLE sessions (connect,
   TLS, LOGIN, SELECT, IDLE; ``--floor-concurrency`` at a time, 64 like
   ``EMLISTEN_MAX_CONCURRENT_CONNECTS``) to the same Dovecot, then closes them; the bench waits
   until Dovecot holds no session any more.
2. A fresh emlisten process; one create call with all N; cold start = that call -> N listening
   (``/api/listeners/status`` polled every 50 ms).

Reported: the cold start and its target, the create call alone, the floor and the ratio, the
sessions emlisten opened meanwhile (LOGIN/AUTHENTICATE from ``/metrics``: N when each mailbox
opens only its IDLE session), CPU of emlisten and Dovecot, RSS per mailbox.

Targets: N <= 1,000: under 10 s. Above 1,000: under 60 s at 10,000 (interpolated linearly from
10 s at 1,000, scaled linearly above 10,000), or within 20 % of the floor.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import trio

from bench._harness import (
    BenchError,
    Result,
    add_common_arguments,
    bare_client_cold_start,
    bench_dovecot,
    common_params,
    create_users,
    open_stack,
    prepare_mailboxes,
    say,
    server_connections,
    session_counts,
)
from tests.servers.dovecot import Dovecot, MailUser

FLOOR_MARGIN = 1.2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, mailboxes=1000)
    parser.set_defaults(chunk=0)
    parser.add_argument(
        "--no-floor", dest="floor", action="store_false", help="skip the bare client's floor (it runs first)"
    )
    parser.add_argument(
        "--floor-concurrency",
        type=int,
        default=64,
        help="sessions the bare client opens at a time (default 64)",
    )


def run(args: argparse.Namespace) -> Result:
    if args.mailboxes < 1:
        raise BenchError("--mailboxes must be at least 1")
    if args.chunk <= 0:
        args.chunk = args.mailboxes  # one create call
    with bench_dovecot(args) as dovecot:
        users = create_users(dovecot, args.mailboxes)
        return trio.run(_measure, args, dovecot, users)


def target_seconds(n: int) -> float:
    """10 s for up to 1,000 mailboxes, 60 s for 10,000, linear in between and above."""
    if n <= 1000:
        return 10.0
    if n <= 10000:
        return 10.0 + (n - 1000) * 50.0 / 9000
    return 60.0 * n / 10000


def verdict(n: int, seconds: float, floor: float | None) -> tuple[str, bool]:
    limit = target_seconds(n)
    if n <= 1000 or floor is None:
        return f"< {limit:.0f} s", seconds < limit
    return (
        f"< {limit:.0f} s or <= {FLOOR_MARGIN:g} x floor ({FLOOR_MARGIN * floor:.1f} s)",
        seconds < limit or seconds <= FLOOR_MARGIN * floor,
    )


async def _wait_server_idle(dovecot: Dovecot, within: float) -> float:
    """Until Dovecot holds no client session (the floor's closed sessions are gone)."""
    started = time.monotonic()
    ports = (dovecot.imap_port, dovecot.imaps_port)
    with trio.move_on_after(within):
        while server_connections(ports) > 0:  # noqa: ASYNC110 - kernel state, no Trio event
            await trio.sleep(0.5)
    left = server_connections(ports)
    if left:
        say(f"Dovecot still holds {left} sessions after {within:g} s; measuring anyway")
    await trio.sleep(2.0)  # and let its processes settle
    return time.monotonic() - started


async def _measure(args: argparse.Namespace, dovecot: Dovecot, users: Sequence[MailUser]) -> Result:
    n = len(users)
    calls = -(-n // args.chunk)
    result = Result(
        "cold-start",
        {**common_params(args), "create_calls": calls, "floor_concurrency": args.floor_concurrency},
    )
    await prepare_mailboxes(dovecot, users)
    floor: float | None = None
    if args.floor:
        floor = await bare_client_cold_start(dovecot, users, tls=args.tls, concurrency=args.floor_concurrency)
        say(f"floor: the bare client had {n} IDLE sessions up after {floor:.2f} s")
        await _wait_server_idle(dovecot, within=120.0)
    async with open_stack(args, dovecot) as stack:
        await trio.sleep(0.5)  # the fresh process's own start-up allocations
        rss_empty = stack.emlisten.rss_kib()
        before = await session_counts(stack.http, stack.emlisten.url)
        say(f"registering {n} mailboxes in {calls} create call(s)")
        start = await stack.start_listening(users)
        opened = await session_counts(stack.http, stack.emlisten.url) - before
        connections = stack.emlisten.connections_to(stack.mail_ports)
        rss = stack.emlisten.rss_kib()
        counts = await stack.status_counts()
        problems = stack.emlisten.log_problems()
        log_path = stack.emlisten.log_path
    target, ok = verdict(n, start.seconds, floor)
    result.metrics.update(
        {
            **start.as_metrics(),
            "bare_client_cold_start_seconds": None if floor is None else round(floor, 3),
            "ratio_to_floor": None if not floor else round(start.seconds / floor, 3),
            "mailboxes_per_second": round(n / start.seconds, 1),
            "sessions_opened": opened.as_dict(),
            "mail_connections_when_listening": connections,
            "rss_empty_kib": rss_empty,
            "rss_listening_kib": rss,
            "rss_per_mailbox_kib": round((rss - rss_empty) / n, 1),
            "status_when_listening": counts,
            "emlisten_log_warnings": problems,
        }
    )
    result.row(
        f"cold start: create -> {n} listening",
        f"{start.seconds:.2f} s ({n / start.seconds:.0f}/s)",
        target,
        ok,
    )
    result.row(f"of it, the create call(s) ({calls})", f"{start.create_calls_seconds:.2f} s")
    if floor is not None:
        result.row(
            f"floor: bare client opening {n} {'TLS' if args.tls else 'plain'} IDLE sessions",
            f"{floor:.2f} s (emlisten {start.seconds / floor:.2f} x)",
        )
    result.row(
        "IMAP sessions opened (LOGIN/AUTHENTICATE) / mail connections when all listen",
        f"{opened.logins} / {connections}",
        f"{n} / {n}",
        opened.logins == n and connections == n,
    )
    result.row("cold start CPU", start.cpu_text())
    result.row("RSS per mailbox when all listen", f"{(rss - rss_empty) / n:.1f} KiB")
    if floor is not None:
        result.notes.append(
            f"floor first: the bench's bare Trio client (bench/_rawimap.py) opened {n} sessions of the same "
            f"kind, {args.floor_concurrency} at a time, and closed them; emlisten started after Dovecot "
            "held no session any more."
        )
    if problems:
        result.notes.append(f"emlisten logged {problems} warning/error lines: {log_path}")
    return result
