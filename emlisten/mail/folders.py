"""The folder tree of an IMAP mailbox in Creatio's ``GetMailboxFolders`` shape.

``[{"Id", "Name", "ParentId", "Selectable", "SpecialUse"}]``, from ``LIST "" "*"``:

- ``Id``: the folder's full server path, decoded from modified UTF-7 to Unicode
  (``"Projects/Clients/Müller"``). This is exactly what ``FolderIds`` takes back: the IMAP client
  encodes names again when it selects a folder, so an ``Id`` round-trips into a listener.
- ``Name``: the last path segment (what a folder picker shows).
- ``ParentId``: the parent's ``Id``, or ``null`` at the top. The hierarchy comes from the
  delimiter the server returns with each name.
- ``Selectable`` (emlisten extension): false for ``\\Noselect``/``\\NonExistent`` folders (they are
  listed so that their children have a parent, but cannot be listened to). A parent the server did
  not list at all is added with ``Selectable: false``.
- ``SpecialUse`` (emlisten extension): ``"\\Sent"``, ``"\\Trash"``, ... (RFC 6154) or ``null``.

Creatio's ``FolderClassName`` (an Exchange folder class) means nothing for IMAP and is ignored.
Folders keep the server's order, a synthesised parent just before its first child.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from emlisten.mail.imap._client import ListEntry
from emlisten.mail.imap.source import ImapSource
from emlisten.models import MailboxConfig

__all__ = ["SPECIAL_USE_FLAGS", "folder_tree", "list_folders"]

#: RFC 6154 special-use attributes, by lowercase name.
SPECIAL_USE_FLAGS = {
    flag.lower(): flag
    for flag in ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash")
}
_NOT_SELECTABLE = frozenset({"\\noselect", "\\nonexistent"})


async def list_folders(mailbox: MailboxConfig, source: ImapSource) -> list[dict[str, Any]]:
    """Log in, LIST every folder, log out. Raises MailSourceError subclasses on failure."""
    client = await source.connect(mailbox)
    try:
        entries = await client.list_folders("", "*")
    finally:
        await client.close(timeout=source.settings.close_timeout)
    return folder_tree(entries)


def folder_tree(entries: Iterable[ListEntry]) -> list[dict[str, Any]]:
    """Pure: LIST entries (names already decoded) to Creatio folder items."""
    listed = list(entries)
    known = {entry.name for entry in listed}
    folders: dict[str, dict[str, Any]] = {}
    for entry in listed:
        parents = _ancestors(entry.name, entry.delimiter)
        for position, ancestor in enumerate(parents):
            if ancestor not in known and ancestor not in folders:
                folders[ancestor] = _item(
                    ancestor,
                    entry.delimiter,
                    parents[position - 1] if position else None,
                    selectable=False,
                    special_use=None,
                )
        if entry.name in folders:
            continue  # a server listing a name twice: keep the first
        lowered = {flag.lower() for flag in entry.flags}
        special = next((SPECIAL_USE_FLAGS[f] for f in sorted(lowered) if f in SPECIAL_USE_FLAGS), None)
        folders[entry.name] = _item(
            entry.name,
            entry.delimiter,
            parents[-1] if parents else None,
            selectable=not (lowered & _NOT_SELECTABLE),
            special_use=special,
        )
    return list(folders.values())


def _ancestors(name: str, delimiter: str | None) -> list[str]:
    """``"a/b/c"`` -> ``["a", "a/b"]`` (empty segments from a leading/doubled delimiter are not
    folders of their own: ``"/x"`` has no parent)."""
    if not delimiter or delimiter not in name:
        return []
    segments = name.split(delimiter)
    ancestors: list[str] = []
    for end in range(1, len(segments)):
        if segments[end - 1] == "":
            continue
        ancestors.append(delimiter.join(segments[:end]))
    return ancestors


def _item(
    name: str, delimiter: str | None, parent: str | None, *, selectable: bool, special_use: str | None
) -> dict[str, Any]:
    display = name.rsplit(delimiter, 1)[-1] if delimiter else name
    return {
        "Id": name,
        "Name": display or name,
        "ParentId": parent,
        "Selectable": selectable,
        "SpecialUse": special_use,
    }
