"""Check a mailbox's settings the way Creatio's ``ValidateCredentials`` wants: precisely.

:func:`validate` tries, in order, and stops at the first failure:

1. IMAP: DNS lookup of the host, TCP connect, TLS (on connect or STARTTLS), login (password, or
   OAuth token when ``use_oauth``), then EXAMINE of every folder in ``FolderIds``.
2. SMTP, when asked (``check_smtp``) and the mailbox has SMTP settings (``MailboxConfig.smtp``):
   a small Trio-native probe: DNS, TCP connect, greeting, EHLO, TLS (on connect, or STARTTLS),
   AUTH (PLAIN, else LOGIN; XOAUTH2 with the token when ``use_oauth``), QUIT. No mail is sent.

The result says what failed in words (``cannot resolve imap.example.com``, ``connection to
127.0.0.1:143 refused``, ``TLS handshake ... certificate verification failed``, ``authentication
rejected``, ``folder 'X' not found``) and, machine-readably, in ``data``::

    {"Stage": "imap" | "smtp", "Category": "dns" | "connect" | "timeout" | "tls" |
     "authentication" | "token" | "folder" | "protocol", "Server": "host:port"}

On success ``data`` is ``{"Imap": {"Server", "Folders"}, "Smtp": {"Server", "Authenticated"}
| null}``. Passwords and tokens never appear in messages.

EWS and Graph mailboxes (``protocol``) are checked in their own protocol, never IMAP, with the
same answer shape (``Stage`` ``ews`` or ``graph``) and within ``time_limit`` (connecting within
``connect_timeout``): both are settings (``EMLISTEN_VALIDATE_TIMEOUT_SECONDS``,
``EMLISTEN_VALIDATE_CONNECT_TIMEOUT_SECONDS``), so a server that answers is never waited on for
longer than it takes to answer.

- EWS: DNS, then (without an EWS URL) Autodiscover, then one ``GetFolder`` of every folder in
  ``FolderIds`` (the inbox when empty) through the source's authenticated connections (Basic,
  NTLM or Negotiate as the server asks). 401/403 -> ``authentication`` (``token`` with OAuth);
  ``ErrorFolderNotFound``/``ErrorInvalidIdMalformed`` -> ``folder``; impersonation refused ->
  ``authentication``; refused/unreachable -> ``connect``; a TLS failure -> ``tls``; anything not
  EWS (another HTTP status, not SOAP) -> ``protocol``. Success: ``{"Ews": {"Server", "Folders",
  "Authentication"}, "Smtp": null}`` (``Authentication``: ``basic``, ``ntlm``, ``negotiate`` or
  ``bearer``).
- Graph: DNS, then ``GET /users/{mailbox}/mailFolders/{folder}`` for each folder (``inbox``
  when empty). 401 -> ``token`` (``authentication`` when the app-only token request itself is
  refused); 403 and an unknown user -> ``authentication``; 404 on a folder -> ``folder``.
  Success: ``{"Graph": {"Server", "Folders"}, "Smtp": null}``.
"""

from __future__ import annotations

import base64
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import trio

from emlisten import _egress
from emlisten.errors import (
    FolderNotFoundError,
    MailAuthError,
    MailConnectError,
    MailSourceError,
    MailTokenRejectedError,
)
from emlisten.mail.ews import _soap
from emlisten.mail.ews.source import EwsClient, EwsSource
from emlisten.mail.graph.source import GraphSource, folder_segment
from emlisten.mail.imap import _tls
from emlisten.mail.imap.source import ImapSource
from emlisten.models import INBOX, MailboxConfig, Security, ServerEndpoint

__all__ = ["CheckFailed", "ValidationResult", "probe_smtp", "validate"]

#: Longest SMTP reply accepted (RFC 5321 allows 512 per line; servers list many extensions).
_MAX_REPLY_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ValidationResult:
    is_valid: bool
    message: str
    data: dict[str, Any] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        """Creatio's ``{"IsValid", "Message", "Data"}``."""
        return {"IsValid": self.is_valid, "Message": self.message, "Data": self.data}


class CheckFailed(Exception):
    """One check failed: ``category`` as in ``data["Category"]``, ``message`` for people."""

    def __init__(self, category: str, message: str) -> None:
        super().__init__(message)
        self.category = category
        self.message = message


