"""POST /api/mailbox/folders for Exchange mailboxes through a node's HTTP API: the folder tree
(non-ASCII names, nesting, paging) and its ids used as FolderIds for listening."""

from __future__ import annotations

from email.message import EmailMessage
from typing import Any

import pytest

from emlisten.mail.ews import folders as ews_folders
from emlisten.mail.graph import folders as graph_folders
from emlisten.models import MailboxState
from tests.exchange_ops.conftest import ews_account, ews_credentials, graph_account, graph_credentials
from tests.graph.conftest import GraphService
from tests.servers.ews import EwsSimulator
from tests.servers.graph import GraphSimulator

CLIENTS = "Клиенты"
MUELLER = "Müller & Söhne <GmbH>"
JAPANESE = "日本語のフォルダ"


def mime(subject: str) -> bytes:
    message = EmailMessage()
    message["From"] = "sender@example.test"
    message["To"] = "rcpt@example.test"
    message["Subject"] = subject
    message.set_content("hello ✓\n")
    return message.as_bytes()


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["Name"]: item for item in items}


async def test_ews_folder_tree_round_trips_into_folder_ids(
    node: GraphService, ews_sim: EwsSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ews_folders, "FOLDER_PAGE_SIZE", 2)  # several FindFolder pages
    account = ews_account(ews_sim)
    clients = ews_sim.add_folder(account.address, CLIENTS)
    mueller = ews_sim.add_folder(account.address, MUELLER, parent_id=clients)
    japanese = ews_sim.add_folder(account.address, JAPANESE, parent_id=account.inbox.id)
    ews_sim.add_folder(account.address, "Calendar", folder_class="IPF.Appointment", kind="CalendarFolder")
    creds = ews_credentials(ews_sim, account, node.creatio)

    response = await node.http.post("/api/mailbox/folders", json=creds)
    assert response.status_code == 200, response.text
    items = by_name(response.json())
    assert set(items) == {"Inbox", "Sent Items", CLIENTS, MUELLER, JAPANESE}
    assert items["Inbox"] == {
        "Id": account.inbox.id,
        "Name": "Inbox",
        "ParentId": None,
        "Selectable": True,
        "SpecialUse": None,
    }
    assert items[CLIENTS]["ParentId"] is None and items[CLIENTS]["Id"] == clients
    assert items[MUELLER]["ParentId"] == clients and items[MUELLER]["Id"] == mueller
    assert items[JAPANESE]["ParentId"] == account.inbox.id and items[JAPANESE]["Id"] == japanese
    assert len(ews_sim.requests_for(account.address, "FindFolder")) == 3

    # The listed id, sent back in FolderIds, is listened to.
    listen = dict(creds, FolderIds=[items[MUELLER]["Id"]])
    assert (await node.http.post("/api/listeners/create", json=[listen])).status_code == 200
    await node.wait_state(listen["Id"], MailboxState.LISTENING)
    ews_sim.add_message(account.address, mime("inbox mail"))
    ews_sim.add_message(account.address, mime("für Müller"), folder_id=mueller)
    (delivered,) = await node.creatio.wait_for_emails(listen["Id"], 1, timeout=15)
    assert delivered["Subject"] == "für Müller"


async def test_ews_folders_with_a_wrong_password(node: GraphService, ews_sim: EwsSimulator) -> None:
    account = ews_account(ews_sim)
    creds = ews_credentials(ews_sim, account, node.creatio, Password="not-the-password")
    response = await node.http.post("/api/mailbox/folders", json=creds)
    assert response.status_code == 502
    assert response.json()["Category"] == "MailAuthError"
    assert "not-the-password" not in response.text


async def test_graph_folder_tree_round_trips_into_folder_ids(
    node: GraphService, graph_sim: GraphSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(graph_folders, "PAGE_SIZE", 2)  # nextLink paging on the top level
    address, token = graph_account(graph_sim)
    clients = graph_sim.add_folder(address, CLIENTS)
    mueller = graph_sim.add_folder(address, MUELLER, parent=clients)
    deeper = graph_sim.add_folder(address, "Ärchiv 2024", parent=mueller)
    japanese = graph_sim.add_folder(address, JAPANESE, parent="inbox")
    inbox = graph_sim.users[address].folder("inbox")
    assert inbox is not None
    creds = graph_credentials(graph_sim, address, token, node.creatio)

    response = await node.http.post("/api/mailbox/folders", json=creds)
    assert response.status_code == 200, response.text
    listed = response.json()
    items = by_name(listed)
    assert set(items) == {"Inbox", "Sent Items", CLIENTS, MUELLER, "Ärchiv 2024", JAPANESE}
    assert items["Inbox"]["ParentId"] is None and items["Inbox"]["Id"] == inbox.id
    assert items[CLIENTS]["ParentId"] is None
    assert items[MUELLER]["ParentId"] == clients
    assert items["Ärchiv 2024"] == {
        "Id": deeper,
        "Name": "Ärchiv 2024",
        "ParentId": mueller,
        "Selectable": True,
        "SpecialUse": None,
    }
    assert items[JAPANESE]["ParentId"] == inbox.id and items[JAPANESE]["Id"] == japanese
    # Depth first: every folder comes before its children.
    position = {item["Id"]: index for index, item in enumerate(listed)}
    assert all(position[i["ParentId"]] < position[i["Id"]] for i in listed if i["ParentId"])
    assert graph_sim.requests_to("GET", r"/mailFolders$")  # the top level, in pages
    assert len(graph_sim.requests_to("GET", r"/childFolders$")) == 3  # inbox, clients, mueller

    listen = dict(creds, FolderIds=[items["Ärchiv 2024"]["Id"]])
    assert (await node.http.post("/api/listeners/create", json=[listen])).status_code == 200
    await node.wait_state(listen["Id"], MailboxState.LISTENING)
    await graph_sim.wait_until(lambda: len(graph_sim.subscriptions_of(address)) == 1)
    graph_sim.add_message(address, mime("inbox mail"))
    graph_sim.add_message(address, mime("archived ✓"), folder=deeper)
    (delivered,) = await node.creatio.wait_for_emails(listen["Id"], 1, timeout=15)
    assert delivered["Subject"] == "archived ✓"


async def test_graph_folders_with_a_revoked_token(node: GraphService, graph_sim: GraphSimulator) -> None:
    address, token = graph_account(graph_sim)
    graph_sim.revoke_token(token)
    response = await node.http.post(
        "/api/mailbox/folders", json=graph_credentials(graph_sim, address, token, node.creatio)
    )
    assert response.status_code == 502
    assert response.json()["Category"] == "MailTokenRejectedError"
    assert token not in response.text
