"""A real SMTP server for tests: aiosmtpd in a thread with its own asyncio loop.

``SmtpServer(mode="plain" | "starttls" | "tls")`` listens on a free loopback port, requires AUTH
(PLAIN/LOGIN against ``users``; XOAUTH2 against ``oauth_tokens``), records every accepted message,
refuses the recipients in ``rejected`` with 550 and enforces ``size_limit`` (EHLO SIZE, 552).
TLS uses a private CA made with openssl (``make_tls_files``, as the Dovecot fixture does);
clients trust ``ca_file``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shutil
import ssl
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import trio
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.servers.dovecot import free_port, make_tls_files

Mode = Literal["plain", "starttls", "tls"]


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    auth_user: str | None
    mail_options: list[str]


class _Handler:
    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_RCPT(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address.lower() in self.server.rejected:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        auth = session.auth_data
        user = auth.decode() if isinstance(auth, bytes) else (str(auth) if auth is not None else None)
        self.server._record(
            ReceivedMessage(
                mail_from=envelope.mail_from or "",
                rcpt_tos=list(envelope.rcpt_tos),
                data=content,
                auth_user=user,
                mail_options=list(envelope.mail_options),
            )
        )
        return "250 2.0.0 OK queued"


class _Smtp(SMTP):
    """aiosmtpd's SMTP plus XOAUTH2 (Google's format; on a bad token: a 334 JSON error first)."""

    oauth_tokens: dict[str, str] = {}

    async def auth_XOAUTH2(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) < 2:
            return AuthResult(success=False)
        try:
            raw = base64.b64decode(args[1], validate=True).decode()
            fields = dict(part.split("=", 1) for part in raw.split("\x01") if part)
            user, token = fields["user"], fields["auth"].removeprefix("Bearer ")
        except (ValueError, KeyError):
            await self.push("501 5.5.2 malformed XOAUTH2")
            return AuthResult(success=False, handled=True)
        if self.oauth_tokens.get(user) == token:
            return AuthResult(success=True, auth_data=user)
        error = json.dumps({"status": "401", "schemes": "Bearer", "scope": "mail"}).encode()
        await self.challenge_auth(error)
        return AuthResult(success=False, handled=False)  # aiosmtpd then answers 535


class _Controller(Controller):
    def __init__(self, server: SmtpServer, **kwargs: Any) -> None:
        self._server = server
        super().__init__(_Handler(server), **kwargs)

    def factory(self) -> SMTP:
        with warnings.catch_warnings():
            # Plain-text AUTH is what the "plain" mode is for.
            warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
            smtp = _Smtp(self.handler, loop=self.loop, **self.SMTP_kwargs)
        smtp.oauth_tokens = self._server.oauth_tokens
        return smtp


class SmtpServer:
    """Start with ``start()`` (or ``with``); ``messages`` holds what was accepted."""

    def __init__(
        self,
        *,
        mode: Mode = "plain",
        users: dict[str, str] | None = None,
        oauth_tokens: dict[str, str] | None = None,
        rejected: set[str] | frozenset[str] = frozenset(),
        size_limit: int | None = None,
        auth_required: bool = True,
        host: str = "127.0.0.1",
    ) -> None:
        self.mode = mode
        self.host = host
        self.users = dict(users or {})
        self.oauth_tokens = dict(oauth_tokens or {})
        self.rejected = {r.lower() for r in rejected}
        self.size_limit = size_limit
        self.auth_required = auth_required
        self.messages: list[ReceivedMessage] = []
        self._lock = threading.Lock()
        self._received = threading.Condition(self._lock)
        self.root = Path(tempfile.mkdtemp(prefix="emlisten-smtp-"))
        self.ca_file, self.cert_file, self.key_file = make_tls_files(self.root / "tls")
        self.port = 0
        self._controller: _Controller | None = None

    def _server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if isinstance(data, LoginPassword):
            user, password = data.login.decode(), data.password.decode()
            if self.users.get(user) == password:
                return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)

    def start(self) -> None:
        kwargs: dict[str, Any] = {
            "hostname": self.host,
            "server_hostname": "smtp.test",
            "authenticator": self._authenticate,
            "auth_required": self.auth_required,
            # Only STARTTLS sessions count as TLS for aiosmtpd; implicit TLS is TLS from the start.
            "auth_require_tls": self.mode == "starttls",
            "data_size_limit": self.size_limit,
            "enable_SMTPUTF8": False,
        }
        if self.mode == "starttls":
            kwargs["tls_context"] = self._server_context()
            kwargs["require_starttls"] = True
        elif self.mode == "tls":
            kwargs["ssl_context"] = self._server_context()
        last_error: BaseException | None = None
        for _ in range(5):  # a free port may be taken by another xdist worker meanwhile
            self.port = free_port(self.host)
            # A plain selector loop: trio-asyncio's policy would hand out a Trio-based one.
            controller = _Controller(self, loop=asyncio.SelectorEventLoop(), port=self.port, **kwargs)
            try:
                controller.start()
            except Exception as exc:  # aiosmtpd re-raises the bind error of its thread
                last_error = exc
                with contextlib.suppress(Exception):
                    controller.stop()
                controller.loop.close()
                continue
            self._controller = controller
            return
        raise RuntimeError(f"SMTP test server did not start: {last_error}")

    def close(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()
            controller.loop.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SmtpServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _record(self, message: ReceivedMessage) -> None:
        with self._received:
            self.messages.append(message)
            self._received.notify_all()

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        with self._received:
            if not self._received.wait_for(lambda: len(self.messages) >= count, timeout):
                raise TimeoutError(f"expected {count} message(s), got {len(self.messages)}")
            return list(self.messages)

    async def await_messages(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        return await trio.to_thread.run_sync(self.wait_for_messages, count, timeout)
