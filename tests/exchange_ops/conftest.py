"""One emlisten node talking to both Exchange simulators (EWS and Graph) and the Creatio stand-in.

The node is the Graph tests' node (``tests.graph.conftest.start_graph_service``); its EWS source is
the node's own, which reaches the EWS simulator through the mailbox's ``ServiceUrl``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from tests.graph.conftest import GraphService, start_graph_service
from tests.secret_scan import register_secret
from tests.servers.creatio import CreatioStandIn
from tests.servers.ews import EwsAccount, EwsSimulator, running_ews_simulator
from tests.servers.graph import GraphSimulator


@pytest.fixture
async def ews_sim() -> AsyncIterator[EwsSimulator]:
    async with running_ews_simulator(minute_seconds=0.4, keepalive_seconds=0.1) as simulator:
        yield simulator


@pytest.fixture
async def graph_sim(nursery: trio.Nursery) -> AsyncIterator[GraphSimulator]:
    simulator = GraphSimulator()
    await nursery.start(simulator.serve)
    yield simulator


@pytest.fixture
async def node(
    nursery: trio.Nursery, graph_sim: GraphSimulator, ews_sim: EwsSimulator, creatio: CreatioStandIn
) -> AsyncIterator[GraphService]:
    service = await start_graph_service(nursery, graph_sim, creatio)
    try:
        yield service
    finally:
        await service.aclose()


def ews_account(simulator: EwsSimulator) -> EwsAccount:
    account = simulator.add_account()
    register_secret(account.password)
    return account


def ews_credentials(
    simulator: EwsSimulator, account: EwsAccount, creatio: CreatioStandIn, **fields: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "Id": str(uuid.uuid4()),
        "UserName": account.user,
        "Password": account.password,
        "SenderEmailAddress": account.address,
        "ServiceUrl": simulator.url,
        "BpmEndpoint": creatio.endpoint(),
        "BpmUser": "Supervisor",
        "FolderIds": [],
    }
    body.update(fields)
    return body


def graph_account(simulator: GraphSimulator) -> tuple[str, str]:
    address, token = simulator.add_user()
    register_secret(token)
    return address, token


def graph_credentials(
    simulator: GraphSimulator, address: str, token: str, creatio: CreatioStandIn, **fields: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "Id": str(uuid.uuid4()),
        "UserName": address,
        "UseOAuth": True,
        "AccessToken": token,
        "SenderEmailAddress": address,
        "Protocol": "graph",
        "ServiceUrl": simulator.base_url,
        "BpmEndpoint": creatio.endpoint(),
        "BpmUser": "Supervisor",
        "FolderIds": [],
    }
    body.update(fields)
    return body
