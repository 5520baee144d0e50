"""Smoke tests of the benchmarks: each scenario end to end with a handful of mailboxes, so the
harness cannot rot. The figures themselves are not checked, only that they were produced."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench._harness import Progress, Result, percentile, redact_url, summary_ms, write_results
from bench.failover import fair_share_bounds, listening_owners, taken_over
from bench.latency import _hibernate_seconds

ROOT = Path(__file__).resolve().parents[2]
# Short waits so each run takes a few seconds; production defaults are what `python -m bench` uses.
FAST = ["--hibernate-timeout", "none", "--env", "EMLISTEN_READER_IDLE_SECONDS=0.3", "--settle-timeout", "10"]


def run_bench(tmp_path: Path, *args: str, timeout: float = 90) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--results-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
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
@pytest.mark.parametrize("probe_idle", [(), ("--probe-pipelined-idle",)], ids=["idle-after", "pipelined"])
def test_latency_scenario_over_tls(tmp_path: Path, probe_idle: tuple[str, ...]) -> None:
    result = run_bench(
        tmp_path,
        "latency",
        *probe_idle,
        "--mailboxes",
        "2",
        "--mails",
        "4",
        "--tls",
        "--afterwards",
        "4",
        "--settle-looks",
        "--fetch-floor",
        "--env",
        "EMLISTEN_RECHECK_SECONDS=0.5",
        "--env",
        "EMLISTEN_RECHECK_LATE_SECONDS=1",
        *FAST,
    )
    metrics = result["metrics"]
    assert metrics["delivered"] == 4 and metrics["not_delivered"] == 0 and metrics["duplicated"] == 0
    # --settle-looks waited for the look after each session's first IDLE (1 s after it).
    settled = metrics["looks_settled_before_run"]
    assert settled["settled"] and settled["logins"] >= 2
    assert metrics["emlisten_ms"]["count"] == 4
    assert metrics["floor_ms"]["count"] == 4
    # --fetch-floor: the probes also read every mail whole, after they saw its EXISTS (two per
    # probe: with --probe-pipelined-idle the second comes after the IDLE sent with the first).
    assert metrics["fetch_floor_ms"]["count"] == 4
    assert metrics["fetch_floor_ms"]["min"] >= metrics["floor_ms"]["min"]
    # ... and their own DONE + UID FETCH, from the EXISTS they read to the mail read whole.
    assert metrics["bare_client_fetch_ms"]["count"] == 4
    assert metrics["bare_client_fetch_ms"]["min"] >= 0
    # Each mailbox's recheck (0.5 s after its last mail) opens a session after the last callback.
    afterwards = metrics["afterwards"]
    assert afterwards["seconds"] == 4
    assert afterwards["sessions_opened"]["logins"] >= metrics["sessions_opened_during_run"]["logins"] + 1
    assert afterwards["cpu_seconds"] >= metrics["emlisten_cpu_seconds_per_mail"] * 4


@pytest.mark.dovecot
def test_burst_scenario(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path, "burst", "--mailboxes", "2", "--mails", "20", "--plain", "--size", "2000", *FAST
    )
    metrics = result["metrics"]
    assert metrics["delivered"] == 20
    assert metrics["lost"] == 0 and metrics["duplicated"] == 0
    assert metrics["drain_rate_per_second"] > 0
    assert result["params"]["topology"] == "all"
    assert set(metrics["emlisten_cpu_seconds_during_drain_per_process"]) == {"emlisten"}


@pytest.mark.dovecot
@pytest.mark.redis
@pytest.mark.rabbitmq
def test_burst_scenario_primary_and_secondary(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path,
        "burst",
        "--cluster",
        "--mailboxes",
        "2",
        "--mails",
        "20",
        "--plain",
        "--size",
        "2000",
        *FAST,
        timeout=120,
    )
    assert result["params"]["topology"] == "primary+secondary"
    metrics = result["metrics"]
    assert metrics["delivered"] == 20
    assert metrics["lost"] == 0 and metrics["duplicated"] == 0
    assert metrics["drain_rate_per_second"] > 0
    assert metrics["callbacks"] >= 1 and metrics["emails_per_callback"] > 0
    # Both processes were frozen and measured; the run's Redis keys and queues are gone.
    assert set(metrics["emlisten_cpu_seconds_during_drain_per_process"]) == {"p1", "s1"}
    assert metrics["lease_holders_after"] == {"p1": 2}
    clean_up = metrics["clean_up"]
    assert clean_up["redis_keys_deleted"] > 0 and clean_up["redis_keys_left"] == 0
    assert len(clean_up["queues_deleted"]) == 2
    assert "guest:guest" not in json.dumps(result)


@pytest.mark.dovecot
@pytest.mark.redis
@pytest.mark.rabbitmq
def test_failover_scenario(tmp_path: Path) -> None:
    # A short lease so the run takes seconds; `python -m bench failover` uses production's 6 s.
    result = run_bench(
        tmp_path,
        "failover",
        "--mailboxes",
        "30",
        "--primaries",
        "3",
        "--secondaries",
        "1",
        "--lease-ttl",
        "2",
        "--duplicate-grace",
        "0.5",
        "--hibernate-timeout",
        "none",
        timeout=240,
    )
    metrics = result["metrics"]
    assert sorted(metrics["spread_before_kill"].values()) == [10, 10, 10]
    assert metrics["killed_node"] == "p3" and metrics["killed_node_mailboxes"] == 10
    assert metrics["failover_seconds"] > 0
    assert set(metrics["new_owners"]) <= {"p1", "p2"} and sum(metrics["new_owners"].values()) == 10
    assert metrics["mails_appended"] == 10
    assert metrics["delivered"] == 10 and metrics["lost"] == 0 and metrics["duplicated"] == 0
    assert result["params"]["lease_ttl_s"] == 2 and result["params"]["lease_renew_s"] == pytest.approx(0.667)
    # The run's Redis keys and queues are gone, and no password was written out.
    clean_up = metrics["clean_up"]
    assert clean_up["redis_keys_deleted"] > 0 and clean_up["redis_keys_left"] == 0
    assert len(clean_up["queues_deleted"]) == 2
    assert "guest:guest" not in json.dumps(result)


def test_failover_fair_share_and_takeover_rules() -> None:
    assert fair_share_bounds(1000, 3) == (332, 334)
    assert fair_share_bounds(30, 3) == (10, 10)
    killed_at = 1000.0
    items: list[dict[str, Any]] = [
        {"id": "a", "state": "listening", "node": "p1", "updated_at": 10.0},  # a survivor's own
        {"id": "b", "state": "listening", "node": "p2", "updated_at": 999.0},  # stale: dead node's status
        {"id": "c", "state": "listening", "node": "p2", "updated_at": 1001.0},  # taken over
        {"id": "d", "state": "listening", "node": None, "updated_at": 1001.0},  # lease free
        {"id": "e", "state": "connecting", "node": "p1", "updated_at": 1002.0},
        {"id": "f", "state": "listening", "node": "p3", "updated_at": 1003.0},  # still the dead one's
    ]
    assert taken_over(items, "p3", {"b", "c", "d", "e", "f"}, killed_at) == {"a", "c"}
    assert listening_owners(items) == {"a": "p1", "b": "p2", "c": "p2", "f": "p3"}


def test_urls_are_redacted() -> None:
    assert redact_url("amqp://guest:secret@127.0.0.1:5672/") == "amqp://guest:***@127.0.0.1:5672/"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("redis://:pw@redis:6379/1") == "redis://:***@redis:6379/1"


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


@pytest.mark.dovecot
def test_backlog_scenario(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path,
        "backlog",
        "--mailboxes",
        "3",
        "--mails-per-mailbox",
        "2",
        "--plain",
        "--size",
        "2000",
        *FAST,
    )
    metrics = result["metrics"]
    assert (metrics["delivered"], metrics["lost"], metrics["duplicated"]) == (6, 0, 0)
    assert metrics["drain_rate_per_second"] > 0
    assert "sessions_opened_during_drain" in metrics
    # The server's floor, measured by the bare client on the same mailboxes: every mail fetched.
    assert metrics["floor"]["fetched"] == 6 and metrics["floor"]["drain_rate_per_second"] > 0


@pytest.mark.dovecot
def test_pause_scenario(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path,
        "pause",
        *("--mailboxes", "2", "--plain", "--pause-seconds", "1"),
        *("--env", "EMLISTEN_RECHECK_LATE_SECONDS=0.5"),
        *FAST,
    )
    (pause,) = result["metrics"]["pauses"]
    assert pause["pause_seconds"] == 1
    # The looks after the first IDLEs were over before the freeze, so they are not counted as
    # sessions the pause re-opened.
    assert pause["looks_settled_before"]["settled"]
    assert pause["looks_during"] == 0
    assert pause["mail_connections_survived"] == pause["mail_connections_before"] == 2


@pytest.mark.dovecot
def test_cold_start_scenario(tmp_path: Path) -> None:
    result = run_bench(tmp_path, "cold-start", "--mailboxes", "3", "--plain", *FAST)
    metrics = result["metrics"]
    assert metrics["cold_start_seconds"] > 0 and metrics["bare_client_cold_start_seconds"] > 0
    assert metrics["mail_connections_when_listening"] == 3


@pytest.mark.dovecot
def test_follow_up_scenario(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path, "follow-up", "--mailboxes", "2", "--plain", "--gap-min", "0.1", "--gap-max", "0.2", *FAST
    )
    metrics = result["metrics"]
    assert (metrics["delivered"], metrics["not_delivered"], metrics["duplicated"]) == (4, 0, 0)
    assert metrics["second_mail_ms"]


@pytest.mark.dovecot
def test_random_traffic_scenario(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path,
        "random-traffic",
        "--mailboxes",
        "2",
        "--plain",
        "--minutes",
        "0.05",
        "--interval",
        "0.5",
        *FAST,
    )
    metrics = result["metrics"]
    assert metrics["mails"] >= 4 and metrics["duplicated"] == 0 and metrics["complete"] is True


def test_results_written_in_the_same_second_keep_both(tmp_path: Path) -> None:
    """Two benches side by side (both topologies of random-traffic) may end in the same second:
    neither result may overwrite the other."""
    written = [
        write_results(Result("random-traffic", {"topology": topology}), tmp_path)
        for topology in ("all", "primary+secondary", "all")
    ]
    assert len({json_path for json_path, _ in written}) == 3
    assert [json.loads(json_path.read_text())["params"]["topology"] for json_path, _ in written] == [
        "all",
        "primary+secondary",
        "all",
    ]