async def validate(
    mailbox: MailboxConfig,
    source: ImapSource,
    *,
    check_smtp: bool,
    ews: EwsSource | None = None,
    graph: GraphSource | None = None,
    time_limit: float = 10.0,
    connect_timeout: float = 5.0,
) -> ValidationResult:
    """``source`` checks IMAP mailboxes; ``ews``/``graph`` (default: new sources) the others."""
    if mailbox.protocol == "ews":
        return await validate_ews(
            mailbox, ews or EwsSource(), time_limit=time_limit, connect_timeout=connect_timeout
        )
    if mailbox.protocol == "graph":
        return await validate_graph(
            mailbox, graph or GraphSource(), time_limit=time_limit, connect_timeout=connect_timeout
        )
    imap = mailbox.imap
    imap_server = _where(imap)
    try:
        await _resolve(imap.host, imap.port)
        folders = await _check_imap(mailbox, source)
    except CheckFailed as failure:
        return _failed("imap", failure, imap_server)
    except MailSourceError as error:
        return _failed("imap", _classify_imap(error), imap_server)
    data: dict[str, Any] = {"Imap": {"Server": imap_server, "Folders": folders}, "Smtp": None}
    smtp = mailbox.smtp
    if check_smtp and smtp is not None:
        try:
            await _resolve(smtp.host, smtp.port)
            authenticated = await probe_smtp(
                smtp,
                mailbox.user_name,
                mailbox.access_token if mailbox.use_oauth else mailbox.password,
                use_oauth=mailbox.use_oauth,
                ca_file=source.ca_file,
                time_limit=source.settings.connect_timeout,
            )
        except CheckFailed as failure:
            return _failed("smtp", failure, _where(smtp))
        data["Smtp"] = {"Server": _where(smtp), "Authenticated": authenticated}
        return ValidationResult(True, "IMAP and SMTP settings are valid", data)
    return ValidationResult(True, "IMAP settings are valid", data)


# ---------------------------------------------------------------------------------------------
# EWS and Graph

#: EWS response codes that mean "these credentials may not open this mailbox".
_EWS_ACCESS_CODES = frozenset(
    {
        "ErrorAccessDenied",
        "ErrorImpersonateUserDenied",
        "ErrorImpersonationDenied",
        "ErrorNonExistentMailbox",
        "ErrorMailboxMoveInProgress",
        "ErrorInvalidSmtpAddress",
    }
)
_EWS_FOLDER_CODES = frozenset({"ErrorFolderNotFound", "ErrorInvalidIdMalformed", "ErrorInvalidFolderId"})


def _url_where(url: str, fallback: ServerEndpoint) -> str:
    parts = urlsplit(url)
    if not parts.hostname:
        return _where(fallback)
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    return _where(ServerEndpoint(parts.hostname, port, Security.NONE))


def _http_failure(error: httpx.HTTPError, where: str, connect_timeout: float) -> CheckFailed:
    """A category for a transport error: TLS, or not reachable (refused, timed out, reset)."""
    denied = _egress.denial(error)
    if denied is not None:
        return CheckFailed("connect", f"{where}: {denied}")
    cause: BaseException | None = error
    for _ in range(20):  # short chains; the bound only guards against a cycle
        if cause is None:
            break
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = cause.verify_message or cause.reason
            return CheckFailed(
                "tls", f"TLS handshake with {where} failed: certificate verification failed: {reason}"
            )
        if isinstance(cause, ssl.SSLError):
            return CheckFailed("tls", f"TLS handshake with {where} failed: {cause.reason or cause}")
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, httpx.ConnectTimeout):
        return CheckFailed("connect", f"connection to {where} timed out after {connect_timeout:g}s")
    if isinstance(error, httpx.TimeoutException):
        return CheckFailed("timeout", f"{where} accepted the connection but did not answer in time")
    if isinstance(error, httpx.ConnectError):
        return CheckFailed("connect", f"connection to {where} failed: {_innermost_reason(error)}")
    return CheckFailed("connect", f"connection to {where} lost: {type(error).__name__}")


