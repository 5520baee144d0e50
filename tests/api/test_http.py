"""The API over real HTTP: serve_api on port 0, httpx as the client, a recording ListenerControl.

The control here only observes the routing (calls and an in-memory id set); end-to-end tests with
the real service live elsewhere.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio

import emlisten
from emlisten.api._guard import ApiAccess
from emlisten.api.app import create_app
from emlisten.api.server import serve_api
from emlisten.errors import QueueError, StoreError, ValidationError
from emlisten.models import MailboxConfig, Security

ID_A = "0F8FAD5B-D9CB-469F-A165-70867728950E"
ID_B = "7C9E6679-7425-40DE-944B-E07FC1F90AE7"
ID_C = "11111111-2222-3333-4444-555555555555"
PASSWORD = "http-SECRET-password"
TOKEN = "api-token-0123456789"


def creds(mailbox_id: str, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "Id": mailbox_id,
        "UserName": "alice@example.com",
        "Password": PASSWORD,
        "ServiceUrl": "imap.example.com",
        "Port": 993,
        "UseSsl": True,
        "BpmEndpoint": "http://crm.example.com/0/ServiceModel/ExchangeListenerService.svc/ProcessFullEmail",
        "FolderIds": [],
    }
    data.update(overrides)
    return data


class RecordingControl:
    """A ListenerControl that records calls and keeps the registered ids in memory."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.mailboxes: dict[str, MailboxConfig] = {}
        self.fail_with: Exception | None = None
        self.entered = trio.Event()
        self.release: trio.Event | None = None

    async def _maybe_fail_or_wait(self) -> None:
        self.entered.set()
        if self.release is not None:
            await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with

    async def create(self, mailboxes: Sequence[MailboxConfig]) -> None:
        self.calls.append(("create", [m.id for m in mailboxes]))
        await self._maybe_fail_or_wait()
        self.mailboxes.update((m.id, m) for m in mailboxes)

    async def recreate(self, mailboxes: Sequence[MailboxConfig]) -> None:
        self.calls.append(("recreate", [m.id for m in mailboxes]))
        self.mailboxes.update((m.id, m) for m in mailboxes)

    async def update(self, mailboxes: Sequence[MailboxConfig]) -> list[str]:
        self.calls.append(("update", [m.id for m in mailboxes]))
        unknown = [m.id for m in mailboxes if m.id not in self.mailboxes]
        self.mailboxes.update((m.id, m) for m in mailboxes if m.id not in unknown)
        return unknown

    async def close(self, mailbox_ids: Sequence[str]) -> None:
        self.calls.append(("close", list(mailbox_ids)))
        for mailbox_id in mailbox_ids:
            self.mailboxes.pop(mailbox_id, None)

    async def subscription_states(self, mailbox_ids: Sequence[str]) -> dict[str, str]:
        self.calls.append(("subscription_states", list(mailbox_ids)))
        return {i: "exists" if i in self.mailboxes else "closed" for i in mailbox_ids}

    async def service_status(self) -> dict[str, Any]:
        if self.fail_with is not None:
            raise self.fail_with
        return {"ServiceStatus": "Started", "Version": "test", "Connections": len(self.mailboxes)}


@dataclass
class Api:
    client: httpx.AsyncClient
    control: RecordingControl
    port: int


async def start_api(
    nursery: trio.Nursery,
    control: RecordingControl,
    *,
    api_token: str | None = None,
    max_body_bytes: int = 10 * 1024 * 1024,
    access: ApiAccess | None = None,
) -> int:
    app = create_app(control, api_token=api_token, max_body_bytes=max_body_bytes, access=access)
    port: int = await nursery.start(serve_api, app, "127.0.0.1", 0)
    return port


@pytest.fixture
async def api(nursery: trio.Nursery) -> AsyncIterator[Api]:
    control = RecordingControl()
    port = await start_api(nursery, control)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield Api(client, control, port)


# ------------------------------------------------------------------------------------------
# create / recreate / update


async def test_create_all_good(api: Api) -> None:
    response = await api.client.post(
        "/api/listeners/create", json=[creds(ID_A), creds(ID_B, UseSsl=False, Port=143)]
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"Accepted": [ID_A.lower(), ID_B.lower()], "Errors": []}
    assert api.control.calls == [("create", [ID_A.lower(), ID_B.lower()])]
    plain = api.control.mailboxes[ID_B.lower()]
    assert (plain.imap.port, plain.imap.security) == (143, Security.NONE)
    assert plain.password == PASSWORD


