"""A real headless Chromium (Debian's chromium + chromium-driver, driven by selenium) for the web
console's tests, one per test process; screenshots go to ``$EMLISTEN_TEST_ARTIFACTS``
(default ``test-artifacts/`` at the repository root)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.wait import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REPO_ROOT = Path(__file__).resolve().parents[2]

T = TypeVar("T")


def artifacts_dir() -> Path:
    directory = Path(os.environ.get("EMLISTEN_TEST_ARTIFACTS") or REPO_ROOT / "test-artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="session")
def chromium() -> Iterator[WebDriver]:
    """One headless Chromium for the whole test process (starting one takes ~1 s)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            pytest.fail(f"{path} is missing: run scripts/install-test-deps (chromium, chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        "--window-size=1400,1000",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    # An explicit driver path: selenium must not try to download one.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class Browser:
    """The shared Chromium, driven from Trio tests: every WebDriver call runs in a worker thread,
    so the service under test (in the same Trio loop) keeps answering meanwhile."""

    def __init__(self, driver: WebDriver) -> None:
        self.driver = driver

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(function, *args)

    async def open(self, url: str) -> None:
        await self.console_errors()  # forget what an earlier page logged
        await self.run(self.driver.get, url)
        # Marks this page load: still there later means nothing reloaded the page.
        await self.run(self.driver.execute_script, "window.__consoleTestLoad = 1;")

    async def not_reloaded(self) -> bool:
        return bool(await self.run(self.driver.execute_script, "return window.__consoleTestLoad === 1;"))

    async def wait_until(self, condition: Callable[[WebDriver], T], timeout: float = 20) -> T:
        """Poll ``condition(driver)`` (in a thread) until it returns something truthy."""

        def wait() -> T:
            waiter = WebDriverWait(
                self.driver,
                timeout,
                poll_frequency=0.1,
                ignored_exceptions=(StaleElementReferenceException,),
            )
            return waiter.until(condition)

        return await self.run(wait)

    async def text(self, css: str) -> str:
        return await self.run(lambda: self.driver.find_element(By.CSS_SELECTOR, css).text)

    async def click(self, css: str) -> None:
        await self.run(lambda: self.driver.find_element(By.CSS_SELECTOR, css).click())

    async def type(self, css: str, text: str) -> None:
        def type_text() -> None:
            element = self.driver.find_element(By.CSS_SELECTOR, css)
            element.clear()
            element.send_keys(text)

        await self.run(type_text)

    async def screenshot(self, name: str) -> Path:
        path = artifacts_dir() / name
        await self.run(self.driver.save_screenshot, str(path))
        return path

    async def console_errors(self) -> list[str]:
        """Severe messages from the page's JavaScript console since the last call."""
        try:
            entries = await self.run(self.driver.get_log, "browser")
        except WebDriverException:
            return []
        return [entry["message"] for entry in entries if entry.get("level") == "SEVERE"]


@pytest.fixture
def browser(chromium: WebDriver) -> Iterator[Browser]:
    yield Browser(chromium)
    # The next test starts on a blank page (each test's service has its own port, so its own
    # origin: no token or other storage carries over).
    chromium.get("about:blank")
