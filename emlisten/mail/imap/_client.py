"""A small Trio-native IMAP client (RFC 3501 / RFC 9051), built for many long IDLE sessions.

One ``ImapClient`` is one connection. It is not safe for concurrent use by several tasks: one
task issues commands (and IDLE) at a time. Every network wait has a timeout (``fail_after``), so
a dead connection never hangs a caller; a command interrupted half-way (timeout, cancellation,
protocol error) leaves the client broken, and only ``aclose()`` is useful then.

Memory matters more than speed here (ten thousand idle sessions per process): slots everywhere,
reads of at most ``RECEIVE_BYTES``, and no buffers held between responses.
"""

# Per-call ``timeout`` arguments are deliberate: a timeout must become a MailConnectError that
# names the command and marks the connection broken, which a caller's fail_after cannot do.
# ruff: noqa: ASYNC109

from __future__ import annotations

import base64
import binascii
import json
import logging
import socket
import ssl
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType

import trio

from emlisten import _egress
from emlisten.errors import (
    ConfigError,
    FolderNotFoundError,
    MailAuthError,
    MailConnectError,
    MailProtocolError,
    MailSourceError,
    MailTokenRejectedError,
)
from emlisten.mail.imap import _tls
from emlisten.mail.imap._parser import (
    Response,
    ResponseKind,
    ResponseParser,
    Value,
    as_text,
    decode_mailbox_name,
    encode_mailbox_name,
    fetch_attributes,
    parse_internal_date,
)
from emlisten.mail.imap._transport import Transport
from emlisten.models import FolderInfo, Security, ServerEndpoint

log = logging.getLogger(__name__)

RECEIVE_BYTES = 16 * 1024
#: SEARCH results of large folders come as one line (~8 bytes per UID).
DEFAULT_MAX_LINE_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_LITERAL_BYTES = 64 * 1024 * 1024
#: LITERAL- (RFC 7888) allows non-synchronizing literals up to this size.
_LITERAL_MINUS_MAX = 4096
#: Response codes of a NO to SELECT that mean "try again later", not "no such folder".
_TRANSIENT_CODES = frozenset({"UNAVAILABLE", "SERVERBUG", "INUSE", "LIMIT", "CONTACTADMIN", "EXPUNGEISSUED"})
_AUTH_FAILURE_CODES = frozenset({"AUTHENTICATIONFAILED", "AUTHORIZATIONFAILED", "EXPIRED", "PRIVACYREQUIRED"})
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]')
_FETCH_MESSAGE_ITEMS = "(UID BODY.PEEK[] INTERNALDATE RFC822.SIZE)"
_STORE_ACTIONS = frozenset(f"{sign}FLAGS{silent}" for sign in ("", "+", "-") for silent in ("", ".SILENT"))
#: atom-specials plus the flag-specific ones (RFC 3501 flag-keyword is an atom).
_FLAG_SPECIALS = frozenset('(){ %*"\\]')


def _is_flag(flag: str) -> bool:
    name = flag[1:] if flag.startswith("\\") else flag
    return bool(name) and all(0x20 < ord(c) < 0x7F and c not in _FLAG_SPECIALS for c in name)


