"""A Graph simulator and a whole emlisten node (role=all, in-memory) talking to it over HTTP."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio

from emlisten.config import Settings
from emlisten.mail.graph import AppCredentials, GraphSettings, GraphSource, graph_sources
from emlisten.models import MailboxConfig, MailboxState, Security, ServerEndpoint
from emlisten.service.listeners import StoreListenerControl
from emlisten.service.node import Adapters, build_local_adapters, run_node
from tests.secret_scan import register_secret
from tests.servers.creatio import CreatioStandIn
from tests.servers.graph import GraphSimulator
from tests.service.conftest import fast_settings


@pytest.fixture
async def graph_sim(nursery: trio.Nursery) -> AsyncIterator[GraphSimulator]:
    sim = GraphSimulator()
    await nursery.start(sim.serve)
    yield sim


def graph_test_settings(**changes: Any) -> Settings:
    return fast_settings(None, node_id=f"graph-test-{uuid.uuid4().hex[:8]}").replace(**changes)


@dataclass
class GraphService:
    http: httpx.AsyncClient
    adapters: Adapters
    control: StoreListenerControl
    sim: GraphSimulator
    creatio: CreatioStandIn
    source: GraphSource
    shutdown: trio.Event
    stopped: trio.Event

    async def aclose(self) -> None:
        """Stop the node while the simulator still runs (so its subscriptions get deleted)."""
        await self.http.aclose()
        self.shutdown.set()
        with trio.fail_after(10):
            await self.stopped.wait()

    def account(self) -> tuple[str, str]:
        address, token = self.sim.add_user()
        register_secret(token)
        return address, token

    def mailbox(self, address: str, token: str, **changes: Any) -> MailboxConfig:
        return MailboxConfig(
            id=str(uuid.uuid4()),
            user_name=address,
            imap=ServerEndpoint("127.0.0.1", self.sim.port, Security.NONE),
            bpm_endpoint=self.creatio.endpoint(),
            access_token=token,
            use_oauth=True,
            sender_email=address,
            bpm_user="Supervisor",
            protocol="graph",
            service_url=self.sim.base_url,
        ).replace(**changes)

    async def create(self, mailbox: MailboxConfig, *, wait: bool = True) -> MailboxConfig:
        await self.control.create([mailbox])
        if wait:
            await self.wait_state(mailbox.id, MailboxState.LISTENING)
        return mailbox

    async def wait_state(self, mailbox_id: str, state: MailboxState, timeout: float = 10.0) -> None:
        store = self.adapters.store
        with trio.fail_after(timeout):
            while True:
                status = (await store.get_statuses([mailbox_id]))[mailbox_id]
                if status is not None and status.state is state:
                    return
                await trio.sleep(0.02)


async def start_graph_service(
    nursery: trio.Nursery,
    sim: GraphSimulator,
    creatio: CreatioStandIn,
    *,
    graph_settings: GraphSettings | None = None,
    app_credentials: AppCredentials | None = None,
    source_from_settings: bool = False,
    **setting_changes: Any,
) -> GraphService:
    """``source_from_settings``: the node's own GraphSource, built from the ``EMLISTEN_*``
    settings (``setting_changes``) as in production."""
    settings = graph_test_settings(**setting_changes)
    adapters = build_local_adapters(settings)
    if source_from_settings:
        (source,) = graph_sources(adapters.source)
    else:
        source = GraphSource(
            secret_key=settings.secret_key,
            app_credentials=app_credentials,
            settings=graph_settings or GraphSettings(),
        )
        adapters.source.sources["graph"] = source  # type: ignore[attr-defined]
    shutdown, stopped = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        try:
            await run_node(
                settings, adapters, handle_signals=False, shutdown=shutdown, task_status=task_status
            )
        finally:
            stopped.set()

    port: int = await nursery.start(run)
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30)
    control = StoreListenerControl(adapters.store, adapters.queue, node_id=settings.node_id, role="all")
    return GraphService(http, adapters, control, sim, creatio, source, shutdown, stopped)


@pytest.fixture
async def graph_service(
    nursery: trio.Nursery, graph_sim: GraphSimulator, creatio: CreatioStandIn
) -> AsyncIterator[GraphService]:
    service = await start_graph_service(nursery, graph_sim, creatio)
    try:
        yield service
    finally:
        await service.aclose()
