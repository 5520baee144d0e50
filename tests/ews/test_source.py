"""EwsSource and EwsReader against the EWS simulator (a real HTTP server)."""

from __future__ import annotations

from email.message import EmailMessage

import pytest
import trio

from emlisten.errors import MailAuthError, MailConnectError, MailTokenRejectedError
from emlisten.mail.ews import EWS_UIDVALIDITY, EwsSource
from emlisten.models import INBOX, Checkpoint, FolderInfo, MailboxConfig, SyncTask
from tests.ews.conftest import ews_mailbox
from tests.servers.ews import EwsSimulator


def mime(subject: str, body: str = "hello\n", attachment: bytes | None = None) -> bytes:
    message = EmailMessage()
    message["From"] = "sender@example.test"
    message["To"] = "rcpt@example.test"
    message["Subject"] = subject
    message.set_content(body)
    if attachment is not None:
        message.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="a.bin")
    return message.as_bytes()


class Tasks:
    """Collects what a listener publishes; tests wait on it with events."""

    def __init__(self) -> None:
        self.tasks: list[SyncTask] = []
        self._changed = trio.Event()

    async def __call__(self, task: SyncTask) -> None:
        self.tasks.append(task)
        self._changed.set()
        self._changed = trio.Event()

    def of(self, reason: str) -> list[SyncTask]:
        return [t for t in self.tasks if t.reason == reason]

    async def wait(self, reason: str, count: int, timeout: float = 10) -> list[SyncTask]:
        with trio.fail_after(timeout):
            while len(self.of(reason)) < count:
                await self._changed.wait()
        return self.of(reason)


async def start_listening(
    nursery: trio.Nursery, source: EwsSource, mailbox: MailboxConfig, tasks: Tasks, folder: str = INBOX
) -> trio.CancelScope:
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[FolderInfo]) -> None:
        with scope:
            await source.listen(mailbox, folder, tasks, task_status=task_status)

    await nursery.start(run)
    return scope


async def read_new(
    source: EwsSource, mailbox: MailboxConfig, checkpoint: Checkpoint
) -> tuple[list[bytes], Checkpoint]:
    async with source.open_reader(mailbox) as reader:
        messages, after = await reader.fetch_new(INBOX, checkpoint, limit=100)
    return [m.data for m in messages], after


async def test_new_mail_is_notified_and_read_intact(
    ews: EwsSimulator, source: EwsSource, nursery: trio.Nursery
) -> None:
    account = ews.add_account()
    ews.add_message(account.address, mime("old"))  # before the subscription: not delivered
    mailbox = ews_mailbox(ews, account)
    tasks = Tasks()
    scope = await start_listening(nursery, source, mailbox, tasks)
    (catch_up,) = tasks.of("catch-up")
    assert catch_up.seed_cursor and catch_up.uidvalidity == EWS_UIDVALIDITY
    seed = Checkpoint(EWS_UIDVALIDITY, 0, catch_up.seed_cursor)

    raw = mime("Grüße", "Schöne Grüße ✓\n", bytes(range(256)) * 40)
    item_id = ews.add_message(account.address, raw)
    (exists,) = await tasks.wait("exists", 1)
    assert (exists.mailbox_id, exists.folder) == (mailbox.id, INBOX)

    async with source.open_reader(mailbox) as reader:
        messages, after = await reader.fetch_new(INBOX, seed, limit=100)
        assert [m.data for m in messages] == [raw]
        assert messages[0].key == item_id and messages[0].internal_date is not None
        assert messages[0].position is None
        assert after.last_uid == 1 and after.cursor and after.cursor != seed.cursor
        # Nothing new: the same checkpoint (though the server sends a fresh state string).
        assert await reader.fetch_new(INBOX, after, limit=100) == ([], after)
    scope.cancel()
    (request, *_) = ews.requests_for(account.address, "Subscribe")
    assert request.anchor == account.address and request.authorization_scheme == "basic"


async def test_stream_reissued_after_connection_status_closed(
    ews: EwsSimulator, source: EwsSource, nursery: trio.Nursery
) -> None:
    account = ews.add_account()
    tasks = Tasks()
    await start_listening(nursery, source, ews_mailbox(ews, account), tasks)
    # A "minute" lasts 0.4 s here: the first response ends with ConnectionStatus Closed.
    await ews.wait_until(lambda: len(ews.requests_for(account.address, "GetStreamingEvents")) >= 3)
    assert len(ews.requests_for(account.address, "Subscribe")) == 1
    ews.add_message(account.address, mime("after re-issue"))
    await tasks.wait("exists", 1)


async def test_burst_puts_several_envelopes_in_a_chunk(
    ews: EwsSimulator, source: EwsSource, nursery: trio.Nursery
) -> None:
    account = ews.add_account()
    tasks = Tasks()
    mailbox = ews_mailbox(ews, account)
    await start_listening(nursery, source, mailbox, tasks)
    for n in range(5):
        ews.add_message(account.address, mime(f"burst {n}"))
    await tasks.wait("exists", 1)
    (catch_up,) = tasks.of("catch-up")
    data, after = await read_new(source, mailbox, Checkpoint(1, 0, catch_up.seed_cursor))
    assert [d.split(b"Subject: ")[1].split(b"\n")[0] for d in data] == [
        f"burst {n}".encode() for n in range(5)
    ]
    assert after.last_uid == 1


