"""Smoke tests of ``python -m bench restarts`` (a single container on a data directory, restarted
while mail arrives, loses nothing and doubles nothing) and ``python -m bench sqlite-store``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.test_bench import FAST, ROOT, run_bench


@pytest.mark.dovecot
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_restarts_scenario(tmp_path: Path, stop: str) -> None:
    restarts = 2 if stop == "SIGTERM" else 1  # each start costs seconds of Python imports here
    args = ["restarts", "--mailboxes", "2", "--restarts", str(restarts), "--rate", "8", "--up", "1.5"]
    args += ["--down", "0.5", "--plain", "--quiet-seconds", "1", *FAST]
    if stop == "SIGKILL":
        args.append("--kill")
    result = run_bench(tmp_path, *args, timeout=150)
    metrics = result["metrics"]
    assert len(metrics["restarts"]) == restarts
    assert metrics["appended_while_down"] > 0  # mail did arrive while the process was down
    assert metrics["lost"] == 0 and metrics["delivered"] == metrics["appended"]
    if stop == "SIGTERM":
        assert metrics["duplicated"] == 0
    assert all(r["store_load_seconds"] >= 0 for r in metrics["restarts"])  # the data directory was read
    assert result["params"]["stop"] == stop


def test_sqlite_store_scenario(tmp_path: Path) -> None:
    args = ["sqlite-store", "--mailboxes", "200", "--advances", "200", "--concurrency", "10"]
    completed = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--results-dir", str(tmp_path), "--dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    (found,) = tmp_path.glob("sqlite-store-*.json")
    metrics = json.loads(found.read_text())["metrics"]
    for figure in (
        "advances_per_second_sequential_normal",
        "advances_per_second_sequential_full",
        "advances_per_second_concurrent",
        "process_start_to_api_seconds",
    ):
        assert metrics[figure] > 0, figure
    # 10 mailboxes advancing at once shared commits (group commit), fewer than one per advance.
    assert metrics["commits_for_concurrent_advances"] < 200
    assert metrics["process_store_load_seconds"] is not None  # the process read the 200 mailboxes
