"""Smoke tests of the webhook benchmarks (python -m bench webhook-latency / webhook-outage) with a
handful of mailboxes and a few seconds of outage, so the scenarios cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.test_bench import FAST, run_bench


@pytest.mark.dovecot
def test_webhook_latency_scenario(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path, "webhook-latency", "--mailboxes", "2", "--mails", "3", "--spacing", "0.05", *FAST
    )
    metrics = result["metrics"]
    assert metrics["webhook_ms"]["count"] == 3 and metrics["creatio_ms"]["count"] == 3


@pytest.mark.dovecot
def test_webhook_outage_scenario(tmp_path: Path) -> None:
    schedule = ",".join(["0.3"] * 20)
    result = run_bench(
        tmp_path,
        "webhook-outage",
        *("--mailboxes", "2", "--others", "1", "--mails", "8", "--outage", "2", "--other-spacing", "0.5"),
        *FAST,
        *("--env", f"EMLISTEN_WEBHOOK_RETRY_SCHEDULE={schedule}"),
    )
    metrics = result["metrics"]
    assert (metrics["a_delivered"], metrics["a_lost"], metrics["a_duplicated_event_ids"]) == (8, 0, 0)
    assert metrics["a_out_of_order"] == 0 and metrics["dead_letters"] == 0
    assert metrics["b_mails_during_outage"] >= 2
