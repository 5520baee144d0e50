"""Smoke tests of the benchmarks: each scenario end to end with a handful of mailboxes, so the
harness cannot rot. The figures themselves are not checked, only that they were produced."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench._harness import Progress, percentile, summary_ms
from bench.latency import _hibernate_seconds

ROOT = Path(__file__).resolve().parents[2]
# Short waits so each run takes a few seconds; production defaults are what `python -m bench` uses.
FAST = ["--hibernate-timeout", "none", "--env", "EMLISTEN_READER_IDLE_SECONDS=0.3", "--settle-timeout", "10"]


def run_bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--results-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    json_files = list(tmp_path.glob(f"{args[0]}-*.json"))
    md_files = list(tmp_path.glob(f"{args[0]}-*.md"))
    assert len(json_files) == 1 and len(md_files) == 1
    result: dict[str, Any] = json.loads(json_files[0].read_text())
    assert result["scenario"] == args[0]
    assert result["machine"]["cores"] and result["machine"]["dovecot"] != "unknown"
    assert "| figure | value | target | met |" in md_files[0].read_text()
    assert "== " + args[0] + " ==" in completed.stdout
    return result


@pytest.mark.dovecot
def test_idle_scenario(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path,
        "idle",
        "--mailboxes",
        "3",
        "--plain",
        "--idle-seconds",
        "0.5",
        "--restart-cold-start",
        *FAST,
    )
    metrics = result["metrics"]
    assert metrics["steady_state_reached"] is True
    assert metrics["mail_connections_steady"] == 3
    assert metrics["rss_steady_kib"] > 0
    assert metrics["cold_start_seconds"] > 0
    assert metrics["restart_registration_to_listening_seconds"] > 0
    assert metrics["status_after_window"]["listening"] == 3


@pytest.mark.dovecot
def test_latency_scenario_over_tls(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "latency", "--mailboxes", "2", "--mails", "4", "--tls", *FAST)
    metrics = result["metrics"]
    assert metrics["delivered"] == 4 and metrics["not_delivered"] == 0 and metrics["duplicated"] == 0
    assert metrics["emlisten_ms"]["count"] == 4
    assert metrics["floor_ms"]["count"] == 4


@pytest.mark.dovecot
def test_burst_scenario(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path, "burst", "--mailboxes", "2", "--mails", "20", "--plain", "--size", "2000", *FAST
    )
    metrics = result["metrics"]
    assert metrics["delivered"] == 20
    assert metrics["lost"] == 0 and metrics["duplicated"] == 0
    assert metrics["drain_rate_per_second"] > 0


def test_failover_says_it_is_not_available(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "failover", "--results-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2
    assert "not available yet" in completed.stderr
    assert not list(tmp_path.iterdir())


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([7.0], 90) == 7.0
    summary = summary_ms([0.010, 0.020, 0.030])
    assert summary["p50"] == 20.0 and summary["max"] == 30.0 and summary["count"] == 3
    assert summary_ms([]) == {}


def test_hibernate_timeout_parsing() -> None:
    assert _hibernate_seconds("2s") == 2.0
    assert _hibernate_seconds("500 ms") == 0.5
    assert _hibernate_seconds("1 min") == 60.0
    assert _hibernate_seconds("none") == 0.0


def test_progress_without_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress("things", 3)
    progress.update(1)
    progress.close(3)
    assert "things: 3/3" in capsys.readouterr().err
