"""What every benchmark scenario shares.

A tuned private Dovecot (from ``tests/servers``), one mail user per mailbox, the Creatio stand-in
in the bench's own Trio loop, and emlisten as a separate process (``python -m emlisten serve``)
whose RSS and CPU are read from ``/proc``. Results go to ``bench/results/<scenario>-<ts>.{json,md}``
together with the facts of the machine they were measured on.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import platform
import re
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx
import trio

from bench._rawimap import RawImap
from tests.servers.creatio import CreatioStandIn, get_ci
from tests.servers.dovecot import DOVECOT_BIN, Dovecot, MailUser, free_port

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Appended to the fixture's config: many more login/IDLE sessions than a test ever opens.
DOVECOT_EXTRA_CONFIG = """
service imap-login {
  vsz_limit = 2G
}
service imap-hibernate {
  vsz_limit = 2G
  # A process wakes its sessions one after the other, and each wake-up waits in the kernel
  # (closing the session's inotify instance waits for an RCU grace period: the process sat in
  # __flush_work, state D). With 1,000 sessions in one process a backlog drained at 10-15
  # sessions a second for its first seconds; 100 per process lets the waits overlap. (A
  # hibernated session also holds two descriptors there: 10,000 in one process had reached the
  # open-files limit.) docs/performance.md, session 11.
  client_limit = 100
}
service auth {
  client_limit = 20000
}
service imap {
  # Every session that is awake holds an imap process (about 0.9 MB here): a burst into
  # 10,000 hibernated mailboxes wakes them all at once, and the test server's own limit
  # (10,000) then closed sessions and refused logins for minutes.
  process_limit = 25000
  # Reuse imap processes rather than a fork and exec for every session woken, as Dovecot's
  # performance tuning guide advises (every bench user has the same mail UID).
  service_count = 100
  process_min_avail = 4
}
"""


class MailServerSide(Protocol):
    """What the mail side of a run needs of a stack: the server, and whether emlisten's
    sessions (and the bench's probes) use TLS."""

    dovecot: Dovecot
    tls: bool


class BenchError(RuntimeError):
    """The run could not produce a figure (setup failed, timeout): said plainly, no fake result."""


# -- small utilities ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/min/mean in milliseconds, rounded to 0.1 ms."""
    if not seconds:
        return {}
    ms = [s * 1000 for s in seconds]
    return {
        "count": len(ms),
        "p50": round(percentile(ms, 50), 1),
        "p90": round(percentile(ms, 90), 1),
        "p99": round(percentile(ms, 99), 1),
        "max": round(max(ms), 1),
        "min": round(min(ms), 1),
        "mean": round(sum(ms) / len(ms), 1),
    }


class Progress:
    """One self-overwriting stderr line on a terminal; a line every few seconds otherwise."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = total
        self.started = time.monotonic()
        self._last = 0.0
        self._tty = sys.stderr.isatty()

    def update(self, done: int, extra: str = "") -> None:
        now = time.monotonic()
        if now - self._last < (0.2 if self._tty else 5.0) and done < self.total:
            return
        self._last = now
        line = f"{self.label}: {done}/{self.total} {now - self.started:6.1f}s {extra}"
        if self._tty:
            sys.stderr.write("\r\x1b[2K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self, done: int, extra: str = "") -> None:
        self._last = 0.0
        self.update(self.total if done >= self.total else done, extra)
        if self._tty:
            sys.stderr.write("\n")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- machine facts -----------------------------------------------------------------------------


def _first_match(path: str, pattern: str) -> str:
    with contextlib.suppress(OSError):
        match = re.search(pattern, Path(path).read_text(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    return "unknown"


def cpu_speed_ms() -> float:
    """A pure-Python loop of 2 million additions, best of three, in ms: how fast the machine
    was that day. The same 2-core VM is not always equally fast (session 13: the same code took
    2.7 x session 11's CPU per mail in the same drain), and this tells such days apart."""
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        total = 0
        for number in range(2_000_000):
            total += number
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


def machine_facts() -> dict[str, Any]:
    mem_kib = _first_match("/proc/meminfo", r"^MemTotal:\s+(\d+)")
    try:
        dovecot = subprocess.run(
            [DOVECOT_BIN, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        dovecot = "unknown"
    from emlisten import __version__

    commit = "unknown"
    with contextlib.suppress(OSError):
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parent,
        )
        commit = result.stdout.strip() or "unknown"
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "emlisten"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        if changed:  # the figures are of a working tree, not of that commit
            commit += f" + uncommitted changes in {len(changed.splitlines())} emlisten file(s)"
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": _first_match("/proc/cpuinfo", r"^model name\s*:\s*(.+)$"),
        "cores": os.cpu_count(),
        "ram_gib": round(int(mem_kib) / 1024 / 1024, 1) if mem_kib.isdigit() else "unknown",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dovecot": dovecot,
        "emlisten": __version__,
        "git_commit": commit,
        "load_avg_when_written": [round(x, 2) for x in os.getloadavg()],
        "cpu_speed_loop_ms": cpu_speed_ms(),
    }


# -- results -----------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the result table. ``ok`` is None when the figure has no target."""

    metric: str
    value: str
    target: str = ""
    ok: bool | None = None


@dataclass
class Result:
    scenario: str
    params: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, metric: str, value: str, target: str = "", ok: bool | None = None) -> None:
        self.rows.append(Row(metric, value, target, ok))


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else ("yes" if ok else "**NO**")


def render_table(rows: Sequence[Row]) -> str:
    lines = ["| figure | value | target | met |", "|---|---|---|---|"]
    lines += [f"| {r.metric} | {r.value} | {r.target} | {_verdict(r.ok)} |" for r in rows]
    return "\n".join(lines)


def render_markdown(result: Result, machine: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in result.params.items())
    parts = [
        f"# emlisten benchmark: {result.scenario}",
        "",
        f"{machine['date']}, parameters: {params}",
        "",
        render_table(result.rows),
        "",
    ]
    if result.notes:
        parts += ["Notes:", "", *[f"- {n}" for n in result.notes], ""]
    parts += [
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items() if k != "date"),
        "",
    ]
    return "\n".join(parts)


