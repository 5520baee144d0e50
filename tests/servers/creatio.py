"""A Creatio stand-in: a real HTTP server that receives emlisten's callbacks.

It runs inside the test's Trio loop (Hypercorn on a free loopback port), records every call and
answers 200 unless told to fail. Tests wait for calls with events, never with sleeps.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from tests.servers._http import Receive, Scope, Send, lifespan_or_other, read_body, serve_app, server_config

log = logging.getLogger(__name__)

SERVICE_PATH = "/0/ServiceModel/ExchangeListenerService.svc/"
KNOWN_METHODS = ("ProcessFullEmail", "NewEmail", "ProcessMailboxState", "RefreshToken")

T = TypeVar("T")


@dataclass(frozen=True)
class RecordedCall:
    """One request as the stand-in saw it."""

    method: str  # the service method, e.g. "ProcessFullEmail" (the last path segment)
    path: str
    http_method: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    raw_body: bytes
    body: Any  # parsed JSON, or None when the body was not JSON
    received_at: float  # time.monotonic() once the whole body had arrived
    status: int  # the status the stand-in answered

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300

    @property
    def mailbox_id(self) -> str | None:
        return mailbox_id_of(self.body)


def get_ci(mapping: Any, key: str) -> Any:
    """``mapping[key]`` with a case-insensitive key (Creatio's field names are PascalCase, but
    readers should not depend on the case); None when absent or not a mapping."""
    if not isinstance(mapping, Mapping):
        return None
    if key in mapping:
        return mapping[key]
    lowered = key.lower()
    for name, value in mapping.items():
        if isinstance(name, str) and name.lower() == lowered:
            return value
    return None


def mailbox_id_of(body: Any) -> str | None:
    """The mailbox a callback body is about, for every known callback shape."""
    candidates = (
        get_ci(get_ci(body, "SubscriptionInfo"), "MailboxId"),  # ProcessFullEmail
        get_ci(body, "MailboxId"),  # ProcessMailboxState, RefreshToken
        get_ci(get_ci(body, "newEvent"), "Id"),  # NewEmail
    )
    for candidate in candidates:
        if isinstance(candidate, str) and candidate:
            return candidate
    return None


def same_id(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.strip("{}").lower() == b.strip("{}").lower()


@dataclass
class _Failure:
    status: int
    remaining: int
    retry_after: int | None = None


#: Recorded as the status of a held request whose client went away before ``release()``
#: (nginx's "client closed request"): Creatio never processed it, so it is not accepted.
CLIENT_GONE = 499


@dataclass
class HeldRequest:
    """A request ``hold_next`` stopped before it was processed."""

    method: str
    body: Any
    received_at: float

    @property
    def mailbox_id(self) -> str | None:
        return mailbox_id_of(self.body)


@dataclass
class _Hold:
    method: str
    request: HeldRequest | None = None
    released: trio.Event = field(default_factory=trio.Event)


class CreatioStandIn:
    """Serve with ``await nursery.start(standin.serve)``; then give emlisten ``endpoint()``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port  # 0: a free port, known once serve() has started
        self._calls: list[RecordedCall] = []
        self._fail_next: dict[str, list[_Failure]] = {}
        self._fail_mailbox: dict[str, int] = {}
        self._changed = trio.Event()
        self._holds: list[_Hold] = []

    # -- server ----------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``started()`` once the socket is listening."""
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(serve_app, self._asgi, server_config(self.host, self.port))
            task_status.started()

    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("the Creatio stand-in is not serving yet")
        return f"http://{self.host}:{self.port}"

    def endpoint(self, method: str = "ProcessFullEmail") -> str:
        """The full callback URL of ``method`` (what Creatio sends as ``BpmEndpoint``)."""
        return f"{self.base_url}{SERVICE_PATH}{method}"

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if await lifespan_or_other(scope, receive, send):
            return
        raw = await read_body(receive)
        if raw is None:
            return
        received_at = time.monotonic()
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        path: str = scope["path"]
        method = path.rsplit("/", 1)[-1]
        known = path.startswith(SERVICE_PATH) and scope["method"] == "POST"
        client_gone = known and await self._hold_if_asked(method, body, received_at, receive)
        status, retry_after = (
            (CLIENT_GONE, None) if client_gone else (self._status_for(method, body) if known else (404, None))
        )
        call = RecordedCall(
            method=method,
            path=path,
            http_method=scope["method"],
            headers=headers,
            raw_body=raw,
            body=body,
            received_at=received_at,
            status=status,
        )
        self._calls.append(call)
        self._notify()
        if client_gone:
            return  # nobody to answer
        payload = b"" if call.accepted else json.dumps({"Message": f"stand-in answered {status}"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json; charset=utf-8"),
                    (b"content-length", str(len(payload)).encode()),
                    *([(b"retry-after", str(retry_after).encode())] if retry_after is not None else []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _hold_if_asked(self, method: str, body: Any, received_at: float, receive: Receive) -> bool:
        """Hold this request if ``hold_next(method)`` asked for it, until ``release()``.
        Returns True when the client disconnected while held (the request was never processed)."""

        hold = next((h for h in self._holds if h.method == method and h.request is None), None)
        if hold is None:
            return False
        hold.request = HeldRequest(method, body, received_at)
        self._notify()
        client_gone = False
        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                nonlocal client_gone
                # The body is complete: the next message can only be http.disconnect.
                while (await receive())["type"] != "http.disconnect":
                    pass
                client_gone = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)
            await hold.released.wait()
            nursery.cancel_scope.cancel()
        self._holds.remove(hold)
        return client_gone

    def _status_for(self, method: str, body: Any) -> tuple[int, int | None]:
        """The status to answer, and the ``Retry-After`` seconds to send with it (or None)."""
        pending = self._fail_next.get(method)
        if pending:
            failure = pending[0]
            failure.remaining -= 1
            if failure.remaining <= 0:
                pending.pop(0)
            return failure.status, failure.retry_after
        mailbox = mailbox_id_of(body)
        for failing_mailbox, status in self._fail_mailbox.items():
            if same_id(mailbox, failing_mailbox):
                return status, None
        return 200, None

    # -- programmable failures -------------------------------------------------------------

    def fail_next(
        self, method: str, status: int = 500, count: int = 3, *, retry_after: int | None = None
    ) -> None:
        """Answer the next ``count`` calls of ``method`` with ``status`` (queued after earlier
        fail_next requests for the same method), with ``Retry-After: retry_after`` if given."""
        if count > 0:
            self._fail_next.setdefault(method, []).append(_Failure(status, count, retry_after))

    def fail_mailbox(self, mailbox_id: str, status: int | None = 500) -> None:
        """Answer every call about ``mailbox_id`` with ``status`` until cleared (None clears)."""
        key = mailbox_id.strip("{}").lower()
        if status is None:
            self._fail_mailbox.pop(key, None)
        else:
            self._fail_mailbox[key] = status

    def clear_failures(self) -> None:
        self._fail_next.clear()
        self._fail_mailbox.clear()

    # -- holding a request -----------------------------------------------------------------

    def hold_next(self, method: str = "ProcessFullEmail") -> None:
        """Make the next call of ``method`` wait, before it is processed or recorded, until
        ``release()``. If its client disconnects meanwhile, it is recorded with status 499
        (``CLIENT_GONE``, not accepted): a request aborted before Creatio processed it.
        Several holds queue up, one request each."""
        self._holds.append(_Hold(method))

    def release(self) -> None:
        """Let every held request (and every pending hold) go: they are processed normally,
        unless their client has gone."""
        for hold in list(self._holds):
            hold.released.set()
            if hold.request is None:
                self._holds.remove(hold)

    def held(self) -> list[HeldRequest]:
        """The requests waiting for ``release()`` now."""
        return [h.request for h in self._holds if h.request is not None and not h.released.is_set()]

    async def wait_held(self, timeout: float = 10.0) -> HeldRequest:
        """Wait until a request is held; returns the first one."""

        def check() -> HeldRequest | None:
            held = self.held()
            return held[0] if held else None

        return await self.wait_until(check, timeout, "a held request")

    # -- what was received -----------------------------------------------------------------

    def calls(self, method: str | None = None) -> list[RecordedCall]:
        """Every recorded call (failed ones too), or those of one method, in arrival order."""
        return [c for c in self._calls if method is None or c.method == method]

    def accepted_calls(self, method: str | None = None) -> list[RecordedCall]:
        return [c for c in self.calls(method) if c.accepted]

    def emails_for(self, mailbox_id: str) -> list[dict[str, Any]]:
        """Email dicts of the ProcessFullEmail calls about ``mailbox_id`` that were answered
        2xx (a failed call is expected to be retried, so its emails do not count)."""
        emails: list[dict[str, Any]] = []
        for call in self.accepted_calls("ProcessFullEmail"):
            if same_id(call.mailbox_id, mailbox_id):
                emails.extend(_dicts(get_ci(call.body, "Emails")))
        return emails

    def states_for(self, mailbox_id: str, since: float = 0.0) -> list[dict[str, Any]]:
        """ProcessMailboxState bodies about ``mailbox_id`` received at or after ``since``."""
        return [
            c.body
            for c in self.calls("ProcessMailboxState")
            if same_id(c.mailbox_id, mailbox_id) and c.received_at >= since and isinstance(c.body, dict)
        ]

    # -- waiting (event driven, no polling) ------------------------------------------------

    async def wait_until(self, check: Callable[[], T | None], timeout: float, what: str) -> T:
        """Wait until ``check()`` returns something other than None, re-checking on every
        received call. Raises AssertionError naming ``what`` on timeout."""
        with trio.move_on_after(timeout):
            while True:
                changed = self._changed
                result = check()
                if result is not None:
                    return result
                await changed.wait()
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what}; calls so far: {self._summary()}"
        )

    async def wait_for_emails(
        self, mailbox_id: str, count: int, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Wait until at least ``count`` emails for ``mailbox_id`` were accepted; returns all."""

        def check() -> list[dict[str, Any]] | None:
            emails = self.emails_for(mailbox_id)
            return emails if len(emails) >= count else None

        return await self.wait_until(check, timeout, f"{count} email(s) for {mailbox_id}")

    async def wait_for_state(
        self, mailbox_id: str, available: bool, timeout: float = 10.0, *, since: float = 0.0
    ) -> dict[str, Any]:
        """Wait for a ProcessMailboxState about ``mailbox_id`` with ``Avaliable == available``
        received at or after ``since`` (a ``time.monotonic()`` value); returns its body."""

        def check() -> dict[str, Any] | None:
            for state in self.states_for(mailbox_id, since):
                if get_ci(state, "Avaliable") is available:
                    return state
            return None

        return await self.wait_until(check, timeout, f"mailbox state Avaliable={available} for {mailbox_id}")

    async def wait_for_calls(self, method: str, count: int = 1, timeout: float = 10.0) -> list[RecordedCall]:
        """Wait until at least ``count`` calls of ``method`` arrived (failed ones too)."""

        def check() -> list[RecordedCall] | None:
            calls = self.calls(method)
            return calls if len(calls) >= count else None

        return await self.wait_until(check, timeout, f"{count} {method} call(s)")

    def _summary(self) -> str:
        parts = [f"{c.method}:{c.status}:{c.mailbox_id}" for c in self._calls[-20:]]
        return f"{len(self._calls)} [{', '.join(parts)}]"


def _dicts(items: Any) -> Iterable[dict[str, Any]]:
    if isinstance(items, list):
        return [item for item in items if isinstance(item, dict)]
    return []
