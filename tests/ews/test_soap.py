"""Pure-logic tests of emlisten.mail.ews._soap: request building, response parsing, the
envelope stream splitter. The responses are shaped after Microsoft's published EWS examples."""

from __future__ import annotations

import itertools

import pytest
from defusedxml.ElementTree import fromstring
from hypothesis import given
from hypothesis import strategies as st

from emlisten.errors import MailProtocolError
from emlisten.mail.ews import _soap

KEEPALIVE = b"""<?xml version="1.0" encoding="utf-8"?>
<soap11:Envelope xmlns:soap11="http://schemas.xmlsoap.org/soap/envelope/">
  <soap11:Header>
    <ServerVersionInfo xmlns="http://schemas.microsoft.com/exchange/services/2006/types"
      MajorVersion="15" MinorVersion="2" MajorBuildNumber="1544" MinorBuildNumber="4"/>
  </soap11:Header>
  <soap11:Body>
    <m:GetStreamingEventsResponse xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"
      xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types">
      <m:ResponseMessages>
        <m:GetStreamingEventsResponseMessage ResponseClass="Success">
          <m:ResponseCode>NoError</m:ResponseCode>
          <m:ConnectionStatus>OK</m:ConnectionStatus>
        </m:GetStreamingEventsResponseMessage>
      </m:ResponseMessages>
    </m:GetStreamingEventsResponse>
  </soap11:Body>
</soap11:Envelope>"""

NOTIFICATION = b"""<?xml version="1.0" encoding="utf-8"?>
<Envelope xmlns="http://schemas.xmlsoap.org/soap/envelope/">
  <Body>
    <m:GetStreamingEventsResponse xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"
      xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types">
      <m:ResponseMessages>
        <m:GetStreamingEventsResponseMessage ResponseClass="Success">
          <m:ResponseCode>NoError</m:ResponseCode>
          <m:Notifications>
            <m:Notification>
              <t:SubscriptionId>JwBkYjNwcjA2bWIxNDI0LmV1cnByZDA2LnByb2Qub3V0</t:SubscriptionId>
              <t:CreatedEvent>
                <t:TimeStamp>2023-01-04T09:00:00Z</t:TimeStamp>
                <t:ItemId Id="AAMkAGI2" ChangeKey="CQAAAA=="/>
                <t:ParentFolderId Id="AQMkAGI2" ChangeKey="AQAAAA=="/>
              </t:CreatedEvent>
              <t:NewMailEvent>
                <t:TimeStamp>2023-01-04T09:00:00Z</t:TimeStamp>
                <t:ItemId Id="AAMkAGI2" ChangeKey="CQAAAA=="/>
                <t:ParentFolderId Id="AQMkAGI2" ChangeKey="AQAAAA=="/>
              </t:NewMailEvent>
            </m:Notification>
            <m:Notification>
              <t:SubscriptionId>other</t:SubscriptionId>
              <t:ModifiedEvent><t:TimeStamp>2023-01-04T09:00:00Z</t:TimeStamp></t:ModifiedEvent>
            </m:Notification>
          </m:Notifications>
        </m:GetStreamingEventsResponseMessage>
      </m:ResponseMessages>
    </m:GetStreamingEventsResponse>
  </Body>
</Envelope>"""

CLOSED = KEEPALIVE.replace(b">OK<", b">Closed<")

EXPIRED = b"""<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>
<m:GetStreamingEventsResponse xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"
 xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><m:ResponseMessages>
<m:GetStreamingEventsResponseMessage ResponseClass="Error">
<m:MessageText>The subscription could not be found.</m:MessageText>
<m:ResponseCode>ErrorSubscriptionNotFound</m:ResponseCode><m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>
<m:ErrorSubscriptionIds><t:SubscriptionId>sub-1</t:SubscriptionId></m:ErrorSubscriptionIds>
</m:GetStreamingEventsResponseMessage></m:ResponseMessages></m:GetStreamingEventsResponse></s:Body></s:Envelope>"""

BUSY_FAULT = b"""<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">
<s:Body><s:Fault><faultcode xmlns:a="http://schemas.microsoft.com/exchange/services/2006/types">a:ErrorServerBusy</faultcode>
<faultstring xml:lang="en-US">The server cannot service this request right now. Try again later.</faultstring>
<detail><e:ResponseCode xmlns:e="http://schemas.microsoft.com/exchange/services/2006/errors">ErrorServerBusy</e:ResponseCode>
<e:Message xmlns:e="http://schemas.microsoft.com/exchange/services/2006/errors"
>The server cannot service this request right now. Try again later.</e:Message>
<t:MessageXml xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"
><t:Value Name="BackOffMilliseconds">297749</t:Value></t:MessageXml>
</detail></s:Fault></s:Body></s:Envelope>"""

