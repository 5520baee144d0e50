"""The Graph adapter through a whole node, against the Graph simulator and the Creatio stand-in."""

from __future__ import annotations

import base64
import time
from email.message import EmailMessage
from email.utils import make_msgid

import trio

from emlisten.mail.graph import AppCredentials, GraphSettings
from emlisten.models import MailboxState
from tests.graph.conftest import GraphService, start_graph_service
from tests.secret_scan import register_secret
from tests.servers.creatio import CreatioStandIn
from tests.servers.graph import GraphSimulator

TENANT = "11111111-2222-4333-8444-555555555555"


def mime(subject: str, body: str = "hello\n", attachment: bytes | None = None) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Sender <sender@example.test>"
    msg["To"] = "rcpt@contoso.test"
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="example.test")
    msg.set_content(body)
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="data.bin")
    return msg.as_bytes()


async def subscribed(service: GraphService, **changes: object) -> tuple[str, str, str]:
    address, token = service.account()
    mailbox = await service.create(service.mailbox(address, token, **changes))
    await service.sim.wait_until(lambda: len(service.sim.subscriptions_of(address)) == 1)
    return address, token, mailbox.id


def subjects(creatio: CreatioStandIn, mailbox_id: str) -> list[str]:
    return [e["Subject"] for e in creatio.emails_for(mailbox_id)]


async def settle(service: GraphService) -> None:
    """Let in-flight notifications and syncs finish (event driven: the queue runs dry)."""
    with trio.fail_after(10):
        while service.adapters.queue.depth():  # type: ignore[attr-defined]
            await trio.sleep(0.01)
    await trio.sleep(0.3)  # a duplicate, if any, would arrive now


async def test_new_mail_is_delivered_once_with_intact_content(graph_service: GraphService) -> None:
    sim, creatio = graph_service.sim, graph_service.creatio
    address, _, mailbox_id = await subscribed(graph_service)
    (subscription,) = sim.subscriptions_of(address)
    assert subscription.resource == f"users/{address}/mailFolders('inbox')/messages"
    assert subscription.change_type == "created"
    assert len(subscription.client_state) >= 32
    blob = bytes(range(256)) * 20
    sim.add_message(address, mime("Grüße ✓", "Schöne Grüße\n", blob))
    (email,) = await creatio.wait_for_emails(mailbox_id, 1, timeout=10)
    assert email["Subject"] == "Grüße ✓"
    assert "Schöne Grüße" in email["Body"]
    (attachment,) = email["Attachments"]
    assert base64.b64decode(attachment["Base64Data"]) == blob
    # A later change to the same message (e.g. read) and a second mail: only the new one comes.
    first_id = next(iter(sim.users[address].folders.values())).messages
    sim.update_message(address, next(iter(first_id)))
    sim.add_message(address, mime("second"))
    await creatio.wait_for_emails(mailbox_id, 2, timeout=10)
    await settle(graph_service)
    assert subjects(creatio, mailbox_id) == ["Grüße ✓", "second"]


async def test_mail_from_before_the_subscription_is_not_delivered(graph_service: GraphService) -> None:
    sim, creatio = graph_service.sim, graph_service.creatio
    address, token = graph_service.account()
    sim.add_message(address, mime("history"))
    await trio.sleep(1.1)  # Graph's clock has whole seconds: "before" must be a full second before
    mailbox = await graph_service.create(graph_service.mailbox(address, token))
    await sim.wait_until(lambda: len(sim.subscriptions_of(address)) == 1)
    sim.add_message(address, mime("fresh"))
    await creatio.wait_for_emails(mailbox.id, 1, timeout=10)
    await settle(graph_service)
    assert subjects(creatio, mailbox.id) == ["fresh"]


