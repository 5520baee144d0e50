"""Scenario ``pause``: one node frozen longer than its lease TTL; does it re-open its sessions?

One ``--role=all`` process (in-memory store and queue) with N mailboxes listening (default
1,000). The process is frozen (SIGSTOP) for ``--pause-seconds`` (repeatable; default 10, then 60:
both longer than the 5 s default lease TTL, ``EMLISTEN_LEASE_TTL_SECONDS``), then thawed
(SIGCONT). Nothing else runs: there is no other node that could have taken a mailbox, so a
single node has no reason to drop anything. For each pause:

- IMAP sessions opened from SIGSTOP to ``--watch-seconds`` after SIGCONT (and all listening
  again): LOGIN/AUTHENTICATE answered OK, from ``emlisten_imap_commands_total`` on ``/metrics``
  read before the freeze and after; target 0;
- of the mail connections held before the freeze (one IDLE session per mailbox), how many are
  still the same sockets afterwards; target all;
- the "lost N lease(s)" lines in the process's log (it runs at WARNING) and the least number of
  mailboxes ``listening`` seen in ``/api/listeners/status`` after SIGCONT (polled every 0.2 s);
- then one mail is appended to every mailbox: each must be delivered once (APPEND -> callback
  delays reported).

Before each pause the bench waits until the process holds only its IDLE sessions (fetch sessions
close after ``EMLISTEN_READER_IDLE_SECONDS``, 60 s) so the socket comparison is about them, and
until the looks that follow every session's first IDLE are over (``EMLISTEN_RECHECK_LATE_SECONDS``
after it, at most 25 a second: at 10,000 mailboxes they go on for minutes after the cold start),
so that the logins counted are the pause's and not the cold start's; and, before a later pause,
until no session opened for longer than the late look waits (``EMLISTEN_RECHECK_LATE_SECONDS``,
12 s, + 3 s), so that the looks after the previous pause's check mails are over too.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Sequence
from typing import Any

import trio

from bench._harness import (
    LOOKS_QUIET_SECONDS,
    BenchError,
    CallbackIndex,
    Progress,
    Result,
    Stack,
    add_common_arguments,
    bench_dovecot,
    bench_message,
    close_all,
    common_params,
    connect_appenders,
    create_users,
    established_inodes,
    looks_done,
    lost_leases,
    open_stack,
    parse_env,
    prepare_mailboxes,
    say,
    session_counts,
    summary_ms,
    wait_for_looks,
)
from bench._rawimap import RawImap
from emlisten.config import load_settings
from tests.servers.dovecot import Dovecot, MailUser

DEFAULT_PAUSES = (10.0, 60.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, mailboxes=1000)
    parser.add_argument(
        "--pause-seconds",
        type=float,
        action="append",
        default=None,
        help="how long the process is frozen; repeat for several pauses, one after the other on the "
        "same process (default: 10, then 60)",
    )
    parser.add_argument(
        "--watch-seconds",
        type=float,
        default=15.0,
        help="after SIGCONT, watch the status this long before counting (default 15: three lease TTLs)",
    )
    parser.add_argument("--parallel", type=int, default=8, help="concurrent APPEND connections (default 8)")
    parser.add_argument(
        "--callback-timeout",
        type=float,
        default=60.0,
        help="give up when no callback arrived for this long (default 60)",
    )


def run(args: argparse.Namespace) -> Result:
    pauses = args.pause_seconds or list(DEFAULT_PAUSES)
    if args.mailboxes < 1 or any(p <= 0 for p in pauses):
        raise BenchError("--mailboxes and --pause-seconds must be positive")
    args.pause_seconds = pauses
    with bench_dovecot(args) as dovecot:
        users = create_users(dovecot, args.mailboxes)
        return trio.run(_measure, args, dovecot, users)


async def _measure(args: argparse.Namespace, dovecot: Dovecot, users: Sequence[MailUser]) -> Result:
    n = len(users)
    result = Result(
        "pause",
        {
            **common_params(args),
            "topology": "all",
            "pause_seconds": args.pause_seconds,
            "watch_seconds": args.watch_seconds,
        },
    )
    await prepare_mailboxes(dovecot, users)
    rounds: list[dict[str, Any]] = []
    async with open_stack(args, dovecot) as stack:
        start = await stack.start_listening(users)
        appenders = await connect_appenders(stack, users)
        try:
            for pause in args.pause_seconds:
                rounds.append(await _one_pause(stack, appenders, pause, args))
        finally:
            await close_all(appenders)
        problems = stack.emlisten.log_problems()
        log_path = stack.emlisten.log_path
    result.metrics.update(
        {"cold_start_seconds": round(start.seconds, 3), "pauses": rounds, "emlisten_log_warnings": problems}
    )
    for r in rounds:
        _rows(result, r, n)
    result.row(f"cold start: create -> {n} listening", f"{start.seconds:.2f} s")
    result.notes.append(
        f"one --role=all process (in-memory store and queue), {n} mailboxes; lease TTL at the production "
        "default unless --env sets EMLISTEN_LEASE_TTL_SECONDS; pauses one after the other on the same "
        "process: " + ", ".join(f"{p:g} s" for p in args.pause_seconds) + "."
    )
    result.notes.append(
        "'re-opened' = LOGIN/AUTHENTICATE answered OK (/metrics) from SIGSTOP until the watch after "
        "SIGCONT was over and all were listening, before the check mails were appended."
    )
    result.notes.append(
        "The check mails' delays are no latency figure: all N are appended at once (--parallel "
        "connections), so Dovecot wakes N hibernated sessions together."
    )
    if problems:
        result.notes.append(f"emlisten logged {problems} warning/error lines: {log_path}")
    return result


async def _one_pause(
    stack: Stack, appenders: Sequence[RawImap], pause: float, args: argparse.Namespace
) -> dict[str, Any]:
    em, n = stack.emlisten, len(appenders)
    settled, _ = await stack.wait_connections(n, args.settle_timeout)
    await stack.wait_listening(n)
    late_look = load_settings(parse_env(args.env)).recheck_late_seconds  # the last look after mail
    looks_settled = await wait_for_looks(
        stack, n, args.settle_timeout, quiet=max(LOOKS_QUIET_SECONDS, late_look + 3)
    )
    before = await session_counts(stack.http, em.url)
    held = established_inodes(em.pid, stack.mail_ports)
    offset = em.log_size()
    say(f"freezing emlisten (pid {em.pid}) for {pause:g} s with {n} listening, {len(held)} mail connections")
    em.freeze()
    try:
        await trio.sleep(pause)
    finally:
        em.thaw()
    thawed = time.monotonic()
    first_answer: float | None = None
    least_listening = listening = n
    progress = Progress(f"watching after SIGCONT ({pause:g} s pause)", n)
    while (elapsed := time.monotonic() - thawed) < args.watch_seconds:
        counts = await stack.status_counts()
        if first_answer is None:
            first_answer = time.monotonic() - thawed
        listening = counts.get("listening", 0)
        least_listening = min(least_listening, listening)
        progress.update(listening, f"least {least_listening}, {elapsed:.0f}/{args.watch_seconds:g} s")
        await trio.sleep(0.2)
    progress.close(listening)
    await stack.wait_listening(n, "listening again")
    listening_again = time.monotonic() - thawed
    opened = await session_counts(stack.http, em.url) - before
    held_after = established_inodes(em.pid, stack.mail_ports)
    lapse_lines, lapsed = lost_leases(em, offset)

    run_tag = uuid.uuid4().hex[:8]
    index = CallbackIndex(stack.standin, run_tag)
    appended = await _append_one_each(appenders, run_tag, args.parallel)
    complete = await index.wait_for(n, args.callback_timeout, "delivered")
    delays = [index.first_seen[k] - appended[k] for k in index.first_seen]
    return {
        "pause_seconds": pause,
        "only_idle_sessions_before": settled,
        "looks_settled_before": looks_settled,
        "sessions_opened": opened.as_dict(),
        "looks_during": looks_done(opened),
        "mail_connections_before": len(held),
        "mail_connections_survived": len(held & held_after),
        "mail_connections_after": len(held_after),
        "lost_lease_lines": lapse_lines,
        "lost_leases": lapsed,
        "least_listening_after_thaw": least_listening,
        "first_status_answer_after_thaw_s": None if first_answer is None else round(first_answer, 3),
        "all_listening_after_thaw_s": round(listening_again, 3),
        "check_mails_delivered": len(index.first_seen),
        "check_mails_lost": n - len(index.first_seen),
        "check_mails_duplicated": index.duplicated,
        "check_mail_ms": summary_ms(delays),
        "check_complete": complete,
    }


async def _append_one_each(appenders: Sequence[RawImap], run_tag: str, parallel: int) -> list[float]:
    """One mail to every mailbox (mail k to mailbox k), ``parallel`` at a time; the time each
    APPEND completed."""
    done_at = [0.0] * len(appenders)
    progress = Progress("appending one mail per mailbox", len(appenders))
    done = 0

    async def worker(w: int) -> None:
        nonlocal done
        for k in range(w, len(appenders), parallel):
            await appenders[k].append(bench_message(run_tag, k))
            done_at[k] = time.monotonic()
            done += 1
            progress.update(done)

    async with trio.open_nursery() as nursery:
        for w in range(min(parallel, len(appenders))):
            nursery.start_soon(worker, w)
    progress.close(done)
    return done_at


def _rows(result: Result, r: dict[str, Any], n: int) -> None:
    p = f"{r['pause_seconds']:g} s pause"
    logins = r["sessions_opened"]["logins"]
    looks = r["looks_during"]
    opened = f"{logins}" + (f" ({looks} looks ran meanwhile)" if looks else "")
    result.row(f"{p}: IMAP sessions re-opened (LOGIN/AUTHENTICATE)", opened, "0", logins == 0)
    before, survived = r["mail_connections_before"], r["mail_connections_survived"]
    result.row(
        f"{p}: mail connections held before / still open after",
        f"{before} / {survived}",
        "all",
        survived == before,
    )
    result.row(
        f"{p}: 'lost N lease(s)' log lines (leases)",
        f"{r['lost_lease_lines']} ({r['lost_leases']})",
        "0",
        r["lost_lease_lines"] == 0,
    )
    result.row(
        f"{p}: least listening after SIGCONT / all listening again after",
        f"{r['least_listening_after_thaw']} of {n} / {r['all_listening_after_thaw_s']:.1f} s",
    )
    if r["sessions_opened"]["reconnects"]:
        result.row(f"{p}: reconnects (emlisten_reconnects_total)", str(r["sessions_opened"]["reconnects"]))
    lost, dup = r["check_mails_lost"], r["check_mails_duplicated"]
    delays = r["check_mail_ms"]
    result.row(
        f"{p}: then one mail per mailbox: delivered / lost / duplicated",
        f"{r['check_mails_delivered']} / {lost} / {dup}"
        + (f" (APPEND -> callback p50 {delays['p50']} ms, max {delays['max']} ms)" if delays else ""),
        "all / 0 / 0",
        lost == 0 and dup == 0,
    )
