"""Shared fixtures: a private Dovecot per xdist worker, fresh mail users, a Creatio stand-in."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
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
from tests.servers.kdc import REALM, Kdc, krb5_conf

MakeMailUser = Callable[..., MailUser]


def _pin_kerberos_config() -> str:
    """Point Kerberos (pyspnego's Negotiate, with the gssapi package installed) at a private
    krb5.conf for the whole test run: the machine's /etc/krb5.conf may name real realms and
    KDCs (Debian's default does), which no test may try. Until the ``kdc`` fixture starts, the
    test realm has no KDC, so Negotiate's Kerberos attempt fails at once and NTLM is used."""
    handle, path = tempfile.mkstemp(prefix="emlisten-krb5-", suffix=".conf")
    with os.fdopen(handle, "w") as conf:
        conf.write(krb5_conf(REALM, None))
    atexit.register(os.unlink, path)
    os.environ["KRB5_CONFIG"] = path
    os.environ.pop("KRB5_KTNAME", None)
    os.environ.pop("KRB5CCNAME", None)
    return path


_KRB5_CONFIG = _pin_kerberos_config()

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


@pytest.fixture(scope="session")
def kdc() -> Iterator[Kdc]:
    """One private MIT KDC per test process (realm EMLISTEN.TEST, ``tests/servers/kdc.py``),
    with ``HTTP/127.0.0.1`` for the EWS simulator in its keytab; this process (and what it
    starts) uses the realm from then on."""
    server = Kdc()
    try:
        server.start()
    except Exception as error:
        pytest.fail(f"cannot start the KDC: {error}")
    try:
        server.add_service("HTTP", "127.0.0.1")
        server.use()
        yield server
    finally:
        os.environ["KRB5_CONFIG"] = _KRB5_CONFIG
        os.environ.pop("KRB5_KTNAME", None)
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
