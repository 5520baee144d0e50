"""Scenario ``soak``: faults one after another, in a seeded random order, while mail flows; every
mail written is accounted for at the end.

The set-up is production's scale-out one, all of it private to the run: two primaries and two
secondaries (separate ``python -m emlisten serve`` processes, every setting at its default unless
``--env`` says otherwise) on a ``redis-server`` the soak starts on a free port (append-only file
in a temp dir) and a RabbitMQ vhost it creates (deleted at the end); N mailboxes on a private
Dovecot, which emlisten reaches through a fault-injecting TCP proxy (the IMAP path), as it
reaches RabbitMQ through another. A writer APPENDs one mail every ``1/--rate`` seconds to a random
mailbox and keeps a ledger (Message-ID, mailbox, time the server confirmed it). The Creatio
stand-in records every callback; like Creatio, it runs a failover job every minute
(``subscriptionsstate``, ``recreate`` for every mailbox read "closed", then ``synchronize`` from
the last mail it received for that mailbox - 5 minutes).

Fault kinds (``--kinds``; each round runs every kind once, in an order drawn from ``--seed``):

- ``kill-primary``: SIGKILL of a primary while mail flows; restarted after 5 s;
- ``kill-secondary``: SIGKILL of the secondary delivering a callback (Creatio holds the request
  at its door; the worker holding the folder's sync lease is killed); restarted after 5 s;
- ``redis-restart``: Redis stopped (SIGTERM, it writes its AOF) and started again after 5 s;
- ``redis-wipe``: Redis SIGKILLed, its files removed, started empty after 5 s: every
  registration, checkpoint and lease is gone. The primaries see the new incarnation and
  register their mailboxes again with the checkpoints they know, after the workers put back the
  checkpoints they wrote (docs/reliability.md, "A store that lost its data"); Creatio's failover
  job re-creates only what no primary restored (a primary killed at the same moment);
- ``rabbitmq-cut``: every connection of the vhost closed, alternately by the broker
  (``rabbitmqctl close_all_connections``) and by a TCP reset on the proxy;
- ``imap-cut``: every IMAP connection reset on the proxy;
- ``imap-blackhole``: the IMAP path silently holds every byte and new connection for 30 s;
- ``dovecot-restart``: Dovecot stopped and started (same ports, same mail);
- ``creatio-500``, ``creatio-429``: every callback answered 500, or 429 with ``Retry-After: 5``,
  for 30 s;
- ``creatio-hang``: every callback held unanswered for 60 s, then processed;
- ``datadir-full``: the data directory of ``n1`` (a ``--role=all`` process beside the cluster,
  its store SQLite in ``EMLISTEN_DATA_DIR`` on a tmpfs of the soak's own) full for 30 s;
- ``kill-single``: SIGKILL of ``n1``, restarted from its data directory after 5 s.

The fault durations are multiplied by ``--fault-scale`` (the short CI form uses less). After each
fault the soak waits until every mail appended before the fault ended was delivered (at most
``--recover-timeout``), then ``--gap`` seconds, then the next fault, until ``--minutes`` are up.

Figures: ledger entries delivered (lost = never accepted by the stand-in); duplicate callbacks
and distinct ``Email.Id``\\s delivered more than once, split by whether the repeat came as new
mail (live delivery) or from a history load Creatio's failover job asked for (``Idempotency-Key:
history:...``, the contract's re-offer); the longest delay of any mail; each mail's delay past the
end of the faults that overlapped its wait (target 60 s); per fault kind, the time from the end of
the fault to the first delivery after it and to the backlog drained.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import re
import secrets
import subprocess
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from bench._chaos import (
    ChaosCreatio,
    DataDirMount,
    Ledger,
    PrivateRedis,
    PrivateVhost,
    say_fault,
    write_steadily,
)
from bench._harness import (
    DEFAULT_AMQP_URL,
    BenchError,
    ClusterStack,
    EmlistenProcess,
    Progress,
    Result,
    SharedBackends,
    add_common_arguments,
    bench_dovecot,
    common_params,
    create_users,
    machine_facts,
    mailbox_credentials,
    parse_env,
    prepare_mailboxes,
    say,
    summary_ms,
)
from tests.servers.creatio import CLIENT_GONE, get_ci
from tests.servers.dovecot import Dovecot, MailUser
from tests.servers.faultproxy import FaultProxy

FAULT_KINDS = (
    "kill-primary",
    "kill-secondary",
    "redis-restart",
    "redis-wipe",
    "rabbitmq-cut",
    "imap-cut",
    "imap-blackhole",
    "dovecot-restart",
    "creatio-500",
    "creatio-429",
    "creatio-hang",
    "datadir-full",
    "kill-single",
)
#: The kinds that act on the single --role=all node with a data directory.
SINGLE_NODE_KINDS = ("datadir-full", "kill-single")
#: Seconds a fault lasts at --fault-scale 1 (the issue's figures where it names them).
FAULT_SECONDS = {
    "kill-primary": 5.0,  # down before the restart
    "kill-secondary": 5.0,
    "redis-restart": 5.0,
    "redis-wipe": 5.0,
    "imap-blackhole": 30.0,
    "creatio-500": 30.0,
    "creatio-429": 30.0,
    "creatio-hang": 60.0,
    "datadir-full": 30.0,
    "kill-single": 5.0,
}
#: The issue's target: every mail delivered within this long after the end of the fault that delayed it.
TARGET_PAST_FAULT_SECONDS = 60.0
#: Creatio's failover job re-synchronizes from the last mail it received minus this.
CREATIO_SYNC_MARGIN_SECONDS = 300.0
_SUBJECT = re.compile(r"^bench (\w+) (\d+)$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, mailboxes=200)
    parser.add_argument(
        "--single-mailboxes",
        type=int,
        default=20,
        help="mailboxes of a separate --role=all node whose store is SQLite in a data directory "
        "(the single container; default 20, 0: no such node)",
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the fault phase (default 30)")
    parser.add_argument(
        "--seed", type=int, default=0, help="order of the faults (default 0: drawn, and reported)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="stop after this many rounds (each kind once per round), minutes or not (default 0: no limit)",
    )
    parser.add_argument("--rate", type=float, default=2.0, help="mails appended per second (default 2)")
    parser.add_argument(
        "--kinds",
        default=",".join(FAULT_KINDS),
        help=f"comma-separated fault kinds (default all: {','.join(FAULT_KINDS)})",
    )
    parser.add_argument(
        "--fault-scale", type=float, default=1.0, help="multiplies every fault's duration (default 1)"
    )
    parser.add_argument(
        "--recover-timeout",
        type=float,
        default=150.0,
        help="after a fault, wait at most this long for the backlog to drain (default 150)",
    )
    parser.add_argument("--gap", type=float, default=5.0, help="quiet seconds between faults (default 5)")
    parser.add_argument(
        "--creatio-job-seconds",
        type=float,
        default=60.0,
        help="period of the stand-in's failover job (Creatio's: 60)",
    )
    parser.add_argument(
        "--final-timeout",
        type=float,
        default=300.0,
        help="after the last fault, wait at most this long for every mail (default 300)",
    )
    parser.add_argument(
        "--amqp-url", default=DEFAULT_AMQP_URL, help="the RabbitMQ whose user gets the soak's own vhost"
    )


# -- what the stand-in received ----------------------------------------------------------------


@dataclass
class Tally:
    """The stand-in's accepted ProcessFullEmail calls, read as they come: per ledger index its
    first delivery, and per ``Email.Id`` every delivery with whether it came from a history load."""

    creatio: ChaosCreatio
    run: str
    first_seen: dict[int, float] = field(default_factory=dict)
    deliveries: dict[str, list[tuple[float, bool]]] = field(default_factory=dict)  # Email.Id -> (at, history)
    index_of: dict[str, int] = field(default_factory=dict)
    accepted_calls: int = 0
    refused_calls: Counter[int] = field(default_factory=Counter)
    last_received: dict[str, float] = field(default_factory=dict)  # mailbox id -> wall time of its last mail
    _consumed: int = 0

    def update(self) -> None:
        calls = self.creatio.calls()
        for call in calls[self._consumed :]:
            if call.method != "ProcessFullEmail":
                continue
            if not call.accepted:
                self.refused_calls[call.status] += 1
                continue
            self.accepted_calls += 1
            history = call.headers.get("idempotency-key", "").startswith("history:")
            emails = get_ci(call.body, "Emails")
            for email in emails if isinstance(emails, list) else []:
                match = _SUBJECT.match(str(get_ci(email, "Subject") or ""))
                if match is None or match.group(1) != self.run:
                    continue
                email_id = str(get_ci(email, "Id"))
                index = int(match.group(2))
                self.index_of[email_id] = index
                self.deliveries.setdefault(email_id, []).append((call.received_at, history))
                self.first_seen.setdefault(index, call.received_at)
                if call.mailbox_id:
                    self.last_received[call.mailbox_id.strip("{}").lower()] = time.time()
        self._consumed = len(calls)

    async def wait_delivered(self, indices: set[int], within: float) -> bool:
        """Until every ledger index of ``indices`` was delivered; False after ``within``."""

        def done() -> bool | None:
            self.update()
            return True if indices <= self.first_seen.keys() else None

        try:
            await self.creatio.wait_until(done, within, "the backlog")
        except AssertionError:
            return False
        return True

    def duplicates(self) -> dict[str, Any]:
        repeated = {i: d for i, d in self.deliveries.items() if len(d) > 1}
        live = {i for i, d in repeated.items() if any(not history for _, history in d[1:])}
        return {
            "duplicate_callbacks": sum(len(d) - 1 for d in repeated.values()),
            "duplicate_email_ids": len(repeated),
            "duplicate_email_ids_as_new_mail": len(live),
            "duplicate_email_ids_from_history_loads": len(repeated) - len(live),
            "duplicate_examples": [
                {"email_id": i, "index": self.index_of.get(i), "deliveries": [[round(t, 3), h] for t, h in d]}
                for i, d in list(repeated.items())[:20]
            ],
        }


# -- the faults --------------------------------------------------------------------------------


@dataclass
class FaultRecord:
    kind: str
    number: int
    started: float  # seconds since the soak's start
    ended: float
    detail: str = ""
    error: str = ""
    first_delivery_after_end: float | None = None
    drained_after_end: float | None = None  # every mail appended before the end delivered
    mails_during: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class Soak:
    args: argparse.Namespace
    rng: random.Random
    dovecot: Dovecot
    users: Sequence[MailUser]
    stack: ClusterStack
    creatio: ChaosCreatio
    redis: PrivateRedis
    vhost: PrivateVhost
    imap_proxy: FaultProxy
    amqp_proxy: FaultProxy
    ledger: Ledger
    tally: Tally
    groups: dict[str, list[dict[str, Any]]]  # the node that registered them -> credentials
    data_dir: DataDirMount | None
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    faults: list[FaultRecord] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)
    job_rounds: int = 0
    job_recreated: int = 0
    job_errors: list[str] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.started

    def seconds(self, kind: str) -> float:
        return FAULT_SECONDS.get(kind, 0.0) * self.args.fault_scale

    def alive(self, role: str) -> list[str]:
        return [
            name
            for name, node in self.stack.nodes.items()
            if node.role == role and node.process is not None and node.process.poll() is None
        ]

    async def restart(self, name: str) -> None:
        node = self.stack.nodes[name]
        node.spawn()
        await node.wait_ready(self.stack.http, within=120.0)

    async def watch_nodes(self) -> None:
        """Every 2 s, as an orchestrator would: a node that exited without being killed is a
        finding; note it and start it again."""
        while True:
            await trio.sleep(2)
            await self.check_nodes()

    async def check_nodes(self) -> None:
        for name, node in self.stack.nodes.items():
            if node.process is not None and node.process.poll() is not None:
                code = node.process.returncode
                self.unexpected_exits.append(
                    f"{name} exited with {code} at {self.now():.0f}s ({node.log_path})"
                )
                say_fault(self.now(), f"{name} EXITED by itself with {code}; restarting it")
                await self.restart(name)

    # Each fault returns a detail text once the fault is over (the service may still be recovering).

    async def kill_primary(self, number: int) -> str:
        victim = self.rng.choice(self.alive("primary"))
        self.stack.nodes[victim].kill()
        await trio.sleep(self.seconds("kill-primary"))
        await self.restart(victim)
        return f"{victim} killed, restarted"

    def _sync_lease_holder(self, mailbox_id: str) -> str | None:
        import redis

        client = redis.Redis.from_url(self.redis.url, socket_timeout=5)
        try:
            value = client.get(f"{self.stack.backends.prefix}lease:sync/{mailbox_id}/INBOX")
        except redis.RedisError:
            return None
        finally:
            client.close()
        return value.decode() if isinstance(value, bytes) else None

    async def kill_secondary(self, number: int) -> str:
        secondaries = self.alive("secondary")
        self.creatio.hold_next("ProcessFullEmail")
        held = None
        with trio.move_on_after(60):
            held = await self.creatio.wait_held(timeout=60)
        holder = await trio.to_thread.run_sync(self._sync_lease_holder, held.mailbox_id) if held else None
        delivering = holder.split("/")[0] if holder else None
        victim = delivering if delivering in secondaries else self.rng.choice(secondaries)
        self.stack.nodes[victim].kill()
        if held is not None and victim == delivering:
            # The held request loses its client; only then may Creatio answer again.
            with contextlib.suppress(AssertionError):
                await self.creatio.wait_until(
                    lambda: (
                        True if any(c.status == CLIENT_GONE for c in self.creatio.calls()[-50:]) else None
                    ),
                    10,
                    "the held request to lose its client",
                )
        self.creatio.release()
        await trio.sleep(self.seconds("kill-secondary"))
        await self.restart(victim)
        how = (
            "mid-delivery"
            if held is not None and victim == delivering
            else f"not delivering (holder {holder})"
        )
        return f"{victim} killed {how}, restarted"

    async def redis_restart(self, number: int, *, keep_data: bool) -> str:
        await trio.to_thread.run_sync(partial(self.redis.stop, keep_data=keep_data))
        await trio.sleep(self.seconds("redis-wipe" if not keep_data else "redis-restart"))
        await trio.to_thread.run_sync(self.redis.start)
        return "restarted with its data" if keep_data else "restarted empty"

    async def rabbitmq_cut(self, number: int) -> str:
        if number % 2:
            await trio.to_thread.run_sync(self.vhost.close_connections)
            return "the broker closed the vhost's connections"
        return f"{self.amqp_proxy.cut()} connections reset on the proxy"

    async def imap_cut(self, number: int) -> str:
        return f"{self.imap_proxy.cut()} IMAP connections reset"

    async def imap_blackhole(self, number: int) -> str:
        self.imap_proxy.black_hole()
        try:
            await trio.sleep(self.seconds("imap-blackhole"))
        finally:
            self.imap_proxy.restore()
        return f"{self.imap_proxy.open_count} connections open at the end"

    async def dovecot_restart(self, number: int) -> str:
        await trio.to_thread.run_sync(self.dovecot.restart)
        return "restarted"

    async def creatio_outage(self, number: int, *, status: int | None, kind: str) -> str:
        hung_before = self.creatio.hung_requests
        if status is None:
            self.creatio.hang()
        else:
            self.creatio.answer(status, retry_after_seconds=5)
        try:
            await trio.sleep(self.seconds(kind))
        finally:
            self.creatio.answer_normally()
        if status is None:
            return f"{self.creatio.hung_requests - hung_before} requests held"
        return f"answered {status}" + (" with Retry-After: 5" if status == 429 else "")

    async def datadir_full(self, number: int) -> str:
        assert self.data_dir is not None
        taken = await trio.to_thread.run_sync(self.data_dir.fill)
        try:
            await trio.sleep(self.seconds("datadir-full"))
        finally:
            await trio.to_thread.run_sync(self.data_dir.free)
        return f"n1's data directory full ({taken / 2**20:.0f} MiB filler)"

    async def kill_single(self, number: int) -> str:
        self.stack.nodes["n1"].kill()
        await trio.sleep(self.seconds("kill-single"))
        await self.restart("n1")
        return "n1 (data directory) killed, restarted"

    def action(self, kind: str) -> Callable[[int], Awaitable[str]]:
        actions: dict[str, Callable[[int], Awaitable[str]]] = {
            "kill-primary": self.kill_primary,
            "kill-secondary": self.kill_secondary,
            "redis-restart": partial(self.redis_restart, keep_data=True),
            "redis-wipe": partial(self.redis_restart, keep_data=False),
            "rabbitmq-cut": self.rabbitmq_cut,
            "imap-cut": self.imap_cut,
            "imap-blackhole": self.imap_blackhole,
            "dovecot-restart": self.dovecot_restart,
            "creatio-500": partial(self.creatio_outage, status=500, kind="creatio-500"),
            "creatio-429": partial(self.creatio_outage, status=429, kind="creatio-429"),
            "creatio-hang": partial(self.creatio_outage, status=None, kind="creatio-hang"),
            "datadir-full": self.datadir_full,
            "kill-single": self.kill_single,
        }
        return actions[kind]

    async def run_fault(self, kind: str, number: int) -> FaultRecord:
        record = FaultRecord(kind, number, self.now(), 0.0)
        say_fault(record.started, f"fault {kind} #{number}")
        try:
            with trio.fail_after(300):
                record.detail = await self.action(kind)(number)
        except Exception as exc:  # reported with the figures; the soak goes on
            record.error = f"{type(exc).__name__}: {exc}"[:500]
            say_fault(self.now(), f"fault {kind} #{number} FAILED: {record.error}")
        record.ended = self.now()
        say_fault(record.ended, f"fault {kind} #{number} over ({record.detail}); waiting for the backlog")
        self.faults.append(record)
        before_end = {e.index for e in self.ledger.entries if e.appended_at - self.started <= record.ended}
        drained = await self.tally.wait_delivered(before_end, self.args.recover_timeout)
        say_fault(self.now(), "backlog drained" if drained else "backlog NOT drained; going on")
        return record

    # -- Creatio's failover job ------------------------------------------------------------

    async def creatio_failover_job(self) -> None:
        """Every minute, as Creatio: ask which subscriptions exist, re-create the others and load
        their history from the last mail received for them minus 5 minutes."""
        while True:
            await trio.sleep(self.args.creatio_job_seconds)
            for via, members in self.groups.items():
                try:
                    await self._failover_round(via, {c["Id"].lower(): c for c in members})
                except (httpx.HTTPError, BenchError, KeyError, ValueError) as exc:
                    self.job_errors.append(f"{self.now():.0f}s {via}: {type(exc).__name__}: {exc}"[:300])

    async def _failover_round(self, via: str, by_id: dict[str, dict[str, Any]]) -> None:
        """One round against one deployment (the cluster, through a live primary, or n1)."""
        candidates = self.alive("primary") if via == "p1" else self.alive("all")
        if not by_id or not candidates:
            return
        url = self.stack.nodes[self.rng.choice(candidates)].url
        http = self.stack.http
        response = await http.post(f"{url}/api/listeners/subscriptionsstate", json=list(by_id), timeout=60)
        response.raise_for_status()
        closed = [mid for mid, state in response.json().items() if state.get("State") != "exists"]
        self.job_rounds += 1
        if not closed:
            return
        say_fault(self.now(), f"Creatio's failover job: {len(closed)} mailboxes closed on {via}, re-creating")
        self.job_recreated += len(closed)
        chunk = [by_id[mid.lower()] for mid in closed]
        response = await http.post(f"{url}/api/listeners/recreate", json=chunk, timeout=120)
        response.raise_for_status()
        for credentials in chunk:
            last = self.tally.last_received.get(credentials["Id"].lower(), self.started_wall)
            since = datetime.fromtimestamp(last - CREATIO_SYNC_MARGIN_SECONDS, UTC)
            body = {"Credentials": credentials, "Filters": since.isoformat(timespec="seconds")}
            response = await http.post(f"{url}/api/email/synchronize", json=body, timeout=60)
            response.raise_for_status()


# -- the stack ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_soak_cluster(
    args: argparse.Namespace,
    dovecot: Dovecot,
    redis: PrivateRedis,
    amqp_url: str,
    data_dir: DataDirMount | None,
) -> AsyncIterator[ClusterStack]:
    """p1, p2 (primaries) and s1, s2 (secondaries) on the private Redis and the vhost, n1 (role
    all, its store in ``data_dir``) beside them, with the chaos stand-in; every node still
    running gets SIGTERM at the end."""
    backends = SharedBackends(redis.url, amqp_url)
    env = {
        "EMLISTEN_TLS_CA_FILE": str(dovecot.ca_file),
        "EMLISTEN_LOG_LEVEL": "INFO",
        **backends.env(),
        **parse_env(args.env),
    }
    log_dir = Path(tempfile.mkdtemp(prefix="emlisten-soak-"))
    nodes = {
        name: EmlistenProcess({**env, "EMLISTEN_NODE_ID": name}, log_dir, name=name, role=role)
        for name, role in (("p1", "primary"), ("p2", "primary"), ("s1", "secondary"), ("s2", "secondary"))
    }
    if data_dir is not None:
        single_env = {
            "EMLISTEN_TLS_CA_FILE": str(dovecot.ca_file),
            "EMLISTEN_LOG_LEVEL": "INFO",
            "EMLISTEN_DATA_DIR": str(data_dir.path),
            "EMLISTEN_SECRET_KEY": secrets.token_urlsafe(32),
            "EMLISTEN_NODE_ID": "n1",
            **parse_env(args.env),
        }
        nodes["n1"] = EmlistenProcess(single_env, log_dir, name="n1", role="all")
    creatio = ChaosCreatio()
    async with trio.open_nursery() as nursery:
        await nursery.start(creatio.serve)
        limits = httpx.Limits(max_connections=20, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits) as http:
            stack = ClusterStack(dovecot, creatio, http, backends, nodes, args.tls, args.chunk, log_dir)
            try:
                for node in nodes.values():
                    node.spawn()
                async with trio.open_nursery() as starting:
                    for node in nodes.values():
                        starting.start_soon(partial(node.wait_ready, http, within=120.0))
                yield stack
            finally:
                with trio.CancelScope(shield=True):
                    async with trio.open_nursery() as stopping:
                        for node in nodes.values():
                            stopping.start_soon(node.stop)
        nursery.cancel_scope.cancel()
    say(f"emlisten logs: {log_dir}")


async def wait_all_listening(stack: ClusterStack, ids: Sequence[str], within: float, via: str) -> float:
    started = time.monotonic()
    progress = Progress(f"listening (seen by {via})", len(ids))
    listening = 0
    with trio.move_on_after(within):
        while True:
            with contextlib.suppress(httpx.HTTPError):
                items = await stack.mailboxes(via)
                listening = sum(1 for m in items if m.get("state") == "listening" and m.get("node"))
                progress.update(listening)
                if listening >= len(ids):
                    progress.close(listening)
                    return time.monotonic() - started
            await trio.sleep(0.5)
    progress.close(listening, "timed out")
    raise BenchError(f"only {listening}/{len(ids)} listening after {within:.0f}s; logs in {stack.log_dir}")


def schedule(kinds: Sequence[str], rng: random.Random) -> list[str]:
    """One round: every kind once, in a random order."""
    order = list(kinds)
    rng.shuffle(order)
    return order


# -- the run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Result:
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown:
        raise BenchError(f"unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}")
    if not args.seed:
        args.seed = random.SystemRandom().randrange(1, 2**31)
    if args.single_mailboxes <= 0 and set(kinds) & set(SINGLE_NODE_KINDS):
        raise BenchError(f"{', '.join(SINGLE_NODE_KINDS)} need --single-mailboxes > 0")
    redis = PrivateRedis()
    vhost = PrivateVhost(args.amqp_url)
    data_dir = DataDirMount() if args.single_mailboxes > 0 else None
    try:
        if data_dir is not None:
            data_dir.mount()
        redis.start()
        vhost.create()
        with bench_dovecot(args) as dovecot:
            users = create_users(dovecot, args.mailboxes + args.single_mailboxes)
            return trio.run(_soak, args, kinds, dovecot, users, redis, vhost, data_dir)
    finally:
        redis.close()
        if data_dir is not None:
            data_dir.close()
        with contextlib.suppress(BenchError, OSError, subprocess.SubprocessError):
            vhost.delete()


async def _soak(
    args: argparse.Namespace,
    kinds: Sequence[str],
    dovecot: Dovecot,
    users: Sequence[MailUser],
    redis: PrivateRedis,
    vhost: PrivateVhost,
    data_dir: DataDirMount | None,
) -> Result:
    rng = random.Random(args.seed)
    run_tag = uuid.uuid4().hex[:8]
    result = Result(
        "soak",
        {
            **common_params(args),
            "minutes": args.minutes,
            "rounds": args.rounds or "until the minutes are up",
            "seed": args.seed,
            "rate_per_s": args.rate,
            "kinds": list(kinds),
            "fault_scale": args.fault_scale,
            "nodes": "2 primaries + 2 secondaries"
            + (
                f"; 1 --role=all with a data directory ({args.single_mailboxes} mailboxes)"
                if data_dir
                else ""
            ),
            "creatio_job_s": args.creatio_job_seconds,
        },
    )
    result.params["git_commit_at_start"] = machine_facts()["git_commit"]
    await prepare_mailboxes(dovecot, users)
    port = dovecot.imaps_port if args.tls else dovecot.imap_port
    imap_proxy = FaultProxy(dovecot.host, port)
    amqp_parts = urlsplit(vhost.url)
    amqp_proxy = FaultProxy(amqp_parts.hostname or "127.0.0.1", amqp_parts.port or 5672)
    async with trio.open_nursery() as proxies:
        await proxies.start(imap_proxy.serve)
        await proxies.start(amqp_proxy.serve)
        userinfo = amqp_parts.netloc.rpartition("@")[0]
        amqp_url = amqp_parts._replace(netloc=f"{userinfo}@127.0.0.1:{amqp_proxy.port}").geturl()
        async with open_soak_cluster(args, dovecot, redis, amqp_url, data_dir) as stack:
            creatio = stack.standin
            assert isinstance(creatio, ChaosCreatio)
            credentials = [
                {**mailbox_credentials(dovecot, creatio, u, tls=args.tls), "Port": imap_proxy.port}
                for u in users
            ]
            groups = {"p1": credentials[: args.mailboxes], "n1": credentials[args.mailboxes :]}
            cold = 0.0
            for via, members in groups.items():
                if not members:
                    continue
                say(f"registering {len(members)} mailboxes through {via}")
                await stack.register(members, via=via)
                within = args.listen_timeout or max(120.0, len(members) * 0.5)
                observer = "s1" if via == "p1" else via
                cold = max(
                    cold, await wait_all_listening(stack, [c["Id"] for c in members], within, observer)
                )
            ledger = Ledger(run_tag)
            soak = Soak(
                args, rng, dovecot, users, stack, creatio, redis, vhost, imap_proxy, amqp_proxy,
                ledger, Tally(creatio, run_tag), groups, data_dir,
            )  # fmt: skip
            say(f"seed {args.seed}; faults for {args.minutes:g} min: {', '.join(kinds)}")
            async with trio.open_nursery() as background:
                background.start_soon(
                    write_steadily, dovecot, users, ledger, args.rate, random.Random(args.seed + 1)
                )
                background.start_soon(soak.creatio_failover_job)
                background.start_soon(soak.watch_nodes)
                await trio.sleep(10 * min(1.0, args.fault_scale * 2))  # mail flowing before the first fault
                deadline = soak.now() + args.minutes * 60
                counts: Counter[str] = Counter()
                rounds = 0
                while soak.now() < deadline and not (args.rounds and rounds >= args.rounds):
                    rounds += 1
                    for kind in schedule(kinds, rng):
                        if soak.now() >= deadline:
                            break
                        counts[kind] += 1
                        await soak.run_fault(kind, counts[kind])
                        await trio.sleep(args.gap)
                writer_stopped = soak.now()
                background.cancel_scope.cancel()
            say_fault(soak.now(), f"faults over; {len(ledger.entries)} mails written; waiting for every one")
            wanted = {e.index for e in ledger.entries}
            complete = await soak.tally.wait_delivered(wanted, args.final_timeout)
            await trio.sleep(5)  # a late duplicate would come now
            soak.tally.update()
            final_status = {}
            with contextlib.suppress(httpx.HTTPError):
                final_status = (await stack.http.get(f"{stack.nodes['p1'].url}/api/listeners/status")).json()
            problems = {name: _log_counts(node) for name, node in stack.nodes.items()}
        outcome = await stack.backends.clean_up()  # its AMQP URL goes through the proxy
        proxies.cancel_scope.cancel()
    _figures(result, soak, cold, writer_stopped, complete, problems, final_status, outcome)
    return result


def _log_counts(node: EmlistenProcess) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for path in sorted(node.log_dir.glob(f"{node.name}-*.log")):
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                for level in ("WARNING", "ERROR", "CRITICAL"):
                    if f" {level} " in line or f"{level}:" in line:
                        counts[level] += 1
                if line.startswith("Traceback"):
                    counts["tracebacks"] += 1
    return dict(counts)


# -- figures -----------------------------------------------------------------------------------


def delayed_until(appended: float, delivered: float, windows: Sequence[tuple[float, float]]) -> float:
    """The end of the last fault that delayed a mail: a fault running when it was appended, or
    one that began while the mail still had time (``TARGET_PAST_FAULT_SECONDS`` after the
    previous end, or after the append) and before it was delivered. A fault that began later
    does not excuse the wait: the mail should have arrived by then. The append time if none."""
    reference = appended
    for start, end in sorted(windows):
        if end < appended or start > delivered:
            continue
        if start <= reference + TARGET_PAST_FAULT_SECONDS:
            reference = max(reference, end)
    return reference


def _figures(
    result: Result,
    soak: Soak,
    cold_start: float,
    writer_stopped: float,
    complete: bool,
    problems: dict[str, dict[str, int]],
    final_status: dict[str, Any],
    clean_up: dict[str, Any],
) -> None:
    tally, ledger, t0 = soak.tally, soak.ledger, soak.started
    delivered_at = {i: t - t0 for i, t in tally.first_seen.items()}
    entries = ledger.entries
    lost = [e for e in entries if e.index not in delivered_at]
    delays = [delivered_at[e.index] - (e.appended_at - t0) for e in entries if e.index in delivered_at]
    unconfirmed_delivered = sum(1 for i in ledger.unconfirmed if i in delivered_at)

    # Per mail: its delay past the end of the fault(s) that delayed it.
    windows = sorted((f.started, f.ended) for f in soak.faults)
    past_fault = [
        delivered_at[e.index] - delayed_until(e.appended_at - t0, delivered_at[e.index], windows)
        for e in entries
        if e.index in delivered_at
    ]
    late = sum(1 for d in past_fault if d > TARGET_PAST_FAULT_SECONDS)

    # Per fault: first delivery after its end and the backlog drained.
    ordered = sorted(delivered_at.values())
    for f in soak.faults:
        after = [t for t in ordered if t >= f.ended]
        f.first_delivery_after_end = round(after[0] - f.ended, 3) if after else None
        before = [e for e in entries if e.appended_at - t0 <= f.ended]
        times = [delivered_at.get(e.index) for e in before]
        if times and all(t is not None for t in times):
            f.drained_after_end = round(max(0.0, max(t for t in times if t is not None) - f.ended), 3)
        f.mails_during = sum(1 for e in entries if f.started <= e.appended_at - t0 <= f.ended)

    duplicates = tally.duplicates()
    mailbox_ids = [c["Id"] for members in soak.groups.values() for c in members]  # the users' order
    slowest = sorted(
        (e for e in entries if e.index in delivered_at),
        key=lambda e: delivered_at[e.index] - (e.appended_at - t0),
        reverse=True,
    )[:20]
    per_kind: dict[str, list[FaultRecord]] = defaultdict(list)
    for f in soak.faults:
        per_kind[f.kind].append(f)

    result.metrics.update(
        {
            "cold_start_seconds": round(cold_start, 2),
            "fault_phase_seconds": round(writer_stopped, 1),
            "mails_written": len(entries),
            "append_attempts_unconfirmed": len(ledger.unconfirmed),
            "unconfirmed_appends_delivered": unconfirmed_delivered,
            "delivered": len(entries) - len(lost),
            "lost": len(lost),
            "lost_examples": [
                {
                    "index": e.index,
                    "mailbox_id": mailbox_ids[e.mailbox],
                    "appended_s": round(e.appended_at - t0, 3),
                }
                for e in lost[:50]
            ],
            "all_delivered_before_timeout": complete,
            **duplicates,
            "accepted_callbacks": tally.accepted_calls,
            "refused_callbacks_by_status": dict(tally.refused_calls),
            "delay_ms": summary_ms(delays),
            "slowest_mails": [
                {
                    "index": e.index,
                    "mailbox_id": mailbox_ids[e.mailbox],
                    "appended_s": round(e.appended_at - t0, 3),
                    "delivered_s": round(delivered_at[e.index], 3),
                }
                for e in slowest
            ],
            "delay_past_fault_end_ms": summary_ms(past_fault),
            "mails_later_than_target_past_fault_end": late,
            "faults": [f.as_dict() for f in soak.faults],
            "fault_counts": {k: len(v) for k, v in per_kind.items()},
            "unexpected_exits": soak.unexpected_exits,
            "creatio_failover_job": {
                "rounds": soak.job_rounds,
                "mailboxes_recreated": soak.job_recreated,
                "errors": soak.job_errors[:20],
            },
            "node_log_lines": problems,
            "final_status_p1": final_status,
            "clean_up": clean_up,
        }
    )

    result.row(
        f"mails written (ledger) / delivered / lost, {soak.args.mailboxes} mailboxes",
        f"{len(entries)} / {len(entries) - len(lost)} / {len(lost)}",
        "all / 0 lost",
        not lost,
    )
    result.row(
        "duplicate callbacks / distinct duplicate Email.Ids",
        f"{duplicates['duplicate_callbacks']} / {duplicates['duplicate_email_ids']}",
        "0",
        duplicates["duplicate_email_ids"] == 0,
    )
    result.row(
        "  of them repeated as new mail / re-offered by a history load (failover job)",
        f"{duplicates['duplicate_email_ids_as_new_mail']} / "
        f"{duplicates['duplicate_email_ids_from_history_loads']}",
        "0 / -",
        duplicates["duplicate_email_ids_as_new_mail"] == 0,
    )
    if delays:
        result.row(
            "delay append -> callback: p50 / p99 / max",
            " / ".join(f"{x / 1000:.2f}" for x in (summary_ms(delays)[k] for k in ("p50", "p99", "max")))
            + " s",
        )
    if past_fault:
        result.row(
            "longest delay past the end of the fault(s) a mail waited through (mails over 60 s)",
            f"{max(past_fault):.1f} s ({late})",
            f"<= {TARGET_PAST_FAULT_SECONDS:g} s",
            late == 0,
        )
    for kind in FAULT_KINDS:
        records = per_kind.get(kind)
        if not records:
            continue
        first = [f.first_delivery_after_end for f in records if f.first_delivery_after_end is not None]
        drained = [f.drained_after_end for f in records if f.drained_after_end is not None]
        errors = sum(1 for f in records if f.error)
        result.row(
            f"{kind} x{len(records)}: first delivery after its end / backlog drained (max)",
            (f"{max(first):.1f} s" if first else "-")
            + " / "
            + (
                f"{max(drained):.1f} s"
                if len(drained) == len(records)
                else f"not drained after {len(records) - len(drained)}"
            )
            + (f" ({errors} fault(s) failed to run)" if errors else ""),
            f"<= {TARGET_PAST_FAULT_SECONDS:g} s",
            len(drained) == len(records) and max(drained, default=0) <= TARGET_PAST_FAULT_SECONDS,
        )
    result.row("node exits nobody caused", str(len(soak.unexpected_exits)), "0", not soak.unexpected_exits)

    result.notes.append(
        f"Seed {soak.args.seed}; {len(soak.faults)} faults in {writer_stopped / 60:.1f} min, one after "
        "another (order: " + ", ".join(f.kind for f in soak.faults) + ")."
    )
    result.notes.append(
        "2 primaries + 2 secondaries (every emlisten setting at its default"
        + (f", plus {', '.join(soak.args.env)}" if soak.args.env else "")
        + ") on a private redis-server (AOF, appendfsync everysec) and a private RabbitMQ vhost"
        + (
            f"; beside them n1, one --role=all process with {soak.args.single_mailboxes} mailboxes, its "
            "store SQLite in EMLISTEN_DATA_DIR on a 64 MiB tmpfs"
            if soak.data_dir is not None
            else ""
        )
        + "; IMAP and AMQP through fault proxies; Creatio stand-in with a failover job every "
        f"{soak.args.creatio_job_seconds:g} s. The machine (2 cores) was shared with other engineers' work."
    )
    result.notes.append(
        "first delivery after its end: from the end of the fault (node restarted and answering, server back, "
        "proxy restored, Creatio answering) to the first mail of the ledger accepted after it; backlog "
        "drained: to the last mail appended before the end accepted. A mail's delay past a fault end: its "
        "callback minus the end of the fault that delayed it (running when it was appended, or begun "
        "within 60 s of that append or of the previous such end; its append time if none). The first "
        "delivery after a fault can wait for the next fault when that one begins at once."
    )
    if soak.unexpected_exits:
        result.notes.append("unexpected exits: " + "; ".join(soak.unexpected_exits))
    result.notes.append(f"emlisten logs: {soak.stack.log_dir}")
