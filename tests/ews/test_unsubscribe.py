"""EWS streaming subscriptions are unsubscribed when a listener stops, and left alone on shutdown."""

from __future__ import annotations

import trio
import trio.testing

from emlisten.mail.ews import EwsSource
from tests.ews.conftest import Node, ews_credentials, ews_mailbox, wait_listening
from tests.ews.test_source import Tasks, mime, start_listening
from tests.servers.creatio import CreatioStandIn
from tests.servers.ews import EwsSimulator


async def test_stopping_a_listener_unsubscribes(
    ews: EwsSimulator, source: EwsSource, nursery: trio.Nursery
) -> None:
    account = ews.add_account()
    mailbox = ews_mailbox(ews, account)
    scope = await start_listening(nursery, source, mailbox, Tasks())
    (subscription,) = ews.live_subscriptions(account.address)
    scope.cancel()
    await ews.wait_until(lambda: ews.unsubscribed, what="Unsubscribe")
    assert ews.unsubscribed == [subscription]
    assert ews.live_subscriptions(account.address) == []
    (request,) = ews.requests_for(account.address, "Unsubscribe")
    assert request.status == 200


async def test_a_lost_subscription_is_not_unsubscribed_but_the_new_one_is(
    ews: EwsSimulator, source: EwsSource, nursery: trio.Nursery
) -> None:
    account = ews.add_account()
    tasks = Tasks()
    scope = await start_listening(nursery, source, ews_mailbox(ews, account), tasks)
    (first,) = ews.live_subscriptions(account.address)
    ews.expire_subscription(first)
    await tasks.wait("catch-up", 2)
    (second,) = ews.live_subscriptions(account.address)
    scope.cancel()
    await ews.wait_until(lambda: ews.unsubscribed, what="Unsubscribe")
    # The expired one was the server's to forget; only the live one was unsubscribed.
    assert ews.unsubscribed == [second]
    assert len(ews.requests_for(account.address, "Unsubscribe")) == 1


async def test_on_shutdown_subscriptions_are_left_alone(
    ews: EwsSimulator, source: EwsSource, nursery: trio.Nursery
) -> None:
    account = ews.add_account()
    scope = await start_listening(nursery, source, ews_mailbox(ews, account), Tasks())
    (subscription,) = ews.live_subscriptions(account.address)
    source.keep_subscriptions()
    scope.cancel()
    await ews.wait_until(lambda: ews.open_streams(account.address) == 0, what="stream closed")
    await trio.testing.wait_all_tasks_blocked()  # an Unsubscribe would have been sent by now
    assert ews.unsubscribed == []
    assert ews.live_subscriptions(account.address) == [subscription]


async def test_close_through_the_api_unsubscribes_and_delivery_stops(
    ews: EwsSimulator, creatio: CreatioStandIn, node: Node
) -> None:
    http, adapters = node.http, node.adapters
    account = ews.add_account()
    creds = ews_credentials(ews, account, BpmEndpoint=creatio.endpoint())
    assert (await http.post("/api/listeners/create", json=[creds])).status_code == 200
    await wait_listening(adapters, creds["Id"])
    ews.add_message(account.address, mime("before close"))
    await creatio.wait_for_emails(creds["Id"], 1, timeout=15)
    (subscription,) = ews.live_subscriptions(account.address)

    assert (await http.post("/api/listeners/close", json=[creds["Id"]])).status_code == 200
    await ews.wait_until(lambda: ews.unsubscribed, what="Unsubscribe")
    assert ews.unsubscribed == [subscription]
    assert ews.live_subscriptions(account.address) == []


async def test_shutdown_leaves_the_subscriptions_for_the_next_node(
    ews: EwsSimulator, creatio: CreatioStandIn, node: Node
) -> None:
    http, adapters = node.http, node.adapters
    account = ews.add_account()
    creds = ews_credentials(ews, account, BpmEndpoint=creatio.endpoint())
    assert (await http.post("/api/listeners/create", json=[creds])).status_code == 200
    await wait_listening(adapters, creds["Id"])
    (subscription,) = ews.live_subscriptions(account.address)
    node.shutdown.set()
    with trio.fail_after(15):
        await node.stopped.wait()
    assert ews.unsubscribed == []
    assert ews.live_subscriptions(account.address) == [subscription]
