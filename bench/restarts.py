"""Scenario ``restarts``: a single container restarted again and again while mail arrives.

One ``emlisten serve --role=all`` process without Redis, its state in a data directory
(``EMLISTEN_DATA_DIR``, the SQLite store), as the container image runs. N mailboxes are
registered once, at the start. A writer appends mail at a steady rate for the whole run (round
robin over the mailboxes, one APPEND connection each) and keeps a ledger: every message index
with its append time. Meanwhile the process is stopped (SIGTERM as ``docker restart`` does, or
SIGKILL with ``--kill``) and started again ``--restarts`` times, ``--down`` seconds down and
``--up`` seconds up each time. Nothing is registered again after a restart.

At the end the writer stops and every ledger entry must reach the Creatio stand-in:

- lost = ledger entries never delivered (target 0);
- duplicated = deliveries of an ``Email.Id`` already delivered (target 0; with ``--kill`` a mail
  whose callback was answered in the last milliseconds before the kill, before its checkpoint was
  committed, is delivered again: at least once, see docs/architecture.md);
- the longest delay from APPEND to callback, and per restart the start-up time (process start to
  API answering), the time until every mailbox listens again, and the ``loaded in`` time the
  store logs.
"""

from __future__ import annotations

import argparse
import re
import secrets
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

from bench._harness import (
    Appender,
    BenchError,
    CallbackIndex,
    EmlistenProcess,
    Result,
    add_common_arguments,
    bench_dovecot,
    bench_message,
    close_all,
    common_params,
    connect_appenders_to,
    create_users,
    mailbox_credentials,
    parse_env,
    prepare_mailboxes,
    register_mailboxes,
    say,
    summary_ms,
)
from tests.servers.creatio import CreatioStandIn, get_ci
from tests.servers.dovecot import Dovecot, MailUser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, mailboxes=20)
    parser.add_argument("--restarts", type=int, default=10, help="stops and starts (default 10)")
    parser.add_argument("--rate", type=float, default=20.0, help="mails appended per second (default 20)")
    parser.add_argument("--up", type=float, default=4.0, help="seconds up between restarts (default 4)")
    parser.add_argument("--down", type=float, default=1.0, help="seconds down at each restart (default 1)")
    parser.add_argument(
        "--kill", action="store_true", help="stop with SIGKILL (a crash) instead of SIGTERM (docker restart)"
    )
    parser.add_argument(
        "--store",
        choices=("sqlite", "memory"),
        default="sqlite",
        help="sqlite: a data directory (default); memory: no data directory, and the mailboxes are "
        "registered again after each start, as Creatio does when it finds them closed (the "
        "set-up before EMLISTEN_DATA_DIR, for comparison)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        help="give up when no callback arrived for this long at the end (default 60)",
    )
    parser.add_argument(
        "--quiet-seconds",
        type=float,
        default=3.0,
        help="after the last mail arrived, watch this long for late duplicates (default 3)",
    )


def run(args: argparse.Namespace) -> Result:
    if args.restarts < 1 or args.rate <= 0:
        raise BenchError("--restarts must be at least 1 and --rate positive")
    with bench_dovecot(args) as dovecot:
        users = create_users(dovecot, args.mailboxes)
        return trio.run(_measure, args, dovecot, users)


def _params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **common_params(args),
        "restarts": args.restarts,
        "stop": "SIGKILL" if args.kill else "SIGTERM",
        "rate_per_second": args.rate,
        "up_seconds": args.up,
        "down_seconds": args.down,
        "store": "sqlite (EMLISTEN_DATA_DIR)"
        if args.store == "sqlite"
        else "memory, re-registered after each start",
    }


class _Writer:
    """Appends ``bench <run> <i>`` to mailbox i % N at a steady rate; the ledger is i -> time."""

    def __init__(self, appenders: Sequence[Appender], run_tag: str, rate: float) -> None:
        self.appenders = appenders
        self.run_tag = run_tag
        self.interval = 1.0 / rate
        self.ledger: dict[int, float] = {}
        self.while_down = 0
        self.down = False

    async def run(self) -> None:
        next_at = trio.current_time()
        i = 0
        while True:
            await trio.sleep_until(next_at)
            await self.appenders[i % len(self.appenders)].append(bench_message(self.run_tag, i))
            self.ledger[i] = time.monotonic()
            if self.down:
                self.while_down += 1
            i += 1
            next_at += self.interval


