"""The folder tree of a Graph mailbox in Creatio's ``GetMailboxFolders`` shape.

``GET /users/{user}/mailFolders`` (the top level), then ``.../mailFolders/{id}/childFolders`` for
every folder whose ``childFolderCount`` is not zero, recursively, each list paged through
``@odata.nextLink``. Items are the IMAP ones (``emlisten.mail.folders``):

- ``Id``: the Graph folder id, which ``FolderIds`` takes back unchanged (the listener subscribes
  to ``mailFolders('{id}')/messages``, the reader runs its delta query on it).
- ``Name``: ``displayName`` (any Unicode). ``ParentId``: the parent's id, ``null`` at the top.
- ``Selectable``: true; ``SpecialUse``: null.

Order: depth first, each folder before its children, siblings in Graph's order.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

from emlisten.errors import MailProtocolError
from emlisten.mail.graph.source import GraphSession, GraphSource, _graph_error
from emlisten.models import MailboxConfig

__all__ = ["list_graph_folders"]

PAGE_SIZE = 100
#: A loop guard, far above real mailboxes.
MAX_FOLDERS = 20_000
_SELECT = "$select=id,displayName,parentFolderId,childFolderCount"


async def _pages(session: GraphSession, url: str) -> list[dict[str, Any]]:
    """Every item of a Graph collection, following nextLinks."""
    items: list[dict[str, Any]] = []
    next_url: str | None = url
    while next_url:
        response = await session.request("GET", next_url)
        if response.status_code != 200:
            raise MailProtocolError(f"listing folders ({urlsplit(next_url).path}): {_graph_error(response)}")
        try:
            page = response.json()
            items += [i for i in page.get("value", []) if isinstance(i, dict) and i.get("id")]
            link = page.get("@odata.nextLink")
        except (ValueError, AttributeError):
            raise MailProtocolError("listing folders: malformed answer") from None
        next_url = session.check_link(link) if isinstance(link, str) else None
        if len(items) > MAX_FOLDERS:
            raise MailProtocolError(f"Graph listed more than {MAX_FOLDERS} folders")
    return items


async def list_graph_folders(mailbox: MailboxConfig, source: GraphSource) -> list[dict[str, Any]]:
    """Every mail folder of the mailbox. Raises MailSourceError subclasses on failure."""
    async with source.session(mailbox) as session:
        base = f"/users/{session.user}/mailFolders"
        found: list[dict[str, Any]] = []

        async def walk(url: str, parent: str | None) -> None:
            for folder in await _pages(session, url):
                folder_id = str(folder["id"])
                found.append(
                    {
                        "Id": folder_id,
                        "Name": str(folder.get("displayName") or folder_id),
                        "ParentId": parent,
                        "Selectable": True,
                        "SpecialUse": None,
                    }
                )
                if len(found) > MAX_FOLDERS:
                    raise MailProtocolError(f"Graph listed more than {MAX_FOLDERS} folders")
                if folder.get("childFolderCount"):
                    children = f"{base}/{quote(folder_id, safe='')}/childFolders?$top={PAGE_SIZE}&{_SELECT}"
                    await walk(session.url(children), folder_id)

        await walk(session.url(f"{base}?$top={PAGE_SIZE}&{_SELECT}"), None)
        return found
