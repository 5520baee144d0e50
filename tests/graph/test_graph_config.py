"""Graph settings and the node's wiring (no network)."""

from __future__ import annotations

import pytest

from emlisten.config import load_settings
from emlisten.errors import ConfigError
from emlisten.mail.graph import GraphSource, announce_api, graph_source_from_settings, graph_sources
from emlisten.mail.router import RoutingSource
from emlisten.service.node import mail_sources


def test_public_url_and_app_credentials_settings() -> None:
    settings = load_settings(
        {
            "EMLISTEN_PUBLIC_URL": "https://emlisten.example.com/",
            "EMLISTEN_GRAPH_TENANT_ID": "t",
            "EMLISTEN_GRAPH_CLIENT_ID": "c",
            "EMLISTEN_GRAPH_CLIENT_SECRET": "graph-client-secret-xyz",
        }
    )
    assert settings.public_url == "https://emlisten.example.com/"
    assert "graph-client-secret-xyz" not in repr(settings)
    source = graph_source_from_settings(settings)
    assert source.public_url == "https://emlisten.example.com"
    with pytest.raises(ConfigError):
        load_settings({"EMLISTEN_PUBLIC_URL": "emlisten.example.com"})
    with pytest.raises(ConfigError):
        load_settings({"EMLISTEN_GRAPH_TENANT_ID": "t"})


def test_every_node_has_a_graph_source_that_learns_the_api_address() -> None:
    routing = RoutingSource(mail_sources(load_settings({})))
    (graph,) = graph_sources(routing)
    assert isinstance(graph, GraphSource) and graph.public_url is None
    announce_api(routing, "0.0.0.0", 8080)
    assert graph.public_url == "http://127.0.0.1:8080"
    # A configured public URL wins over the listening address.
    configured = GraphSource(public_url="https://public.example")
    announce_api(configured, "127.0.0.1", 1)
    assert configured.public_url == "https://public.example"
