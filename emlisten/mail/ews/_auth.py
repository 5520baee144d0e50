"""EWS authentication: Basic, bearer tokens, and NTLM / Negotiate on kept, authenticated connections.

NTLM (and Negotiate, which falls back to NTLM where Kerberos is not available) authenticates a
TCP connection, not a request: a three-leg handshake (``Authorization: NTLM <negotiate>`` -> 401
with the server's challenge -> ``Authorization: NTLM <authenticate>``) makes the connection
belong to the user, and the server then serves every later request on it without credentials.
So the handshake must stay on one connection, and the connection is worth keeping.

:class:`AuthenticatedPool` is an httpx transport that does exactly that. It owns up to
``max_connections`` single-connection sub-transports (plus one per open streaming response,
see ``stream`` below), each remembering whether its connection is authenticated. A request
leases an idle connection (waiting for one when all are busy), is sent on it - after the
handshake if the connection is new - and returns the connection when its response is closed.
When the server has closed the connection meanwhile, the next request there is answered 401
and the handshake runs again on the new connection (once; a second refusal is the answer).

The scheme comes from the ``WWW-Authenticate`` challenge of the server (``AuthMode.AUTO``:
Negotiate, else NTLM, else Basic, remembered per origin), or is fixed by ``EMLISTEN_EWS_AUTH``.
Basic and bearer tokens are sent with every request (bearer always, whatever the mode). The
handshake itself is pyspnego's (``spnego.client``). Negotiate offers Kerberos first when the
``kerberos`` extra is installed, with the credential group's tickets (``_kerberos``: got from
the user name and password in a worker thread, since libkrb5 talks to the KDC synchronously),
and NTLM inside SPNEGO otherwise. For NTLM and Basic, Creatio's ``UserName`` is used as given:
``DOMAIN\\user``, ``user@domain`` or ``user``.

Cost per new connection, once the server's scheme is known (a cold start of many mailboxes, each
with its own credentials, is one handshake per mailbox): a new connection is never authenticated,
so its first request starts the handshake at once rather than going without credentials for a
401 first (two round trips, not three). Its token is bound to the certificate the origin showed
last; when the connection shows another one, the handshake starts over with the right binding
before any credential-bearing leg is sent. The NT hash is computed once per credential group
(pyspnego would compute it, and the LM hash with a pure-Python DES, for every handshake; the LM
hash is only used by NTLMv1, which pyspnego sends only with ``LM_COMPAT_LEVEL`` below 3).

Secrets: the pool keeps the password to answer challenges; it has no repr showing it, and
tokens never leave this module other than in ``Authorization`` headers.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import spnego
import spnego.exceptions
import trio
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from spnego.channel_bindings import GssChannelBindings

from emlisten import _egress
from emlisten.mail.ews import _kerberos

log = logging.getLogger(__name__)

#: Marks a request whose response stays open for long (GetStreamingEvents): it gets a connection
#: of its own beyond ``max_connections``, so streams never starve ordinary requests.
STREAM_EXTENSION = "emlisten.stream"


class AuthMode(enum.StrEnum):
    AUTO = "auto"
    BASIC = "basic"
    NTLM = "ntlm"
    NEGOTIATE = "negotiate"

    @classmethod
    def parse(cls, value: str) -> AuthMode:
        try:
            return cls(value.strip().lower())
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise ValueError(f"EWS auth must be one of {names}, got {value!r}") from None


#: Schemes that authenticate the connection (handshake), by their ``WWW-Authenticate`` name.
CONNECTION_SCHEMES = {"ntlm": "NTLM", "negotiate": "Negotiate"}


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a mailbox authenticates with. ``token`` set: bearer, the rest unused."""

    user: str
    password: str = field(repr=False)
    token: str = field(default="", repr=False)


def challenges(response: httpx.Response) -> dict[str, str]:
    """``WWW-Authenticate`` challenges of a response: lowercased scheme -> its parameter text
    (for NTLM/Negotiate the base64 token, "" on the first answer)."""
    found: dict[str, str] = {}
    for value in response.headers.get_list("www-authenticate"):
        # Several challenges may share one header, comma-separated; NTLM/Negotiate tokens
        # contain no commas, and Basic's realm parameter is kept only for display.
        for part in value.split(","):
            scheme, _, rest = part.strip().partition(" ")
            if scheme and "=" not in scheme:
                found.setdefault(scheme.lower(), rest.strip())
    return found


