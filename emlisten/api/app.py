"""The Creatio-facing HTTP API: ``/api/listeners/*`` routes on a QuartTrio app.

The routes only translate between the wire format (see ``docs/api.md`` for the exact request and
response shapes, including the error bodies, which the Creatio contract leaves open) and
:class:`emlisten.service.control.ListenerControl`. Bodies are parsed as JSON whatever their
``Content-Type`` says; request bodies are never logged.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import quart_trio
from quart import Blueprint, Response, g, request
from werkzeug.exceptions import HTTPException

import emlisten
from emlisten.api._guard import (
    ApiAccess,
    BodyRejected,
    RateLimiter,
    RateLimits,
    drain_unread_body,
    is_creatio_route,
    load_json,
)
from emlisten.api.credentials import (
    parse_credentials_array,
    parse_mailbox_id_spellings,
)
from emlisten.errors import EmlistenError, QueueError, StoreError, ValidationError
from emlisten.models import MailboxConfig
from emlisten.service.control import ListenerControl
from emlisten.ui import PUBLIC_PATHS as CONSOLE_PATHS

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
STATE_EXISTS = "exists"
STATE_CLOSED = "closed"

#: Routes that stay open when a bearer token is configured (liveness probes, Creatio's
#: availability check and diagnostics page).
_PUBLIC_ROUTES = frozenset(
    (method, path)
    for method in ("GET", "HEAD")
    for path in ("/api/listeners/status", "/api/listeners/exists", "/readyz", "/metrics", *CONSOLE_PATHS)
)
#: Microsoft Graph sends no bearer token: these routes authenticate each call themselves
#: (a signed path and clientState), so the API token does not apply to them.
_SELF_AUTHENTICATED_PREFIXES = ("/v1/graph/notifications/", "/v1/graph/lifecycle/")


class _BadRequest(Exception):
    """The request as a whole is unusable: 400 with ``Message`` and ``Errors``."""

    def __init__(self, message: str, errors: list[dict[str, Any]], status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors
        self.status = status


def _error_item(field: str, message: str) -> dict[str, Any]:
    return {"Index": None, "Id": None, "Field": field, "Message": message}


def _json_response(payload: Any, status: int = 200) -> Response:
    text = json.dumps(payload, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate got into a message: \u-escape it
        text = json.dumps(payload)
    return Response(
        text,
        status=status,
        content_type="application/json; charset=utf-8",
    )


async def _read_json_body() -> Any:
    # May raise RequestEntityTooLarge (413) past MAX_CONTENT_LENGTH.
    data = await request.get_data(cache=False, as_text=False)
    if isinstance(data, str):  # not with as_text=False; keeps the type checker informed
        data = data.encode("utf-8")
    if not data.strip():
        raise _BadRequest("Empty body: a JSON value was expected", [_error_item("body", "empty")])
    try:
        return load_json(data)
    except BodyRejected as rejected:
        raise _BadRequest(
            "Field too long" if rejected.status == 422 else "Invalid JSON",
            [_error_item(rejected.field, rejected.message)],
            status=rejected.status,
        ) from None
    except UnicodeDecodeError:
        message = "body is not UTF-8"
    except json.JSONDecodeError as error:
        # JSONDecodeError.msg and the position never quote the body (which may hold secrets).
        message = f"{error.msg} at line {error.lineno} column {error.colno}"
    raise _BadRequest("Malformed JSON", [_error_item("body", message)])


def _ids_from_body(body: Any) -> list[tuple[str, str]]:
    try:
        return parse_mailbox_id_spellings(body)
    except ValidationError as error:
        raise _BadRequest("Invalid mailbox ids", [_error_item(error.field, error.message)]) from None


def create_app(
    control: ListenerControl,
    *,
    api_token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    blueprints: Sequence[Blueprint] = (),
    access: ApiAccess | None = None,
) -> quart_trio.QuartTrio:
    """Build the API app. With ``api_token`` emlisten's own routes need
    ``Authorization: Bearer <api_token>``, and Creatio's too with
    ``access.creatio_routes_need_token`` (see emlisten.api._guard)."""

    app = quart_trio.QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.asgi_app = drain_unread_body(app.asgi_app)  # type: ignore[method-assign]
    # Always turn route exceptions into our JSON 500, even in debug/testing mode.
    app.config["PROPAGATE_EXCEPTIONS"] = False
    expected_token = api_token.encode("utf-8") if api_token else None
    access = access or ApiAccess()
    rate_limits = RateLimits(access)
    # Said at start, in /readyz and by `emlisten status` (emlisten.api.admin reads it).
    app.config["EMLISTEN_OPEN_WITHOUT_TOKEN"] = open_routes = access.open_without_token(api_token)
    for routes in open_routes:
        logger.warning("API on %s: %s answer anyone without a token", access.listen_host, routes)
    for blueprint in blueprints:
        app.register_blueprint(blueprint)

    @app.before_request
    async def require_token() -> Response | None:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        # Validate and availability tell callers with the token more (emlisten.api.mailbox).
        g.emlisten_authenticated = authenticated = (
            expected_token is not None
            and scheme.lower() == "bearer"
            and hmac.compare_digest(presented.strip().encode("utf-8"), expected_token)
        )
        if not authenticated:
            wait = rate_limits.wait(request.method, request.path, request.remote_addr or "")
            if wait:
                limited = _json_response({"Message": "Too many requests"}, 429)
                limited.headers["Retry-After"] = RateLimiter.retry_after_header(wait)
                return limited
        if expected_token is None or (request.method, request.path) in _PUBLIC_ROUTES:
            return None
        if request.method == "POST" and request.path.startswith(_SELF_AUTHENTICATED_PREFIXES):
            return None
        if is_creatio_route(request.path) and not access.creatio_routes_need_token:
            return None
        if authenticated:
            return None
        response = _json_response({"Message": "Missing or invalid bearer token"}, 401)
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.after_request
    async def log_request(response: Response) -> Response:
        logger.debug("%s %s -> %d", request.method, request.path, response.status_code)
        return response

    @app.errorhandler(_BadRequest)
    async def bad_request(error: _BadRequest) -> Response:
        return _json_response({"Message": error.message, "Errors": error.errors}, error.status)

    @app.errorhandler(RecursionError)
    async def nested_too_deeply(error: RecursionError) -> Response:
        # Routes parsing JSON themselves: a body nested thousands of levels deep.
        errors = [_error_item("body", "nested too deeply")]
        return _json_response({"Message": "Invalid JSON", "Errors": errors}, 400)

    @app.errorhandler(ValidationError)
    async def rejected_by_service(error: ValidationError) -> Response:
        # The service may refuse input the parser let through (e.g. a callback URL outside an
        # allow-list): still the caller's fault, so 400.
        return _json_response(
            {"Message": "Invalid request", "Errors": [_error_item(error.field, error.message)]},
            400,
        )

    @app.errorhandler(StoreError)
    @app.errorhandler(QueueError)
    async def backend_unavailable(error: EmlistenError) -> Response:
        logger.warning("%s %s: backend unavailable (%s)", request.method, request.path, type(error).__name__)
        return _json_response({"Message": "Service temporarily unavailable"}, 503)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        response = _json_response({"Message": error.name}, status)
        for name, value in error.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        if status == 413:
            # The rest of the body is still on the wire: the connection cannot carry another request.
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(Exception)
    async def unexpected_error(error: Exception) -> Response:
        logger.exception("Unexpected error in %s %s (%s)", request.method, request.path, type(error).__name__)
        return _json_response({"Message": "Internal server error"}, 500)

    async def change_listeners(
        operation: str,
        action: Callable[[Sequence[MailboxConfig]], Awaitable[Any]],
    ) -> tuple[list[MailboxConfig], list[dict[str, Any]], Any]:
        body = await _read_json_body()
        try:
            mailboxes, errors = parse_credentials_array(body)
        except ValidationError as error:
            raise _BadRequest("Invalid body", [_error_item(error.field, error.message)]) from None
        logger.info("%s: %d mailbox(es) accepted, %d rejected", operation, len(mailboxes), len(errors))
        if errors and not mailboxes:
            raise _BadRequest("No valid credentials in the request", errors)
        result = await action(mailboxes) if mailboxes else None
        return mailboxes, errors, result

    @app.post("/api/listeners/create")
    async def create() -> Response:
        mailboxes, errors, _ = await change_listeners("create", control.create)
        return _json_response({"Accepted": [m.id for m in mailboxes], "Errors": errors})

    @app.post("/api/listeners/recreate")
    async def recreate() -> Response:
        mailboxes, errors, _ = await change_listeners("recreate", control.recreate)
        return _json_response({"Accepted": [m.id for m in mailboxes], "Errors": errors})

    @app.post("/api/listeners/update")
    async def update() -> Response:
        mailboxes, errors, unknown = await change_listeners("update", control.update)
        return _json_response(
            {
                "Accepted": [m.id for m in mailboxes],
                "Unknown": list(unknown or []),
                "Errors": errors,
            }
        )

    @app.post("/api/listeners/close")
    async def close() -> Response:
        spellings = _ids_from_body(await _read_json_body())
        mailbox_ids = list(dict.fromkeys(normalised for _, normalised in spellings))
        logger.info("close: %d mailbox(es)", len(mailbox_ids))
        if mailbox_ids:
            await control.close(mailbox_ids)
        return _json_response({"Accepted": mailbox_ids, "Errors": []})

    @app.post("/api/listeners/subscriptionsstate")
    async def subscriptions_state() -> Response:
        spellings = _ids_from_body(await _read_json_body())
        mailbox_ids = list(dict.fromkeys(normalised for _, normalised in spellings))
        states = await control.subscription_states(mailbox_ids) if mailbox_ids else {}
        # Only "exists" keeps Creatio's failover job away; anything else must read "closed" so
        # that a lost subscription is re-created, never reported as alive.
        return _json_response(
            {
                spelling: {"State": STATE_EXISTS if states.get(normalised) == STATE_EXISTS else STATE_CLOSED}
                for spelling, normalised in spellings
            }
        )

    @app.get("/api/listeners/exists")
    async def exists() -> Response:
        return _json_response({"ServiceStatus": "Started", "Version": emlisten.__version__})

    @app.get("/api/listeners/status")
    async def status() -> Response:
        return _json_response(await control.service_status())

    return app
