"""History loads over Microsoft Graph: which messages of a folder predate live delivery, and
their MIME.

Split with live delivery: a Graph folder's history floor is the delta cursor seeded when the
subscription started; its ``floor`` is the server's clock then, and live delivery's first delta
round delivers the messages received at or after it. So history is the messages received in
``[since, floor)``: ``GET .../mailFolders/{id}/messages`` with ``$filter=receivedDateTime ge
{since} and receivedDateTime lt {floor}``, ``$orderby=receivedDateTime``, ids and dates only,
pages of ``$top`` followed through ``@odata.nextLink``. A message moved into the folder later
with an old received time is reported by the delta rounds (live delivery) and may be in this
listing too: both carry the same ``Email.Id``.

MIME: ``GET /messages/{id}/$value``, ``FETCH_PARALLEL`` at once. Throttling (429/503 with ``Retry-After``) is
waited out by ``GraphSession.request``, for this mailbox only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from urllib.parse import urlencode

import trio

from emlisten.errors import FolderNotFoundError, MailProtocolError, MailSourceError
from emlisten.mail.ews.history import utc_text
from emlisten.mail.graph.delta import DeltaCursor, parse_time
from emlisten.mail.graph.source import GraphReader, _graph_error
from emlisten.models import Checkpoint, RawMessage

log = logging.getLogger(__name__)

#: ``$top`` of a listing page (Graph's maximum for messages is 1,000).
LIST_PAGE_SIZE = 1000
#: ``$value`` downloads in flight at once for one load: Exchange Online allows 4 concurrent
#: requests per app and mailbox (``MailboxConcurrency``); more only earns 429s.
FETCH_PARALLEL = 4


class GraphHistory:
    """History listing and fetching over one ``GraphReader``."""

    def __init__(self, reader: GraphReader, *, page_size: int = LIST_PAGE_SIZE) -> None:
        self.reader = reader
        self.session = reader.session
        self.page_size = page_size

    def _list_url(self, folder: str, since: datetime, until: datetime) -> str:
        query = urlencode(
            {
                "$filter": (
                    f"receivedDateTime ge {utc_text(since)} and receivedDateTime lt {utc_text(until)}"
                ),
                "$orderby": "receivedDateTime asc",
                "$select": "id,receivedDateTime",
                "$top": str(self.page_size),
            },
            safe="$,:",
        )
        return self.session.url(self.reader._folder_path(folder) + "/messages?" + query)

    async def items(
        self, folder: str, since: datetime, floor: Checkpoint
    ) -> list[tuple[str, datetime | None]] | None:
        """Messages of ``folder`` received since ``since`` and before live delivery's floor,
        oldest first (None: the floor is not a delta cursor, the split cannot be told)."""
        cursor = DeltaCursor.load(floor.cursor)
        if cursor is None or cursor.floor <= 0:
            return None
        until = datetime.fromtimestamp(cursor.floor, UTC)
        if until <= since:
            return []
        items: dict[str, datetime | None] = {}
        url = self._list_url(folder, since, until)
        while True:
            response = await self.session.request("GET", url)
            if response.status_code == 404:
                raise FolderNotFoundError(f"Graph: folder {folder!r} not found")
            if response.status_code != 200:
                raise MailProtocolError(f"listing {folder!r}: {_graph_error(response)}")
            try:
                page = response.json()
                values = [v for v in page.get("value", []) if isinstance(v, dict)]
            except (ValueError, AttributeError):
                raise MailProtocolError(f"listing {folder!r}: malformed answer") from None
            for value in values:
                item_id = value.get("id")
                if isinstance(item_id, str) and item_id:
                    received = parse_time(value.get("receivedDateTime"))
                    items.setdefault(item_id, datetime.fromtimestamp(received, UTC) if received else None)
            next_link = page.get("@odata.nextLink")
            if not isinstance(next_link, str) or not next_link:
                break
            url = self.session.check_link(next_link)
        return list(items.items())

    async def fetch(self, item_ids: Sequence[str]) -> list[RawMessage]:
        """MIME of these messages (gone ones left out), in the order given."""
        found: dict[str, bytes] = {}
        failures: list[MailSourceError] = []
        limiter = trio.CapacityLimiter(FETCH_PARALLEL)

        async def one(item_id: str, cancel: trio.CancelScope) -> None:
            async with limiter:
                try:
                    data = await self.reader._mime(item_id)
                except MailSourceError as exc:
                    failures.append(exc)  # raised after the nursery, unwrapped
                    cancel.cancel()
                    return
                if data is not None:
                    found[item_id] = data

        async with trio.open_nursery() as nursery:
            for item_id in item_ids:
                nursery.start_soon(one, item_id, nursery.cancel_scope)
        if failures:
            raise failures[0]
        return [RawMessage(uid=0, data=found[i], size=len(found[i]), key=i) for i in item_ids if i in found]


__all__ = ["LIST_PAGE_SIZE", "GraphHistory"]
