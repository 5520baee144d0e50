"""Creatio's mailbox helper routes: validate credentials, list folders, ping a Creatio URL.

Folders are listed with the mailbox's protocol: IMAP ``LIST``, EWS ``FindFolder``
(``emlisten.mail.ews.folders``) or Graph ``mailFolders`` (``emlisten.mail.graph.folders``).

``POST /api/mailbox/validate``, ``POST /api/mailbox/folders`` and ``POST /api/availability/app``
(see ``docs/api.md``). They talk to mail servers and to Creatio directly, not through the
listener service, so they work on any node. Bodies are never logged; messages never quote
passwords, tokens or URLs (only host:port).

Register with ``app.register_blueprint(mailbox_blueprint(source))``; the blueprint handles its
own 400s, so it also works on a bare QuartTrio app.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio
from quart import Blueprint, Response, g

from emlisten import _egress
from emlisten.api.app import _BadRequest, _error_item, _json_response, _read_json_body
from emlisten.api.credentials import parse_credentials
from emlisten.errors import MailConnectError, MailProtocolError, MailSourceError, ValidationError
from emlisten.mail.ews import EwsSource
from emlisten.mail.ews.folders import list_ews_folders
from emlisten.mail.folders import list_folders
from emlisten.mail.graph import GraphSource
from emlisten.mail.graph.folders import list_graph_folders
from emlisten.mail.imap.source import ImapSource
from emlisten.mail.validate import ValidationResult, validate
from emlisten.models import MailboxConfig

__all__ = ["AVAILABILITY_TIMEOUT", "mailbox_blueprint"]

logger = logging.getLogger(__name__)

#: GetIsApplicationAvailable: how long the Creatio URL may take to send any HTTP response.
AVAILABILITY_TIMEOUT = 10.0

#: Validation and folder listing concern a mailbox that may not be registered yet: Creatio may
#: send no ``Id`` (or the nil GUID) and no ``BpmEndpoint``. These stand-ins let the credentials
#: parser run; they are never used.
_PLACEHOLDERS = {
    "id": "00000000-0000-0000-0000-000000000000",
    "bpmendpoint": "http://localhost/",
}


def mailbox_blueprint(
    source: ImapSource | None = None,
    *,
    check_smtp: bool = True,
    availability_timeout: float = AVAILABILITY_TIMEOUT,
    verify_availability_tls: bool = True,
    ews: EwsSource | None = None,
    graph: GraphSource | None = None,
    validate_timeout: float = 10.0,
    validate_connect_timeout: float = 5.0,
) -> Blueprint:
    """The routes, talking to mail servers through ``source`` (default: ``ImapSource()``).

    ``check_smtp``: validate also checks SMTP when the credentials carry SMTP fields.
    ``ews`` and ``graph`` validate and list the folders of EWS and Graph mailboxes (defaults:
    new sources), in their own protocol within ``validate_timeout`` (connecting within
    ``validate_connect_timeout``).
    """

    imap = source if source is not None else ImapSource()
    exchange: dict[str, EwsSource | GraphSource | None] = {"ews": ews, "graph": graph}

    def ews_source() -> EwsSource:
        found = exchange["ews"]
        if not isinstance(found, EwsSource):
            found = exchange["ews"] = EwsSource()
        return found

    def graph_source() -> GraphSource:
        found = exchange["graph"]
        if not isinstance(found, GraphSource):
            found = exchange["graph"] = GraphSource()
        return found

    async def folder_list(mailbox: MailboxConfig) -> list[dict[str, Any]]:
        if mailbox.protocol == "ews":
            return await list_ews_folders(mailbox, ews_source())
        if mailbox.protocol == "graph":
            return await list_graph_folders(mailbox, graph_source())
        return await list_folders(mailbox, imap)

    blueprint = Blueprint("mailbox", __name__)

    @blueprint.errorhandler(_BadRequest)
    async def bad_request(error: _BadRequest) -> Response:
        return _json_response({"Message": error.message, "Errors": error.errors}, error.status)

    @blueprint.post("/api/mailbox/validate")
    async def validate_credentials() -> Response:
        element = _single_credentials(await _read_json_body())
        try:
            mailbox = _parse_lenient(element)
        except ValidationError as error:
            # Creatio shows Message to the user: a bad field is an answer, not a broken request.
            return _json_response(
                {
                    "IsValid": False,
                    "Message": f"{error.field}: {error.message}",
                    "Data": {"Stage": "input", "Category": "input", "Field": error.field},
                }
            )
        started = trio.current_time()
        result = await validate(
            mailbox,
            imap,
            check_smtp=check_smtp,
            ews=ews_source() if mailbox.protocol == "ews" else None,
            graph=graph_source() if mailbox.protocol == "graph" else None,
            time_limit=validate_timeout,
            connect_timeout=validate_connect_timeout,
        )
        if not _authenticated() and _reveals_port_state(result):
            # A caller without the token learns "not reachable", never refused vs silent vs
            # "something else listens there", and not from the timing either.
            result = _unreachable(result)
            # As long as the check itself may take: EWS and Graph have their own (shorter) limit.
            padding = imap.settings.connect_timeout if mailbox.protocol == "imap" else validate_timeout
            await trio.sleep_until(started + padding)
        logger.info(
            "validate: %s (%s)",
            "valid" if result.is_valid else "invalid",
            (result.data or {}).get("Category", "ok"),
        )
        return _json_response(result.to_json())

    @blueprint.post("/api/mailbox/folders")
    async def folders() -> Response:
        element = _single_credentials(await _read_json_body())
        try:
            mailbox = _parse_lenient(element)
        except ValidationError as error:
            raise _BadRequest("Invalid credentials", [_error_item(error.field, error.message)]) from None
        started = trio.current_time()
        try:
            items = await folder_list(mailbox)
        except MailSourceError as error:
            logger.info("folders: %s", type(error).__name__)
            message, category = str(error), type(error).__name__
            if not _authenticated() and isinstance(error, MailConnectError | MailProtocolError):
                # As validate: no telling a closed port from a silent one or another service.
                message, category = f"no mail server answered at {_where(mailbox)}", "MailConnectError"
                await trio.sleep_until(started + imap.settings.connect_timeout)
            return _json_response({"Message": message, "Category": category}, 502)
        return _json_response(items)

    @blueprint.post("/api/availability/app")
    async def application_available() -> Response:
        url = _availability_url(await _read_json_body())
        parts = urlsplit(url)
        where = _host_port(parts.hostname or "", parts.port, parts.scheme)
        started = trio.current_time()
        problem = await _reach(url, where, availability_timeout, verify_availability_tls)
        if problem is not None:
            logger.info("availability: %s unreachable", where)
            if not _authenticated():
                # Same answer, same time for a refused, a silent or a forbidden address.
                problem = f"no HTTP response from {where} within {availability_timeout:g}s"
                await trio.sleep_until(started + availability_timeout)
            return _json_response({"Message": problem}, 502)
        return _json_response("pong")

    return blueprint


def _single_credentials(body: Any) -> Any:
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    if not isinstance(body, Mapping):
        raise _BadRequest(
            "Invalid body", [_error_item("body", "expected one SynchronizationCredentials object")]
        )
    return body


def _parse_lenient(element: Mapping[str, Any]) -> MailboxConfig:
    data = dict(element)
    present = {str(key).lower() for key, value in data.items() if value not in (None, "")}
    for key, value in _PLACEHOLDERS.items():
        if key not in present:
            for existing in [k for k in data if str(k).lower() == key]:
                del data[existing]
            data[key] = value
    return parse_credentials(data)


def _availability_url(body: Any) -> str:
    if isinstance(body, Mapping):
        body = {str(key).lower(): value for key, value in body.items()}.get("url")
    if not isinstance(body, str) or not body.strip():
        raise _BadRequest(
            "Invalid body",
            [_error_item("body", 'expected a URL as a JSON string or {"Url": "..."}')],
        )
    url = body.strip()
    if len(url) > _MAX_URL_CHARS:
        raise _BadRequest(
            "Field too long", [_error_item("Url", f"longer than {_MAX_URL_CHARS} characters")], status=422
        )
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise _BadRequest("Invalid URL", [_error_item("Url", "not a valid URL")]) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _BadRequest("Invalid URL", [_error_item("Url", "must be an absolute http(s) URL")])
    return url


def _where(mailbox: MailboxConfig) -> str:
    return _host_port(mailbox.imap.host, mailbox.imap.port, "")


def _authenticated() -> bool:
    """The caller presented the API token (emlisten.api.app sets the flag)."""
    return bool(g.get("emlisten_authenticated", False))


#: Validation failures that tell a closed port from a silent one, or from another service.
_PORT_STATE_CATEGORIES = frozenset(("connect", "timeout", "protocol", "tls"))
_MAX_URL_CHARS = 2048


def _reveals_port_state(result: ValidationResult) -> bool:
    return not result.is_valid and (result.data or {}).get("Category") in _PORT_STATE_CATEGORIES


def _unreachable(result: ValidationResult) -> ValidationResult:
    data = dict(result.data or {})
    stage, server = data.get("Stage", "imap"), data.get("Server", "")
    data["Category"] = "connect"
    message = f"{str(stage).upper()}: no {str(stage).upper()} server answered at {server}"
    return ValidationResult(False, message, data)


def _host_port(host: str, port: int | None, scheme: str) -> str:
    if port is None:
        port = 443 if scheme.lower() == "https" else 80
    if len(host) > 100:  # quoted in answers and logs
        host = host[:100] + "..."
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"{host}:{port}"


async def _reach(url: str, where: str, time_limit: float, verify: bool) -> str | None:
    """None when ``url`` answered anything HTTP within ``time_limit``, else why not."""
    with trio.move_on_after(time_limit):
        try:
            # Only addresses EMLISTEN_CALLBACK_ALLOW permits (emlisten._egress), redirects not followed.
            transport = _egress.http_transport("callback", verify=verify)
            async with (
                httpx.AsyncClient(timeout=time_limit, transport=transport, follow_redirects=False) as client,
                client.stream("GET", url) as response,
            ):
                logger.debug("availability: %s answered %d", where, response.status_code)
                return None
        except httpx.TimeoutException:
            pass
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            return f"cannot reach {where}: {_transport_reason(error)}"
    return f"no HTTP response from {where} within {time_limit:g}s"


def _transport_reason(error: BaseException) -> str:
    """The innermost cause's text (e.g. "Connection refused"), never the URL."""
    cause: BaseException = error
    for _ in range(20):  # chains are short; the bound only guards against a cycle
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        if isinstance(cause, BaseExceptionGroup):  # one error per address tried
            return "; ".join(dict.fromkeys(_transport_reason(e) for e in cause.exceptions))
        # httpcore re-raises transport errors inside ``except`` (context, not cause).
        inner = cause.__cause__ or cause.__context__
        if inner is None:
            break
        cause = inner
    return str(cause)[:200] or type(error).__name__
