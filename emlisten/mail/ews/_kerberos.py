"""Kerberos inside Negotiate: tickets from the mailbox's user name and password.

With pyspnego's ``kerberos`` extra installed (the ``gssapi`` and ``krb5`` packages, on MIT
Kerberos), Negotiate offers Kerberos first and NTLM second inside SPNEGO. Kerberos needs a
ticket-granting ticket (TGT) for the user; emlisten gets it from Creatio's ``UserName`` and
``Password`` itself (the AS exchange a ``kinit`` does, with the KDC that ``krb5.conf`` or DNS
SRV records name), never from a ticket cache of the host, and keeps it in a ``MEMORY`` cache
of this process, one per credential group (:class:`TicketCache`). gssapi adds the service
ticket for ``HTTP/<EWS host>`` to the same cache, so each later connection of the group is
authenticated without asking the KDC again (until the TGT nears its end: then a new one).

libkrb5 talks to the KDC synchronously (and waits up to its ``kdc_timeout`` per KDC when one
does not answer), so everything here blocks: callers run it in a worker thread. A failure
(wrong password, unknown principal, no KDC reachable, no realm configured) is remembered for
``RETRY_SECONDS``: the group's handshakes then go without Kerberos (NTLM inside SPNEGO, which
a server with NTLM disabled refuses), rather than each waiting for the KDC again or costing
the account another failed pre-authentication (AD counts those toward lockouts). A failure that
is the realm's, not the user's (no KDC answers, no realm configured), is remembered for the
realm, for every group of the process: with a ``krb5.conf`` naming KDCs that cannot be reached
(Debian's default one names MIT's), a cold start of 1,000 users with their own credentials
would otherwise wait for the KDC 1,000 times (0.75 s each on the test machine) before NTLM.

Secrets: the password is only passed to libkrb5; the cache lives in this process's memory and
is destroyed with its pool.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import spnego
import trio

log = logging.getLogger(__name__)

try:
    import gssapi  # noqa: F401  (pyspnego's Kerberos: Negotiate offers Kerberos when it imports)
    import krb5

    AVAILABLE = True
except ImportError:  # the kerberos extra is not installed: Negotiate carries NTLM only
    krb5 = None  # type: ignore[assignment]
    AVAILABLE = False

#: How long a failed attempt to get a TGT keeps a credential group from trying again.
RETRY_SECONDS = 60.0
#: A TGT with less than this left is replaced before a handshake uses it.
RENEW_BEFORE_SECONDS = 300.0

#: libkrb5 error codes (MIT's, ``ERROR_TABLE_BASE_krb5`` + the RFC 4120 error number) that are
#: about the user: a wrong password, an unknown, locked, expired or not yet valid account.
_USER_ERRORS = frozenset(
    -1765328384 + number
    for number in (
        1,  # KDC_ERR_NAME_EXP: the account expired
        6,  # KDC_ERR_C_PRINCIPAL_UNKNOWN
        12,  # KDC_ERR_POLICY
        14,  # KDC_ERR_ETYPE_NOSUPP: the account has no key of an encryption type we take
        18,  # KDC_ERR_CLIENT_REVOKED: locked out or disabled
        21,  # KDC_ERR_CLIENT_NOTYET
        23,  # KDC_ERR_KEY_EXPIRED: the password expired
        24,  # KDC_ERR_PREAUTH_FAILED: a wrong password
        31,  # KRB_AP_ERR_BAD_INTEGRITY: a wrong password (no pre-authentication asked)
    )
)
#: Worker threads for Kerberos at once, per process (Trio run). Not Trio's default thread
#: limiter (40 threads), which also resolves host names (``getaddrinfo``) for every connection:
#: a thread waiting for a silent KDC holds its token for up to libkrb5's ~25 s, even when the
#: handshake was cancelled (an abandoned thread gives it back only when it ends), so a cold
#: start of per-user mailboxes would stop the process's DNS look-ups that long. Threads of one
#: group also wait in here for its first TGT and service ticket.
MAX_THREADS = 16
_threads: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("kerberos_threads")


def thread_limiter() -> trio.CapacityLimiter:
    """The limiter of Kerberos worker threads (``trio.to_thread.run_sync(limiter=...)``)."""
    try:
        return _threads.get()
    except LookupError:
        limiter = trio.CapacityLimiter(MAX_THREADS)
        _threads.set(limiter)
        return limiter


#: Realms ("" for the default one) whose last attempt failed for the realm, and when.
_realm_failures: dict[str, float] = {}
_realm_lock = threading.Lock()


def _realm_of(principal: str) -> str:
    return principal.rpartition("@")[2] if "@" in principal else ""


def _realm_failed_recently(realm: str) -> bool:
    with _realm_lock:
        failed = _realm_failures.get(realm)
        return failed is not None and time.monotonic() - failed < RETRY_SECONDS


def kerberos_principal(user: str) -> str:
    """The principal for Creatio's ``UserName``: ``DOMAIN\\user`` and ``user`` are ``user`` in
    the default realm (``default_realm`` of krb5.conf), ``user@domain`` (a UPN, as Creatio
    users usually type it) is ``user@DOMAIN``: Active Directory's realm is its DNS domain in
    capitals, and MIT Kerberos compares realms case-sensitively."""
    if "@" in user:
        name, _, domain = user.rpartition("@")
        return f"{name}@{domain.upper()}"
    return user.rpartition("\\")[2]


class _NotAPrincipal(Exception):
    pass


def forget_realm_failures() -> None:
    """Let every realm be tried again at once (a KDC that was just set up; tests)."""
    with _realm_lock:
        _realm_failures.clear()


class TicketCache:
    """The TGT of one credential group, got when a handshake first needs it (blocking)."""

    def __init__(self, user: str, password: str) -> None:
        self._principal = kerberos_principal(user)
        self._password = password
        self._lock = threading.Lock()
        self._context: Any = None
        self._ccache: Any = None
        #: The cache replaced last: a handshake started before the renewal may still read it.
        self._retired: tuple[Any, Any] | None = None
        self._name = ""
        self._ends = 0.0
        self._failed_at: float | None = None
        #: ``_closed`` and ``_busy`` (a thread in ``credential``), under ``_state``: ``close``
        #: runs in the event loop and must not wait for ``_lock`` (held while the KDC answers).
        self._state = threading.Lock()
        self._closed = False
        self._busy = False
        #: Set with a new TGT until a handshake has used it: that first handshake gets the
        #: service ticket into the cache while the group's others wait (``first_use``), so
        #: concurrent first connections do not each ask the KDC for it.
        self._fresh = False
        self._first = threading.Lock()
        #: TGTs got from the password (for tests and status).
        self.tgts = 0

    def __repr__(self) -> str:
        return f"TicketCache(principal={self._principal!r})"

    def credential(self) -> spnego.KerberosCCache | None:
        """The cache with a TGT valid for a while yet, or None (no Kerberos: not installed, or
        the last attempt failed less than ``RETRY_SECONDS`` ago, or closed). Blocking."""
        if not AVAILABLE:
            return None
        with self._lock:
            with self._state:
                if self._closed:
                    return None
                self._busy = True
            found = None
            try:
                found = self._current()
            finally:
                with self._state:
                    self._busy = False
                    closed = self._closed
                if closed:  # closed meanwhile: close() left the caches to this thread
                    self._retire()
                    self._retire()
                    found = None
            return found

    def known_unavailable(self) -> bool:
        """Without blocking: ``credential()`` would answer None without asking the KDC (the
        group's or its realm's last attempt failed less than ``RETRY_SECONDS`` ago, or closed).
        Handshakes then need no worker thread: after the realm's first failure, a cold start of
        1,000 users with their own credentials would otherwise hop to a thread and back 1,000
        times for NTLM alone."""
        if not AVAILABLE or self._closed:
            return True
        if self._ccache is not None:
            return False
        failed = self._failed_at
        if failed is not None and time.monotonic() - failed < RETRY_SECONDS:
            return True
        return _realm_failed_recently(_realm_of(self._principal))

    def _current(self) -> spnego.KerberosCCache | None:
        if self._ccache is not None and self._ends - time.time() > RENEW_BEFORE_SECONDS:
            return spnego.KerberosCCache(ccache=self._name)
        if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_SECONDS:
            return None
        realm = _realm_of(self._principal)
        if _realm_failed_recently(realm):
            return None
        try:
            self._get_tgt()
        except _NotAPrincipal as error:
            # The user's own mistake (an empty or malformed name): no reason to spare the realm.
            self._failed_at = time.monotonic()
            log.info("Kerberos: %r is no principal (%s); Negotiate goes without", self._principal, error)
            return None
        except krb5.Krb5Error as error:
            self._failed_at = time.monotonic()
            if error.err_code not in _USER_ERRORS:
                with _realm_lock:
                    _realm_failures[realm] = self._failed_at
            # The message names the principal and the realm, never the password.
            log.info("Kerberos: no ticket for %s (%s); Negotiate goes without", self._principal, error)
            return None
        self._failed_at = None
        with _realm_lock:
            _realm_failures.pop(realm, None)
        return spnego.KerberosCCache(ccache=self._name)

    def _get_tgt(self) -> None:
        context = krb5.init_context()
        if not self._principal.partition("@")[0]:
            raise _NotAPrincipal("no user name")
        try:
            principal = krb5.parse_name_flags(context, self._principal.encode())
        except krb5.Krb5Error as error:
            raise _NotAPrincipal(str(error)) from None
        options = krb5.get_init_creds_opt_alloc(context)
        # The KDC may answer with the principal's canonical name and realm (AD does, for UPNs).
        krb5.get_init_creds_opt_set_canonicalize(options, True)
        creds = krb5.get_init_creds_password(context, principal, options, password=self._password.encode())
        ccache = krb5.cc_new_unique(context, b"MEMORY")
        krb5.cc_initialize(context, ccache, creds.client)
        krb5.cc_store_cred(context, ccache, creds)
        self._retire()
        self._context, self._ccache = context, ccache
        self._name = f"MEMORY:{(ccache.name or b'').decode()}"
        self._ends = float(creds.times.endtime)
        self._fresh = True
        self.tgts += 1

    @contextmanager
    def first_use(self) -> Iterator[None]:
        """Around a handshake's first step with ``credential()``'s cache (blocking): while the
        TGT is new, one at a time, until one has completed its step."""
        if not self._fresh:
            yield
            return
        with self._first:
            yield
            self._fresh = False

    def _retire(self) -> None:
        if self._retired is not None:
            _destroy(*self._retired)
        self._retired = (self._context, self._ccache) if self._ccache is not None else None
        self._context = self._ccache = None

    def close(self) -> None:
        """Forget the tickets (the pool closes). Never waits for the KDC: while a worker thread
        is in ``credential``, that thread forgets them when done."""
        with self._state:
            self._closed = True
            if self._busy:
                return
        if krb5 is not None:
            # No thread is in ``credential`` and none will use the caches: it sees ``_closed``.
            self._retire()
            self._retire()


def _destroy(context: Any, ccache: Any) -> None:
    try:
        krb5.cc_destroy(context, ccache)
    except krb5.Krb5Error:  # pragma: no cover - a memory cache always goes
        log.debug("Kerberos: could not destroy a ticket cache")


__all__ = [
    "AVAILABLE",
    "MAX_THREADS",
    "RETRY_SECONDS",
    "TicketCache",
    "forget_realm_failures",
    "kerberos_principal",
    "thread_limiter",
]