async def test_create_all_bad_is_400_naming_fields(api: Api) -> None:
    body = [creds(ID_A, ServiceUrl="ftp://mail.example.com"), creds("not-a-guid")]
    response = await api.client.post("/api/listeners/create", json=body)
    assert response.status_code == 400
    payload = response.json()
    assert payload["Message"] == "No valid credentials in the request"
    assert payload["Errors"] == [
        {
            "Index": 0,
            "Id": ID_A,
            "Field": "[0].ServiceUrl",
            "Message": "unsupported scheme: expected imap:// or imaps://",
        },
        {"Index": 1, "Id": "not-a-guid", "Field": "[1].Id", "Message": "must be a GUID"},
    ]
    assert api.control.calls == []
    assert PASSWORD not in response.text


async def test_create_mixed_accepts_the_good_ones(api: Api) -> None:
    body = [creds(ID_A), {**creds(ID_B), "Password": ""}, creds(ID_C)]
    response = await api.client.post("/api/listeners/create", json=body)
    assert response.status_code == 200
    assert response.json() == {
        "Accepted": [ID_A.lower(), ID_C.lower()],
        "Errors": [{"Index": 1, "Id": ID_B, "Field": "[1].Password", "Message": "required"}],
    }
    assert api.control.calls == [("create", [ID_A.lower(), ID_C.lower()])]


async def test_create_single_object_and_empty_array(api: Api) -> None:
    response = await api.client.post("/api/listeners/create", json=creds(ID_A))
    assert response.status_code == 200
    assert response.json()["Accepted"] == [ID_A.lower()]
    response = await api.client.post("/api/listeners/create", json=[])
    assert (response.status_code, response.json()) == (200, {"Accepted": [], "Errors": []})
    assert api.control.calls == [("create", [ID_A.lower()])]


async def test_recreate_goes_to_control_recreate(api: Api) -> None:
    response = await api.client.post("/api/listeners/recreate", json=[creds(ID_A)])
    assert response.status_code == 200
    assert response.json() == {"Accepted": [ID_A.lower()], "Errors": []}
    assert api.control.calls == [("recreate", [ID_A.lower()])]


async def test_update_reports_unknown_ids(api: Api) -> None:
    await api.client.post("/api/listeners/create", json=[creds(ID_A)])
    response = await api.client.post(
        "/api/listeners/update", json=[creds(ID_A, Password="new-pw"), creds(ID_B)]
    )
    assert response.status_code == 200
    assert response.json() == {
        "Accepted": [ID_A.lower(), ID_B.lower()],
        "Unknown": [ID_B.lower()],
        "Errors": [],
    }
    assert api.control.mailboxes[ID_A.lower()].password == "new-pw"


# ------------------------------------------------------------------------------------------
# Malformed and wrong bodies


