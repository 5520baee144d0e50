"""Scenario ``latency``: from APPEND done to the Creatio callback, next to the server's own floor.

With N mailboxes listening, M mails are appended one at a time (round-robin over the mailboxes,
one every ``--spacing`` seconds) on plain-IMAP connections held by the bench. For each mail:

- emlisten: stand-in receive time - time the APPEND's tagged OK was read;
- floor: the time a bare IDLE client (bench/_rawimap.py, same TLS setting, same mailbox, same
  process and clock) saw ``* n EXISTS`` - the same APPEND-done time. That is how fast anything
  can learn of the mail from this Dovecot; emlisten's figure adds fetching and the callback.

By default the run waits first until the fetch sessions opened by the start-up catch-up have
closed, so each mailbox's first mail is delivered on a cold fetch session (connect + login),
as for a mailbox that receives mail rarely; later mails reuse the pooled session.

``--quiet-mailboxes``: one mail per quiet mailbox. Each mailbox first gets a warm-up mail (not
measured; delivering it opens the mailbox's fetch session in emlisten's reader pool), then the
bench waits until ``EMLISTEN_READER_IDLE_SECONDS`` (60 s unless ``--env`` sets it) + 5 s have
passed since the last warm-up callback and emlisten holds only its IDLE sessions again (the old
reader sessions expired and closed). Then exactly one measured mail per mailbox (``--mails`` is
ignored), round-robin every ``--spacing`` s, next to the floor probe: every figure is that of a
mail to a mailbox that was quiet longer than the reader pool keeps a session.
"""

from __future__ import annotations

import argparse
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

import trio

from bench._harness import (
    DELIVERY_CALL,
    DELIVERY_LATENCY,
    GC_PAUSE,
    IMAP_COMMAND,
    LOOKS_QUIET_SECONDS,
    Appender,
    CallbackIndex,
    MailServerSide,
    Result,
    Stack,
    add_common_arguments,
    bench_dovecot,
    bench_message,
    close_all,
    common_params,
    connect_appenders,
    create_users,
    open_stack,
    parse_env,
    prepare_mailboxes,
    say,
    session_counts,
    summary_ms,
    wait_for_looks,
)
from bench._rawimap import RawImap, RawImapError
from tests.servers.dovecot import Dovecot, MailUser

#: Logins a floor probe tries before the run gives up (the server may close a few under load).
_PROBE_LOGIN_ATTEMPTS = 5

TARGET_P50_OVER_FLOOR_MS = 5.0
#: An answer slower than this (a bucket bound of emlisten's histograms) is counted in the result.
SLOW_ANSWER_SECONDS = 0.25
TARGET_P99_MS = 100.0
#: emlisten's default EMLISTEN_READER_IDLE_SECONDS (production default, emlisten/config.py).
DEFAULT_READER_IDLE_SECONDS = 60.0
#: How much longer than the reader idle time a quiet mailbox has been quiet.
QUIET_MARGIN_SECONDS = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, mailboxes=100)
    parser.add_argument("--mails", type=int, default=200, help="mails to append (default 200)")
    parser.add_argument("--spacing", type=float, default=0.02, help="seconds between APPENDs (default 0.02)")
    parser.add_argument(
        "--no-settle",
        dest="settle",
        action="store_false",
        help="do not wait for the start-up fetch sessions to close (all mails then find a warm session)",
    )
    parser.add_argument(
        "--quiet-mailboxes",
        dest="quiet",
        action="store_true",
        help="one mail per mailbox, each after the mailbox was quiet longer than "
        "EMLISTEN_READER_IDLE_SECONDS (a warm-up mail first, then the wait; --mails is ignored)",
    )
    parser.add_argument(
        "--callback-timeout",
        type=float,
        default=30.0,
        help="give up when no callback arrived for this long (default 30)",
    )
    parser.add_argument(
        "--settle-looks",
        action="store_true",
        help="before the measured mails, wait until emlisten has opened no session for "
        f"{LOOKS_QUIET_SECONDS:g} s: the looks after every session's first IDLE (up to 25 a second, "
        "for up to a minute after a cold start) are done (default: measure right away, beside them)",
    )
    parser.add_argument(
        "--probe-settle",
        type=float,
        default=None,
        metavar="S",
        help="seconds between the floor probes' IDLE and the first measured mail (default: the "
        "hibernation timeout + 1 s, so that they hibernate as emlisten's sessions have); longer "
        "makes them as old as emlisten's sessions",
    )
    parser.add_argument(
        "--probe-examine",
        action="store_true",
        help="the floor probes open the folder with EXAMINE (read-only), as emlisten's listener "
        "does, instead of SELECT",
    )
    parser.add_argument(
        "--probes-first",
        action="store_true",
        help="open the floor probes before emlisten's sessions (so that the server wakes the "
        "probe of a mailbox first when mail lands; by default emlisten's sessions are the older)",
    )
    parser.add_argument(
        "--fetch-floor",
        action="store_true",
        help="the floor probes also fetch each new mail as emlisten's listener does (DONE + UID FETCH, "
        "IDLE again): a second floor, APPEND -> mail read whole, that holds the server's answer to the "
        "fetch (the probes' fetches share the server with emlisten's)",
    )
    parser.add_argument(
        "--probe-pipelined-idle",
        action="store_true",
        help="with --fetch-floor: the probes send IDLE in the same packet as DONE and the UID FETCH, "
        "as emlisten's listener does, instead of after the fetch's answer",
    )
    parser.add_argument(
        "--afterwards",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after the last callback, keep counting emlisten's CPU and the sessions it opens for "
        "this long: the rechecks each mail schedules (EMLISTEN_RECHECK_SECONDS, _LATE_SECONDS; held "
        "up to 30 s while busy) run after the measured window (default 0: not counted)",
    )


