"""The OpenAPI 3.1 document of emlisten's whole HTTP API, served at ``/v1/openapi.json``.

Hand-written: every route the app serves is described here, and tests/api/test_v1_openapi.py
checks the document against the app's real routes both ways (a new route without a description,
or a described route that no longer exists, fails the test). docs/api.md has the prose.
"""

from __future__ import annotations

from typing import Any

import emlisten

_JSON = "application/json"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _body(schema: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {_JSON: {"schema": schema}}}


def _answer(
    description: str, schema: dict[str, Any] | None = None, content_type: str = _JSON
) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description}
    if schema is not None:
        answer["content"] = {content_type: {"schema": schema}}
    return answer


_OBJECT: dict[str, Any] = {"type": "object"}
_ERROR = _answer("Invalid input: the field is named", _ref("Problem"))
_NOT_FOUND = _answer("Unknown id", _ref("Problem"))
_CREATIO_400 = _answer("Unusable request", _ref("CreatioError"))


def _op(
    summary: str,
    tag: str,
    responses: dict[str, Any],
    *,
    body: dict[str, Any] | None = None,
    parameters: list[dict[str, Any]] | None = None,
    public: bool = False,
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if body is not None:
        operation["requestBody"] = body
    if parameters:
        operation["parameters"] = parameters
    if public:
        operation["security"] = []  # open even when EMLISTEN_API_TOKEN is set
    return operation


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


_PAGING = [
    _query("offset", "Items to skip", {"type": "integer", "minimum": 0, "default": 0}),
    _query("limit", "Items per page", {"type": "integer", "minimum": 1}),
]

_CREATIO_CREDENTIALS = _body({"type": "array", "items": _ref("SynchronizationCredentials")})
_CREATIO_IDS = _body({"type": "array", "items": {"type": "string"}})
_CREATIO_ANSWER = _answer("Accepted and rejected elements", _ref("CreatioAccepted"))

_SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "required": ["message", "errors"],
        "properties": {
            "message": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"field": {"type": ["string", "null"]}, "message": {"type": "string"}},
                },
            },
        },
    },
    "CreatioError": {
        "type": "object",
        "properties": {"Message": {"type": "string"}, "Errors": {"type": "array", "items": _OBJECT}},
    },
    "CreatioAccepted": {
        "type": "object",
        "properties": {
            "Accepted": {"type": "array", "items": {"type": "string"}},
            "Unknown": {"type": "array", "items": {"type": "string"}},
            "Errors": {"type": "array", "items": _OBJECT},
        },
    },
    "SynchronizationCredentials": {
        "type": "object",
        "description": "Creatio's mailbox credentials (fields listed in docs/api.md, any case)",
    },
    "WebhookTargetIn": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "url": {"type": "string", "format": "uri", "description": "Default: EMLISTEN_WEBHOOK_URL"},
            "secret": {
                "description": "whsec_ secret (Standard Webhooks), or a list of them during a rotation "
                "(the current one first). Default: EMLISTEN_WEBHOOK_SECRET",
                "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
            },
        },
    },
    "MailboxIn": {
        "type": "object",
        "additionalProperties": False,
        "required": ["username"],
        "properties": {
            "id": {"type": "string", "format": "uuid", "description": "Default: a new UUID"},
            "protocol": {"enum": ["imap", "ews", "graph"], "default": "imap"},
            "host": {"type": "string", "description": "IMAP server (host, host:port, imap(s)://host[:port])"},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "tls": {"type": "boolean", "default": True},
            "security": {"enum": ["none", "ssl_on_connect", "starttls", "starttls_when_available"]},
            "verify_certificate": {"type": "boolean", "default": True},
            "username": {"type": "string"},
            "password": {"type": "string", "writeOnly": True},
            "oauth": {"type": "boolean", "default": False},
            "access_token": {"type": "string", "writeOnly": True},
            "email": {"type": "string", "description": "The mailbox's address, when not the username"},
            "service_url": {"type": "string", "description": "EWS or Graph URL (ews, graph)"},
            "folders": {"type": "array", "items": {"type": "string"}, "default": ["INBOX"]},
            "webhook": _ref("WebhookTargetIn"),
        },
    },
    "Mailbox": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "kind": {"enum": ["webhook", "creatio"]},
            "protocol": {"enum": ["imap", "ews", "graph"]},
            "email": {"type": "string"},
            "username": {"type": "string"},
            "host": {"type": "string"},
            "port": {"type": "integer"},
            "tls": {"type": "boolean"},
            "security": {"type": "string"},
            "server": {"type": "string"},
            "service_url": {"type": ["string", "null"]},
            "oauth": {"type": "boolean"},
            "state": {
                "enum": [
                    "starting",
                    "connecting",
                    "listening",
                    "authenticationError",
                    "connectError",
                    "closed",
                ]
            },
            "node": {"type": ["string", "null"]},
            "last_error": {"type": ["string", "null"]},
            "delivered": {"type": "integer"},
            "updated_at": {"type": ["number", "null"]},
            "webhook": {
                "type": ["object", "null"],
                "properties": {
                    "url": {"type": ["string", "null"], "description": "Without user info or query"},
                    "default_url": {"type": "boolean"},
                    "secrets": {"type": "integer", "description": "How many secrets sign (never shown)"},
                },
            },
            "folders": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "uidvalidity": {"type": ["integer", "null"]},
                        "last_uid": {"type": ["integer", "null"]},
                    },
                },
            },
            "history": {"type": ["object", "null"]},
        },
    },
    "MailboxPage": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": _ref("Mailbox")},
            "total": {"type": "integer", "description": "Mailboxes matching the filters"},
            "offset": {"type": "integer"},
            "limit": {"type": "integer"},
            "states": {"type": "object", "additionalProperties": {"type": "integer"}},
            "mailboxes": {"type": "array", "items": _ref("Mailbox"), "description": "Same as items"},
            "count": {"type": "integer", "description": "len(items)"},
        },
    },
    "Event": {
        "type": "object",
        "description": "A webhook event (docs/webhooks.md)",
        "required": ["type", "id", "mailbox", "timestamp", "data"],
        "properties": {
            "type": {"enum": ["message.new", "mailbox.state"]},
            "version": {"type": "integer"},
            "id": {"type": "string"},
            "mailbox": {"type": "string"},
            "timestamp": {"type": "string", "format": "date-time"},
            "data": _OBJECT,
        },
    },
    "DeadLetter": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "description": "The event id (webhook-id)"},
            "mailbox": {"type": "string"},
            "type": {"type": "string"},
            "url": {"type": "string"},
            "attempts": {"type": "integer"},
            "last_error": {"type": "string"},
            "created_at": {"type": "number"},
            "dead_at": {"type": "number"},
            "event": _ref("Event"),
        },
    },
    "DeadLetterPage": {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": _ref("DeadLetter")},
            "total": {"type": "integer"},
            "offset": {"type": "integer"},
            "limit": {"type": "integer"},
        },
    },
}

