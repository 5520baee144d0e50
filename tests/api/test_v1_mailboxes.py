"""/v1/mailboxes and /v1/dead-letters over real HTTP, on the real StoreListenerControl and store."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio

from emlisten.abc import Store
from emlisten.api.app import create_app
from emlisten.api.server import serve_api
from emlisten.api.v1 import v1_blueprint
from emlisten.models import MailboxState, MailboxStatus, Security, WebhookEvent, WebhookTarget
from emlisten.service.listeners import StoreListenerControl
from emlisten.store.memory import MemoryStore

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"o" * 32).decode()
PASSWORD = "v1-SECRET-password"
TOKEN = "v1-api-token-0123456789"


@dataclass
class V1:
    http: httpx.AsyncClient
    store: Store
    replayed: list[WebhookEvent]


async def start(
    nursery: trio.Nursery, *, default: WebhookTarget | None = None, api_token: str | None = None
) -> tuple[int, Store, list[WebhookEvent]]:
    store = MemoryStore()
    control = StoreListenerControl(store, node_id="n1", role="all")
    replayed: list[WebhookEvent] = []
    app = create_app(
        control,
        api_token=api_token,
        blueprints=[
            v1_blueprint(
                control, store, default_webhook=default or WebhookTarget(), on_replay=replayed.append
            )
        ],
    )
    port: int = await nursery.start(serve_api, app, "127.0.0.1", 0)
    return port, store, replayed


@pytest.fixture
async def v1(nursery: trio.Nursery) -> AsyncIterator[V1]:
    port, store, replayed = await start(nursery)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        yield V1(http, store, replayed)


def body(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "protocol": "imap",
        "host": "imap.example.com",
        "port": 993,
        "tls": True,
        "username": "alice@example.com",
        "password": PASSWORD,
        "folders": ["INBOX"],
        "webhook": {"url": "https://app.example.com/hooks/mail?token=abc", "secret": SECRET},
    }
    data.update(changes)
    return data


async def test_register_read_list_and_delete(v1: V1) -> None:
    created = await v1.http.post("/v1/mailboxes", json=body())
    assert created.status_code == 201, created.text
    mailbox_id = created.json()["id"]
    assert created.headers["location"] == f"/v1/mailboxes/{mailbox_id}"
    stored = await v1.store.get_mailbox(mailbox_id)
    assert stored is not None
    assert (stored.imap.host, stored.imap.port, stored.imap.security) == (
        "imap.example.com",
        993,
        Security.SSL_ON_CONNECT,
    )
    assert stored.webhook == WebhookTarget("https://app.example.com/hooks/mail?token=abc", (SECRET,))
    assert stored.bpm_endpoint == "" and stored.use_full_email

    got = (await v1.http.get(f"/v1/mailboxes/{mailbox_id}")).json()
    assert got["state"] == "starting"
    assert got["kind"] == "webhook"
    assert got["folders"] == [{"name": "INBOX", "uidvalidity": None, "last_uid": None}]
    # Never the password, the secret, or the URL's query (it may hold a token).
    text = json.dumps(got)
    assert PASSWORD not in text and SECRET not in text and "token=abc" not in text
    assert got["webhook"] == {"url": "https://app.example.com/hooks/mail", "default_url": False, "secrets": 1}

    await v1.store.set_status(mailbox_id, MailboxStatus(MailboxState.LISTENING, node="n1"))
    assert (await v1.http.get(f"/v1/mailboxes/{mailbox_id}")).json()["state"] == "listening"

    listing = (await v1.http.get("/v1/mailboxes")).json()
    assert [m["id"] for m in listing["items"]] == [mailbox_id]
    assert listing["total"] == 1 and listing["states"] == {"listening": 1}
    assert listing["mailboxes"] == listing["items"] and listing["count"] == 1

    deleted = await v1.http.delete(f"/v1/mailboxes/{mailbox_id}")
    assert deleted.status_code == 204
    assert await v1.store.get_mailbox(mailbox_id) is None
    assert (await v1.http.get(f"/v1/mailboxes/{mailbox_id}")).status_code == 404
    assert (await v1.http.delete(f"/v1/mailboxes/{mailbox_id}")).status_code == 404


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"host": ""}, "host"),
        ({"host": "https://imap.example.com/"}, "host"),
        ({"port": 70000}, "port"),
        ({"port": "x"}, "port"),
        ({"tls": "maybe"}, "tls"),
        ({"username": None}, "username"),
        ({"password": ""}, "password"),
        ({"protocol": "pop3"}, "protocol"),
        ({"folders": ["INBOX", 3]}, "folders[1]"),
        ({"security": "tls13"}, "security"),
        ({"id": "not-a-guid"}, "id"),
        ({"colour": "red"}, "colour"),
        ({"webhook": {"url": "ftp://x.example.com/", "secret": SECRET}}, "webhook.url"),
        ({"webhook": {"url": "https://x.example.com/", "secret": "plain"}}, "webhook.secret"),
        ({"webhook": {"url": "https://x.example.com/", "secret": "whsec_!!"}}, "webhook.secret"),
        ({"webhook": {"url": "https://x.example.com/", "secret": "whsec_"}}, "webhook.secret"),
        ({"webhook": {"url": "https://x.example.com/", "secret": [SECRET, "nope"]}}, "webhook.secret[1]"),
        ({"webhook": {"url": "https://x.example.com/"}}, "webhook.secret"),
        ({"webhook": {"secret": SECRET}}, "webhook.url"),
        ({"webhook": "https://x.example.com/"}, "webhook"),
        ({"service_url": "https://ews.example.com/EWS/Exchange.asmx"}, "service_url"),
    ],
)
async def test_bad_input_is_422_naming_the_field(v1: V1, changes: dict[str, Any], field: str) -> None:
    response = await v1.http.post("/v1/mailboxes", json=body(**changes))
    assert response.status_code == 422, response.text
    answer = response.json()
    assert [error["field"] for error in answer["errors"]] == [field]
    assert PASSWORD not in response.text and SECRET not in response.text
    assert await v1.store.list_mailbox_ids() == []


async def test_a_short_secret_is_accepted_as_the_verifier_libraries_accept_it(v1: V1) -> None:
    short = "whsec_" + base64.b64encode(b"test").decode()
    response = await v1.http.post(
        "/v1/mailboxes", json=body(webhook={"url": "https://x.example.com/", "secret": short})
    )
    assert response.status_code == 201, response.text


async def test_malformed_json_is_422_on_the_body(v1: V1) -> None:
    response = await v1.http.post("/v1/mailboxes", content=b'{"password": "' + PASSWORD.encode())
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "body"
    assert PASSWORD not in response.text


async def test_defaults_from_settings_and_protocols(nursery: trio.Nursery) -> None:
    port, store, _ = await start(nursery, default=WebhookTarget("https://default.example.com/h", (SECRET,)))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        response = await http.post("/v1/mailboxes", json=body(webhook=None, tls=False, port=143))
        assert response.status_code == 201, response.text
        mailbox = await store.get_mailbox(response.json()["id"])
        assert mailbox is not None and mailbox.webhook == WebhookTarget()
        assert mailbox.imap.security is Security.NONE
        assert response.json()["webhook"] == {"url": None, "default_url": True, "secrets": 0}
        ews = await http.post(
            "/v1/mailboxes",
            json=body(protocol="ews", host=None, port=None, service_url="https://mail.example.com"),
        )
        assert ews.status_code == 201, ews.text
        assert ews.json()["protocol"] == "ews"
        graph = await http.post("/v1/mailboxes", json=body(protocol="graph", host=None, port=None))
        assert graph.status_code == 201, graph.text
        stored = await store.get_mailbox(graph.json()["id"])
        assert stored is not None and stored.service_url == "https://graph.microsoft.com"


async def test_patch_changes_given_fields_and_rotates_the_secret(v1: V1) -> None:
    mailbox_id = (
        await v1.http.post(
            "/v1/mailboxes", json=body(webhook={"url": "https://a.example.com/h", "secret": OLD_SECRET})
        )
    ).json()["id"]
    before = await v1.store.get_mailbox(mailbox_id)
    assert before is not None
    changed = await v1.http.patch(
        f"/v1/mailboxes/{mailbox_id}",
        json={"folders": ["INBOX", "Support"], "webhook": {"secret": [SECRET, OLD_SECRET]}},
    )
    assert changed.status_code == 200, changed.text
    after = await v1.store.get_mailbox(mailbox_id)
    assert after is not None
    assert after.folders == ("INBOX", "Support")
    assert after.webhook == WebhookTarget("https://a.example.com/h", (SECRET, OLD_SECRET))
    assert after.password == PASSWORD and after.imap == before.imap
    assert after.revision == before.revision + 1  # restarts with the new folders
    # Plain-text now: tls decides the security again.
    plain = await v1.http.patch(f"/v1/mailboxes/{mailbox_id}", json={"tls": False, "port": 143})
    assert plain.status_code == 200 and plain.json()["security"] == "none"
    bad = await v1.http.patch(f"/v1/mailboxes/{mailbox_id}", json={"port": 0.5})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "port"
    assert (
        await v1.http.patch(f"/v1/mailboxes/{'1' * 8}-1111-1111-1111-{'1' * 12}", json={})
    ).status_code == 404


async def test_duplicate_id_is_409(v1: V1) -> None:
    mailbox_id = "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert (await v1.http.post("/v1/mailboxes", json=body(id=mailbox_id))).status_code == 201
    again = await v1.http.post("/v1/mailboxes", json=body(id=mailbox_id.upper()))
    assert again.status_code == 409 and again.json()["errors"][0]["field"] == "id"


async def test_list_pages_and_filters(v1: V1) -> None:
    ids = []
    for n in range(7):
        response = await v1.http.post("/v1/mailboxes", json=body(username=f"user{n}@example.com"))
        ids.append(response.json()["id"])
    ids.sort()
    await v1.store.set_status(ids[2], MailboxStatus(MailboxState.CONNECT_ERROR, last_error="refused"))
    page = (await v1.http.get("/v1/mailboxes", params={"offset": 2, "limit": 3})).json()
    assert [m["id"] for m in page["items"]] == ids[2:5]
    assert (page["total"], page["offset"], page["limit"]) == (7, 2, 3)
    failing = (await v1.http.get("/v1/mailboxes", params={"state": "connectError"})).json()
    assert [(m["id"], m["last_error"]) for m in failing["items"]] == [(ids[2], "refused")]
    found = (await v1.http.get("/v1/mailboxes", params={"q": "USER4@"})).json()
    assert [m["username"] for m in found["items"]] == ["user4@example.com"]
    assert (await v1.http.get("/v1/mailboxes", params={"kind": "creatio"})).json()["total"] == 0
    bad = await v1.http.get("/v1/mailboxes", params={"state": "asleep"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "state"
    assert (await v1.http.get("/v1/mailboxes", params={"limit": 0})).status_code == 422


def dead(event_id: str, mailbox_id: str = "m1", dead_at: float = 1.0) -> WebhookEvent:
    return WebhookEvent(
        id=event_id,
        endpoint="ep",
        url="https://app.example.com/h?token=abc",
        mailbox_id=mailbox_id,
        type="message.new",
        payload=json.dumps({"type": "message.new", "id": event_id, "mailbox": mailbox_id, "data": {}}),
        created_at=0.5,
        attempts=11,
        last_error="HTTP 503",
        dead_at=dead_at,
    )


async def put_dead(store: Store, *events: WebhookEvent) -> None:
    await store.outbox_add(events)
    for event in events:
        assert await store.outbox_dead_letter(event)


async def test_dead_letters_list_replay_and_drop(v1: V1) -> None:
    await put_dead(
        v1.store, dead("msg_1", dead_at=1), dead("msg_2", "m2", dead_at=2), dead("msg_3", dead_at=3)
    )
    listing = (await v1.http.get("/v1/dead-letters")).json()
    assert listing["total"] == 3
    first = listing["items"][0]
    assert {k: first[k] for k in ("id", "mailbox", "attempts", "last_error")} == {
        "id": "msg_1",
        "mailbox": "m1",
        "attempts": 11,
        "last_error": "HTTP 503",
    }
    assert first["event"]["id"] == "msg_1" and first["url"] == "https://app.example.com/h"
    assert (await v1.http.get("/v1/dead-letters/msg_2")).json()["mailbox"] == "m2"
    only_m1 = (
        await v1.http.get("/v1/dead-letters", params={"mailbox": "M1", "limit": 1, "offset": 1})
    ).json()
    assert ([item["id"] for item in only_m1["items"]], only_m1["total"]) == (["msg_3"], 2)

    one = await v1.http.post("/v1/dead-letters/msg_2/replay")
    assert one.status_code == 202 and one.json() == {"id": "msg_2", "replayed": 1}
    assert [e.id for e in v1.replayed] == ["msg_2"]
    assert [e.id for e in await v1.store.outbox_peek("ep", 10)] == ["msg_2"]
    assert (await v1.http.post("/v1/dead-letters/msg_2/replay")).status_code == 404

    assert (await v1.http.delete("/v1/dead-letters/msg_3")).status_code == 204
    assert (await v1.http.get("/v1/dead-letters/msg_3")).status_code == 404
    assert (await v1.http.delete("/v1/dead-letters/msg_3")).status_code == 404

    await put_dead(v1.store, dead("msg_4", "m2", dead_at=4), dead("msg_5", "m3", dead_at=5))
    only_m2 = await v1.http.post("/v1/dead-letters/replay", params={"mailbox": "m2"})
    assert only_m2.json() == {"replayed": 1}
    everything = await v1.http.post("/v1/dead-letters/replay")
    assert everything.status_code == 202 and everything.json() == {"replayed": 2}
    assert (await v1.http.get("/v1/dead-letters")).json() == {
        "items": [],
        "total": 0,
        "offset": 0,
        "limit": 100,
    }
    assert [e.id for e in await v1.store.outbox_peek("ep", 10)] == ["msg_2", "msg_4", "msg_1", "msg_5"]


async def test_outboxes_show_what_waits_per_receiver(v1: V1) -> None:
    assert (await v1.http.get("/v1/webhooks/outboxes")).json() == {"items": [], "total": 0}
    waiting = [dead(f"msg_{n}", dead_at=0.0) for n in range(3)]
    await v1.store.outbox_add(waiting)
    failed = dead("msg_0", dead_at=0.0)
    failed.attempts, failed.last_error, failed.next_attempt_at = (
        2,
        "cannot reach the receiver: ConnectError",
        99.0,
    )
    await v1.store.outbox_retry(failed)
    (item,) = (await v1.http.get("/v1/webhooks/outboxes")).json()["items"]
    assert item == {
        "url": "https://app.example.com/h",
        "waiting": 3,
        "oldest": {
            "id": "msg_0",
            "mailbox": "m1",
            "created_at": 0.5,
            "attempts": 2,
            "last_error": "cannot reach the receiver: ConnectError",
            "next_attempt_at": 99.0,
        },
    }


async def test_v1_needs_the_token_when_one_is_set(nursery: trio.Nursery) -> None:
    port, _store, _ = await start(nursery, api_token=TOKEN)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for method, path in [
            ("GET", "/v1/mailboxes"),
            ("POST", "/v1/mailboxes"),
            ("GET", "/v1/dead-letters"),
        ]:
            assert (await http.request(method, path, json=body())).status_code == 401
        authorised = await http.post(
            "/v1/mailboxes", json=body(), headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert authorised.status_code == 201


async def test_list_of_10000_mailboxes_pages_fast(v1: V1) -> None:
    # The console's list: one page of 10,000 registered mailboxes, filtered by state.
    from emlisten.models import MailboxConfig, ServerEndpoint

    mailboxes = [
        MailboxConfig(
            id=f"{n:08x}-0000-4000-8000-000000000000",
            user_name=f"u{n}@example.com",
            imap=ServerEndpoint("imap.example.com", 993, Security.SSL_ON_CONNECT),
            bpm_endpoint="",
            webhook=WebhookTarget("https://app.example.com/h", (SECRET,)),
        )
        for n in range(10_000)
    ]
    await v1.store.put_mailboxes(mailboxes)
    await v1.store.set_statuses({m.id: MailboxStatus(MailboxState.LISTENING) for m in mailboxes[::2]})
    started = time.perf_counter()
    page = (
        await v1.http.get("/v1/mailboxes", params={"limit": 50, "offset": 4000, "state": "listening"})
    ).json()
    elapsed = time.perf_counter() - started
    assert page["total"] == 5000 and len(page["items"]) == 50
    assert elapsed < 2.0, f"{elapsed:.3f}s"  # a loose bound: CI machines are shared
