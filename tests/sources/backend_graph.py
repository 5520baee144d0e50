"""The Microsoft Graph backend of the mailbox-level suite: mailboxes on the Graph simulator."""

from __future__ import annotations

import uuid
from typing import Any

from tests.secret_scan import register_secret
from tests.servers.creatio import CreatioStandIn
from tests.servers.graph import GraphSimulator
from tests.sources.backends import Account


class GraphBackend:
    name = "graph"

    def __init__(self, simulator: GraphSimulator) -> None:
        self.simulator = simulator

    async def new_account(self) -> Account:
        address, token = self.simulator.add_user()
        register_secret(token)
        return Account(address, "", address, handle=token)

    async def deliver(self, account: Account, message: bytes) -> None:
        self.simulator.add_message(account.email, message)

    async def cut_connections(self, account: Account) -> None:
        """Graph has no connection to cut: the subscription goes away server side, and Graph
        says so with a ``subscriptionRemoved`` lifecycle notification."""
        simulator = self.simulator
        await simulator.wait_until(lambda: bool(simulator.subscriptions_of(account.email)))
        for subscription in simulator.subscriptions_of(account.email):
            simulator.remove_subscription(subscription.id)

    def credentials(self, account: Account, creatio: CreatioStandIn, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "Id": str(uuid.uuid4()),
            "UserName": account.name,
            "UseOAuth": True,
            "AccessToken": account.handle,
            "SenderEmailAddress": account.email,
            "Protocol": "graph",
            "ServiceUrl": self.simulator.base_url,
            "BpmEndpoint": creatio.endpoint(),
            "BpmUser": "Supervisor",
        }
        body.update(fields)
        return body
