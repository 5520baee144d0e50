"""Fixtures for mail operations: a Dovecot that also accepts OAuth logins, and its tokeninfo."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.servers.dovecot import Dovecot
from tests.servers.tokeninfo import TokenInfoServer


@pytest.fixture(scope="session")
def tokeninfo() -> Iterator[TokenInfoServer]:
    """One token-introspection server per test process."""
    with TokenInfoServer() as server:
        yield server


@pytest.fixture(scope="session")
def oauth_dovecot(tokeninfo: TokenInfoServer) -> Iterator[Dovecot]:
    """A Dovecot of this test process with password users and OAuth logins (oauth2 passdb)."""
    if shutil.which("dovecot") is None:
        pytest.fail("dovecot is not installed: run scripts/install-test-deps")
    server = Dovecot(oauth2_tokeninfo_url=tokeninfo.url)
    server.start()
    try:
        yield server
    finally:
        server.close()