async def test_missed_notifications_are_caught_up_once(graph_service: GraphService) -> None:
    sim, creatio = graph_service.sim, graph_service.creatio
    address, _, mailbox_id = await subscribed(graph_service)
    sim.add_message(address, mime("one"))
    await creatio.wait_for_emails(mailbox_id, 1, timeout=10)
    sim.drop_notifications(address)
    sim.add_message(address, mime("two"))
    sim.add_message(address, mime("three"))
    sim.drop_notifications(address, False)
    (subscription,) = sim.subscriptions_of(address)
    sim.send_lifecycle(subscription.id, "missed")
    await creatio.wait_for_emails(mailbox_id, 3, timeout=10)
    sim.add_message(address, mime("four"))
    await creatio.wait_for_emails(mailbox_id, 4, timeout=10)
    await settle(graph_service)
    assert subjects(creatio, mailbox_id) == ["one", "two", "three", "four"]


async def test_removed_subscription_is_recreated(graph_service: GraphService) -> None:
    sim, creatio = graph_service.sim, graph_service.creatio
    address, _, mailbox_id = await subscribed(graph_service)
    (old,) = sim.subscriptions_of(address)
    sim.remove_subscription(old.id)
    sim.add_message(address, mime("while removed"))
    await sim.wait_until(lambda: [s.id for s in sim.subscriptions_of(address)] not in ([], [old.id]))
    sim.add_message(address, mime("after"))
    await creatio.wait_for_emails(mailbox_id, 2, timeout=10)
    await settle(graph_service)
    assert subjects(creatio, mailbox_id) == ["while removed", "after"]
    assert len(sim.subscriptions_of(address)) == 1


async def test_renewal_and_recreation_of_an_expired_subscription(
    nursery: trio.Nursery, graph_sim: GraphSimulator, creatio: CreatioStandIn
) -> None:
    service = await start_graph_service(
        nursery, graph_sim, creatio, graph_settings=GraphSettings(renew_seconds=0.3)
    )
    try:
        address, _, mailbox_id = await subscribed(service)
        (first,) = graph_sim.subscriptions_of(address)
        await graph_sim.wait_until(lambda: len(graph_sim.requests_to("PATCH", first.id)) >= 2)
        # Gone without a lifecycle notification (e.g. expired): the next renewal re-creates it.
        graph_sim.remove_subscription(first.id, notify=False)
        await graph_sim.wait_until(lambda: len(graph_sim.subscriptions_of(address)) == 1)
        graph_sim.add_message(address, mime("after renewal"))
        await creatio.wait_for_emails(mailbox_id, 1, timeout=10)
        assert graph_sim.subscriptions_of(address)[0].id != first.id
    finally:
        await service.aclose()


async def test_reauthorization_required(graph_service: GraphService) -> None:
    sim = graph_service.sim
    address, _, _ = await subscribed(graph_service)
    (subscription,) = sim.subscriptions_of(address)
    sim.send_lifecycle(subscription.id, "reauthorizationRequired")
    await sim.wait_until(
        lambda: bool(sim.requests_to("POST", f"/subscriptions/{subscription.id}/reauthorize"))
    )
    assert sim.requests_to("POST", "/reauthorize")[0].status == 204


async def test_throttling_is_honoured(graph_service: GraphService) -> None:
    sim, creatio = graph_service.sim, graph_service.creatio
    address, _, mailbox_id = await subscribed(graph_service)
    sim.throttle(2, retry_after="1")
    sim.add_message(address, mime("throttled"))
    await creatio.wait_for_emails(mailbox_id, 1, timeout=15)
    throttled = [r for r in sim.requests if r.status == 429]
    assert len(throttled) == 2
    later = [r for r in sim.requests if r.at > throttled[0].at]
    # Nothing was sent before each Retry-After had passed.
    assert later[0].at - throttled[0].at >= 0.95
    assert later[1].at - later[0].at >= 0.95


async def test_rejected_token_reports_the_mailbox_unavailable(
    nursery: trio.Nursery, graph_sim: GraphSimulator, creatio: CreatioStandIn
) -> None:
    service = await start_graph_service(nursery, graph_sim, creatio, token_refresh_wait_seconds=0.3)
    try:
        address, token = service.account()
        graph_sim.revoke_token(token)
        since = time.monotonic()
        mailbox = await service.create(service.mailbox(address, token), wait=False)
        state = await creatio.wait_for_state(mailbox.id, False, timeout=10, since=since)
        assert state["ExceptionClassName"]
        assert token not in str(state)
        await service.wait_state(mailbox.id, MailboxState.AUTHENTICATION_ERROR)
        assert creatio.calls("RefreshToken")
    finally:
        await service.aclose()


