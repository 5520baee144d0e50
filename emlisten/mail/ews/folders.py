"""The folder tree of an EWS mailbox in Creatio's ``GetMailboxFolders`` shape.

``FindFolder`` with ``Traversal="Deep"`` below ``msgfolderroot`` (the mailbox's visible folder
tree), paged with ``IndexedPageFolderView``. Items are the same as for IMAP
(``emlisten.mail.folders``): ``{"Id", "Name", "ParentId", "Selectable", "SpecialUse"}``:

- ``Id``: the EWS ``FolderId`` (opaque, base64). ``FolderIds`` takes it back unchanged: the EWS
  listener and reader address it as ``<t:FolderId Id=...>``.
- ``Name``: the ``DisplayName`` (any Unicode).
- ``ParentId``: the parent's ``FolderId``, ``null`` for the folders directly below the root (and
  for a folder whose parent is not listed, e.g. a non-mail folder).
- ``Selectable``: always true (every listed folder can be listened to). ``SpecialUse``: null
  (FindFolder does not say which folder is Sent Items; Creatio does not need it).

Only mail folders are listed: ``Folder`` elements whose ``FolderClass`` is ``IPF.Note`` (or a
sub-class such as ``IPF.Note.OutlookHomepage``) or absent. Calendars, contacts, tasks, notes,
journals and search folders are left out.
"""

from __future__ import annotations

from typing import Any

from emlisten.errors import MailProtocolError
from emlisten.mail.ews import _soap
from emlisten.mail.ews.source import EwsClient, EwsSource
from emlisten.models import MailboxConfig

__all__ = ["FOLDER_PAGE_SIZE", "ews_folder_tree", "list_ews_folders"]

FOLDER_PAGE_SIZE = 500
#: A mailbox with more folders than this is cut off (a loop guard, far above real mailboxes).
MAX_FOLDERS = 20_000


def _is_mail_folder(entry: _soap.FolderEntry) -> bool:
    if entry.kind != "Folder":
        return False
    folder_class = entry.folder_class
    return not folder_class or folder_class == "IPF.Note" or folder_class.startswith("IPF.Note.")


def ews_folder_tree(entries: list[_soap.FolderEntry]) -> list[dict[str, Any]]:
    """Pure: FindFolder entries -> Creatio folder items (server order, mail folders only)."""
    mail = [e for e in entries if _is_mail_folder(e)]
    known = {e.folder_id for e in mail}
    return [
        {
            "Id": e.folder_id,
            "Name": e.display_name or e.folder_id,
            "ParentId": e.parent_id if e.parent_id in known else None,
            "Selectable": True,
            "SpecialUse": None,
        }
        for e in mail
    ]


async def find_all_folders(client: EwsClient, parent: str = "msgfolderroot") -> list[_soap.FolderEntry]:
    entries: list[_soap.FolderEntry] = []
    offset = 0
    while True:
        message = await client.call_one(
            _soap.find_folders_deep(parent, offset=offset, max_entries=FOLDER_PAGE_SIZE)
        )
        page = _soap.folder_page(message)
        entries += page.folders
        if page.includes_last or not page.folders:
            return entries
        following = page.next_offset if page.next_offset > offset else offset + len(page.folders)
        if len(entries) >= MAX_FOLDERS:
            raise MailProtocolError(f"EWS listed more than {MAX_FOLDERS} folders")
        offset = following


async def list_ews_folders(mailbox: MailboxConfig, source: EwsSource) -> list[dict[str, Any]]:
    """Every mail folder of the mailbox. Raises MailSourceError subclasses on failure."""
    async with source.client(mailbox) as client:
        return ews_folder_tree(await find_all_folders(client))
