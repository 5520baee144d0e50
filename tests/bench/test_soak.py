"""The chaos soak, short form: real processes (two primaries, two secondaries on a private Redis
and RabbitMQ vhost), faults one after another while mail flows; every mail of the ledger must
reach the Creatio stand-in, and none twice as new mail. The long form is ``python -m bench soak``
(docs/reliability.md)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import trio

from bench.soak import delayed_until
from tests.bench.test_bench import run_bench
from tests.servers.faultproxy import FaultProxy

#: One round, each kind once, shortened (--fault-scale): the kinds that need no long outage to
#: mean something. Redis wiped, IMAP black-holed and Creatio hanging run in the long form.
#: redis-restart is left out until a Creatio 2xx during a Redis outage no longer leads to a
#: second delivery (docs/reliability.md, "Open"): it would fail this test now and then.
SHORT_KINDS = ",".join(
    (
        "kill-secondary",
        "kill-primary",
        "rabbitmq-cut",
        "imap-cut",
        "dovecot-restart",
        "creatio-500",
        "creatio-429",
    )
)


@pytest.mark.dovecot
@pytest.mark.redis
@pytest.mark.rabbitmq
@pytest.mark.timeout(420)
def test_short_soak_loses_nothing_and_doubles_nothing(tmp_path: Path) -> None:
    result = run_bench(
        tmp_path,
        "soak",
        "--mailboxes", "20",
        "--single-mailboxes", "0",
        "--minutes", "4",
        "--rounds", "1",
        "--kinds", SHORT_KINDS,
        "--seed", "16",
        "--rate", "4",
        "--fault-scale", "0.2",
        "--gap", "1",
        "--recover-timeout", "60",
        "--final-timeout", "90",
        "--hibernate-timeout", "none",
        timeout=400,
    )  # fmt: skip
    metrics = result["metrics"]
    faults = metrics["faults"]
    assert sorted(f["kind"] for f in faults) == sorted(SHORT_KINDS.split(","))
    assert [f for f in faults if f["error"]] == []
    assert metrics["mails_written"] > 50
    assert metrics["lost"] == 0, metrics["lost_examples"]
    assert metrics["duplicate_email_ids_as_new_mail"] == 0, metrics["duplicate_examples"]
    assert metrics["unexpected_exits"] == []
    # The faults were real: a secondary died holding a callback, Creatio refused calls.
    assert any("mid-delivery" in f["detail"] for f in faults if f["kind"] == "kill-secondary")
    assert {"500", "429"} <= set(metrics["refused_callbacks_by_status"])
    assert metrics["clean_up"]["redis_keys_left"] == 0


async def _echo(stream: trio.SocketStream) -> None:
    try:
        while data := await stream.receive_some(4096):
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


async def test_fault_proxy_black_hole_holds_bytes_and_connections_until_restored() -> None:
    async with trio.open_nursery() as nursery:
        listeners: list[trio.SocketListener] = await nursery.start(
            partial(trio.serve_tcp, host="127.0.0.1"), _echo, 0
        )
        proxy = FaultProxy("127.0.0.1", listeners[0].socket.getsockname()[1])
        await nursery.start(proxy.serve)
        client = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        await client.send_all(b"before")
        assert await client.receive_some(4096) == b"before"

        proxy.black_hole()
        assert proxy.black_holed
        await client.send_all(b"held")
        late = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        await late.send_all(b"late")
        await proxy.wait_accepted(2)  # the new connection is taken in, but nothing passes
        with trio.move_on_after(0.3) as silent:
            await client.receive_some(4096)
        assert silent.cancelled_caught
        assert proxy.cuts == 0  # silence, not resets

        proxy.restore()
        with trio.fail_after(5):
            assert await client.receive_some(4096) == b"held"
            assert await late.receive_some(4096) == b"late"
        await client.aclose()
        await late.aclose()
        nursery.cancel_scope.cancel()


def test_a_mail_is_excused_only_by_the_faults_that_delayed_it() -> None:
    faults = [(100.0, 110.0), (200.0, 230.0)]
    assert delayed_until(50.0, 51.0, faults) == 50.0  # no fault in its way
    assert delayed_until(105.0, 140.0, faults) == 110.0  # appended during the first
    assert delayed_until(95.0, 140.0, faults) == 110.0  # the first began while it waited
    # The second began more than 60 s after the first ended: the mail should have been there.
    assert delayed_until(105.0, 250.0, faults) == 110.0
    # ...unless the second began within 60 s of its append.
    assert delayed_until(150.0, 250.0, faults) == 230.0
