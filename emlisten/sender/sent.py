"""Finding a mailbox's Sent folder over IMAP, and storing a copy of a sent message there.

The folder is the one LIST marks ``\\Sent`` (RFC 6154 SPECIAL-USE; Dovecot, Gmail, Exchange and
most others send the attribute in a plain LIST), else the first well-known name found (English
and localized names, ``INBOX.``-prefixed ones). No folder is ever created.
"""

from __future__ import annotations

from collections.abc import Sequence

from emlisten.mail.imap._client import ImapClient, ListEntry

__all__ = ["SENT_FOLDER_NAMES", "choose_sent_folder", "find_sent_folder"]

#: Names tried, in order, when no folder carries ``\Sent``. Compared case-insensitively with the
#: full name, then with the last path component.
SENT_FOLDER_NAMES: tuple[str, ...] = (
    "Sent",
    "Sent Items",
    "Sent Messages",
    "Sent Mail",
    "[Gmail]/Sent Mail",
    "[Google Mail]/Sent Mail",
    "INBOX.Sent",
    "INBOX/Sent",
    "INBOX.Sent Items",
    "INBOX.Sent Messages",
    "Отправленные",
    "Отправленные элементы",
    "Надіслані",
    "Gesendet",
    "Gesendete Objekte",
    "Gesendete Elemente",
    "Envoyés",
    "Éléments envoyés",
    "Messages envoyés",
    "Enviados",
    "Elementos enviados",
    "Itens Enviados",
    "Posta inviata",
    "Inviati",
    "Verzonden",
    "Verzonden items",
    "Wysłane",
    "Elementy wysłane",
    "Odeslaná pošta",
    "Skickat",
    "Skickade objekt",
    "Sendt",
    "Sendte elementer",
    "Lähetetyt",
    "Gönderilmiş Öğeler",
    "送信済み",
    "已发送",
)

_UNUSABLE = frozenset({"\\noselect", "\\nonexistent"})


def choose_sent_folder(entries: Sequence[ListEntry]) -> str | None:
    """The Sent folder among LIST entries, or None."""

    usable = [e for e in entries if not ({f.lower() for f in e.flags} & _UNUSABLE)]
    for entry in usable:
        if any(flag.lower() == "\\sent" for flag in entry.flags):
            return entry.name
    by_name = {entry.name.casefold(): entry.name for entry in usable}
    for candidate in SENT_FOLDER_NAMES:
        found = by_name.get(candidate.casefold())
        if found is not None:
            return found
    leaves: dict[str, str] = {}
    for entry in usable:
        leaf = entry.name.rsplit(entry.delimiter, 1)[-1] if entry.delimiter else entry.name
        leaves.setdefault(leaf.casefold(), entry.name)
    for candidate in SENT_FOLDER_NAMES:
        found = leaves.get(candidate.casefold())
        if found is not None:
            return found
    return None


async def find_sent_folder(client: ImapClient, *, timeout: float | None = None) -> str | None:  # noqa: ASYNC109
    """The Sent folder of the logged-in ``client``'s account, or None when there is none."""

    return choose_sent_folder(await client.list_folders(timeout=timeout))