def run(args: argparse.Namespace) -> Result:
    with bench_dovecot(args) as dovecot:
        users = create_users(dovecot, args.mailboxes)
        return trio.run(_measure, args, dovecot, users)


def _hibernate_seconds(value: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|msecs?|s|secs?|m|mins?)?\s*", str(value))
    if match is None:
        return 0.0
    number = float(match.group(1))
    unit = match.group(2) or "s"
    return number / 1000 if unit.startswith("ms") else number * 60 if unit.startswith("m") else number


class FloorProbe:
    """A bare IDLE session on one mailbox that timestamps each new EXISTS count once; with
    ``fetch``, it also fetches the new mail as emlisten's listener does (DONE + UID FETCH, IDLE
    again) and timestamps that."""

    def __init__(self, *, fetch: bool = False, examine: bool = False, pipelined_idle: bool = False) -> None:
        self.fetch = fetch
        self.examine = examine
        self.pipelined_idle = pipelined_idle
        self.initial = 0
        self.seen: dict[int, float] = {}
        self.fetched: dict[int, float] = {}

    def _record(self, count: int, seen_at: float) -> None:
        self.seen.setdefault(count, seen_at)

    def _record_fetched(self, count: int, fetched_at: float) -> None:
        self.fetched.setdefault(count, fetched_at)

    def first_reaching(self, count: int) -> float | None:
        """When an EXISTS of at least ``count`` was first seen (Dovecot may report several new
        mails in one EXISTS, skipping the counts in between)."""
        times = [at for seen_count, at in self.seen.items() if seen_count >= count]
        return min(times) if times else None

    def fetched_reaching(self, count: int) -> float | None:
        """When the mail up to EXISTS ``count`` was first read whole (``fetch`` only)."""
        times = [at for fetched_count, at in self.fetched.items() if fetched_count >= count]
        return min(times) if times else None

    async def run(self, stack: MailServerSide, user: MailUser, *, task_status: trio.TaskStatus[None]) -> None:
        context = stack.dovecot.client_ssl_context() if stack.tls else None
        port = stack.dovecot.imaps_port if stack.tls else stack.dovecot.imap_port
        for attempt in range(_PROBE_LOGIN_ATTEMPTS):
            # A server busy with thousands of sessions (and emlisten's looks after the warm-up)
            # closes some new connections during the handshake; any real client logs in again.
            try:
                client = await RawImap.connect(stack.dovecot.host, port, context)
                try:
                    await client.login(user.name, user.password)
                except BaseException:
                    await client.aclose()
                    raise
                break
            except (OSError, trio.BrokenResourceError, RawImapError):
                if attempt == _PROBE_LOGIN_ATTEMPTS - 1:
                    raise
                await trio.sleep(1.0)
        try:
            self.initial, uidnext = await client.select_with_uidnext("INBOX", examine=self.examine)
            tag = await client.idle_start()
            task_status.started()
            if self.fetch:
                await client.watch_and_fetch(
                    tag, uidnext, self._record, self._record_fetched, pipelined_idle=self.pipelined_idle
                )
            else:
                await client.watch(tag, self._record)
        finally:
            await client.aclose()


