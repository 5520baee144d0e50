"""What the API lets through: who needs the token, request bodies' shape, rate limits.

- Creatio's routes (``/api/...``, ``/apiv2/...``) answer without the token (Creatio sends none)
  unless ``creatio_routes_need_token``; emlisten's own routes (``/v1``, the console, dead
  letters) need it whenever one is set, and config refuses to listen beyond loopback without one
  (see :func:`emlisten.config.is_loopback`).
- JSON bodies: nesting deeper than :data:`MAX_JSON_DEPTH`, lone surrogates and fields longer
  than :data:`FIELD_LIMITS` are refused (400 / 422) before any route sees them.
- :class:`RateLimiter`: a token bucket per client address.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from emlisten.config import Settings, is_loopback

__all__ = [
    "FIELD_LIMITS",
    "LIST_LIMITS",
    "MAX_JSON_DEPTH",
    "ApiAccess",
    "BodyRejected",
    "RateLimiter",
    "RateLimits",
    "inspect_json",
    "is_creatio_route",
    "load_json",
]

#: Deepest nesting of arrays and objects accepted (Creatio's deepest body has 4 levels).
MAX_JSON_DEPTH = 32
#: Longest value (characters) of these fields (any case, anywhere in a body): names and
#: addresses, URLs, secrets. Over it: 422 naming the field.
FIELD_LIMITS: dict[str, int] = {
    **dict.fromkeys(
        (
            "username",
            "senderemailaddress",
            "bpmuser",
            "bpmuserworkspace",
            "bpmusertimezone",
            "impersonateduser",
            "id",
            "mailboxid",
            "protocol",
            "securityoption",
        ),
        512,
    ),
    **dict.fromkeys(
        ("serviceurl", "bpmendpoint", "url", "autodiscoverurl", "smtpserver", "callbackurl", "webhookurl"),
        2048,
    ),
    "password": 4096,
    # OAuth access tokens (Microsoft's are 1.5-4 KB; a few providers issue larger ones).
    "accesstoken": 32768,
}
#: Longest arrays (elements) of these fields, and the longest of each of their strings.
LIST_LIMITS: dict[str, tuple[int, int]] = {"folderids": (1000, 1024)}

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class BodyRejected(Exception):
    """The body is unusable: ``status`` (400 or 422), ``field`` and ``message`` for the answer."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.status = status
        self.field = field
        self.message = message


