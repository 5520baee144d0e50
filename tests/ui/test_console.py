"""The web console in a real browser, against a real node (Dovecot, the Creatio stand-in)."""

from __future__ import annotations

from collections.abc import Callable

import trio
from selenium.webdriver.remote.webdriver import WebDriver

from tests.secret_scan import register_secret
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot, make_message
from tests.service.conftest import running_service
from tests.ui.conftest import Browser

API_TOKEN = "console-test-api-token"
register_secret(API_TOKEN)


def js(script: str) -> Callable[[WebDriver], object]:
    return lambda driver: driver.execute_script(script)


def row_state(mailbox_id: str) -> Callable[[WebDriver], object]:
    return js(
        f"const row = document.querySelector('#mailbox-rows tr[data-id=\"{mailbox_id}\"]');"
        "return row && row.querySelector('.state').textContent;"
    )


async def test_mailbox_appears_changes_state_and_delivers_without_reload(
    dovecot: Dovecot, creatio: CreatioStandIn, nursery: trio.Nursery, browser: Browser
) -> None:
    user = dovecot.add_user()
    async with running_service(dovecot, creatio, nursery, api_token=API_TOKEN) as service:
        service.http.headers["Authorization"] = f"Bearer {API_TOKEN}"
        await browser.open(f"{service.url}/ui/")

        # A token is set: the page asks for it, then shows live data.
        await browser.wait_until(js("return !document.getElementById('token-form').hidden;"))
        await browser.type("#token", API_TOKEN)
        await browser.click("#token-form button[type=submit]")
        await browser.wait_until(js("return document.getElementById('live').textContent.startsWith('live');"))
        assert "test-node" in await browser.text("#node-rows")
        assert not await browser.run(lambda: browser.driver.find_element("id", "token-form").is_displayed())
        refused = await browser.console_errors()  # the calls made before the token was given
        refused = [message for message in refused if "/v1/dead-letters" not in message]  # until /v1 lands
        assert refused and all("status of 401" in message for message in refused), refused

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