async def test_expired_sync_state_loses_nothing_and_doubles_nothing(graph_service: GraphService) -> None:
    sim, creatio = graph_service.sim, graph_service.creatio
    address, _, mailbox_id = await subscribed(graph_service)
    sim.add_message(address, mime("before"))
    await creatio.wait_for_emails(mailbox_id, 1, timeout=10)
    sim.expire_sync_states()
    sim.add_message(address, mime("after"))
    await creatio.wait_for_emails(mailbox_id, 2, timeout=10)
    await settle(graph_service)
    assert subjects(creatio, mailbox_id) == ["before", "after"]
    assert any(r.status == 410 for r in sim.requests)


async def test_other_folders_by_id(graph_service: GraphService) -> None:
    sim, creatio = graph_service.sim, graph_service.creatio
    address, token = graph_service.account()
    folder_id = sim.add_folder(address, "Support")
    mailbox = await graph_service.create(graph_service.mailbox(address, token, folders=(folder_id,)))
    await sim.wait_until(lambda: len(sim.subscriptions_of(address)) == 1)
    assert sim.subscriptions_of(address)[0].folder_id == folder_id
    sim.add_message(address, mime("inbox mail"))
    sim.add_message(address, mime("support mail"), folder=folder_id)
    await creatio.wait_for_emails(mailbox.id, 1, timeout=10)
    await settle(graph_service)
    assert subjects(creatio, mailbox.id) == ["support mail"]


async def test_closing_deletes_the_subscription(graph_service: GraphService) -> None:
    sim = graph_service.sim
    address, _, mailbox_id = await subscribed(graph_service)
    await graph_service.control.close([mailbox_id])
    await sim.wait_until(lambda: sim.subscriptions_of(address) == [])


async def test_notification_endpoint(graph_service: GraphService) -> None:
    http, source = graph_service.http, graph_service.source
    route = source.hub.signer.new_route("some-mailbox", "INBOX")
    answer = await http.post(route.notification_path, params={"validationToken": "Validation: abc 1"})
    assert answer.status_code == 200
    assert answer.text == "Validation: abc 1"
    assert answer.headers["content-type"].startswith("text/plain")
    lifecycle = await http.post(route.lifecycle_path, params={"validationToken": "x"})
    assert (lifecycle.status_code, lifecycle.text) == (200, "x")
    # Paths emlisten did not make get no echo.
    assert (
        await http.post("/v1/graph/notifications/abc.def", params={"validationToken": "x"})
    ).status_code == 404
    forged = {"value": [{"subscriptionId": "s", "clientState": "guess", "changeType": "created"}]}
    before = source.hub.rejected_total
    assert (await http.post(route.notification_path, json=forged)).status_code == 202
    assert source.hub.rejected_total == before + 1
    assert (await http.post(route.notification_path, content=b"{not json")).status_code == 400


async def test_app_only_access_without_a_mailbox_token(
    nursery: trio.Nursery, graph_sim: GraphSimulator, creatio: CreatioStandIn
) -> None:
    graph_sim.register_app(TENANT, "client-1", register_secret("app-secret-value-123"))
    app = AppCredentials(TENANT, "client-1", "app-secret-value-123", authority=graph_sim.base_url)
    service = await start_graph_service(nursery, graph_sim, creatio, app_credentials=app)
    try:
        address, _ = service.account()
        mailbox = await service.create(service.mailbox(address, "", use_oauth=False))
        await graph_sim.wait_until(lambda: len(graph_sim.subscriptions_of(address)) == 1)
        graph_sim.add_message(address, mime("app only"))
        await creatio.wait_for_emails(mailbox.id, 1, timeout=10)
        assert graph_sim.token_requests == 1  # cached between calls
    finally:
        await service.aclose()