class Literal:
    """A command argument sent as a literal (``{n}``): 8-bit, CR/LF or long strings."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:  # may be a password: never show the bytes
        return f"Literal(<{len(self.data)} bytes>)"


Argument = bytes | Literal
#: Told (command, outcome, seconds from the command's first byte sent to its tagged answer).
CommandObserver = Callable[[str, str, float], None]


def astring(value: str | bytes) -> Argument:
    """An IMAP astring: a bare atom, a quoted string, or a literal when quoting cannot carry it."""
    raw = value.encode("utf-8") if isinstance(value, str) else value
    if raw and all(0x20 < b < 0x7F and b not in _ATOM_SPECIALS for b in raw):
        return raw
    if len(raw) <= 1024 and all(0x20 <= b < 0x7F for b in raw):
        return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return Literal(raw)


def quoted(value: str | bytes) -> Argument:
    """A string argument that must not be a bare atom (``ID`` values, for instance)."""
    arg = astring(value)
    if isinstance(arg, bytes) and not arg.startswith(b'"'):
        return b'"' + arg + b'"'
    return arg


def mailbox_argument(name: str, *, utf8: bool = False) -> Argument:
    """A mailbox name: modified UTF-7 unless UTF8=ACCEPT is enabled."""
    if name.upper() == "INBOX":
        return b"INBOX"
    return astring(name.encode("utf-8") if utf8 else encode_mailbox_name(name))


def sequence_set(uids: Iterable[int]) -> bytes:
    """``[1, 2, 3, 7, 9, 10]`` to ``1:3,7,9:10``."""
    ordered = sorted(set(uids))
    if not ordered:
        raise ValueError("empty sequence set")
    parts: list[str] = []
    start = prev = ordered[0]
    for uid in ordered[1:]:
        if uid == prev + 1:
            prev = uid
            continue
        parts.append(f"{start}:{prev}" if start != prev else str(start))
        start = prev = uid
    parts.append(f"{start}:{prev}" if start != prev else str(start))
    return ",".join(parts).encode("ascii")


@dataclass(slots=True)
class CommandResult:
    """The tagged completion of a command and the untagged responses received meanwhile."""

    status: Response
    untagged: list[Response] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class FetchedMessage:
    uid: int
    body: bytes | None
    internal_date: datetime | None
    size: int | None
    flags: tuple[str, ...] | None
    sequence: int


@dataclass(frozen=True, slots=True)
class ListEntry:
    name: str
    delimiter: str | None
    flags: frozenset[str]


class ImapClient:
    """One IMAP connection: ``async with ImapClient(endpoint) as client: await client.login(...)``.

    ``ca_file`` adds trusted CAs for verified TLS; by default it comes from
    ``EMLISTEN_TLS_CA_FILE``.
    """

    __slots__ = (
        "__weakref__",  # weakref.finalize gives the parser's budget back
        "_broken",
        "_ca_file",
        "_idle_tag",
        "_parser",
        "_pending",
        "_pipeline_idle",
        "_silence",
        "_stream",
        "_tag_counter",
        "capabilities",
        "command_timeout",
        "connect_timeout",
        "endpoint",
        "last_heard",
        "observer",
        "utf8_enabled",
    )

    def __init__(
        self,
        endpoint: ServerEndpoint,
        *,
        connect_timeout: float = 30.0,
        command_timeout: float = 60.0,
        ca_file: str | None = None,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_literal_bytes: int = DEFAULT_MAX_LITERAL_BYTES,
        observer: CommandObserver | None = None,
    ) -> None:
        self.endpoint = endpoint
        #: Told (command name, "ok" | "no" | "bad" | "error") after every command (metrics).
        self.observer = observer
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._ca_file = ca_file
        self._parser = ResponseParser(max_line_bytes=max_line_bytes, max_literal_bytes=max_literal_bytes)
        # Whatever way the client ends, its literals go back to the process budget.
        weakref.finalize(self, self._parser.end_answer)
        self._stream: Transport | None = None
        self._pending: list[Response] = []
        self._tag_counter = 0
        self._idle_tag: bytes | None = None
        self._broken = False
        #: IDLE may go out behind a FETCH in one write (idle_done_uid_fetch); off for good once
        #: the server refuses it.
        self._pipeline_idle = True
        #: trio.current_time() when the server last sent something during IDLE (a keepalive
        #: that idle_wait passed over included): a listener's liveness check reads it.
        self.last_heard = 0.0
        #: While idle_wait waits with ``silence``: its scope, whose deadline each word from the
        #: server moves on (from the shared reader too, without waking the waiting task).
        self._silence: tuple[trio.CancelScope, float] | None = None
        self.capabilities: frozenset[str] = frozenset()
        self.utf8_enabled = False

    def __repr__(self) -> str:
        return f"ImapClient({self._where})"

    @property
    def _where(self) -> str:
        return f"{self.endpoint.host}:{self.endpoint.port}"

    @property
    def connected(self) -> bool:
        return self._stream is not None and not self._broken

    @property
    def is_tls(self) -> bool:
        return self._stream is not None and self._stream.is_tls

    @property
    def idling(self) -> bool:
        return self._idle_tag is not None

    def has_capability(self, name: str) -> bool:
        return name.upper() in self.capabilities

    # -- connection ------------------------------------------------------------------------

    async def __aenter__(self) -> ImapClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """TCP (+ TLS), greeting, STARTTLS when configured, capabilities."""
        if self._stream is not None:
            raise RuntimeError("already connected")
        endpoint = self.endpoint
        phase = "TCP connect"
        try:
            with trio.fail_after(self.connect_timeout):
                try:
                    # Only to an address EMLISTEN_MAIL_ALLOW permits (EgressDenied: an OSError).
                    tcp = await _egress.open_tcp_stream(endpoint.host, endpoint.port, "mail")
                except socket.gaierror as exc:
                    raise MailConnectError(
                        f"DNS lookup of {endpoint.host} failed: {exc.strerror or exc}"
                    ) from None
                except OSError as exc:
                    raise MailConnectError(
                        f"TCP connect to {self._where} failed: {_os_error_text(exc)}"
                    ) from None
                self._stream = Transport.take(tcp)
                if endpoint.security is Security.SSL_ON_CONNECT:
                    phase = "TLS handshake"
                    await self._start_tls()
                phase = "greeting"
                greeting = await self._next_response()
                if greeting.type == "BYE":
                    raise MailConnectError(f"{self._where} refused the connection: {greeting.text[:200]}")
                if greeting.kind is not ResponseKind.UNTAGGED or greeting.type not in (
                    "OK",
                    "PREAUTH",
                ):
                    raise MailProtocolError(f"unexpected greeting from {self._where}")
                if greeting.code != "CAPABILITY":
                    await self.capability()
                if endpoint.security in (Security.STARTTLS, Security.STARTTLS_WHEN_AVAILABLE):
                    if self.has_capability("STARTTLS"):
                        phase = "STARTTLS"
                        await self._starttls()
                    elif endpoint.security is Security.STARTTLS:
                        raise MailConnectError(f"{self._where} does not offer STARTTLS")
        except trio.TooSlowError:
            await self._abort()
            raise MailConnectError(
                f"{phase} to {self._where} timed out after {self.connect_timeout:g}s"
            ) from None
        except BaseException:
            await self._abort()
            raise

    async def _start_tls(self) -> None:
        assert self._stream is not None
        try:
            ca_file = self._ca_file if self._ca_file is not None else _tls.ca_file_from_env()
            context = _tls.context_for(self.endpoint.verify_certificate, ca_file)
        except ConfigError as exc:
            raise MailConnectError(f"TLS setup for {self._where} failed: {exc}") from None
        try:
            await self._stream.start_tls(context, server_hostname=self.endpoint.host)
        except ssl.SSLEOFError:
            raise MailConnectError(f"TLS handshake with {self._where} failed: connection closed") from None
        except (ssl.SSLError, OSError) as exc:
            detail = _ssl_error_text(exc)
            raise MailConnectError(f"TLS handshake with {self._where} failed: {detail}") from None

    async def _starttls(self) -> None:
        result = await self._command(b"STARTTLS", timeout=self.connect_timeout)
        self._require_ok(result, "STARTTLS")
        if self._pending or not self._parser.idle:
            # Bytes after the OK but before the handshake would be a plaintext injection.
            raise MailProtocolError(f"{self._where} sent data after STARTTLS OK")
        await self._start_tls()
        self.capabilities = frozenset()
        await self.capability()

    async def close(self, *, timeout: float = 5.0) -> None:
        """LOGOUT (ending IDLE first) when the connection is healthy, then close. Never raises.

        Runs shielded with ``timeout``, so it is safe in ``finally`` blocks of cancelled tasks.
        """
        with trio.CancelScope(shield=True), trio.move_on_after(timeout):
            try:
                if self.connected:
                    if self._idle_tag is not None:
                        await self.idle_done(timeout=timeout)
                    await self.logout(timeout=timeout)
            except (MailSourceError, trio.BusyResourceError):
                # Busy: another task is still mid-command on this connection (it is being
                # cancelled too); skip the polite LOGOUT and just close.
                pass
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection without LOGOUT. Never raises, never blocks long."""
        stream, self._stream = self._stream, None
        self._broken = True
        self._idle_tag = None
        self._pending = []
        self._parser.end_answer()
        if stream is None:
            return
        errors = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError)
        with trio.CancelScope(shield=True), trio.move_on_after(1.0) as scope, suppress(*errors):
            await stream.aclose()
        if scope.cancelled_caught:
            await trio.aclose_forcefully(stream)

    async def _abort(self) -> None:
        await self.aclose()

    # -- reading and writing ---------------------------------------------------------------

    def _check_usable(self) -> Transport:
        if self._stream is None or self._broken:
            self._idle_tag = None
            raise MailConnectError(f"connection to {self._where} is closed")
        return self._stream

    async def _send(self, data: bytes) -> None:
        stream = self._check_usable()
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError) as exc:
            self._broken = True
            raise MailConnectError(
                f"connection to {self._where} lost while sending: {_exc_text(exc)}"
            ) from None

    async def _next_response(self, *, pass_over_bare_ok: bool = False) -> Response:
        """The next response, reading as needed. Cancel-safe between responses.

        ``pass_over_bare_ok``: a read that is one whole ``* OK <text>`` line without a response
        code (a server's keepalive; RFC 9051 7.1.1: the text is for humans) is dropped before
        the parser sees it, and only moves ``last_heard``.
        """
        skip = self._skip_keepalive if pass_over_bare_ok else None
        while not self._pending:
            stream = self._check_usable()
            try:
                data = await stream.receive_some(RECEIVE_BYTES, skip=skip)
            except (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                OSError,
                ssl.SSLError,
            ) as exc:
                self._broken = True
                raise MailConnectError(f"connection to {self._where} lost: {_exc_text(exc)}") from None
            if not data:
                self._broken = True
                raise MailConnectError(f"{self._where} closed the connection")
            try:
                self._pending = self._parser.feed(data)
            except MailProtocolError:
                self._broken = True
                raise
        response = self._pending.pop(0)
        if response.code == "CAPABILITY" and response.is_status:
            self._set_capabilities(response.code_args)
        elif response.type == "CAPABILITY" and response.kind is ResponseKind.UNTAGGED:
            self._set_capabilities(response.data)
        return response

    def _skip_keepalive(self, data: bytes) -> bool:
        """Whether a read is a keepalive to pass over (see ``_next_response``). Runs in the
        transport's shared reader, before this client's task hears of the data."""
        if self._parser.idle and _is_bare_ok_line(data):
            self._heard()
            return True
        return False

    def _heard(self) -> None:
        self.last_heard = trio.current_time()
        if self._silence is not None:
            scope, silence = self._silence
            scope.deadline = self.last_heard + silence

    def _set_capabilities(self, values: list[Value]) -> None:
        self.capabilities = _shared_capabilities(
            frozenset(as_text(v).upper() for v in values if v is not None)
        )

    def _new_tag(self) -> bytes:
        # A new command: the previous answer has been consumed (and its bytes handed on).
        self._parser.end_answer()
        self._tag_counter += 1
        return b"A%d" % self._tag_counter

    async def _command(
        self,
        command: bytes,
        *args: Argument,
        timeout: float | None = None,
        expect_bye: bool = False,
    ) -> CommandResult:
        """Send one command and read until its tagged response.

        Any exception (timeout included) leaves the client broken: the exchange is out of step.
        """
        self._check_usable()
        if self._idle_tag is not None:
            raise RuntimeError("IMAP command issued while in IDLE; call idle_done() first")
        seconds = self.command_timeout if timeout is None else timeout
        name = command.split(b" ", 1)[0].decode("ascii", "replace")
        tag = self._new_tag()
        started = trio.current_time()
        try:
            with trio.fail_after(seconds):
                result = await self._exchange(tag, command, args, expect_bye)
        except trio.TooSlowError:
            self._broken = True
            self._observe(self._metric_name(command), "error", started)
            raise MailConnectError(f"{name}: no answer from {self._where} within {seconds:g}s") from None
        except BaseException:
            self._broken = True
            self._observe(self._metric_name(command), "error", started)
            raise
        self._observe(
            self._metric_name(command), result.status.type.lower() if result.status.type else "error", started
        )
        return result

    def _observe(self, name: str, outcome: str, started: float) -> None:
        if self.observer is not None:
            self.observer(name.upper(), outcome, trio.current_time() - started)

    @staticmethod
    def _metric_name(command: bytes) -> str:
        words = command.split(b" ", 2)
        # "UID FETCH ..." is reported as "UID FETCH", not as "UID".
        head = b" ".join(words[:2]) if words[0].upper() == b"UID" and len(words) > 1 else words[0]
        return head.decode("ascii", "replace")

    async def _exchange(
        self, tag: bytes, command: bytes, args: Sequence[Argument], expect_bye: bool
    ) -> CommandResult:
        untagged: list[Response] = []
        # Split the command at synchronizing literals: after each, wait for "+".
        chunk = tag + b" " + command
        literal_plus = self.has_capability("LITERAL+")
        literal_minus = self.has_capability("LITERAL-")
        for arg in args:
            if isinstance(arg, bytes):
                chunk += b" " + arg
                continue
            size = len(arg.data)
            if literal_plus or (literal_minus and size <= _LITERAL_MINUS_MAX):
                chunk += b" {%d+}\r\n" % size + arg.data
                continue
            await self._send(chunk + b" {%d}\r\n" % size)
            try:
                await self._await_continuation(tag, untagged)
            except _TaggedBeforeContinuation as refused:
                return refused.result
            chunk = arg.data
        await self._send(chunk + b"\r\n")
        return await self._read_until_tagged(tag, untagged, expect_bye=expect_bye)

    async def _await_continuation(self, tag: bytes, untagged: list[Response]) -> Response:
        while True:
            response = await self._next_response()
            if response.kind is ResponseKind.CONTINUATION:
                return response
            if response.kind is ResponseKind.TAGGED:
                if response.tag.encode() == tag:
                    # The server refused to go on (e.g. NO to AUTHENTICATE or IDLE).
                    raise _TaggedBeforeContinuation(CommandResult(response, untagged))
                raise self._unexpected_tag(response, tag)
            self._check_bye(response)
            untagged.append(response)

    async def _read_until_tagged(
        self, tag: bytes, untagged: list[Response], *, expect_bye: bool = False
    ) -> CommandResult:
        while True:
            response = await self._next_response()
            if response.kind is ResponseKind.TAGGED:
                if response.tag.encode() != tag:
                    raise self._unexpected_tag(response, tag)
                return CommandResult(response, untagged)
            if response.kind is ResponseKind.CONTINUATION:
                raise MailProtocolError(f"unexpected continuation request from {self._where}")
            if not expect_bye:
                self._check_bye(response)
            untagged.append(response)

    def _unexpected_tag(self, response: Response, expected: bytes) -> MailProtocolError:
        # The tags and the answer's status name the mix-up; the answer's text is the server's
        # and stays out (it may echo what we sent).
        got = response.tag[:20]
        return MailProtocolError(
            f"unexpected tagged response from {self._where}: {got} {response.type[:10]}, "
            f"waiting for {expected.decode('ascii', 'replace')}"
        )

    def _check_bye(self, response: Response) -> None:
        if response.type == "BYE":
            self._broken = True
            raise MailConnectError(f"{self._where} closed the session: {response.text[:200]}")

    def _require_ok(self, result: CommandResult, what: str) -> None:
        status = result.status
        if status.type != "OK":
            raise MailProtocolError(f"{what} failed on {self._where}: {status.type} {_describe(status)}")

    # -- commands --------------------------------------------------------------------------

    async def capability(self, *, timeout: float | None = None) -> frozenset[str]:
        result = await self._command(b"CAPABILITY", timeout=timeout)
        self._require_ok(result, "CAPABILITY")
        return self.capabilities

    async def noop(self, *, timeout: float | None = None) -> list[Response]:
        """NOOP; returns the untagged responses it flushed (EXISTS, EXPUNGE, ...)."""
        result = await self._command(b"NOOP", timeout=timeout)
        self._require_ok(result, "NOOP")
        return result.untagged

    async def login(self, user: str, password: str, *, timeout: float | None = None) -> None:
        if self.has_capability("LOGINDISABLED"):
            raise MailAuthError(f"{self._where} refuses LOGIN on this connection (LOGINDISABLED)")
        result = await self._command(b"LOGIN", astring(user), astring(password), timeout=timeout)
        await self._check_auth(result, "LOGIN", timeout, secret=password)

    async def authenticate_plain(self, user: str, password: str, *, timeout: float | None = None) -> None:
        """AUTHENTICATE PLAIN (RFC 4616), with the initial response inline when SASL-IR."""
        message = b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8")
        await self.authenticate("PLAIN", message, timeout=timeout, secret=password)

    async def authenticate(
        self,
        mechanism: str,
        initial_response: bytes,
        *,
        timeout: float | None = None,
        secret: str = "",
        error_response: bytes = b"",
        challenges: list[bytes] | None = None,
    ) -> None:
        """A one-step SASL exchange (PLAIN; XOAUTH2 and OAUTHBEARER send the same shape).

        If the server answers the response with another challenge, that is an error report
        (XOAUTH2/OAUTHBEARER send a base64 JSON error this way): reply with ``error_response``
        (an empty line by default; RFC 7628 wants ``\x01`` for OAUTHBEARER) so the server sends
        its tagged NO, instead of waiting forever. Those challenges, base64-decoded, are appended
        to ``challenges`` when given.
        """
        seconds = self.command_timeout if timeout is None else timeout
        encoded = base64.b64encode(initial_response) or b"="
        command = b"AUTHENTICATE " + mechanism.upper().encode("ascii")
        tag = self._new_tag()
        untagged: list[Response] = []
        self._check_usable()
        started = trio.current_time()
        try:
            with trio.fail_after(seconds):
                try:
                    if self.has_capability("SASL-IR"):
                        await self._send(tag + b" " + command + b" " + encoded + b"\r\n")
                    else:
                        await self._send(tag + b" " + command + b"\r\n")
                        await self._await_continuation(tag, untagged)
                        await self._send(encoded + b"\r\n")
                    for _ in range(3):
                        try:
                            challenge = await self._await_continuation(tag, untagged)
                        except _TaggedBeforeContinuation as done:
                            result = done.result
                            break
                        if challenges is not None:
                            challenges.append(_b64decode_lenient(challenge.text))
                        await self._send(
                            (base64.b64encode(error_response) if error_response else b"") + b"\r\n"
                        )
                    else:
                        raise MailProtocolError(f"AUTHENTICATE on {self._where} does not end")
                except _TaggedBeforeContinuation as done:
                    result = done.result
        except trio.TooSlowError:
            self._broken = True
            raise MailConnectError(
                f"AUTHENTICATE: no answer from {self._where} within {seconds:g}s"
            ) from None
        except BaseException:
            self._broken = True
            raise
        self._observe("AUTHENTICATE", (result.status.type or "error").lower(), started)
        await self._check_auth(result, f"AUTHENTICATE {mechanism.upper()}", timeout, secret=secret)

    async def authenticate_xoauth2(self, user: str, token: str, *, timeout: float | None = None) -> None:
        """AUTHENTICATE XOAUTH2 (Google/Microsoft). A rejected token raises
        MailTokenRejectedError carrying the server's JSON error (status, scope), never the token."""
        message = b"user=" + user.encode("utf-8") + b"\x01auth=Bearer " + token.encode("utf-8")
        await self._authenticate_oauth("XOAUTH2", message + b"\x01\x01", token, b"", timeout)

    async def authenticate_oauthbearer(
        self, user: str, token: str, host: str, port: int, *, timeout: float | None = None
    ) -> None:
        """AUTHENTICATE OAUTHBEARER (RFC 7628); errors as for :meth:`authenticate_xoauth2`."""
        gs2_header = b"n,a=" + _sasl_name(user) + b","
        message = (
            gs2_header
            + b"\x01host="
            + host.encode("utf-8")
            + b"\x01port=%d" % port
            + b"\x01auth=Bearer "
            + token.encode("utf-8")
            + b"\x01\x01"
        )
        # RFC 7628 3.2.3: after an error challenge the client sends a single %x01.
        await self._authenticate_oauth("OAUTHBEARER", message, token, b"\x01", timeout)

    async def _authenticate_oauth(
        self,
        mechanism: str,
        message: bytes,
        token: str,
        error_response: bytes,
        timeout: float | None,
    ) -> None:
        challenges: list[bytes] = []
        try:
            await self.authenticate(
                mechanism,
                message,
                timeout=timeout,
                secret=token,
                error_response=error_response,
                challenges=challenges,
            )
        except MailAuthError as exc:
            summary = _oauth_error_summary(challenges, token)
            detail = str(exc) + (f" ({summary})" if summary else "")
            raise MailTokenRejectedError(detail) from None

    async def _check_auth(
        self, result: CommandResult, what: str, timeout: float | None, *, secret: str
    ) -> None:
        status = result.status
        if status.type == "OK":
            if status.code != "CAPABILITY":
                # Capabilities change after login (IDLE is often listed only then).
                await self.capability(timeout=timeout)
            return
        # A server could echo the credentials back: never let them into an error message.
        text = _describe(status)
        if secret:
            text = text.replace(secret, "***")
        if status.type == "NO" or status.code in _AUTH_FAILURE_CODES:
            raise MailAuthError(f"{what} rejected by {self._where}: {text}")
        raise MailProtocolError(f"{what} failed on {self._where}: {status.type} {text}")

    async def id(
        self, fields: Mapping[str, str] | None = None, *, timeout: float | None = None
    ) -> dict[str, str]:
        """ID (RFC 2971): tell the server who we are; returns what it says about itself."""
        args: list[Argument]
        if fields:
            parts: list[bytes] = []
            for key, value in fields.items():
                for item in (key, value):
                    arg = quoted(item)
                    if isinstance(arg, Literal):  # keep ID simple: no literals
                        arg = quoted(item.encode("ascii", "replace").replace(b"?", b"_"))
                    assert isinstance(arg, bytes)
                    parts.append(arg)
            args = [b"(" + b" ".join(parts) + b")"]
        else:
            args = [b"NIL"]
        result = await self._command(b"ID", *args, timeout=timeout)
        self._require_ok(result, "ID")
        server: dict[str, str] = {}
        for response in result.untagged:
            if response.type == "ID" and response.data and isinstance(response.data[0], list):
                items = response.data[0]
                for i in range(0, len(items) - 1, 2):
                    if items[i + 1] is not None:
                        server[as_text(items[i])] = as_text(items[i + 1])
        return server

    async def enable(self, *capabilities: str, timeout: float | None = None) -> frozenset[str]:
        """ENABLE (RFC 5161); returns the capabilities the server enabled."""
        result = await self._command(b"ENABLE", *(c.encode("ascii") for c in capabilities), timeout=timeout)
        self._require_ok(result, "ENABLE")
        enabled: set[str] = set()
        for response in result.untagged:
            if response.type == "ENABLED":
                enabled.update(as_text(v).upper() for v in response.data if v is not None)
        if "UTF8=ACCEPT" in enabled:
            self.utf8_enabled = True
        return frozenset(enabled)

    async def select(
        self, folder: str, *, readonly: bool = False, timeout: float | None = None
    ) -> FolderInfo:
        """SELECT (or EXAMINE when ``readonly``). A missing folder raises FolderNotFoundError."""
        command = b"EXAMINE" if readonly else b"SELECT"
        result = await self._command(
            command, mailbox_argument(folder, utf8=self.utf8_enabled), timeout=timeout
        )
        status = result.status
        if status.type == "NO":
            if status.code in _TRANSIENT_CODES:
                raise MailProtocolError(
                    f"{command.decode()} {folder!r} failed on {self._where}: {_describe(status)}"
                )
            raise FolderNotFoundError(
                f"folder {folder!r} cannot be selected on {self._where}: {_describe(status)}"
            )
        self._require_ok(result, command.decode())
        exists = 0
        uidvalidity: int | None = None
        uidnext: int | None = None
        for response in result.untagged:
            if response.type == "EXISTS" and response.number is not None:
                exists = response.number
            elif response.type == "OK" and response.code_args:
                value = response.code_args[0]
                if response.code == "UIDVALIDITY" and isinstance(value, int):
                    uidvalidity = value
                elif response.code == "UIDNEXT" and isinstance(value, int):
                    uidnext = value
        if uidvalidity is None:
            raise MailProtocolError(f"{self._where} sent no UIDVALIDITY for {folder!r}")
        if uidnext is None:
            # Rare (RFC 9051 servers may omit it): the highest UID + 1 is a safe stand-in.
            highest = await self.uid_search("*", timeout=timeout) if exists else []
            uidnext = (max(highest) + 1) if highest else 1
        return FolderInfo(name=folder, uidvalidity=uidvalidity, uidnext=uidnext, exists=exists)

    async def examine(self, folder: str, *, timeout: float | None = None) -> FolderInfo:
        return await self.select(folder, readonly=True, timeout=timeout)

    async def status(
        self,
        folder: str,
        items: Sequence[str] = ("MESSAGES", "UIDNEXT", "UIDVALIDITY"),
        *,
        timeout: float | None = None,
    ) -> dict[str, int]:
        result = await self._command(
            b"STATUS",
            mailbox_argument(folder, utf8=self.utf8_enabled),
            b"(" + " ".join(items).encode("ascii") + b")",
            timeout=timeout,
        )
        if result.status.type == "NO":
            raise FolderNotFoundError(
                f"STATUS {folder!r} failed on {self._where}: {_describe(result.status)}"
            )
        self._require_ok(result, "STATUS")
        values: dict[str, int] = {}
        for response in result.untagged:
            if response.type == "STATUS" and len(response.data) == 2:
                pairs = response.data[1]
                if isinstance(pairs, list):
                    for i in range(0, len(pairs) - 1, 2):
                        value = pairs[i + 1]
                        if isinstance(value, int):
                            values[as_text(pairs[i]).upper()] = value
        return values

    async def list_folders(
        self, reference: str = "", pattern: str = "*", *, timeout: float | None = None
    ) -> list[ListEntry]:
        result = await self._command(
            b"LIST",
            quoted(encode_mailbox_name(reference)),
            quoted(encode_mailbox_name(pattern)),
            timeout=timeout,
        )
        self._require_ok(result, "LIST")
        entries: list[ListEntry] = []
        for response in result.untagged:
            if response.type != "LIST" or len(response.data) < 3:
                continue
            flags, delimiter, name = response.data[:3]
            if not isinstance(flags, list) or name is None:
                continue
            raw_name = as_text(name)
            entries.append(
                ListEntry(
                    name=raw_name if self.utf8_enabled else decode_mailbox_name(raw_name),
                    delimiter=None if delimiter is None else as_text(delimiter),
                    flags=frozenset(as_text(f) for f in flags if f is not None),
                )
            )
        return entries

    async def uid_search(self, criteria: str, *, timeout: float | None = None) -> list[int]:
        """UID SEARCH with ASCII ``criteria`` (e.g. ``"UID 5:*"``); UIDs ascending."""
        result = await self._command(b"UID SEARCH " + criteria.encode("ascii"), timeout=timeout)
        self._require_ok(result, "UID SEARCH")
        uids: set[int] = set()
        for response in result.untagged:
            if response.type == "SEARCH":
                uids.update(v for v in response.data if isinstance(v, int))
        return sorted(uids)

    async def uid_fetch(
        self,
        uids: Iterable[int] | str,
        items: str = _FETCH_MESSAGE_ITEMS,
        *,
        timeout: float | None = None,
        unsolicited: list[Response] | None = None,
    ) -> list[FetchedMessage]:
        """UID FETCH; by default the whole message without setting \\Seen (BODY.PEEK[]).

        A partial ``BODY.PEEK[]<0.n>`` is returned as ``body`` too. Untagged responses that are
        not answers to this FETCH (EXISTS, EXPUNGE, flag updates) go to ``unsolicited``."""
        sequence = uids.encode("ascii") if isinstance(uids, str) else sequence_set(uids)
        result = await self._command(b"UID FETCH " + sequence + b" " + items.encode("ascii"), timeout=timeout)
        self._require_ok(result, "UID FETCH")
        return _fetched_messages(result.untagged, unsolicited)

    async def last_uid(self, *, timeout: float | None = None) -> FetchedMessage | None:
        """UID and sequence number of the selected folder's newest message (``FETCH * (UID)``),
        None when the folder is empty."""
        result = await self._command(b"FETCH * (UID)", timeout=timeout)
        if result.status.type != "OK":
            return None  # an empty folder has no "*"
        messages = _fetched_messages(result.untagged, None)
        return max(messages, key=lambda m: m.sequence) if messages else None

    async def uid_store(
        self,
        uids: Iterable[int],
        action: str,
        flags: Iterable[str],
        *,
        timeout: float | None = None,
    ) -> None:
        """UID STORE, e.g. ``uid_store([5, 6], "+FLAGS.SILENT", ["$CreatioSynced"])``.

        Needs a folder selected read-write (SELECT, not EXAMINE). ``flags`` are system flags
        (``\\Seen``) or keywords (atoms).
        """
        if action.upper() not in _STORE_ACTIONS:
            raise ValueError(f"unsupported STORE action {action!r}")
        flag_list = list(flags)
        for flag in flag_list:
            if not _is_flag(flag):
                raise ValueError(f"not a valid IMAP flag or keyword: {flag!r}")
        result = await self._command(
            b"UID STORE "
            + sequence_set(uids)
            + b" "
            + action.upper().encode("ascii")
            + b" ("
            + " ".join(flag_list).encode("ascii")
            + b")",
            timeout=timeout,
        )
        self._require_ok(result, "UID STORE")

    async def append(
        self,
        folder: str,
        message: bytes,
        *,
        flags: Sequence[str] = ("\\Seen",),
        internal_date: datetime | None = None,
        timeout: float | None = None,
    ) -> int | None:
        """APPEND ``message`` to ``folder``; returns its UID when the server says (UIDPLUS).

        A missing folder (``NO [TRYCREATE]``) raises FolderNotFoundError; other refusals
        MailProtocolError. ``internal_date`` must be timezone-aware (default: the server's now).
        """
        args: list[Argument] = [mailbox_argument(folder, utf8=self.utf8_enabled)]
        for flag in flags:
            body = flag[1:] if flag.startswith("\\") else flag
            if not body or not all(0x20 < ord(c) < 0x7F and ord(c) not in _ATOM_SPECIALS for c in body):
                raise ValueError(f"not a valid IMAP flag or keyword: {flag!r}")
        args.append(b"(" + " ".join(flags).encode("ascii") + b")")
        if internal_date is not None:
            if internal_date.utcoffset() is None:
                raise ValueError("internal_date must be timezone-aware")
            months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
            text = internal_date.strftime(f"%d-{months[internal_date.month - 1]}-%Y %H:%M:%S %z")
            args.append(b'"' + text.encode("ascii") + b'"')
        args.append(Literal(message))
        result = await self._command(b"APPEND", *args, timeout=timeout)
        status = result.status
        if status.type == "NO" and status.code == "TRYCREATE":
            raise FolderNotFoundError(
                f"APPEND: folder {folder!r} does not exist on {self._where}: {_describe(status)}"
            )
        self._require_ok(result, "APPEND")
        if status.code == "APPENDUID" and len(status.code_args) >= 2:
            uid = status.code_args[1]
            if isinstance(uid, int):
                return uid
        return None

    async def logout(self, *, timeout: float | None = None) -> None:
        result = await self._command(b"LOGOUT", timeout=timeout, expect_bye=True)
        self._require_ok(result, "LOGOUT")
        self._broken = True  # the server closes the connection now

    # -- IDLE ------------------------------------------------------------------------------

    async def idle_start(self, *, timeout: float | None = None) -> list[Response]:
        """Send IDLE and wait for the server's ``+`` (so it is really idling).

        Returns the untagged responses that arrived before the ``+``.
        """
        if self._idle_tag is not None:
            raise RuntimeError("already in IDLE")
        self._check_usable()
        seconds = self.command_timeout if timeout is None else timeout
        tag = self._new_tag()
        untagged: list[Response] = []
        try:
            with trio.fail_after(seconds):
                await self._send(tag + b" IDLE\r\n")
                try:
                    await self._await_continuation(tag, untagged)
                except _TaggedBeforeContinuation as refused:
                    raise MailProtocolError(
                        f"IDLE refused by {self._where}: {_describe(refused.result.status)}"
                    ) from None
        except trio.TooSlowError:
            self._broken = True
            raise MailConnectError(f"IDLE: no answer from {self._where} within {seconds:g}s") from None
        except BaseException:
            self._broken = True
            raise
        self._idle_tag = tag
        self.last_heard = trio.current_time()
        return untagged

    async def idle_wait(
        self, timeout: float | None, *, only: frozenset[str] | None = None, silence: float | None = None
    ) -> Response | None:
        """The next untagged response while idling, or None after ``timeout`` seconds without
        one. With ``only``, responses of other types (a server's keepalive ``* OK Still here``,
        flag changes) are passed over inside the wait, so a listener that needs only EXISTS and
        EXPUNGE is not woken for them; ``last_heard`` still advances. With ``silence``, it also
        returns None once the server has said nothing at all for that long (from
        ``last_heard``): a server that keeps talking never wakes the caller for its liveness.

        Cancel-safe: a timeout or cancellation here does not disturb the connection.
        A BYE raises MailConnectError.
        """
        tag = self._idle_tag
        if tag is None:
            raise RuntimeError("not in IDLE")
        with (
            trio.move_on_after(float("inf") if timeout is None else timeout),
            trio.CancelScope() as quiet,
        ):
            if silence is not None:
                quiet.deadline = self.last_heard + silence
                self._silence = (quiet, silence)
            try:
                return await self._idle_response(tag, only)
            finally:
                self._silence = None
        return None

    async def _idle_response(self, tag: bytes, only: frozenset[str] | None) -> Response | None:
        """idle_wait's reading: the response asked for, or None for a repeated continuation."""
        pass_over_bare_ok = only is not None and "OK" not in only
        while True:
            response = await self._next_response(pass_over_bare_ok=pass_over_bare_ok)
            self._heard()
            if response.kind is ResponseKind.TAGGED:
                self._idle_tag = None
                if response.tag.encode() == tag:
                    ended = f"{response.type} {_describe(response)}"
                    raise MailProtocolError(f"{self._where} ended IDLE: {ended}")
                raise self._unexpected_tag(response, tag)
            if response.kind is ResponseKind.CONTINUATION:
                if only is not None:
                    continue
                return None  # some servers repeat "+ idling" as a keepalive
            self._check_bye(response)
            if only is None or response.type in only:
                return response

    async def idle_done(self, *, timeout: float | None = None) -> list[Response]:
        """Send DONE and wait for IDLE's tagged OK; returns the untagged responses meanwhile."""
        tag = self._idle_tag
        if tag is None:
            raise RuntimeError("not in IDLE")
        seconds = self.command_timeout if timeout is None else timeout
        untagged: list[Response] = []
        try:
            with trio.fail_after(seconds):
                await self._send(b"DONE\r\n")
                self._idle_tag = None
                result = await self._read_until_tagged(tag, untagged)
        except trio.TooSlowError:
            self._broken = True
            raise MailConnectError(f"DONE: no answer from {self._where} within {seconds:g}s") from None
        except BaseException:
            self._broken = True
            raise
        self._require_ok(result, "IDLE")
        return result.untagged

    async def idle_done_uid_fetch(
        self,
        uids: str,
        items: str,
        *,
        timeout: float | None = None,
        unsolicited: list[Response] | None = None,
        idle_again: bool = False,
    ) -> tuple[list[Response], list[FetchedMessage]]:
        """End IDLE and ask ``UID FETCH uids items`` in one write: one round trip (and one
        packet each way) instead of two. DONE completes the IDLE command, so the FETCH is just
        the next command, pipelined as RFC 3501 (5.5) allows.

        ``idle_again``: IDLE goes out in the same write, behind the FETCH, so the session is
        idling again when this returns (:attr:`idling`) without a write and a wait of its own.
        A server that refuses the pipelined IDLE (a tagged answer instead of ``+``) leaves the
        session out of IDLE, and this client does not pipeline IDLE again.

        Returns the untagged responses that came before IDLE's tagged OK (as :meth:`idle_done`)
        and the fetched messages (as :meth:`uid_fetch`, its other untagged responses, and those
        before the new IDLE's ``+``, going to ``unsolicited``)."""
        idle_tag = self._idle_tag
        if idle_tag is None:
            raise RuntimeError("not in IDLE")
        seconds = self.command_timeout if timeout is None else timeout
        fetch_tag = self._new_tag()
        command = fetch_tag + b" UID FETCH " + uids.encode("ascii") + b" " + items.encode("ascii") + b"\r\n"
        again_tag = self._new_tag() if idle_again and self._pipeline_idle else None
        if again_tag is not None:
            command += again_tag + b" IDLE\r\n"
        started = trio.current_time()
        try:
            with trio.fail_after(seconds):
                await self._send(b"DONE\r\n" + command)
                self._idle_tag = None
                idle_result = await self._read_until_tagged(idle_tag, [])
                fetch_result = await self._read_fetch_and_idle(fetch_tag, again_tag)
        except trio.TooSlowError:
            self._broken = True
            self._observe("UID FETCH", "error", started)
            raise MailConnectError(
                f"DONE + UID FETCH: no answer from {self._where} within {seconds:g}s"
            ) from None
        except BaseException:
            self._broken = True
            self._observe("UID FETCH", "error", started)
            raise
        self._observe(
            "UID FETCH", fetch_result.status.type.lower() if fetch_result.status.type else "error", started
        )
        self._require_ok(idle_result, "IDLE")
        self._require_ok(fetch_result, "UID FETCH")
        return idle_result.untagged, _fetched_messages(fetch_result.untagged, unsolicited)

    async def _read_fetch_and_idle(self, fetch_tag: bytes, again_tag: bytes | None) -> CommandResult:
        """Read to the FETCH's tagged answer and, with ``again_tag``, to the pipelined IDLE's
        ``+``, in whichever order they come (a server may run pipelined commands in parallel,
        RFC 3501 5.5). Untagged responses all go to the FETCH's result."""
        untagged: list[Response] = []
        fetch_status: Response | None = None
        waiting_for_idle = again_tag is not None
        while fetch_status is None or waiting_for_idle:
            response = await self._next_response()
            if response.kind is ResponseKind.TAGGED:
                tag = response.tag.encode()
                if tag == fetch_tag and fetch_status is None:
                    fetch_status = response
                elif tag == again_tag and waiting_for_idle:
                    # The pipelined IDLE was refused: IDLE on its own from now on (the caller
                    # sees the session is not idling).
                    waiting_for_idle = False
                    self._pipeline_idle = False
                    log.info("%s refused IDLE pipelined behind FETCH: %s", self._where, _describe(response))
                else:
                    expected = fetch_tag if fetch_status is None or again_tag is None else again_tag
                    raise self._unexpected_tag(response, expected)
            elif response.kind is ResponseKind.CONTINUATION:
                if not waiting_for_idle:
                    raise MailProtocolError(f"unexpected continuation request from {self._where}")
                waiting_for_idle = False
                self._idle_tag = again_tag
                self.last_heard = trio.current_time()
            else:
                self._check_bye(response)
                untagged.append(response)
        return CommandResult(fetch_status, untagged)

    def answer_handed_on(self) -> None:
        """The caller is done with the last answer's bytes (a fetch it handed on): give them back
        to the process budget now, not at the next command (the session may idle for hours)."""
        self._parser.end_answer()

    @asynccontextmanager
    async def idle(self, *, timeout: float | None = None) -> AsyncIterator[IdleSession]:
        """``async with client.idle() as session: response = await session.wait(60)``.

        Leaving the block sends DONE (shielded, with a short timeout when leaving on an error).
        """
        initial = await self.idle_start(timeout=timeout)
        session = IdleSession(self, initial)
        try:
            yield session
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                try:
                    if self.connected and self._idle_tag is not None:
                        session.after = await self.idle_done(timeout=5.0)
                except MailSourceError:
                    pass
            raise
        if self._idle_tag is not None:
            session.after = await self.idle_done(timeout=timeout)


