"""Shared fixtures: a private Dovecot per xdist worker, fresh mail users, a Creatio stand-in."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import trio

from tests.secret_scan import (  # the scan's hooks run from here
    pytest_configure,  # noqa: F401
    pytest_sessionfinish,  # noqa: F401
    register_secret,
)
from tests.servers.creatio import CreatioStandIn
from tests.servers.dovecot import Dovecot, MailUser

MakeMailUser = Callable[..., MailUser]

# Strings the tests use as wrong or extra secrets: they must not show up in any log either.
for _secret in (
    "definitely-wrong",
    "nope-not-it",
    "bad-password",
    "wrong-password",
    "hunter2-password",
    "wrong-password-123",
    "smtp-only-password",
    "cluster-test-key",
    "contract-test-secret-key",
):
    register_secret(_secret)


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """One Dovecot per test process (each xdist worker gets its own), started once."""
    if shutil.which("dovecot") is None:
        pytest.fail("dovecot is not installed: run scripts/install-test-deps")
    server = Dovecot()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def make_mail_user(dovecot: Dovecot) -> MakeMailUser:
    """``make_mail_user(name=None, password=<unique>)``: a new user on the shared Dovecot."""
    return dovecot.add_user


@pytest.fixture
def mail_user(dovecot: Dovecot) -> MailUser:
    """A fresh mail user for this test only."""
    return dovecot.add_user()


@pytest.fixture
async def creatio() -> AsyncIterator[CreatioStandIn]:
    """A Creatio stand-in serving on a free loopback port for the duration of the test."""
    standin = CreatioStandIn()
    async with trio.open_nursery() as nursery:
        await nursery.start(standin.serve)
        yield standin
        nursery.cancel_scope.cancel()


@pytest.fixture
def private_dovecot() -> Iterator[Dovecot]:
    """A Dovecot of this test's own, for tests that stop, restart or reconfigure the server."""
    server = Dovecot()
    server.start()
    try:
        yield server
    finally:
        server.close()
