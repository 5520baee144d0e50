"""A lone node frozen (SIGSTOP) past its lease TTL keeps its sessions: on resume it re-takes the
leases nobody took, reopens nothing, reports nothing lost, and still delivers once. With the
in-memory store (the reported case) and with Redis (lease expiry by the Redis clock)."""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.cluster.nodes import NodeProcess
from tests.contract.backends import REDIS_URL, delete_redis_keys
from tests.secret_scan import scan_text
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot, make_message

TTL = 1.0
RENEW = 0.3
PAUSE = 3 * TTL

_AUTH_COMMANDS = {"LOGIN", "AUTHENTICATE"}


def _env(dovecot: Dovecot, redis_prefix: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMLISTEN_")}
    if redis_prefix is not None:
        env.update(
            {
                "EMLISTEN_REDIS_URL": REDIS_URL,
                "EMLISTEN_REDIS_PREFIX": redis_prefix,
                "EMLISTEN_SECRET_KEY": "cluster-test-key",
            }
        )
    env.update(
        {
            "EMLISTEN_NODE_ID": f"paused-{uuid.uuid4().hex[:8]}",
            "EMLISTEN_ROLE": "all",
            "EMLISTEN_TLS_CA_FILE": str(dovecot.ca_file),
            "EMLISTEN_LEASE_TTL_SECONDS": str(TTL),
            "EMLISTEN_LEASE_RENEW_SECONDS": str(RENEW),
            "EMLISTEN_RECONNECT_BASE_SECONDS": "0.05",
            "EMLISTEN_RECONNECT_CAP_SECONDS": "0.5",
            "EMLISTEN_SHUTDOWN_GRACE_SECONDS": "2",
            "EMLISTEN_LOG_LEVEL": "INFO",
        }
    )
    return env


async def _eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30) -> None:
    with trio.move_on_after(timeout):
        while not await check():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out after {timeout}s waiting until {what}")


async def _logins(node: NodeProcess) -> int:
    """IMAP LOGIN/AUTHENTICATE commands the node has sent, from its /metrics."""
    async with httpx.AsyncClient(base_url=node.url, timeout=10) as http:
        text = (await http.get("/metrics")).text
    total = 0.0
    for match in re.finditer(r"^emlisten_imap_commands_total\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if labels.get("command") in _AUTH_COMMANDS:
            total += float(match.group(2))
    return int(total)


@pytest.mark.parametrize("store", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_a_node_paused_past_the_lease_ttl_keeps_its_sessions(
    store: str, dovecot: Dovecot, creatio: CreatioStandIn, tmp_path: Path
) -> None:
    prefix = f"emlisten-test:{uuid.uuid4().hex}:" if store == "redis" else None
    node = NodeProcess("paused", "all", _env(dovecot, prefix), tmp_path / "paused.log")
    await trio.to_thread.run_sync(node.start)
    try:
        users = [dovecot.add_user() for _ in range(3)]
        creds: list[dict[str, Any]] = [
            {
                "Id": str(uuid.uuid4()),
                "UserName": user.name,
                "Password": user.password,
                "SenderEmailAddress": user.email,
                "ServiceUrl": dovecot.host,
                "Port": dovecot.imaps_port,
                "UseSsl": True,
                "BpmEndpoint": creatio.endpoint(),
            }
            for user in users
        ]
        ids = [c["Id"] for c in creds]
        response = await node.post("/api/listeners/create", creds)
        assert response.status_code == 200, response.text

        async def all_listening() -> bool:
            body = await node.get("/v1/mailboxes")
            return sorted(m["id"] for m in body["mailboxes"] if m["state"] == "listening") == sorted(ids)

        await _eventually(all_listening, "the 3 mailboxes listen")
        logins_before = await _logins(node)
        assert logins_before >= len(ids)

        assert node.process is not None
        node.process.send_signal(signal.SIGSTOP)
        try:
            await trio.sleep(PAUSE)  # the genuine requirement: frozen past the lease TTL
        finally:
            node.process.send_signal(signal.SIGCONT)
        resumed_at = time.time()

        async def renewed_after_resume() -> bool:
            # A heartbeat written a few renewal rounds after the resume: renewal and balancing
            # have both run since (the heartbeat follows the lease renewal in each round).
            nodes = (await node.get("/v1/nodes"))["nodes"]
            return any(time.time() - n["heartbeat_age_seconds"] >= resumed_at + 3 * RENEW for n in nodes)

        await _eventually(renewed_after_resume, "the node renewed after the resume", timeout=10)
        assert await _logins(node) == logins_before, node.log_text()[-3000:]
        assert await all_listening()
        log = node.log_text()
        assert not re.search(r"lost \d+ lease", log), log[-3000:]
        assert "stopped listening" not in log
        assert "lost contact with the store" not in log

        # Mail that arrives after the resume is delivered, once.
        await dovecot.aappend(users[0], make_message(subject="after the pause"))
        emails = await creatio.wait_for_emails(ids[0], 1, timeout=30)
        assert [e["Subject"] for e in emails] == ["after the pause"]

        async def checkpointed() -> bool:
            body = await node.get("/v1/mailboxes")
            return any(m["id"] == ids[0] and m["delivered"] == 1 for m in body["mailboxes"])

        await _eventually(checkpointed, "the delivery is checkpointed")
        assert [e["Subject"] for e in creatio.emails_for(ids[0])] == ["after the pause"]
        assert node.alive
    finally:
        await trio.to_thread.run_sync(node.kill)
        scan_text(node.log_text())
        if prefix is not None:
            from emlisten._bridge import open_asyncio_bridge

            async with open_asyncio_bridge():
                await delete_redis_keys(prefix)