def offered(response: httpx.Response) -> str:
    """The schemes a 401 offers, for messages (e.g. ``NTLM, Negotiate``)."""
    names = {"basic": "Basic", "bearer": "Bearer", **CONNECTION_SCHEMES}
    return ", ".join(names.get(s, s) for s in challenges(response)) or "none"


def choose_scheme(mode: AuthMode, offered_schemes: dict[str, str]) -> str | None:
    """The scheme to answer a 401 with, or None when the mode allows none of those offered."""
    if mode is AuthMode.AUTO:
        for scheme in ("negotiate", "ntlm", "basic"):
            if scheme in offered_schemes:
                return scheme
        return None
    return mode.value if mode.value in offered_schemes else None


def tls_server_end_point(certificate_der: bytes) -> bytes:
    """RFC 5929 ``tls-server-end-point``: the certificate's hash with its signature's hash
    algorithm, SHA-256 for MD5, SHA-1 or an unknown one."""
    certificate = x509.load_der_x509_certificate(certificate_der)
    try:
        algorithm = certificate.signature_hash_algorithm
    except UnsupportedAlgorithm:
        algorithm = None
    if algorithm is None or isinstance(algorithm, (hashes.MD5, hashes.SHA1)):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(certificate_der)
    return digest.finalize()


def channel_bindings(response: httpx.Response) -> GssChannelBindings | None:
    """Extended Protection for Authentication: NTLM/Negotiate tokens bound to the server's TLS
    certificate (Exchange 2019 CU14+ requires it by default). None over plain HTTP."""
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    if ssl_object is None:
        return None
    certificate = ssl_object.getpeercert(binary_form=True)
    if not certificate:
        return None
    return GssChannelBindings(application_data=b"tls-server-end-point:" + tls_server_end_point(certificate))


def basic_header(credentials: Credentials) -> str:
    pair = f"{credentials.user}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _packed(bindings: GssChannelBindings | None) -> bytes | None:
    return bindings.pack() if bindings is not None else None


def _nt_hash(password: str) -> str | None:
    """The NT hash (MD4 of the UTF-16LE password) as hex, or None when pyspnego's own MD4 is
    not where this pyspnego version keeps it (the password then goes to pyspnego as before)."""
    try:
        from spnego._ntlm_raw.crypto import ntowfv1
    except ImportError:  # pragma: no cover - a pyspnego that moved its internals
        return None
    return ntowfv1(password).hex()


def _uses_lm_hash() -> bool:
    """pyspnego sends NTLMv1 (which needs the LM hash) only with ``LM_COMPAT_LEVEL`` below 3."""
    try:
        return int(os.environ.get("LM_COMPAT_LEVEL", "3")) < 3
    except ValueError:
        return True  # pyspnego refuses the value itself; leave the credential as given


class _Connection:
    """One single-connection sub-transport: one TCP connection at a time, authenticated by the
    handshake that ran on it (the server answers 401 on a new one, which starts the next).
    ``fresh`` until its first request: it has no TCP connection yet, so none authenticated."""

    __slots__ = ("fresh", "transport")

    def __init__(self, transport: httpx.AsyncHTTPTransport) -> None:
        self.transport = transport
        self.fresh = True


class _ReleasingStream(httpx.AsyncByteStream):
    """A response body that gives its connection back to the pool when closed."""

    def __init__(self, inner: httpx.AsyncByteStream, release: _Release) -> None:
        self._inner = inner
        self._release = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._release()


class _Release:
    def __init__(self, pool: AuthenticatedPool, connection: _Connection, stream: bool) -> None:
        self.pool = pool
        self.connection = connection
        self.stream = stream
        self.done = False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.pool._give_back(self.connection, self.stream)


