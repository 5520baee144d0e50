"""A local OAuth2 token-introspection server for Dovecot's ``oauth2`` passdb.

Dovecot (2.3) asks ``GET <tokeninfo_url><token>`` on every OAuth login (no auth cache in the
test config) and accepts the login when the answer is 200 with a JSON object whose
``username_attribute`` (here ``email``) equals the login name. Tokens are issued, revoked and
expired at runtime, so a test can reject a token between two logins without restarting Dovecot.

It is a real HTTP server (stdlib ``ThreadingHTTPServer`` in a daemon thread): Dovecot's auth
process calls it while the test's Trio loop is blocked in an IMAP command, so it must not depend
on that loop.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

from tests.secret_scan import register_secret

TOKENINFO_PATH = "/tokeninfo"
DEFAULT_SCOPE = "https://mail.example.test/"


@dataclass
class IssuedToken:
    user: str
    expires_at: float
    revoked: bool = False


class TokenInfoServer:
    """``with TokenInfoServer() as tokens: token = tokens.issue("alice")``.

    ``url`` is the value for Dovecot's ``tokeninfo_url`` (the token is appended to it).
    ``requests`` counts introspection calls (tests check that every login asks).
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._tokens: dict[str, IssuedToken] = {}
        self._lock = threading.Lock()
        self.requests = 0
        self._server = ThreadingHTTPServer((host, 0), self._handler_class())
        self._server.daemon_threads = True
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{TOKENINFO_PATH}?access_token="

    # -- tokens ----------------------------------------------------------------------------

    def issue(self, user: str, *, lifetime: float = 3600.0) -> str:
        token = register_secret("tok-" + secrets.token_urlsafe(24))
        with self._lock:
            self._tokens[token] = IssuedToken(user=user, expires_at=time.time() + lifetime)
        return token

    def revoke(self, token: str) -> None:
        with self._lock:
            self._tokens[token].revoked = True

    def expire(self, token: str) -> None:
        with self._lock:
            self._tokens[token].expires_at = time.time() - 1

    def _introspect(self, token: str) -> tuple[int, dict[str, object]]:
        with self._lock:
            self.requests += 1
            issued = self._tokens.get(token)
            if issued is None or issued.revoked:
                return 401, {"error": "invalid_token", "error_description": "unknown or revoked"}
            remaining = int(issued.expires_at - time.time())
            if remaining <= 0:
                return 401, {"error": "invalid_token", "error_description": "expired"}
            return 200, {
                "email": issued.user,
                "scope": DEFAULT_SCOPE,
                "expires_in": remaining,
                "active": "true",
            }

    # -- HTTP ------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path != TOKENINFO_PATH:
                    self._answer(404, {"error": "not_found"})
                    return
                token = parse_qs(parts.query).get("access_token", [""])[0]
                self._answer(*owner._introspect(token))

            def _answer(self, status: int, payload: dict[str, object]) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # the request line carries the token: keep it out of test output

        return Handler

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"tokeninfo-{self.port}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> TokenInfoServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["DEFAULT_SCOPE", "TOKENINFO_PATH", "IssuedToken", "TokenInfoServer"]
