"""Scenario ``exchange-history``: a history load of N messages (default 10,000) from an EWS server
(or, with ``--protocol graph``, a Graph server) while the mailbox's listener delivers live mail
at the same time.

The server is the project's EWS simulator (tests/servers/ews.py; or the Graph simulator,
tests/servers/graph.py) and Creatio the stand-in, both in this process's Trio loop; emlisten
runs as its own process (in-memory store, default settings, log level WARNING). One mailbox
holds N messages received over the last
``--days`` days (``--size`` bytes each). The mailbox is registered and listening; then
``POST /api/email/synchronize`` asks for everything since 2000-01-01 while ``--live-rate`` new
messages per second arrive in the same inbox (the listener delivers them) until the load is
done. Reported: the load's duration (synchronize call to ``/v1/mailboxes`` saying done) and
mails/s (target at least 200), emlisten's CPU during the load, and from the stand-in: Email.Ids
delivered more than once (target 0), old and live messages never delivered (target 0).

The simulator and the stand-in share this process's single core with the measurement; the
machine is shared with other work while it runs, so the figures are upper bounds on cost.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import trio

from bench._harness import (
    RESULTS_DIR,
    BenchError,
    EmlistenProcess,
    Progress,
    Result,
    parse_env,
    say,
)
from tests.servers.creatio import CreatioStandIn, get_ci
from tests.servers.ews import EwsSimulator
from tests.servers.graph import GraphSimulator

TARGET_RATE = 200.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=10_000, help="old messages to load (default 10000)")
    parser.add_argument("--size", type=int, default=2048, help="bytes per message, about (default 2048)")
    parser.add_argument("--days", type=int, default=30, help="old mail spread over this many days")
    parser.add_argument(
        "--live-rate", type=float, default=10.0, help="live messages per second during the load (default 10)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this long (s)")
    parser.add_argument("--protocol", choices=("ews", "graph"), default="ews", help="default ews")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the emlisten process (repeatable)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)


def run(args: argparse.Namespace) -> Result:
    if args.messages < 1 or args.live_rate < 0:
        raise BenchError("--messages must be at least 1 and --live-rate at least 0")
    return trio.run(_measure, args)


def _mime(tag: str, index: int, size: int) -> bytes:
    body = ("x" * 70 + "\r\n") * max(1, size // 72)
    return (
        f"From: sender@example.test\r\nTo: bench@ews.example.test\r\n"
        f"Subject: {tag} {index}\r\nMessage-ID: <{tag}.{index}@bench>\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}"
    ).encode()


async def _entry(http: httpx.AsyncClient, base: str, mailbox_id: str) -> dict[str, Any]:
    """The mailbox's ``/v1/mailboxes`` entry ({} while it is not listed)."""
    response = await http.get(f"{base}/v1/mailboxes", timeout=30)
    response.raise_for_status()
    for entry in response.json().get("mailboxes", []):
        if entry.get("id") == mailbox_id:
            return dict(entry)
    return {}


async def _history(http: httpx.AsyncClient, base: str, mailbox_id: str) -> dict[str, Any] | None:
    history: dict[str, Any] | None = (await _entry(http, base, mailbox_id)).get("history")
    return history


