"""What the test HTTP servers (Creatio stand-in, EWS and Graph simulators) share: hypercorn on
the test's Trio loop, and the ASGI chores of a raw app."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def server_config(host: str, port: int = 0, *, loglevel: str = "WARNING") -> Config:
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.loglevel = loglevel
    config.graceful_timeout = 0.1
    return config


async def serve_app(app: Any, config: Config, *, task_status: trio.TaskStatus[int]) -> None:
    """Serve ``app`` until cancelled; ``started(port)`` once the socket listens."""
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(_serve, app, config)
        task_status.started(urlsplit(binds[0]).port or 0)


async def _serve(app: Any, config: Config, *, task_status: trio.TaskStatus[list[str]]) -> None:
    await serve(app, config, task_status=task_status)


async def lifespan_or_other(scope: Scope, receive: Receive, send: Send) -> bool:
    """Answer ASGI lifespan messages; True when ``scope`` is not an HTTP request (done with it)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return True
    return bool(scope["type"] != "http")


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client went away first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
