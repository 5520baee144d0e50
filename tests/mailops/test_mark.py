"""UID STORE and ImapReader.mark (Creatio's MarkEmailsAsSynchronized) against the real Dovecot."""

from __future__ import annotations

import re

import pytest

from emlisten.mail.imap import ImapClient, ImapSource
from emlisten.mail.imap.source import SYNCED_KEYWORD
from emlisten.models import MailboxConfig, Security, ServerEndpoint
from tests.servers.dovecot import Dovecot, MailUser, mailbox_for, make_message

pytestmark = pytest.mark.dovecot


def plain_mailbox(dovecot: Dovecot, user: MailUser) -> MailboxConfig:
    return mailbox_for(dovecot, user, Security.NONE)


def flags_of(dovecot: Dovecot, user: MailUser, folder: str = "INBOX") -> dict[int, set[str]]:
    """Every message's flags, read by an independent client (stdlib imaplib)."""
    with dovecot.imap(user) as conn:
        conn.select(f'"{folder}"', readonly=True)
        typ, data = conn.uid("FETCH", "1:*", "(FLAGS)")
        assert typ == "OK"
    flags: dict[int, set[str]] = {}
    for item in data:
        if not isinstance(item, bytes):
            continue
        match = re.search(rb"UID (\d+) FLAGS \(([^)]*)\)|FLAGS \(([^)]*)\) UID (\d+)", item)
        assert match is not None, item
        if match.group(1):
            uid, names = int(match.group(1)), match.group(2)
        else:
            uid, names = int(match.group(4)), match.group(3)
        flags[uid] = set(names.decode().split())
    return flags


def set_seen(dovecot: Dovecot, user: MailUser, uid: int) -> None:
    with dovecot.imap(user) as conn:
        conn.select("INBOX")
        typ, _ = conn.uid("STORE", str(uid), "+FLAGS", r"(\Seen)")
        assert typ == "OK"


async def test_mark_adds_the_keyword_and_leaves_seen_alone(dovecot: Dovecot, mail_user: MailUser) -> None:
    uids = [await dovecot.aappend(mail_user, make_message(subject=f"m{i}")) for i in range(3)]
    set_seen(dovecot, mail_user, uids[0])
    source = ImapSource(ca_file=str(dovecot.ca_file), command_timeout=30)
    async with source.open_reader(plain_mailbox(dovecot, mail_user)) as reader:
        info = await reader.select("INBOX")  # EXAMINE: read-only by default
        assert info.exists == 3
        await reader.mark(uids[:2])
        # Still usable for reading after the switch to SELECT.
        assert [m.uid for m in await reader.fetch(uids)] == uids
        assert await reader.uids_after(uids[0]) == uids[1:]
    flags = flags_of(dovecot, mail_user)
    assert SYNCED_KEYWORD in flags[uids[0]] and SYNCED_KEYWORD in flags[uids[1]]
    assert SYNCED_KEYWORD not in flags[uids[2]]
    assert "\\Seen" in flags[uids[0]]
    # Neither the mark nor BODY.PEEK[] fetching set \Seen on the others.
    assert "\\Seen" not in flags[uids[1]] and "\\Seen" not in flags[uids[2]]


async def test_mark_with_a_custom_keyword_on_a_writable_select(dovecot: Dovecot, mail_user: MailUser) -> None:
    uid = await dovecot.aappend(mail_user, make_message())
    source = ImapSource(ca_file=str(dovecot.ca_file), command_timeout=30)
    async with source.open_reader(plain_mailbox(dovecot, mail_user)) as reader:
        await reader.select("INBOX", writable=True)
        await reader.mark([uid], "$Exported")
        await reader.mark([uid], "$Exported")  # idempotent
        await reader.mark([])  # nothing to do
    assert "$Exported" in flags_of(dovecot, mail_user)[uid]


async def test_uid_store_replaces_and_removes(dovecot: Dovecot, mail_user: MailUser) -> None:
    uid = await dovecot.aappend(mail_user, make_message())
    async with ImapClient(
        ServerEndpoint(dovecot.host, dovecot.imap_port, Security.NONE), command_timeout=30
    ) as client:
        await client.login(mail_user.name, mail_user.password)
        await client.select("INBOX")
        await client.uid_store([uid], "+FLAGS.SILENT", ["$A", "$B", "\\Flagged"])
        await client.uid_store([uid], "-FLAGS", ["$A"])
    assert flags_of(dovecot, mail_user)[uid] >= {"$B", "\\Flagged"}
    assert "$A" not in flags_of(dovecot, mail_user)[uid]


@pytest.mark.parametrize(
    ("action", "flags"),
    [("+FLAGS", ["bad flag"]), ("+FLAGS", ["(x"]), ("+FLAGS", [""]), ("REPLACE", ["$A"]), ("+FLAGS", ["\\"])],
)
async def test_uid_store_refuses_bad_input_before_sending(action: str, flags: list[str]) -> None:
    client = ImapClient(ServerEndpoint("127.0.0.1", 1, Security.NONE))
    with pytest.raises(ValueError):
        await client.uid_store([1], action, flags)