def _unused_base(results_dir: Path, name: str) -> Path:
    """``results_dir/name``, or ``name-2``, ``-3``, ... when a run that ended in the same second
    took it (two benches run side by side): claimed by creating its JSON file exclusively."""
    for attempt in itertools.count(1):
        base = results_dir / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            base.with_suffix(".json").open("x").close()
        except FileExistsError:
            continue
        return base
    raise AssertionError("unreachable")


def write_results(result: Result, results_dir: Path) -> tuple[Path, Path]:
    machine = machine_facts()
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = _unused_base(results_dir, f"{result.scenario}-{stamp}")
    body = {
        "scenario": result.scenario,
        "params": result.params,
        "machine": machine,
        "metrics": result.metrics,
        "table": [r.__dict__ for r in result.rows],
        "notes": result.notes,
    }
    json_path, md_path = base.with_suffix(".json"), base.with_suffix(".md")
    json_path.write_text(json.dumps(body, indent=2) + "\n")
    md_path.write_text(render_markdown(result, machine))
    return json_path, md_path


def print_table(result: Result) -> None:
    headers = ("figure", "value", "target", "met")
    cells = [(r.metric, r.value, r.target, _verdict(r.ok).strip("*")) for r in result.rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print()
    print(f"== {result.scenario} ==")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))
    for note in result.notes:
        print(f"note: {note}")


# -- command line ------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, *, mailboxes: int) -> None:
    parser.add_argument("--mailboxes", type=int, default=mailboxes, help=f"default {mailboxes}")
    security = parser.add_mutually_exclusive_group()
    security.add_argument("--tls", dest="tls", action="store_true", default=True, help="IMAPS (default)")
    security.add_argument("--plain", dest="tls", action="store_false", help="plain IMAP")
    parser.add_argument(
        "--hibernate-timeout",
        default="2s",
        help="Dovecot imap_hibernate_timeout ('none' to keep one imap process per session); default 2s",
    )
    parser.add_argument(
        "--dovecot-config",
        action="append",
        default=[],
        metavar="LINE",
        help="a line appended to the bench Dovecot's configuration (repeatable), e.g. "
        "'imap_idle_notify_interval = 10 secs' (its IDLE keepalive, 2 min by default, sent to every "
        "session of one client address in the same second)",
    )
    parser.add_argument("--chunk", type=int, default=500, help="mailboxes per /api/listeners/create call")
    parser.add_argument(
        "--listen-timeout", type=float, default=0.0, help="seconds to wait for all listening (0: auto)"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the emlisten process (repeatable), e.g. EMLISTEN_READER_IDLE_SECONDS=1",
    )
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=120.0,
        help="max wait for the fetch sessions opened by the start-up catch-up to close, where the "
        "scenario waits for them (they close after EMLISTEN_READER_IDLE_SECONDS, 60 by default)",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)


def common_params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "mailboxes": args.mailboxes,
        "security": "tls" if args.tls else "plain",
        "hibernate_timeout": args.hibernate_timeout,
        "emlisten_env": list(args.env),
        **({"dovecot_config": list(args.dovecot_config)} if getattr(args, "dovecot_config", None) else {}),
    }


def parse_env(items: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise BenchError(f"--env wants NAME=VALUE, got {item!r}")
        env[name] = value
    return env


# -- the mail server ---------------------------------------------------------------------------


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.contextmanager
def bench_dovecot(args: argparse.Namespace) -> Iterator[Dovecot]:
    hibernate = None if str(args.hibernate_timeout).lower() in ("", "none", "off") else args.hibernate_timeout
    raise_fd_limit()
    extra = DOVECOT_EXTRA_CONFIG + "".join(f"{line}\n" for line in getattr(args, "dovecot_config", []))
    with Dovecot(hibernate_timeout=hibernate, extra_config=extra) as dovecot:
        yield dovecot


def create_users(dovecot: Dovecot, count: int) -> list[MailUser]:
    progress = Progress("creating mail users", count)
    users = []
    for i in range(count):
        users.append(dovecot.add_user(f"bench{i}x{uuid.uuid4().hex[:8]}"))
        progress.update(i + 1)
    progress.close(count)
    return users


# -- the emlisten process ----------------------------------------------------------------------


def _preexec_raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def established_inodes(pid: int, remote_ports: Sequence[int]) -> set[str]:
    """Socket inodes of the TCP connections of ``pid`` in ESTABLISHED state to any of
    ``remote_ports``. A connection keeps its inode for its whole life, so comparing two sets tells
    which connections survived and which are new."""
    inodes = _socket_inodes(pid)
    wanted = {f"{p:04X}" for p in remote_ports}
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "01" and fields[2].rsplit(":", 1)[1] in wanted and fields[9] in inodes:
                    found.add(fields[9])
    return found


def established_connections(pid: int, remote_ports: Sequence[int]) -> int:
    """TCP connections of ``pid`` in ESTABLISHED state to any of ``remote_ports``."""
    return len(established_inodes(pid, remote_ports))


def server_connections(local_ports: Sequence[int]) -> int:
    """ESTABLISHED TCP connections of any process whose local port is one of ``local_ports``
    (the server's side of every client session)."""
    wanted = {f"{p:04X}" for p in local_ports}
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "01" and fields[1].rsplit(":", 1)[1] in wanted:
                    count += 1
    return count


def session_cpu_seconds(session_id: int) -> float:
    """CPU (user + system, including reaped children) of every process in a session: Dovecot
    runs in a session of its own, so this is the whole mail server's CPU."""
    total = 0
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = stat_path.read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) == session_id:
                total += sum(int(f) for f in fields[11:15])
    return total / CLOCK_TICKS


