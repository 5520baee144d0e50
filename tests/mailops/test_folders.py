"""Folder listing in Creatio's shape: the pure tree builder and the real Dovecot round trip."""

from __future__ import annotations

import pytest
import trio

from emlisten.mail.folders import folder_tree, list_folders
from emlisten.mail.imap import ImapSource, ListEntry
from emlisten.mail.imap._parser import encode_mailbox_name
from emlisten.models import FolderInfo, MailboxConfig, Security, ServerEndpoint, SyncTask
from tests.servers.dovecot import Dovecot, MailUser, make_message


def entry(name: str, *flags: str, delimiter: str | None = "/") -> ListEntry:
    return ListEntry(name=name, delimiter=delimiter, flags=frozenset(flags))


def test_tree_from_delimiters() -> None:
    items = folder_tree(
        [
            entry("INBOX", "\\HasNoChildren"),
            entry("Sent", "\\Sent"),
            entry("a", "\\HasChildren"),
            entry("a/b"),
            entry("a/b/Müller"),
        ]
    )
    assert items == [
        {"Id": "INBOX", "Name": "INBOX", "ParentId": None, "Selectable": True, "SpecialUse": None},
        {"Id": "Sent", "Name": "Sent", "ParentId": None, "Selectable": True, "SpecialUse": "\\Sent"},
        {"Id": "a", "Name": "a", "ParentId": None, "Selectable": True, "SpecialUse": None},
        {"Id": "a/b", "Name": "b", "ParentId": "a", "Selectable": True, "SpecialUse": None},
        {"Id": "a/b/Müller", "Name": "Müller", "ParentId": "a/b", "Selectable": True, "SpecialUse": None},
    ]


def test_unlisted_parents_are_added_unselectable_and_noselect_is_marked() -> None:
    items = folder_tree([entry("x/y/z"), entry("n", "\\NoSelect"), entry("gone", "\\NonExistent")])
    assert [(i["Id"], i["ParentId"], i["Selectable"]) for i in items] == [
        ("x", None, False),
        ("x/y", "x", False),
        ("x/y/z", "x/y", True),
        ("n", None, False),
        ("gone", None, False),
    ]


def test_dot_delimiter_flat_names_duplicates_and_special_use_case() -> None:
    items = folder_tree(
        [
            entry("INBOX", delimiter="."),
            entry("INBOX.Archive", "\\archive", delimiter="."),
            entry("INBOX.Archive", delimiter="."),
            entry("flat/name", delimiter=None),
        ]
    )
    assert [(i["Id"], i["Name"], i["ParentId"], i["SpecialUse"]) for i in items] == [
        ("INBOX", "INBOX", None, None),
        ("INBOX.Archive", "Archive", "INBOX", "\\Archive"),
        ("flat/name", "flat/name", None, None),
    ]


@pytest.mark.dovecot
async def test_nested_non_ascii_folders_round_trip_into_a_listener(
    dovecot: Dovecot, mail_user: MailUser
) -> None:
    leaf = "Projekte/Kunden/Müller & Söhne 日本"
    # imaplib sends ASCII only: give it the modified UTF-7 name, as any IMAP client must.
    await dovecot.acreate_folder(mail_user, encode_mailbox_name(leaf).decode("ascii"))
    mailbox = MailboxConfig(
        id=f"mb-{mail_user.name}",
        user_name=mail_user.name,
        password=mail_user.password,
        imap=ServerEndpoint(dovecot.host, dovecot.imaps_port, Security.SSL_ON_CONNECT),
        bpm_endpoint="http://127.0.0.1:1/",
    )
    source = ImapSource(ca_file=str(dovecot.ca_file), command_timeout=30)
    items = {item["Id"]: item for item in await list_folders(mailbox, source)}

    assert items[leaf] == {
        "Id": leaf,
        "Name": "Müller & Söhne 日本",
        "ParentId": "Projekte/Kunden",
        "Selectable": True,
        "SpecialUse": None,
    }
    # Dovecot's maildir creates the intermediate levels as \Noselect placeholders.
    assert items["Projekte/Kunden"]["ParentId"] == "Projekte"
    assert items["Projekte"]["ParentId"] is None
    assert items["Projekte"]["Selectable"] is False
    assert items["Sent"]["SpecialUse"] == "\\Sent"
    assert items["INBOX"]["ParentId"] is None

    # The Id is what FolderIds carries back: the listener must be able to IDLE on it.
    sink_send, sink_receive = trio.open_memory_channel[SyncTask](10)

    async def on_new_mail(task: SyncTask) -> None:
        await sink_send.send(task)

    async with trio.open_nursery() as nursery:
        info: FolderInfo = await nursery.start(source.listen, mailbox, items[leaf]["Id"], on_new_mail)
        assert info.name == leaf
        with trio.fail_after(30):
            assert (await sink_receive.receive()).reason == "catch-up"
        await dovecot.aappend(mail_user, make_message(), encode_mailbox_name(leaf).decode("ascii"))
        with trio.fail_after(30):
            task = await sink_receive.receive()
        assert (task.folder, task.reason) == (leaf, "exists")
        nursery.cancel_scope.cancel()

    async with source.open_reader(mailbox) as reader:
        await reader.select(leaf)
        assert len(await reader.uids_after(0)) == 1
