"""What the mail-traffic scenarios (follow-up, random-traffic) share.

- :func:`open_deployment`: the mailboxes listening on either topology, one ``--role=all``
  process (in-memory store and queue) or a ``--role=primary`` and a ``--role=secondary`` process
  on the real Redis and RabbitMQ (as in bench/burst.py, but with production lease settings:
  nothing is frozen here);
- :class:`CallbackWatcher`: the stand-in's callbacks, read as they come, with a wait per mail;
- :class:`Probes`: a bare IDLE session per mailbox (bench/latency.py's floor probe) that tells
  when Dovecot announced each mail, to tell emlisten's delays from the server's.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from bench._harness import (
    CallbackIndex,
    ClusterStack,
    EmlistenProcess,
    Progress,
    add_cluster_arguments,
    lost_leases,
    open_cluster,
    open_stack,
)
from bench.burst import TOPOLOGIES, wait_cluster_listening
from bench.latency import FloorProbe, _hibernate_seconds
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot, MailUser

#: The delay past which a mail counts as having waited (the issue's bound).
WAITED_SECONDS = 5.0


def add_topology_arguments(parser: argparse.ArgumentParser) -> None:
    add_cluster_arguments(parser)
    parser.add_argument(
        "--topology",
        choices=TOPOLOGIES,
        default="all",
        help="'all': one --role=all process (default); 'primary+secondary': a primary and a "
        "secondary on Redis + RabbitMQ (production lease settings)",
    )
    parser.add_argument(
        "--cluster",
        dest="topology",
        action="store_const",
        const="primary+secondary",
        help="the same as --topology primary+secondary",
    )


@dataclass
class Deployment:
    """emlisten with every mailbox listening, whatever the topology."""

    dovecot: Dovecot
    standin: CreatioStandIn
    http: httpx.AsyncClient
    tls: bool
    topology: str
    processes: dict[str, EmlistenProcess]
    cold_start_seconds: float
    log_dir: Path
    cluster: ClusterStack | None = None
    log_offsets: dict[str, int] = field(default_factory=dict)

    def node_report(self) -> dict[str, Any]:
        """Warning lines and lease lapses each process logged since it listened."""
        report: dict[str, Any] = {}
        for name, process in self.processes.items():
            lines, leases = lost_leases(process, self.log_offsets.get(name, 0))
            report[name] = {
                "log_problem_lines": process.log_problems(),
                "lost_lease_lines": lines,
                "lost_leases": leases,
            }
        return report


@contextlib.asynccontextmanager
async def open_deployment(
    args: argparse.Namespace, dovecot: Dovecot, users: Sequence[MailUser]
) -> AsyncIterator[Deployment]:
    if args.topology == "primary+secondary":
        env = {"EMLISTEN_LOG_LEVEL": "WARNING"}  # as the role=all process runs
        async with open_cluster(args, dovecot, primaries=1, secondaries=1, env=env) as cluster:
            credentials = [cluster.credentials(u) for u in users]
            ids = [c["Id"] for c in credentials]
            primary, secondary = cluster.names("primary")[0], cluster.names("secondary")[0]
            started = time.monotonic()
            await cluster.register(credentials, via=primary)
            within = args.listen_timeout or max(120.0, len(ids) * 0.3)
            await wait_cluster_listening(cluster, secondary, ids, within)
            deployment = Deployment(
                dovecot,
                cluster.standin,
                cluster.http,
                args.tls,
                args.topology,
                dict(cluster.nodes),
                time.monotonic() - started,
                cluster.log_dir,
                cluster,
            )
            deployment.log_offsets = {name: p.log_size() for name, p in cluster.nodes.items()}
            yield deployment
    else:
        async with open_stack(args, dovecot) as stack:
            start = await stack.start_listening(users)
            deployment = Deployment(
                dovecot,
                stack.standin,
                stack.http,
                args.tls,
                args.topology,
                {"emlisten": stack.emlisten},
                start.seconds,
                stack.emlisten.log_dir,
            )
            deployment.log_offsets = {"emlisten": stack.emlisten.log_size()}
            yield deployment


class CallbackWatcher:
    """A :class:`CallbackIndex` kept up to date by :meth:`run` (start it in a nursery), with a
    wait for one mail's first callback."""

    def __init__(self, standin: CreatioStandIn, run: str) -> None:
        self.index = CallbackIndex(standin, run)
        self._waiting: dict[int, trio.Event] = {}
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self.index.update()
            for i in [i for i in self._waiting if i in self.index.first_seen]:
                self._waiting.pop(i).set()
            self._changed.set()
            self._changed = trio.Event()
            await self.index.wait_new()

    def received(self, i: int) -> float | None:
        return self.index.first_seen.get(i)

    async def wait(self, i: int) -> None:
        """Until mail ``i`` was first called back (bound it with a cancel scope)."""
        if i in self.index.first_seen:
            return
        await self._waiting.setdefault(i, trio.Event()).wait()

    async def wait_all(self, indices: Sequence[int], within: float, label: str) -> bool:
        """Until every mail of ``indices`` was called back; False after ``within`` seconds."""
        wanted = set(indices)
        progress = Progress(label, len(wanted))
        with trio.move_on_after(within):
            while True:
                done = len(wanted & self.index.first_seen.keys())
                progress.update(done)
                if done >= len(wanted):
                    progress.close(done)
                    return True
                await self._changed.wait()
        progress.close(len(wanted & self.index.first_seen.keys()), "timed out")
        return False


class Probes:
    """A bare IDLE client per mailbox (bench/latency.py's floor probe): when Dovecot announced
    the n-th mail appended during the run to mailbox k."""

    def __init__(self, count: int) -> None:
        self.probes = [FloorProbe() for _ in range(count)]

    async def start(self, nursery: trio.Nursery, deployment: Deployment, users: Sequence[MailUser]) -> None:
        for probe, user in zip(self.probes, users, strict=True):
            await nursery.start(probe.run, deployment, user)

    def announced(self, mailbox: int, nth: int) -> float | None:
        """When an EXISTS covering the ``nth`` (1-based) mail of the run to ``mailbox`` came."""
        probe = self.probes[mailbox]
        return probe.first_reaching(probe.initial + nth)


def hibernate_seconds(args: argparse.Namespace) -> float:
    """Dovecot's imap_hibernate_timeout of the run in seconds (0: no hibernation)."""
    return _hibernate_seconds(args.hibernate_timeout)


def seconds_text(summary: dict[str, float], *keys: str) -> str:
    """'p50 / p99 / max' of a :func:`summary_ms` in seconds (3 decimals)."""
    return " / ".join(f"{summary[k] / 1000:.3f}" for k in keys) + " s"


def note_nodes(deployment: Deployment) -> list[str]:
    notes = []
    for name, report in deployment.node_report().items():
        if report["log_problem_lines"] or report["lost_lease_lines"]:
            notes.append(
                f"{name}: {report['log_problem_lines']} warning/error lines, {report['lost_lease_lines']} "
                f"'lost N lease(s)' lines ({report['lost_leases']} leases) in its log"
            )
    notes.append(f"emlisten logs: {deployment.log_dir}")
    return notes
