"""Many subscriptions on few GetStreamingEvents connections, against the EWS simulator."""

from __future__ import annotations

import pytest
import trio

from emlisten.errors import MailConnectError
from emlisten.mail.ews import EwsSource
from emlisten.models import FolderInfo, MailboxConfig
from tests.ews.conftest import ews_mailbox
from tests.ews.test_source import Tasks, mime
from tests.servers.ews import EwsSimulator


async def listen_all(
    nursery: trio.Nursery, source: EwsSource, mailbox: MailboxConfig, folders: list[str], tasks: Tasks
) -> None:
    """Start one listener per folder, 50 at a time; returns when every one has started."""
    limiter = trio.CapacityLimiter(50)
    async with trio.open_nursery() as starters:
        for folder in folders:

            async def start(folder: str = folder) -> None:
                async def run(task_status: trio.TaskStatus[FolderInfo]) -> None:
                    await source.listen(mailbox, folder, tasks, task_status=task_status)

                async with limiter:
                    await nursery.start(run)

            starters.start_soon(start)


async def supervise(
    nursery: trio.Nursery, source: EwsSource, mailbox: MailboxConfig, folders: list[str], tasks: Tasks
) -> list[int]:
    """Like the mailbox supervisor: a listener that fails to connect is started again.
    Returns a list that counts the connect errors."""
    errors: list[int] = []
    async with trio.open_nursery() as starters:
        for folder in folders:

            async def start(folder: str = folder) -> None:
                async def run(task_status: trio.TaskStatus[None]) -> None:
                    status: trio.TaskStatus[FolderInfo] | None = None

                    async def first(task_status: trio.TaskStatus[FolderInfo]) -> None:
                        await source.listen(mailbox, folder, tasks, task_status=task_status)

                    while True:
                        try:
                            if status is None:
                                async with trio.open_nursery() as inner:
                                    await inner.start(first)
                                    task_status.started()
                                    status = trio.TASK_STATUS_IGNORED
                            else:
                                await source.listen(mailbox, folder, tasks)
                        except* MailConnectError:
                            errors.append(1)

                await nursery.start(run)

            starters.start_soon(start)
    return errors


async def test_250_subscriptions_share_two_connections(ews: EwsSimulator, nursery: trio.Nursery) -> None:
    source = EwsSource(connection_timeout_minutes=30, stream_idle_timeout=10, request_timeout=20)
    account = ews.add_account()
    folders = [ews.add_folder(account.address, f"F{n}") for n in range(250)]
    mailbox = ews_mailbox(ews, account, FolderIds=folders)
    tasks = Tasks()
    await listen_all(nursery, source, mailbox, folders, tasks)
    # Every started listener is in an open response (subscriptions move to the newest one).
    assert sum(ews.stream_sizes(account.address)) == 250
    await ews.wait_until(lambda: ews.stream_sizes(account.address) == [200, 50], what="two connections")
    assert sorted(source.streaming_connections(), reverse=True) == [200, 50]
    assert len(ews.requests_for(account.address, "Subscribe")) == 250
    # Far fewer requests than listeners: joins in a burst share one re-issue.
    assert len(ews.requests_for(account.address, "GetStreamingEvents")) < 125
    for index in (0, 137, 199, 200, 249):
        ews.add_message(account.address, mime(f"to {index}"), folder_id=folders[index])
    wanted = {folders[i] for i in (0, 137, 199, 200, 249)}
    # CreatedEvent and NewMailEvent arrive in separate envelopes: two tasks per mail.
    await tasks.wait("exists", 10)
    assert {t.folder for t in tasks.of("exists")} == wanted
    assert len(tasks.of("catch-up")) == 250


async def test_one_expired_subscription_resubscribes_alone(
    ews: EwsSimulator, source: EwsSource, nursery: trio.Nursery
) -> None:
    account = ews.add_account()
    folders = [ews.add_folder(account.address, f"F{n}") for n in range(3)]
    mailbox = ews_mailbox(ews, account, FolderIds=folders)
    tasks = Tasks()
    await listen_all(nursery, source, mailbox, folders, tasks)
    await ews.wait_until(lambda: ews.stream_sizes(account.address) == [3])
    ews.expire_subscription(ews.subscription_of_folder(account.address, folders[1]))
    await tasks.wait("catch-up", 4)
    assert [t.folder for t in tasks.of("catch-up")].count(folders[1]) == 2
    assert len(ews.requests_for(account.address, "Subscribe")) == 4
    await ews.wait_until(lambda: ews.stream_sizes(account.address) == [3], what="back on one connection")
    for folder in folders:
        ews.add_message(account.address, mime("after"), folder_id=folder)
    await tasks.wait("exists", 6)
    assert {t.folder for t in tasks.of("exists")} == set(folders)
    assert len(tasks.of("catch-up")) == 4  # the others never re-subscribed