def _innermost_reason(error: BaseException) -> str:
    """The innermost OS reason (e.g. "Connection refused") behind an httpx error."""
    cause: BaseException = error
    for _ in range(20):  # short chains; the bound only guards against a cycle
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        if isinstance(cause, BaseExceptionGroup):  # one error per address tried
            return "; ".join(dict.fromkeys(_innermost_reason(e) for e in cause.exceptions))
        # httpcore re-raises transport errors inside ``except`` (context, not cause).
        inner = cause.__cause__ or cause.__context__
        if inner is None:
            break
        cause = inner
    return str(cause)[:200] or type(error).__name__


def _classify_exchange(error: MailSourceError) -> CheckFailed:
    """Errors raised before the check's own request (Autodiscover, the app-only token)."""
    text = str(error)
    if isinstance(error, MailTokenRejectedError):
        return CheckFailed("token", f"OAuth token rejected: {text}")
    if isinstance(error, MailAuthError):
        return CheckFailed("authentication", f"authentication failed: {text}")
    if isinstance(error, FolderNotFoundError):
        return CheckFailed("folder", text)
    if isinstance(error, MailConnectError):
        return CheckFailed("connect", text)
    return CheckFailed("protocol", text)


async def validate_ews(
    mailbox: MailboxConfig, source: EwsSource, *, time_limit: float, connect_timeout: float
) -> ValidationResult:
    where = _url_where(mailbox.service_url, mailbox.imap)
    folders = list(mailbox.folders or (INBOX,))
    try:
        with trio.fail_after(time_limit):
            host = urlsplit(mailbox.service_url).hostname or mailbox.imap.host
            await _resolve(host, mailbox.imap.port)
            try:
                mailbox = await source.resolve(mailbox)
            except MailSourceError as error:
                raise _classify_exchange(error) from None
            where = _url_where(mailbox.service_url, mailbox.imap)
            scheme = await _check_ews(
                mailbox, source, folders, where=where, connect_timeout=connect_timeout, time_limit=time_limit
            )
    except trio.TooSlowError:
        return _failed("ews", CheckFailed("timeout", f"no answer from {where} within {time_limit:g}s"), where)
    except CheckFailed as failure:
        return _failed("ews", failure, where)
    data: dict[str, Any] = {
        "Ews": {"Server": where, "Folders": folders, "Authentication": scheme},
        "Smtp": None,
    }
    return ValidationResult(True, "EWS settings are valid", data)


async def _check_ews(
    mailbox: MailboxConfig,
    source: EwsSource,
    folders: list[str],
    *,
    where: str,
    connect_timeout: float,
    time_limit: float,
) -> str:
    """One GetFolder of every folder; the authentication scheme that worked."""
    timeouts = httpx.Timeout(time_limit, connect=connect_timeout)
    async with source._http(mailbox, timeouts=timeouts) as http:
        client = EwsClient(http, mailbox, source.settings)
        try:
            response = await http.post(
                client.url, content=client._envelope(_soap.get_folders(folders)), headers=client._headers
            )
        except httpx.HTTPError as error:
            raise _http_failure(error, where, connect_timeout) from None
        if response.status_code in (401, 403):
            try:
                client._check_status(response)
            except MailSourceError as error:
                raise _classify_exchange(error) from None
        if response.status_code not in (200, 500):
            raise CheckFailed(
                "protocol", f"{where} answered HTTP {response.status_code}: is this the EWS URL?"
            )
        try:
            root = _soap.parse(response.content)
            fault = _soap.fault_of(root)
            if fault is not None:
                raise _ews_code_failure(fault.code, fault.message, bearer=mailbox.use_oauth)
            messages = _soap.response_messages(root)
        except MailSourceError as error:
            raise CheckFailed("protocol", f"{where} did not answer as EWS does: {error}") from None
        missing = [f for f, m in zip(folders, messages, strict=False) if m.code in _EWS_FOLDER_CODES]
        if missing:
            names = ", ".join(repr(f) for f in missing)
            noun = "folder" if len(missing) == 1 else "folders"
            raise CheckFailed("folder", f"{noun} {names} not found")
        for message in messages:
            if not message.ok:
                raise _ews_code_failure(message.code, message.message, bearer=mailbox.use_oauth)
        if mailbox.use_oauth:
            return "bearer"
        return source.auth_scheme(client.url)


