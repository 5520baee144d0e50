"""Scenario ``burst``: how fast a backlog drains, and that nothing is lost or doubled.

APPEND runs at only some hundreds of mails per second on one machine (Dovecot writes and fsyncs
each one), slower than the rate to measure. So the emlisten process is frozen (SIGSTOP) while M
mails of about 5 KB are appended over the N listening mailboxes (parallel APPEND connections);
Dovecot's EXISTS notifications wait in the sockets. Then SIGCONT, and:

- drain rate = mails delivered / (last callback received - SIGCONT);
- lost = expected - distinct mails delivered (must be 0);
- duplicated = deliveries of an Email.Id already delivered (must be 0).
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Sequence

import trio

from bench._harness import (
    BenchError,
    CallbackIndex,
    Progress,
    Result,
    add_common_arguments,
    bench_dovecot,
    bench_message,
    close_all,
    common_params,
    connect_appenders,
    create_users,
    open_stack,
    prepare_mailboxes,
    say,
)
from bench._rawimap import RawImap
from tests.servers.dovecot import Dovecot, MailUser

TARGET_MAILS_PER_SECOND = 1000.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, mailboxes=100)
    parser.add_argument("--mails", type=int, default=2000, help="mails in the burst (default 2000)")
    parser.add_argument("--size", type=int, default=5000, help="approximate bytes per mail (default 5000)")
    parser.add_argument("--parallel", type=int, default=8, help="concurrent APPEND connections (default 8)")
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        help="give up when no callback arrived for this long (default 30)",
    )


def run(args: argparse.Namespace) -> Result:
    with bench_dovecot(args) as dovecot:
        users = create_users(dovecot, args.mailboxes)
        return trio.run(_measure, args, dovecot, users)


async def _append_all(
    appenders: Sequence[RawImap], run_tag: str, mails: int, size: int, parallel: int
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


async def _measure(args: argparse.Namespace, dovecot: Dovecot, users: Sequence[MailUser]) -> Result:
    m = args.mails
    run_tag = uuid.uuid4().hex[:8]
    result = Result(
        "burst",
        {**common_params(args), "mails": m, "size_bytes": args.size, "parallel_appends": args.parallel},
    )
    await prepare_mailboxes(dovecot, users)
    async with open_stack(args, dovecot) as stack:
        await stack.start_listening(users)
        appenders = await connect_appenders(stack, users)
        index = CallbackIndex(stack.standin, run_tag)
        say("freezing emlisten (SIGSTOP)")
        stack.emlisten.freeze()
        try:
            append_started = time.monotonic()
            await _append_all(appenders, run_tag, m, args.size, args.parallel)
            append_seconds = time.monotonic() - append_started
            # Dovecot notifies IDLE sessions asynchronously (and un-hibernates them first).
            await trio.sleep(1.0)
            index.update()
            if index.first_seen:
                raise BenchError("callbacks arrived while emlisten was frozen: the freeze did not hold")
            cpu_before = stack.emlisten.cpu_seconds()
        finally:
            stack.emlisten.thaw()
        thawed_at = time.monotonic()
        say("thawed emlisten (SIGCONT)")
        complete = await index.wait_for(m, args.stall_timeout, "delivered")
        cpu_used = stack.emlisten.cpu_seconds() - cpu_before
        await close_all(appenders)

    delivered = len(index.first_seen)
    drain_seconds = index.last_received - thawed_at if delivered else 0.0
    rate = delivered / drain_seconds if drain_seconds > 0 else 0.0
    lost = m - delivered
    result.metrics.update(
        {
            "append_seconds": round(append_seconds, 3),
            "append_rate_per_second": round(m / append_seconds, 1),
            "drain_seconds": round(drain_seconds, 3),
            "drain_rate_per_second": round(rate, 1),
            "delivered": delivered,
            "lost": lost,
            "duplicated": index.duplicated,
            "callbacks": index.calls,
            "emails_per_callback": round(index.emails / index.calls, 2) if index.calls else None,
            "emlisten_cpu_seconds_during_drain": round(cpu_used, 3),
            "emlisten_cpu_ms_per_mail": round(1000 * cpu_used / delivered, 3) if delivered else None,
            "complete": complete,
        }
    )
    result.row(
        "drain rate (SIGCONT -> last callback)",
        f"{rate:.0f} mails/s ({delivered} in {drain_seconds:.2f} s)",
        f">= {TARGET_MAILS_PER_SECOND:g} mails/s",
        rate >= TARGET_MAILS_PER_SECOND,
    )
    result.row("lost", str(lost), "0", lost == 0)
    result.row("duplicated", str(index.duplicated), "0", index.duplicated == 0)
    result.row("callbacks / emails per callback", f"{index.calls} / {result.metrics['emails_per_callback']}")
    result.row(
        "emlisten CPU per mail during the drain",
        f"{1000 * cpu_used / delivered:.2f} ms" if delivered else "-",
    )
    result.row("APPEND rate while frozen (for reference)", f"{m / append_seconds:.0f} mails/s")
    result.notes.append(
        "APPEND itself runs at only some hundreds of mails/s on this machine, below the rate to "
        "measure, so emlisten is frozen (SIGSTOP) while the backlog is appended and thawed (SIGCONT) "
        "to drain it."
    )
    result.notes.append(
        "The stand-in receiving the callbacks and Dovecot share the machine's 2 cores with emlisten."
    )
    return result
