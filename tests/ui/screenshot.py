"""A screenshot of the console with 10,000 mailboxes and an hour of deliveries, for docs/console.md.

    .venv/bin/python -m tests.ui.screenshot docs/images/console-10000.png

The real app and routes over the embedded store, in headless Chromium; the mailboxes, their
states, the hour of deliveries and the dead letters are made up here (nothing listens to a mail
server), so the picture shows the console's layout at that size, not a measurement.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import trio
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.wait import WebDriverWait

from emlisten import __version__
from emlisten.api.app import create_app
from emlisten.api.server import serve_api
from emlisten.api.v1 import v1_blueprint
from emlisten.metrics import Activity
from emlisten.models import NodeInfo, WebhookEvent
from emlisten.service.listeners import StoreListenerControl
from emlisten.store.memory import MemoryStore
from emlisten.ui.routes import console_blueprint
from tests.ui.conftest import CHROMEDRIVER, CHROMIUM
from tests.ui.test_listing import MAILBOXES, mailbox, register


def fill_activity(activity: Activity, now: float) -> None:
    rng = random.Random(14)
    for minute in range(60):
        at = now - (59 - minute) * 60
        for _ in range(rng.randint(40, 160)):
            activity.series.delivered(1, rng.lognormvariate(-1.6, 0.5), at)
        for _ in range(rng.randint(0, 3)):
            activity.series.failed(at)


async def dead_letters(store: MemoryStore, now: float) -> None:
    for i, (error, attempts) in enumerate([("HTTP 410", 1), ("HTTP 503", 11), ("no answer within 30s", 11)]):
        event = WebhookEvent(
            f"msg_{i:032x}",
            "hooks.example.test",
            "https://hooks.example.test/mail",
            mailbox(20 + i).id,
            "message.new",
            '{"type": "message.new"}',
            now - 3600,
        )
        await store.outbox_add([event])
        event.attempts, event.last_error, event.dead_at = attempts, error, now - 600 + i
        await store.outbox_dead_letter(event)


async def main(target: Path) -> None:
    store = MemoryStore()
    await register(store, MAILBOXES)
    now = time.time()
    rng = random.Random(15)
    statuses = await store.get_statuses([mailbox(i).id for i in range(MAILBOXES)])
    for status in statuses.values():
        assert status is not None
        status.updated_at = now - rng.uniform(60, 6 * 3600)
    await store.set_statuses({k: v for k, v in statuses.items() if v is not None})
    for node, role, owned in (
        ("node-a", "all", 5000),
        ("node-b", "primary", 5000),
        ("node-c", "secondary", 0),
    ):
        await store.heartbeat(NodeInfo(node, role, owned, now - 1, now - 7 * 3600, __version__), 60)
    await dead_letters(store, now)
    activity = Activity()
    fill_activity(activity, now)
    activity.delivered(mailbox(11).id, "INBOX", 1, 0.21)
    await store.add_delivered(mailbox(11).id, 1)
    control = StoreListenerControl(store, node_id="node-a", role="all")
    app = create_app(
        control,
        blueprints=[
            console_blueprint(control, store, activity, node_id="node-a"),
            v1_blueprint(control, store),
        ],
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_api, app, "127.0.0.1", 0)
        await trio.to_thread.run_sync(shoot, f"http://127.0.0.1:{port}/ui/", target)
        nursery.cancel_scope.cancel()


def shoot(url: str, target: Path) -> None:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1300"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 30, poll_frequency=0.1)
        wait.until(
            lambda d: d.execute_script("return document.querySelectorAll('#mailbox-rows tr').length > 10")
        )
        wait.until(lambda d: d.execute_script("return document.querySelector('#chart canvas') !== null"))
        wait.until(
            lambda d: d.execute_script(
                "return document.querySelectorAll('#dead-letter-rows tr[data-id]').length"
            )
        )
        # A filter, as an operator narrowing 10,000 down would type it (the whole page then fits).
        driver.find_element("id", "filter-q").send_keys("user0001")
        wait.until(
            lambda d: d.execute_script("return document.querySelectorAll('#mailbox-rows tr').length") == 10
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(target))
    finally:
        driver.quit()


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1] if len(sys.argv) > 1 else "test-artifacts/console-10000.png"))