# Warnings every bench start logs by design; not counted as problems of the run.
_START_UP_NOTICES = (
    "in-memory store",
    "EMLISTEN_PUBLIC_URL is not set",
    "no secondary alive",  # a primary that answered before the secondary's first heartbeat
)


#: Starts of a node, each on a new free port, before the bench gives up (EmlistenProcess.wait_ready).
_PORT_ATTEMPTS = 5


class EmlistenProcess:
    """``python -m emlisten serve --role=<role>`` as a child process with its own log file
    (``<name>-<start>.log`` in ``log_dir``)."""

    def __init__(
        self, env: dict[str, str], log_dir: Path, *, name: str = "emlisten", role: str = "all"
    ) -> None:
        self.extra_env = env
        self.log_dir = log_dir
        self.name = name
        self.role = role
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = log_dir / f"{name}-0.log"
        self._starts = 0

    @property
    def pid(self) -> int:
        if self.process is None:
            raise BenchError("emlisten is not running")
        return self.process.pid

    def spawn(self) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMLISTEN_")}
        env.update(self.extra_env)
        self.log_path = self.log_dir / f"{self.name}-{self._starts}.log"
        self._starts += 1
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "emlisten",
                    "serve",
                    f"--role={self.role}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_preexec_raise_fd_limit,  # noqa: PLW1509 - no threads started yet here
                start_new_session=True,
            )
        say(f"{self.name} ({self.role}) pid {self.process.pid}, port {self.port}, log {self.log_path}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def log_size(self) -> int:
        """Bytes in the current log so far: pass it to :meth:`log_lines` as ``since``."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_lines(self, pattern: str, since: int = 0) -> list[str]:
        """Lines of the current log (from byte ``since``) that match the regex ``pattern``."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(since)
                text = log.read().decode(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if re.search(pattern, line)]

    def log_problems(self) -> int:
        """Lines at WARNING or above in the current log (the process runs at WARNING)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return 0
        return sum(
            1
            for line in text.splitlines()
            if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", line)
            and not any(notice in line for notice in _START_UP_NOTICES)
        )

    async def wait_ready(self, http: httpx.AsyncClient, within: float = 30.0) -> None:
        """Until this process answers on its port. ``free_port()`` only found the port free: a
        process of another test or bench may bind it first, and then answer in our place while
        ours exits with "Address already in use". Such a start is made again on another port."""
        for attempt in range(_PORT_ATTEMPTS):
            if await self._answering(http, within):
                return
            if attempt < _PORT_ATTEMPTS - 1:
                say(f"{self.name}: port {self.port} was taken by another process; starting again")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await trio.to_thread.run_sync(functools.partial(self._wait_exit, 10.0))
                self.spawn()
        raise BenchError(f"{self.name}: {_PORT_ATTEMPTS} ports in a row were taken by other processes")

    def _wait_exit(self, timeout: float) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.wait(timeout)

    async def _answering(self, http: httpx.AsyncClient, within: float) -> bool:
        """True once this node answers; False when another node answers on its port, or this
        process could not bind it."""
        node_id = self.extra_env.get("EMLISTEN_NODE_ID")
        deadline = trio.current_time() + within
        while trio.current_time() < deadline:
            if self.process is None or self.process.poll() is not None:
                if "Address already in use" in self.log_tail():
                    return False
                raise BenchError(f"emlisten exited during start:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                response = await http.get(f"{self.url}/api/listeners/status", timeout=2)
                if response.status_code == 200:
                    return node_id is None or response.json().get("Node") == node_id
            await trio.sleep(0.02)
        raise BenchError(f"emlisten did not answer within {within}s:\n{self.log_tail()}")

    def rss_kib(self) -> int:
        match = re.search(r"^VmRSS:\s+(\d+)", Path(f"/proc/{self.pid}/status").read_text(), re.MULTILINE)
        if match is None:
            raise BenchError("no VmRSS for the emlisten process")
        return int(match.group(1))

    def cpu_seconds(self) -> float:
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def connections_to(self, ports: Sequence[int]) -> int:
        return established_connections(self.pid, ports)

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, no clean-up of any kind (a crashed node), and reap the process."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    async def stop(self, within: float = 60.0) -> float:
        """SIGTERM and wait; returns the seconds the graceful shutdown took (SIGKILL after ``within``)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return 0.0
        started = time.monotonic()
        process.send_signal(signal.SIGCONT)  # a frozen process cannot handle SIGTERM
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(within):
            while process.poll() is None:  # noqa: ASYNC110 - a child's exit is no Trio event
                await trio.sleep(0.02)
        if process.poll() is None:
            process.kill()
            process.wait()
            say(f"emlisten did not stop within {within}s; killed")
        return time.monotonic() - started


# -- what a process tells about its IMAP sessions -----------------------------------------------

#: The commands that open an IMAP session (one per connection): counted from ``/metrics``.
SESSION_COMMANDS = ("LOGIN", "AUTHENTICATE")
_LOST_LEASES = re.compile(r"lost (\d+) lease\(s\)")


#: emlisten's own histograms (sum and count kept): its new-mail notification to the sink's 2xx,
#: one delivery call, one IMAP command.
DELIVERY_LATENCY = "emlisten_delivery_latency_seconds"
DELIVERY_CALL = "emlisten_delivery_call_seconds"
IMAP_COMMAND = "emlisten_imap_command_seconds"
GC_PAUSE = "emlisten_gc_pause_seconds"
_TIMINGS = (DELIVERY_LATENCY, DELIVERY_CALL, IMAP_COMMAND, GC_PAUSE)


@dataclass
class SessionCounts:
    """From one ``GET /metrics``: ``emlisten_imap_commands_total`` for LOGIN and AUTHENTICATE (a
    session each) and ``emlisten_reconnects_total`` by reason. Subtract two readings for the
    sessions opened between them."""

    logins: int = 0  # LOGIN/AUTHENTICATE answered OK: sessions opened
    login_attempts: int = 0  # any outcome
    reconnects: dict[str, int] = field(default_factory=dict)
    #: Every ``*_total`` counter sample of the node, for the result file (diagnostics).
    counters: dict[str, float] = field(default_factory=dict)

    def __sub__(self, before: SessionCounts) -> SessionCounts:
        return SessionCounts(
            self.logins - before.logins,
            self.login_attempts - before.login_attempts,
            _changed(self.reconnects, before.reconnects, -1),
            _changed(self.counters, before.counters, -1),
        )

    def __add__(self, other: SessionCounts) -> SessionCounts:
        return SessionCounts(
            self.logins + other.logins,
            self.login_attempts + other.login_attempts,
            _changed(self.reconnects, other.reconnects, 1),
            _changed(self.counters, other.counters, 1),
        )

    def _sample(self, histogram: str, part: str, labels: str) -> float:
        return self.counters.get(f"{histogram}_{part}" + (f"{{{labels}}}" if labels else ""), 0.0)

    def sum_ms(self, histogram: str, labels: str = "") -> float:
        """Sum of one of emlisten's histograms (``DELIVERY_LATENCY``...; ``labels`` as
        ``command=UID FETCH``) in ms; subtract two readings first."""
        return 1000 * self._sample(histogram, "sum", labels)

    def count_over(self, histogram: str, seconds: float, labels: str = "") -> int:
        """Observations above ``seconds`` (one of the histogram's bucket bounds); subtract two
        readings first."""
        bound = f"le={float(seconds)}"
        within = self._sample(histogram, "bucket", f"{labels},{bound}" if labels else bound)
        return int(self._sample(histogram, "count", labels) - within)

    def mean_ms(self, histogram: str, labels: str = "") -> float | None:
        """Mean of the same, in ms; None without observations."""
        count = self._sample(histogram, "count", labels)
        return round(self.sum_ms(histogram, labels) / count, 2) if count else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "logins": self.logins,
            "login_attempts": self.login_attempts,
            "reconnects": self.reconnects,
            "counters": self.counters,
        }


