"""Scenarios ``webhook-latency`` and ``webhook-outage``: mailboxes registered through ``/v1``
delivering signed events to a webhook receiver (bench-side HTTP server, tests/servers/webhook.py).

``webhook-latency``: N mailboxes registered through Creatio's API and N through ``/v1`` (a
webhook each, one receiver URL), listening on the same Dovecot. Mails are appended one at a time,
alternating between the two kinds (each mailbox gets one every 2N x ``--spacing`` s, so its
sessions are quiet, hibernated, when the mail comes). Figure: APPEND done -> the call received,
per path.

``webhook-outage``: ``--mailboxes`` mailboxes deliver to receiver A, ``--others`` to receiver B
(another server). A is stopped (connections refused) for ``--outage`` seconds while ``--mails``
mails arrive evenly spread over its mailboxes, and B gets one mail every ``--other-spacing`` s.
Then A starts again on the same port. Figures: B's latency during the outage, how long after A's
return everything arrived, lost, duplicated event ids, order per mailbox, dead letters. The retry
schedule is emlisten's (the default unless ``--env EMLISTEN_WEBHOOK_RETRY_SCHEDULE=...``): after a
long outage the first retry after the return comes at the schedule's current step.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import re
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import trio

from bench._harness import (
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
    open_stack,
    prepare_mailboxes,
    say,
    summary_ms,
)
from tests.servers.dovecot import Dovecot, MailUser
from tests.servers.webhook import WebhookCall, WebhookReceiver

SECRET = "whsec_" + base64.b64encode(b"bench-webhook-secret-0123456789ab").decode()
_SUBJECT = re.compile(r"^bench (\w+) (\d+)$")


def add_latency_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, mailboxes=20)
    parser.add_argument("--mails", type=int, default=200, help="mails per path (default 200)")
    parser.add_argument("--spacing", type=float, default=0.1, help="seconds between APPENDs (default 0.1)")


def add_outage_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, mailboxes=20)
    parser.add_argument("--others", type=int, default=5, help="mailboxes of receiver B (default 5)")
    parser.add_argument("--mails", type=int, default=1000, help="mails to A's mailboxes (default 1000)")
    parser.add_argument("--outage", type=float, default=600.0, help="seconds A is down (default 600)")
    parser.add_argument(
        "--other-spacing", type=float, default=2.0, help="seconds between B's mails (default 2)"
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=3600.0, help="max wait after A's return (default 3600)"
    )


async def register_webhook_mailboxes(stack: Stack, users: Sequence[MailUser], url: str) -> list[str]:
    ids = []
    for user in users:
        body = {
            "protocol": "imap",
            "host": stack.dovecot.host,
            "port": stack.dovecot.imaps_port if stack.tls else stack.dovecot.imap_port,
            "tls": stack.tls,
            "username": user.name,
            "password": user.password,
            "webhook": {"url": url, "secret": SECRET},
        }
        response = await stack.http.post(f"{stack.emlisten.url}/v1/mailboxes", json=body, timeout=60)
        if response.status_code != 201:
            raise BenchError(f"/v1/mailboxes refused: {response.status_code} {response.text[:300]}")
        ids.append(response.json()["id"])
    return ids


def subject_index(call: WebhookCall, run: str) -> int | None:
    match = _SUBJECT.match(str(call.event.get("data", {}).get("subject", "")))
    return int(match.group(2)) if match and match.group(1) == run else None


# -- webhook-latency ---------------------------------------------------------------------------


def run_latency(args: argparse.Namespace) -> Result:
    with bench_dovecot(args) as dovecot:
        users = create_users(dovecot, 2 * args.mailboxes)
        return trio.run(_latency, args, dovecot, users)


async def _latency(args: argparse.Namespace, dovecot: Dovecot, users: Sequence[MailUser]) -> Result:
    n = args.mailboxes
    creatio_users, webhook_users = users[:n], users[n:]
    run = uuid.uuid4().hex[:8]
    result = Result(
        "webhook-latency", {**common_params(args), "mails_per_path": args.mails, "spacing_s": args.spacing}
    )
    await prepare_mailboxes(dovecot, users)
    receiver = WebhookReceiver()
    async with trio.open_nursery() as nursery:
        await receiver.start(nursery)
        async with open_stack(args, dovecot) as stack:
            await stack.start_listening(creatio_users)
            await register_webhook_mailboxes(stack, webhook_users, receiver.url("/hooks/latency"))
            await stack.wait_listening(2 * n)
            await stack.wait_connections(2 * n, args.settle_timeout)
            appenders = await connect_appenders(stack, users)
            index = CallbackIndex(stack.standin, run)
            done_at: dict[tuple[str, int], float] = {}  # (path, index) -> APPEND done
            say(f"appending {args.mails} mails per path, one every {args.spacing * 1000:g} ms")
            for i in range(args.mails):
                for kind, offset in (("creatio", 0), ("webhook", n)):
                    k = offset + i % n
                    number = 2 * i + (kind == "webhook")
                    await appenders[k].append(bench_message(run, number))
                    done_at[(kind, number)] = time.monotonic() if kind == "creatio" else time.time()
                    await trio.sleep(args.spacing)
            await index.wait_for(args.mails, 60, "Creatio callbacks")
            await receiver.wait_accepted("/hooks/latency", args.mails, timeout=120)
            await close_all(appenders)
        nursery.cancel_scope.cancel()

    creatio_s = [
        index.first_seen[number] - done_at[("creatio", number)]
        for (kind, number) in done_at
        if kind == "creatio" and number in index.first_seen
    ]
    webhook_s = []
    for call in receiver.accepted("/hooks/latency"):
        number = subject_index(call, run)
        if number is not None and ("webhook", number) in done_at:
            webhook_s.append(call.received_at - done_at[("webhook", number)])
    creatio, webhook = summary_ms(creatio_s), summary_ms(webhook_s)
    result.metrics.update({"creatio_ms": creatio, "webhook_ms": webhook})
    for q in ("p50", "p90", "p99", "max"):
        result.row(f"APPEND -> call {q}: webhook / Creatio", f"{webhook[q]} / {creatio[q]} ms")
    result.row("delivered: webhook / Creatio", f"{len(webhook_s)} / {len(creatio_s)} of {args.mails} each")
    return result


# -- webhook-outage ----------------------------------------------------------------------------


def run_outage(args: argparse.Namespace) -> Result:
    with bench_dovecot(args) as dovecot:
        users = create_users(dovecot, args.mailboxes + args.others)
        return trio.run(_outage, args, dovecot, users)


async def _outage(args: argparse.Namespace, dovecot: Dovecot, users: Sequence[MailUser]) -> Result:
    a_users, b_users = users[: args.mailboxes], users[args.mailboxes :]
    run = uuid.uuid4().hex[:8]
    result = Result(
        "webhook-outage",
        {
            **common_params(args),
            "others": args.others,
            "mails": args.mails,
            "outage_s": args.outage,
            "other_spacing_s": args.other_spacing,
        },
    )
    await prepare_mailboxes(dovecot, users)
    receiver_a, receiver_b = WebhookReceiver(), WebhookReceiver()
    metrics: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        await receiver_a.start(nursery)
        await receiver_b.start(nursery)
        async with open_stack(args, dovecot) as stack:
            a_ids = await register_webhook_mailboxes(stack, a_users, receiver_a.url("/a"))
            b_ids = await register_webhook_mailboxes(stack, b_users, receiver_b.url("/b"))
            await stack.wait_listening(len(users))
            appenders = await connect_appenders(stack, users)
            a_appenders, b_appenders = appenders[: len(a_users)], appenders[len(a_users) :]
            await receiver_a.stop()
            say(f"receiver A down for {args.outage:g} s; {args.mails} mails to its {len(a_ids)} mailboxes")
            b_done: dict[int, float] = {}
            cpu_before = stack.emlisten.cpu_seconds()
            outage_started = time.time()

            async def mail_b(*, task_status: trio.TaskStatus[None]) -> None:
                task_status.started()
                number = 1_000_000
                while True:
                    await b_appenders[number % len(b_appenders)].append(bench_message(run, number))
                    b_done[number] = time.time()
                    number += 1
                    await trio.sleep(args.other_spacing)

            async with trio.open_nursery() as traffic:
                await traffic.start(mail_b)
                spacing = args.outage / args.mails
                progress = Progress("mails appended during the outage", args.mails)
                start = trio.current_time()
                for i in range(args.mails):
                    await a_appenders[i % len(a_appenders)].append(bench_message(run, i))
                    progress.update(i + 1)
                    await trio.sleep_until(start + (i + 1) * spacing)
                progress.close(args.mails)
                await trio.sleep_until(start + args.outage)
                traffic.cancel_scope.cancel()
            during_b = [
                call.received_at - b_done[number]
                for call in receiver_b.accepted("/b")
                if (number := subject_index(call, run)) is not None and number in b_done
            ]
            calls_refused_window = time.time() - outage_started
            await receiver_a.start(nursery)
            back_at = time.time()
            say("receiver A is back")
            drained = True
            try:
                await receiver_a.wait_until(
                    lambda: (
                        len({subject_index(c, run) for c in receiver_a.accepted("/a")} - {None}) >= args.mails
                    ),
                    timeout=args.drain_timeout,
                )
            except trio.TooSlowError:
                drained = False
            drain_s = time.time() - back_at
            # A duplicate sent after the last first delivery would show up meanwhile.
            await trio.sleep(min(5.0, args.outage))
            cpu_used = stack.emlisten.cpu_seconds() - cpu_before
            dead = (await stack.http.get(f"{stack.emlisten.url}/v1/dead-letters", timeout=30)).json()["total"]
            metrics.update(
                a_ids=len(a_ids), b_ids=len(b_ids), dead_letters=dead, emlisten_cpu_seconds=cpu_used
            )
            await close_all(appenders)
        nursery.cancel_scope.cancel()

    accepted = receiver_a.accepted("/a")
    ids = Counter(call.headers["webhook-id"] for call in accepted)
    numbers = [n for call in accepted if (n := subject_index(call, run)) is not None]
    delivered = set(numbers)
    per_mailbox: dict[str, list[int]] = {}
    for call in accepted:
        number = subject_index(call, run)
        if number is not None:
            per_mailbox.setdefault(call.event["mailbox"], []).append(number)
    out_of_order = sum(1 for seq in per_mailbox.values() for x, y in itertools.pairwise(seq) if y <= x)
    first_at = min((c.received_at for c in accepted), default=0.0)
    lost = args.mails - len(delivered)
    duplicated_ids = sum(count - 1 for count in ids.values() if count > 1)
    b = summary_ms(during_b)
    result.metrics.update(
        {
            **metrics,
            "b_latency_during_outage_ms": b,
            "b_mails_during_outage": len(during_b),
            "a_delivered": len(delivered),
            "a_lost": lost,
            "a_duplicated_event_ids": duplicated_ids,
            "a_calls_accepted": len(accepted),
            "a_calls_total": len(receiver_a.calls_to("/a")),
            "a_out_of_order": out_of_order,
            "first_call_after_return_s": round(first_at - back_at, 2) if accepted else None,
            "drain_after_return_s": round(drain_s, 2),
            "drained": drained,
            "outage_window_s": round(calls_refused_window, 1),
        }
    )
    result.row(
        f"A down {args.outage:g} s, {args.mails} mails: delivered / lost / duplicated event ids",
        f"{len(delivered)} / {lost} / {duplicated_ids}",
        "all / 0 / 0",
        lost == 0 and duplicated_ids == 0,
    )
    result.row("A: out of order within a mailbox", str(out_of_order), "0", out_of_order == 0)
    result.row(
        "A back -> first call / all delivered",
        f"{first_at - back_at:.1f} s / {drain_s:.1f} s" if accepted else "nothing",
    )
    result.row("dead letters", str(metrics.get("dead_letters")), "0", metrics.get("dead_letters") == 0)
    result.row(
        f"B during the outage: {len(during_b)} mails, APPEND -> call p50 / p99 / max",
        f"{b.get('p50')} / {b.get('p99')} / {b.get('max')} ms" if b else "none",
    )
    result.row("emlisten CPU over the run", f"{metrics.get('emlisten_cpu_seconds', 0):.1f} s")
    return result


# The scenario modules bench/__main__.py expects.
class _Scenario:
    def __init__(self, doc: str, add: Any, run: Any) -> None:
        self.__doc__ = doc
        self.add_arguments = add
        self.run = run


latency = _Scenario(__doc__ or "", add_latency_arguments, run_latency)
outage = _Scenario(__doc__ or "", add_outage_arguments, run_outage)

__all__ = ["latency", "outage"]
