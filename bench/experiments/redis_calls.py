"""CPU per Redis store call, in a process of its own: a read and a script call, sequential and
32 at once (docs/performance.md, "the store talks RESP itself").

Measured with ``time.process_time()`` (this process only: Redis runs in its own), per call:

- ``get_checkpoint``: one HGET and a JSON decode (a plain read);
- ``set_status``: one EVALSHA (a registered Lua script);
- ``claim_lease_and_read_folder``: one EVALSHA whose reply is an array (a worker's claim).

Each ``--calls`` times one after the other, then the same number spread over ``--concurrency``
Trio tasks. Standalone (imports only ``emlisten``), so the same file measures another checkout's
store: run it by path with that checkout first on ``PYTHONPATH``::

    python bench/experiments/redis_calls.py --bridge            # this tree
    git archive 61f6a8a emlisten | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before python bench/experiments/redis_calls.py --bridge   # redis-py, bridged

``--bridge`` opens the asyncio bridge first, as the service does (it is needed by a store that
runs redis-py on it, and open in every node for RabbitMQ and SMTP). Uses the Redis of the tests
(``EMLISTEN_TEST_REDIS_URL``, default ``redis://127.0.0.1:6379/0``) under a key prefix of its
own, deleted afterwards. Prints one JSON line and a table; writes no result file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import redis
import trio

import emlisten
from emlisten.models import Checkpoint, MailboxConfig, MailboxState, MailboxStatus, Security, ServerEndpoint
from emlisten.store.redis import RedisStore

REDIS_URL = os.environ.get("EMLISTEN_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


@asynccontextmanager
async def _maybe_bridge(bridge: bool) -> AsyncIterator[None]:
    if bridge:
        from emlisten._bridge import open_asyncio_bridge

        async with open_asyncio_bridge():
            yield
    else:
        yield


async def _measure(call: Callable[[int], Awaitable[Any]], calls: int, concurrency: int) -> dict[str, float]:
    """CPU and wall microseconds per call, ``calls`` calls over ``concurrency`` tasks."""
    per_task = calls // concurrency

    async def worker(offset: int) -> None:
        for n in range(offset, offset + per_task):
            await call(n)

    cpu, wall = time.process_time(), time.perf_counter()
    if concurrency == 1:
        await worker(0)
    else:
        async with trio.open_nursery() as nursery:
            for task in range(concurrency):
                nursery.start_soon(worker, task * per_task)
    done = per_task * concurrency
    return {
        "cpu_us": (time.process_time() - cpu) / done * 1e6,
        "wall_us": (time.perf_counter() - wall) / done * 1e6,
    }


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"emlisten-bench:{uuid.uuid4().hex}:"
    mailbox = MailboxConfig(
        id="m-1",
        user_name="someone@example.com",
        imap=ServerEndpoint("imap.example.com", 993, Security.SSL_ON_CONNECT),
        bpm_endpoint="https://creatio.example.com/0/ProcessFullEmail",
    )
    status = MailboxStatus(MailboxState.LISTENING, last_error="")
    figures: dict[str, Any] = {
        "store": str(Path(emlisten.__file__).parent),
        "bridge": args.bridge,
        "calls": args.calls,
        "concurrency": args.concurrency,
        "loadavg_before": _loadavg(),
    }
    try:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(_maybe_bridge(args.bridge))
            store = await stack.enter_async_context(
                RedisStore.open(REDIS_URL, secret_key="redis-calls-bench", prefix=prefix)
            )
            await store.put_mailbox(mailbox)
            await store.seed_checkpoint("m-1", "INBOX", Checkpoint(7, 100))
            operations: dict[str, Callable[[int], Awaitable[Any]]] = {
                "get_checkpoint": lambda n: store.get_checkpoint("m-1", "INBOX"),
                "set_status": lambda n: store.set_status(f"m-{n % 1000}", status),
                "claim_lease_and_read_folder": lambda n: store.claim_lease_and_read_folder(
                    f"node-{n % 32}", f"sync/m-1/INBOX-{n % 32}", "m-1", "INBOX", 30
                ),
            }
            for name, call in operations.items():
                await _measure(call, min(args.calls, 1000), 1)  # warm up (scripts loaded)
                figures[name] = {
                    "sequential": await _measure(call, args.calls, 1),
                    f"concurrent_{args.concurrency}": await _measure(call, args.calls, args.concurrency),
                }
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        try:
            for key in client.scan_iter(match=f"{prefix}*", count=500):
                client.delete(key)
        finally:
            client.close()
    figures["loadavg_after"] = _loadavg()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--bridge", action="store_true", help="open the asyncio bridge first")
    args = parser.parse_args()
    figures = trio.run(_run, args)
    print(json.dumps(figures))
    print(f"store {figures['store']}, bridge {'open' if args.bridge else 'closed'}", file=sys.stderr)
    for name in ("get_checkpoint", "set_status", "claim_lease_and_read_folder"):
        for mode, result in figures[name].items():
            cpu, wall = result["cpu_us"], result["wall_us"]
            print(f"  {name:28} {mode:14} {cpu:7.1f} us CPU/call  {wall:7.1f} us wall", file=sys.stderr)
    print(f"  loadavg {figures['loadavg_before']} -> {figures['loadavg_after']}", file=sys.stderr)


if __name__ == "__main__":
    main()