BUSY_MESSAGE = b"""<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>
<m:SyncFolderItemsResponse xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"
 xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><m:ResponseMessages>
<m:SyncFolderItemsResponseMessage ResponseClass="Error"><m:MessageText>busy</m:MessageText>
<m:ResponseCode>ErrorServerBusy</m:ResponseCode><m:DescriptiveLinkKey>0</m:DescriptiveLinkKey>
<m:MessageXml><t:Value Name="BackOffMilliseconds">1500</t:Value></m:MessageXml>
</m:SyncFolderItemsResponseMessage></m:ResponseMessages></m:SyncFolderItemsResponse></s:Body></s:Envelope>"""

SYNC = b"""<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>
<m:SyncFolderItemsResponse xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"
 xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><m:ResponseMessages>
<m:SyncFolderItemsResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode>
<m:SyncState>H4sIAAAAAAAEAO29B2A=</m:SyncState><m:IncludesLastItemInRange>false</m:IncludesLastItemInRange>
<m:Changes>
<t:Create><t:Message><t:ItemId Id="AAA1" ChangeKey="C1"/></t:Message></t:Create>
<t:Update><t:Message><t:ItemId Id="AAA0" ChangeKey="C0"/></t:Message></t:Update>
<t:Create><t:MeetingRequest><t:ItemId Id="AAA2" ChangeKey="C2"/></t:MeetingRequest></t:Create>
<t:Delete><t:ItemId Id="AAA9" ChangeKey="C9"/></t:Delete>
<t:ReadFlagChange><t:ItemId Id="AAA0" ChangeKey="C0"/><t:IsRead>true</t:IsRead></t:ReadFlagChange>
</m:Changes></m:SyncFolderItemsResponseMessage></m:ResponseMessages></m:SyncFolderItemsResponse></s:Body></s:Envelope>"""

GET_ITEM = b"""<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>
<m:GetItemResponse xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages"
 xmlns:t="http://schemas.microsoft.com/exchange/services/2006/types"><m:ResponseMessages>
<m:GetItemResponseMessage ResponseClass="Success"><m:ResponseCode>NoError</m:ResponseCode><m:Items>
<t:Message><t:MimeContent CharacterSet="UTF-8">U3ViamVjdDog
aGkNCg0KYm9keQ0K</t:MimeContent><t:ItemId Id="AAA1" ChangeKey="C1"/>
<t:DateTimeReceived>2023-01-04T09:00:00Z</t:DateTimeReceived></t:Message></m:Items></m:GetItemResponseMessage>
<m:GetItemResponseMessage ResponseClass="Error">
<m:MessageText>The specified object was not found in the store.</m:MessageText>
<m:ResponseCode>ErrorItemNotFound</m:ResponseCode><m:DescriptiveLinkKey>0</m:DescriptiveLinkKey><m:Items/>
</m:GetItemResponseMessage></m:ResponseMessages></m:GetItemResponse></s:Body></s:Envelope>"""


# -- requests -----------------------------------------------------------------------------


def test_values_are_escaped_in_requests() -> None:
    evil = 'x"/><t:Injected a="&'
    body = _soap.sync_folder_items(evil, "<state>&", 10)
    request = _soap.envelope(body, impersonate="a<b>@example.com")
    root = fromstring(request)
    folder = root.find(f".//{{{_soap.TYPES_NS}}}FolderId")
    assert folder is not None and folder.get("Id") == evil
    assert root.findtext(f".//{{{_soap.MESSAGES_NS}}}SyncState") == "<state>&"
    assert root.findtext(f".//{{{_soap.TYPES_NS}}}PrimarySmtpAddress") == "a<b>@example.com"
    assert root.find(f".//{{{_soap.TYPES_NS}}}Injected") is None


@pytest.mark.parametrize(
    ("folder", "expected"), [("INBOX", "inbox"), ("Inbox", "inbox"), ("sentitems", "sentitems")]
)
def test_well_known_folders_are_distinguished(folder: str, expected: str) -> None:
    assert _soap.folder_id(folder) == f'<t:DistinguishedFolderId Id="{expected}"/>'


def test_subscribe_and_streaming_requests() -> None:
    root = fromstring(_soap.envelope(_soap.subscribe_streaming(["INBOX", "AQMk=="])))
    request = root.find(f".//{{{_soap.MESSAGES_NS}}}StreamingSubscriptionRequest")
    assert request is not None
    events = [e.text for e in request.iter(f"{{{_soap.TYPES_NS}}}EventType")]
    assert events == ["NewMailEvent", "CreatedEvent"]
    root = fromstring(_soap.envelope(_soap.get_streaming_events(["s1", "s2"], 29)))
    assert root.findtext(f".//{{{_soap.MESSAGES_NS}}}ConnectionTimeout") == "29"
    assert [e.text for e in root.iter(f"{{{_soap.TYPES_NS}}}SubscriptionId")] == ["s1", "s2"]
    assert root.find(f".//{{{_soap.TYPES_NS}}}ExchangeImpersonation") is None


# -- responses ----------------------------------------------------------------------------


