"""`emlisten status` against a running service: counts, exit codes, JSON, the table."""

from __future__ import annotations

import json
import subprocess
import sys

import trio

from emlisten.models import MailboxState
from tests.servers.dovecot import free_port
from tests.service.conftest import RunningService


async def status(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "emlisten", "status", *args]
    # In a thread: the service under test runs in this event loop and must keep answering.
    return await trio.to_thread.run_sync(
        lambda: subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    )


async def test_status_reports_counts_and_exit_codes(service: RunningService, make_mail_user: object) -> None:
    good = make_mail_user()  # type: ignore[operator]
    bad = make_mail_user()  # type: ignore[operator]
    c_good, c_bad = service.credentials(good), service.credentials(bad, Password="wrong-password")
    assert (await service.create(c_good, c_bad)).status_code == 200
    await service.wait_state(c_good["Id"], MailboxState.LISTENING)
    await service.wait_state(c_bad["Id"], MailboxState.AUTHENTICATION_ERROR)

    degraded = await status("--url", service.url, "--json")
    assert degraded.returncode == 1, degraded.stderr
    body = json.loads(degraded.stdout)
    assert body["summary"] == {
        "nodes": 1,
        "mailboxes": 2,
        "listening": 1,
        "failing": 1,
        "starting": 0,
        "delivered": 0,
    }
    assert {m["state"] for m in body["mailboxes"]} == {"listening", "authenticationError"}

    table = await status("--url", service.url)
    assert table.returncode == 1
    assert bad.email in table.stdout and "authenticationError" in table.stdout
    assert "1 listening" in table.stdout and "1 failing" in table.stdout
    assert "wrong-password" not in table.stdout + degraded.stdout

    assert (await service.http.post("/api/listeners/close", json=[c_bad["Id"]])).status_code == 200
    healthy = await status("--url", service.url, "--json")
    assert healthy.returncode == 0
    assert json.loads(healthy.stdout)["summary"]["failing"] == 0


async def test_status_of_an_unreachable_node_exits_2() -> None:
    result = await status("--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "cannot read" in result.stderr