@pytest.mark.parametrize(
    "path",
    [
        "/api/listeners/create",
        "/api/listeners/recreate",
        "/api/listeners/update",
        "/api/listeners/close",
        "/api/listeners/subscriptionsstate",
    ],
)
async def test_malformed_json_is_400(api: Api, path: str) -> None:
    response = await api.client.post(
        path,
        content=b'[{"Id": "x", "Password": "' + PASSWORD.encode() + b'"',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 400
    payload = response.json()
    assert payload["Message"] == "Malformed JSON"
    assert payload["Errors"][0]["Field"] == "body"
    assert PASSWORD not in response.text
    assert api.control.calls == []


@pytest.mark.parametrize("content", [b"", b"   ", b"\xff\xfe\x00garbage"])
async def test_empty_or_undecodable_body_is_400(api: Api, content: bytes) -> None:
    response = await api.client.post("/api/listeners/create", content=content)
    assert response.status_code == 400
    assert response.json()["Errors"][0]["Field"] == "body"


@pytest.mark.parametrize("body", [42, "text", None, True])
async def test_json_of_the_wrong_shape_is_400(api: Api, body: Any) -> None:
    response = await api.client.post("/api/listeners/create", content=json.dumps(body).encode())
    assert response.status_code == 400
    assert response.json() == {
        "Message": "Invalid body",
        "Errors": [
            {
                "Index": None,
                "Id": None,
                "Field": "body",
                "Message": "expected an array of SynchronizationCredentials objects",
            }
        ],
    }


async def test_form_encoded_body_is_400(api: Api) -> None:
    response = await api.client.post("/api/listeners/create", data={"Id": ID_A})
    assert response.status_code == 400
    assert response.json()["Message"] == "Malformed JSON"


async def test_json_is_read_whatever_the_content_type(api: Api) -> None:
    response = await api.client.post(
        "/api/listeners/create",
        content=json.dumps([creds(ID_A)]).encode(),
        headers={"Content-Type": "text/plain"},
    )
    assert response.status_code == 200
    assert response.json()["Accepted"] == [ID_A.lower()]


async def test_utf8_bom_is_tolerated(api: Api) -> None:
    response = await api.client.post(
        "/api/listeners/close", content=b"\xef\xbb\xbf" + json.dumps([ID_A]).encode()
    )
    assert response.status_code == 200


async def test_body_over_the_limit_is_413(nursery: trio.Nursery) -> None:
    control = RecordingControl()
    port = await start_api(nursery, control, max_body_bytes=2048)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        response = await client.post("/api/listeners/create", json=[creds(ID_A, Padding="x" * 4096)])
        assert response.status_code == 413
        assert response.json() == {"Message": "Request Entity Too Large"}
        small = await client.post("/api/listeners/create", json=[creds(ID_A)])
        assert small.status_code == 200
    assert control.calls == [("create", [ID_A.lower()])]


# ------------------------------------------------------------------------------------------
# close / subscriptionsstate


async def test_subscriptionsstate_echoes_the_callers_id_spelling(api: Api) -> None:
    await api.client.post("/api/listeners/create", json=[creds(ID_A.lower())])
    response = await api.client.post(
        "/api/listeners/subscriptionsstate", json=[ID_A, ID_B.lower(), ID_A.lower()]
    )
    assert response.status_code == 200
    assert response.json() == {
        ID_A: {"State": "exists"},
        ID_B.lower(): {"State": "closed"},
        ID_A.lower(): {"State": "exists"},
    }
    # The control saw each mailbox once, normalised.
    assert api.control.calls[-1] == ("subscription_states", [ID_A.lower(), ID_B.lower()])


async def test_subscriptionsstate_of_nothing_is_an_empty_object(api: Api) -> None:
    response = await api.client.post("/api/listeners/subscriptionsstate", json=[])
    assert (response.status_code, response.json()) == (200, {})


async def test_unexpected_state_reads_closed(nursery: trio.Nursery) -> None:
    class OddStates(RecordingControl):
        async def subscription_states(self, mailbox_ids: Sequence[str]) -> dict[str, str]:
            return {mailbox_ids[0]: "connecting"}

    port = await start_api(nursery, OddStates())
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        response = await client.post("/api/listeners/subscriptionsstate", json=[ID_A, ID_B])
    assert response.json() == {ID_A: {"State": "closed"}, ID_B: {"State": "closed"}}


async def test_close_forgets_the_mailboxes(api: Api) -> None:
    await api.client.post("/api/listeners/create", json=[creds(ID_A), creds(ID_B)])
    response = await api.client.post("/api/listeners/close", json=[ID_A, {"Id": ID_C}])
    assert response.status_code == 200
    assert response.json() == {"Accepted": [ID_A.lower(), ID_C.lower()], "Errors": []}
    assert api.control.calls[-1] == ("close", [ID_A.lower(), ID_C.lower()])
    states = await api.client.post("/api/listeners/subscriptionsstate", json=[ID_A, ID_B])
    assert states.json() == {ID_A: {"State": "closed"}, ID_B: {"State": "exists"}}


async def test_close_with_a_bad_id_is_400_naming_it(api: Api) -> None:
    response = await api.client.post("/api/listeners/close", json=[ID_A, "nope"])
    assert response.status_code == 400
    assert response.json() == {
        "Message": "Invalid mailbox ids",
        "Errors": [{"Index": None, "Id": None, "Field": "[1]", "Message": "must be a GUID"}],
    }
    assert api.control.calls == []


# ------------------------------------------------------------------------------------------
# exists / status / errors


async def test_exists(api: Api) -> None:
    response = await api.client.get("/api/listeners/exists")
    assert response.status_code == 200
    assert response.json() == {"ServiceStatus": "Started", "Version": emlisten.__version__}


async def test_status_is_the_controls(api: Api) -> None:
    await api.client.post("/api/listeners/create", json=[creds(ID_A)])
    response = await api.client.get("/api/listeners/status")
    assert response.status_code == 200
    assert response.json() == {"ServiceStatus": "Started", "Version": "test", "Connections": 1}


async def test_unknown_path_is_json_404(api: Api) -> None:
    response = await api.client.get("/api/listeners/nothing-here")
    assert response.status_code == 404
    assert response.json() == {"Message": "Not Found"}


async def test_wrong_method_is_json_405(api: Api) -> None:
    response = await api.client.get("/api/listeners/create")
    assert response.status_code == 405
    assert response.json() == {"Message": "Method Not Allowed"}
    assert "POST" in response.headers["allow"]


async def test_unexpected_exception_is_500_and_the_server_lives_on(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    api.control.fail_with = RuntimeError("store exploded")
    response = await api.client.post("/api/listeners/create", json=[creds(ID_A)])
    assert response.status_code == 500
    assert response.json() == {"Message": "Internal server error"}
    assert "store exploded" not in response.text
    status = await api.client.get("/api/listeners/status")
    assert status.status_code == 500
    api.control.fail_with = None
    assert (await api.client.get("/api/listeners/status")).status_code == 200
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "emlisten.api.app"]
    assert errors
    assert errors[0].exc_info is not None
    assert PASSWORD not in caplog.text


async def test_validation_error_from_the_service_is_400(api: Api) -> None:
    api.control.fail_with = ValidationError("[0].BpmEndpoint", "host not in the allow-list")
    response = await api.client.post("/api/listeners/create", json=[creds(ID_A)])
    assert response.status_code == 400
    assert response.json() == {
        "Message": "Invalid request",
        "Errors": [
            {"Index": None, "Id": None, "Field": "[0].BpmEndpoint", "Message": "host not in the allow-list"}
        ],
    }


@pytest.mark.parametrize("error", [StoreError("redis down"), QueueError("amqp down")])
async def test_backend_outage_is_503(api: Api, error: Exception) -> None:
    api.control.fail_with = error
    response = await api.client.post("/api/listeners/create", json=[creds(ID_A)])
    assert response.status_code == 503
    assert response.json() == {"Message": "Service temporarily unavailable"}


async def test_logs_counts_never_bodies(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="emlisten")
    await api.client.post("/api/listeners/create", json=[creds(ID_A), creds("bad")])
    await api.client.post("/api/listeners/close", json=[ID_A])
    messages = [r.getMessage() for r in caplog.records if r.name == "emlisten.api.app"]
    assert "create: 1 mailbox(es) accepted, 1 rejected" in messages
    assert "close: 1 mailbox(es)" in messages
    assert "POST /api/listeners/create -> 200" in messages
    assert PASSWORD not in caplog.text
    assert "alice@example.com" not in caplog.text


# ------------------------------------------------------------------------------------------
# Bearer token


@pytest.fixture
async def secured(nursery: trio.Nursery) -> AsyncIterator[Api]:
    control = RecordingControl()
    # The token on Creatio's routes too (a reverse proxy adds it): the strictest set-up.
    strict = ApiAccess(creatio_routes_need_token=True)
    port = await start_api(nursery, control, api_token=TOKEN, access=strict)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        yield Api(client, control, port)


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x"]
)
async def test_token_required_on_listener_routes(secured: Api, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for path in ("/api/listeners/create", "/api/listeners/close", "/api/listeners/subscriptionsstate"):
        response = await secured.client.post(path, json=[creds(ID_A)], headers=headers)
        assert response.status_code == 401, path
        assert response.json() == {"Message": "Missing or invalid bearer token"}
        assert response.headers["www-authenticate"] == "Bearer"
    assert secured.control.calls == []


async def test_right_token_passes(secured: Api) -> None:
    headers = {"Authorization": f"bearer {TOKEN}"}
    response = await secured.client.post("/api/listeners/create", json=[creds(ID_A)], headers=headers)
    assert response.status_code == 200
    assert secured.control.calls == [("create", [ID_A.lower()])]


async def test_probes_stay_open_with_a_token(secured: Api) -> None:
    assert (await secured.client.get("/api/listeners/exists")).status_code == 200
    assert (await secured.client.get("/api/listeners/status")).status_code == 200


async def test_graph_notification_routes_bypass_the_token(secured: Api) -> None:
    # Graph cannot send our bearer token; those routes check their own signatures. Here no
    # Graph blueprint is mounted, so getting past the token check means a 404, not a 401.
    for path in ("/v1/graph/notifications/x", "/v1/graph/lifecycle/x"):
        assert (await secured.client.post(path, json={})).status_code == 404
    assert (await secured.client.post("/v1/graphx", json={})).status_code == 401


# ------------------------------------------------------------------------------------------
# serve_api lifecycle


async def test_cancellation_stops_the_server_after_in_flight_requests(
    nursery: trio.Nursery,
) -> None:
    control = RecordingControl()
    control.release = trio.Event()
    results: list[int] = []
    answered = trio.Event()

    async def slow_request(base: str) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            response = await client.post("/api/listeners/create", json=[creds(ID_A)])
        results.append(response.status_code)
        answered.set()

    async def release_once_not_listening(port: int) -> None:
        # The in-flight request is held until the server has stopped accepting connections.
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                break
            await stream.aclose()
            await trio.sleep(0.01)
        assert control.release is not None
        control.release.set()

    with trio.fail_after(4):  # well under graceful_timeout + 1: no hard stop was needed
        with trio.CancelScope() as server_scope:
            async with trio.open_nursery() as server_nursery:
                port = await start_api(server_nursery, control)
                nursery.start_soon(slow_request, f"http://127.0.0.1:{port}")
                await control.entered.wait()
                nursery.start_soon(release_once_not_listening, port)
                server_scope.cancel()
        await answered.wait()

    assert results == [200]
    assert control.mailboxes.keys() == {ID_A.lower()}
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)
