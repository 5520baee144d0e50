"""Hostile input: every route of a whole node, fuzzed from a table of bad bodies and queries,
answers 4xx (never 5xx, never a hang), and the node goes on serving."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio

import emlisten.service.node as node_module
from emlisten.api.history import FiltersError, parse_filters
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot
from tests.service.conftest import fast_settings

TOKEN = "hostile-test-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 256 * 1024
HUGE = 300_000  # characters: over every field limit, under the body limit
GUID = "0f8fad5b-d9cb-469f-a165-70867728950e"

#: Field names the routes read (Creatio's and emlisten's), set to values of the wrong type.
_FIELDS = (
    "Id", "UserName", "Password", "AccessToken", "ServiceUrl", "Port", "UseSsl", "SecureOption",
    "BpmEndpoint", "FolderIds", "UseOAuth", "Protocol", "SmtpServer", "SmtpPort", "Url",
    "Filters", "MailboxId", "Email", "Credentials", "Attachments", "Recipients", "Subject",
    "FeatureValues", "Context", "url", "secret", "events", "webhook", "folders", "email",
    "password", "host", "port", "mailbox", "ids", "limit", "cursor", "state", "id",
)  # fmt: skip
_WRONG_TYPES: tuple[Any, ...] = ([], {}, 1.5, -1, True, None, "", [[[]]], {"a": {"b": []}})


def _fields_set_to(value: Any) -> dict[str, Any]:
    return dict.fromkeys(_FIELDS, value)


def _bodies() -> list[tuple[str, bytes]]:
    cases: list[tuple[str, Any]] = [
        ("empty object", {}),
        ("empty array", []),
        ("string", "text"),
        ("number", 123),
        ("null", None),
        ("true", True),
        ("array of junk", [None, 1, "x", [], {}]),
        ("lone surrogate value", {"UserName": "\ud800", "Id": GUID, "Url": "http://\udfff/"}),
        ("lone surrogate key", {"\udc00": 1}),
        ("long strings", _fields_set_to("x" * 5000)),
        ("huge strings", {"UserName": "x" * HUGE, "Password": "p" * HUGE, "Id": GUID}),
        ("huge url", {"Url": "http://" + "h" * HUGE + "/", "BpmEndpoint": "http://" + "h" * HUGE}),
        ("long host label", {"Url": "http://" + "h" * 1500 + ".invalid/", "ServiceUrl": "h" * 300}),
        ("many folders", {"FolderIds": ["f"] * 5000, "UserName": "u", "Id": GUID}),
        ("absurd dates", {"Filters": "/Date(-99999999999999999)/", "StartDate": "/Date(99999999999999999)/"}),
        ("absurd numbers", {"Port": 10**400, "Filters": -(10**30), "limit": 10**30}),
    ]
    cases += [(f"fields as {json.dumps(value)}", _fields_set_to(value)) for value in _WRONG_TYPES]
    cases += [(f"[{name}]", [body]) for name, body in cases if isinstance(body, dict)]
    encoded = [(name, json.dumps(body).encode()) for name, body in cases]
    # JSON text the json module would not produce.
    encoded += [
        ("malformed", b'{"a":'),
        ("not UTF-8", b'{"a": "\xff\xfe"}'),
        ("escaped lone surrogate", b'[{"UserName": "\\ud800", "Id": "\\udfff"}]'),
        ("nested arrays 10,000 deep", b"[" * 10_000 + b"]" * 10_000),
        ("nested objects 10,000 deep", b'{"a":' * 10_000 + b"1" + b"}" * 10_000),
        ("NaN", b'{"Port": NaN, "Filters": Infinity}'),
        ("over the body limit", b"[" + b"0," * (MAX_BODY // 2 + 10) + b"0]"),
    ]
    return encoded


_QUERIES = (
    "",
    "?limit=-1&offset=abc&cursor=%FF%FE&state=%ED%A0%80",
    "?limit=99999999999999999999999&since=/Date(-99999999999999999)/",
    "?" + "q=" + "x" * 20_000,
)


#: Their 502 is the documented answer about the server or URL the body names (docs/api.md).
_REMOTE_ANSWER_ROUTES = frozenset(("/api/availability/app", "/api/mailbox/folders"))


@dataclass
class Route:
    method: str
    path: str


def _routes(app: Any) -> list[Route]:
    routes = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule
        for name in rule.arguments:
            path = path.replace(f"<{name}>", GUID)
            for converter in ("string", "path", "int", "uuid"):
                path = path.replace(f"<{converter}:{name}>", GUID)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            routes.append(Route(method, path))
    return routes


@pytest.fixture
async def hostile_node(
    dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, list[Route]]]:
    apps: list[Any] = []
    real_create_app = node_module.create_app

    def recording_create_app(*args: Any, **kwargs: Any) -> Any:
        apps.append(real_create_app(*args, **kwargs))
        return apps[-1]

    monkeypatch.setattr(node_module, "create_app", recording_create_app)
    settings = fast_settings(dovecot, api_token=TOKEN, max_request_bytes=MAX_BODY, rate_limit_per_minute=0.0)
    adapters = node_module.build_local_adapters(settings)
    shutdown = trio.Event()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        await node_module.run_node(
            settings, adapters, handle_signals=False, shutdown=shutdown, task_status=task_status
        )

    port = await nursery.start(run)
    try:
        yield f"http://127.0.0.1:{port}", _routes(apps[0])
    finally:
        shutdown.set()


async def test_every_route_answers_hostile_input_with_4xx(
    hostile_node: tuple[str, list[Route]], caplog: pytest.LogCaptureFixture
) -> None:
    url, routes = hostile_node
    assert len(routes) >= 15, routes  # the whole node's API, not a bare app
    bodies = _bodies()
    failures: list[str] = []
    answered = 0
    limits = httpx.Limits(max_connections=4)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits, headers=BEARER) as client:
        for route in routes:
            # A fresh connection per route: a 413 closes its own.
            if route.method == "GET":
                requests = [(f"query {query[:30]!r}", route.path + query, None) for query in _QUERIES]
            else:
                requests = [(name, route.path, body) for name, body in bodies]
            for name, target, body in requests:
                try:
                    response = await client.request(
                        route.method, target, content=body, headers={"Content-Type": "application/json"}
                    )
                except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError) as error:
                    # A server may answer a body over the limit early and close while the
                    # client still writes; the client then misses the answer. Nothing else.
                    if body is None or len(body) <= MAX_BODY:
                        failures.append(f"{route.method} {route.path} {name}: {type(error).__name__}")
                    continue
                except httpx.HTTPError as error:  # timeouts: a hang
                    failures.append(f"{route.method} {route.path} {name}: {type(error).__name__}")
                    continue
                answered += 1
                reports_a_remote = route.path in _REMOTE_ANSWER_ROUTES and response.status_code == 502
                if response.status_code >= 500 and not reports_a_remote:
                    failures.append(f"{route.method} {route.path} {name}: {response.status_code}")
        assert failures == []
        # Still serving.
        assert (await client.get("/api/listeners/status")).status_code == 200
        states = await client.post("/api/listeners/subscriptionsstate", json=[GUID])
        assert states.json() == {GUID: {"State": "closed"}}
    assert answered > 500
    tracebacks = [r for r in caplog.records if r.exc_info and r.levelno >= logging.ERROR]
    assert tracebacks == []


@pytest.mark.parametrize(
    "value",
    [
        "/Date(-99999999999999999)/",
        "/Date(99999999999999999)/",
        '{"StartDate": "/Date(-99999999999999999)/"}',
        "9999-12-31T23:59:59-01:00",
        10**30,
        -1,
    ],
)
def test_absurd_history_dates_are_rejected(value: Any) -> None:
    with pytest.raises(FiltersError):
        parse_filters(value)


def _credentials(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "Id": GUID,
        "UserName": "alice@example.com",
        "Password": "pw",
        "ServiceUrl": "imap.example.com",
        "BpmEndpoint": "http://crm.example.com/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail",
    }
    body.update(fields)
    return body


@pytest.mark.parametrize(
    ("fields", "status", "field"),
    [
        ({"UserName": "\ud800"}, 400, "[0].UserName"),
        ({"Password": "x\udfffy"}, 400, "[0].Password"),
        ({"UserName": "u" * 513}, 422, "[0].UserName"),
        ({"BpmEndpoint": "http://crm.example.com/" + "p" * 2048}, 422, "[0].BpmEndpoint"),
        ({"ServiceUrl": "h" * 2049}, 422, "[0].ServiceUrl"),
        ({"FolderIds": ["INBOX"] * 1001}, 422, "[0].FolderIds"),
        ({"FolderIds": ["f" * 1025]}, 422, "[0].FolderIds[0]"),
    ],
)
async def test_bad_fields_are_refused_naming_the_field(
    fields: dict[str, Any], status: int, field: str
) -> None:
    from tests.api.test_security import running_app

    async with running_app() as client:
        body = json.dumps([_credentials(**fields)]).encode()  # json escapes the surrogates
        response = await client.post("/api/listeners/create", content=body)
        assert response.status_code == status
        assert [error["Field"] for error in response.json()["Errors"]] == [field]
        # A registration within the limits still goes through.
        assert (await client.post("/api/listeners/create", json=[_credentials()])).status_code == 200