async def _quiet_period(
    stack: Stack, appenders: Sequence[Appender], args: argparse.Namespace
) -> dict[str, Any]:
    """A warm-up mail per mailbox (its fetch session opens), then wait until the reader pool's
    idle time (+ a margin) has passed since the last warm-up callback and only the IDLE sessions
    are left."""
    n = len(appenders)
    reader_idle = float(parse_env(args.env).get("EMLISTEN_READER_IDLE_SECONDS", DEFAULT_READER_IDLE_SECONDS))
    run_tag = uuid.uuid4().hex[:8]
    index = CallbackIndex(stack.standin, run_tag)
    say(f"warm-up: one mail per mailbox ({n}), every {args.spacing * 1000:g} ms")
    for k, appender in enumerate(appenders):
        await appender.append(bench_message(run_tag, k))
        await trio.sleep(args.spacing)
    await index.wait_for(n, args.callback_timeout, "warm-up callbacks")
    readers = stack.emlisten.connections_to(stack.mail_ports) - n
    quiet_until = index.last_received + reader_idle + QUIET_MARGIN_SECONDS
    say(f"quiet: {reader_idle:g} s (reader idle) + {QUIET_MARGIN_SECONDS:g} s; {readers} fetch sessions open")
    await trio.sleep(max(0.0, quiet_until - time.monotonic()))
    closed, _ = await stack.wait_connections(n, args.settle_timeout)
    first_quiet = min(index.first_seen.values()) if index.first_seen else 0.0
    return {
        "reader_idle_seconds": reader_idle,
        "warm_up_delivered": len(index.first_seen),
        "reader_sessions_after_warm_up": readers,
        "reader_sessions_closed": closed,
        # Least quiet mailbox: the last warm-up callback; measured from here to the first measured APPEND.
        "quiet_seconds_least": time.monotonic() - index.last_received,
        "quiet_seconds_most": time.monotonic() - first_quiet,
    }