def load_json(data: bytes) -> Any:
    """Parse a request body and :func:`inspect_json` it. Raises BodyRejected (never echoing the
    body, which may hold secrets) or ValueError subclasses from ``json`` as they are."""
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except RecursionError:  # the C scanner gives up on ~1,000s of levels
        raise BodyRejected(400, "body", f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    inspect_json(value)
    return value


def _joined(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def inspect_json(value: Any) -> None:
    """Depth, lone surrogates and field lengths of a parsed body (iterative: no recursion)."""
    stack: list[tuple[Any, str, int, str]] = [(value, "", 1, "")]
    while stack:
        item, path, depth, key = stack.pop()
        if isinstance(item, str):
            _check_string(item, path or "body", key)
            continue
        if isinstance(item, dict | list) and depth > MAX_JSON_DEPTH:
            raise BodyRejected(400, path or "body", f"nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            for name, child in item.items():
                _check_string(name, _joined(path, "(name)"), "")
                stack.append((child, _joined(path, name), depth + 1, name.lower()))
        elif isinstance(item, list):
            limits = LIST_LIMITS.get(key)
            if limits is not None and len(item) > limits[0]:
                raise BodyRejected(422, path, f"more than {limits[0]} entries")
            child_key = f"{key}[]" if limits is not None else ""
            stack.extend((child, _joined(path, i), depth + 1, child_key) for i, child in enumerate(item))


def _check_string(text: str, path: str, key: str) -> None:
    if _LONE_SURROGATE.search(text):
        raise BodyRejected(400, path, "invalid Unicode (lone surrogate)")
    limit = LIST_LIMITS[key[:-2]][1] if key.endswith("[]") else FIELD_LIMITS.get(key, 0)
    if limit and len(text) > limit:
        raise BodyRejected(422, path, f"longer than {limit} characters")


def is_creatio_route(path: str) -> bool:
    """Routes Creatio calls (without a token): ``/api/...`` and ``/apiv2/...``."""
    return path.startswith(("/api/", "/apiv2/"))


@dataclass(frozen=True)
class ApiAccess:
    """Who may call what, from the settings (the defaults suit tests on loopback)."""

    listen_host: str = "127.0.0.1"
    creatio_routes_need_token: bool = False
    rate_limit_per_minute: float = 0.0
    rate_limit_burst: int = 0
    validate_rate_limit_per_minute: float = 0.0
    validate_rate_limit_burst: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiAccess:
        return cls(
            listen_host=settings.host,
            creatio_routes_need_token=settings.creatio_routes_need_token,
            rate_limit_per_minute=settings.rate_limit_per_minute,
            rate_limit_burst=settings.rate_limit_burst,
            validate_rate_limit_per_minute=settings.validate_rate_limit_per_minute,
            validate_rate_limit_burst=settings.validate_rate_limit_burst,
        )

    def open_without_token(self, token: str | None) -> list[str]:
        """The routes anyone who reaches the port can call without a token (besides the probes
        and /metrics, always open): empty on loopback."""
        if is_loopback(self.listen_host):
            return []
        opened: list[str] = []
        if not token or not self.creatio_routes_need_token:
            opened.append("Creatio's routes (/api/..., /apiv2/...)")
        if not token:
            opened.append("emlisten's own routes (/v1, the console, dead letters)")
        return opened


class RateLimiter:
    """A token bucket per client: ``per_minute`` refill, ``burst`` capacity (0: no limit)."""

    #: Clients remembered at most; idle (full) buckets are forgotten first.
    MAX_CLIENTS = 10_000

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(max(burst, 1))
        self.enabled = per_minute > 0
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, client: str) -> float:
        """0 when the request may go ahead, else the seconds until it could (Retry-After)."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        tokens, last = self._buckets.get(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            if len(self._buckets) > self.MAX_CLIENTS:
                self._forget_idle(now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _forget_idle(self, now: float) -> None:
        full = [
            client
            for client, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self.rate >= self.capacity
        ]
        for client in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[client]

    @staticmethod
    def retry_after_header(seconds: float) -> str:
        return str(max(1, math.ceil(seconds)))


#: Routes the rate limits apply to (POST): registration, and the probes of mail servers.
REGISTRATION_ROUTES = frozenset(("/api/listeners/create", "/api/listeners/recreate", "/api/listeners/update"))
PROBE_ROUTES = frozenset(("/api/mailbox/validate", "/api/mailbox/folders"))


class RateLimits:
    """The two per-client limits of an app: registration and probes."""

    def __init__(self, access: ApiAccess) -> None:
        self.registration = RateLimiter(access.rate_limit_per_minute, access.rate_limit_burst)
        self.probes = RateLimiter(access.validate_rate_limit_per_minute, access.validate_rate_limit_burst)

    def wait(self, method: str, path: str, client: str) -> float:
        """0 when the request may go ahead, else the seconds to wait (Retry-After)."""
        if method != "POST":
            return 0.0
        if path in REGISTRATION_ROUTES:
            return self.registration.take(client)
        if path in PROBE_ROUTES:
            return self.probes.take(client)
        return 0.0


def drain_unread_body(asgi_app: Any) -> Any:
    """ASGI middleware so that a request answered early (a 413, a 401) leaves a usable or a
    closed connection, never a stuck one.

    - After the app answered without reading the whole body, read and drop the rest: Hypercorn
      hands the body over through a small queue, which left full blocks the connection.
    - A response saying ``Connection: close``, or sent before the body was read, ends with a
      shielded send: Hypercorn closes the connection inside that send, and Quart-Trio cancels the
      request's tasks as soon as the client's side ends, which used to cancel the close itself and
      leave the socket open, never answering again.
    """

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await asgi_app(scope, receive, send)
            return
        # A request without a body is complete from the start (GETs: keep their keep-alive).
        finished = not _announces_body(scope)
        closing = False

        async def tracking_receive() -> Any:
            nonlocal finished
            message = await receive()
            if message.get("type") == "http.disconnect" or not message.get("more_body", False):
                finished = True
            return message

        async def closing_send(message: Any) -> None:
            nonlocal closing
            if message.get("type") == "http.response.start":
                headers = list(message.get("headers", ()))
                closing = any(
                    bytes(name).lower() == b"connection" and b"close" in bytes(value).lower()
                    for name, value in headers
                )
                if not finished and not closing:
                    # Answered before the body arrived: Hypercorn will close; say so, or the
                    # client reuses a connection that is about to go.
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
                    closing = True
            last = message.get("type") == "http.response.body" and not message.get("more_body")
            # Hypercorn closes the connection inside this send when the response says so or
            # the request body is still arriving (an early answer).
            if last and (closing or not finished):
                with trio.CancelScope(shield=True) as shielded:
                    shielded.deadline = trio.current_time() + 10.0  # a small error answer
                    await send(message)
                return
            await send(message)

        await asgi_app(scope, tracking_receive, closing_send)
        while not finished:
            await tracking_receive()

    return app


def _announces_body(scope: Any) -> bool:
    for raw_name, value in scope.get("headers", ()):
        name = bytes(raw_name).lower()
        if name == b"transfer-encoding" or (name == b"content-length" and bytes(value).strip() != b"0"):
            return True
    return False
