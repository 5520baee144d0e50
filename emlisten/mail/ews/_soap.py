"""EWS SOAP: requests built as text with every value escaped, responses parsed with defusedxml.

Requests are small fixed templates, so they are written as strings; every value that comes from
outside (ids, sync states, addresses) goes through :func:`text` or :func:`attr`. Responses are
parsed with ``defusedxml`` (no DTDs, no entity expansion, no external resources).

A ``GetStreamingEvents`` response is not one XML document but a sequence of SOAP envelopes on
one chunked HTTP response; :class:`EnvelopeSplitter` cuts the byte stream at envelope ends, no
matter how the envelopes fall onto chunks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from xml.etree.ElementTree import Element  # only the type; parsing is defusedxml
from xml.sax.saxutils import escape

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring

from emlisten.errors import MailProtocolError
from emlisten.models import INBOX

SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
TYPES_NS = "http://schemas.microsoft.com/exchange/services/2006/types"
MESSAGES_NS = "http://schemas.microsoft.com/exchange/services/2006/messages"

#: Streaming notifications appeared in Exchange 2010 SP1; Exchange2013 is understood by every
#: Exchange Server still supported (2016, 2019, Subscription Edition) and by Exchange Online.
DEFAULT_SERVER_VERSION = "Exchange2013"

#: Well-known folder names (``DistinguishedFolderId``) accepted in ``FolderIds`` as they are.
DISTINGUISHED_FOLDERS = frozenset(
    {"inbox", "sentitems", "drafts", "deleteditems", "junkemail", "outbox", "archive", "msgfolderroot"}
)

#: The event types a listener subscribes to.
NEW_MAIL_EVENTS = ("NewMailEvent", "CreatedEvent")

#: Largest single envelope accepted from a stream (a notification is a few KiB).
MAX_ENVELOPE_BYTES = 4 * 1024 * 1024

_ENVELOPE_END = re.compile(rb"</(?:[A-Za-z_][\w.\-]*:)?Envelope\s*>")
#: Longest possible envelope end tag a chunk may have split (prefix included).
_END_TAG_MAX = 80


def text(value: str) -> str:
    """``value`` escaped for element content."""
    return escape(value)


def attr(value: str) -> str:
    """``value`` escaped for a double-quoted attribute."""
    return escape(value, {'"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"})


# --------------------------------------------------------------------------------------------
# Requests


def envelope(body: str, *, impersonate: str = "", version: str = DEFAULT_SERVER_VERSION) -> bytes:
    """A complete request envelope around ``body`` (one operation element)."""

    header = f'<t:RequestServerVersion Version="{attr(version)}"/>'
    if impersonate:
        header += (
            "<t:ExchangeImpersonation><t:ConnectingSID>"
            f"<t:PrimarySmtpAddress>{text(impersonate)}</t:PrimarySmtpAddress>"
            "</t:ConnectingSID></t:ExchangeImpersonation>"
        )
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        f'<soap:Envelope xmlns:soap="{SOAP_NS}" xmlns:t="{TYPES_NS}" xmlns:m="{MESSAGES_NS}">'
        f"<soap:Header>{header}</soap:Header><soap:Body>{body}</soap:Body></soap:Envelope>"
    ).encode()


def folder_id(folder: str) -> str:
    """``FolderIds`` entry -> EWS folder id element. emlisten's ``INBOX`` (and any
    well-known name such as ``inbox`` or ``sentitems``) is a ``DistinguishedFolderId``;
    anything else is an EWS folder id as Creatio stores them."""

    name = folder.strip()
    if name.upper() == INBOX or name.lower() in DISTINGUISHED_FOLDERS:
        return f'<t:DistinguishedFolderId Id="{attr(name.lower())}"/>'
    return f'<t:FolderId Id="{attr(name)}"/>'


def subscribe_streaming(folders: Sequence[str], event_types: Sequence[str] = NEW_MAIL_EVENTS) -> str:
    ids = "".join(folder_id(f) for f in folders)
    events = "".join(f"<t:EventType>{text(e)}</t:EventType>" for e in event_types)
    return (
        "<m:Subscribe><m:StreamingSubscriptionRequest>"
        f"<t:FolderIds>{ids}</t:FolderIds><t:EventTypes>{events}</t:EventTypes>"
        "</m:StreamingSubscriptionRequest></m:Subscribe>"
    )


def get_streaming_events(subscription_ids: Sequence[str], timeout_minutes: int) -> str:
    ids = "".join(f"<t:SubscriptionId>{text(s)}</t:SubscriptionId>" for s in subscription_ids)
    return (
        f"<m:GetStreamingEvents><m:SubscriptionIds>{ids}</m:SubscriptionIds>"
        f"<m:ConnectionTimeout>{int(timeout_minutes)}</m:ConnectionTimeout></m:GetStreamingEvents>"
    )


def sync_folder_items(folder: str, sync_state: str, max_changes: int) -> str:
    state = f"<m:SyncState>{text(sync_state)}</m:SyncState>" if sync_state else ""
    return (
        "<m:SyncFolderItems><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape></m:ItemShape>"
        f"<m:SyncFolderId>{folder_id(folder)}</m:SyncFolderId>{state}"
        f"<m:MaxChangesReturned>{int(max_changes)}</m:MaxChangesReturned>"
        "<m:SyncScope>NormalItems</m:SyncScope></m:SyncFolderItems>"
    )


def get_items_mime(item_ids: Iterable[str]) -> str:
    ids = "".join(f'<t:ItemId Id="{attr(i)}"/>' for i in item_ids)
    return (
        "<m:GetItem><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape>"
        "<t:IncludeMimeContent>true</t:IncludeMimeContent>"
        '<t:AdditionalProperties><t:FieldURI FieldURI="item:DateTimeReceived"/></t:AdditionalProperties>'
        f"</m:ItemShape><m:ItemIds>{ids}</m:ItemIds></m:GetItem>"
    )


def create_item_send(mime_base64: str, *, save_copy: bool) -> str:
    """``CreateItem`` that sends a message given as MIME: ``SendAndSaveCopy`` into Sent Items,
    or ``SendOnly``. Exchange reads every recipient (Bcc too) from the MIME headers."""
    if save_copy:
        disposition = "SendAndSaveCopy"
        saved = '<m:SavedItemFolderId><t:DistinguishedFolderId Id="sentitems"/></m:SavedItemFolderId>'
    else:
        disposition, saved = "SendOnly", ""
    return (
        f'<m:CreateItem MessageDisposition="{disposition}">{saved}<m:Items><t:Message>'
        f'<t:MimeContent CharacterSet="UTF-8">{text(mime_base64)}</t:MimeContent>'
        "</t:Message></m:Items></m:CreateItem>"
    )


def get_folders(folders: Sequence[str]) -> str:
    """``GetFolder`` of these folders, ids only (does each exist and may we open it?)."""
    ids = "".join(folder_id(f) for f in folders)
    return (
        "<m:GetFolder><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape></m:FolderShape>"
        f"<m:FolderIds>{ids}</m:FolderIds></m:GetFolder>"
    )


def unsubscribe(subscription_id: str) -> str:
    return f"<m:Unsubscribe><m:SubscriptionId>{text(subscription_id)}</m:SubscriptionId></m:Unsubscribe>"


#: Folder properties a folder list needs (``FindFolder`` shape).
_FOLDER_FIELDS = (
    "folder:DisplayName",
    "folder:ParentFolderId",
    "folder:FolderClass",
    "folder:ChildFolderCount",
)


def find_folders_deep(parent: str, *, offset: int, max_entries: int) -> str:
    """``FindFolder`` with ``Traversal="Deep"`` below ``parent`` (e.g. ``msgfolderroot``), one page."""
    fields = "".join(f'<t:FieldURI FieldURI="{f}"/>' for f in _FOLDER_FIELDS)
    return (
        '<m:FindFolder Traversal="Deep"><m:FolderShape><t:BaseShape>IdOnly</t:BaseShape>'
        f"<t:AdditionalProperties>{fields}</t:AdditionalProperties></m:FolderShape>"
        f'<m:IndexedPageFolderView MaxEntriesReturned="{int(max_entries)}" Offset="{int(offset)}" '
        'BasePoint="Beginning"/>'
        f"<m:ParentFolderIds>{folder_id(parent)}</m:ParentFolderIds></m:FindFolder>"
    )


# --------------------------------------------------------------------------------------------
# Responses


def local(tag: str) -> str:
    """``{namespace}Name`` -> ``Name``."""
    return tag.rsplit("}", 1)[-1]


def child(element: Element, name: str) -> Element | None:
    for sub in element:
        if local(sub.tag) == name:
            return sub
    return None


def children(element: Element, name: str) -> list[Element]:
    return [sub for sub in element if local(sub.tag) == name]


def child_text(element: Element, name: str) -> str:
    found = child(element, name)
    return (found.text or "").strip() if found is not None else ""


def parse(data: bytes) -> Element:
    """One SOAP envelope -> its root element (safely)."""
    try:
        root = fromstring(data.strip(), forbid_dtd=True)
    except (ParseError, DefusedXmlException, ValueError) as exc:
        raise MailProtocolError(f"EWS sent malformed XML: {type(exc).__name__}") from None
    if local(root.tag) != "Envelope":
        raise MailProtocolError(f"EWS sent {local(root.tag)!r} where a SOAP Envelope was expected")
    return root


@dataclass(frozen=True, slots=True)
class Fault:
    """A SOAP fault (HTTP 500), e.g. throttling: ``ErrorServerBusy`` with ``BackOffMilliseconds``."""

    code: str
    message: str
    back_off_ms: int | None = None


@dataclass(frozen=True, slots=True)
class ResponseMessage:
    """One ``*ResponseMessage`` element: ``ResponseClass`` Success, Warning or Error."""

    element: Element
    response_class: str
    code: str
    message: str
    back_off_ms: int | None = None

    @property
    def ok(self) -> bool:
        return self.response_class != "Error"


def _back_off_ms(element: Element | None) -> int | None:
    """``<t:Value Name="BackOffMilliseconds">`` anywhere below ``element`` (MessageXml)."""
    if element is None:
        return None
    for sub in element.iter():
        if local(sub.tag) == "Value" and sub.get("Name") == "BackOffMilliseconds":
            try:
                return max(0, int((sub.text or "").strip()))
            except ValueError:
                return None
    return None


def body_of(root: Element) -> Element:
    body = child(root, "Body")
    if body is None or len(body) == 0:
        raise MailProtocolError("EWS sent an envelope without a body")
    return body[0]


def fault_of(root: Element) -> Fault | None:
    body = child(root, "Body")
    fault = child(body, "Fault") if body is not None else None
    if fault is None:
        return None
    detail = child(fault, "detail")
    code = ""
    message = child_text(fault, "faultstring")
    if detail is not None:
        code = child_text(detail, "ResponseCode")
        message = child_text(detail, "Message") or message
    if not code:
        code = local(child_text(fault, "faultcode").rsplit(":", 1)[-1]) or "Fault"
    return Fault(code=code, message=message, back_off_ms=_back_off_ms(detail))


def response_messages(root: Element) -> list[ResponseMessage]:
    """The ``ResponseMessages`` of an operation response, in order."""
    operation = body_of(root)
    container = child(operation, "ResponseMessages")
    if container is None:
        raise MailProtocolError(f"EWS {local(operation.tag)} without ResponseMessages")
    return [
        ResponseMessage(
            element=message,
            response_class=message.get("ResponseClass", "Success"),
            code=child_text(message, "ResponseCode") or "NoError",
            message=child_text(message, "MessageText"),
            back_off_ms=_back_off_ms(child(message, "MessageXml")),
        )
        for message in container
    ]


@dataclass(frozen=True, slots=True)
class StreamingMessage:
    """What one ``GetStreamingEventsResponseMessage`` says."""

    response: ResponseMessage
    connection_status: str = ""
    #: Subscription ids that reported at least one new-mail event.
    new_mail: tuple[str, ...] = ()
    error_subscription_ids: tuple[str, ...] = ()


def streaming_messages(root: Element, event_types: Sequence[str] = NEW_MAIL_EVENTS) -> list[StreamingMessage]:
    wanted = set(event_types)
    found = []
    for response in response_messages(root):
        element = response.element
        new_mail: list[str] = []
        notifications = child(element, "Notifications")
        for notification in children(notifications, "Notification") if notifications is not None else []:
            if any(local(event.tag) in wanted for event in notification):
                new_mail.append(child_text(notification, "SubscriptionId"))
        errors = child(element, "ErrorSubscriptionIds")
        error_ids = tuple((e.text or "").strip() for e in errors) if errors is not None else ()
        found.append(
            StreamingMessage(
                response=response,
                connection_status=child_text(element, "ConnectionStatus"),
                new_mail=tuple(new_mail),
                error_subscription_ids=error_ids,
            )
        )
    return found


@dataclass(frozen=True, slots=True)
class SyncResult:
    sync_state: str
    includes_last: bool
    #: Item ids of ``Create`` changes, in the server's order.
    created: list[str] = field(default_factory=list)
    #: Changes of any kind (creates, updates, deletes, read flags) in this answer.
    change_count: int = 0

    @property
    def changed(self) -> bool:
        return self.change_count > 0


def sync_result(message: ResponseMessage) -> SyncResult:
    element = message.element
    created: list[str] = []
    changes = child(element, "Changes")
    change_count = len(changes) if changes is not None else 0
    for change in changes if changes is not None else []:
        if local(change.tag) != "Create":
            continue  # Update, Delete, ReadFlagChange: not new mail
        for item in change:
            item_id = child(item, "ItemId")
            if item_id is not None and item_id.get("Id"):
                created.append(item_id.get("Id", ""))
    return SyncResult(
        sync_state=child_text(element, "SyncState"),
        includes_last=child_text(element, "IncludesLastItemInRange").lower() != "false",
        created=created,
        change_count=change_count,
    )


@dataclass(frozen=True, slots=True)
class MimeItem:
    item_id: str
    mime_base64: str
    date_time_received: str


def mime_item(message: ResponseMessage) -> MimeItem | None:
    items = child(message.element, "Items")
    if items is None or len(items) == 0:
        return None
    item = items[0]
    item_id = child(item, "ItemId")
    mime = child(item, "MimeContent")
    if item_id is None or mime is None:
        return None
    return MimeItem(
        item_id=item_id.get("Id", ""),
        mime_base64="".join((mime.text or "").split()),
        date_time_received=child_text(item, "DateTimeReceived"),
    )


@dataclass(frozen=True, slots=True)
class FolderEntry:
    """One folder of a ``FindFolder`` answer. ``kind`` is the element name: ``Folder`` (mail and
    generic folders), ``CalendarFolder``, ``ContactsFolder``, ``TasksFolder``, ``SearchFolder``."""

    folder_id: str
    parent_id: str
    display_name: str
    folder_class: str
    kind: str


@dataclass(frozen=True, slots=True)
class FolderPage:
    folders: list[FolderEntry]
    includes_last: bool
    next_offset: int


def folder_page(message: ResponseMessage) -> FolderPage:
    root = child(message.element, "RootFolder")
    if root is None:
        raise MailProtocolError("EWS FindFolder answer without RootFolder")
    entries: list[FolderEntry] = []
    container = child(root, "Folders")
    for element in container if container is not None else []:
        ident = child(element, "FolderId")
        parent = child(element, "ParentFolderId")
        if ident is None or not ident.get("Id"):
            continue
        entries.append(
            FolderEntry(
                folder_id=ident.get("Id", ""),
                parent_id=parent.get("Id", "") if parent is not None else "",
                display_name=child_text(element, "DisplayName"),
                folder_class=child_text(element, "FolderClass"),
                kind=local(element.tag),
            )
        )
    try:
        next_offset = int(root.get("IndexedPagingOffset", ""))
    except ValueError:
        next_offset = -1
    return FolderPage(
        folders=entries,
        includes_last=root.get("IncludesLastItemInRange", "true").lower() != "false",
        next_offset=next_offset,
    )


def subscription_id(message: ResponseMessage) -> str:
    value = child_text(message.element, "SubscriptionId")
    if not value:
        raise MailProtocolError("EWS SubscribeResponse without a SubscriptionId")
    return value


# --------------------------------------------------------------------------------------------
# The envelope stream


class EnvelopeSplitter:
    """Cuts a byte stream of concatenated SOAP envelopes into single envelopes.

    ``feed(chunk)`` returns every envelope completed by ``chunk`` (a chunk may hold several, or
    part of one); ``leftover()`` is what is buffered (non-blank at the end of a stream: the
    stream was cut mid-envelope). An envelope end is ``</Envelope>`` with any namespace prefix;
    inside element content a ``<`` is always escaped, so the tag cannot occur in data.
    """

    __slots__ = ("_buffer", "_max", "_scanned")

    def __init__(self, max_envelope_bytes: int = MAX_ENVELOPE_BYTES) -> None:
        self._buffer = bytearray()
        self._scanned = 0
        self._max = max_envelope_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        envelopes: list[bytes] = []
        start = 0
        while True:
            match = _ENVELOPE_END.search(self._buffer, max(start, self._scanned))
            if match is None:
                break
            envelopes.append(bytes(self._buffer[start : match.end()]).strip())
            start = match.end()
        if start:
            del self._buffer[:start]
        # A split end tag is at most _END_TAG_MAX bytes long: rescan only that tail next time.
        self._scanned = max(0, len(self._buffer) - _END_TAG_MAX)
        if len(self._buffer) > self._max:
            raise MailProtocolError(f"EWS streaming envelope larger than {self._max} bytes")
        return envelopes

    def leftover(self) -> bytes:
        return bytes(self._buffer).strip()


__all__ = [
    "DEFAULT_SERVER_VERSION",
    "MESSAGES_NS",
    "NEW_MAIL_EVENTS",
    "SOAP_NS",
    "TYPES_NS",
    "EnvelopeSplitter",
    "Fault",
    "FolderEntry",
    "FolderPage",
    "MimeItem",
    "ResponseMessage",
    "StreamingMessage",
    "SyncResult",
    "attr",
    "body_of",
    "create_item_send",
    "envelope",
    "fault_of",
    "find_folders_deep",
    "folder_id",
    "folder_page",
    "get_folders",
    "get_items_mime",
    "get_streaming_events",
    "mime_item",
    "parse",
    "response_messages",
    "streaming_messages",
    "subscribe_streaming",
    "subscription_id",
    "sync_folder_items",
    "sync_result",
    "text",
    "unsubscribe",
]
