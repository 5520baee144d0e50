"""emlisten nodes as real OS processes sharing the real Redis and RabbitMQ, isolated per test by
a Redis key prefix and a queue name of their own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.contract.backends import AMQP_URL, REDIS_URL
from tests.secret_scan import scan_text
from tests.servers.dovecot import Dovecot, free_port


@dataclass
class Cluster:
    dovecot: Dovecot
    log_dir: Path
    prefix: str = field(default_factory=lambda: f"emlisten-test:{uuid.uuid4().hex}:")
    queue: str = field(default_factory=lambda: f"emlisten-test.{uuid.uuid4().hex}")
    nodes: dict[str, NodeProcess] = field(default_factory=dict)
    #: Where the nodes reach Redis and RabbitMQ (a test may point them at fault proxies).
    redis_url: str = REDIS_URL
    amqp_url: str = AMQP_URL
    #: Settings of this test's own, over the ones below (set before the nodes start).
    env_overrides: dict[str, str] = field(default_factory=dict)

    def env(self, node_id: str, role: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMLISTEN_")}
        env.update(
            {
                "EMLISTEN_NODE_ID": node_id,
                "EMLISTEN_ROLE": role,
                "EMLISTEN_REDIS_URL": self.redis_url,
                "EMLISTEN_REDIS_PREFIX": self.prefix,
                "EMLISTEN_AMQP_URL": self.amqp_url,
                "EMLISTEN_AMQP_QUEUE": self.queue,
                "EMLISTEN_SECRET_KEY": "cluster-test-key",
                "EMLISTEN_TLS_CA_FILE": str(self.dovecot.ca_file),
                "EMLISTEN_LEASE_TTL_SECONDS": "2",
                "EMLISTEN_LEASE_RENEW_SECONDS": "0.4",
                "EMLISTEN_RECONNECT_BASE_SECONDS": "0.05",
                "EMLISTEN_RECONNECT_CAP_SECONDS": "0.5",
                "EMLISTEN_DELIVERY_RETRY_BASE_SECONDS": "0.05",
                "EMLISTEN_DELIVERY_RETRY_CAP_SECONDS": "0.5",
                "EMLISTEN_SHUTDOWN_GRACE_SECONDS": "2",
                "EMLISTEN_LOG_LEVEL": "INFO",
            }
        )
        env.update(self.env_overrides)
        return env

    async def start(self, node_id: str, role: str) -> NodeProcess:
        node = NodeProcess(node_id, role, self.env(node_id, role), self.log_dir / f"{node_id}.log")
        await trio.to_thread.run_sync(node.start)
        self.nodes[node_id] = node
        return node

    def stop_all(self) -> None:
        for node in self.nodes.values():
            node.kill()
            scan_text(node.log_text())


class NodeProcess:
    def __init__(self, node_id: str, role: str, env: dict[str, str], log_file: Path) -> None:
        self.node_id = node_id
        self.role = role
        self.env = env
        self.log_file = log_file
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        import time

        deadline = time.monotonic() + timeout
        for _ in range(3):
            # Only this start's lines count: a restarted node appends to the same log.
            since = self.log_file.stat().st_size if self.log_file.exists() else 0
            self.port = free_port()
            with self.log_file.open("ab") as log:
                command = ["-m", "emlisten", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
                self.process = subprocess.Popen(
                    [sys.executable, *command],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            while time.monotonic() < deadline:
                if "ready: API on" in self._log_since(since):
                    return
                if self.process.poll() is not None:
                    break
                time.sleep(0.05)
            # free_port() gives the port back before the node binds it: another process (an
            # outgoing connection's ephemeral port, another worker's server) may take it first.
            if "Address already in use" not in self._log_since(since):
                break
        raise AssertionError(f"node {self.node_id} did not start:\n{self.log_text()[-3000:]}")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _log_since(self, offset: int) -> str:
        return self.log_file.read_bytes()[offset:].decode(errors="replace") if self.log_file.exists() else ""

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    async def logged(self, text: str, timeout: float = 10) -> bool:
        """Whether ``text`` appears in the node's log within ``timeout`` (a line is written after
        the event a test waited for: "delivered ..." after Creatio's answer and the checkpoint)."""
        with trio.move_on_after(timeout):
            while text not in self.log_text():
                await trio.sleep(0.05)  # another process's file: nothing to wait on but time
            return True
        return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def terminate(self, timeout: float = 20) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    async def get(self, path: str) -> Any:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as http:
            response = await http.get(path)
            response.raise_for_status()
            return response.json()

    async def post(self, path: str, body: Any) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as http:
            return await http.post(path, json=body)


@contextmanager
def cluster(dovecot: Dovecot, log_dir: Path) -> Iterator[Cluster]:
    c = Cluster(dovecot, log_dir)
    try:
        yield c
    finally:
        c.stop_all()
