"""Fixtures for the EWS tests: the EWS simulator on a free port, fast timings, mailbox configs."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from emlisten.api.credentials import parse_credentials
from emlisten.mail.ews import EwsSource
from emlisten.models import MailboxConfig
from tests.servers.ews import EwsAccount, EwsSimulator, running_ews_simulator


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
