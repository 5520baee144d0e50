"""POST /apiv2/email/send for Exchange mailboxes, through a node's HTTP API, against the EWS and
Graph simulators: the exact composed MIME reaches the server, a copy lands in Sent Items, and the
servers' refusals come back as the SMTP path's answers."""

from __future__ import annotations

import base64
import email
import email.policy
from email.message import EmailMessage
from typing import Any

import trio

from emlisten.sender.compose import compose
from tests.exchange_ops.conftest import (
    ews_account,
    ews_credentials,
    graph_account,
    graph_credentials,
)
from tests.graph.conftest import GraphService
from tests.servers.ews import EwsSimulator
from tests.servers.graph import GraphSimulator

FILE = bytes(range(256)) * 40
LOGO = b"\x89PNG\r\n\x1a\n" + bytes(range(200))
HTML = '<p>Grüße, <b>Kunde</b> ✓</p><img src="cid:logo@creatio">'


def email_json(sender: str, to: list[str], **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "Subject": "Angebot Nr. 7: Ärger vermeiden ✓",
        "Body": HTML,
        "IsHtmlBody": True,
        "Sender": sender,
        "Recepients": to,
        "CopyRecepients": ["copy@example.test"],
        "BlindCopyRecepients": ["audit@example.test"],
        "Importance": 2,
        "Attachments": [
            {"Name": "Preisliste ü.bin", "Base64Data": base64.b64encode(FILE).decode(), "IsInline": False},
            {
                "Name": "logo.png",
                "Base64Data": base64.b64encode(LOGO).decode(),
                "IsInline": True,
                "ContentId": "logo@creatio",
                "ContentType": "image/png",
            },
        ],
    }
    data.update(changes)
    return data


def structure(mime: bytes) -> list[tuple[object, ...]]:
    """Every part: content type, disposition, file name, Content-ID and decoded payload."""
    message = email.message_from_bytes(mime, policy=email.policy.default)
    parts: list[tuple[object, ...]] = []
    for part in message.walk():
        payload = None if part.is_multipart() else part.get_payload(decode=True)
        parts.append(
            (
                part.get_content_type(),
                part.get_content_disposition(),
                part.get_filename(),
                part.get("Content-ID"),
                payload,
            )
        )
    return parts


