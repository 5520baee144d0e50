"""Fixtures for the sender tests: the asyncio bridge and real SMTP servers (aiosmtpd)."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, ParamSpec

import pytest

from emlisten._bridge import open_asyncio_bridge
from emlisten.models import MailboxConfig, Security, ServerEndpoint
from tests.servers.dovecot import Dovecot, MailUser
from tests.servers.smtp import SmtpServer

MakeSmtpServer = Callable[..., SmtpServer]
P = ParamSpec("P")

_SECURITY = {"plain": Security.NONE, "starttls": Security.STARTTLS, "tls": Security.SSL_ON_CONNECT}


def with_bridge(test: Callable[P, Awaitable[None]]) -> Callable[P, Awaitable[None]]:
    """Run an async test inside the trio-asyncio loop (a fixture cannot: trio-asyncio finds its
    loop through a context variable, which does not flow from fixtures into the test)."""

    @functools.wraps(test)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        async with open_asyncio_bridge():
            await test(*args, **kwargs)

    return wrapper


@pytest.fixture
def make_smtp_server() -> Iterator[MakeSmtpServer]:
    """``make_smtp_server(mode="plain", users={...}, rejected=..., size_limit=...)``: started."""
    servers: list[SmtpServer] = []

    def make(**kwargs: Any) -> SmtpServer:
        server = SmtpServer(**kwargs)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def mailbox_for(
    user: MailUser,
    dovecot: Dovecot,
    server: SmtpServer | None,
    *,
    password: str | None = None,
    **changes: Any,
) -> MailboxConfig:
    """A mailbox whose IMAP side is the test Dovecot (plain port) and SMTP side ``server``."""
    endpoint = (
        ServerEndpoint(server.host, server.port, _SECURITY[server.mode]) if server is not None else None
    )
    config = MailboxConfig(
        id=str(uuid.uuid4()),
        user_name=user.name,
        imap=ServerEndpoint(dovecot.host, dovecot.imap_port, Security.NONE),
        bpm_endpoint="http://127.0.0.1/unused",
        password=user.password if password is None else password,
        sender_email=user.email,
        smtp=endpoint,
    )
    return config.replace(**changes) if changes else config
