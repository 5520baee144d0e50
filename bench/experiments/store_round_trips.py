"""Store round trips and CPU per delivered task on the worker side (issue #13, split roles).

Starts a private ``redis-server`` (its own port, no persistence) so that ``INFO commandstats``
counts this script's commands only, then:

1. **per call**: the CPU and wall time of one store call through the Trio -> asyncio bridge
   (``RedisStore.get_checkpoint``, an HGET, and ``advance_checkpoint``, an EVALSHA), next to the
   bridge's crossing alone (an empty coroutine) and the same HGET from redis-py without the
   bridge, on a plain asyncio loop (in a process of its own) and on trio-asyncio's loop;
2. **per task**: a ``DeliveryWorker`` on that Redis and the in-process queue delivers one task
   per mailbox, each carrying mail the listener already fetched (``SyncTask.prefetched``, as the
   primary queues it in the backlog bench: ``--mails-per-task`` mails of about 5 KB in one
   task), to a sink that accepts at once (in process: this measures the worker and the store,
   not HTTP). Counted: the store's bridge crossings (``RedisStore._run``) by store method, the
   Redis commands by name (``INFO commandstats`` deltas) and the process's CPU per task; the
   same run on ``MemoryStore`` gives the worker's CPU without a store, so the difference is what
   the Redis store costs per task.

    python -m bench.experiments.store_round_trips --mailboxes 1000 --mails-per-task 5

Not a benchmark scenario: no result file, it prints its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import trio
from redis.asyncio import Redis

from emlisten._bridge import open_asyncio_bridge, run_asyncio
from emlisten.abc import Sink, Store
from emlisten.config import Settings
from emlisten.models import Checkpoint, Email, MailboxConfig, RawMessage, Security, ServerEndpoint, SyncTask
from emlisten.queue.inprocess import InProcessQueue
from emlisten.service.delivery import DeliveryWorker
from emlisten.service.readers import ReaderPool
from emlisten.store.memory import MemoryStore
from emlisten.store.redis import RedisStore

T = TypeVar("T")

_SECRET = "store-round-trips-experiment"
_UIDVALIDITY = 7


class _AcceptingSink(Sink):
    """Accepts every call at once and counts the mail (in process, no HTTP)."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = 0
        self.done = trio.Event()

    async def deliver(self, mailbox: MailboxConfig, emails: Sequence[Email], *, idempotency_key: str) -> None:
        await trio.lowlevel.checkpoint()
        self.received += len(emails)
        if self.received >= self.expected:
            self.done.set()

    async def notify_new_ids(self, mailbox: MailboxConfig, ids: Sequence[str]) -> None:
        raise AssertionError("the experiment's mailboxes use full email")

    async def report_state(
        self, mailbox: MailboxConfig, *, available: bool, error_class: str = "", message: str = ""
    ) -> None:
        pass

    async def request_token_refresh(self, mailbox: MailboxConfig) -> None:
        pass


