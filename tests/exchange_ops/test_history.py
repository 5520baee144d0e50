"""History loads (POST /api/email/synchronize) of EWS and Graph mailboxes, through a node's HTTP
API, against the EWS and Graph simulators and the Creatio stand-in: mail since the date, in date
order, once, with the Email.Id live delivery gives the same item, throttling answers waited out."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import trio

from emlisten.models import INBOX, MailboxState, email_id
from tests.ews.test_source import mime
from tests.exchange_ops.conftest import ews_account, ews_credentials, graph_account, graph_credentials
from tests.graph.conftest import GraphService
from tests.servers.ews import EwsSimulator
from tests.servers.graph import GraphSimulator

#: Received times of the old mails: deliberately not in arrival order.
OLD_DATES = [datetime(2023, 1, day, 12, 0, tzinfo=UTC) for day in (3, 1, 5, 2, 4)]
SINCE = "2022-12-01T00:00:00Z"
TOO_OLD = datetime(2021, 6, 1, tzinfo=UTC)


def subject_of(moment: datetime) -> str:
    return f"old mail of {moment:%Y-%m-%d}"


async def create_listening(node: GraphService, credentials: dict[str, Any]) -> str:
    response = await node.http.post("/api/listeners/create", json=[credentials])
    assert response.status_code == 200, response.text
    await node.wait_state(credentials["Id"], MailboxState.LISTENING)
    return str(credentials["Id"])


async def synchronize(node: GraphService, credentials: dict[str, Any], filters: Any = SINCE) -> Any:
    response = await node.http.post(
        "/api/email/synchronize", json={"Credentials": credentials, "Filters": filters}
    )
    assert response.status_code == 200, response.text
    assert response.json()["Started"] is True
    return response.json()


async def wait_history(node: GraphService, mailbox_id: str, timeout: float = 20) -> dict[str, Any]:
    # Progress lives in the node's memory and has no change feed: poll it briefly.
    with trio.fail_after(timeout):
        while True:
            body = (await node.http.get("/v1/mailboxes")).json()
            (entry,) = [m for m in body["mailboxes"] if m["id"] == mailbox_id]
            history: dict[str, Any] | None = entry["history"]
            if history is not None and history["state"] != "running":
                return history
            await trio.sleep(0.02)


async def test_ews_history_since_the_date_once_in_date_order_beside_live_mail(
    node: GraphService, ews_sim: EwsSimulator
) -> None:
    account = ews_account(ews_sim)
    old_ids = {
        when: ews_sim.add_message(account.address, mime(subject_of(when)), received=when)
        for when in OLD_DATES
    }
    ews_sim.add_message(account.address, mime("too old"), received=TOO_OLD)
    ews_sim.find_count_limit = 2  # Exchange pages FindItem: make the load page too
    credentials = ews_credentials(ews_sim, account, node.creatio)
    mailbox_id = await create_listening(node, credentials)
    live_id = ews_sim.add_message(account.address, mime("live mail"))
    (live,) = await node.creatio.wait_for_emails(mailbox_id, 1, timeout=15)
    assert live["Subject"] == "live mail" and live["Id"] == email_id(mailbox_id, INBOX, live_id)

    await synchronize(node, credentials)
    done = await wait_history(node, mailbox_id)
    assert done["state"] == "done" and done["error"] is None
    assert (done["total"], done["delivered"], done["skipped"], done["remaining"]) == (5, 5, 0, 0)
    emails = node.creatio.emails_for(mailbox_id)
    assert [e["Subject"] for e in emails] == ["live mail"] + [subject_of(d) for d in sorted(OLD_DATES)]
    # Each carries the Email.Id live delivery would have given the item.
    assert {e["Id"] for e in emails[1:]} == {email_id(mailbox_id, INBOX, i) for i in old_ids.values()}
    finds = ews_sim.requests_for(account.address, "FindItem")
    assert len(finds) == 3 and all(r.status == 200 for r in finds)  # 6 listed (the live one too)

    # Creatio's failover job asks again: nothing is delivered twice.
    ews_sim.add_message(account.address, mime("live again"))
    await node.creatio.wait_for_emails(mailbox_id, 7, timeout=15)
    await synchronize(node, credentials)
    again = await wait_history(node, mailbox_id)
    assert (again["state"], again["total"], again["delivered"], again["skipped"]) == ("done", 0, 0, 5)
    emails = node.creatio.emails_for(mailbox_id)
    assert len(emails) == 7 and len({e["Id"] for e in emails}) == 7
    # Ticks 0 (DateTime.MinValue) means everything: only the too old one is new.
    await synchronize(node, credentials, 0)
    everything = await wait_history(node, mailbox_id)
    assert (everything["state"], everything["delivered"], everything["skipped"]) == ("done", 1, 5)
    assert node.creatio.emails_for(mailbox_id)[-1]["Subject"] == "too old"


async def test_ews_history_waits_out_server_busy(node: GraphService, ews_sim: EwsSimulator) -> None:
    account = ews_account(ews_sim)
    for when in OLD_DATES:
        ews_sim.add_message(account.address, mime(subject_of(when)), received=when)
    credentials = ews_credentials(ews_sim, account, node.creatio)
    mailbox_id = await create_listening(node, credentials)

    ews_sim.throttle(account.address, back_off_ms=400, count=1)
    await synchronize(node, credentials)
    done = await wait_history(node, mailbox_id)
    assert (done["state"], done["delivered"]) == ("done", 5)
    requests = ews_sim.requests_for(account.address)
    (busy,) = [r for r in requests if r.busy]
    after = [r for r in requests if r.at > busy.at]
    assert after and min(r.at for r in after) >= busy.at + 0.4  # never earlier than asked
    assert [e["Subject"] for e in node.creatio.emails_for(mailbox_id)] == [
        subject_of(d) for d in sorted(OLD_DATES)
    ]


async def test_graph_history_since_the_date_once_in_date_order_beside_live_mail(
    node: GraphService, graph_sim: GraphSimulator
) -> None:
    address, token = graph_account(graph_sim)
    old_ids = {
        when: graph_sim.add_message(address, mime(subject_of(when)), received=when) for when in OLD_DATES
    }
    graph_sim.add_message(address, mime("too old"), received=TOO_OLD)
    graph_sim.max_list_page = 2  # Graph pages the listing: follow @odata.nextLink
    credentials = graph_credentials(graph_sim, address, token, node.creatio)
    mailbox_id = await create_listening(node, credentials)
    live_id = graph_sim.add_message(address, mime("live mail"))
    (live,) = await node.creatio.wait_for_emails(mailbox_id, 1, timeout=15)
    assert live["Id"] == email_id(mailbox_id, INBOX, live_id)

    await synchronize(node, credentials)
    done = await wait_history(node, mailbox_id)
    assert done["state"] == "done" and done["error"] is None
    assert (done["total"], done["delivered"], done["skipped"], done["remaining"]) == (5, 5, 0, 0)
    emails = node.creatio.emails_for(mailbox_id)
    assert [e["Subject"] for e in emails] == ["live mail"] + [subject_of(d) for d in sorted(OLD_DATES)]
    assert {e["Id"] for e in emails[1:]} == {email_id(mailbox_id, INBOX, i) for i in old_ids.values()}
    listings = graph_sim.requests_to("GET", r"/mailFolders/[^/]+/messages$")
    assert len(listings) == 3  # 2 + 2 + 1 (the live mail is past the floor, not listed)

    await synchronize(node, credentials, {"StartDate": 0})  # DateTime.MinValue: everything
    again = await wait_history(node, mailbox_id)
    assert (again["state"], again["total"], again["delivered"], again["skipped"]) == ("done", 1, 1, 5)
    emails = node.creatio.emails_for(mailbox_id)
    assert emails[-1]["Subject"] == "too old" and len({e["Id"] for e in emails}) == 7


async def test_graph_history_waits_out_429_of_its_mailbox(
    node: GraphService, graph_sim: GraphSimulator
) -> None:
    address, token = graph_account(graph_sim)
    for when in OLD_DATES:
        graph_sim.add_message(address, mime(subject_of(when)), received=when)
    credentials = graph_credentials(graph_sim, address, token, node.creatio)
    mailbox_id = await create_listening(node, credentials)

    graph_sim.throttle(2, retry_after="0.5", user=address)
    await synchronize(node, credentials)
    done = await wait_history(node, mailbox_id)
    assert (done["state"], done["delivered"]) == ("done", 5)
    mine = [r for r in graph_sim.requests if address in r.path]
    throttled = [r for r in mine if r.status == 429]
    assert len(throttled) == 2
    assert throttled[1].at >= throttled[0].at + 0.5
    after = [r for r in mine if r.at > throttled[1].at]
    assert after and min(r.at for r in after) >= throttled[1].at + 0.5
    assert len(node.creatio.emails_for(mailbox_id)) == 5


async def test_ews_load_shows_progress_and_stops_when_the_mailbox_is_closed(
    node: GraphService, ews_sim: EwsSimulator
) -> None:
    account = ews_account(ews_sim)
    for when in OLD_DATES:
        ews_sim.add_message(account.address, mime(subject_of(when)), received=when)
    credentials = ews_credentials(ews_sim, account, node.creatio)
    mailbox_id = await create_listening(node, credentials)
    node.creatio.fail_mailbox(mailbox_id, 500)  # the load keeps retrying its first batch
    await synchronize(node, credentials)
    await node.creatio.wait_for_calls("ProcessFullEmail", 2)
    # Each retry plans again (the total is recounted then): poll until a pass has planned.
    with trio.fail_after(10):
        while True:
            body = (await node.http.get("/v1/mailboxes")).json()
            (entry,) = [m for m in body["mailboxes"] if m["id"] == mailbox_id]
            running = entry["history"]
            if running["total"] == 5:
                break
            await trio.sleep(0.02)
    assert (running["state"], running["delivered"], running["remaining"]) == ("running", 0, 5)

    response = await node.http.post("/api/listeners/close", json=[mailbox_id])
    assert response.status_code == 200
    lease = f"history/{mailbox_id}"
    with trio.fail_after(10):
        while (await node.adapters.store.lease_owners([lease]))[lease] is not None:
            await trio.sleep(0.02)
    node.creatio.fail_mailbox(mailbox_id, None)
    assert node.creatio.emails_for(mailbox_id) == []


async def test_ews_load_retries_after_getitem_stays_busy(node: GraphService, ews_sim: EwsSimulator) -> None:
    """GetItem busy past the client's patience fails one pass (fetched ahead of delivery); the
    load retries and delivers every mail once."""
    account = ews_account(ews_sim)
    for when in OLD_DATES:
        ews_sim.add_message(account.address, mime(subject_of(when)), received=when)
    credentials = ews_credentials(ews_sim, account, node.creatio)
    mailbox_id = await create_listening(node, credentials)

    ews_sim.throttle(account.address, back_off_ms=20, count=6, operation="GetItem")
    await synchronize(node, credentials)
    done = await wait_history(node, mailbox_id)
    assert (done["state"], done["delivered"], done["error"]) == ("done", 5, None)
    busy = [r for r in ews_sim.requests_for(account.address, "GetItem") if r.busy]
    assert len(busy) == 6
    assert len(ews_sim.requests_for(account.address, "FindItem")) == 2  # a second pass
    emails = node.creatio.emails_for(mailbox_id)
    assert [e["Subject"] for e in emails] == [subject_of(d) for d in sorted(OLD_DATES)]


async def test_ews_history_of_each_folder_with_its_own_email_ids(
    node: GraphService, ews_sim: EwsSimulator
) -> None:
    account = ews_account(ews_sim)
    projects = ews_sim.add_folder(account.address, "Projects")
    for when in OLD_DATES[:2]:
        ews_sim.add_message(account.address, mime(subject_of(when)), received=when)
    kept = {
        ews_sim.add_message(account.address, mime(f"filed {when:%d}"), folder_id=projects, received=when)
        for when in OLD_DATES[2:]
    }
    credentials = ews_credentials(ews_sim, account, node.creatio, FolderIds=["Inbox", projects])
    mailbox_id = await create_listening(node, credentials)
    await synchronize(node, credentials)
    done = await wait_history(node, mailbox_id)
    assert (done["state"], done["delivered"]) == ("done", 5)
    emails = node.creatio.emails_for(mailbox_id)
    # Folders in their configured order, each in date order.
    assert [e["Subject"] for e in emails] == [subject_of(d) for d in sorted(OLD_DATES[:2])] + [
        f"filed {d:%d}" for d in sorted(OLD_DATES[2:])
    ]
    assert {e["Id"] for e in emails[2:]} == {email_id(mailbox_id, projects, i) for i in kept}
