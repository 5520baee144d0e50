"""Fixtures for the EWS tests: the EWS simulator on a free port, fast timings, mailbox configs."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio

from emlisten.api.credentials import parse_credentials
from emlisten.mail.ews import EwsSource
from emlisten.models import MailboxConfig, MailboxState
from emlisten.service.node import build_local_adapters, run_node
from tests.servers.creatio import CreatioStandIn
from tests.servers.ews import EwsAccount, EwsSimulator, running_ews_simulator
from tests.service.conftest import fast_settings


@pytest.fixture
async def ews() -> AsyncIterator[EwsSimulator]:
    """A simulator whose "minute" lasts 0.4 s and that sends a keep-alive every 0.1 s."""
    async with running_ews_simulator(minute_seconds=0.4, keepalive_seconds=0.1) as simulator:
        yield simulator


@pytest.fixture
def source() -> EwsSource:
    return EwsSource(
        connection_timeout_minutes=1, stream_idle_timeout=5, request_timeout=10, default_back_off=0.05
    )


def ews_credentials(simulator: EwsSimulator, account: EwsAccount, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "Id": str(uuid.uuid4()),
        "UserName": account.user,
        "Password": account.password,
        "SenderEmailAddress": account.address,
        "ServiceUrl": simulator.url,
        "BpmEndpoint": "http://127.0.0.1:9/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail",
        "FolderIds": [],
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


def ews_mailbox(simulator: EwsSimulator, account: EwsAccount, **fields: Any) -> MailboxConfig:
    return parse_credentials(ews_credentials(simulator, account, **fields))


@dataclass
class Node:
    http: httpx.AsyncClient
    shutdown: trio.Event
    stopped: trio.Event
    adapters: Any


@pytest.fixture
def node_settings() -> dict[str, Any]:
    """Setting changes of the ``node`` fixture (a test module overrides this fixture)."""
    return {}


@pytest.fixture
async def node(creatio: CreatioStandIn, node_settings: dict[str, Any]) -> AsyncIterator[Node]:
    """A node (API, supervisor, worker) in a nursery of its own: the test sees it stop."""
    settings = fast_settings(None, **node_settings)
    adapters = build_local_adapters(settings)
    shutdown, stopped = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        try:
            await run_node(
                settings, adapters, handle_signals=False, shutdown=shutdown, task_status=task_status
            )
        finally:
            stopped.set()

    async with trio.open_nursery() as inner:
        port = await inner.start(run)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield Node(http, shutdown, stopped, adapters)
        shutdown.set()


async def wait_listening(adapters: Any, mailbox_id: str) -> None:
    with trio.fail_after(15):
        while True:
            status = (await adapters.store.get_statuses([mailbox_id]))[mailbox_id]
            if status is not None and status.state is MailboxState.LISTENING:
                return
            await trio.sleep(0.01)
