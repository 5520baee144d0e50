"""History loads over EWS: which items of a folder predate live delivery, and their MIME.

Listing: ``FindItem`` (shallow, ids and ``DateTimeReceived`` only) with a restriction
``DateTimeReceived >= since``, sorted by ``DateTimeReceived`` ascending, paged with
``IndexedPageItemView`` (at most 1,000 per page, Exchange's ``EWSFindCountLimit``). Mail that
arrives while paging sorts last, so offsets stay stable; an item deleted meanwhile may shift one
item into an already-read page, and the next load (Creatio repeats synchronize) picks it up.

Split with live delivery: the folder's history floor is the ``SyncFolderItems`` state seeded when
the subscription started. Every item created after it (new mail, or mail moved in) comes back as
a ``Create`` change when syncing from that state, and live delivery delivers exactly those. So
the load lists first, then syncs from the floor to the folder's current end, and leaves out what
the sync reports: whatever the listing saw after the floor, the later sync sees too.

MIME: ``GetItem`` of ``GET_ITEM_BATCH`` (20) items a call (``EwsReader.fetch``); a fetch of more
ids runs up to ``FETCH_PARALLEL`` calls at once (the history service asks for one delivery batch
at a time, the next while the current one is delivered). ``ErrorServerBusy`` is waited out as
``EwsClient.call`` does for every operation (its ``BackOffMilliseconds``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime

import trio

from emlisten.errors import MailProtocolError, MailSourceError
from emlisten.mail.ews import _soap
from emlisten.mail.ews.source import (
    GET_ITEM_BATCH,
    MAX_SYNC_CHANGES,
    EwsClient,
    EwsReader,
    EwsResponseError,
)
from emlisten.models import Checkpoint, RawMessage

log = logging.getLogger(__name__)

#: Exchange's default ``EWSFindCountLimit``: items one FindItem page returns at most.
FIND_PAGE_SIZE = 1000
#: GetItem calls in flight at once for one load (each carries ``GET_ITEM_BATCH`` items).
FETCH_PARALLEL = 4


#: Mail is not older than this; earlier start dates (ticks 0 is DateTime.MinValue) mean it.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)


def utc_text(moment: datetime) -> str:
    """``2024-01-04T21:20:00Z`` (xs:dateTime in UTC, four-digit year), at least ``EARLIEST``."""
    moment = max(moment.astimezone(UTC), EARLIEST)
    return f"{moment.year:04d}-{moment:%m-%dT%H:%M:%S}Z"


def find_items_since(folder: str, since: datetime, *, offset: int, max_entries: int) -> str:
    """``FindItem`` of one page: ids and received times of items received at or after ``since``."""
    moment = utc_text(since)
    field = '<t:FieldURI FieldURI="item:DateTimeReceived"/>'
    return (
        '<m:FindItem Traversal="Shallow"><m:ItemShape><t:BaseShape>IdOnly</t:BaseShape>'
        f"<t:AdditionalProperties>{field}</t:AdditionalProperties></m:ItemShape>"
        f'<m:IndexedPageItemView MaxEntriesReturned="{int(max_entries)}" Offset="{int(offset)}" '
        'BasePoint="Beginning"/>'
        f"<m:Restriction><t:IsGreaterThanOrEqualTo>{field}"
        f'<t:FieldURIOrConstant><t:Constant Value="{moment}"/></t:FieldURIOrConstant>'
        "</t:IsGreaterThanOrEqualTo></m:Restriction>"
        f'<m:SortOrder><t:FieldOrder Order="Ascending">{field}</t:FieldOrder></m:SortOrder>'
        f"<m:ParentFolderIds>{_soap.folder_id(folder)}</m:ParentFolderIds></m:FindItem>"
    )


def parse_time(value: str) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def item_page(message: _soap.ResponseMessage) -> tuple[list[tuple[str, datetime | None]], bool, int]:
    """(items as (id, received), includes last, next offset) of a ``FindItem`` answer."""
    root = _soap.child(message.element, "RootFolder")
    if root is None:
        raise MailProtocolError("EWS FindItem answer without RootFolder")
    found: list[tuple[str, datetime | None]] = []
    container = _soap.child(root, "Items")
    for element in container if container is not None else []:
        ident = _soap.child(element, "ItemId")
        if ident is None or not ident.get("Id"):
            continue
        found.append((ident.get("Id", ""), parse_time(_soap.child_text(element, "DateTimeReceived"))))
    try:
        next_offset = int(root.get("IndexedPagingOffset", ""))
    except ValueError:
        next_offset = -1
    includes_last = root.get("IncludesLastItemInRange", "true").lower() != "false"
    return found, includes_last, next_offset


class EwsHistory:
    """History listing and fetching over one ``EwsReader``."""

    def __init__(self, reader: EwsReader, *, page_size: int = FIND_PAGE_SIZE) -> None:
        self.reader = reader
        self.client: EwsClient = reader._client
        self.page_size = page_size

    async def list_since(self, folder: str, since: datetime) -> list[tuple[str, datetime | None]]:
        """Every item of ``folder`` received at or after ``since``, oldest first."""
        items: dict[str, datetime | None] = {}
        offset = 0
        while True:
            message = await self.client.call_one(
                find_items_since(folder, since, offset=offset, max_entries=self.page_size)
            )
            page, includes_last, next_offset = item_page(message)
            for item_id, received in page:
                items.setdefault(item_id, received)
            if includes_last or not page:
                break
            offset = next_offset if next_offset > offset else offset + len(page)
        return list(items.items())

    async def created_after(self, folder: str, floor: Checkpoint) -> set[str] | None:
        """Items created since the floor's sync state (live delivery's), or None when the state
        is no longer usable (the split with live delivery cannot be told)."""
        created: set[str] = set()
        state = floor.cursor
        if not state:
            return None
        while True:
            try:
                result = await self.reader.sync(folder, state, MAX_SYNC_CHANGES)
            except EwsResponseError as exc:
                if exc.code == "ErrorInvalidSyncStateData":
                    return None
                raise
            created.update(result.created)
            state = result.sync_state or state
            if result.includes_last:
                return created

    async def items(
        self, folder: str, since: datetime, floor: Checkpoint
    ) -> list[tuple[str, datetime | None]] | None:
        """Items of ``folder`` since ``since`` that live delivery does not cover (None: cannot
        tell, see ``created_after``)."""
        listed = await self.list_since(folder, since)
        live = await self.created_after(folder, floor)
        if live is None:
            return None
        return [(item_id, received) for item_id, received in listed if item_id not in live]

    async def fetch(self, item_ids: Sequence[str]) -> list[RawMessage]:
        """MIME of these items (gone ones left out), in the order given."""
        batches = [item_ids[i : i + GET_ITEM_BATCH] for i in range(0, len(item_ids), GET_ITEM_BATCH)]
        results: list[list[RawMessage]] = [[] for _ in batches]
        limiter = trio.CapacityLimiter(FETCH_PARALLEL)

        failures: list[MailSourceError] = []

        async def one(index: int, cancel: trio.CancelScope) -> None:
            async with limiter:
                try:
                    results[index] = await self.reader.fetch(batches[index])
                except MailSourceError as exc:
                    # Kept and raised after the nursery, so callers see it unwrapped.
                    failures.append(exc)
                    cancel.cancel()

        async with trio.open_nursery() as nursery:
            for index in range(len(batches)):
                nursery.start_soon(one, index, nursery.cancel_scope)
        if failures:
            raise failures[0]
        by_id = {raw.key: raw for batch in results for raw in batch}
        return [by_id[i] for i in item_ids if i in by_id]


__all__ = ["FIND_PAGE_SIZE", "EwsHistory", "find_items_since", "item_page", "utc_text"]