class AuthenticatedPool(httpx.AsyncBaseTransport):
    """Connections of one credential group (see the module docstring).

    ``verify``: the SSL context (or False). ``mode``: ``EMLISTEN_EWS_AUTH``. Requests carry no
    ``Authorization`` of their own; the pool adds it (or the connection already is).
    """

    def __init__(
        self,
        credentials: Credentials,
        *,
        mode: AuthMode = AuthMode.AUTO,
        verify: object = True,
        max_connections: int = 4,
        keepalive_expiry: float = 120.0,
        schemes: dict[str, str] | None = None,
        bindings: dict[str, GssChannelBindings | None] | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._credentials = credentials
        self.mode = mode
        self._verify = verify
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        #: Idle connections, most recently used last: requests and streams take from the same
        #: list, so a listener's stream goes on the connection its Subscribe authenticated.
        self._idle: list[_Connection] = []
        #: Connections in use for ordinary requests (bounded) and for streams.
        self.busy = 0
        self.busy_streams = 0
        self._slots = trio.Semaphore(max_connections)
        #: The scheme that worked, by origin (``scheme://host:port``).
        self.schemes: dict[str, str] = schemes if schemes is not None else {}
        #: The channel bindings (None over plain HTTP) of the certificate each origin showed
        #: last: a new connection's first handshake leg is bound to it.
        self.bindings: dict[str, GssChannelBindings | None] = bindings if bindings is not None else {}
        #: What pyspnego authenticates with, made on the first handshake (the NT hash once).
        self._spnego_credentials: list[spnego.Credential] | None = None
        #: Handshakes completed (one per authenticated TCP connection; for tests and status).
        self.handshakes = 0
        self._closed = False
        #: The user's Kerberos tickets (Negotiate with the kerberos extra installed).
        self.tickets = _kerberos.TicketCache(credentials.user, credentials.password)

    def __repr__(self) -> str:
        return f"AuthenticatedPool(user={self._credentials.user!r}, mode={self.mode.value})"

    @property
    def connections(self) -> int:
        """Connections this pool holds (idle or busy)."""
        return self.busy + self.busy_streams + len(self._idle)

    def _new_connection(self) -> _Connection:
        # Every connection checked against EMLISTEN_MAIL_ALLOW (emlisten._egress).
        transport = _egress.http_transport(
            "mail",
            verify=self._verify,
            limits=httpx.Limits(
                max_connections=1, max_keepalive_connections=1, keepalive_expiry=self.keepalive_expiry
            ),
        )
        return _Connection(transport)

    async def _lease(self, stream: bool, pool_timeout: float | None) -> _Connection:
        if self._closed:
            raise httpx.ConnectError("connection pool closed")
        if stream:
            self.busy_streams += 1
            return self._idle.pop() if self._idle else self._new_connection()
        with trio.move_on_after(pool_timeout if pool_timeout is not None else float("inf")):
            await self._slots.acquire()
            self.busy += 1
            return self._idle.pop() if self._idle else self._new_connection()
        raise httpx.PoolTimeout("no free EWS connection in time")

    def _give_back(self, connection: _Connection, stream: bool) -> None:
        if stream:
            self.busy_streams -= 1
            (self._idle if not self._closed else []).append(connection)
        else:
            self.busy -= 1
            (self._idle if not self._closed else []).append(connection)
            self._slots.release()
        if self._closed:
            trio.lowlevel.spawn_system_task(connection.transport.aclose)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        stream = bool(request.extensions.get(STREAM_EXTENSION))
        timeouts = request.extensions.get("timeout") or {}
        connection = await self._lease(stream, timeouts.get("pool"))
        release = _Release(self, connection, stream)
        fresh, connection.fresh = connection.fresh, False
        try:
            response = await self._send(connection, request, fresh)
        except BaseException:
            release()
            raise
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_ReleasingStream(response.stream, release),  # type: ignore[arg-type]
            extensions=response.extensions,
            request=request,
        )

    async def _send(self, connection: _Connection, request: httpx.Request, fresh: bool) -> httpx.Response:
        """``fresh``: the connection has carried nothing yet (so it is not authenticated)."""
        credentials = self._credentials
        if credentials.token:
            request.headers["Authorization"] = f"Bearer {credentials.token}"
            return await connection.transport.handle_async_request(request)
        origin = _origin(request.url)
        known = self.schemes.get(origin, "")
        if known == "basic" or (self.mode is AuthMode.BASIC):
            request.headers["Authorization"] = basic_header(credentials)
            response = await connection.transport.handle_async_request(request)
            if response.status_code != 401 or self.mode is AuthMode.BASIC:
                return response
            if "basic" in challenges(response):
                # Refused (a wrong password): once per request, never retried (lockouts).
                return response
            # The server stopped taking Basic (reconfigured): choose again from its challenge.
            self.schemes.pop(origin, None)
        else:
            # An authenticated connection needs no header; a new one is answered 401 and the
            # challenge tells which schemes the server takes.
            request.headers.pop("Authorization", None)
            if known in CONNECTION_SCHEMES and _body_size(request) > LARGE_BODY:
                # Authenticate the connection with a small request first, so the large body goes
                # once: a new connection would take it with each handshake leg, and a server may
                # cut the upload short with its 401.
                probe = await self._send(connection, _small_copy(request), fresh)
                if probe.status_code == 401:
                    return probe
                await _discard(probe)
                response = await connection.transport.handle_async_request(request)
            elif fresh and known in CONNECTION_SCHEMES and choose_scheme(self.mode, {known: ""}) == known:
                # A new connection: without credentials the answer would be the 401 we know.
                response = await self._first_handshake(connection, request, known, origin)
            else:
                response = await connection.transport.handle_async_request(request)
            if response.status_code != 401:
                return response
        scheme = choose_scheme(self.mode, challenges(response))
        if scheme is None:
            return response
        bindings = channel_bindings(response)
        await _discard(response)
        if scheme == "basic":
            request.headers["Authorization"] = basic_header(credentials)
            response = await connection.transport.handle_async_request(request)
            if response.status_code != 401:
                self.schemes[origin] = "basic"
            return response
        self.bindings[origin] = bindings
        return await self._handshake(connection, request, scheme, origin, bindings)

    async def _first_handshake(
        self, connection: _Connection, request: httpx.Request, scheme: str, origin: str
    ) -> httpx.Response:
        """The handshake on a new connection to an origin whose scheme is known, from its first
        request. A 401 in return that is no step of it (the server stopped offering the scheme,
        or the connection shows another certificate than the origin did last, so the token
        carries the wrong binding) is returned for the caller to start over from, as from the
        401 of a request without credentials (the first leg proves nothing: no lockout risk)."""
        if request.url.scheme == "http":
            bindings = None
        elif origin in self.bindings:
            bindings = self.bindings[origin]
        else:
            # Never seen over TLS in this process: learn the certificate from a plain 401.
            return await connection.transport.handle_async_request(request)
        return await self._handshake(connection, request, scheme, origin, bindings, first=True)

    def _credentials_for_spnego(self) -> list[spnego.Credential]:
        """The user's credential for pyspnego, the NT hash computed once (not per handshake)."""
        if self._spnego_credentials is None:
            user, password = self._credentials.user, self._credentials.password
            found: list[spnego.Credential] = []
            nt_hash = None if _uses_lm_hash() else _nt_hash(password)
            if nt_hash is not None:
                # First: pyspnego takes NTLM's credential from the first that offers NTLM.
                found.append(spnego.NTLMHash(user, nt_hash=nt_hash))
            # Kerberos (Negotiate with a Kerberos library) needs the password itself.
            found.append(spnego.Password(user, password))
            self._spnego_credentials = found
        return self._spnego_credentials

    async def _handshake(
        self,
        connection: _Connection,
        request: httpx.Request,
        scheme: str,
        origin: str,
        bindings: GssChannelBindings | None,
        *,
        first: bool = False,
    ) -> httpx.Response:
        name = CONNECTION_SCHEMES[scheme]
        try:
            context, token = await self._start(scheme, request.url.host or "unspecified", bindings)
        except spnego.exceptions.SpnegoError as exc:
            reason = exc.nt_status or "error"
            raise httpx.ProtocolError(f"{name}: cannot start the handshake ({reason})") from None
        while True:
            if token is None:
                raise httpx.ProtocolError(f"{name}: the handshake produced no token")
            request.headers["Authorization"] = f"{name} {base64.b64encode(token).decode('ascii')}"
            response = await connection.transport.handle_async_request(request)
            offered_schemes = challenges(response)
            server_token = offered_schemes.get(scheme, "")
            if first and response.status_code == 401:
                first = False
                shown = channel_bindings(response)
                self.bindings[origin] = shown
                if scheme not in offered_schemes or _packed(shown) != _packed(bindings):
                    return response
            if response.status_code != 401:
                self.bindings[origin] = channel_bindings(response)
                if server_token and not context.complete:
                    # Negotiate's last leg (mutual authentication) rides on the answer.
                    try:
                        context.step(base64.b64decode(server_token))
                    except (spnego.exceptions.SpnegoError, binascii.Error, ValueError):
                        log.debug("%s: final server token not understood", name)
                self.schemes[origin] = scheme
                self.handshakes += 1
                return response
            if not server_token or context.complete:
                # Refused (wrong password, unknown user): the 401 is the answer.
                return response
            await _discard(response)
            try:
                token = context.step(base64.b64decode(server_token))
            except (spnego.exceptions.SpnegoError, binascii.Error, ValueError):
                raise httpx.ProtocolError(f"{name}: the server's challenge is not understood") from None

    async def _start(
        self, scheme: str, host: str, bindings: GssChannelBindings | None
    ) -> tuple[spnego.ContextProxy, bytes | None]:
        """The client context and its first token. With Kerberos, Negotiate's first token is
        the service ticket's AP-REQ for ``HTTP/<host>``: getting the tickets talks to the KDC
        (blocking), so that runs in a worker thread, abandoned when the request is cancelled."""
        credentials = self._credentials_for_spnego()
        if scheme != "negotiate" or not _kerberos.AVAILABLE:
            context = spnego.client(
                credentials, hostname=host, service="HTTP", protocol=scheme, channel_bindings=bindings
            )
            return context, context.step()
        ntlm_only: list[spnego.Credential] = [c for c in credentials if not isinstance(c, spnego.Password)]
        if ntlm_only and self.tickets.known_unavailable():
            # No Kerberos for now (the group's or realm's failure is remembered): NTLM inside
            # SPNEGO needs no KDC, so no worker thread (a hop per handshake costs CPU in a cold
            # start of per-user mailboxes, and the thread contends for the GIL with the loop).
            context = spnego.client(
                ntlm_only, hostname=host, service="HTTP", protocol=scheme, channel_bindings=bindings
            )
            return context, context.step()

        def start() -> tuple[spnego.ContextProxy, bytes | None]:
            ticket = self.tickets.credential()
            # Kerberos takes the first credential that offers it: the tickets, else nothing
            # (not the password: pyspnego would ask the KDC again at every handshake, under
            # the user name as given). NTLM takes its own (the NT hash) from the rest.
            ntlm: list[spnego.Credential] = [c for c in credentials if not isinstance(c, spnego.Password)]
            found: list[spnego.Credential] = [ticket] if ticket is not None else []
            found += ntlm or credentials
            with self.tickets.first_use() if ticket is not None else contextlib.nullcontext():
                context = spnego.client(
                    found, hostname=host, service="HTTP", protocol=scheme, channel_bindings=bindings
                )
                return context, context.step()

        return await trio.to_thread.run_sync(
            start, abandon_on_cancel=True, limiter=_kerberos.thread_limiter()
        )

    async def aclose(self) -> None:
        self._closed = True
        self.tickets.close()
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.transport.aclose()


#: Request bodies above this size are sent on a connection authenticated beforehand.
LARGE_BODY = 1024 * 1024


def _body_size(request: httpx.Request) -> int:
    try:
        return int(request.headers.get("content-length", "0"))
    except ValueError:
        return 0


def _small_copy(request: httpx.Request) -> httpx.Request:
    """The request without its body (the server answers it with an error once authenticated)."""
    headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() != "content-length"]
    return httpx.Request(
        request.method, request.url, headers=headers, content=b"", extensions=request.extensions
    )


async def _discard(response: httpx.Response) -> None:
    """Read and close a response we answer ourselves (the connection stays usable)."""
    try:
        await response.aread()
    finally:
        await response.aclose()


def _origin(url: httpx.URL) -> str:
    parts = urlsplit(str(url))
    return f"{parts.scheme}://{parts.netloc}".lower()


__all__ = [
    "CONNECTION_SCHEMES",
    "STREAM_EXTENSION",
    "AuthMode",
    "AuthenticatedPool",
    "Credentials",
    "basic_header",
    "challenges",
    "choose_scheme",
    "offered",
]