_MAILBOX_ID = _path_param("mailbox_id", "Mailbox id (a UUID)")
_EVENT_ID = _path_param("event_id", "Dead letter (event) id")

_PATHS: dict[str, dict[str, Any]] = {
    # Creatio's listener API (docs/api.md)
    "/api/listeners/create": {
        "post": _op(
            "Register mailboxes (Creatio)",
            "creatio",
            {"200": _CREATIO_ANSWER, "400": _CREATIO_400},
            body=_CREATIO_CREDENTIALS,
        )
    },
    "/api/listeners/recreate": {
        "post": _op(
            "Register mailboxes again, restarting them (Creatio)",
            "creatio",
            {"200": _CREATIO_ANSWER, "400": _CREATIO_400},
            body=_CREATIO_CREDENTIALS,
        )
    },
    "/api/listeners/update": {
        "post": _op(
            "Change registered mailboxes (Creatio)",
            "creatio",
            {"200": _CREATIO_ANSWER, "400": _CREATIO_400},
            body=_CREATIO_CREDENTIALS,
        )
    },
    "/api/listeners/close": {
        "post": _op(
            "Stop and forget mailboxes (Creatio)",
            "creatio",
            {"200": _CREATIO_ANSWER, "400": _CREATIO_400},
            body=_CREATIO_IDS,
        )
    },
    "/api/listeners/subscriptionsstate": {
        "post": _op(
            "Subscription state per mailbox id (Creatio)",
            "creatio",
            {"200": _answer("{id: {State: exists|closed}}", _OBJECT), "400": _CREATIO_400},
            body=_CREATIO_IDS,
        )
    },
    "/api/listeners/exists": {
        "get": _op(
            "The service is up (Creatio)", "creatio", {"200": _answer("Version", _OBJECT)}, public=True
        )
    },
    "/api/listeners/status": {
        "get": _op(
            "Service status and connection counts (liveness)",
            "creatio",
            {"200": _answer("Status", _OBJECT)},
            public=True,
        )
    },
    "/api/mailbox/validate": {
        "post": _op(
            "Log in to a mail server with the given credentials",
            "creatio",
            {"200": _answer("Result", _OBJECT)},
            body=_body(_ref("SynchronizationCredentials")),
        )
    },
    "/api/mailbox/folders": {
        "post": _op(
            "List a mailbox's folders",
            "creatio",
            {"200": _answer("Folders", _OBJECT)},
            body=_body(_ref("SynchronizationCredentials")),
        )
    },
    "/api/availability/app": {
        "post": _op(
            "Availability check of the service (Creatio)",
            "creatio",
            {"200": _answer("Result", _OBJECT)},
            body=_body(_OBJECT, required=False),
        )
    },
    "/apiv2/email/send": {
        "post": _op(
            "Send a message from a registered mailbox",
            "creatio",
            {"200": _answer("Sent", _OBJECT), "400": _CREATIO_400},
            body=_body(_OBJECT),
        )
    },
    "/api/email/synchronize": {
        "post": _op(
            "Start a history load of a registered mailbox",
            "creatio",
            {"200": _answer("Started", _OBJECT), "400": _CREATIO_400},
            body=_body(_OBJECT),
        )
    },
    # Operators and probes
    "/metrics": {
        "get": _op(
            "Prometheus metrics",
            "operations",
            {"200": _answer("Text exposition format", {"type": "string"}, "text/plain")},
            public=True,
        )
    },
    "/readyz": {
        "get": _op(
            "Readiness: store and queue reachable",
            "operations",
            {"200": _answer("Ready", _OBJECT), "503": _answer("Not ready", _OBJECT)},
            public=True,
        )
    },
    "/v1/nodes": {
        "get": _op("Live nodes with their roles and load", "operations", {"200": _answer("Nodes", _OBJECT)})
    },
    # Microsoft Graph calls these; each call is authenticated by its signed path and clientState.
    "/v1/graph/notifications/{token}": {
        "post": _op(
            "Microsoft Graph change notifications",
            "graph",
            {"202": _answer("Taken")},
            parameters=[_path_param("token", "Signed route")],
            public=True,
            body=_body(_OBJECT, required=False),
        )
    },
    "/v1/graph/lifecycle/{token}": {
        "post": _op(
            "Microsoft Graph lifecycle notifications",
            "graph",
            {"202": _answer("Taken")},
            parameters=[_path_param("token", "Signed route")],
            public=True,
            body=_body(_OBJECT, required=False),
        )
    },
    # emlisten's REST API for mailboxes and webhooks
    "/v1/mailboxes": {
        "get": _op(
            "List mailboxes with their state, paged and filtered",
            "mailboxes",
            {"200": _answer("A page of mailboxes, ordered by id", _ref("MailboxPage")), "422": _ERROR},
            parameters=[
                *_PAGING,
                _query("state", "Only mailboxes in this state", {"type": "string"}),
                _query("protocol", "imap, ews or graph", {"type": "string"}),
                _query("kind", "webhook (registered through /v1) or creatio", {"type": "string"}),
                _query("q", "Text in the id, username, address or host", {"type": "string"}),
            ],
        ),
        "post": _op(
            "Register a mailbox; its mail goes to its webhook",
            "mailboxes",
            {
                "201": _answer("Registered (Location: /v1/mailboxes/{id})", _ref("Mailbox")),
                "409": _answer("The id is taken", _ref("Problem")),
                "422": _ERROR,
            },
            body=_body(_ref("MailboxIn")),
        ),
    },
    "/v1/mailboxes/{mailbox_id}": {
        "get": _op(
            "A mailbox, its state and folders",
            "mailboxes",
            {"200": _answer("The mailbox", _ref("Mailbox")), "404": _NOT_FOUND},
            parameters=[_MAILBOX_ID],
        ),
        "patch": _op(
            "Change a mailbox registered through /v1 (the fields given; it restarts when the server or "
            "credentials change)",
            "mailboxes",
            {
                "200": _answer("The mailbox", _ref("Mailbox")),
                "404": _NOT_FOUND,
                "409": _answer("Registered through the Creatio API", _ref("Problem")),
                "422": _ERROR,
            },
            body=_body(_ref("MailboxIn")),
            parameters=[_MAILBOX_ID],
        ),
        "delete": _op(
            "Stop and forget a mailbox",
            "mailboxes",
            {"204": _answer("Removed"), "404": _NOT_FOUND},
            parameters=[_MAILBOX_ID],
        ),
    },
    "/v1/dead-letters": {
        "get": _op(
            "Webhook events whose retries ran out, oldest first",
            "webhooks",
            {"200": _answer("A page of dead letters", _ref("DeadLetterPage")), "422": _ERROR},
            parameters=[*_PAGING, _query("mailbox", "Only this mailbox's", {"type": "string"})],
        )
    },
    "/v1/dead-letters/replay": {
        "post": _op(
            "Send every dead letter again (of one mailbox with ?mailbox=)",
            "webhooks",
            {"202": _answer("{replayed: n}", _OBJECT)},
            parameters=[_query("mailbox", "Only this mailbox's", {"type": "string"})],
        )
    },
    "/v1/dead-letters/{event_id}": {
        "get": _op(
            "One dead letter",
            "webhooks",
            {"200": _answer("It", _ref("DeadLetter")), "404": _NOT_FOUND},
            parameters=[_EVENT_ID],
        ),
        "delete": _op(
            "Drop a dead letter for good",
            "webhooks",
            {"204": _answer("Dropped"), "404": _NOT_FOUND},
            parameters=[_EVENT_ID],
        ),
    },
    "/v1/dead-letters/{event_id}/replay": {
        "post": _op(
            "Send a dead letter again (to the end of its receiver's queue)",
            "webhooks",
            {"202": _answer("{id, replayed: 1}", _OBJECT), "404": _NOT_FOUND},
            parameters=[_EVENT_ID],
        )
    },
    "/v1/webhooks/outboxes": {
        "get": _op(
            "Receivers with events waiting: how many, and how the oldest one is doing",
            "webhooks",
            {
                "200": _answer(
                    "{items: [{url, waiting, oldest: {id, mailbox, created_at, attempts, "
                    "last_error, next_attempt_at}}], total}",
                    _OBJECT,
                )
            },
        )
    },
    "/v1/openapi.json": {"get": _op("This document", "operations", {"200": _answer("OpenAPI 3.1", _OBJECT)})},
    # The web console (docs/console.md)
    "/ui": {"get": _op("The web console (redirects to /ui/)", "console", {"302": _answer("Redirect")})},
    "/ui/": {"get": _op("The web console's page", "console", {"200": _answer("HTML", None, "text/html")})},
    "/ui/static/{path}": {
        "get": _op(
            "The console's static files",
            "console",
            {"200": _answer("File"), "404": _NOT_FOUND},
            parameters=[_path_param("path", "File path")],
        )
    },
    "/ui/api/overview": {
        "get": _op("Console: nodes and counts", "console", {"200": _answer("Overview", _OBJECT)})
    },
    "/ui/api/mailboxes": {
        "get": _op("Console: mailbox list", "console", {"200": _answer("A page of mailboxes", _OBJECT)})
    },
    "/ui/api/mailboxes/{mailbox_id}": {
        "get": _op(
            "Console: mailbox detail with recent events",
            "console",
            {"200": _answer("Detail", _OBJECT), "404": _NOT_FOUND},
            parameters=[_MAILBOX_ID],
        )
    },
    "/v1/stats": {
        "get": _op(
            "Deliveries per minute and latency over the last hour (this node)",
            "console",
            {"200": _answer("Series", _OBJECT)},
        )
    },
}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "emlisten",
            "version": emlisten.__version__,
            "description": "Mailbox listener: Creatio's listener API, emlisten's REST API for mailboxes "
            "and signed webhooks (docs/api.md, docs/webhooks.md).",
        },
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": _PATHS,
    }


def described_routes() -> set[tuple[str, str]]:
    """(METHOD, path with {params}) of every operation in the document."""
    return {(method.upper(), path) for path, item in _PATHS.items() for method in item}
