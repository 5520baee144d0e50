"""Mail servers the mailbox-level suite runs against, one class per protocol.

A backend makes accounts on its server (Dovecot for IMAP; the EWS and Graph simulators for
Exchange), makes new mail arrive in them, cuts the service's connections, and writes the
``SynchronizationCredentials`` Creatio would send for them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot, MailUser


@dataclass
class Account:
    name: str
    password: str
    email: str
    handle: Any = None  # backend-specific


class MailServerBackend(Protocol):
    name: str

    async def new_account(self) -> Account: ...

    async def deliver(self, account: Account, message: bytes) -> None:
        """Make a new message arrive in the account's inbox (as an MTA would)."""

    async def cut_connections(self, account: Account) -> None:
        """Drop the service's live subscription(s) for this account, server side."""

    def credentials(self, account: Account, creatio: CreatioStandIn, **fields: Any) -> dict[str, Any]: ...


class ImapBackend:
    name = "imap"

    def __init__(self, dovecot: Dovecot) -> None:
        self.dovecot = dovecot

    async def new_account(self) -> Account:
        user = self.dovecot.add_user()
        return Account(user.name, user.password, user.email, handle=user)

    async def deliver(self, account: Account, message: bytes) -> None:
        user: MailUser = account.handle
        await self.dovecot.aappend(user, message)

    async def cut_connections(self, account: Account) -> None:
        await self.dovecot.akick(account.handle)

    def credentials(self, account: Account, creatio: CreatioStandIn, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "Id": str(uuid.uuid4()),
            "UserName": account.name,
            "Password": account.password,
            "SenderEmailAddress": account.email,
            "ServiceUrl": self.dovecot.host,
            "Port": self.dovecot.imaps_port,
            "UseSsl": True,
            "BpmEndpoint": creatio.endpoint(),
            "BpmUser": "Supervisor",
        }
        body.update(fields)
        return body
