"""Pure logic of Exchange sending and folder lists, on in-memory data."""

from __future__ import annotations

import base64
import email
import email.policy

import pytest

from emlisten.api.credentials import parse_credentials
from emlisten.mail.ews import _soap
from emlisten.mail.ews.folders import ews_folder_tree
from emlisten.mail.ews.send import bcc_recipients, exchange_mime, rejected_recipients_error
from emlisten.models import MailboxConfig
from emlisten.sender import SendError, SendResult
from emlisten.sender.compose import ComposedMessage, compose
from emlisten.sender.router import ProtocolSender

CREDENTIALS = {
    "Id": "0F8FAD5B-D9CB-469F-A165-70867728950E",
    "UserName": "user@contoso.test",
    "Password": "a-password-of-some-length",
    "SenderEmailAddress": "user@contoso.test",
    "BpmEndpoint": "http://127.0.0.1:9/x",
}


def composed(**fields: object) -> ComposedMessage:
    return compose(
        {
            "Subject": "Hi",
            "Body": "x",
            "Sender": "user@contoso.test",
            "Recepients": ["a@example.test"],
            **fields,
        }
    )


def test_bcc_becomes_a_header_and_nothing_else_changes() -> None:
    message = composed(
        CopyRecepients=["c@example.test"],
        BlindCopyRecepients=["b1@example.test", "A@example.test", "b2@x.test"],
    )
    assert bcc_recipients(message) == ["b1@example.test", "b2@x.test"]
    data = exchange_mime(message)
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed["Bcc"] == "b1@example.test, b2@x.test"
    header_end = message.data.index(b"\r\n\r\n")
    assert data.endswith(message.data[header_end + 2 :])
    assert data.replace(b"Bcc: b1@example.test, b2@x.test\r\n", b"") == message.data


def test_no_bcc_keeps_the_bytes() -> None:
    message = composed()
    assert exchange_mime(message) is message.data


def test_rejected_recipients_are_the_named_ones_else_all() -> None:
    error = rejected_recipients_error(
        "ErrorInvalidRecipients",
        "Recipient 'B@example.test' is not resolved.",
        ["a@example.test", "b@example.test"],
        "x",
    )
    assert list(error.recipients) == ["b@example.test"]
    error = rejected_recipients_error("ErrorInvalidRecipients", "", ["a@example.test", "b@example.test"], "x")
    assert list(error.recipients) == ["a@example.test", "b@example.test"]


def test_create_item_request_escapes_and_picks_the_disposition() -> None:
    mime = base64.b64encode(b"Subject: <&>\r\n\r\nx").decode()
    saved = _soap.create_item_send(mime, save_copy=True)
    assert 'MessageDisposition="SendAndSaveCopy"' in saved and 'Id="sentitems"' in saved
    assert mime in saved
    only = _soap.create_item_send(mime, save_copy=False)
    assert 'MessageDisposition="SendOnly"' in only and "SavedItemFolderId" not in only
    # A well-formed envelope (defusedxml parses it).
    _soap.parse(_soap.envelope(saved))


def test_find_folder_answer_to_folder_items() -> None:
    folders = (
        '<t:Folder><t:FolderId Id="A1"/><t:ParentFolderId Id="ROOT"/>'
        "<t:FolderClass>IPF.Note</t:FolderClass><t:DisplayName>Входящие</t:DisplayName></t:Folder>"
        '<t:Folder><t:FolderId Id="A2"/><t:ParentFolderId Id="A1"/>'
        "<t:DisplayName>Müller &amp; Co</t:DisplayName></t:Folder>"
        '<t:CalendarFolder><t:FolderId Id="C1"/><t:ParentFolderId Id="ROOT"/>'
        "<t:FolderClass>IPF.Appointment</t:FolderClass><t:DisplayName>Kalender</t:DisplayName>"
        "</t:CalendarFolder>"
        '<t:Folder><t:FolderId Id="N1"/><t:ParentFolderId Id="ROOT"/>'
        "<t:FolderClass>IPF.StickyNote</t:FolderClass><t:DisplayName>Notes</t:DisplayName></t:Folder>"
    )
    answer = (
        f'<s:Envelope xmlns:s="{_soap.SOAP_NS}"><s:Body>'
        f'<m:FindFolderResponse xmlns:m="{_soap.MESSAGES_NS}" xmlns:t="{_soap.TYPES_NS}">'
        '<m:ResponseMessages><m:FindFolderResponseMessage ResponseClass="Success">'
        "<m:ResponseCode>NoError</m:ResponseCode>"
        '<m:RootFolder IndexedPagingOffset="4" TotalItemsInView="9" IncludesLastItemInRange="false">'
        f"<t:Folders>{folders}</t:Folders></m:RootFolder></m:FindFolderResponseMessage>"
        "</m:ResponseMessages></m:FindFolderResponse></s:Body></s:Envelope>"
    )
    (message,) = _soap.response_messages(_soap.parse(answer.encode()))
    page = _soap.folder_page(message)
    assert (page.includes_last, page.next_offset, len(page.folders)) == (False, 4, 4)
    assert ews_folder_tree(page.folders) == [
        {"Id": "A1", "Name": "Входящие", "ParentId": None, "Selectable": True, "SpecialUse": None},
        {"Id": "A2", "Name": "Müller & Co", "ParentId": "A1", "Selectable": True, "SpecialUse": None},
    ]


class _Recorder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[str] = []

    async def send_message(self, mailbox: MailboxConfig, message: ComposedMessage) -> SendResult:
        self.calls.append(mailbox.protocol)
        return SendResult(self.name, saved_to_sent=False)


async def test_protocol_sender_dispatches_by_protocol() -> None:
    senders = {name: _Recorder(name) for name in ("imap", "ews", "graph")}
    router = ProtocolSender(senders)
    message = composed()
    imap = parse_credentials(dict(CREDENTIALS, ServiceUrl="imap.contoso.test"))
    ews = parse_credentials(dict(CREDENTIALS, ServiceUrl="https://mail.contoso.test/EWS/Exchange.asmx"))
    graph = parse_credentials(dict(CREDENTIALS, ServiceUrl="https://graph.microsoft.com"))
    results = [(await router.send_message(m, message)).message_id for m in (imap, ews, graph)]
    assert results == ["imap", "ews", "graph"]
    with pytest.raises(SendError, match="not available"):
        await ProtocolSender({"imap": senders["imap"]}).send_message(ews, message)
