"""The real executable as operators run it: start-up log lines, API, SIGTERM -> exit 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.secret_scan import scan_text
from tests.servers.dovecot import free_port

EMLISTEN = [sys.executable, "-m", "emlisten"]


@pytest.fixture
def node_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMLISTEN_")}
    env.update({"EMLISTEN_NODE_ID": "proc-test", "EMLISTEN_LOG_LEVEL": "INFO"})
    yield env


def start(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], int, list[str]]:
    port = free_port()
    proc = subprocess.Popen(
        [*EMLISTEN, "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "ready: API on" in line:
            return proc, port, lines
    proc.kill()
    raise AssertionError("emlisten did not become ready:\n" + "".join(lines))


def test_serve_all_on_embedded_defaults_then_sigterm_exits_0(node_env: dict[str, str]) -> None:
    proc, port, lines = start(node_env, "--role=all")
    try:
        startup = "".join(lines)
        assert re.search(r"role=all store=memory queue=in-process", startup), startup
        assert "in-memory store" in startup
        response = httpx.get(f"http://127.0.0.1:{port}/api/listeners/status", timeout=10)
        assert response.status_code == 200
        assert response.json()["ServiceStatus"] == "Started"
        assert httpx.get(f"http://127.0.0.1:{port}/api/listeners/exists", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
    assert code == 0
    assert proc.stderr is not None
    rest = proc.stderr.read()
    scan_text("".join(lines) + rest)
    assert "stopped" in rest


def test_sigint_also_exits_0(node_env: dict[str, str]) -> None:
    proc, _port, _lines = start(node_env)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 0


def test_flags_win_over_environment(node_env: dict[str, str]) -> None:
    node_env["EMLISTEN_PORT"] = "1"  # would fail to bind if it won
    node_env["EMLISTEN_NODE_ID"] = "from-env"
    proc, _port, lines = start(node_env, "--node-id", "from-flag")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert "node=from-flag" in "".join(lines)


def test_bad_configuration_is_a_clear_error(node_env: dict[str, str]) -> None:
    node_env["EMLISTEN_PORT"] = "not-a-number"
    result = subprocess.run(
        [*EMLISTEN, "serve"], env=node_env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2
    assert "EMLISTEN_PORT" in result.stderr


def test_secondary_without_shared_services_is_refused(node_env: dict[str, str]) -> None:
    result = subprocess.run(
        [*EMLISTEN, "serve", "--role=secondary", "--port", str(free_port())],
        env=node_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "EMLISTEN_AMQP_URL" in result.stderr


def test_json_logs_one_object_per_line(node_env: dict[str, str]) -> None:
    import json

    node_env["EMLISTEN_LOG_FORMAT"] = "json"
    proc, _port, lines = start(node_env)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert proc.stderr is not None
    records = [json.loads(line) for line in [*lines, *proc.stderr.read().splitlines()] if line.strip()]
    assert records, "no log lines"
    assert all(r["node"] == "proc-test" and r["level"] and r["msg"] for r in records)
    assert any("ready: API on" in r["msg"] for r in records)
