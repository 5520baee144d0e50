"""emlisten's own REST API for applications that are not Creatio (docs/api.md, "/v1").

``/v1/mailboxes``: register (IMAP, EWS or Graph, validated as the Creatio API validates), read,
change, remove and list mailboxes with their state; their mail goes to a signed webhook
(docs/webhooks.md). ``/v1/dead-letters``: webhook events whose retries ran out, listed, replayed
and dropped. ``/v1/openapi.json``: the OpenAPI document of the whole HTTP API.

Errors: ``{"message": ..., "errors": [{"field": ..., "message": ...}]}``; invalid input is 422
naming the field, an unknown id 404. Registration goes through the same ListenerControl as
Creatio's ``/api/listeners/*``: the ownership loop of whichever node owns the mailbox reacts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from quart import Blueprint, Response, request

from emlisten.abc import Sink, Store
from emlisten.api._guard import BodyRejected, load_json
from emlisten.api.openapi import openapi_document
from emlisten.api.v1_mailboxes import mailbox_to_v1, parse_v1_mailbox, redact_url, v1_body_of
from emlisten.config import Settings
from emlisten.errors import ValidationError
from emlisten.models import MailboxState, WebhookEvent, WebhookTarget
from emlisten.service.listeners import StoreListenerControl

__all__ = ["dead_letter_to_v1", "node_v1_blueprint", "v1_blueprint"]

log = logging.getLogger(__name__)

#: No default receiver or secret (EMLISTEN_WEBHOOK_URL / _SECRET unset).
_NO_DEFAULT = WebhookTarget()

MAX_PAGE = 1000
DEFAULT_PAGE = 100


def _json(payload: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(payload, ensure_ascii=False), status=status, content_type="application/json; charset=utf-8"
    )


def _problem(status: int, message: str, field: str | None = None, detail: str = "") -> Response:
    errors = [{"field": field, "message": detail or message}] if field is not None else []
    return _json({"message": message, "errors": errors}, status)


def _invalid(error: ValidationError) -> Response:
    return _json(
        {
            "message": f"{error.field}: {error.message}",
            "errors": [{"field": error.field, "message": error.message}],
        },
        422,
    )


class _Invalid(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.error = ValidationError(field, message)


async def _json_body() -> Any:
    data = await request.get_data(cache=False, as_text=False)
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not data.strip():
        raise _Invalid("body", "empty: a JSON object was expected")
    try:
        # Also refuses deep nesting, lone surrogates and over-long fields (emlisten.api._guard).
        return load_json(data)
    except BodyRejected as rejected:
        raise _Invalid(rejected.field, rejected.message) from None
    except UnicodeDecodeError:
        raise _Invalid("body", "not UTF-8") from None
    except json.JSONDecodeError as error:
        # The position only, never the body (it may hold a password).
        raise _Invalid(
            "body", f"malformed JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _Invalid(name, "must be an integer") from None
    if not low <= value <= high:
        raise _Invalid(name, f"must be between {low} and {high}")
    return value


def dead_letter_to_v1(event: WebhookEvent) -> dict[str, Any]:
    try:
        payload: Any = json.loads(event.payload)
    except ValueError:
        payload = None
    return {
        "id": event.id,
        "mailbox": event.mailbox_id,
        "type": event.type,
        "url": redact_url(event.url),
        "attempts": event.attempts,
        "last_error": event.last_error,
        "created_at": event.created_at,
        "dead_at": event.dead_at,
        "event": payload,
    }


def v1_blueprint(
    control: StoreListenerControl,
    store: Store,
    *,
    default_webhook: WebhookTarget = _NO_DEFAULT,
    on_replay: Callable[[WebhookEvent], None] | None = None,
    history: Callable[[str], Mapping[str, Any] | None] | None = None,
) -> Blueprint:
    """``default_webhook``: EMLISTEN_WEBHOOK_URL / _SECRET; ``on_replay`` wakes the sender of a
    replayed event's receiver (other nodes' senders find it by polling)."""

    blueprint = Blueprint("v1", __name__)

    @blueprint.errorhandler(_Invalid)
    async def invalid_request(error: _Invalid) -> Response:
        return _invalid(error.error)

    @blueprint.errorhandler(ValidationError)
    async def rejected(error: ValidationError) -> Response:
        return _invalid(error)

    async def describe(mailbox_id: str, *, detail: bool) -> dict[str, Any] | None:
        config = await store.get_mailbox(mailbox_id)
        if config is None:
            return None
        status = (await store.get_statuses([mailbox_id])).get(mailbox_id)
        owner = (await store.lease_owners([mailbox_id])).get(mailbox_id)
        checkpoints = await store.get_checkpoints(mailbox_id) if detail else None
        return mailbox_to_v1(
            config,
            status,
            owner=owner,
            checkpoints=checkpoints,
            history=history(mailbox_id) if history else None,
        )

    # -- mailboxes -------------------------------------------------------------------------------

    @blueprint.get("/v1/mailboxes")
    async def list_mailboxes() -> Response:
        offset = _int_arg("offset", 0, 0, 10**9)
        limit = _int_arg("limit", MAX_PAGE * 100, 1, MAX_PAGE * 100)
        wanted_state = request.args.get("state") or None
        if wanted_state is not None and wanted_state not in {s.value for s in MailboxState}:
            raise _Invalid("state", f"must be one of {', '.join(s.value for s in MailboxState)}")
        wanted_protocol = request.args.get("protocol") or None
        wanted_kind = request.args.get("kind") or None
        if wanted_kind not in (None, "webhook", "creatio"):
            raise _Invalid("kind", 'must be "webhook" or "creatio"')
        text = (request.args.get("q") or "").strip().lower()

        all_ids = sorted(await store.list_mailbox_ids())
        statuses = await store.get_statuses(all_ids)
        ids = all_ids
        if wanted_state is not None:
            ids = [
                mid
                for mid in ids
                if (s.state.value if (s := statuses.get(mid)) else MailboxState.STARTING.value)
                == wanted_state
            ]
        configs = None
        if wanted_protocol or wanted_kind or text:
            # Filtering on configuration reads every mailbox: fine at 10,000 (one batched read).
            configs = await store.get_mailboxes(ids)
            ids = [
                mid
                for mid in ids
                if (config := configs.get(mid)) is not None
                and (wanted_protocol is None or config.protocol == wanted_protocol)
                and (wanted_kind is None or (config.webhook is None) == (wanted_kind == "creatio"))
                and (
                    not text
                    or text in mid
                    or text in config.user_name.lower()
                    or text in config.sender_email.lower()
                    or text in config.imap.host.lower()
                )
            ]
        page_ids = ids[offset : offset + limit]
        if configs is None:
            configs = await store.get_mailboxes(page_ids)
        owners = await store.lease_owners(page_ids)
        checkpoints = await store.get_checkpoints_of(page_ids)
        items = [
            mailbox_to_v1(
                configs[mid],
                statuses.get(mid),
                owner=owners.get(mid),
                checkpoints=checkpoints.get(mid, {}),
                history=history(mid) if history else None,
            )
            for mid in page_ids
            if mid in configs
        ]
        # Counted from the statuses read above: a second pass (Store.state_counts) would read
        # every status again (half the time of this answer with Redis at 10,000 mailboxes).
        states: dict[str, int] = {}
        for mailbox_id in all_ids:
            status = statuses.get(mailbox_id)
            state = status.state.value if status is not None else MailboxState.STARTING.value
            states[state] = states.get(state, 0) + 1
        return _json(
            {
                "items": items,
                "total": len(ids),
                "offset": offset,
                "limit": limit,
                "states": states,
                # The names `emlisten status` and older scripts read (same list as "items").
                "mailboxes": items,
                "count": len(items),
            }
        )

    @blueprint.post("/v1/mailboxes")
    async def create_mailbox() -> Response:
        body = await _json_body()
        mailbox = parse_v1_mailbox(body, default=default_webhook)
        if await store.get_mailbox(mailbox.id) is not None:
            return _problem(409, "a mailbox with this id exists", "id", "already registered")
        await control.create([mailbox])
        log.info("v1: mailbox registered", extra={"mailbox": mailbox.id})
        described = await describe(mailbox.id, detail=False)
        response = _json(described or {"id": mailbox.id}, 201)
        response.headers["Location"] = f"/v1/mailboxes/{mailbox.id}"
        return response

    @blueprint.get("/v1/mailboxes/<mailbox_id>")
    async def get_mailbox(mailbox_id: str) -> Response:
        described = await describe(mailbox_id.lower(), detail=True)
        if described is None:
            return _problem(404, "no such mailbox")
        return _json(described)

    @blueprint.patch("/v1/mailboxes/<mailbox_id>")
    async def change_mailbox(mailbox_id: str) -> Response:
        mailbox_id = mailbox_id.lower()
        current = await store.get_mailbox(mailbox_id)
        if current is None:
            return _problem(404, "no such mailbox")
        if current.webhook is None:
            return _problem(409, "registered through the Creatio API: change it there")
        changes = await _json_body()
        if not isinstance(changes, dict):
            raise _Invalid("body", "must be a JSON object")
        if "id" in changes and str(changes["id"]).lower() != mailbox_id:
            raise _Invalid("id", "cannot be changed")
        merged = v1_body_of(current)
        if ("tls" in changes or "port" in changes) and "security" not in changes:
            merged.pop("security", None)  # let tls/port decide again, as on registration
        webhook_changes = changes.get("webhook")
        if isinstance(webhook_changes, dict) and isinstance(merged.get("webhook"), dict):
            changes = {**changes, "webhook": {**merged["webhook"], **webhook_changes}}
        merged.update(changes)
        mailbox = parse_v1_mailbox(merged, default=default_webhook)
        await control.update([mailbox])
        return _json(await describe(mailbox_id, detail=True))

    @blueprint.delete("/v1/mailboxes/<mailbox_id>")
    async def delete_mailbox(mailbox_id: str) -> Response:
        mailbox_id = mailbox_id.lower()
        if await store.get_mailbox(mailbox_id) is None:
            return _problem(404, "no such mailbox")
        await control.close([mailbox_id])
        return Response("", status=204)

    # -- dead letters ----------------------------------------------------------------------------

    @blueprint.get("/v1/dead-letters")
    async def list_dead_letters() -> Response:
        offset = _int_arg("offset", 0, 0, 10**9)
        limit = _int_arg("limit", DEFAULT_PAGE, 1, MAX_PAGE)
        mailbox = (request.args.get("mailbox") or "").lower() or None
        if mailbox is None:
            total, events = await store.list_dead_letters(offset=offset, limit=limit)
        else:
            # One mailbox's: read them all (dead letters are few, or something is very wrong).
            everything: list[WebhookEvent] = []
            while page := (await store.list_dead_letters(offset=len(everything), limit=MAX_PAGE))[1]:
                everything += page
                if len(page) < MAX_PAGE:
                    break
            chosen = [event for event in everything if event.mailbox_id == mailbox]
            total, events = len(chosen), chosen[offset : offset + limit]
        return _json(
            {
                "items": [dead_letter_to_v1(e) for e in events],
                "total": total,
                "offset": offset,
                "limit": limit,
            }
        )

    @blueprint.get("/v1/dead-letters/<event_id>")
    async def get_dead_letter(event_id: str) -> Response:
        event = await store.get_dead_letter(event_id)
        if event is None:
            return _problem(404, "no such dead letter")
        return _json(dead_letter_to_v1(event))

    @blueprint.delete("/v1/dead-letters/<event_id>")
    async def drop_dead_letter(event_id: str) -> Response:
        if not await store.drop_dead_letter(event_id):
            return _problem(404, "no such dead letter")
        return Response("", status=204)

    async def replay(event_id: str) -> WebhookEvent | None:
        event = await store.replay_dead_letter(event_id)
        if event is not None and on_replay is not None:
            on_replay(event)
        return event

    @blueprint.post("/v1/dead-letters/<event_id>/replay")
    async def replay_one(event_id: str) -> Response:
        event = await replay(event_id)
        if event is None:
            return _problem(404, "no such dead letter")
        log.info("v1: dead letter replayed", extra={"mailbox": event.mailbox_id})
        return _json({"id": event.id, "replayed": 1}, 202)

    @blueprint.post("/v1/dead-letters/replay")
    async def replay_all() -> Response:
        mailbox = (request.args.get("mailbox") or "").lower() or None
        replayed = 0
        skipped = 0  # dead letters left in place (ahead of the next page)
        # Each at most once per call: one that fails again at once comes back to the list.
        seen: set[str] = set()
        while True:
            _total, events = await store.list_dead_letters(offset=skipped, limit=MAX_PAGE)
            if not events:
                break
            for event in events:
                if event.id in seen or (mailbox is not None and event.mailbox_id != mailbox):
                    skipped += 1
                    continue
                seen.add(event.id)
                if await replay(event.id) is not None:
                    replayed += 1
        log.info("v1: %d dead letter(s) replayed", replayed)
        return _json({"replayed": replayed}, 202)

    # -- outboxes --------------------------------------------------------------------------------

    @blueprint.get("/v1/webhooks/outboxes")
    async def outboxes() -> Response:
        """Receivers with events waiting: how many, and how the oldest one is doing."""
        items: list[dict[str, Any]] = []
        for endpoint in await store.outbox_endpoints():
            oldest = await store.outbox_peek(endpoint, 1)
            if not oldest:
                continue  # emptied meanwhile
            head = oldest[0]
            items.append(
                {
                    "url": redact_url(head.url),
                    "waiting": await store.outbox_count(endpoint),
                    "oldest": {
                        "id": head.id,
                        "mailbox": head.mailbox_id,
                        "created_at": head.created_at,
                        "attempts": head.attempts,
                        "last_error": head.last_error,
                        "next_attempt_at": head.next_attempt_at or None,
                    },
                }
            )
        items.sort(key=lambda item: -item["waiting"])
        return _json({"items": items, "total": len(items)})

    # -- the document ----------------------------------------------------------------------------

    @blueprint.get("/v1/openapi.json")
    async def openapi() -> Response:
        return _json(openapi_document())

    return blueprint


def node_v1_blueprint(
    settings: Settings,
    control: StoreListenerControl,
    store: Store,
    sink: Sink,
    *,
    history: Callable[[str], Mapping[str, Any] | None] | None = None,
) -> Blueprint:
    """The ``/v1`` blueprint as a node serves it: defaults from settings, replays wake the
    node's webhook sender (the webhook sink is the node's sink, or one route of it)."""

    from emlisten.sink.webhook import find_webhook_sink

    webhooks = find_webhook_sink(sink)
    secrets = tuple((settings.webhook_secret or "").split())
    return v1_blueprint(
        control,
        store,
        default_webhook=WebhookTarget(url=settings.webhook_url or "", secrets=secrets),
        on_replay=webhooks.wake if webhooks is not None else None,
        history=history,
    )
