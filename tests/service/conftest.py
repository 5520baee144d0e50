"""A whole emlisten node (role=all, in-memory store, in-process queue) in the test's Trio loop,
talking to the real private Dovecot and to the real Creatio stand-in over HTTP."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio

from emlisten.config import Settings
from emlisten.models import MailboxState
from emlisten.service.node import Adapters, build_local_adapters, run_node
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot, MailUser


def fast_settings(dovecot: Dovecot | None, **changes: Any) -> Settings:
    """Production defaults, except the waits, shortened so failures are retried within a test."""

    return Settings(
        host="127.0.0.1",
        port=0,
        node_id="test-node",
        tls_ca_file=str(dovecot.ca_file) if dovecot is not None else None,
        reconnect_base_seconds=0.05,
        reconnect_cap_seconds=0.5,
        auth_retry_base_seconds=0.2,
        auth_retry_cap_seconds=1.0,
        delivery_retry_base_seconds=0.05,
        delivery_retry_cap_seconds=0.3,
        shutdown_grace_seconds=2.0,
    ).replace(**changes)


@dataclass
class RunningService:
    url: str
    http: httpx.AsyncClient
    adapters: Adapters
    dovecot: Dovecot
    creatio: CreatioStandIn

    def credentials(self, user: MailUser, *, security: str = "tls", **fields: Any) -> dict[str, Any]:
        ports = {
            "tls": self.dovecot.imaps_port,
            "starttls": self.dovecot.imap_port,
            "plain": self.dovecot.imap_port,
        }
        body: dict[str, Any] = {
            "Id": str(uuid.uuid4()),
            "UserName": user.name,
            "Password": user.password,
            "SenderEmailAddress": user.email,
            "ServiceUrl": self.dovecot.host,
            "Port": ports[security],
            "UseSsl": security != "plain",
            "SecureOption": {"tls": 2, "starttls": 3, "plain": 0}[security],
            "BpmEndpoint": self.creatio.endpoint(),
            "BpmUser": "Supervisor",
            "BpmUserWorkspace": "Default",
            "BpmUserTimeZone": "UTC",
            "FolderIds": [],
            "UseFullEmail": True,
        }
        body.update(fields)
        return body

    async def create(self, *credentials: dict[str, Any], path: str = "create") -> httpx.Response:
        return await self.http.post(f"/api/listeners/{path}", json=list(credentials))

    async def state_of(self, mailbox_id: str) -> MailboxState | None:
        status = (await self.adapters.store.get_statuses([mailbox_id]))[mailbox_id]
        return status.state if status else None

    async def wait_state(self, mailbox_id: str, state: MailboxState, timeout: float = 15) -> None:
        # The store has no change feed for states, so poll it briefly (this is a test helper).
        with trio.fail_after(timeout):
            while await self.state_of(mailbox_id) is not state:
                await trio.sleep(0.01)

    async def subscription_states(self, *ids: str) -> dict[str, str]:
        response = await self.http.post("/api/listeners/subscriptionsstate", json=list(ids))
        response.raise_for_status()
        return {k: v["State"] for k, v in response.json().items()}


@asynccontextmanager
async def running_service(
    dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery, **changes: Any
) -> AsyncIterator[RunningService]:
    settings = fast_settings(dovecot, **changes)
    adapters = build_local_adapters(settings)
    shutdown = trio.Event()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        await run_node(settings, adapters, handle_signals=False, shutdown=shutdown, task_status=task_status)

    port = await nursery.start(run)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            yield RunningService(url, http, adapters, dovecot, creatio)
    finally:
        shutdown.set()


@pytest.fixture
async def service(
    dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery
) -> AsyncIterator[RunningService]:
    async with running_service(dovecot, creatio, nursery) as running:
        yield running


@pytest.fixture
async def private_service(
    private_dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery
) -> AsyncIterator[RunningService]:
    """The service on a Dovecot of the test's own, which the test may stop and restart."""
    async with running_service(private_dovecot, creatio, nursery) as running:
        yield running