async def test_dropped_connection_makes_every_member_catch_up(
    ews: EwsSimulator, source: EwsSource, nursery: trio.Nursery
) -> None:
    account = ews.add_account()
    folders = [ews.add_folder(account.address, f"F{n}") for n in range(4)]
    mailbox = ews_mailbox(ews, account, FolderIds=folders)
    tasks = Tasks()
    errors = await supervise(nursery, source, mailbox, folders, tasks)
    await ews.wait_until(lambda: ews.stream_sizes(account.address) == [4])
    assert ews.drop_streams(account.address) >= 1
    await tasks.wait("catch-up", 8)
    assert len(errors) == 4
    assert sorted(t.folder for t in tasks.of("catch-up")) == sorted(folders * 2)
    await ews.wait_until(lambda: ews.stream_sizes(account.address) == [4], what="one connection again")
    ews.add_message(account.address, mime("after the drop"), folder_id=folders[2])
    await tasks.wait("exists", 2)
    assert {t.folder for t in tasks.of("exists")} == {folders[2]}


async def test_leaving_listeners_shrink_the_request(
    ews: EwsSimulator, source: EwsSource, nursery: trio.Nursery
) -> None:
    account = ews.add_account()
    folders = [ews.add_folder(account.address, f"F{n}") for n in range(3)]
    mailbox = ews_mailbox(ews, account, FolderIds=folders)
    tasks = Tasks()
    scopes: list[trio.CancelScope] = []
    for folder in folders:
        scope = trio.CancelScope()

        async def run(
            task_status: trio.TaskStatus[FolderInfo], folder: str = folder, scope: trio.CancelScope = scope
        ) -> None:
            with scope:
                await source.listen(mailbox, folder, tasks, task_status=task_status)

        await nursery.start(run)
        scopes.append(scope)
    await ews.wait_until(lambda: ews.stream_sizes(account.address) == [3])
    scopes[0].cancel()
    await ews.wait_until(lambda: ews.stream_sizes(account.address) == [2], what="re-issued without it")
    for scope in scopes[1:]:
        scope.cancel()
    await ews.wait_until(lambda: ews.stream_sizes(account.address) == [], what="no connection left")
    # The server may end the stream first (each Unsubscribe empties it) while the connection
    # still settles: it goes within its settle delay.
    with trio.fail_after(5):
        while source.streaming_connections():
            await trio.sleep(0.01)


async def test_simulator_refuses_more_than_200_subscriptions(ews: EwsSimulator, source: EwsSource) -> None:
    from emlisten.mail.ews import _soap

    account = ews.add_account()
    faults: list[str] = []

    async def on_envelope(root: object) -> bool:
        fault = _soap.fault_of(root)  # type: ignore[arg-type]
        faults.append(fault.code if fault else "")
        return False

    async with source.client(ews_mailbox(ews, account)) as client:
        await client.stream(_soap.get_streaming_events([f"id{n}" for n in range(201)], 1), on_envelope)
    assert faults == ["ErrorInvalidRequest"]


@pytest.mark.parametrize("limit", [0, 201])
def test_connection_capacity_is_checked(limit: int) -> None:
    with pytest.raises(ValueError):
        EwsSource(subscriptions_per_connection=limit)


async def test_a_service_account_groups_mailboxes_with_server_affinity(
    ews: EwsSimulator, nursery: trio.Nursery
) -> None:
    source = EwsSource(connection_timeout_minutes=30, stream_idle_timeout=10, request_timeout=20)
    service = ews.add_account(can_impersonate=True)
    targets = [ews.add_account() for _ in range(250)]
    tasks = Tasks()
    limiter = trio.CapacityLimiter(50)
    async with trio.open_nursery() as starters:
        for target in targets:
            mailbox = ews_mailbox(
                ews, service, SenderEmailAddress=target.address, ImpersonatedUser=target.address
            )

            async def start(mailbox: MailboxConfig = mailbox) -> None:
                async def run(task_status: trio.TaskStatus[FolderInfo]) -> None:
                    await source.listen(mailbox, "INBOX", tasks, task_status=task_status)

                async with limiter:
                    await nursery.start(run)

            starters.start_soon(start)
    # 250 mailboxes on two connections (not 250): Exchange's 200 per connection.
    await ews.wait_until(lambda: ews.open_stream_sizes() == [200, 50], what="two connections")
    assert sorted(source.streaming_connections(), reverse=True) == [200, 50]
    # Each group was subscribed with its anchor and affinity, and is read with the same anchor
    # and the server's cookie (else the simulator refuses another mailbox's subscription).
    anchors = {s.anchor for s in ews._subscriptions.values()}
    assert len(anchors) == 2 and anchors <= {t.address.lower() for t in targets}
    assert ews.grouped_streams
    for anchor, cookie in ews.grouped_streams:
        assert anchor in anchors and cookie == f"X-BackEndOverrideCookie=mbx01~{anchor}"
    for index in (0, 199, 249):
        ews.add_message(targets[index].address, mime(f"to {index}"))
    await tasks.wait("exists", 6)
    assert len(tasks.of("catch-up")) == 250