def _ews_code_failure(code: str, message: str, *, bearer: bool) -> CheckFailed:
    text = f"EWS {code}" + (f": {message}" if message else "")
    if code in _EWS_ACCESS_CODES:
        return CheckFailed("token" if bearer and code == "ErrorAccessDenied" else "authentication", text)
    if code in _EWS_FOLDER_CODES:
        return CheckFailed("folder", text)
    return CheckFailed("protocol", text)


async def validate_graph(
    mailbox: MailboxConfig, source: GraphSource, *, time_limit: float, connect_timeout: float
) -> ValidationResult:
    folders = list(mailbox.folders or (INBOX,))
    async with source.session(mailbox) as session:
        where = _url_where(session.origin, mailbox.imap)
        try:
            with trio.fail_after(time_limit):
                await _resolve(urlsplit(session.origin).hostname or "", mailbox.imap.port)
                timeouts = httpx.Timeout(time_limit, connect=connect_timeout)
                try:
                    authorization = await session._authorization()
                except MailSourceError as error:
                    raise _classify_exchange(error) from None
                missing: list[str] = []
                for folder in folders:
                    url = session.url(
                        f"/users/{session.user}/mailFolders/{quote(folder_segment(folder), safe='')}"
                    )
                    try:
                        response = await session.http.get(
                            url + "?$select=id",
                            headers={"Authorization": authorization, "Accept": "application/json"},
                            timeout=timeouts,
                        )
                    except httpx.HTTPError as error:
                        raise _http_failure(error, where, connect_timeout) from None
                    code = _graph_code(response)
                    if response.status_code == 200:
                        continue
                    if response.status_code == 401:
                        category = "token" if mailbox.use_oauth else "authentication"
                        raise CheckFailed(category, f"Graph rejected the token (HTTP 401 {code})".strip())
                    if response.status_code == 403 or code in (
                        "ErrorInvalidUser",
                        "MailboxNotEnabledForRESTAPI",
                    ):
                        raise CheckFailed(
                            "authentication",
                            f"Graph refused access to {mailbox.sender_email or mailbox.user_name!r} "
                            f"(HTTP {response.status_code} {code})",
                        )
                    if response.status_code == 404:
                        missing.append(folder)
                        continue
                    raise CheckFailed(
                        "protocol", f"{where} answered HTTP {response.status_code} {code}".strip()
                    )
                if missing:
                    names = ", ".join(repr(f) for f in missing)
                    noun = "folder" if len(missing) == 1 else "folders"
                    raise CheckFailed("folder", f"{noun} {names} not found")
        except trio.TooSlowError:
            failure = CheckFailed("timeout", f"no answer from {where} within {time_limit:g}s")
            return _failed("graph", failure, where)
        except CheckFailed as failure:
            return _failed("graph", failure, where)
    data: dict[str, Any] = {"Graph": {"Server": where, "Folders": folders}, "Smtp": None}
    return ValidationResult(True, "Graph settings are valid", data)


