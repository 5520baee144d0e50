"""Microsoft Graph mail source (Exchange Online): change notifications and delta queries."""

from emlisten.mail.graph.source import (
    AppCredentials,
    GraphReader,
    GraphSettings,
    GraphSource,
    announce_api,
    graph_source_from_settings,
    graph_sources,
)

__all__ = [
    "AppCredentials",
    "GraphReader",
    "GraphSettings",
    "GraphSource",
    "announce_api",
    "graph_source_from_settings",
    "graph_sources",
]
