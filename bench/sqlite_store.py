"""Scenario ``sqlite-store``: what the durable embedded store (``EMLISTEN_DATA_DIR``) costs.

In this process, on a fresh data directory (``--dir``, default a temporary one on the same disk
as /tmp):

- N mailboxes registered (one ``put_mailboxes`` call), each with a status and an INBOX checkpoint;
- checkpoint advances per second, one task after another (each waits for its own commit: the
  worst case, a single busy mailbox), with ``synchronous=NORMAL`` (what the store uses) and with
  ``FULL`` (an fsync per commit) for comparison;
- checkpoint advances per second from ``--concurrency`` tasks at once, each on its own mailbox
  (deliveries of many mailboxes: the writer commits them together);
- opening the store again with the N mailboxes (read and decrypt everything).

Then as operators see it: ``emlisten serve --role=all`` started on that directory, the time until
the API answers, the ``loaded in`` time it logs, and its RSS once up. The mailboxes point at a
closed port on 127.0.0.1, so no mail server is involved (their listeners fail and back off).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import trio

from bench._harness import BenchError, EmlistenProcess, Result, say
from emlisten.models import Checkpoint, MailboxConfig, MailboxState, MailboxStatus, Security, ServerEndpoint
from emlisten.store.sqlite import DB_FILE, SqliteStore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mailboxes", type=int, default=10_000, help="mailboxes in the store (default 10000)"
    )
    parser.add_argument("--advances", type=int, default=3000, help="advances per measurement (default 3000)")
    parser.add_argument("--concurrency", type=int, default=64, help="tasks advancing at once (default 64)")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the data directory (default /tmp)")
    parser.add_argument("--results-dir", type=Path, default=Path(__file__).resolve().parent / "results")


def run(args: argparse.Namespace) -> Result:
    if args.mailboxes < args.concurrency:
        raise BenchError("--mailboxes must be at least --concurrency")
    work = Path(tempfile.mkdtemp(prefix="emlisten-bench-sqlite-", dir=args.dir))
    try:
        return trio.run(_measure, args, work)
    finally:
        shutil.rmtree(work / "data", ignore_errors=True)  # the logs stay, as in the other scenarios


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed again when the probe is


def _mailbox(index: int, port: int) -> MailboxConfig:
    return MailboxConfig(
        id=str(uuid.UUID(int=index + 1)),
        user_name=f"user{index}@example.test",
        password=secrets.token_hex(8),
        imap=ServerEndpoint("127.0.0.1", port, Security.NONE),
        bpm_endpoint="http://127.0.0.1:9/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail",
        folders=("INBOX",),
    )


async def _advances_sequential(store: SqliteStore, mailbox_id: str, count: int, start: int) -> float:
    started = time.perf_counter()
    for uid in range(start, start + count):
        await store.advance_checkpoint(mailbox_id, "INBOX", Checkpoint(1, uid))
    return count / (time.perf_counter() - started)


async def _advances_concurrent(
    store: SqliteStore, ids: list[str], count: int, start: int
) -> tuple[float, int]:
    per_task = count // len(ids)
    commits = store.commits

    async def one(mailbox_id: str) -> None:
        for uid in range(start, start + per_task):
            await store.advance_checkpoint(mailbox_id, "INBOX", Checkpoint(1, uid))

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for mailbox_id in ids:
            nursery.start_soon(one, mailbox_id)
    return per_task * len(ids) / (time.perf_counter() - started), store.commits - commits


async def _set_synchronous(store: SqliteStore, mode: str) -> None:
    await store._thread(store._db.connection.execute, f"PRAGMA synchronous={mode}")


async def _measure(args: argparse.Namespace, work: Path) -> Result:
    result = Result(
        "sqlite-store",
        {"mailboxes": args.mailboxes, "advances": args.advances, "concurrency": args.concurrency},
    )
    data_dir = work / "data"
    key = secrets.token_hex(32)
    port = _closed_port()
    mailboxes = [_mailbox(i, port) for i in range(args.mailboxes)]
    ids = [m.id for m in mailboxes]
    metrics: dict[str, Any] = {}
    async with SqliteStore.open(data_dir, secret_key=key) as store:
        started = time.perf_counter()
        await store.put_mailboxes(mailboxes)
        await store.set_statuses({m: MailboxStatus(MailboxState.LISTENING, updated_at=1.0) for m in ids})
        for mailbox_id in ids:
            store._checkpoints[(mailbox_id, "INBOX")] = Checkpoint(1, 1)  # seeded in bulk, then written
            store._dirty.checkpoints.add((mailbox_id, "INBOX"))
        await store.flush()
        metrics["register_seconds"] = round(time.perf_counter() - started, 3)
        metrics["advances_per_second_sequential_normal"] = round(
            await _advances_sequential(store, ids[0], args.advances, 2), 1
        )
        await _set_synchronous(store, "FULL")
        metrics["advances_per_second_sequential_full"] = round(
            await _advances_sequential(store, ids[1], args.advances, 2), 1
        )
        await _set_synchronous(store, "NORMAL")
        rate, commits = await _advances_concurrent(store, ids[: args.concurrency], args.advances, 2)
        metrics["advances_per_second_concurrent"] = round(rate, 1)
        metrics["commits_for_concurrent_advances"] = commits
    size = sum(path.stat().st_size for path in data_dir.iterdir() if path.name.startswith(DB_FILE))
    metrics["database_bytes"] = size

    started = time.perf_counter()
    async with SqliteStore.open(data_dir, secret_key=key) as store:
        metrics["open_and_load_seconds"] = round(time.perf_counter() - started, 3)
        if len(await store.list_mailbox_ids()) != args.mailboxes:
            raise BenchError("the reopened store does not hold every mailbox")

    metrics.update(await _process_start(data_dir, key, work))
    result.metrics = metrics
    _report(result, args)
    return result


async def _process_start(data_dir: Path, key: str, work: Path) -> dict[str, Any]:
    env = {
        "EMLISTEN_DATA_DIR": str(data_dir),
        "EMLISTEN_SECRET_KEY": key,
        "EMLISTEN_LOG_LEVEL": "INFO",
        "EMLISTEN_NODE_ID": "bench",
        # The listeners fail at once (closed port): keep their retries rare during the figure.
        "EMLISTEN_RECONNECT_BASE_SECONDS": "30",
        "EMLISTEN_RECONNECT_CAP_SECONDS": "60",
    }
    process = EmlistenProcess(env, work, name="emlisten-10k")
    async with httpx.AsyncClient() as http:
        started = time.perf_counter()
        process.spawn()
        try:
            await process.wait_ready(http, within=300)
            ready = time.perf_counter() - started
            loaded = [
                float(found.group(1))
                for line in process.log_lines(r"loaded in")
                if (found := re.search(r"loaded in ([\d.]+)s", line))
            ]
            rss = process.rss_kib()
        finally:
            with contextlib.suppress(BenchError):
                await process.stop()
    say(f"emlisten log: {process.log_path}")
    return {
        "process_start_to_api_seconds": round(ready, 3),
        "process_store_load_seconds": loaded[-1] if loaded else None,
        "process_rss_kib_when_ready": rss,
    }


def _report(result: Result, args: argparse.Namespace) -> None:
    m = result.metrics
    result.row(
        f"register {args.mailboxes} mailboxes (status, checkpoint), written", f"{m['register_seconds']:.2f} s"
    )
    result.row(
        "checkpoint advances/s, one after another (synchronous=NORMAL, used)",
        f"{m['advances_per_second_sequential_normal']:.0f}",
    )
    result.row(
        "checkpoint advances/s, one after another (synchronous=FULL, for comparison)",
        f"{m['advances_per_second_sequential_full']:.0f}",
    )
    result.row(
        f"checkpoint advances/s, {args.concurrency} mailboxes at once (NORMAL)",
        f"{m['advances_per_second_concurrent']:.0f} ({m['commits_for_concurrent_advances']} commits)",
    )
    result.row(f"database with {args.mailboxes} mailboxes", f"{m['database_bytes'] / 1e6:.1f} MB")
    result.row(f"open + load {args.mailboxes} mailboxes (in process)", f"{m['open_and_load_seconds']:.2f} s")
    result.row(
        f"emlisten serve: start -> API answering, {args.mailboxes} mailboxes in the store",
        f"{m['process_start_to_api_seconds']:.2f} s (store load {m['process_store_load_seconds']} s)",
    )
    result.row("emlisten RSS when ready", f"{m['process_rss_kib_when_ready'] / 1024:.0f} MiB")
    result.notes.append(
        "Shared 2-core VM (other engineers' tests running): figures are lower bounds on throughput "
        f"and upper bounds on time. Data directory on {os.path.realpath(tempfile.gettempdir())}."
    )
