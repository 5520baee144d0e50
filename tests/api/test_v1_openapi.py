"""/v1/openapi.json describes every route the node's app serves, and nothing else."""

from __future__ import annotations

import re

import httpx
import trio
from openapi_spec_validator import validate

from emlisten.api.app import create_app
from emlisten.api.history import history_blueprint
from emlisten.api.openapi import described_routes
from emlisten.api.server import serve_api
from emlisten.api.v1 import node_v1_blueprint
from emlisten.config import Settings
from emlisten.metrics import Metrics
from emlisten.service.history import HistoryLoads
from emlisten.service.listeners import StoreListenerControl
from emlisten.service.node import _feature_blueprints, build_local_adapters


def node_app(settings: Settings) -> object:
    """The app as emlisten.service.node._run builds it."""
    adapters = build_local_adapters(settings)
    metrics = Metrics()
    control = StoreListenerControl(adapters.store, adapters.queue, node_id="n1", role="all")
    history = HistoryLoads(settings, adapters.store, adapters.source, adapters.sink)
    return create_app(
        control,
        blueprints=[
            *_feature_blueprints(settings, adapters, control, metrics),
            history_blueprint(history, adapters.store),
            node_v1_blueprint(settings, control, adapters.store, adapters.sink, history=history.progress),
        ],
    )


def served_routes(app: object) -> set[tuple[str, str]]:
    routes = set()
    for rule in app.url_map.iter_rules():  # type: ignore[attr-defined]
        if rule.endpoint == "static":
            continue  # Quart's default static folder (none exists)
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        routes |= {(method, path) for method in rule.methods if method not in ("HEAD", "OPTIONS")}
    return routes


def test_every_route_is_described_and_every_description_is_a_route() -> None:
    served = served_routes(node_app(Settings(node_id="n1")))
    described = described_routes()
    assert sorted(served - described) == [], "routes missing from emlisten/api/openapi.py"
    assert sorted(described - served) == [], "described in emlisten/api/openapi.py but not served"


async def test_the_document_is_served_and_valid_openapi(nursery: trio.Nursery) -> None:
    app = node_app(Settings(node_id="n1"))
    port = await nursery.start(serve_api, app, "127.0.0.1", 0)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        response = await http.get("/v1/openapi.json")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    assert document["paths"]["/v1/mailboxes"]["post"]["responses"]["201"]
