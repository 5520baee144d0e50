"""Serve the API app with Hypercorn on Trio, shutting down gracefully when cancelled."""

from __future__ import annotations

import logging
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

__all__ = ["serve_api"]

logger = logging.getLogger(__name__)


def _port_of(bind: str) -> int:
    # Hypercorn reports binds as "http://127.0.0.1:8080" or "http://[::1]:8080".
    return int(bind.rsplit(":", 1)[1])


async def serve_api(
    app: Any,
    host: str,
    port: int,
    *,
    graceful_timeout: float = 5.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` (``0``: any free port) until cancelled.

    ``task_status.started(port)`` reports the real port once the socket listens. On cancellation
    Hypercorn stops accepting, lets in-flight requests finish for up to ``graceful_timeout``
    seconds, then the call re-raises the cancellation.
    """

    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = graceful_timeout
    config.accesslog = None  # emlisten.api.app logs each request itself
    config.errorlog = logging.getLogger("hypercorn.error")

    shutdown = trio.Event()
    # Shielded so that the caller's cancellation reaches Hypercorn only as a graceful shutdown
    # trigger; the deadline set on shutdown bounds how long that may take.
    server_scope = trio.CancelScope(shield=True)

    async with trio.open_nursery() as nursery:

        async def run_server(*, task_status: trio.TaskStatus[list[str]]) -> None:
            with server_scope:
                await serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)
            nursery.cancel_scope.cancel()  # the server stopped on its own: so do we

        try:
            binds: list[str] = await nursery.start(run_server)
            actual_port = _port_of(binds[0])
            logger.info("API listening on %s", binds[0])
            task_status.started(actual_port)
            await trio.sleep_forever()
        finally:
            shutdown.set()
            server_scope.deadline = trio.current_time() + graceful_timeout + 1.0
