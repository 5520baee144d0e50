"""History loads (POST /api/email/synchronize) through the real service, Dovecot and the stand-in."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio

from emlisten.api.history import FiltersError, parse_filters, ticks_to_datetime
from emlisten.models import MailboxState
from emlisten.service.history import _imap_date
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot, MailUser, make_message
from tests.service.conftest import RunningService, running_service

TICKS_EPOCH = datetime(1, 1, 1, tzinfo=UTC)
#: INTERNALDATEs of the old mails: deliberately not in UID order.
OLD_DATES = [datetime(2023, 1, day, 12, 0, tzinfo=UTC) for day in (3, 1, 5, 2, 4)]


def ticks(moment: datetime) -> int:
    return (moment - TICKS_EPOCH) // timedelta(microseconds=1) * 10


def subject_of(moment: datetime) -> str:
    return f"old mail of {moment:%Y-%m-%d %H:%M}"


def append_dated(dovecot: Dovecot, user: MailUser, message: bytes, when: datetime) -> None:
    """APPEND with an explicit INTERNALDATE (the tests helper's APPEND uses "now")."""
    with dovecot.imap(user) as conn:
        typ, data = conn.append('"INBOX"', "", when, message)
        assert typ == "OK", data


async def mailbox_with_old_mail(service: RunningService, user: MailUser, dates: list[datetime]) -> None:
    for when in dates:
        await trio.to_thread.run_sync(
            append_dated, service.dovecot, user, make_message(subject_of(when)), when
        )


async def create_listening(service: RunningService, user: MailUser) -> dict[str, Any]:
    credentials = service.credentials(user)
    response = await service.create(credentials)
    assert response.status_code == 200, response.text
    await service.wait_state(credentials["Id"], MailboxState.LISTENING)
    return credentials


async def synchronize(service: RunningService, credentials: dict[str, Any], filters: Any) -> Any:
    return await service.http.post(
        "/api/email/synchronize", json={"Credentials": credentials, "Filters": filters}
    )


async def history_of(service: RunningService, mailbox_id: str) -> dict[str, Any] | None:
    body = (await service.http.get("/v1/mailboxes")).json()
    (entry,) = [m for m in body["mailboxes"] if m["id"] == mailbox_id]
    history: dict[str, Any] | None = entry["history"]
    return history


async def wait_history(
    service: RunningService, mailbox_id: str, state: str, timeout: float = 20
) -> dict[str, Any]:
    # Progress lives in the node's memory and has no change feed: poll it briefly.
    with trio.fail_after(timeout):
        while True:
            history = await history_of(service, mailbox_id)
            if history is not None and history["state"] == state:
                return history
            await trio.sleep(0.02)


async def test_history_is_delivered_once_in_date_order(service: RunningService, make_mail_user: Any) -> None:
    user: MailUser = make_mail_user()
    await mailbox_with_old_mail(service, user, OLD_DATES)
    credentials = await create_listening(service, user)
    mailbox_id = credentials["Id"]
    assert await history_of(service, mailbox_id) is None

    await service.dovecot.aappend(user, make_message("live mail"))
    (live,) = await service.creatio.wait_for_emails(mailbox_id, 1, timeout=15)
    assert live["Subject"] == "live mail"

    response = await synchronize(service, credentials, str(ticks(datetime(2022, 12, 1, tzinfo=UTC))))
    assert response.status_code == 200, response.text
    assert response.json()["Started"] is True
    emails = await service.creatio.wait_for_emails(mailbox_id, 6, timeout=20)
    done = await wait_history(service, mailbox_id, "done")
    assert (done["total"], done["delivered"], done["skipped"], done["remaining"]) == (5, 5, 0, 0)
    assert done["since"] == "2022-12-01T00:00:00+00:00" and done["error"] is None
    assert [e["Subject"] for e in emails[1:]] == [subject_of(d) for d in sorted(OLD_DATES)]
    # The history calls carry their own idempotency keys.
    keys = [c.headers.get("idempotency-key", "") for c in service.creatio.accepted_calls("ProcessFullEmail")]
    assert any(k.startswith("history:") for k in keys)
    status = (await service.http.get("/api/listeners/status")).json()
    assert status["HistoryLoads"] == 0

    # Creatio's failover job asks again (and again): nothing is delivered twice.
    for filters in ({"StartDate": ticks(datetime(2022, 12, 1, tzinfo=UTC))}, "2000-01-01"):
        response = await synchronize(service, credentials, filters)
        assert response.json()["Started"] is True
        again = await wait_history(service, mailbox_id, "done")
        assert (again["total"], again["delivered"], again["skipped"]) == (0, 0, 5)
    assert len(service.creatio.emails_for(mailbox_id)) == 6
    ids = [e["Id"] for e in service.creatio.emails_for(mailbox_id)]
    assert len(set(ids)) == 6


async def test_only_mail_since_the_date(service: RunningService, make_mail_user: Any) -> None:
    user: MailUser = make_mail_user()
    await mailbox_with_old_mail(service, user, OLD_DATES)
    credentials = await create_listening(service, user)
    since = datetime(2023, 1, 3, 12, 0, tzinfo=UTC)  # exactly the date of one mail: included
    response = await synchronize(service, credentials, f'{{"startDate": "{since.isoformat()}"}}')
    assert response.status_code == 200, response.text
    done = await wait_history(service, credentials["Id"], "done")
    assert done["delivered"] == 3
    emails = service.creatio.emails_for(credentials["Id"])
    assert [e["Subject"] for e in emails] == [subject_of(d) for d in sorted(OLD_DATES) if d >= since]


async def test_synchronize_before_the_first_connect_shares_the_floor(
    service: RunningService, make_mail_user: Any
) -> None:
    """Creatio calls synchronize right after create: the load may seed the floor itself."""
    user: MailUser = make_mail_user()
    await mailbox_with_old_mail(service, user, OLD_DATES[:2])
    credentials = service.credentials(user)
    # The listener may or may not have connected yet when synchronize arrives: either is fine.
    assert (await service.create(credentials)).status_code == 200
    response = await synchronize(service, credentials, ticks(datetime(2022, 1, 1, tzinfo=UTC)))
    assert response.json()["Started"] is True
    await wait_history(service, credentials["Id"], "done")
    await service.wait_state(credentials["Id"], MailboxState.LISTENING)
    await service.dovecot.aappend(user, make_message("live after history"))
    emails = await service.creatio.wait_for_emails(credentials["Id"], 3, timeout=15)
    assert sorted(e["Subject"] for e in emails) == sorted(
        [subject_of(d) for d in OLD_DATES[:2]] + ["live after history"]
    )


async def test_second_synchronize_while_one_runs(
    dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery, make_mail_user: Any
) -> None:
    # Slower retries than the default test settings, so the failing load keeps going for a while.
    async with running_service(
        dovecot, creatio, nursery, delivery_retry_base_seconds=0.2, delivery_retry_cap_seconds=0.5
    ) as service:
        user: MailUser = make_mail_user()
        await mailbox_with_old_mail(service, user, OLD_DATES)
        credentials = await create_listening(service, user)
        mailbox_id = credentials["Id"]
        creatio.fail_mailbox(mailbox_id, 503)
        since = ticks(datetime(2022, 12, 1, tzinfo=UTC))
        assert (await synchronize(service, credentials, since)).json()["Started"] is True
        await creatio.wait_for_calls("ProcessFullEmail", 1)

        response = await synchronize(service, credentials, since)
        assert response.status_code == 200
        assert response.json() == {
            "Started": False,
            "Message": "a history load is already running for this mailbox",
        }
        running = await history_of(service, mailbox_id)
        assert running is not None and running["state"] == "running" and running["total"] == 5
        status = (await service.http.get("/api/listeners/status")).json()
        assert status["HistoryLoads"] == 1

        creatio.fail_mailbox(mailbox_id, None)
        done = await wait_history(service, mailbox_id, "done")
        assert done["delivered"] == 5
        emails = creatio.emails_for(mailbox_id)
        assert [e["Subject"] for e in emails] == [subject_of(d) for d in sorted(OLD_DATES)]


async def test_closing_the_mailbox_stops_its_load(
    dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery, make_mail_user: Any
) -> None:
    async with running_service(
        dovecot, creatio, nursery, delivery_retry_base_seconds=0.2, delivery_retry_cap_seconds=0.5
    ) as service:
        user: MailUser = make_mail_user()
        await mailbox_with_old_mail(service, user, OLD_DATES[:1])
        credentials = await create_listening(service, user)
        mailbox_id = credentials["Id"]
        creatio.fail_mailbox(mailbox_id, 500)
        assert (await synchronize(service, credentials, 0)).json()["Started"] is True
        await creatio.wait_for_calls("ProcessFullEmail", 1)
        # The load keeps the progress of the closed mailbox; the admin view lists open ones
        # only, so look at the registry behind it.
        assert (await service.http.post("/api/listeners/close", json=[mailbox_id])).status_code == 200
        response = await synchronize(service, credentials, 0)
        assert response.status_code == 404
        with trio.fail_after(10):
            while (await service.adapters.store.lease_owners([f"history/{mailbox_id}"]))[
                f"history/{mailbox_id}"
            ] is not None:
                await trio.sleep(0.02)
        assert creatio.emails_for(mailbox_id) == []


async def test_bad_requests(service: RunningService, make_mail_user: Any) -> None:
    user: MailUser = make_mail_user()
    credentials = service.credentials(user)

    bad_filters = await synchronize(service, credentials, "last tuesday")
    assert bad_filters.status_code == 400
    assert bad_filters.json()["Errors"][0]["Field"] == "Filters"

    missing = await service.http.post("/api/email/synchronize", json={"Credentials": credentials})
    assert missing.status_code == 400
    assert missing.json()["Errors"][0]["Field"] == "Filters"

    no_credentials = await service.http.post("/api/email/synchronize", json={"Filters": "0"})
    assert no_credentials.status_code == 400
    assert no_credentials.json()["Errors"][0]["Field"] == "Credentials"

    bad_credentials = await synchronize(service, {**credentials, "Id": "not-a-guid"}, "0")
    assert bad_credentials.status_code == 400
    assert bad_credentials.json()["Errors"][0]["Field"] == "Credentials.Id"

    not_an_object = await service.http.post("/api/email/synchronize", json=["x"])
    assert not_an_object.status_code == 400

    unknown = await synchronize(service, credentials, "638400000000000000")
    assert unknown.status_code == 404
    assert credentials["Id"] in unknown.json()["Message"]


# -- Filters (pure logic) ----------------------------------------------------------------------

JAN_2024 = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "filters",
    [
        ticks(JAN_2024),
        str(ticks(JAN_2024)),
        float(ticks(JAN_2024)),
        f"  {ticks(JAN_2024)}  ",
        f'"{ticks(JAN_2024)}"',
        {"StartDate": ticks(JAN_2024)},
        {"startdate": str(ticks(JAN_2024))},
        f'{{"StartDate": {ticks(JAN_2024)}}}',
        f'{{"SINCEDATE": "{ticks(JAN_2024)}"}}',
        '{"Date": "2024-01-01T00:00:00Z"}',
        '{"StartDate": "/Date(1704067200000)/", "Other": 1}',
        "/Date(1704067200000+0100)/",
        "2024-01-01",
        "2024-01-01T00:00:00",
        "2024-01-01T01:00:00+01:00",
        "2024-01-01T00:00:00.000Z",
    ],
)
def test_filters_forms(filters: Any) -> None:
    assert parse_filters(filters) == JAN_2024


