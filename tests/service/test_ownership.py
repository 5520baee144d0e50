"""Several nodes sharing one store: each mailbox listened to by exactly one node, spread fairly,
taken over when a node leaves. (The same logic runs against Redis in the multi-process tests.)"""

from __future__ import annotations

from collections import Counter

import trio

from emlisten.models import MailboxState
from emlisten.service.node import Adapters, build_local_adapters, run_node
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot
from tests.service.conftest import RunningService, fast_settings


async def wait_for(predicate, timeout: float = 15) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.02)


async def test_nodes_share_mailboxes_and_take_over(
    dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery
) -> None:
    shared = build_local_adapters(fast_settings(dovecot))
    nodes = {}
    for name in ("n1", "n2", "n3"):
        settings = fast_settings(dovecot, node_id=name, lease_ttl_seconds=1.0, lease_renew_seconds=0.2)
        scope = trio.CancelScope()
        own = build_local_adapters(settings)  # each node has its own connections, as separate processes do
        adapters = Adapters(shared.store, shared.queue, own.source, own.sink)

        async def run(  # type: ignore[no-untyped-def]
            task_status: trio.TaskStatus[int], settings=settings, scope=scope, adapters=adapters
        ) -> None:
            with scope:
                await run_node(settings, adapters, handle_signals=False, task_status=task_status)

        port = await nursery.start(run)
        nodes[name] = (scope, port)

    import httpx

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{nodes['n1'][1]}", timeout=30) as http:
        service = RunningService(str(http.base_url), http, shared, dovecot, creatio)
        users = [dovecot.add_user() for _ in range(9)]
        creds = [service.credentials(u) for u in users]
        assert (await service.create(*creds)).status_code == 200
        ids = [c["Id"] for c in creds]

        async def all_listening() -> bool:
            return all([await service.state_of(i) is MailboxState.LISTENING for i in ids])

        async def spread_fairly() -> bool:
            owners = await shared.store.lease_owners(ids)
            counts = Counter(owners.values())
            return None not in counts and sorted(counts.values()) == [3, 3, 3]

        await wait_for(spread_fairly)
        await wait_for(all_listening)

        # Another node answers for the same mailboxes (the store is shared).
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{nodes['n2'][1]}") as other:
            response = await other.post("/api/listeners/subscriptionsstate", json=ids)
            assert {v["State"] for v in response.json().values()} == {"exists"}

        # Mail to every mailbox arrives once, whoever owns it.
        for user in users:
            await dovecot.aappend(user, b"Subject: spread\r\n\r\nbody\r\n")
        for mailbox_id in ids:
            await creatio.wait_for_emails(mailbox_id, 1, timeout=15)

        # n3 leaves: its mailboxes move to n1 and n2 and mail keeps flowing, once.
        nodes["n3"][0].cancel()

        async def two_nodes_own_all() -> bool:
            owners = await shared.store.lease_owners(ids)
            return set(owners.values()) == {"n1", "n2"}

        await wait_for(two_nodes_own_all)
        await wait_for(all_listening)
        for user in users:
            await dovecot.aappend(user, b"Subject: after takeover\r\n\r\nbody\r\n")
        for mailbox_id in ids:
            emails = await creatio.wait_for_emails(mailbox_id, 2, timeout=15)
            assert [e["Subject"] for e in emails] == ["spread", "after takeover"]


async def test_bulk_create_and_recreate(
    dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery
) -> None:
    """Creatio's failover job re-creates every mailbox at once: one call, many mailboxes."""
    from tests.service.conftest import running_service

    async with running_service(dovecot, creatio, nursery) as service:
        users = [dovecot.add_user() for _ in range(60)]  # above the bulk threshold
        creds = [service.credentials(u) for u in users]
        assert (await service.create(*creds)).status_code == 200
        for c in creds:
            await service.wait_state(c["Id"], MailboxState.LISTENING)
        await dovecot.aappend(users[0], b"Subject: bulk\r\n\r\nbody\r\n")
        await creatio.wait_for_emails(creds[0]["Id"], 1, timeout=15)

        # recreate restarts every subscription (new revision) and keeps checkpoints.
        before = {c["Id"]: (await service.adapters.store.get_mailbox(c["Id"])).revision for c in creds}  # type: ignore[union-attr]
        assert (await service.create(*creds, path="recreate")).status_code == 200
        after = {c["Id"]: (await service.adapters.store.get_mailbox(c["Id"])).revision for c in creds}  # type: ignore[union-attr]
        assert all(after[i] == before[i] + 1 for i in before)
        for c in creds:
            await service.wait_state(c["Id"], MailboxState.LISTENING)
        await dovecot.aappend(users[0], b"Subject: after recreate\r\n\r\nbody\r\n")
        emails = await creatio.wait_for_emails(creds[0]["Id"], 2, timeout=15)
        assert [e["Subject"] for e in emails] == ["bulk", "after recreate"]
