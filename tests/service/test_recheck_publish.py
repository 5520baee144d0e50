"""A recheck the queue will not take is dropped with a warning; the listener goes on.

Seen in a split-role cold start of 10,000 mailboxes: the looks after every session's first IDLE
flooded RabbitMQ, publishing timed out, and each timeout failed its listener, which reconnected
and asked for one more look. The queue here refuses rechecks the way a flooded broker times out
(the rest of the path is real: Dovecot, the Creatio stand-in, the service)."""

from __future__ import annotations

import dataclasses
import logging

import httpx
import pytest
import trio

from emlisten.errors import QueueError
from emlisten.models import MailboxState, SyncTask
from emlisten.queue.inprocess import InProcessQueue
from emlisten.service.node import build_local_adapters, run_node
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot, MailUser, make_message
from tests.service.conftest import RunningService, fast_settings

pytestmark = pytest.mark.dovecot


class _RefusesRechecks(InProcessQueue):
    def __init__(self) -> None:
        super().__init__()
        self.refused = 0

    async def publish(self, task: SyncTask) -> None:
        if task.reason.startswith("recheck"):
            self.refused += 1
            raise QueueError("rabbitmq: TimeoutError")
        await super().publish(task)


async def test_a_refused_recheck_does_not_fail_the_listener(
    dovecot: Dovecot,
    mail_user: MailUser,
    creatio: CreatioStandIn,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = fast_settings(dovecot, recheck_seconds=0.2, recheck_late_seconds=0.4)
    queue = _RefusesRechecks()
    adapters = dataclasses.replace(build_local_adapters(settings), queue=queue)
    shutdown = trio.Event()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        await run_node(settings, adapters, handle_signals=False, shutdown=shutdown, task_status=task_status)

    port = await nursery.start(run)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            service = RunningService(f"http://127.0.0.1:{port}", http, adapters, dovecot, creatio)
            credentials = service.credentials(mail_user)
            (await service.create(credentials)).raise_for_status()
            await service.wait_state(credentials["Id"], MailboxState.LISTENING)
            with trio.fail_after(10):
                while queue.refused < 1:  # the look after the first IDLE
                    await trio.sleep(0.05)
            await dovecot.aappend(mail_user, make_message(subject="after a refused look"))
            with trio.fail_after(15):
                while not creatio.accepted_calls("ProcessFullEmail"):
                    await trio.sleep(0.05)
            with trio.fail_after(10):
                while queue.refused < 2:  # the look after that mail
                    await trio.sleep(0.05)
            assert await service.state_of(credentials["Id"]) is MailboxState.LISTENING
    finally:
        shutdown.set()
    messages = [r.getMessage() for r in caplog.records]
    # Two rechecks refused, one warning (a flood of them says so once a minute).
    assert sum("recheck(s) since the last such warning" in m for m in messages) == 1
    assert not any("listener failed unexpectedly" in m for m in messages)
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)
