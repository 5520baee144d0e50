"""The chaos soak's private back-ends and its hands on them (bench/soak.py drives them).

- :class:`PrivateRedis`: a ``redis-server`` of the soak's own on a free port, its AOF in a temp
  dir, restarted with its data (SIGTERM: it writes everything out) or without (SIGKILL, files
  removed);
- :class:`PrivateVhost`: a RabbitMQ vhost of the soak's own (``rabbitmqctl``), whose
  connections can be closed by the broker, and deleted at the end;
- :class:`ChaosCreatio`: the Creatio stand-in, told to answer 500, 429 with ``Retry-After``, or
  to hang every request until told to stop;
- :class:`Ledger` and :func:`write_steadily`: the writer's record of every mail appended (its
  Message-ID, mailbox and time), and the writer itself.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import trio

from bench._harness import BenchError, bench_message, say
from bench._rawimap import RawImap, RawImapError
from tests.servers._http import Receive, Scope, Send
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot, MailUser, free_port

REDIS_BIN = shutil.which("redis-server") or "/usr/bin/redis-server"
RABBITMQCTL = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"


# -- Redis -------------------------------------------------------------------------------------


class PrivateRedis:
    """``redis-server`` on a free loopback port with append-only persistence in a temp dir."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="emlisten-soak-redis-"))
        self.log_file = self.dir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, within: float = 20.0) -> None:
        self.process = subprocess.Popen(
            [
                REDIS_BIN,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--logfile",
                str(self.log_file),
                "--daemonize",
                "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"redis-server exited: {self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1) as sock:
                sock.sendall(b"PING\r\n")
                # Loading the AOF answers -LOADING; only +PONG means ready.
                if sock.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise BenchError(f"redis-server did not answer on {self.port}: {self.log_tail()}")

    def stop(self, *, keep_data: bool = True) -> None:
        """SIGTERM (it fsyncs the AOF first) or, without data, SIGKILL and remove its files."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM if keep_data else signal.SIGKILL)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if not keep_data:
            for path in self.dir.iterdir():
                if path != self.log_file:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_file.read_text(errors="replace")[-1500:]
        return ""

    def close(self) -> None:
        self.stop(keep_data=False)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- RabbitMQ ----------------------------------------------------------------------------------


def _rabbitmqctl(*args: str) -> str:
    completed = subprocess.run(
        [RABBITMQCTL, "--quiet", *args], capture_output=True, text=True, timeout=120, check=False
    )
    if completed.returncode != 0:
        raise BenchError(
            f"rabbitmqctl {' '.join(args)}: {completed.stderr.strip() or completed.stdout.strip()}"
        )
    return completed.stdout


@dataclass
class PrivateVhost:
    """A vhost of the soak's own on the local RabbitMQ, for the user of ``base_url``."""

    base_url: str
    name: str = field(default_factory=lambda: f"emlisten-soak-{os.urandom(4).hex()}")

    @property
    def url(self) -> str:
        return urlsplit(self.base_url)._replace(path="/" + quote(self.name, safe="")).geturl()

    def create(self) -> None:
        user = urlsplit(self.base_url).username or "guest"
        _rabbitmqctl("add_vhost", self.name)
        _rabbitmqctl("set_permissions", "-p", self.name, user, ".*", ".*", ".*")

    def close_connections(self) -> None:
        """The broker closes every connection of this vhost (and only those)."""
        _rabbitmqctl("close_all_connections", "--vhost", self.name, "soak: connections cut")

    def delete(self) -> None:
        _rabbitmqctl("delete_vhost", self.name)


# -- Creatio -----------------------------------------------------------------------------------


class ChaosCreatio(CreatioStandIn):
    """The stand-in, plus outages: :meth:`answer` makes every call get one status (429 with a
    ``Retry-After``), :meth:`hang` holds every request at the door until :meth:`answer_normally`
    (then they are processed as usual, unless their client gave up)."""

    def __init__(self) -> None:
        super().__init__()
        self.outage_status: int | None = None
        self.retry_after_seconds = 5
        self._door_open = trio.Event()
        self._door_open.set()
        self.hung_requests = 0

    def answer(self, status: int, retry_after_seconds: int = 5) -> None:
        self.outage_status = status
        self.retry_after_seconds = retry_after_seconds

    def hang(self) -> None:
        if self._door_open.is_set():
            self._door_open = trio.Event()

    def answer_normally(self) -> None:
        self.outage_status = None
        self._door_open.set()

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._door_open.is_set():
            self.hung_requests += 1
            await self._door_open.wait()

        async def send_with_retry_after(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] == 429:
                header = (b"retry-after", str(self.retry_after_seconds).encode())
                message = {**message, "headers": [*message["headers"], header]}
            await send(message)

        await super()._asgi(scope, receive, send_with_retry_after)

    def _status_for(self, method: str, body: Any) -> tuple[int, int | None]:
        if self.outage_status is not None:
            return self.outage_status, None  # send_with_retry_after adds it to a 429
        return super()._status_for(method, body)


# -- the writer and its ledger -----------------------------------------------------------------


@dataclass
class LedgerEntry:
    index: int
    mailbox: int  # index into the soak's mailbox list
    appended_at: float  # time.monotonic() when the server confirmed the APPEND
    appended_wall: float


@dataclass
class Ledger:
    """Every mail the writer appended and the server confirmed. An APPEND whose answer never
    came (the server restarted under it) is kept apart: it may or may not be in the mailbox."""

    run: str
    entries: list[LedgerEntry] = field(default_factory=list)
    unconfirmed: list[int] = field(default_factory=list)
    failed_attempts: int = 0
    next_index: int = 0

    def take_index(self) -> int:
        self.next_index += 1
        return self.next_index

    def message_id(self, index: int) -> str:
        return f"<bench-{self.run}-{index}@example.test>"


async def write_steadily(
    dovecot: Dovecot,
    users: Sequence[MailUser],
    ledger: Ledger,
    rate: float,
    rng: random.Random,
) -> None:
    """APPEND one mail to a random mailbox every ``1/rate`` seconds until cancelled, on logged-in
    plain-IMAP connections kept per user (a broken one is dropped and dialled again). An APPEND
    that fails is recorded as unconfirmed and the next mail gets a new Message-ID."""
    connections: dict[int, RawImap] = {}
    interval = 1.0 / rate
    next_at = trio.current_time()
    try:
        while True:
            mailbox = rng.randrange(len(users))
            index = ledger.take_index()
            try:
                with trio.fail_after(30):
                    client = connections.get(mailbox)
                    if client is None:
                        client = await RawImap.connect(dovecot.host, dovecot.imap_port)
                        connections[mailbox] = client
                        await client.login(users[mailbox].name, users[mailbox].password)
                    await client.append(bench_message(ledger.run, index))
                ledger.entries.append(LedgerEntry(index, mailbox, time.monotonic(), time.time()))
            except (
                OSError,
                RawImapError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                trio.TooSlowError,
            ):
                ledger.unconfirmed.append(index)
                ledger.failed_attempts += 1
                broken = connections.pop(mailbox, None)
                if broken is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        await broken.aclose()
            next_at = max(next_at + interval, trio.current_time())
            await trio.sleep_until(next_at)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            for client in connections.values():
                with contextlib.suppress(Exception):
                    await client.aclose()


def say_fault(elapsed: float, text: str) -> None:
    say(f"[soak {elapsed:7.1f}s] {text}")


# -- the data directory of the embedded store --------------------------------------------------


class DataDirMount:
    """A small tmpfs of the soak's own, the data directory of a ``--role=all`` node, that can be
    filled up (one filler file until ENOSPC) and freed again. (Not remounted read-only: Linux
    refuses that with EBUSY while SQLite holds its files open for writing.)"""

    def __init__(self, size_mib: int = 64) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="emlisten-soak-data-"))
        self.size_mib = size_mib
        self.mounted = False
        self._filler = self.path / "soak-filler"

    def _mount(self, *args: str) -> None:
        completed = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30, check=False)
        if completed.returncode != 0:
            raise BenchError(
                f"mount {' '.join(args)}: {completed.stderr.strip()} (the soak needs root for this)"
            )

    def mount(self) -> None:
        self._mount("-t", "tmpfs", "-o", f"size={self.size_mib}m,mode=0700", "tmpfs", str(self.path))
        self.mounted = True

    def fill(self) -> int:
        """Write a filler file until the file system is full; returns the bytes it took."""
        written = 0
        block = b"\0" * (1 << 20)
        with self._filler.open("wb", buffering=0) as filler:
            while True:
                try:
                    written += filler.write(block) or 0
                except OSError:
                    break
        # Whatever space a partial block left is taken too.
        with contextlib.suppress(OSError), self._filler.open("ab", buffering=0) as filler:
            while filler.write(b"\0" * 4096):
                written += 4096
        return written

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._filler.unlink()

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=30, check=False)
            self.mounted = False
        shutil.rmtree(self.path, ignore_errors=True)