class IdleSession:
    """The handle of an ongoing IDLE: responses that came before ``+`` and a way to wait."""

    __slots__ = ("_client", "after", "initial")

    def __init__(self, client: ImapClient, initial: list[Response]) -> None:
        self._client = client
        self.initial = initial
        #: Untagged responses received between DONE and the tagged OK (set on exit).
        self.after: list[Response] = []

    async def wait(self, timeout: float | None = None) -> Response | None:
        return await self._client.idle_wait(timeout)

    def __aiter__(self) -> IdleSession:
        return self

    async def __anext__(self) -> Response:
        response = await self._client.idle_wait(None)
        assert response is not None
        return response


#: Servers send the same capability list to every session: keep one copy (it is ~4 KiB, a
#: large share of an idle session's memory).
_capability_sets: dict[frozenset[str], frozenset[str]] = {}
_MAX_CAPABILITY_SETS = 256


def _fetched_messages(
    untagged: Sequence[Response], unsolicited: list[Response] | None
) -> list[FetchedMessage]:
    messages: list[FetchedMessage] = []
    for response in untagged:
        if response.type != "FETCH":
            if unsolicited is not None:
                unsolicited.append(response)
            continue
        attributes = fetch_attributes(response)
        uid = attributes.get("UID")
        if not isinstance(uid, int):
            if unsolicited is not None:
                unsolicited.append(response)
            continue  # an unsolicited flag update of another message
        body = attributes.get("BODY[]")
        if body is None:
            body = attributes.get("BODY[]<0>")
        date = attributes.get("INTERNALDATE")
        size = attributes.get("RFC822.SIZE")
        flags = attributes.get("FLAGS")
        messages.append(
            FetchedMessage(
                uid=uid,
                body=body if isinstance(body, bytes) else None,
                internal_date=parse_internal_date(date) if date is not None else None,
                size=size if isinstance(size, int) else None,
                flags=tuple(as_text(f) for f in flags if f is not None) if isinstance(flags, list) else None,
                sequence=response.number or 0,
            )
        )
    return messages