def _changed(a: dict[str, Any], b: dict[str, Any], sign: int) -> dict[str, Any]:
    """a + sign * b per key, keeping only the non-zero results."""
    combined = {key: a.get(key, 0) + sign * b.get(key, 0) for key in sorted(set(a) | set(b))}
    return {key: value for key, value in combined.items() if value}


async def session_counts(http: httpx.AsyncClient, base_url: str) -> SessionCounts:
    """Read the session counters from the node's ``/metrics`` (the node must not be frozen)."""
    from prometheus_client.parser import text_string_to_metric_families

    for attempt in range(3):
        try:
            response = await http.get(f"{base_url}/metrics", timeout=60)
            break
        except httpx.TransportError:
            # A kept-alive connection the server closed as the request went out (seen once at
            # 10,000 mailboxes, polling every second): ask again on a new one.
            if attempt == 2:
                raise
    response.raise_for_status()
    counts = SessionCounts()
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            command = sample.labels.get("command")
            if sample.name == "emlisten_imap_commands_total" and command in SESSION_COMMANDS:
                counts.login_attempts += int(sample.value)
                if sample.labels.get("outcome") == "ok":
                    counts.logins += int(sample.value)
            elif sample.name == "emlisten_reconnects_total":
                reason = sample.labels.get("reason", "")
                counts.reconnects[reason] = counts.reconnects.get(reason, 0) + int(sample.value)
            timing = sample.name.startswith(_TIMINGS) and sample.name.endswith(("_sum", "_count", "_bucket"))
            if sample.name.endswith("_total") or timing:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                counts.counters[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return counts


def lost_leases(process: EmlistenProcess, since: int = 0) -> tuple[int, int]:
    """(log lines "lost N lease(s) to other nodes", sum of their N) in the process's log since
    byte ``since``. The lines are WARNINGs, so they are logged at the bench's level."""
    lines = process.log_lines(_LOST_LEASES.pattern, since)
    total = 0
    for line in lines:
        match = _LOST_LEASES.search(line)
        total += int(match.group(1)) if match else 0
    return len(lines), total


# -- the whole stack ---------------------------------------------------------------------------


def mailbox_credentials(
    dovecot: Dovecot, standin: CreatioStandIn, user: MailUser, *, tls: bool
) -> dict[str, Any]:
    """One Creatio ``SynchronizationCredentials`` element, as tests/service/conftest.py builds it."""
    return {
        "Id": str(uuid.uuid4()),
        "UserName": user.name,
        "Password": user.password,
        "SenderEmailAddress": user.email,
        "ServiceUrl": dovecot.host,
        "Port": dovecot.imaps_port if tls else dovecot.imap_port,
        "UseSsl": tls,
        "SecureOption": 2 if tls else 0,
        "BpmEndpoint": standin.endpoint(),
        "BpmUser": "Supervisor",
        "BpmUserWorkspace": "Default",
        "BpmUserTimeZone": "UTC",
        "FolderIds": [],
        "UseFullEmail": True,
    }


async def register_mailboxes(
    http: httpx.AsyncClient, base_url: str, credentials: Sequence[dict[str, Any]], chunk_size: int
) -> None:
    """POST /api/listeners/create in chunks; every element must be accepted."""
    for start in range(0, len(credentials), chunk_size):
        chunk = list(credentials[start : start + chunk_size])
        response = await http.post(f"{base_url}/api/listeners/create", json=chunk, timeout=120)
        if response.status_code != 200 or len(response.json().get("Accepted", [])) != len(chunk):
            raise BenchError(f"create refused: {response.status_code} {response.text[:500]}")


@dataclass
class Stack:
    dovecot: Dovecot
    standin: CreatioStandIn
    emlisten: EmlistenProcess
    http: httpx.AsyncClient
    tls: bool
    listen_timeout: float
    chunk: int

    def dovecot_cpu_seconds(self) -> float:
        master_pid = int((self.dovecot.base_dir / "master.pid").read_text().split()[0])
        return session_cpu_seconds(master_pid)

    @property
    def mail_ports(self) -> tuple[int, int]:
        return (self.dovecot.imap_port, self.dovecot.imaps_port)

    def credentials(self, user: MailUser) -> dict[str, Any]:
        return mailbox_credentials(self.dovecot, self.standin, user, tls=self.tls)

    async def register(self, credentials: Sequence[dict[str, Any]]) -> None:
        await register_mailboxes(self.http, self.emlisten.url, credentials, self.chunk)

    async def status_counts(self) -> dict[str, int]:
        response = await self.http.get(f"{self.emlisten.url}/api/listeners/status", timeout=30)
        response.raise_for_status()
        connections = response.json().get("Connections", {})
        return {k: int(v) for k, v in connections.items()}

    async def wait_listening(self, count: int, label: str = "listening") -> dict[str, int]:
        """Poll the status every 50 ms until ``count`` mailboxes are listening."""
        timeout = self.listen_timeout or max(60.0, count * 0.1)
        progress = Progress(label, count)
        counts: dict[str, int] = {}
        with trio.move_on_after(timeout):
            while True:
                counts = await self.status_counts()
                listening = counts.get("listening", 0)
                progress.update(listening, _states(counts))
                if listening >= count:
                    progress.close(listening)
                    return counts
                await trio.sleep(0.05)
        progress.close(counts.get("listening", 0))
        raise BenchError(
            f"only {counts.get('listening', 0)}/{count} listening after {timeout:.0f}s ({_states(counts)});"
            f" emlisten log:\n{self.emlisten.log_tail()}"
        )

    async def wait_connections(self, count: int, within: float) -> tuple[bool, float]:
        """Wait until emlisten holds exactly ``count`` mail connections (the fetch sessions opened
        by the catch-up after connect have closed). Returns (reached, seconds waited)."""
        started = time.monotonic()
        progress = Progress("waiting for idle fetch sessions to close", count)
        with trio.move_on_after(within):
            while True:
                now = self.emlisten.connections_to(self.mail_ports)
                progress.update(count if now <= count else 0, f"{now} mail connections, want {count}")
                if now <= count:
                    progress.close(count)
                    return True, time.monotonic() - started
                await trio.sleep(0.5)
        progress.close(0, "timed out")
        return False, time.monotonic() - started

    async def start_listening(self, users: Sequence[MailUser]) -> ColdStart:
        """Register one mailbox per user and wait until all listen."""
        credentials = [self.credentials(u) for u in users]
        emlisten_cpu, dovecot_cpu = self.emlisten.cpu_seconds(), self.dovecot_cpu_seconds()
        started = time.monotonic()
        await self.register(credentials)
        registered = time.monotonic() - started
        await self.wait_listening(len(credentials))
        return ColdStart(
            mailbox_ids=[c["Id"] for c in credentials],
            seconds=time.monotonic() - started,
            create_calls_seconds=registered,
            emlisten_cpu_seconds=self.emlisten.cpu_seconds() - emlisten_cpu,
            dovecot_cpu_seconds=self.dovecot_cpu_seconds() - dovecot_cpu,
        )


@dataclass
class ColdStart:
    mailbox_ids: list[str]
    seconds: float  # first create call -> all listening
    create_calls_seconds: float
    emlisten_cpu_seconds: float
    dovecot_cpu_seconds: float

    def as_metrics(self, prefix: str = "cold_start") -> dict[str, float]:
        return {
            f"{prefix}_seconds": round(self.seconds, 3),
            f"{prefix}_create_calls_seconds": round(self.create_calls_seconds, 3),
            f"{prefix}_emlisten_cpu_seconds": round(self.emlisten_cpu_seconds, 2),
            f"{prefix}_dovecot_cpu_seconds": round(self.dovecot_cpu_seconds, 2),
        }

    def cpu_text(self) -> str:
        share = 100 * self.emlisten_cpu_seconds / self.seconds
        return (
            f"emlisten {self.emlisten_cpu_seconds:.1f} s ({share:.0f} % of a core),"
            f" Dovecot {self.dovecot_cpu_seconds:.1f} s"
        )


def _states(counts: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k != "Total")


@contextlib.asynccontextmanager
async def open_stack(args: argparse.Namespace, dovecot: Dovecot) -> AsyncIterator[Stack]:
    """The Creatio stand-in (in this Trio loop) and a started, answering emlisten process."""
    env = {
        "EMLISTEN_TLS_CA_FILE": str(dovecot.ca_file),
        "EMLISTEN_LOG_LEVEL": "WARNING",
        "EMLISTEN_NODE_ID": "bench",
        **parse_env(args.env),
    }
    log_dir = Path(tempfile.mkdtemp(prefix="emlisten-bench-"))
    standin = CreatioStandIn()
    emlisten = EmlistenProcess(env, log_dir)
    async with trio.open_nursery() as nursery:
        await nursery.start(standin.serve)
        # No keep-alive: an open idle connection holds up emlisten's graceful shutdown by
        # Hypercorn's graceful timeout, which would be counted in the shutdown figure.
        limits = httpx.Limits(max_connections=10, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits) as http:
            emlisten.spawn()
            try:
                await emlisten.wait_ready(http)
                yield Stack(dovecot, standin, emlisten, http, args.tls, args.listen_timeout, args.chunk)
            finally:
                await emlisten.stop()
        nursery.cancel_scope.cancel()
    say(f"emlisten logs: {log_dir}")


# -- several nodes on the shared Redis store and RabbitMQ queue ---------------------------------

DEFAULT_REDIS_URL = os.environ.get("EMLISTEN_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DEFAULT_AMQP_URL = os.environ.get("EMLISTEN_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for results and messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help="shared Redis (default: $EMLISTEN_TEST_REDIS_URL or local)",
    )
    parser.add_argument(
        "--amqp-url",
        default=DEFAULT_AMQP_URL,
        help="RabbitMQ (default: $EMLISTEN_TEST_AMQP_URL or local guest)",
    )


@dataclass
class SharedBackends:
    """One run's share of the real Redis and RabbitMQ: a key prefix and a queue name of its own,
    both removed by :meth:`clean_up`. The credential key is random per run and never written out."""

    redis_url: str
    amqp_url: str
    prefix: str = field(default_factory=lambda: f"emlisten-bench:{uuid.uuid4().hex[:12]}:")
    queue: str = field(default_factory=lambda: f"emlisten-bench.{uuid.uuid4().hex[:12]}")
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)

    def env(self) -> dict[str, str]:
        return {
            "EMLISTEN_REDIS_URL": self.redis_url,
            "EMLISTEN_REDIS_PREFIX": self.prefix,
            "EMLISTEN_AMQP_URL": self.amqp_url,
            "EMLISTEN_AMQP_QUEUE": self.queue,
            "EMLISTEN_SECRET_KEY": self.secret_key,
        }

    def describe(self) -> dict[str, str]:
        return {
            "redis": redact_url(self.redis_url),
            "redis_prefix": self.prefix,
            "amqp": redact_url(self.amqp_url),
            "amqp_queue": self.queue,
        }

    def _redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis_url, socket_timeout=10)

    def check_redis(self) -> None:
        import redis

        try:
            client = self._redis()
            client.ping()
            client.close()
        except redis.RedisError as exc:
            raise BenchError(f"Redis at {redact_url(self.redis_url)} is not usable: {exc}") from None

    def _delete_keys(self) -> tuple[int, int]:
        client = self._redis()
        try:
            deleted = 0
            for key in client.scan_iter(match=f"{self.prefix}*", count=1000):
                deleted += int(client.delete(key))
            left = sum(1 for _ in client.scan_iter(match=f"{self.prefix}*", count=1000))
            return deleted, left
        finally:
            client.close()

    async def _delete_queues(self) -> None:
        from emlisten._bridge import open_asyncio_bridge
        from emlisten.queue.rabbitmq import RabbitMQQueue

        async with (
            open_asyncio_bridge(),
            RabbitMQQueue.open(
                self.amqp_url, queue_name=self.queue, connection_name="emlisten-bench"
            ) as queue,
        ):
            await queue.delete_queues()

    async def clean_up(self) -> dict[str, Any]:
        """Delete every Redis key under the prefix and both queues (after the nodes stopped)."""
        outcome: dict[str, Any] = {}
        try:
            deleted, left = await trio.to_thread.run_sync(self._delete_keys)
            outcome.update(redis_keys_deleted=deleted, redis_keys_left=left)
        except Exception as exc:  # reported, never hides the run's own outcome
            outcome["redis_error"] = str(exc)
        try:
            await self._delete_queues()
            outcome["queues_deleted"] = [self.queue, f"{self.queue}.dead"]
        except Exception as exc:
            outcome["queue_error"] = str(exc)
        say(f"clean-up: {outcome}")
        return outcome