def headers_of(mime: bytes) -> EmailMessage:
    message = email.message_from_bytes(mime, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def assert_as_composed(sent: bytes, request: dict[str, Any], message_id: str) -> None:
    """``sent`` is compose's output for ``request`` (same parts and bytes), with a Bcc header."""
    expected = compose(request["Email"], extra_attachments=request.get("Attachments"))
    assert structure(sent) == structure(expected.data)
    headers = headers_of(sent)
    assert headers["Message-ID"] == message_id
    assert headers["Subject"] == request["Email"]["Subject"]
    assert headers["Bcc"] == "audit@example.test"
    assert "audit@example.test" not in expected.data.decode("utf-8", "replace")


async def send(node: GraphService, body: dict[str, Any]) -> Any:
    return await node.http.post("/apiv2/email/send", json=body)


# -- EWS -----------------------------------------------------------------------------------------


async def test_ews_send_html_with_attachments_saves_a_copy_in_sent_items(
    node: GraphService, ews_sim: EwsSimulator
) -> None:
    account, colleague = ews_account(ews_sim), ews_account(ews_sim)
    body = {
        "Email": email_json(account.address, [colleague.address]),
        "Credentials": ews_credentials(ews_sim, account, node.creatio),
    }
    response = await send(node, body)
    assert response.status_code == 200, response.text
    message_id = response.json()
    assert message_id.startswith("<") and message_id.endswith(">")
    assert response.headers["X-Emlisten-Saved-To-Sent"] == "true"
    assert response.headers["X-Emlisten-Sent-Folder"] == "sentitems"

    (sent,) = ews_sim.sent
    assert sent.address == account.address.lower() and sent.disposition == "SendAndSaveCopy"
    assert sorted(sent.recipients) == sorted([colleague.address, "copy@example.test", "audit@example.test"])
    assert_as_composed(sent.mime, body, message_id)
    # The copy in Sent Items is the message as sent (Bcc kept, as Outlook's copies have it).
    (copy,) = account.items_in(account.sent_items.id)
    assert copy.id == sent.saved_item_id and copy.mime == sent.mime
    # The colleague (a mailbox on the same server) got it without the Bcc header.
    (received,) = colleague.items_in(colleague.inbox.id)
    assert headers_of(received.mime)["Bcc"] is None
    assert structure(received.mime) == structure(sent.mime)
    (request,) = ews_sim.requests_for(account.address, "CreateItem")
    assert request.anchor == account.address and request.authorization_scheme == "basic"


async def test_ews_save_to_sent_false_sends_only(node: GraphService, ews_sim: EwsSimulator) -> None:
    account = ews_account(ews_sim)
    body = {
        "Email": email_json(account.address, ["someone@example.test"], BlindCopyRecepients=[]),
        "Credentials": ews_credentials(ews_sim, account, node.creatio, SaveToSent=False),
    }
    response = await send(node, body)
    assert response.status_code == 200, response.text
    assert response.headers["X-Emlisten-Saved-To-Sent"] == "false"
    (sent,) = ews_sim.sent
    assert sent.disposition == "SendOnly" and sent.saved_item_id is None
    assert headers_of(sent.mime)["Bcc"] is None  # no Bcc recipients: compose's bytes unchanged
    assert account.items_in(account.sent_items.id) == []


async def test_ews_refusals_map_to_the_send_answers(node: GraphService, ews_sim: EwsSimulator) -> None:
    account = ews_account(ews_sim)
    creds = ews_credentials(ews_sim, account, node.creatio)

    ews_sim.rejected_recipients.add("blocked@example.test")
    response = await send(
        node,
        {
            "Email": email_json(account.address, ["ok@example.test", "blocked@example.test"]),
            "Credentials": creds,
        },
    )
    assert response.status_code == 422
    rejected = response.json()["RejectedRecipients"]
    assert list(rejected) == ["blocked@example.test"]
    assert rejected["blocked@example.test"].startswith("ErrorInvalidRecipients")

    response = await send(
        node, {"Email": email_json("boss@ews.example.test", ["ok@example.test"]), "Credentials": creds}
    )
    assert response.status_code == 422
    assert "ErrorSendAsDenied" in response.json()["Message"]

    ews_sim.max_message_bytes = 1000
    response = await send(
        node, {"Email": email_json(account.address, ["ok@example.test"]), "Credentials": creds}
    )
    assert response.status_code == 422 and "MaxSize" in response.json()
    ews_sim.max_message_bytes = 25 * 1024 * 1024

    wrong = dict(creds, Password="wrong-password-123")
    response = await send(
        node, {"Email": email_json(account.address, ["ok@example.test"]), "Credentials": wrong}
    )
    assert response.status_code == 502
    assert response.json()["Reason"] == "authentication"
    assert "wrong-password-123" not in response.text
    assert ews_sim.sent == []

    # Throttled: the back-off is waited out, then the message goes (once).
    ews_sim.throttle(account.address, 200)
    started = trio.current_time()
    response = await send(
        node, {"Email": email_json(account.address, ["ok@example.test"]), "Credentials": creds}
    )
    assert response.status_code == 200
    assert trio.current_time() - started >= 0.2
    assert len(ews_sim.sent) == 1


async def test_ews_unreachable_server_is_a_connection_error(
    node: GraphService, ews_sim: EwsSimulator
) -> None:
    account = ews_account(ews_sim)
    creds = ews_credentials(ews_sim, account, node.creatio, ServiceUrl="http://127.0.0.1:9/EWS/Exchange.asmx")
    response = await send(
        node, {"Email": email_json(account.address, ["ok@example.test"]), "Credentials": creds}
    )
    assert response.status_code == 502
    assert response.json()["Reason"] == "connection"


# -- Graph ---------------------------------------------------------------------------------------


async def test_graph_send_html_with_attachments_saves_a_copy_in_sent_items(
    node: GraphService, graph_sim: GraphSimulator
) -> None:
    address, token = graph_account(graph_sim)
    colleague, _ = graph_account(graph_sim)
    body = {
        "Email": email_json(address, [colleague]),
        "Credentials": graph_credentials(graph_sim, address, token, node.creatio),
    }
    response = await send(node, body)
    assert response.status_code == 200, response.text
    message_id = response.json()
    assert response.headers["X-Emlisten-Saved-To-Sent"] == "true"
    assert response.headers["X-Emlisten-Sent-Folder"] == "sentitems"

    (sent,) = graph_sim.sent
    assert sent.address == address
    assert sorted(sent.recipients) == sorted([colleague, "copy@example.test", "audit@example.test"])
    assert_as_composed(sent.mime, body, message_id)
    (copy,) = graph_sim.messages_in(address, "sentitems")
    assert copy.id == sent.saved_message_id and copy.mime == sent.mime
    (received,) = graph_sim.messages_in(colleague, "inbox")
    assert headers_of(received.mime)["Bcc"] is None
    (request,) = graph_sim.requests_to("POST", r"/sendMail$")
    assert request.status == 202


async def test_graph_refusals_and_throttling(node: GraphService, graph_sim: GraphSimulator) -> None:
    address, token = graph_account(graph_sim)
    creds = graph_credentials(graph_sim, address, token, node.creatio)

    graph_sim.rejected_recipients.add("blocked@example.test")
    response = await send(
        node,
        {"Email": email_json(address, ["ok@example.test", "blocked@example.test"]), "Credentials": creds},
    )
    assert response.status_code == 422
    assert list(response.json()["RejectedRecipients"]) == ["blocked@example.test"]

    response = await send(
        node, {"Email": email_json("boss@contoso.test", ["ok@example.test"]), "Credentials": creds}
    )
    assert response.status_code == 422
    assert "ErrorSendAsDenied" in response.json()["Message"]

    graph_sim.max_request_bytes = 2000
    response = await send(node, {"Email": email_json(address, ["ok@example.test"]), "Credentials": creds})
    assert response.status_code == 422 and response.json()["MaxSize"] is None
    graph_sim.max_request_bytes = 4 * 1024 * 1024

    graph_sim.revoke_token(token)
    response = await send(node, {"Email": email_json(address, ["ok@example.test"]), "Credentials": creds})
    assert response.status_code == 502 and response.json()["Reason"] == "authentication"
    assert token not in response.text
    assert graph_sim.sent == []

    token = graph_sim.issue_token(address)
    creds = dict(creds, AccessToken=token)
    graph_sim.throttle(1, retry_after="1")
    started = trio.current_time()
    response = await send(node, {"Email": email_json(address, ["ok@example.test"]), "Credentials": creds})
    assert response.status_code == 200, response.text
    assert trio.current_time() - started >= 1.0
    assert len(graph_sim.sent) == 1
    assert [r.status for r in graph_sim.requests_to("POST", r"/sendMail$")][-2:] == [429, 202]