async def _listening(http: httpx.AsyncClient, process: EmlistenProcess, count: int, within: float) -> float:
    """Seconds until ``count`` mailboxes listen (polled every 50 ms)."""
    started = time.monotonic()
    with trio.move_on_after(within):
        while True:
            response = await http.get(f"{process.url}/api/listeners/status", timeout=10)
            if response.status_code == 200 and response.json()["Connections"].get("listening", 0) >= count:
                return time.monotonic() - started
            await trio.sleep(0.05)
    raise BenchError(f"not every mailbox listened within {within:.0f}s:\n{process.log_tail()}")


async def _measure(args: argparse.Namespace, dovecot: Dovecot, users: Sequence[MailUser]) -> Result:
    result = Result("restarts", _params(args))
    await prepare_mailboxes(dovecot, users)
    work_dir = Path(tempfile.mkdtemp(prefix="emlisten-bench-restarts-"))
    data_dir = work_dir / "data"
    env = {
        "EMLISTEN_TLS_CA_FILE": str(dovecot.ca_file),
        "EMLISTEN_LOG_LEVEL": "INFO",
        "EMLISTEN_NODE_ID": "bench",
        "EMLISTEN_DATA_DIR": str(data_dir) if args.store == "sqlite" else "",
        "EMLISTEN_SECRET_KEY": secrets.token_hex(32),
        **parse_env(args.env),
    }
    standin = CreatioStandIn()
    process = EmlistenProcess(env, work_dir)
    run_tag = uuid.uuid4().hex[:8]
    index = CallbackIndex(standin, run_tag)
    restarts: list[dict[str, float]] = []
    stopped_at: list[float] = []
    listen_within = args.listen_timeout or max(60.0, args.mailboxes * 0.1)
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=0)
    async with trio.open_nursery() as nursery, httpx.AsyncClient(limits=limits) as http:
        await nursery.start(standin.serve)
        appenders: list[Appender] = []
        try:
            process.spawn()
            await process.wait_ready(http)
            credentials = [mailbox_credentials(dovecot, standin, u, tls=args.tls) for u in users]
            await register_mailboxes(http, process.url, credentials, args.chunk)
            await _listening(http, process, len(users), listen_within)
            appenders = await connect_appenders_to(dovecot, users)
            writer = _Writer(appenders, run_tag, args.rate)
            async with trio.open_nursery() as writing:
                writing.start_soon(writer.run)
                for number in range(1, args.restarts + 1):
                    await trio.sleep(args.up)
                    writer.down = True
                    stopped_at.append(time.monotonic())
                    if args.kill:
                        process.kill()
                        stop_seconds = 0.0
                    else:
                        stop_seconds = await process.stop()
                    await trio.sleep(args.down)
                    started = time.monotonic()
                    process.spawn()
                    await process.wait_ready(http)
                    writer.down = False
                    ready = time.monotonic() - started
                    if args.store == "memory":
                        await register_mailboxes(http, process.url, credentials, args.chunk)
                    listening = ready + await _listening(http, process, len(users), listen_within)
                    loaded = [
                        float(found.group(1))
                        for line in process.log_lines(r"mailbox\(es\) loaded in")
                        if (found := re.search(r"loaded in ([\d.]+)s", line))
                    ]
                    restarts.append(
                        {
                            "stop_seconds": round(stop_seconds, 3),
                            "start_to_ready_seconds": round(ready, 3),
                            "start_to_all_listening_seconds": round(listening, 3),
                            "store_load_seconds": loaded[-1] if loaded else -1.0,
                        }
                    )
                    say(f"restart {number}/{args.restarts}: ready {ready:.2f}s, listening {listening:.2f}s")
                await trio.sleep(args.up)
                writing.cancel_scope.cancel()
            appended = len(writer.ledger)
            complete = await index.wait_for(appended, args.stall_timeout, "delivered")
            if complete:
                # Late duplicates (a redelivery after the last restart) would come now.
                with trio.move_on_after(args.quiet_seconds):
                    while True:
                        await index.wait_new()
                        index.update()
            index.update()
            problems = process.log_problems()
        finally:
            await close_all(appenders)
            await process.stop()
            nursery.cancel_scope.cancel()
    say(f"emlisten logs and data directory: {work_dir}")
    _report(result, args, writer, index, restarts, problems, complete)
    gaps, details = _duplicates_before_stops(standin, run_tag, stopped_at)
    result.metrics["duplicates_ms_from_nearest_stop"] = gaps
    result.metrics["duplicates"] = details
    result.metrics["stops_s"] = [round(stop - stopped_at[0], 3) for stop in stopped_at]
    if gaps:
        result.row("duplicates: first delivery, ms from the nearest stop", ", ".join(f"{g:g}" for g in gaps))
    return result