@dataclass
class ClusterStack:
    """Several emlisten processes (primaries, secondaries) sharing one run's Redis prefix and
    queue, the Creatio stand-in in the bench's Trio loop, and the bench's HTTP client."""

    dovecot: Dovecot
    standin: CreatioStandIn
    http: httpx.AsyncClient
    backends: SharedBackends
    nodes: dict[str, EmlistenProcess]
    tls: bool
    chunk: int
    log_dir: Path
    clean_up_outcome: dict[str, Any] = field(default_factory=dict)

    def dovecot_cpu_seconds(self) -> float:
        master_pid = int((self.dovecot.base_dir / "master.pid").read_text().split()[0])
        return session_cpu_seconds(master_pid)

    def names(self, role: str) -> list[str]:
        return [name for name, node in self.nodes.items() if node.role == role]

    @property
    def mail_ports(self) -> tuple[int, int]:
        return (self.dovecot.imap_port, self.dovecot.imaps_port)

    def credentials(self, user: MailUser) -> dict[str, Any]:
        return mailbox_credentials(self.dovecot, self.standin, user, tls=self.tls)

    async def register(self, credentials: Sequence[dict[str, Any]], via: str) -> None:
        await register_mailboxes(self.http, self.nodes[via].url, credentials, self.chunk)

    async def get_json(self, via: str, path: str) -> Any:
        response = await self.http.get(f"{self.nodes[via].url}{path}", timeout=60)
        response.raise_for_status()
        return response.json()

    async def mailboxes(self, via: str) -> list[dict[str, Any]]:
        """``GET /v1/mailboxes``: per mailbox its ``state`` (last status written) and ``node`` (the
        holder of its lease, None when free)."""
        body = await self.get_json(via, "/v1/mailboxes")
        items: list[dict[str, Any]] = body["mailboxes"]
        return items


