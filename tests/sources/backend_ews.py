"""The EWS backend of the mailbox-level suite: accounts on the EWS simulator."""

from __future__ import annotations

import uuid
from typing import Any

from tests.servers.creatio import CreatioStandIn
from tests.servers.ews import EwsAccount, EwsSimulator
from tests.sources.backends import Account


class EwsBackend:
    name = "ews"

    def __init__(self, simulator: EwsSimulator) -> None:
        self.simulator = simulator

    async def new_account(self) -> Account:
        account = self.simulator.add_account()
        return Account(account.user, account.password, account.address, handle=account)

    async def deliver(self, account: Account, message: bytes) -> None:
        self.simulator.add_message(account.email, message)

    async def cut_connections(self, account: Account) -> None:
        handle: EwsAccount = account.handle
        # Wait for the live stream first, so there is something to cut.
        await self.simulator.wait_until(lambda: self.simulator.open_streams(handle.address), what="a stream")
        self.simulator.drop_streams(handle.address)

    def credentials(self, account: Account, creatio: CreatioStandIn, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "Id": str(uuid.uuid4()),
            "UserName": account.name,
            "Password": account.password,
            "SenderEmailAddress": account.email,
            "ServiceUrl": self.simulator.url,  # an http(s) URL: the EWS protocol
            "BpmEndpoint": creatio.endpoint(),
            "BpmUser": "Supervisor",
        }
        body.update(fields)
        return body