def _shared_capabilities(capabilities: frozenset[str]) -> frozenset[str]:
    shared = _capability_sets.get(capabilities)
    if shared is None:
        if len(_capability_sets) >= _MAX_CAPABILITY_SETS:
            _capability_sets.clear()
        _capability_sets[capabilities] = shared = capabilities
    return shared


class _TaggedBeforeContinuation(Exception):
    def __init__(self, result: CommandResult) -> None:
        super().__init__("tagged response instead of continuation")
        self.result = result


def _b64decode_lenient(text: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return text.encode("utf-8", "replace")


def _sasl_name(user: str) -> bytes:
    """RFC 5801 saslname: ``,`` and ``=`` escaped."""
    return user.replace("=", "=3D").replace(",", "=2C").encode("utf-8")


def _oauth_error_summary(challenges: Sequence[bytes], token: str) -> str:
    """``status=401 scope=mail`` from the server's JSON error challenge (RFC 7628 3.2.2)."""
    for raw in challenges:
        try:
            error = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
        if not isinstance(error, dict):
            continue
        parts = [
            f"{key}={str(error[key])[:100]}"
            for key in ("status", "scope", "schemes")
            if isinstance(error.get(key), str | int)
        ]
        summary = " ".join(parts)
        return summary.replace(token, "***") if token else summary
    return ""


def _describe(status: Response) -> str:
    code = f"[{status.code}] " if status.code else ""
    return (code + status.text)[:300]


def _os_error_text(exc: OSError) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    # trio.open_tcp_stream raises an OSError caused by a group of one error per address tried:
    # name those ("Connection refused"), not just "all attempts ... failed".
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        reasons = dict.fromkeys(e.strerror for e in cause.exceptions if isinstance(e, OSError) and e.strerror)
        if reasons:
            return "; ".join(reasons)
    return str(exc) or type(exc).__name__


def _is_bare_ok_line(data: bytes) -> bool:
    """``data`` is exactly one untagged OK line without a response code."""
    return (
        data.startswith(b"* OK ")
        and data[5:6] != b"["
        and data.endswith(b"\r\n")
        and data.find(b"\n") == len(data) - 1
    )


def _ssl_error_text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return _exc_text(exc)


def _exc_text(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(exc, trio.BrokenResourceError) and cause is not None:
        return _ssl_error_text(cause) if isinstance(cause, ssl.SSLError) else _exc_text(cause)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


__all__ = [
    "Argument",
    "CommandResult",
    "FetchedMessage",
    "IdleSession",
    "ImapClient",
    "ListEntry",
    "Literal",
    "astring",
    "mailbox_argument",
    "quoted",
    "sequence_set",
]