async def _measure(args: argparse.Namespace, dovecot: Dovecot, users: Sequence[MailUser]) -> Result:
    n = len(users)
    m = n if args.quiet else args.mails
    hibernate = _hibernate_seconds(args.hibernate_timeout)
    run_tag = uuid.uuid4().hex[:8]
    result = Result(
        "latency",
        {
            **common_params(args),
            "mails": m,
            "spacing_s": args.spacing,
            "settle": args.settle,
            "probe_settle_s": args.probe_settle,
            "probes_first": args.probes_first,
            "probe_examine": args.probe_examine,
            "probe_pipelined_idle": args.probe_pipelined_idle,
            "quiet_mailboxes": args.quiet,
        },
    )
    await prepare_mailboxes(dovecot, users)
    # Only the mailboxes that get a measured mail need a probe: at 10,000 mailboxes a probe
    # for each doubled the server's sessions (20,000), and it refused some logins.
    probe_options = {"examine": args.probe_examine, "pipelined_idle": args.probe_pipelined_idle}
    probes = [FloorProbe(fetch=args.fetch_floor, **probe_options) for _ in users[: min(n, m)]]
    async with open_stack(args, dovecot) as stack, trio.open_nursery() as early:
        if args.probes_first:
            # The probes' sessions are the older ones: Dovecot wakes them first when mail lands.
            for probe, user in zip(probes, users[: len(probes)], strict=True):
                await early.start(probe.run, stack, user)
        await stack.start_listening(users)
        settled = False
        if args.settle:
            settled, _ = await stack.wait_connections(n, args.settle_timeout)
        looks_settled = await wait_for_looks(stack, n, args.settle_timeout) if args.settle_looks else None
        appenders = await connect_appenders(stack, users)
        quiet = await _quiet_period(stack, appenders, args) if args.quiet else {}
        async with trio.open_nursery() as nursery:
            if not args.probes_first:
                for probe, user in zip(probes, users[: len(probes)], strict=True):
                    await nursery.start(probe.run, stack, user)
                # Let the fresh probe sessions hibernate too, so both sides take the same path.
                default_settle = hibernate + 1.0 if hibernate else 0.5
                await trio.sleep(default_settle if args.probe_settle is None else args.probe_settle)

            index = CallbackIndex(stack.standin, run_tag)
            appended_at: list[float] = []
            say(f"appending {m} mails, one every {args.spacing * 1000:g} ms")
            cpu_before = stack.emlisten.cpu_seconds()
            sessions_before = await session_counts(stack.http, stack.emlisten.url)
            # With hibernation, a mail arriving while its session is being handed to
            # imap-hibernate can go unannounced (seen here for bare clients and emlisten alike):
            # each round of N mails is followed by a pause that lets every session hibernate again.
            pause = hibernate + 1.5 if hibernate else 0.0
            start = trio.current_time()
            for i in range(m):
                if pause and i and i % n == 0:
                    await trio.sleep(pause)
                    start = trio.current_time() - i * args.spacing
                await appenders[i % n].append(bench_message(run_tag, i))
                appended_at.append(time.monotonic())
                await trio.sleep_until(start + (i + 1) * args.spacing)
            complete = await index.wait_for(m, args.callback_timeout, "callbacks")
            cpu_used = stack.emlisten.cpu_seconds() - cpu_before
            opened = await session_counts(stack.http, stack.emlisten.url) - sessions_before
            own_ms = {
                "notified_to_answered": opened.mean_ms(DELIVERY_LATENCY),
                "uid_fetch": opened.mean_ms(IMAP_COMMAND, "command=UID FETCH"),
                "delivery_call": opened.mean_ms(DELIVERY_CALL),
            }
            # Answers slower than a quarter second: the server's (DONE + UID FETCH) or the
            # receiver's (callback), to tell them from emlisten's own loop in a slow second.
            slow_answers = {
                "uid_fetch": opened.count_over(IMAP_COMMAND, SLOW_ANSWER_SECONDS, "command=UID FETCH"),
                "delivery_call": opened.count_over(DELIVERY_CALL, SLOW_ANSWER_SECONDS),
            }
            # The longest the process can have stood still for its garbage collector: the
            # histogram's sum per generation, and how many collections (counters in the result).
            gc_ms = {gen: round(opened.sum_ms(GC_PAUSE, f"generation={gen}"), 1) for gen in ("0", "1", "2")}
            afterwards: dict[str, Any] = {}
            if args.afterwards > 0:
                say(f"counting CPU and sessions for {args.afterwards:g} s more (the rechecks)")
                await trio.sleep(args.afterwards)
                afterwards = {
                    "seconds": args.afterwards,
                    "cpu_seconds": round(stack.emlisten.cpu_seconds() - cpu_before, 3),
                    "sessions_opened": (
                        await session_counts(stack.http, stack.emlisten.url) - sessions_before
                    ).as_dict(),
                }
            nursery.cancel_scope.cancel()
        await close_all(appenders)
        early.cancel_scope.cancel()

    emlisten_s: list[float] = []
    floor_s: list[float] = []
    over_floor_s: list[float] = []
    first_s: list[float] = []
    later_s: list[float] = []
    first_floor_s: list[float] = []
    later_floor_s: list[float] = []
    per_mail: list[dict[str, float | int | None]] = []
    fetch_floor_s: list[float] = []
    over_fetch_floor_s: list[float] = []
    #: The bare client's own DONE + UID FETCH: from the EXISTS it read to the mail read whole
    #: (the same span as emlisten's "DONE + UID FETCH" histogram, read on the same server).
    probe_fetch_s: list[float] = []
    floor_missing = 0
    for i, done in enumerate(appended_at):
        k, nth = i % n, i // n + 1
        received = index.first_seen.get(i)
        seen = probes[k].first_reaching(probes[k].initial + nth)
        fetched = probes[k].fetched_reaching(probes[k].initial + nth) if args.fetch_floor else None
        if fetched is not None:
            fetch_floor_s.append(fetched - done)
            if seen is not None:
                probe_fetch_s.append(fetched - seen)
            if received is not None:
                over_fetch_floor_s.append(received - fetched)
        if seen is None:
            floor_missing += 1
        else:
            floor_s.append(seen - done)
            (first_floor_s if nth == 1 else later_floor_s).append(seen - done)
        per_mail.append(
            {
                "mailbox": k,
                "nth": nth,
                "callback_ms": None if received is None else round(1000 * (received - done), 2),
                "exists_ms": None if seen is None else round(1000 * (seen - done), 2),
            }
        )
        if received is None:
            continue
        emlisten_s.append(received - done)
        (first_s if nth == 1 else later_s).append(received - done)
        if seen is not None:
            over_floor_s.append(received - seen)

    lost = m - len(index.first_seen)
    em, fl, over = summary_ms(emlisten_s), summary_ms(floor_s), summary_ms(over_floor_s)
    result.metrics.update(
        {
            "emlisten_ms": em,
            "floor_ms": fl,
            "emlisten_minus_floor_per_mail_ms": over,
            "fetch_floor_ms": summary_ms(fetch_floor_s),
            "emlisten_minus_fetch_floor_per_mail_ms": summary_ms(over_fetch_floor_s),
            "bare_client_fetch_ms": summary_ms(probe_fetch_s),
            "first_mail_per_mailbox_ms": summary_ms(first_s),
            "later_mails_ms": summary_ms(later_s),
            "floor_first_mail_per_mailbox_ms": summary_ms(first_floor_s),
            "floor_later_mails_ms": summary_ms(later_floor_s),
            "per_mail": per_mail,
            "settled_before_run": settled,
            "looks_settled_before_run": looks_settled,
            "sessions_opened_during_run": opened.as_dict(),
            "quiet": quiet,
            "delivered": len(index.first_seen),
            "not_delivered": lost,
            "duplicated": index.duplicated,
            "floor_missing": floor_missing,
            "callbacks": index.calls,
            "emlisten_cpu_seconds_per_mail": round(cpu_used / m, 5) if m else None,
            "emlisten_own_clock_mean_ms": own_ms,
            "answers_over_250ms": slow_answers,
            "emlisten_gc_pause_ms_by_generation": gc_ms,
            "afterwards": afterwards,
            "complete": complete,
        }
    )
    if not em or not fl:
        result.notes.append("no latency figure: nothing was delivered or no EXISTS was seen")
        return result
    for q in ("p50", "p90", "p99", "max"):
        target, ok = "", None
        if q == "p50":
            target = f"<= floor + {TARGET_P50_OVER_FLOOR_MS:g} ms"
            ok = em["p50"] - fl["p50"] <= TARGET_P50_OVER_FLOOR_MS
        elif q == "p99":
            target, ok = f"< {TARGET_P99_MS:g} ms", em["p99"] < TARGET_P99_MS
        result.row(
            f"APPEND -> callback {q} (floor: APPEND -> EXISTS)", f"{em[q]} ms (floor {fl[q]} ms)", target, ok
        )
    if over:
        result.row("per-mail callback - EXISTS, p50 / p99", f"{over['p50']} / {over['p99']} ms")
    if args.fetch_floor:
        fetch_floor = summary_ms(fetch_floor_s)
        if fetch_floor:
            result.row(
                "fetch floor (bare client: APPEND -> mail read whole) p50 / p99; emlisten's p50 over it",
                f"{fetch_floor['p50']} / {fetch_floor['p99']} ms; {em['p50'] - fetch_floor['p50']:+.1f} ms",
            )
            over_fetch = summary_ms(over_fetch_floor_s)
            result.row(
                "per-mail callback - bare client's fetch, p50 / p99",
                f"{over_fetch['p50']} / {over_fetch['p99']} ms" if over_fetch else "-",
            )
            probe_fetch = summary_ms(probe_fetch_s)
            if probe_fetch:
                result.row(
                    "bare client's DONE + UID FETCH (its EXISTS read -> mail read), mean / p50 / p90",
                    f"{probe_fetch['mean']} / {probe_fetch['p50']} / {probe_fetch['p90']} ms",
                )
        missing = len(appended_at) - len(fetch_floor_s)
        if missing:
            result.notes.append(f"the fetching floor probe read no mail for {missing} mail(s)")
    if own_ms["notified_to_answered"] is not None:
        # emlisten's own clock (its histograms): from the EXISTS its session read to the callback's
        # 2xx, and within it the mail server's answer to DONE + UID FETCH and the receiver's to the
        # callback. The rest is emlisten's own work; the floor's gap holds the server's part too.
        result.row(
            "emlisten's clock, means: notification -> 2xx / of it DONE + UID FETCH / callback call",
            " / ".join("-" if v is None else f"{v} ms" for v in own_ms.values()),
        )
        result.row(
            f"of them, answers over {SLOW_ANSWER_SECONDS * 1000:g} ms: DONE + UID FETCH / callback call",
            f"{slow_answers['uid_fetch']} / {slow_answers['delivery_call']}",
        )
    if any(gc_ms.values()):
        result.row(
            "emlisten stood still for its garbage collector (generation 0 / 1 / 2, in all)",
            " / ".join(f"{gc_ms[gen]} ms" for gen in ("0", "1", "2")),
        )
    if first_s and later_s and first_floor_s and later_floor_s:
        result.row(
            "p50 first mail per mailbox / later mails",
            f"{summary_ms(first_s)['p50']} / {summary_ms(later_s)['p50']} ms (floor "
            f"{summary_ms(first_floor_s)['p50']} / {summary_ms(later_floor_s)['p50']} ms)",
        )
    result.row(
        "delivered / lost / duplicated",
        f"{len(index.first_seen)} / {lost} / {index.duplicated}",
        "all / 0 / 0",
        lost == 0 and index.duplicated == 0,
    )
    result.row("emlisten CPU per mail", f"{1000 * cpu_used / m:.2f} ms")
    result.row("IMAP sessions opened during the measured mails (LOGIN/AUTHENTICATE)", str(opened.logins))
    if afterwards:
        result.row(
            f"including {afterwards['seconds']:g} s after the last callback: CPU per mail / sessions opened",
            f"{1000 * afterwards['cpu_seconds'] / m:.2f} ms / {afterwards['sessions_opened']['logins']}",
        )
    if looks_settled is not None:
        result.notes.append(
            f"--settle-looks: the measured mails began after the looks that follow every session's first "
            f"IDLE: {looks_settled['logins']} sessions opened in the {looks_settled['seconds']:.0f} s after "
            f"all listened, until none for {LOOKS_QUIET_SECONDS:g} s"
            + ("" if looks_settled["settled"] else " (NOT settled: the wait timed out)")
            + "."
        )
    if quiet:
        least, idle = quiet["quiet_seconds_least"], quiet["reader_idle_seconds"]
        closed = "yes" if quiet["reader_sessions_closed"] else "NO"
        result.row(
            "one mail per quiet mailbox: quiet since the warm-up callback / old fetch sessions closed",
            f">= {least:.1f} s (EMLISTEN_READER_IDLE_SECONDS {idle:g}) / {closed}",
        )
        result.notes.append(
            f"--quiet-mailboxes: every mailbox got a warm-up mail first (delivered: "
            f"{quiet['warm_up_delivered']} of {n}; fetch sessions open afterwards: "
            f"{quiet['reader_sessions_after_warm_up']}); the measured mail came after the mailbox had been "
            f"quiet at least {least:.1f} s, longer than the reader pool keeps a session: a mail that needs a "
            f"fetch session gets a new one (connect + login); {opened.logins} were opened for the {m} mails."
        )
    elif settled:
        result.notes.append(
            "Each mailbox's first mail found no pooled fetch session (the start-up ones had closed): one "
            "that needs a fetch session opens it (connect + login + select); later mails reuse it. "
            f"{opened.logins} sessions were opened for the {m} mails."
        )
    if hibernate and m > n:
        result.notes.append(
            f"Rounds of {n} mails (one per mailbox) with a {hibernate + 1.5:g} s pause between rounds, so "
            "that every mail finds its sessions hibernated (Dovecot can leave a mail that arrives while a "
            "session is being hibernated unannounced)."
        )
    result.notes.append(
        f"{n} mailboxes, {m} mails round-robin, one APPEND every {args.spacing * 1000:g} ms; the floor is "
        "a bare IDLE client on the same mailbox in the bench process; Dovecot hibernation "
        f"{args.hibernate_timeout} applies to both."
    )
    if floor_missing:
        result.notes.append(f"the floor probe saw no EXISTS for {floor_missing} mail(s)")
    return result