def test_keepalive_and_closed() -> None:
    (keepalive,) = _soap.streaming_messages(_soap.parse(KEEPALIVE))
    assert keepalive.response.ok and keepalive.connection_status == "OK" and keepalive.new_mail == ()
    (closed,) = _soap.streaming_messages(_soap.parse(CLOSED))
    assert closed.connection_status == "Closed"


def test_notification_names_the_subscriptions_with_new_mail() -> None:
    (message,) = _soap.streaming_messages(_soap.parse(NOTIFICATION))
    assert message.new_mail == ("JwBkYjNwcjA2bWIxNDI0LmV1cnByZDA2LnByb2Qub3V0",)


def test_expired_subscription() -> None:
    (message,) = _soap.streaming_messages(_soap.parse(EXPIRED))
    assert not message.response.ok
    assert message.response.code == "ErrorSubscriptionNotFound"
    assert message.error_subscription_ids == ("sub-1",)


def test_server_busy_fault_and_message_carry_the_back_off() -> None:
    fault = _soap.fault_of(_soap.parse(BUSY_FAULT))
    assert fault is not None
    assert (fault.code, fault.back_off_ms) == ("ErrorServerBusy", 297749)
    (message,) = _soap.response_messages(_soap.parse(BUSY_MESSAGE))
    assert (message.code, message.back_off_ms, message.ok) == ("ErrorServerBusy", 1500, False)
    assert _soap.fault_of(_soap.parse(KEEPALIVE)) is None


def test_sync_result_lists_creates_only() -> None:
    (message,) = _soap.response_messages(_soap.parse(SYNC))
    result = _soap.sync_result(message)
    assert result.created == ["AAA1", "AAA2"]
    assert result.sync_state == "H4sIAAAAAAAEAO29B2A="
    assert not result.includes_last
    assert result.change_count == 5 and result.changed


def test_get_item_mime_and_missing_item() -> None:
    found, missing = _soap.response_messages(_soap.parse(GET_ITEM))
    item = _soap.mime_item(found)
    assert item is not None
    assert item.item_id == "AAA1"
    assert item.mime_base64 == "U3ViamVjdDogaGkNCg0KYm9keQ0K"
    assert item.date_time_received == "2023-01-04T09:00:00Z"
    assert missing.code == "ErrorItemNotFound" and _soap.mime_item(missing) is None


def test_entities_and_dtds_are_refused() -> None:
    bomb = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><Envelope>&a;</Envelope>'
    with pytest.raises(MailProtocolError):
        _soap.parse(bomb)
    external = (
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><Envelope>&e;</Envelope>'
    )
    with pytest.raises(MailProtocolError):
        _soap.parse(external)


def test_malformed_and_foreign_documents_are_protocol_errors() -> None:
    with pytest.raises(MailProtocolError):
        _soap.parse(b"<s:Envelope")
    with pytest.raises(MailProtocolError):
        _soap.parse(b"<html><body>502 Bad Gateway</body></html>")


# -- the envelope stream ------------------------------------------------------------------

STREAM = [KEEPALIVE, NOTIFICATION, KEEPALIVE, EXPIRED, CLOSED]


def test_several_envelopes_in_one_chunk() -> None:
    splitter = _soap.EnvelopeSplitter()
    assert splitter.feed(b"".join(STREAM)) == [e.strip() for e in STREAM]
    assert splitter.leftover() == b""


def test_envelope_split_inside_the_end_tag() -> None:
    splitter = _soap.EnvelopeSplitter()
    data = KEEPALIVE + b"\r\n" + CLOSED
    cut = data.index(b"</soap11:Envelope>") + 5
    assert splitter.feed(data[:cut]) == []
    assert splitter.feed(data[cut:]) == [KEEPALIVE.strip(), CLOSED.strip()]


@given(st.lists(st.integers(min_value=1, max_value=len(b"".join(STREAM)) - 1), max_size=30))
def test_any_chunking_gives_the_same_envelopes(cuts: list[int]) -> None:
    data = b"".join(STREAM)
    points = [0, *sorted(set(cuts)), len(data)]
    splitter = _soap.EnvelopeSplitter()
    envelopes: list[bytes] = []
    for start, end in itertools.pairwise(points):
        envelopes.extend(splitter.feed(data[start:end]))
    assert envelopes == [e.strip() for e in STREAM]
    assert splitter.leftover() == b""


def test_cut_stream_leaves_a_partial_envelope() -> None:
    splitter = _soap.EnvelopeSplitter()
    assert splitter.feed(KEEPALIVE + NOTIFICATION[:100]) == [KEEPALIVE.strip()]
    assert splitter.leftover() == NOTIFICATION[:100].strip()


def test_oversized_envelope_is_refused() -> None:
    splitter = _soap.EnvelopeSplitter(max_envelope_bytes=1000)
    with pytest.raises(MailProtocolError):
        splitter.feed(b"<Envelope>" + b"x" * 2000)