class _Server:
    """The mail server side: the EWS or the Graph simulator, one mailbox on it."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.ews = EwsSimulator(keepalive_seconds=30.0)
        self.graph = GraphSimulator()
        self.address = ""
        self._secret = ""

    async def start(self, nursery: trio.Nursery) -> None:
        if self.protocol == "ews":
            await nursery.start(self.ews.serve)
            account = self.ews.add_account()
            self.address, self._secret = account.address, account.password
        else:
            await nursery.start(self.graph.serve)
            self.address, self._secret = self.graph.add_user()

    def add(self, mime: bytes, received: datetime | None = None) -> None:
        if self.protocol == "ews":
            self.ews.add_message(self.address, mime, received=received)
        else:
            self.graph.add_message(self.address, mime, received=received)

    def credentials(self, mailbox_id: str, standin: CreatioStandIn) -> dict[str, Any]:
        body: dict[str, Any] = {
            "Id": mailbox_id,
            "SenderEmailAddress": self.address,
            "BpmEndpoint": standin.endpoint(),
            "BpmUser": "Supervisor",
            "FolderIds": [],
        }
        if self.protocol == "ews":
            account = self.ews.accounts[self.address.lower()]
            body.update(UserName=account.user, Password=self._secret, ServiceUrl=self.ews.url)
        else:
            body.update(
                UserName=self.address,
                UseOAuth=True,
                AccessToken=self._secret,
                Protocol="graph",
                ServiceUrl=self.graph.base_url,
            )
        return body

    def calls(self) -> dict[str, int]:
        if self.protocol == "ews":
            return {
                "find_item_calls": len(self.ews.requests_for(self.address, "FindItem")),
                "get_item_calls": len(self.ews.requests_for(self.address, "GetItem")),
            }
        return {
            "list_calls": len(self.graph.requests_to("GET", r"/mailFolders/[^/]+/messages$")),
            "mime_calls": len(self.graph.requests_to("GET", r"/\$value$")),
        }


async def _measure(args: argparse.Namespace) -> Result:
    result = Result(
        "exchange-history",
        {
            "protocol": args.protocol,
            "messages": args.messages,
            "size_bytes": args.size,
            "days": args.days,
            "live_rate_per_s": args.live_rate,
            "emlisten_env": list(args.env),
        },
    )
    tag = "hist-" + uuid.uuid4().hex[:8]
    live_tag = "live-" + uuid.uuid4().hex[:8]
    env = {"EMLISTEN_LOG_LEVEL": "WARNING", "EMLISTEN_NODE_ID": "bench", **parse_env(args.env)}
    log_dir = Path(tempfile.mkdtemp(prefix="emlisten-bench-"))
    standin = CreatioStandIn()
    server = _Server(args.protocol)
    emlisten = EmlistenProcess(env, log_dir)
    async with trio.open_nursery() as nursery:
        await nursery.start(standin.serve)
        await server.start(nursery)
        now = datetime.now(UTC)
        step = timedelta(days=args.days) / args.messages
        for index in range(args.messages):
            server.add(_mime(tag, index, args.size), received=now - step * (index + 1))
        say(f"{args.messages} messages in the {args.protocol} mailbox")
        limits = httpx.Limits(max_connections=10, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits) as http:
            emlisten.spawn()
            try:
                await emlisten.wait_ready(http)
                await _run(args, result, http, emlisten, standin, server, tag, live_tag)
            finally:
                await emlisten.stop()
        nursery.cancel_scope.cancel()
    say(f"emlisten logs: {log_dir}")
    return result


async def _run(
    args: argparse.Namespace,
    result: Result,
    http: httpx.AsyncClient,
    emlisten: EmlistenProcess,
    standin: CreatioStandIn,
    server: _Server,
    tag: str,
    live_tag: str,
) -> None:
    mailbox_id = str(uuid.uuid4())
    credentials = server.credentials(mailbox_id, standin)
    base = emlisten.url
    response = await http.post(f"{base}/api/listeners/create", json=[credentials], timeout=60)
    if response.status_code != 200:
        raise BenchError(f"create refused: {response.status_code} {response.text[:300]}")
    with trio.move_on_after(60) as waiting:
        while True:
            if (await _entry(http, base, mailbox_id)).get("state") == "listening":
                break
            await trio.sleep(0.05)
    if waiting.cancelled_caught:
        raise BenchError(f"the mailbox did not listen within 60 s:\n{emlisten.log_tail()}")

    live_sent = 0
    done_event = trio.Event()

    async def live_traffic() -> None:
        nonlocal live_sent
        if args.live_rate <= 0:
            return
        interval = 1.0 / args.live_rate
        while not done_event.is_set():
            server.add(_mime(live_tag, live_sent, 512))
            live_sent += 1
            with trio.move_on_after(interval):
                await done_event.wait()

    cpu_before = emlisten.cpu_seconds()
    started = time.monotonic()
    history: dict[str, Any] | None = None
    progress = Progress("history load", args.messages)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(live_traffic)
        response = await http.post(
            f"{base}/api/email/synchronize",
            json={"Credentials": credentials, "Filters": "2000-01-01T00:00:00Z"},
            timeout=60,
        )
        if response.status_code != 200 or response.json().get("Started") is not True:
            raise BenchError(f"synchronize refused: {response.status_code} {response.text[:300]}")
        with trio.move_on_after(args.timeout):
            while True:
                history = await _history(http, base, mailbox_id)
                if history is not None:
                    progress.update(int(history.get("delivered", 0)))
                    if history.get("state") != "running":
                        break
                await trio.sleep(0.1)
        elapsed = time.monotonic() - started
        done_event.set()
    cpu = emlisten.cpu_seconds() - cpu_before
    if history is None or history.get("state") != "done":
        raise BenchError(f"the history load did not finish: {history}\n{emlisten.log_tail()}")
    progress.close(int(history["delivered"]))

    # Live mail sent until now: wait until every one reached the stand-in (or 60 s).
    def subjects() -> Counter[str]:
        return Counter(str(get_ci(e, "Subject")) for e in standin.emails_for(mailbox_id))

    def all_live() -> bool | None:
        return sum(n for s, n in subjects().items() if s.startswith(live_tag)) >= live_sent or None

    with contextlib.suppress(AssertionError, trio.TooSlowError):
        await standin.wait_until(all_live, 60, "live mail")
    emails = standin.emails_for(mailbox_id)
    ids = Counter(str(get_ci(e, "Id")) for e in emails)
    by_subject = subjects()
    duplicate_ids = sum(count - 1 for count in ids.values() if count > 1)
    old_missing = sum(1 for i in range(args.messages) if by_subject[f"{tag} {i}"] == 0)
    live_missing = sum(1 for i in range(live_sent) if by_subject[f"{live_tag} {i}"] == 0)
    delivered = int(history["delivered"])
    rate = delivered / elapsed if elapsed > 0 else 0.0
    result.metrics.update(
        {
            "history_seconds": round(elapsed, 3),
            "history_delivered": delivered,
            "history_total": history.get("total"),
            "history_skipped": history.get("skipped"),
            "mails_per_second": round(rate, 1),
            "emlisten_cpu_seconds": round(cpu, 2),
            "live_sent": live_sent,
            "live_missing": live_missing,
            "old_missing": old_missing,
            "duplicate_email_ids": duplicate_ids,
            "emails_at_standin": len(emails),
            **server.calls(),
        }
    )
    # The target is for EWS; Graph's figure is for information (one request per mail).
    ews = args.protocol == "ews"
    result.row(
        "history load",
        f"{delivered} mails in {elapsed:.1f} s = {rate:.0f} mails/s",
        f">= {TARGET_RATE:.0f}/s" if ews else "",
        rate >= TARGET_RATE if ews else None,
    )
    result.row("emlisten CPU during the load", f"{cpu:.1f} s ({100 * cpu / elapsed:.0f} % of a core)")
    live_text = f"{live_sent} sent, {live_missing} not delivered"
    result.row("live mail during the load", live_text, "0 lost", live_missing == 0)
    result.row("old mail not delivered", str(old_missing), "0", old_missing == 0)
    result.row("Email.Ids delivered twice", str(duplicate_ids), "0", duplicate_ids == 0)
    result.notes.append(
        f"{args.protocol.upper()} simulator and Creatio stand-in in the bench process; emlisten a "
        "separate process (in-memory store, default settings). The machine is shared with other "
        "work: upper bounds."
    )
