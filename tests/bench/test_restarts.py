"""Smoke test of ``python -m bench restarts``: a single container on a data directory, restarted
while mail arrives, loses nothing and doubles nothing (the 10-restart figures are in bench/results)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.test_bench import FAST, run_bench


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
