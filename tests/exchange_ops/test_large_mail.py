"""A 25 MB mail sent through POST /apiv2/email/send and received by a listening mailbox, for EWS
(one CreateItem, as for any mail) and for Graph (over 3 MB: a draft, an upload session in
320 KiB-aligned chunks of under 4 MB, then send), ending at the Creatio stand-in intact."""

from __future__ import annotations

import base64
import hashlib
import os
from email import message_from_bytes
from email.policy import default as default_policy
from typing import Any

from emlisten.mail.graph.send import DIRECT_SEND_LIMIT, split_attachments
from emlisten.models import MailboxState
from tests.exchange_ops.conftest import ews_account, ews_credentials, graph_account, graph_credentials
from tests.graph.conftest import GraphService
from tests.servers.ews import EwsSimulator
from tests.servers.graph import GraphSimulator

#: An 18.3 MB attachment: the MIME (base64, 76-character lines) comes to 25.0 MB.
BIG = os.urandom(18_300_000)
LOGO = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
MB = 1_000_000


def email_json(sender: str, to: str) -> dict[str, Any]:
    return {
        "Subject": "Quartalsbericht ✓ (groß)",
        "Body": '<p>Anbei.</p><img src="cid:logo@creatio">',
        "IsHtmlBody": True,
        "Sender": sender,
        "Recepients": [to],
        "Attachments": [
            {"Name": "bericht.bin", "Base64Data": base64.b64encode(BIG).decode(), "IsInline": False},
            {
                "Name": "logo.png",
                "Base64Data": base64.b64encode(LOGO).decode(),
                "IsInline": True,
                "ContentId": "logo@creatio",
                "ContentType": "image/png",
            },
        ],
    }


def attachments_of(email: dict[str, Any]) -> dict[str, bytes]:
    return {a["Name"]: base64.b64decode(a["Base64Data"]) for a in email["Attachments"]}


async def listen(node: GraphService, body: dict[str, Any]) -> str:
    response = await node.http.post("/api/listeners/create", json=[body])
    assert response.status_code == 200, response.text
    await node.wait_state(body["Id"], MailboxState.LISTENING)
    return str(body["Id"])