@contextlib.contextmanager
def _private_redis() -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server not found")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="emlisten-rtt-redis-")
    process = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("the private redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def _mailbox(index: int) -> MailboxConfig:
    return MailboxConfig(
        id=str(uuid.UUID(int=index + 1)),
        user_name=f"user{index}@example.test",
        password="not-used",
        imap=ServerEndpoint("imap.invalid", 993, Security.SSL_ON_CONNECT),
        bpm_endpoint="https://creatio.invalid/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail",
        folders=("INBOX",),
    )


def _message(uid: int) -> bytes:
    body = ("A line of the body of the experiment's message, to about five kilobytes.\r\n" * 70).encode()
    head = (
        f"From: sender@example.test\r\nTo: rcpt@example.test\r\nSubject: message {uid}\r\n"
        f"Date: Mon, 02 Jan 2023 10:00:00 +0000\r\nMessage-ID: <{uuid.uuid4().hex}@example.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    ).encode()
    return head + body


def _task(mailbox_id: str, first_uid: int, count: int) -> SyncTask:
    raws = tuple(
        RawMessage(
            uid=uid,
            data=_message(uid),
            size=None,
            key=f"{_UIDVALIDITY}/{uid}",
            position=Checkpoint(_UIDVALIDITY, uid),
        )
        for uid in range(first_uid, first_uid + count)
    )
    last = first_uid + count - 1
    return SyncTask(
        mailbox_id,
        "INBOX",
        uidvalidity=_UIDVALIDITY,
        uid_hint=last,
        seen_at=time.time(),
        prefetched=raws,
        prefetch_from=first_uid,
        prefetch_to=last,
    )


def _count_crossings(store: RedisStore) -> collections.Counter[str]:
    """Count every bridge crossing of the store, by the store method that made it."""
    counts: collections.Counter[str] = collections.Counter()
    original = store._run

    async def counting(operation: Callable[[], Awaitable[T]]) -> T:
        counts[sys._getframe(1).f_code.co_name] += 1
        return await original(operation)

    store._run = counting  # type: ignore[method-assign]
    return counts


async def _commandstats(client: Redis) -> dict[str, int]:
    stats: dict[str, Any] = await run_asyncio(lambda: client.info("commandstats"))
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


async def _per_call_bare_trio(url: str, calls: int) -> None:
    """A lower bound for a Trio-native client: the same HGET written and its reply read by hand
    on a Trio socket (no pool, no general RESP parser, no timeouts or retries)."""
    host, _, port = url.removeprefix("redis://").split("/")[0].rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(b"*4\r\n$4\r\nHSET\r\n$12\r\nbare-trio-rt\r\n$5\r\nINBOX\r\n$1\r\nx\r\n")
    await stream.receive_some()
    hget = b"*3\r\n$4\r\nHGET\r\n$12\r\nbare-trio-rt\r\n$5\r\nINBOX\r\n"

    async def call() -> None:
        await stream.send_all(hget)
        reply = b""
        while not reply.endswith(b"x\r\n"):
            reply += await stream.receive_some()

    for _ in range(200):
        await call()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        await call()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await stream.send_all(b"*2\r\n$3\r\nDEL\r\n$12\r\nbare-trio-rt\r\n")
    await stream.receive_some()
    await stream.aclose()
    label = "HGET, bare Trio socket (by hand)"
    print(f"  {label:34} {cpu / calls * 1e6:7.0f} us CPU, {wall / calls * 1e6:7.0f} us wall per call")


async def _per_call(store: RedisStore, calls: int) -> None:
    async def nothing() -> None:
        pass

    for _ in range(200):
        await run_asyncio(nothing)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        await run_asyncio(nothing)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    label = "the bridge alone (no Redis)"
    print(f"  {label:34} {cpu / calls * 1e6:7.0f} us CPU, {wall / calls * 1e6:7.0f} us wall per call")
    mailbox = _mailbox(10**6)
    await store.put_mailbox(mailbox)
    await store.seed_checkpoint(mailbox.id, "INBOX", Checkpoint(_UIDVALIDITY, 0))
    for label, call in (
        ("get_checkpoint (HGET)", lambda n: store.get_checkpoint(mailbox.id, "INBOX")),
        (
            "advance_checkpoint (EVALSHA)",
            lambda n: store.advance_checkpoint(mailbox.id, "INBOX", Checkpoint(_UIDVALIDITY, n + 1)),
        ),
    ):
        for n in range(200):  # warm-up
            await call(n)
        cpu, wall = time.process_time(), time.perf_counter()
        for n in range(calls):
            await call(200 + n)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        print(f"  {label:34} {cpu / calls * 1e6:7.0f} us CPU, {wall / calls * 1e6:7.0f} us wall per call")
    await store.remove_mailbox(mailbox.id)


# Measured in a process of its own: importing trio_asyncio (as emlisten._bridge does) makes
# asyncio.run() drive a trio-asyncio loop, on which the same HGET costs over twice the CPU.
_PLAIN_ASYNCIO = """
import asyncio, sys, time
from redis.asyncio import Redis

async def run(url, calls):
    client = Redis.from_url(url)
    await client.hset("plain-asyncio", "INBOX", "x")
    for _ in range(200):
        await client.hget("plain-asyncio", "INBOX")
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        await client.hget("plain-asyncio", "INBOX")
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await client.delete("plain-asyncio")
    await client.aclose()
    print(f"{cpu / calls * 1e6:7.0f} us CPU, {wall / calls * 1e6:7.0f} us wall per call")

assert "trio_asyncio" not in sys.modules
asyncio.run(run(sys.argv[1], int(sys.argv[2])))
"""


def _per_call_plain_asyncio(url: str, calls: int) -> None:
    """redis-py's HGET on a plain asyncio loop (another process), and on trio-asyncio's loop
    (``asyncio.run`` here, where trio_asyncio is imported), neither through the bridge."""
    plain = subprocess.run(
        [sys.executable, "-c", _PLAIN_ASYNCIO, url, str(calls)], capture_output=True, text=True, check=True
    )
    label = "HGET, plain asyncio loop"
    print(f"  {label:34} {plain.stdout.rstrip()}")

    async def run() -> None:
        client = Redis.from_url(url)
        await client.hset("plain-asyncio", "INBOX", "x")
        for _ in range(200):
            await client.hget("plain-asyncio", "INBOX")
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(calls):
            await client.hget("plain-asyncio", "INBOX")
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        await client.delete("plain-asyncio")
        await client.aclose()
        label = "HGET, trio-asyncio loop"
        print(f"  {label:34} {cpu / calls * 1e6:7.0f} us CPU, {wall / calls * 1e6:7.0f} us wall per call")

    asyncio.run(run())


async def _per_task(store: Store, mailboxes: int, mails_per_task: int, rounds: int) -> tuple[float, float]:
    """Deliver ``rounds`` tasks per mailbox; returns (CPU seconds, wall seconds) of the delivery."""
    configs = [_mailbox(i) for i in range(mailboxes)]
    await store.put_mailboxes(configs)
    for config in configs:
        await store.seed_checkpoint(config.id, "INBOX", Checkpoint(_UIDVALIDITY, 0))
    tasks = [
        _task(config.id, 1 + r * mails_per_task, mails_per_task) for r in range(rounds) for config in configs
    ]
    sink = _AcceptingSink(len(tasks) * mails_per_task)
    queue = InProcessQueue()
    worker = DeliveryWorker(Settings(), store, queue, ReaderPool(None, idle_seconds=0), sink)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        cpu, wall = time.process_time(), time.perf_counter()
        for task in tasks:
            await queue.publish(task)
        await sink.done.wait()
        await worker.wait_idle()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        worker.stop_intake()
    for config in configs:
        checkpoint = await store.get_checkpoint(config.id, "INBOX")
        assert checkpoint == Checkpoint(_UIDVALIDITY, rounds * mails_per_task), checkpoint
        await store.remove_mailbox(config.id)
    return cpu, wall


async def main(args: argparse.Namespace, url: str) -> None:
    tasks = args.mailboxes * args.rounds
    prefix = f"rtt:{uuid.uuid4().hex}:"
    async with (
        open_asyncio_bridge(),
        RedisStore.open(url, secret_key=_SECRET, prefix=prefix) as store,
    ):
        await _per_call_bare_trio(url, args.calls)
        print(f"per store call through the bridge ({args.calls} sequential calls):")
        await _per_call(store, args.calls)

        client = Redis.from_url(url)
        try:
            crossings = _count_crossings(store)
            before = await _commandstats(client)
            redis_cpu, redis_wall = await _per_task(store, args.mailboxes, args.mails_per_task, args.rounds)
            after = await _commandstats(client)
        finally:
            # Closed mailboxes leave their statuses and counters, and the incarnation stays:
            # nothing of this run stays behind on a shared Redis (--redis-url).
            async def purge() -> None:
                async for key in client.scan_iter(match=f"{prefix}*", count=500):
                    await client.delete(key)
                await client.aclose()

            await run_asyncio(purge)
    memory_cpu, memory_wall = await _per_task(MemoryStore(), args.mailboxes, args.mails_per_task, args.rounds)

    # Crossings and commands made by setup and check-up (put_mailboxes, seed per mailbox, the
    # final get_checkpoint and remove_mailbox per mailbox), not by the worker.
    outside = {"put_mailboxes": 1, "seed_checkpoint": args.mailboxes, "remove_mailbox": args.mailboxes}
    worker_crossings = collections.Counter(crossings)
    worker_crossings.subtract(outside)
    worker_crossings["get_checkpoint"] -= args.mailboxes  # the check after the run
    worker_crossings += collections.Counter()  # drop zero and negative entries
    commands = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    commands = {name: count for name, count in commands.items() if count > 0}
    commands["info"] = commands.get("info", 0) - 1
    print(
        f"\nper task ({args.mailboxes} mailboxes x {args.rounds} task(s), {args.mails_per_task} "
        "prefetched mail(s) per task):"
    )
    print("  bridge crossings by store method (worker only):")
    for name, count in sorted(worker_crossings.items()):
        print(f"    {name:28} {count / tasks:5.2f} per task")
    print(f"    {'total':28} {sum(worker_crossings.values()) / tasks:5.2f} per task")
    print("  Redis commands (INFO commandstats delta, setup and check-up included):")
    for name, count in sorted(commands.items()):
        if count:
            print(f"    {name:28} {count:7d}")
    print(
        f"  CPU per task: Redis store {redis_cpu / tasks * 1e3:.3f} ms, memory store "
        f"{memory_cpu / tasks * 1e3:.3f} ms, difference {(redis_cpu - memory_cpu) / tasks * 1e3:.3f} ms"
    )
    print(
        f"  wall: Redis store {redis_wall:.2f} s ({tasks * args.mails_per_task / redis_wall:.0f} mails/s), "
        f"memory store {memory_wall:.2f} s"
    )


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailboxes", type=int, default=1000)
    parser.add_argument("--mails-per-task", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1, help="tasks per mailbox, one after another")
    parser.add_argument("--calls", type=int, default=3000, help="sequential calls per per-call figure")
    parser.add_argument("--redis-url", help="use this Redis (its commandstats count everyone's commands)")
    args = parser.parse_args()
    if args.redis_url:
        _per_call_plain_asyncio(args.redis_url, args.calls)
        trio.run(main, args, args.redis_url)
        return
    with _private_redis() as url:
        print("per call, no bridge:")
        _per_call_plain_asyncio(url, args.calls)
        trio.run(main, args, url)


if __name__ == "__main__":
    cli()