@pytest.mark.parametrize(
    "filters",
    [None, "", "  ", True, "yesterday", "-5", -5, 1.5, "{", "{}", '{"EndDate": 1}', [1], '"x"', 10**20],
)
def test_filters_rejected(filters: Any) -> None:
    with pytest.raises(FiltersError):
        parse_filters(filters)


def test_ticks() -> None:
    assert ticks_to_datetime(0) == TICKS_EPOCH
    # 738888 days and 21h20m: checked against date.fromordinal, independent of the code.
    assert ticks_to_datetime(638_400_000_000_000_000) == datetime(2024, 1, 4, 21, 20, tzinfo=UTC)
    moment = datetime(2023, 5, 17, 13, 45, 12, 123456, tzinfo=UTC)
    assert ticks_to_datetime(ticks(moment) + 9) == moment  # below a microsecond: truncated


def test_imap_search_dates_ignore_the_locale() -> None:
    assert _imap_date(datetime(2024, 2, 1, 23, 0, tzinfo=UTC)) == "1-Feb-2024"
    random_day = datetime(2020, 1, 1, tzinfo=UTC) + timedelta(days=random.randrange(3000))
    assert _imap_date(random_day).split("-")[1] in {
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"
    }  # fmt: skip


def append_many(dovecot: Dovecot, user: MailUser, dated: list[tuple[str, datetime]]) -> None:
    with dovecot.imap(user) as conn:
        for subject, when in dated:
            typ, data = conn.append('"INBOX"', "", when, make_message(subject))
            assert typ == "OK", data


async def test_thousands_of_messages_since_a_date(service: RunningService, make_mail_user: Any) -> None:
    user: MailUser = make_mail_user()
    start = datetime(2022, 1, 1, tzinfo=UTC)
    # 2000 mails over ~3 months, appended in random date order (so UID order is not date order).
    moments = [start + timedelta(minutes=67 * i) for i in range(2000)]
    random.Random(7).shuffle(moments)
    dated = [(f"bulk {m.isoformat()}", m) for m in moments]
    await trio.to_thread.run_sync(append_many, service.dovecot, user, dated)
    credentials = await create_listening(service, user)
    since = start + timedelta(minutes=67 * 500)
    expected = [subject for subject, when in sorted(dated, key=lambda d: d[1]) if when >= since]
    assert len(expected) == 1500

    response = await synchronize(service, credentials, ticks(since))
    assert response.json()["Started"] is True
    done = await wait_history(service, credentials["Id"], "done", timeout=120)
    assert (done["total"], done["delivered"]) == (1500, 1500)
    emails = service.creatio.emails_for(credentials["Id"])
    assert [e["Subject"] for e in emails] == expected