@contextlib.asynccontextmanager
async def open_cluster(
    args: argparse.Namespace,
    dovecot: Dovecot,
    *,
    primaries: int,
    secondaries: int,
    env: dict[str, str],
) -> AsyncIterator[ClusterStack]:
    """Primaries ``p1..pN`` and secondaries ``s1..sM`` on Redis + RabbitMQ, all answering.

    At the end every node still running gets SIGTERM (in parallel), then the run's Redis keys and
    queues are deleted; the outcome lands in ``ClusterStack.clean_up_outcome``.
    """
    backends = SharedBackends(args.redis_url, args.amqp_url)
    backends.check_redis()
    base_env = {
        "EMLISTEN_TLS_CA_FILE": str(dovecot.ca_file),
        "EMLISTEN_LOG_LEVEL": "INFO",
        **backends.env(),
        **env,
        **parse_env(args.env),
    }
    log_dir = Path(tempfile.mkdtemp(prefix="emlisten-bench-cluster-"))
    nodes: dict[str, EmlistenProcess] = {}
    for role, prefix, count in (("primary", "p", primaries), ("secondary", "s", secondaries)):
        for i in range(1, count + 1):
            name = f"{prefix}{i}"
            nodes[name] = EmlistenProcess(
                {**base_env, "EMLISTEN_NODE_ID": name}, log_dir, name=name, role=role
            )
    standin = CreatioStandIn()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(standin.serve)
            limits = httpx.Limits(max_connections=20, max_keepalive_connections=0)
            async with httpx.AsyncClient(limits=limits) as http:
                stack = ClusterStack(dovecot, standin, http, backends, nodes, args.tls, args.chunk, log_dir)
                try:
                    for node in nodes.values():
                        node.spawn()
                    async with trio.open_nursery() as starting:
                        for node in nodes.values():
                            starting.start_soon(functools.partial(node.wait_ready, http, within=90.0))
                    say(f"{len(nodes)} nodes answer: {', '.join(nodes)}")
                    yield stack
                finally:
                    with trio.CancelScope(shield=True):
                        async with trio.open_nursery() as stopping:
                            for node in nodes.values():
                                stopping.start_soon(node.stop)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(60):
            outcome = await backends.clean_up()
            with contextlib.suppress(UnboundLocalError):
                stack.clean_up_outcome.update(outcome)
        say(f"emlisten logs: {log_dir}")


