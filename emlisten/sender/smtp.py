"""The SMTP sender: submits a composed message with aiosmtplib, then stores a copy in Sent over IMAP.

aiosmtplib is an asyncio library: it is created and awaited only inside :meth:`SmtpSender._submit`,
which runs on the process's trio-asyncio loop through :func:`emlisten._bridge.run_asyncio` (one
bridge crossing per message). Its exceptions are converted here to the ``emlisten.sender``
errors; no message ever contains the password or token.

SMTP endpoint
-------------
``MailboxConfig.smtp`` when the credentials carried ``Smtp*`` fields; otherwise the IMAP host
with the submission defaults: port 465 with implicit TLS when the IMAP side uses implicit TLS,
else port 587 with STARTTLS (required when the IMAP side uses STARTTLS; opportunistic when the
IMAP side is plain text, mirroring what the mailbox's owner chose). Certificates are verified like
IMAP (``VerifyCertificate``, system CAs plus ``EMLISTEN_TLS_CA_FILE``).

Authentication: XOAUTH2 with ``AccessToken`` when ``UseOAuth``; otherwise ``UserName`` and
``Password`` with the best mechanism the server offers (PLAIN, LOGIN, CRAM-MD5). A server that
advertises no AUTH at all (a relay trusting the client's address) is used without it.

Transaction: MAIL FROM (with ``SIZE=`` when the server supports SIZE), RCPT TO for every
recipient, DATA. If any recipient is refused, the transaction is reset and nothing is sent
(:class:`SendRejectedRecipients` lists them all): no partial delivery that Creatio could not
report.

Sent copy: APPEND (flag ``\\Seen``) to the folder found by :mod:`emlisten.sender.sent`. A failure
there does not undo the send: :class:`SendResult` says ``saved_to_sent=False`` with a warning.
Skipped when the server saves sent mail itself (Gmail and Microsoft 365/Outlook.com SMTP hosts,
which would otherwise get two copies), or when the credentials say ``"SaveToSent": false``
(emlisten extension field; ``true`` forces the copy).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import aiosmtplib
import trio

from emlisten import _egress
from emlisten._bridge import run_asyncio
from emlisten.errors import ConfigError, FolderNotFoundError, MailSourceError
from emlisten.mail.imap import _tls
from emlisten.mail.imap.source import ImapSource
from emlisten.models import MailboxConfig, Security, ServerEndpoint
from emlisten.sender import (
    SendAuthError,
    SendConnectError,
    SendError,
    SendRejectedError,
    SendRejectedRecipients,
    SendResult,
    SendSizeError,
)
from emlisten.sender.compose import ComposedMessage
from emlisten.sender.sent import find_sent_folder

__all__ = ["SAVE_TO_SENT_FIELD", "SmtpSender", "smtp_endpoint"]

log = logging.getLogger(__name__)

SMTP_TLS_PORT = 465
SMTP_SUBMISSION_PORT = 587
#: Credentials extension field (case-insensitive, kept in ``MailboxConfig.extra``).
SAVE_TO_SENT_FIELD = "SaveToSent"
#: SMTP hosts (and their subdomains) whose servers file sent mail in Sent on their own.
SERVERS_SAVING_SENT = ("gmail.com", "googlemail.com", "office365.com", "outlook.com")


def smtp_endpoint(mailbox: MailboxConfig) -> ServerEndpoint:
    """Where to submit mail for ``mailbox`` (see the module docstring for the defaults)."""

    if mailbox.smtp is not None:
        return mailbox.smtp
    imap = mailbox.imap
    if imap.security is Security.SSL_ON_CONNECT:
        return ServerEndpoint(imap.host, SMTP_TLS_PORT, Security.SSL_ON_CONNECT, imap.verify_certificate)
    security = Security.STARTTLS_WHEN_AVAILABLE if imap.security is Security.NONE else Security.STARTTLS
    return ServerEndpoint(imap.host, SMTP_SUBMISSION_PORT, security, imap.verify_certificate)


def _save_to_sent_wanted(mailbox: MailboxConfig, endpoint: ServerEndpoint) -> bool:
    for key, value in mailbox.extra.items():
        if key.lower() == SAVE_TO_SENT_FIELD.lower() and value not in (None, ""):
            if isinstance(value, str):
                return value.strip().lower() in ("true", "1")
            return bool(value)
    host = endpoint.host.lower()
    return not any(host == server or host.endswith("." + server) for server in SERVERS_SAVING_SENT)


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text[:300]


def _reply(code: int, message: str) -> str:
    return f"{code} {' '.join(message.split())}"


@dataclass(frozen=True, slots=True)
class _Secrets:
    values: tuple[str, ...]

    def scrub(self, text: str) -> str:
        return _scrub(text, self.values)


class SmtpSender:
    """Submits messages for mailboxes; needs the trio-asyncio bridge to be open.

    ``ca_file`` adds trusted CAs (default: ``EMLISTEN_TLS_CA_FILE``). ``imap_source`` opens the
    IMAP session used for the Sent copy (default: a new ``ImapSource`` with the same ``ca_file``).
    """

    def __init__(
        self,
        *,
        ca_file: str | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 30.0,
        local_hostname: str | None = None,
        imap_source: ImapSource | None = None,
        save_to_sent: bool = True,
    ) -> None:
        self.ca_file = ca_file
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        # aiosmtplib would call getfqdn() (a DNS lookup) on every connection.
        self.local_hostname = local_hostname or socket.gethostname() or "localhost"
        self.imap_source = imap_source or ImapSource(ca_file=ca_file, connect_timeout=connect_timeout)
        self.save_to_sent_enabled = save_to_sent

    # -- the whole operation -----------------------------------------------------------------

    async def send_message(self, mailbox: MailboxConfig, message: ComposedMessage) -> SendResult:
        """Send, then store the Sent copy. Raises a SendError when the message did not leave."""

        await self.send(mailbox, message.data, message.envelope_from, message.recipients)
        log.info(
            "mailbox %s: sent %s to %d recipient(s)", mailbox.id, message.message_id, len(message.recipients)
        )
        endpoint = smtp_endpoint(mailbox)
        if not (self.save_to_sent_enabled and _save_to_sent_wanted(mailbox, endpoint)):
            return SendResult(message.message_id, saved_to_sent=False, warning=None)
        try:
            folder, uid = await self.save_to_sent(mailbox, message.data)
        except MailSourceError as error:
            warning = f"sent, but the copy was not saved to Sent: {error}"
            log.warning("mailbox %s: %s", mailbox.id, warning)
            return SendResult(message.message_id, saved_to_sent=False, warning=warning)
        return SendResult(message.message_id, saved_to_sent=True, sent_folder=folder, sent_uid=uid)

    async def save_to_sent(self, mailbox: MailboxConfig, message: bytes) -> tuple[str, int | None]:
        """APPEND ``message`` (flagged ``\\Seen``) to the Sent folder: (folder, uid or None)."""

        client = await self.imap_source.connect(mailbox)
        try:
            folder = await find_sent_folder(client)
            if folder is None:
                raise FolderNotFoundError("no Sent folder found (no \\Sent attribute, no known name)")
            uid = await client.append(folder, message, flags=("\\Seen",))
        finally:
            await client.close(timeout=self.imap_source.settings.close_timeout)
        return folder, uid

    # -- SMTP --------------------------------------------------------------------------------

    async def send(
        self, mailbox: MailboxConfig, message: bytes, envelope_from: str, recipients: list[str]
    ) -> None:
        """Submit ``message`` over SMTP. Raises a SendError subclass when it was not accepted."""

        if not recipients:
            raise SendRejectedRecipients({}, "no recipients")
        endpoint = smtp_endpoint(mailbox)
        try:
            ca_file = self.ca_file if self.ca_file is not None else _tls.ca_file_from_env()
            context = _tls.context_for(endpoint.verify_certificate, ca_file)
        except ConfigError as error:
            raise SendConnectError(f"TLS setup failed: {error}", phase="tls") from None
        secrets = _Secrets(tuple(s for s in (mailbox.password, mailbox.access_token) if s))
        # The asyncio side has its own timeouts per step; this bounds the whole submission.
        with trio.fail_after(self.connect_timeout + 4 * self.timeout):
            try:
                # Resolved and checked once here; the session connects to these very addresses.
                addresses = await _egress.resolve_checked(endpoint.host, endpoint.port, "mail")
            except OSError as error:  # DNS failure, or outside EMLISTEN_MAIL_ALLOW
                raise _connect_error(error, "connect", f"{endpoint.host}:{endpoint.port}") from None
            try:
                await run_asyncio(
                    partial(
                        self._submit,
                        endpoint=endpoint,
                        context=context,
                        mailbox=mailbox,
                        message=message,
                        envelope_from=envelope_from,
                        recipients=recipients,
                        secrets=secrets,
                        addresses=addresses,
                    )
                )
            except trio.TooSlowError:
                raise SendConnectError(
                    f"SMTP submission to {endpoint.host}:{endpoint.port} timed out", phase="timeout"
                ) from None

    async def _submit(
        self,
        *,
        endpoint: ServerEndpoint,
        context: ssl.SSLContext,
        mailbox: MailboxConfig,
        message: bytes,
        envelope_from: str,
        recipients: list[str],
        secrets: _Secrets,
        addresses: Sequence[str],
    ) -> None:
        """Runs on the asyncio loop: one SMTP session, one transaction, to one of ``addresses``
        (checked by emlisten._egress; TLS still verifies ``endpoint.host``)."""

        where = f"{endpoint.host}:{endpoint.port}"
        smtp = aiosmtplib.SMTP(
            hostname=endpoint.host,  # with a socket given: only the name TLS verifies
            use_tls=endpoint.security is Security.SSL_ON_CONNECT,
            start_tls=False,
            tls_context=context,
            timeout=self.timeout,
            local_hostname=self.local_hostname,
        )
        phase = "connect"
        try:
            try:
                connected = await _open_socket(addresses, endpoint.port, self.connect_timeout)
                await smtp.connect(timeout=self.connect_timeout, sock=connected)
                phase = "EHLO"
                await smtp.ehlo()
                if endpoint.security in (Security.STARTTLS, Security.STARTTLS_WHEN_AVAILABLE):
                    if smtp.supports_extension("starttls"):
                        phase = "starttls"
                        await smtp.starttls(tls_context=context)
                        await smtp.ehlo()  # the capabilities change after STARTTLS (AUTH often appears)
                    elif endpoint.security is Security.STARTTLS:
                        raise SendConnectError(f"{where} does not offer STARTTLS", phase="starttls")
                phase = "AUTH"
                await self._authenticate(smtp, mailbox, where, secrets)
                phase = "MAIL FROM"
                await self._transaction(
                    smtp, message, envelope_from, recipients, where=where, secrets=secrets
                )
            except SendError:
                raise
            except aiosmtplib.SMTPException as error:
                raise _convert(
                    error, phase, where=where, secrets=secrets, size=len(message), limit=_size_limit(smtp)
                ) from None
            except (OSError, ssl.SSLError) as error:
                raise _connect_error(error, phase, where) from None
            except ValueError as error:  # aiosmtplib refuses addresses it cannot send safely
                raise SendRejectedError(f"cannot send to or from this address: {error}") from None
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await smtp.quit()  # the message was accepted; a failed QUIT changes nothing
        finally:
            smtp.close()  # also the socket: asyncio owns it from connect() on, even when that fails
            # close() only schedules the socket's release: let the loop run it now.
            await asyncio.sleep(0)

    async def _authenticate(
        self, smtp: aiosmtplib.SMTP, mailbox: MailboxConfig, where: str, secrets: _Secrets
    ) -> None:
        if mailbox.use_oauth:
            if "xoauth2" not in smtp.server_auth_methods:
                raise SendAuthError(f"{where} does not offer AUTH XOAUTH2 (needed for OAuth)")
            raw = f"user={mailbox.user_name}\x01auth=Bearer {mailbox.access_token}\x01\x01"
            encoded = base64.b64encode(raw.encode("utf-8"))
            response = await smtp.execute_command(b"AUTH", b"XOAUTH2", encoded)
            if response.code == 334:
                # The server's error details come as a challenge; an empty reply ends the exchange.
                response = await smtp.execute_command(b"")
            if response.code != 235:
                raise SendAuthError(
                    f"AUTH XOAUTH2 rejected by {where}: "
                    + secrets.scrub(_reply(response.code, response.message)),
                    code=response.code,
                )
            return
        if not smtp.supports_extension("auth"):
            log.debug("%s offers no AUTH: sending without authentication", where)
            return
        if not smtp.supported_auth_methods:
            raise SendAuthError(
                f"{where} offers no supported AUTH mechanism "
                f"({', '.join(sorted(smtp.server_auth_methods)) or 'none'})"
            )
        try:
            await smtp.login(mailbox.user_name, mailbox.password)
        except aiosmtplib.SMTPAuthenticationError as error:
            raise SendAuthError(
                f"AUTH rejected by {where}: {secrets.scrub(_reply(error.code, error.message))}",
                code=error.code,
            ) from None

    async def _transaction(
        self,
        smtp: aiosmtplib.SMTP,
        message: bytes,
        envelope_from: str,
        recipients: list[str],
        *,
        where: str,
        secrets: _Secrets,
    ) -> None:
        options = [f"SIZE={len(message)}"] if smtp.supports_extension("size") else []
        await smtp.mail(envelope_from, options=options)
        refused: dict[str, str] = {}
        for recipient in recipients:
            try:
                await smtp.rcpt(recipient)
            except aiosmtplib.SMTPRecipientRefused as error:
                refused[recipient] = secrets.scrub(_reply(error.code, error.message))
        if refused:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await smtp.rset()
            listed = "; ".join(f"{address}: {reply}" for address, reply in refused.items())
            raise SendRejectedRecipients(
                refused,
                f"{where} refused {len(refused)} of {len(recipients)} recipient(s),"
                f" nothing was sent: {listed}",
            )
        await smtp.data(message)


async def _open_socket(addresses: Sequence[str], port: int, time_limit: float) -> socket.socket:
    """A connected socket to the first of ``addresses`` that answers (asyncio side)."""
    loop = asyncio.get_running_loop()
    last: OSError = OSError("no address to connect to")
    for address in addresses:
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (address, port)), time_limit)
            return sock
        except OSError as error:  # TimeoutError included
            sock.close()
            last = error
    raise last


def _size_limit(smtp: aiosmtplib.SMTP) -> int | None:
    value = smtp.esmtp_extensions.get("size", "") if smtp.esmtp_extensions else ""
    return int(value) if value.strip().isdigit() and int(value) > 0 else None


def _connect_error(error: BaseException, phase: str, where: str) -> SendConnectError:
    cause: BaseException = error
    while cause.__cause__ is not None and not isinstance(cause, ssl.SSLError | socket.gaierror):
        cause = cause.__cause__
    if isinstance(cause, socket.gaierror):
        host = where.rsplit(":", 1)[0]
        return SendConnectError(f"DNS lookup of {host} failed: {cause.strerror or cause}", phase="dns")
    if isinstance(cause, ssl.SSLCertVerificationError):
        detail = f"certificate verification failed: {cause.verify_message or cause.reason}"
        tls_phase = "starttls" if phase == "starttls" else "tls"
        return SendConnectError(f"TLS handshake with {where} failed: {detail}", phase=tls_phase)
    if isinstance(cause, ssl.SSLError):
        tls_phase = "starttls" if phase == "starttls" else "tls"
        return SendConnectError(
            f"TLS handshake with {where} failed: {cause.reason or cause}", phase=tls_phase
        )
    if phase == "starttls":
        return SendConnectError(f"STARTTLS with {where} failed: {_text(cause)}", phase="starttls")
    if phase == "connect":
        return SendConnectError(f"TCP connect to {where} failed: {_text(cause)}", phase="connect")
    return SendConnectError(
        f"connection to {where} lost during {phase}: {_text(cause)}", phase="disconnected"
    )


def _text(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _convert(
    error: aiosmtplib.SMTPException,
    phase: str,
    *,
    where: str,
    secrets: _Secrets,
    size: int,
    limit: int | None,
) -> SendError:
    if isinstance(error, aiosmtplib.SMTPTimeoutError):
        return SendConnectError(f"{where} did not answer in time during {phase}", phase="timeout")
    if isinstance(error, aiosmtplib.SMTPConnectResponseError):
        return SendConnectError(
            f"{where} refused the connection: {secrets.scrub(_reply(error.code, error.message))}",
            phase="connect",
            code=error.code,
        )
    if isinstance(error, aiosmtplib.SMTPConnectError | aiosmtplib.SMTPServerDisconnected):
        cause = error.__cause__
        if cause is not None:
            return _connect_error(cause, phase, where)
        if isinstance(error, aiosmtplib.SMTPServerDisconnected):
            return SendConnectError(f"{where} closed the connection during {phase}", phase="disconnected")
        return SendConnectError(f"connecting to {where} failed: {secrets.scrub(str(error))}", phase="connect")
    if isinstance(error, aiosmtplib.SMTPResponseException):
        reply = secrets.scrub(_reply(error.code, error.message))
        if error.code == 552 or (error.code == 452 and "size" in error.message.lower()):
            limit_text = f" (limit {limit} bytes)" if limit else ""
            return SendSizeError(
                f"{where} refused the message of {size} bytes as too large{limit_text}: {reply}",
                limit=limit,
                code=error.code,
            )
        if error.code in (530, 535, 538) or (phase == "AUTH"):
            return SendAuthError(f"{where} requires authentication: {reply}", code=error.code)
        what = "the sender" if isinstance(error, aiosmtplib.SMTPSenderRefused) else "the message"
        if phase == "EHLO":
            what = "EHLO"
        return SendRejectedError(f"{where} refused {what}: {reply}", code=error.code)
    if phase == "AUTH":
        return SendAuthError(f"authentication with {where} failed: {secrets.scrub(str(error))}")
    return SendRejectedError(f"SMTP {phase} with {where} failed: {secrets.scrub(str(error))}")
