"""Smoke test of ``python -m bench exchange-history`` with a handful of messages, so the scenario
cannot rot. The figures are not checked, only that the run produced them and found no loss."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_exchange_history_scenario(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "exchange-history",
            "--messages",
            "60",
            "--live-rate",
            "20",
            "--results-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    (json_file,) = tmp_path.glob("exchange-history-*.json")
    (md_file,) = tmp_path.glob("exchange-history-*.md")
    result = json.loads(json_file.read_text())
    metrics = result["metrics"]
    assert metrics["history_delivered"] == 60 and metrics["old_missing"] == 0
    assert metrics["duplicate_email_ids"] == 0 and metrics["live_missing"] == 0
    assert metrics["mails_per_second"] > 0
    assert "| figure | value | target | met |" in md_file.read_text()
    assert "== exchange-history ==" in completed.stdout