# -- the mail that goes through --------------------------------------------------------------

_SUBJECT = re.compile(r"^bench (\w+) (\d+)$")


def bench_message(run: str, index: int, size: int = 0) -> bytes:
    """A valid message whose Subject carries (run, index); padded to about ``size`` bytes."""
    filler = ""
    if size > 0:
        line = "The quick brown fox jumps over the lazy dog, again and again. 0123456789\r\n"
        filler = line * max(0, (size - 400) // len(line))
    lines = [
        "From: Bench Sender <sender@example.test>",
        "To: rcpt@example.test",
        f"Subject: bench {run} {index}",
        "Date: Mon, 02 Jan 2023 10:00:00 +0000",
        f"Message-ID: <bench-{run}-{index}@example.test>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
        f"Benchmark message {index}.\r\n{filler}",
    ]
    return "\r\n".join(lines).encode()


class CallbackIndex:
    """Reads the stand-in's ProcessFullEmail calls incrementally: first receive time per message
    index of one run, and how often each Email.Id was seen (to count duplicates)."""

    def __init__(self, standin: CreatioStandIn, run: str) -> None:
        self.standin = standin
        self.run = run
        self.first_seen: dict[int, float] = {}
        self.email_ids: Counter[str] = Counter()
        self.calls = 0
        self.emails = 0
        self.last_received = 0.0
        self._consumed = 0

    def update(self) -> None:
        calls = self.standin.calls()
        for call in calls[self._consumed :]:
            if call.method != "ProcessFullEmail" or not call.accepted:
                continue
            self.calls += 1
            emails = get_ci(call.body, "Emails")
            for email in emails if isinstance(emails, list) else []:
                match = _SUBJECT.match(str(get_ci(email, "Subject") or ""))
                if match is None or match.group(1) != self.run:
                    continue
                self.emails += 1
                self.email_ids[str(get_ci(email, "Id"))] += 1
                self.first_seen.setdefault(int(match.group(2)), call.received_at)
                self.last_received = max(self.last_received, call.received_at)
        self._consumed = len(calls)

    @property
    def duplicated(self) -> int:
        return sum(n - 1 for n in self.email_ids.values() if n > 1)

    async def wait_for(self, count: int, stall_timeout: float, label: str) -> bool:
        """Wait until ``count`` distinct messages arrived; False once no call at all came for
        ``stall_timeout`` seconds (event driven: woken by each call the stand-in records)."""
        progress = Progress(label, count)
        while True:
            self.update()
            progress.update(len(self.first_seen))
            if len(self.first_seen) >= count:
                progress.close(count)
                return True
            try:
                await self.standin.wait_until(lambda: True if self._has_new() else None, stall_timeout, label)
            except AssertionError:
                progress.close(len(self.first_seen), "stalled")
                return False

    def _has_new(self) -> bool:
        return len(self.standin.calls()) > self._consumed

    async def wait_new(self) -> None:
        """Until the stand-in recorded a call this index has not read yet (no timeout)."""
        await self.standin.wait_until(lambda: True if self._has_new() else None, math.inf, "a callback")


async def prepare_mailboxes(dovecot: Dovecot, users: Sequence[MailUser]) -> None:
    """Log every user in once, so Dovecot has created its Maildir and indexes before the
    measurement (a real server's mailboxes exist already; creating them is not emlisten's cost)."""
    progress = Progress("creating the users' mailboxes on the server", len(users))
    done = 0

    async def one(user: MailUser, limiter: trio.CapacityLimiter) -> None:
        nonlocal done
        async with limiter:
            client = await RawImap.connect(dovecot.host, dovecot.imap_port)
            try:
                await client.login(user.name, user.password)
                await client.select("INBOX")
                await client.command(b"LOGOUT")
            finally:
                await client.aclose()
        done += 1
        progress.update(done)

    limiter = trio.CapacityLimiter(16)
    async with trio.open_nursery() as nursery:
        for user in users:
            nursery.start_soon(one, user, limiter)
    progress.close(done)


async def bare_client_cold_start(
    dovecot: Dovecot,
    users: Sequence[MailUser],
    *,
    tls: bool,
    sessions_per_user: int = 1,
    concurrency: int = 64,
) -> float:
    """Seconds for the bench's bare client to bring ``sessions_per_user`` IDLE sessions per user
    up (connect, TLS, LOGIN, SELECT, IDLE), ``concurrency`` at a time: the server's cold-start
    floor for a Python client. The sessions are closed afterwards."""
    context = dovecot.client_ssl_context() if tls else None
    port = dovecot.imaps_port if tls else dovecot.imap_port
    clients: list[RawImap] = []
    total = len(users) * sessions_per_user
    progress = Progress(f"bare client: {total} IDLE sessions", total)

    async def one(user: MailUser, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            client = await RawImap.connect(dovecot.host, port, context)
            clients.append(client)
            await client.login(user.name, user.password)
            await client.select("INBOX")
            await client.idle_start()
        progress.update(len(clients))

    started = time.monotonic()
    limiter = trio.CapacityLimiter(concurrency)
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(sessions_per_user):
                for user in users:
                    nursery.start_soon(one, user, limiter)
        return time.monotonic() - started
    finally:
        progress.close(len(clients))
        await close_all(clients)


class Appender(Protocol):
    """Appends mail to one user's INBOX (a held session, or a short one per mail)."""

    async def append(self, message: bytes, folder: str = "INBOX") -> bytes: ...

    async def aclose(self) -> None: ...


#: Above this many users the bench does not hold a session per user for appending: every held
#: session is one more imap process on the server (10,000 of them beside 10,000 listening
#: sessions woken by the burst exhausted the test server and the machine).
HELD_APPENDERS_MAX = 2000


class ShortSessionAppender:
    """APPEND on a session of its own per mail: connect, LOGIN, APPEND, LOGOUT."""

    def __init__(self, dovecot: Dovecot, user: MailUser) -> None:
        self.dovecot = dovecot
        self.user = user

    async def append(self, message: bytes, folder: str = "INBOX") -> bytes:
        client = await RawImap.connect(self.dovecot.host, self.dovecot.imap_port)
        try:
            await client.login(self.user.name, self.user.password)
            return await client.append(message, folder)
        finally:
            await client.aclose()

    async def aclose(self) -> None:
        pass


async def connect_appenders(stack: MailServerSide, users: Sequence[MailUser]) -> list[Appender]:
    """An appender per user (see :func:`connect_appenders_to`)."""
    return await connect_appenders_to(stack.dovecot, users)


async def connect_appenders_to(dovecot: Dovecot, users: Sequence[MailUser]) -> list[Appender]:
    """One logged-in plain-IMAP connection per user, for APPEND (not selected); above
    ``HELD_APPENDERS_MAX`` users a short session per mail instead."""
    if len(users) > HELD_APPENDERS_MAX:
        return [ShortSessionAppender(dovecot, user) for user in users]
    clients: list[RawImap | None] = [None] * len(users)

    async def one(i: int, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            client = await RawImap.connect(dovecot.host, dovecot.imap_port)
            await client.login(users[i].name, users[i].password)
            clients[i] = client

    limiter = trio.CapacityLimiter(32)
    async with trio.open_nursery() as nursery:
        for i in range(len(users)):
            nursery.start_soon(one, i, limiter)
    return [c for c in clients if c is not None]


async def close_all(clients: Sequence[Appender]) -> None:
    async with trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(client.aclose)


# -- the looks after every first IDLE ------------------------------------------------------

#: The looks after first IDLEs are over when no session was opened for this long.
LOOKS_QUIET_SECONDS = 5.0


def looks_done(counts: SessionCounts) -> int:
    """Looks done, failed or left out (``emlisten_imap_looks_total``, all outcomes)."""
    return int(sum(v for k, v in counts.counters.items() if k.startswith("emlisten_imap_looks_total")))


async def wait_for_looks(
    stack: Stack, mailboxes: int, patience: float, *, quiet: float = LOOKS_QUIET_SECONDS
) -> dict[str, Any]:
    """Wait until every session's look after its first IDLE is over (done, failed or left out:
    one each, ``EMLISTEN_RECHECK_LATE_SECONDS`` after it) and no session opened for ``quiet``
    seconds, or ``patience`` seconds."""
    started = trio.current_time()
    first = last = await session_counts(stack.http, stack.emlisten.url)
    last_change = started
    say(f"waiting for the {mailboxes} looks after first IDLEs, then no session for {quiet:g} s")
    settled = False
    while trio.current_time() - started < patience:
        await trio.sleep(1.0)
        now = await session_counts(stack.http, stack.emlisten.url)
        if now.logins != last.logins:
            last_change = trio.current_time()
        last = now
        if looks_done(now) >= mailboxes and trio.current_time() - last_change >= quiet:
            settled = True
            break
    opened = (last - first).logins
    say(f"looks: {looks_done(last)}; {opened} sessions opened in {trio.current_time() - started:.0f} s")
    return {
        "seconds": trio.current_time() - started,
        "logins": opened,
        "looks": (last - first).counters,
        "settled": settled,
    }
