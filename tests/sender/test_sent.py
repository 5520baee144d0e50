"""Finding the Sent folder, and ImapClient.append against the test Dovecot."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest
import trio

from emlisten.errors import FolderNotFoundError
from emlisten.mail.imap import ImapSource, ListEntry
from emlisten.mail.imap._parser import parse_internal_date
from emlisten.sender.sent import choose_sent_folder, find_sent_folder
from tests.sender.conftest import mailbox_for
from tests.servers.dovecot import Dovecot, MailUser, make_message


def entry(name: str, *flags: str, delimiter: str | None = "/") -> ListEntry:
    return ListEntry(name=name, delimiter=delimiter, flags=frozenset(flags))


def test_special_use_attribute_wins_over_names() -> None:
    entries = [entry("INBOX"), entry("Sent"), entry("Outbox Archive", "\\HasNoChildren", "\\Sent")]
    assert choose_sent_folder(entries) == "Outbox Archive"


def test_attribute_case_and_unselectable_folders() -> None:
    entries = [entry("[Gmail]", "\\Noselect"), entry("[Gmail]/Sent Mail", "\\SENT")]
    assert choose_sent_folder(entries) == "[Gmail]/Sent Mail"
    assert choose_sent_folder([entry("Sent", "\\NoSelect")]) is None


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["INBOX", "Drafts", "Sent Items"], "Sent Items"),
        (["INBOX", "sent messages"], "sent messages"),
        (["INBOX", "INBOX.Sent", "INBOX.Drafts"], "INBOX.Sent"),
        (["INBOX", "Отправленные", "Черновики"], "Отправленные"),
        (["INBOX", "Gesendete Objekte"], "Gesendete Objekte"),
        (["INBOX", "Archive/Sent"], "Archive/Sent"),  # matched by its last component
        (["INBOX", "Drafts", "Trash"], None),
        (["INBOX", "Sent Items", "Sent"], "Sent"),  # list order of known names decides
    ],
)
def test_name_fallback(names: list[str], expected: str | None) -> None:
    assert choose_sent_folder([entry(n) for n in names]) == expected


async def test_dovecot_sent_folder_is_found_by_its_attribute(dovecot: Dovecot, mail_user: MailUser) -> None:
    client = await ImapSource().connect(mailbox_for(mail_user, dovecot, None))
    try:
        entries = await client.list_folders()
        sent = next(e for e in entries if e.name == "Sent")
        assert "\\Sent" in sent.flags  # Dovecot sends SPECIAL-USE attributes in a plain LIST
        assert await find_sent_folder(client) == "Sent"
    finally:
        await client.close()


async def test_append_returns_the_uid_and_sets_flags_and_date(dovecot: Dovecot, mail_user: MailUser) -> None:
    message = make_message(subject="appended")
    when = datetime(2023, 3, 4, 5, 6, 7, tzinfo=timezone(timedelta(hours=3)))
    client = await ImapSource().connect(mailbox_for(mail_user, dovecot, None))
    try:
        uid = await client.append("Sent", message, internal_date=when)
        second = await client.append("Sent", make_message(), flags=())
    finally:
        await client.close()
    assert uid is not None and second == uid + 1
    assert await dovecot.auids(mail_user, "Sent") == [uid, second]

    def fetch() -> list[bytes]:
        with dovecot.imap(mail_user) as conn:
            conn.select('"Sent"', readonly=True)
            typ, data = conn.uid("FETCH", f"{uid}:{second}", "(FLAGS INTERNALDATE BODY.PEEK[])")
            assert typ == "OK"
            return [item[0] + item[1] for item in data if isinstance(item, tuple)]

    first_meta, second_meta = await trio.to_thread.run_sync(fetch)
    assert rb"\Seen" in first_meta.split(b"BODY[]")[0]
    assert rb"\Seen" not in second_meta.split(b"BODY[]")[0]
    stored = re.search(rb'INTERNALDATE "([^"]+)"', first_meta)
    assert stored is not None
    assert parse_internal_date(stored.group(1)) == when  # the same instant (Dovecot keeps UTC)
    assert first_meta.endswith(message)


async def test_append_to_a_missing_folder(dovecot: Dovecot, mail_user: MailUser) -> None:
    client = await ImapSource().connect(mailbox_for(mail_user, dovecot, None))
    try:
        with pytest.raises(FolderNotFoundError):
            await client.append("No Such Folder", make_message())
        # The client stays usable after a refused APPEND.
        assert await client.append("INBOX", make_message()) is not None
    finally:
        await client.close()


async def test_append_rejects_bad_arguments(dovecot: Dovecot, mail_user: MailUser) -> None:
    client = await ImapSource().connect(mailbox_for(mail_user, dovecot, None))
    try:
        with pytest.raises(ValueError, match="flag"):
            await client.append("INBOX", make_message(), flags=("bad flag",))
        with pytest.raises(ValueError, match="timezone"):
            await client.append("INBOX", make_message(), internal_date=datetime(2023, 1, 1))
    finally:
        await client.close()
