"""/metrics parses with prometheus-client's own parser, and its numbers move with real mail."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from emlisten.models import MailboxState
from tests.servers.dovecot import MailUser
from tests.service.conftest import RunningService


async def scrape(service: RunningService) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await service.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_move_when_mail_is_delivered(service: RunningService, make_mail_user: object) -> None:
    good: MailUser = make_mail_user()  # type: ignore[operator]
    bad: MailUser = make_mail_user()  # type: ignore[operator]
    c_good, c_bad = service.credentials(good), service.credentials(bad, Password="nope-not-it")
    assert (await service.create(c_good, c_bad)).status_code == 200
    await service.wait_state(c_good["Id"], MailboxState.LISTENING)
    await service.wait_state(c_bad["Id"], MailboxState.AUTHENTICATION_ERROR)

    before = await scrape(service)
    listening = ("emlisten_active_subscriptions", (("node", "test-node"), ("state", "listening")))
    auth_error = ("emlisten_active_subscriptions", (("node", "test-node"), ("state", "authenticationError")))
    assert before[listening] == 1
    assert before[auth_error] == 1
    assert before[("emlisten_leases", (("node", "test-node"),))] == 2
    assert before[("emlisten_auth_failures_total", ())] >= 1
    delivered_key = ("emlisten_delivered_emails_total", ())
    assert before.get(delivered_key, 0) == 0

    for n in range(3):
        await service.dovecot.aappend(good, f"Subject: m{n}\r\n\r\nbody\r\n".encode())
    await service.creatio.wait_for_emails(c_good["Id"], 3, timeout=15)

    after = await scrape(service)
    assert after[delivered_key] == 3
    assert after[("emlisten_deliveries_total", (("outcome", "success"),))] >= 1
    assert after[("emlisten_delivery_latency_seconds_count", ())] == 3
    assert after[("emlisten_delivery_latency_seconds_sum", ())] > 0
    assert after[("emlisten_imap_commands_total", (("command", "AUTHENTICATE"), ("outcome", "no")))] >= 1
    assert after[("emlisten_imap_commands_total", (("command", "UID FETCH"), ("outcome", "ok")))] >= 1
    # Where a delivery's time went: the receiver's answer (each call lies within the time from
    # notification to 2xx of the mail it carried) and the mail server's.
    calls = after[("emlisten_delivery_call_seconds_count", ())]
    assert 1 <= calls <= 3
    assert (
        0
        < after[("emlisten_delivery_call_seconds_sum", ())]
        <= after[("emlisten_delivery_latency_seconds_sum", ())]
    )
    fetch = (("command", "UID FETCH"),)
    assert after[("emlisten_imap_command_seconds_count", fetch)] >= 1
    assert after[("emlisten_imap_command_seconds_sum", fetch)] > 0
    assert after[("emlisten_imap_command_seconds_count", (("command", "AUTHENTICATE"),))] >= 2  # good and bad
    text = (await service.http.get("/metrics")).text
    assert "nope-not-it" not in text and good.password not in text