def _duplicates_before_stops(
    standin: CreatioStandIn, run_tag: str, stopped_at: list[float]
) -> tuple[list[float], list[dict[str, Any]]]:
    """For each Email.Id delivered twice: when its first delivery reached the stand-in, in ms
    from the nearest stop (close to it: a delivery in flight at the kill, whose checkpoint was
    not committed), and the details (subject, delivery times and the stops, in seconds from the
    first stop)."""
    received: dict[str, list[tuple[float, str]]] = {}
    for call in standin.accepted_calls("ProcessFullEmail"):
        emails = get_ci(call.body, "Emails")
        for email in emails if isinstance(emails, list) else []:
            subject = str(get_ci(email, "Subject") or "")
            if f"bench {run_tag} " in subject:
                received.setdefault(str(get_ci(email, "Id")), []).append((call.received_at, subject))
    origin = stopped_at[0] if stopped_at else 0.0
    gaps = []
    details = []
    for deliveries in received.values():
        if len(deliveries) > 1:
            first = deliveries[0][0]
            # Negative: answered before the stop; positive: sent before the kill, recorded by the
            # stand-in just after it (its clock is when the whole body had arrived).
            offsets = [first - stop for stop in stopped_at]
            gaps.append(round(min(offsets, key=abs) * 1000, 1) if offsets else 0.0)
            details.append(
                {
                    "subject": deliveries[0][1],
                    "delivered_s": [round(at - origin, 3) for at, _ in deliveries],
                    "stops_before": [sum(1 for stop in stopped_at if stop < at) for at, _ in deliveries],
                }
            )
    return sorted(gaps), details


def _report(
    result: Result,
    args: argparse.Namespace,
    writer: _Writer,
    index: CallbackIndex,
    restarts: list[dict[str, float]],
    problems: int,
    complete: bool,
) -> None:
    appended = len(writer.ledger)
    delivered = len(set(index.first_seen) & set(writer.ledger))
    lost = appended - delivered
    delays = [index.first_seen[i] - writer.ledger[i] for i in writer.ledger if i in index.first_seen]
    ready = [r["start_to_ready_seconds"] for r in restarts]
    listening = [r["start_to_all_listening_seconds"] for r in restarts]
    result.metrics.update(
        {
            "appended": appended,
            "appended_while_down": writer.while_down,
            "delivered": delivered,
            "lost": lost,
            "duplicated": index.duplicated,
            "all_delivered_before_stall_timeout": complete,
            "delay_ms": summary_ms(delays),
            "restarts": restarts,
            "warnings_in_last_log": problems,
        }
    )
    stop = "SIGKILL" if args.kill else "SIGTERM"
    result.row(
        f"restarts ({stop}), each {args.down:g} s down, {args.up:g} s up",
        f"{len(restarts)}",
        f"{args.restarts}",
        len(restarts) == args.restarts,
    )
    result.row(
        "mails appended (while down)",
        f"{appended} ({writer.while_down}) at {args.rate:g}/s over {args.mailboxes}",
    )
    result.row("lost", str(lost), "0", lost == 0)
    result.row("duplicated", str(index.duplicated), "0", index.duplicated == 0)
    if delays:
        result.row("longest delay APPEND -> callback", f"{max(delays):.2f} s")
    if ready:
        result.row("start -> API ready, per restart (max)", f"{max(ready):.2f} s")
        result.row("start -> every mailbox listening, per restart (max)", f"{max(listening):.2f} s")
    result.notes.append(
        "Dovecot, the Creatio stand-in and the writer share the machine's 2 cores with emlisten "
        "(and with other engineers' work while this ran): the times are upper bounds."
    )
