"""A webhook receiver: a real HTTP server that records emlisten's signed event calls.

Runs in the test's Trio loop (Hypercorn on a loopback port). Each path is a receiver of its own
(emlisten keeps one outbox per URL). Per path the test chooses the answer (status, headers), a
gate that holds calls until opened (a slow receiver), or stops the whole server and starts it
again on the same port (a receiver that is down: connections are refused). Tests wait for calls
with events, never with sleeps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.lowlevel

from tests.servers._http import Receive, Scope, Send, lifespan_or_other, read_body, serve_app, server_config


@dataclass(frozen=True)
class WebhookCall:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    status: int  # what the receiver answered
    received_at: float  # time.time() once the body had arrived

    @property
    def event(self) -> Any:
        return json.loads(self.body)

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300


@dataclass
class Behaviour:
    """How one path answers: ``answers`` are used up in order, then ``status`` for good."""

    status: int = 204
    headers: dict[str, str] = field(default_factory=dict)
    answers: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    gate: trio.Event | None = None  # calls wait here until it is set (a slow receiver)


class WebhookReceiver:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.calls: list[WebhookCall] = []
        self.behaviours: dict[str, Behaviour] = {}
        self.in_progress: dict[str, int] = {}
        self.most_in_progress: dict[str, int] = {}
        self._changed = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    def url(self, path: str = "/hooks") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def behave(self, path: str, **changes: Any) -> Behaviour:
        behaviour = self.behaviours.setdefault(path, Behaviour())
        for name, value in changes.items():
            setattr(behaviour, name, value)
        return behaviour

    # -- serving -------------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Listen (the first time on a free port, later on the same one) until :meth:`stop`."""
        self._nursery = nursery
        self._scope = trio.CancelScope()
        self.port = await nursery.start(self._serve, self._scope)

    async def _serve(self, scope: trio.CancelScope, *, task_status: trio.TaskStatus[int]) -> None:
        with scope:
            await serve_app(self._app, server_config(self.host, self.port), task_status=task_status)

    async def stop(self) -> None:
        """Stop listening: new connections are refused until :meth:`start` again."""
        assert self._scope is not None
        self._scope.cancel()
        # Wait until the port really refuses connections.
        with trio.fail_after(10):
            while True:
                try:
                    stream = await trio.open_tcp_stream(self.host, self.port)
                except OSError:
                    return
                await stream.aclose()
                await trio.sleep(0.01)

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if await lifespan_or_other(scope, receive, send):
            return
        body = await read_body(receive)
        if body is None:
            return
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        behaviour = self.behaviours.setdefault(path, Behaviour())
        self.in_progress[path] = self.in_progress.get(path, 0) + 1
        self.most_in_progress[path] = max(self.most_in_progress.get(path, 0), self.in_progress[path])
        # Let other calls arrive before this one is answered, so concurrency shows.
        await trio.lowlevel.checkpoint()
        self._notify()
        try:
            if behaviour.gate is not None:
                await behaviour.gate.wait()
            status, extra = (
                behaviour.answers.pop(0) if behaviour.answers else (behaviour.status, behaviour.headers)
            )
            self.calls.append(WebhookCall(path, headers, body, status, time.time()))
            self._notify()
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(k.encode(), v.encode()) for k, v in extra.items()],
                }
            )
            await send({"type": "http.response.body", "body": b""})
        finally:
            self.in_progress[path] -= 1

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- reading -------------------------------------------------------------------------------

    def calls_to(self, path: str) -> list[WebhookCall]:
        return [call for call in self.calls if call.path == path]

    def accepted(self, path: str) -> list[WebhookCall]:
        return [call for call in self.calls_to(path) if call.accepted]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 15) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()

    async def wait_accepted(self, path: str, count: int, timeout: float = 15) -> list[WebhookCall]:
        await self.wait_until(lambda: len(self.accepted(path)) >= count, timeout)
        return self.accepted(path)
