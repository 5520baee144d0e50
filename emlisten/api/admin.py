"""emlisten's own API, for operators and ``emlisten status``: ``/v1/nodes``,
``/readyz`` (store and queue reachable; liveness stays on ``/api/listeners/status``)."""

from __future__ import annotations

import json

from quart import Blueprint, Response, current_app

from emlisten.metrics import CONTENT_TYPE, Metrics
from emlisten.service.control import AdminView


def _json(payload: object, status: int = 200) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False), status=status, content_type="application/json")


def admin_blueprint(view: AdminView, metrics: Metrics | None = None) -> Blueprint:
    blueprint = Blueprint("admin", __name__)

    if metrics is not None:

        @blueprint.get("/metrics")
        async def prometheus() -> Response:
            return Response(metrics.render(), status=200, content_type=CONTENT_TYPE)

    # GET /v1/mailboxes is served by emlisten.api.v1 (paged, with the same fields).

    @blueprint.get("/v1/nodes")
    async def nodes() -> Response:
        items = await view.nodes()
        return _json({"nodes": items, "count": len(items)})

    @blueprint.get("/readyz")
    async def readyz() -> Response:
        checks = await view.readiness()
        ready = all(value == "ok" for value in checks.values())
        payload: dict[str, object] = {"ready": ready, "checks": checks}
        # Routes anyone can call without a token (emlisten.api._guard.ApiAccess): said here too.
        open_routes = current_app.config.get("EMLISTEN_OPEN_WITHOUT_TOKEN")
        if open_routes:
            payload["open_without_token"] = open_routes
        return _json(payload, 200 if ready else 503)

    return blueprint
