"""Found by the chaos soak (bench/soak.py, creatio-500): mail announced while a folder's delivery
was being retried waited for the next mail.

The worker settled the tasks that arrived during the retries ("covered by the retry"), but the
retry delivered only the mail the first task carried and, that task being covered, did not ask
the server for more. With Creatio refusing for 30 s, mails appended meanwhile were delivered
only when another mail came to the folder, minutes later."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from emlisten.models import MailboxState
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot, MailUser, make_message
from tests.service.conftest import RunningService, running_service


@pytest.fixture
async def service_without_rechecks(
    dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery
) -> AsyncIterator[RunningService]:
    # No recheck: it would find the waiting mail a few seconds later and hide the fault.
    async with running_service(
        dovecot,
        creatio,
        nursery,
        recheck_seconds=0,
        recheck_late_seconds=0,
        delivery_retry_base_seconds=0.2,
        delivery_retry_cap_seconds=0.4,
    ) as running:
        yield running


async def test_mail_arriving_during_delivery_retries_goes_with_the_retry(
    service_without_rechecks: RunningService, mail_user: MailUser
) -> None:
    service, creatio = service_without_rechecks, service_without_rechecks.creatio
    creds = service.credentials(mail_user)
    assert (await service.create(creds)).status_code == 200
    await service.wait_state(creds["Id"], MailboxState.LISTENING)

    creatio.fail_mailbox(creds["Id"], 500)
    await service.dovecot.aappend(mail_user, make_message("first"))
    await creatio.wait_for_calls("ProcessFullEmail", 1, timeout=15)
    await service.dovecot.aappend(mail_user, make_message("second"))
    # Retries go on while the second mail's task arrives (a few hundred ms apart).
    await creatio.wait_for_calls("ProcessFullEmail", 4, timeout=15)
    creatio.fail_mailbox(creds["Id"], None)

    emails = await creatio.wait_for_emails(creds["Id"], 2, timeout=10)
    assert [e["Subject"] for e in emails] == ["first", "second"]


async def test_retry_after_from_creatio_is_honoured(
    dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery, mail_user: MailUser
) -> None:
    """Creatio (or its proxy) answers 429 with Retry-After: 1 where the worker's own backoff
    would wait 20-40 s: the mail arrives after about a second, not after the backoff."""
    async with running_service(
        dovecot,
        creatio,
        nursery,
        recheck_seconds=0,  # a recheck would deliver the mail on its own and hide the wait
        recheck_late_seconds=0,
        delivery_retry_base_seconds=40.0,
        delivery_retry_cap_seconds=60.0,
    ) as service:
        creds = service.credentials(mail_user)
        assert (await service.create(creds)).status_code == 200
        await service.wait_state(creds["Id"], MailboxState.LISTENING)
        creatio.fail_next("ProcessFullEmail", 429, count=1, retry_after=1)
        started = trio.current_time()
        await dovecot.aappend(mail_user, make_message("after a 429"))
        emails = await creatio.wait_for_emails(creds["Id"], 1, timeout=15)
        assert [e["Subject"] for e in emails] == ["after a 429"]
        assert trio.current_time() - started < 10
        assert [c.status for c in creatio.calls("ProcessFullEmail")][:2] == [429, 200]