async def test_dropped_stream_raises_connect_error_and_nothing_is_lost(
    ews: EwsSimulator, source: EwsSource
) -> None:
    account = ews.add_account()
    mailbox = ews_mailbox(ews, account)
    tasks = Tasks()
    with pytest.raises(ExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            await start_listening(nursery, source, mailbox, tasks)
            seed = Checkpoint(1, 0, tasks.of("catch-up")[0].seed_cursor)
            await ews.wait_until(lambda: ews.open_streams(account.address))
            assert ews.drop_streams(account.address) == 1
            ews.add_message(account.address, mime("while dropped"))
    assert info.group_contains(MailConnectError)
    # The supervisor would listen again: a new catch-up, and the reader finds the mail.
    async with trio.open_nursery() as nursery:
        scope = await start_listening(nursery, source, mailbox, tasks)
        assert len(tasks.of("catch-up")) == 2
        data, _ = await read_new(source, mailbox, seed)
        assert len(data) == 1 and b"while dropped" in data[0]
        scope.cancel()


async def test_expired_subscription_is_recreated_with_a_catch_up(
    ews: EwsSimulator, source: EwsSource, nursery: trio.Nursery
) -> None:
    account = ews.add_account()
    mailbox = ews_mailbox(ews, account)
    tasks = Tasks()
    await start_listening(nursery, source, mailbox, tasks)
    seed = Checkpoint(1, 0, tasks.of("catch-up")[0].seed_cursor)
    await ews.wait_until(lambda: ews.open_streams(account.address))
    first = ews.live_subscriptions(account.address)
    assert ews.expire_subscriptions(account.address) == 1
    ews.add_message(account.address, mime("lost event"))  # its notification is gone with the subscription
    await tasks.wait("catch-up", 2)
    assert len(ews.requests_for(account.address, "Subscribe")) == 2
    assert ews.live_subscriptions(account.address) != first
    data, _ = await read_new(source, mailbox, seed)
    assert len(data) == 1 and b"lost event" in data[0]
    ews.add_message(account.address, mime("new subscription works"))
    await tasks.wait("exists", 1)


async def test_server_busy_back_off_is_honoured(ews: EwsSimulator, source: EwsSource) -> None:
    account = ews.add_account()
    mailbox = ews_mailbox(ews, account)
    ews.add_message(account.address, mime("one"))
    ews.throttle(account.address, 400, count=1)
    async with source.open_reader(mailbox) as reader:
        position = await reader.current_position(INBOX)
    assert position.cursor
    busy, retried = ews.requests_for(account.address, "SyncFolderItems")[:2]
    assert busy.busy and busy.status == 500
    assert not retried.busy and retried.status == 200
    assert retried.at - busy.at >= 0.4


async def test_server_busy_on_the_stream_is_honoured(
    ews: EwsSimulator, source: EwsSource, nursery: trio.Nursery
) -> None:
    account = ews.add_account()
    tasks = Tasks()
    await start_listening(nursery, source, ews_mailbox(ews, account), tasks)
    await ews.wait_until(lambda: ews.open_streams(account.address))
    ews.throttle(account.address, 300, count=1)
    # The stream ends after a "minute"; the re-issue is answered busy, then honoured.
    await ews.wait_until(
        lambda: [r for r in ews.requests_for(account.address, "GetStreamingEvents") if r.status == 200][1:]
    )
    streams = ews.requests_for(account.address, "GetStreamingEvents")
    busy_at = next(i for i, r in enumerate(streams) if r.busy)
    assert not streams[busy_at + 1].busy
    assert streams[busy_at + 1].at - streams[busy_at].at >= 0.3
    assert sum(r.busy for r in streams) == 1  # never hammered during the back-off


async def test_wrong_password_is_an_auth_error(ews: EwsSimulator, source: EwsSource) -> None:
    account = ews.add_account()
    mailbox = ews_mailbox(ews, account, Password="wrong")
    with pytest.raises(MailAuthError) as info:
        await source.listen(mailbox, INBOX, Tasks())
    assert "wrong" not in str(info.value) and "401" in str(info.value)


async def test_bearer_token(ews: EwsSimulator, source: EwsSource, nursery: trio.Nursery) -> None:
    account = ews.add_account()
    token = ews.issue_token(account.address)
    mailbox = ews_mailbox(ews, account, Password=None, UseOAuth=True, AccessToken=token)
    tasks = Tasks()
    scope = await start_listening(nursery, source, mailbox, tasks)
    scope.cancel()
    assert {r.authorization_scheme for r in ews.requests_for(account.address)} == {"bearer"}
    ews.revoke_token(token)
    with pytest.raises(MailTokenRejectedError) as info:
        await source.listen(mailbox, INBOX, Tasks())
    assert token not in str(info.value)


async def test_impersonation_acts_on_the_target_mailbox(ews: EwsSimulator, source: EwsSource) -> None:
    service = ews.add_account(can_impersonate=True)
    target = ews.add_account()
    mailbox = ews_mailbox(ews, service, SenderEmailAddress=target.address, ImpersonatedUser=target.address)
    async with source.open_reader(mailbox) as reader:
        seed = await reader.current_position(INBOX)
        ews.add_message(target.address, mime("for the target"))
        messages, _ = await reader.fetch_new(INBOX, seed, limit=10)
    assert len(messages) == 1
    (request, *_) = ews.requests_for(target.address, "SyncFolderItems")
    assert request.impersonated == target.address and request.anchor == target.address

    plain = ews.add_account()
    denied = ews_mailbox(ews, plain, ImpersonatedUser=target.address)
    with pytest.raises(MailAuthError, match="ErrorImpersonateUserDenied"):
        async with source.open_reader(denied) as reader:
            await reader.current_position(INBOX)


async def test_deleted_before_fetch_is_skipped_and_the_cursor_moves(
    ews: EwsSimulator, source: EwsSource
) -> None:
    account = ews.add_account()
    mailbox = ews_mailbox(ews, account)
    async with source.open_reader(mailbox) as reader:
        seed = await reader.current_position(INBOX)
        gone = ews.add_message(account.address, mime("gone"))
        ews.add_message(account.address, mime("kept"))
        ews.delete_message(account.address, gone)
        messages, after = await reader.fetch_new(INBOX, seed, limit=10)
        assert [b"kept" in m.data for m in messages] == [True]
        assert after.last_uid == 1
        # Only a deletion after the cursor: the cursor moves on without messages.
        ews.delete_message(account.address, messages[0].key)
        empty, moved = await reader.fetch_new(INBOX, after, limit=10)
        assert empty == [] and moved.last_uid == 2 and moved.cursor != after.cursor
        assert await reader.fetch_new(INBOX, moved, limit=10) == ([], moved)


async def test_limit_and_paging(ews: EwsSimulator, source: EwsSource) -> None:
    account = ews.add_account()
    mailbox = ews_mailbox(ews, account)
    async with source.open_reader(mailbox) as reader:
        seed = await reader.current_position(INBOX)
        for n in range(5):
            ews.add_message(account.address, mime(f"m{n}"))
        first, after = await reader.fetch_new(INBOX, seed, limit=3)
        second, end = await reader.fetch_new(INBOX, after, limit=3)
    assert len(first) == 3 and len(second) == 2
    assert (after.last_uid, end.last_uid) == (1, 2)


async def test_empty_cursor_starts_at_the_current_end(ews: EwsSimulator, source: EwsSource) -> None:
    account = ews.add_account()
    ews.add_message(account.address, mime("history"))
    async with source.open_reader(ews_mailbox(ews, account)) as reader:
        messages, after = await reader.fetch_new(INBOX, Checkpoint(1, 4), limit=10)
    assert messages == [] and after.last_uid == 5 and after.cursor


async def test_unknown_folder_is_reported(ews: EwsSimulator, source: EwsSource) -> None:
    from emlisten.errors import FolderNotFoundError

    account = ews.add_account()
    with pytest.raises(FolderNotFoundError):
        await source.listen(ews_mailbox(ews, account), "AQMkAnope", Tasks())


async def test_other_folder_by_id(ews: EwsSimulator, source: EwsSource, nursery: trio.Nursery) -> None:
    account = ews.add_account()
    folder_id = ews.add_folder(account.address, "Support")
    mailbox = ews_mailbox(ews, account, FolderIds=[folder_id])
    assert mailbox.folders == (folder_id,)
    tasks = Tasks()
    await start_listening(nursery, source, mailbox, tasks, folder=folder_id)
    ews.add_message(account.address, mime("inbox mail"))
    ews.add_message(account.address, mime("support mail"), folder_id=folder_id)
    (task,) = await tasks.wait("exists", 1)
    assert task.folder == folder_id
    async with source.open_reader(mailbox) as reader:
        seed = Checkpoint(1, 0, tasks.of("catch-up")[0].seed_cursor)
        messages, _ = await reader.fetch_new(folder_id, seed, limit=10)
    assert [b"support mail" in m.data for m in messages] == [True]


async def test_persistent_busy_gives_up_after_waiting(ews: EwsSimulator) -> None:
    from emlisten.mail.ews import ServerBusyError

    source = EwsSource(busy_retries=2, request_timeout=10)
    account = ews.add_account()
    ews.throttle(account.address, 150, count=10)
    started = trio.current_time()
    with pytest.raises(ServerBusyError):
        async with source.open_reader(ews_mailbox(ews, account)) as reader:
            await reader.current_position(INBOX)
    # Both back-offs were waited out, the second one before giving up.
    assert trio.current_time() - started >= 0.3
    assert [r.busy for r in ews.requests_for(account.address)] == [True, True]
