"""The web console in a real browser, against a real node (Dovecot, the Creatio stand-in)."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest
import trio
from selenium.webdriver.remote.webdriver import WebDriver

from tests.secret_scan import register_secret
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot, make_message
from tests.servers.webhook import WebhookReceiver
from tests.service.conftest import RunningService, running_service
from tests.ui.conftest import Browser

API_TOKEN = register_secret("console-test-api-token")
WEBHOOK_SECRET = register_secret("whsec_" + base64.b64encode(b"console-test-webhook-key-0123456").decode())


def js(script: str) -> Callable[[WebDriver], object]:
    return lambda driver: driver.execute_script(script)


def row_state(mailbox_id: str) -> Callable[[WebDriver], object]:
    return js(
        f"const row = document.querySelector('#mailbox-rows tr[data-id=\"{mailbox_id}\"]');"
        "return row && row.querySelector('.state').textContent;"
    )


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> WebhookReceiver:
    server = WebhookReceiver()
    await server.start(nursery)
    return server


async def open_console(browser: Browser, service: RunningService, *, wrong_token_first: bool = False) -> None:
    """Open the page and give it the API token it asks for."""
    await browser.open(f"{service.url}/ui/")
    await browser.wait_until(js("return !document.getElementById('token-form').hidden;"))
    if wrong_token_first:
        await browser.type("#token", "not-the-api-token")
        await browser.click("#token-form button[type=submit]")
        await browser.wait_until(
            js("return document.getElementById('token-error').textContent === 'That token was refused.';")
        )
    await browser.type("#token", API_TOKEN)
    await browser.click("#token-form button[type=submit]")
    await browser.wait_until(js("return document.getElementById('live').textContent.startsWith('live');"))
    assert not await browser.run(lambda: browser.driver.find_element("id", "token-form").is_displayed())
    refused = await browser.console_errors()  # the calls made before the token was given
    assert refused and all("status of 401" in message for message in refused), refused


async def register_v1(service: RunningService, username: str, password: str, webhook_url: str) -> str:
    body = {
        "protocol": "imap",
        "host": service.dovecot.host,
        "port": service.dovecot.imaps_port,
        "tls": True,
        "username": username,
        "password": password,
        "folders": ["INBOX"],
        "webhook": {"url": webhook_url, "secret": WEBHOOK_SECRET},
    }
    response = await service.http.post("/v1/mailboxes", json=body)
    assert response.status_code == 201, response.text
    mailbox_id: str = response.json()["id"]
    return mailbox_id


async def test_mailbox_appears_changes_state_and_delivers_without_reload(
    dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery, browser: Browser
) -> None:
    user = dovecot.add_user()
    async with running_service(dovecot, creatio, nursery, api_token=API_TOKEN) as service:
        service.http.headers["Authorization"] = f"Bearer {API_TOKEN}"
        # A token is set: the page asks for it, then shows live data.
        await open_console(browser, service, wrong_token_first=True)
        assert "test-node" in await browser.text("#node-rows")

        # Registered through the API with a wrong password: the row appears, failing.
        credentials = service.credentials(user, Password="wrong-password")
        mailbox_id = credentials["Id"]
        (await service.create(credentials)).raise_for_status()
        assert await browser.wait_until(row_state(mailbox_id)) in {
            "starting",
            "connecting",
            "authenticationError",
        }
        await browser.wait_until(lambda d: row_state(mailbox_id)(d) == "authenticationError")
        # The error shows in the row, and the password nowhere on the page.
        row_text = await browser.text(f'#mailbox-rows tr[data-id="{mailbox_id}"]')
        assert user.email in row_text
        assert "wrong-password" not in await browser.run(lambda: browser.driver.page_source)

        # The right password: the same row turns "listening", with no reload.
        fixed = service.credentials(user, Id=mailbox_id)
        (await service.http.post("/api/listeners/update", json=[fixed])).raise_for_status()
        await browser.wait_until(lambda d: row_state(mailbox_id)(d) == "listening")

        # A mail arrives: the delivered count, the chart's totals and the detail's events follow.
        await dovecot.aappend(user, make_message(subject="Console test"))
        delivered = js(
            f"return document.querySelector('#mailbox-rows tr[data-id=\"{mailbox_id}\"] td.num').textContent;"
        )
        await browser.wait_until(lambda d: delivered(d) == "1")
        await browser.wait_until(
            js("return document.getElementById('chart-totals').textContent.includes('1 delivered');")
        )
        assert await browser.run(
            browser.driver.execute_script, "return document.querySelectorAll('#chart canvas').length;"
        )
        await browser.click(f'#mailbox-rows tr[data-id="{mailbox_id}"]')
        await browser.wait_until(
            js("return document.querySelector('#detail-events li[data-kind=delivered]') !== null;")
        )
        events = await browser.text("#detail-events")
        assert "delivered 1 email(s) from INBOX" in events
        assert "state listening" in events and "state authenticationError" in events

        assert await browser.not_reloaded()
        await browser.screenshot("console-mailbox-detail.png")
        assert await browser.console_errors() == []


async def test_dead_letter_is_replayed_from_the_page(
    dovecot: Dovecot,
    creatio: CreatioStandIn,
    nursery: trio.Nursery,
    receiver: WebhookReceiver,
    browser: Browser,
) -> None:
    user, locked_out = dovecot.add_user(), dovecot.add_user()
    async with running_service(
        dovecot, creatio, nursery, api_token=API_TOKEN, webhook_retry_schedule="0.05"
    ) as service:
        service.http.headers["Authorization"] = f"Bearer {API_TOKEN}"
        await open_console(browser, service)
        # The receiver refuses for good (410 is final): the first mail becomes a dead letter.
        receiver.behave("/hooks/console", status=410)
        mailbox_id = await register_v1(service, user.name, user.password, receiver.url("/hooks/console"))
        failing_id = await register_v1(
            service, locked_out.name, "wrong-password", receiver.url("/hooks/other")
        )
        await browser.wait_until(lambda d: row_state(mailbox_id)(d) == "listening")
        await browser.wait_until(lambda d: row_state(failing_id)(d) == "authenticationError")

        await dovecot.aappend(user, make_message(subject="Refused at first"))
        dead_row = "#dead-letter-rows tr[data-id]"
        dead_id = await browser.wait_until(js(f"return document.querySelector('{dead_row}')?.dataset.id;"))
        assert isinstance(dead_id, str)
        row_text = await browser.text(f'#dead-letter-rows tr[data-id="{dead_id}"]')
        assert mailbox_id in row_text and "message.new" in row_text and "HTTP 410" in row_text
        await browser.wait_until(
            js("return document.getElementById('chart-totals').textContent.includes('1 delivered');")
        )
        await browser.screenshot("console-dead-letter.png")

        # The receiver is fixed; the operator presses Replay: the same event arrives, accepted.
        receiver.behave("/hooks/console", status=204)
        await browser.click(f'#dead-letter-rows tr[data-id="{dead_id}"] button.replay')
        (replayed,) = await receiver.wait_accepted("/hooks/console", 1)
        assert replayed.headers["webhook-id"] == dead_id
        assert replayed.event["data"]["subject"] == "Refused at first"
        await browser.wait_until(js(f"return !document.querySelector('{dead_row}');"))
        assert "queued again" in await browser.text("#dead-letter-message")
        assert (await service.http.get("/v1/dead-letters")).json()["items"] == []

        # The mailbox's recent events tell the story.
        await browser.click(f'#mailbox-rows tr[data-id="{mailbox_id}"]')
        await browser.wait_until(
            js("return document.querySelectorAll('#detail-events li[data-kind=webhook]').length >= 2;")
        )
        events = await browser.text("#detail-events")
        assert f"webhook message.new {dead_id} accepted by the receiver" in events
        assert f"webhook message.new {dead_id} dead-lettered after 1 attempt(s): HTTP 410" in events

        await browser.click("#detail-close")

        # Filtered on the server: by text, then by state too.
        rows = "#mailbox-rows tr[data-id]"
        await browser.type("#filter-q", locked_out.name)
        await browser.wait_until(js(f"return document.querySelectorAll('{rows}').length === 1;"))
        assert (
            await browser.run(
                browser.driver.execute_script, f"return document.querySelector('{rows}').dataset.id;"
            )
            == failing_id
        )
        await browser.click('#state-chips button[data-state="listening"]')
        await browser.wait_until(js(f"return document.querySelectorAll('{rows}').length === 0;"))
        assert "No mailbox matches." in await browser.text("#mailbox-rows")

        assert await browser.not_reloaded()
        await browser.screenshot("console-dead-letter-replayed.png")
        assert await browser.console_errors() == []