async def test_ews_sends_and_receives_a_25_mb_mail(node: GraphService, ews_sim: EwsSimulator) -> None:
    sender, recipient = ews_account(ews_sim), ews_account(ews_sim)
    mailbox_id = await listen(node, ews_credentials(ews_sim, recipient, node.creatio))
    response = await node.http.post(
        "/apiv2/email/send",
        json={
            "Email": email_json(sender.address, recipient.address),
            "Credentials": ews_credentials(ews_sim, sender, node.creatio),
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    (sent,) = ews_sim.sent
    assert 24.5 * MB < len(sent.mime) < 25 * 1024 * 1024
    (request,) = ews_sim.requests_for(sender.address, "CreateItem")
    assert request.status == 200
    (email,) = await node.creatio.wait_for_emails(mailbox_id, 1, timeout=60)
    assert email["Subject"] == "Quartalsbericht ✓ (groß)"
    received = attachments_of(email)
    assert hashlib.sha256(received["bericht.bin"]).digest() == hashlib.sha256(BIG).digest()
    assert received["logo.png"] == LOGO


async def test_graph_sends_a_25_mb_mail_through_an_upload_session_and_receives_it(
    node: GraphService, graph_sim: GraphSimulator
) -> None:
    sender, sender_token = graph_account(graph_sim)
    recipient, recipient_token = graph_account(graph_sim)
    mailbox_id = await listen(node, graph_credentials(graph_sim, recipient, recipient_token, node.creatio))
    response = await node.http.post(
        "/apiv2/email/send",
        json={
            "Email": email_json(sender, recipient),
            "Credentials": graph_credentials(graph_sim, sender, sender_token, node.creatio),
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-Emlisten-Saved-To-Sent"] == "true"
    assert graph_sim.requests_to("POST", r"/sendMail$") == []  # over 4 MB: refused there
    (draft,) = graph_sim.requests_to("POST", r"/users/[^/]+/messages$")
    assert draft.status == 201
    (session,) = graph_sim.requests_to("POST", r"/attachments/createUploadSession$")
    assert session.status == 201
    chunks = graph_sim.upload_chunks
    assert sum(chunks) == len(BIG) and len(chunks) == 5
    assert all(c % (320 * 1024) == 0 and c < 4 * 1024 * 1024 for c in chunks[:-1])
    assert [r.status for r in graph_sim.requests_to("PUT", r"^/upload/")] == [200] * 4 + [201]
    assert [r.status for r in graph_sim.requests_to("POST", r"/messages/[^/]+/send$")] == [202]
    assert graph_sim.drafts == {} and graph_sim.uploads == {}
    (sent,) = graph_sim.sent
    assert len(sent.mime) > 24.5 * MB
    headers = message_from_bytes(sent.mime, policy=default_policy)
    assert headers["Message-ID"] == response.json()  # the draft kept compose's headers
    assert headers["Subject"] == "Quartalsbericht ✓ (groß)" and headers["To"] == recipient
    (copy,) = graph_sim.messages_in(sender, "sentitems")
    assert copy.mime == sent.mime

    (email,) = await node.creatio.wait_for_emails(mailbox_id, 1, timeout=60)
    assert email["Subject"] == "Quartalsbericht ✓ (groß)"
    received = attachments_of(email)
    assert hashlib.sha256(received["bericht.bin"]).digest() == hashlib.sha256(BIG).digest()
    assert received["logo.png"] == LOGO


def test_split_takes_out_the_biggest_attachments_until_the_rest_fits() -> None:
    small = b"a" * 1000
    from email.message import EmailMessage

    message = EmailMessage()
    message["Subject"] = "s"
    message["From"] = "a@example.test"
    message["To"] = "b@example.test"
    message.set_content("body")
    message.add_attachment(BIG[: 3 * MB], maintype="application", subtype="octet-stream", filename="big.bin")
    message.add_attachment(small, maintype="text", subtype="plain", filename="small.txt")
    mime = message.as_bytes()
    assert len(mime) > DIRECT_SEND_LIMIT
    rest, detached = split_attachments(mime)
    assert [(d.name, d.data) for d in detached] == [("big.bin", BIG[: 3 * MB])]
    assert b"small.txt" in rest and b"big.bin" not in rest and len(rest) < 10_000


async def test_graph_adds_smaller_attachments_by_post_and_deletes_the_draft_on_refusal(
    node: GraphService, graph_sim: GraphSimulator
) -> None:
    sender, token = graph_account(graph_sim)
    recipient, _ = graph_account(graph_sim)
    # The large one takes an upload session (one chunk); without it the MIME is still over the
    # draft limit, so the medium one is taken out too, and added by POST.
    medium, large = os.urandom(1_600_000), os.urandom(3_200_000)
    email = email_json(sender, recipient)
    email["Attachments"][0] = {"Name": "gross.bin", "Base64Data": base64.b64encode(large).decode()}
    email["Attachments"].append({"Name": "mittel.bin", "Base64Data": base64.b64encode(medium).decode()})
    credentials = graph_credentials(graph_sim, sender, token, node.creatio)
    graph_sim.throttle_uploads(1, retry_after="0.5")  # a chunk is throttled: waited out, sent again
    response = await node.http.post("/apiv2/email/send", json={"Email": email, "Credentials": credentials})
    assert response.status_code == 200, response.text
    assert len(graph_sim.requests_to("POST", r"/attachments/createUploadSession$")) == 1
    puts = graph_sim.requests_to("PUT", r"^/upload/")
    assert [r.status for r in puts] == [429, 201]
    assert puts[1].at - puts[0].at >= 0.5
    (posted,) = graph_sim.requests_to("POST", r"/attachments$")
    assert posted.status == 201
    (sent,) = graph_sim.sent
    parts = {
        part.get_filename(): part
        for part in message_from_bytes(sent.mime, policy=default_policy).walk()
        if part.get_filename() is not None
    }
    assert parts["gross.bin"].get_payload(decode=True) == large
    assert parts["mittel.bin"].get_payload(decode=True) == medium
    # The small inline image stayed in the draft's MIME, with its Content-ID.
    assert parts["logo.png"].get_payload(decode=True) == LOGO
    assert parts["logo.png"]["Content-ID"] == "<logo@creatio>"
    (received,) = graph_sim.messages_in(recipient, "inbox")
    assert len(received.mime) > 6 * MB

    # Over the server's attachment limit: the size answer, and no draft left behind.
    graph_sim.max_attachment_bytes = 3_000_000
    response = await node.http.post("/apiv2/email/send", json={"Email": email, "Credentials": credentials})
    assert response.status_code == 422, response.text
    assert graph_sim.drafts == {} and len(graph_sim.sent) == 1
    assert graph_sim.requests_to("DELETE", r"/messages/[^/]+$")[-1].status == 204
