"""The web console (``/ui``): static files shipped in the package, and the JSON it reads.

``/ui/`` and ``/ui/static/*`` are public (the page holds no data; it asks for the API token when
one is set); ``/ui/api/*`` and ``/v1/stats`` need the token like every other route. See
docs/console.md.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from quart import Blueprint, Response, current_app, redirect, request
from werkzeug.exceptions import NotFound

from emlisten import __version__
from emlisten.abc import Store
from emlisten.metrics import SERIES_MINUTES, Activity
from emlisten.service.listeners import StoreListenerControl
from emlisten.ui import static_files
from emlisten.ui.listing import MAX_PAGE, SORTS, MailboxDirectory, folders_of, row, summarise

__all__ = ["CONTENT_SECURITY_POLICY", "console_blueprint"]

#: Everything the page loads comes from this origin; nothing inline, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True)
class _StaticFile:
    body: bytes
    content_type: str
    etag: str


def _load_static() -> dict[str, _StaticFile]:
    """Every file under ``emlisten/ui/static``, read once (about 70 KB), keyed by its path."""
    folder = resources.files("emlisten.ui") / "static"
    files: dict[str, _StaticFile] = {}
    for path in static_files():
        body = folder.joinpath(*path.split("/")).read_bytes()
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith("javascript"):
            content_type += "; charset=utf-8"
        files[path] = _StaticFile(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
    return files


def _json(payload: Any, status: int = 200) -> Response:
    response = Response(
        json.dumps(payload, ensure_ascii=False), status=status, content_type="application/json; charset=utf-8"
    )
    response.headers["Cache-Control"] = "no-store"
    return response


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        value = default
    return max(low, min(high, value))


def console_blueprint(
    control: StoreListenerControl,
    store: Store,
    activity: Activity,
    *,
    node_id: str,
) -> Blueprint:
    blueprint = Blueprint("console", __name__)
    static = _load_static()
    directory = MailboxDirectory(store)

    def serve(path: str) -> Response:
        found = static.get(path)
        if found is None:
            raise NotFound()
        if request.headers.get("If-None-Match") == found.etag:
            response = Response(b"", status=304)
        else:
            response = Response(found.body, status=200, content_type=found.content_type)
        response.headers["ETag"] = found.etag
        # Revalidate every time: an upgraded service serves its own page at once.
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @blueprint.get("/ui")
    async def console_root() -> Any:
        return redirect("/ui/", 302)

    @blueprint.get("/ui/")
    async def console_page() -> Response:
        return serve("index.html")

    @blueprint.get("/ui/static/<path:path>")
    async def console_static(path: str) -> Response:
        return serve(path)

    @blueprint.get("/ui/api/overview")
    async def overview() -> Response:
        registered, counts = await directory.totals(refresh_later=current_app.add_background_task)
        status = {
            "Node": node_id,
            "Role": control.role,
            "Store": store.name,
            "Connections": {"Total": registered, **counts},
            **control.local_status(),
        }
        return _json(
            {
                "node": node_id,
                "version": __version__,
                "time": time.time(),
                "status": status,
                "nodes": await control.nodes(),
            }
        )

    @blueprint.get("/ui/api/mailboxes")
    async def mailboxes() -> Response:
        sort = request.args.get("sort", "email")
        page = await directory.page(
            activity,
            query=request.args.get("q", "")[:200],
            state=request.args.get("state", ""),
            protocol=request.args.get("protocol", ""),
            sort=sort if sort in SORTS else "email",
            offset=_int_arg("offset", 0, 0, 10**9),
            limit=_int_arg("limit", 50, 1, MAX_PAGE),
            refresh_later=current_app.add_background_task,
        )
        return _json(page)

    @blueprint.get("/ui/api/mailboxes/<mailbox_id>")
    async def mailbox(mailbox_id: str) -> Response:
        config = await store.get_mailbox(mailbox_id)
        if config is None:
            return _json({"Message": "No such mailbox"}, 404)
        summary = summarise(config)
        status = (await store.get_statuses([mailbox_id])).get(mailbox_id)
        owner = (await store.lease_owners([mailbox_id])).get(mailbox_id)
        checkpoints = await store.get_checkpoints(mailbox_id)
        detail = row(summary, status, owner, activity.events.last_delivery.get(mailbox_id))
        detail.update(
            {
                "folders": folders_of(summary, checkpoints),
                "webhook_url": summary.webhook_url or None,
                "events": activity.events.recent(mailbox_id),
                "events_node": node_id,
            }
        )
        return _json(detail)

    @blueprint.get("/v1/stats")
    async def stats() -> Response:
        minutes = activity.series.snapshot()
        return _json(
            {
                "node": node_id,
                "window_minutes": SERIES_MINUTES,
                "minutes": minutes,
                "delivered": sum(m["delivered"] for m in minutes),
                "failed": sum(m["failed"] for m in minutes),
            }
        )

    return blueprint