def _graph_code(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", {}).get("code", ""))
    except (ValueError, AttributeError):
        return ""


def _where(endpoint: ServerEndpoint) -> str:
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    return f"{host}:{endpoint.port}"


def _failed(stage: str, failure: CheckFailed, server: str) -> ValidationResult:
    return ValidationResult(
        False,
        f"{stage.upper()}: {failure.message}",
        {"Stage": stage, "Category": failure.category, "Server": server},
    )


async def _resolve(host: str, port: int) -> None:
    try:
        await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CheckFailed("dns", f"cannot resolve {host}: {exc.strerror or exc}") from None


async def _check_imap(mailbox: MailboxConfig, source: ImapSource) -> list[str]:
    client = await source.connect(mailbox)
    try:
        missing: list[str] = []
        for folder in mailbox.folders:
            try:
                await client.examine(folder)
            except FolderNotFoundError:
                missing.append(folder)
        if missing:
            names = ", ".join(repr(f) for f in missing)
            noun = "folder" if len(missing) == 1 else "folders"
            raise CheckFailed("folder", f"{noun} {names} not found (or not selectable)")
        return list(mailbox.folders)
    finally:
        await client.close(timeout=source.settings.close_timeout)


def _classify_imap(error: MailSourceError) -> CheckFailed:
    """A category for the IMAP client's errors (its messages name the phase that failed)."""
    text = str(error)
    if isinstance(error, MailTokenRejectedError):
        return CheckFailed("token", f"OAuth token rejected: {text}")
    if isinstance(error, MailAuthError):
        return CheckFailed("authentication", f"authentication failed: {text}")
    if isinstance(error, FolderNotFoundError):
        return CheckFailed("folder", text)
    if isinstance(error, MailConnectError):
        if "timed out" in text or "no answer" in text:
            return CheckFailed("timeout", text)
        if text.startswith("DNS lookup"):
            return CheckFailed("dns", text)
        if text.startswith("TLS") or "STARTTLS" in text:
            return CheckFailed("tls", text)
        return CheckFailed("connect", text)
    return CheckFailed("protocol", text)


# ---------------------------------------------------------------------------------------------
# SMTP probe


async def probe_smtp(
    endpoint: ServerEndpoint,
    user: str,
    secret: str,
    *,
    use_oauth: bool = False,
    ca_file: str | None = None,
    time_limit: float = 30.0,
    local_name: str = "emlisten.localdomain",
) -> bool:
    """Connect, EHLO, TLS, AUTH, QUIT. True when it authenticated, False when the server offers
    no AUTH at all (an open relay or IP-based submission). Raises CheckFailed otherwise."""
    where = _where(endpoint)
    phase = "TCP connect"
    try:
        with trio.fail_after(time_limit):
            try:
                stream: trio.abc.Stream = await _egress.open_tcp_stream(endpoint.host, endpoint.port, "mail")
            except OSError as exc:
                raise CheckFailed("connect", f"connection to {where} failed: {_os_text(exc)}") from None
            session = _SmtpSession(stream, where)
            try:
                if endpoint.security is Security.SSL_ON_CONNECT:
                    phase = "TLS handshake"
                    await session.start_tls(endpoint, ca_file)
                phase = "greeting"
                await session.expect(220, "greeting")
                phase = "EHLO"
                extensions = await session.ehlo(local_name)
                if endpoint.security in (Security.STARTTLS, Security.STARTTLS_WHEN_AVAILABLE):
                    if "STARTTLS" in extensions:
                        phase = "STARTTLS"
                        await session.command(b"STARTTLS", 220, "STARTTLS")
                        await session.start_tls(endpoint, ca_file)
                        extensions = await session.ehlo(local_name)
                    elif endpoint.security is Security.STARTTLS:
                        raise CheckFailed("tls", f"{where} does not offer STARTTLS")
                phase = "AUTH"
                authenticated = await session.authenticate(extensions, user, secret, use_oauth)
                phase = "QUIT"
                await session.quit()
                return authenticated
            finally:
                await trio.aclose_forcefully(session.stream)
    except trio.TooSlowError:
        raise CheckFailed("timeout", f"{phase} to {where} timed out after {time_limit:g}s") from None


class _SmtpSession:
    def __init__(self, stream: trio.abc.Stream, where: str) -> None:
        self.stream = stream
        self.where = where
        self._buffer = bytearray()

    async def start_tls(self, endpoint: ServerEndpoint, ca_file: str | None) -> None:
        try:
            context = _tls.context_for(
                endpoint.verify_certificate, ca_file if ca_file is not None else _tls.ca_file_from_env()
            )
        except Exception as exc:
            raise CheckFailed("tls", f"TLS setup for {self.where} failed: {exc}") from None
        tls = trio.SSLStream(self.stream, context, server_hostname=endpoint.host)
        self.stream = tls
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
            if isinstance(cause, ssl.SSLCertVerificationError):
                detail = f"certificate verification failed: {cause.verify_message or cause.reason}"
            elif isinstance(cause, ssl.SSLError):
                detail = cause.reason or str(cause)
            else:
                detail = "connection closed"
            raise CheckFailed("tls", f"TLS handshake with {self.where} failed: {detail}") from None

    async def _send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise CheckFailed("connect", f"connection to {self.where} lost: {_os_text(exc)}") from None

    async def _line(self) -> bytes:
        while b"\n" not in self._buffer:
            if len(self._buffer) > _MAX_REPLY_BYTES:
                raise CheckFailed("protocol", f"{self.where} sent an overlong reply")
            try:
                data = await self.stream.receive_some(4096)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise CheckFailed("connect", f"connection to {self.where} lost: {_os_text(exc)}") from None
            if not data:
                raise CheckFailed("connect", f"{self.where} closed the connection")
            self._buffer += data
        end = self._buffer.index(b"\n") + 1
        line = bytes(self._buffer[:end])
        del self._buffer[:end]
        return line.rstrip(b"\r\n")

    async def reply(self) -> tuple[int, list[str]]:
        """One (possibly multi-line) reply: its code and text lines."""
        lines: list[str] = []
        while True:
            line = await self._line()
            if len(line) < 3 or not line[:3].isdigit():
                raise CheckFailed("protocol", f"{self.where} sent a malformed SMTP reply")
            lines.append(line[4:].decode("utf-8", "replace"))
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]), lines

    async def expect(self, code: int, what: str) -> list[str]:
        got, lines = await self.reply()
        if got != code:
            category = "connect" if what == "greeting" else "protocol"
            raise CheckFailed(category, f"{what} refused by {self.where}: {got} {' '.join(lines)[:200]}")
        return lines

    async def command(self, line: bytes, code: int, what: str) -> list[str]:
        await self._send(line + b"\r\n")
        return await self.expect(code, what)

    async def ehlo(self, local_name: str) -> dict[str, str]:
        lines = await self.command(b"EHLO " + local_name.encode("ascii"), 250, "EHLO")
        extensions: dict[str, str] = {}
        for text in lines[1:]:
            keyword, _, params = text.partition(" ")
            extensions[keyword.upper()] = params.upper()
        return extensions

    async def authenticate(self, extensions: dict[str, str], user: str, secret: str, use_oauth: bool) -> bool:
        if "AUTH" not in extensions:
            await self._submission_without_auth(user)
            return False
        mechanisms = set(extensions["AUTH"].split())
        if use_oauth:
            if "XOAUTH2" not in mechanisms:
                raise CheckFailed("authentication", f"{self.where} does not offer XOAUTH2 for OAuth")
            payload = b"user=" + user.encode() + b"\x01auth=Bearer " + secret.encode() + b"\x01\x01"
            await self._send(b"AUTH XOAUTH2 " + base64.b64encode(payload) + b"\r\n")
            code, lines = await self.reply()
            if code == 334:  # the error challenge (JSON): answer empty to get the final reply
                await self._send(b"\r\n")
                code, lines = await self.reply()
            category = "token"
        elif "PLAIN" in mechanisms:
            payload = b"\0" + user.encode() + b"\0" + secret.encode()
            await self._send(b"AUTH PLAIN " + base64.b64encode(payload) + b"\r\n")
            code, lines = await self.reply()
            category = "authentication"
        elif "LOGIN" in mechanisms:
            await self.command(b"AUTH LOGIN", 334, "AUTH LOGIN")
            await self.command(base64.b64encode(user.encode()), 334, "AUTH LOGIN")
            await self._send(base64.b64encode(secret.encode()) + b"\r\n")
            code, lines = await self.reply()
            category = "authentication"
        else:
            offered = " ".join(sorted(mechanisms)) or "none"
            raise CheckFailed("authentication", f"{self.where} offers no usable AUTH mechanism ({offered})")
        if code != 235:
            text = " ".join(lines)[:200]
            if secret:
                text = text.replace(secret, "***")
            raise CheckFailed(category, f"authentication rejected by {self.where}: {code} {text}")
        return True

    async def _submission_without_auth(self, user: str) -> None:
        """No AUTH offered: fine if the server takes mail anyway (IP-based submission); a
        server that wants authentication it does not offer here answers MAIL FROM with 530."""
        sender = user if "@" in user else ""
        await self._send(b"MAIL FROM:<" + sender.encode("utf-8", "replace") + b">\r\n")
        code, lines = await self.reply()
        if code != 250:
            raise CheckFailed(
                "authentication",
                f"{self.where} offers no AUTH but refuses mail without it: {code} {' '.join(lines)[:200]}",
            )
        await self.command(b"RSET", 250, "RSET")

    async def quit(self) -> None:
        # Some servers close at once after QUIT: any answer (or none) is fine.
        try:
            await self._send(b"QUIT\r\n")
            await self.reply()
        except CheckFailed:
            pass


def _os_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):  # trio.open_tcp_stream: one error per address
        reasons = dict.fromkeys(_os_text(e) for e in cause.exceptions)
        return "; ".join(reasons)
    if cause is not None:
        return _os_text(cause)
    return str(exc) or type(exc).__name__
