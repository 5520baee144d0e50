"""EMLISTEN_GRAPH_BASE_URL and EMLISTEN_GRAPH_AUTHORITY: Creatio's own fields (ServiceUrl
https://graph.microsoft.com, or the token fields alone) reach whatever Graph endpoint the node is
configured for (a national cloud, here the Graph simulator), with no emlisten-only field."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import trio

from emlisten.config import load_settings
from emlisten.errors import ConfigError
from emlisten.mail.graph import graph_source_from_settings
from emlisten.mail.graph.source import graph_origin, graph_scope
from emlisten.models import MailboxState
from tests.ews.test_source import mime
from tests.graph.conftest import start_graph_service
from tests.secret_scan import register_secret
from tests.servers.creatio import CreatioStandIn
from tests.servers.graph import GraphSimulator


def test_settings_choose_the_endpoint_and_the_authority() -> None:
    settings = load_settings(
        {
            "EMLISTEN_GRAPH_BASE_URL": "https://microsoftgraph.chinacloudapi.cn",
            "EMLISTEN_GRAPH_AUTHORITY": "https://login.chinacloudapi.cn",
            "EMLISTEN_GRAPH_TENANT_ID": "t",
            "EMLISTEN_GRAPH_CLIENT_ID": "c",
            "EMLISTEN_GRAPH_CLIENT_SECRET": "graph-client-secret-xyz",
        }
    )
    source = graph_source_from_settings(settings)
    assert source.settings.base_url == "https://microsoftgraph.chinacloudapi.cn"
    app = source._app_tokens.app if source._app_tokens else None
    assert app is not None and app.authority == "https://login.chinacloudapi.cn"
    assert app.scope == "https://microsoftgraph.chinacloudapi.cn/.default"
    defaults = load_settings({})
    assert (defaults.graph_base_url, defaults.graph_authority) == (
        "https://graph.microsoft.com",
        "https://login.microsoftonline.com",
    )
    assert graph_scope(defaults.graph_base_url) == "https://graph.microsoft.com/.default"
    for name in ("EMLISTEN_GRAPH_BASE_URL", "EMLISTEN_GRAPH_AUTHORITY"):
        with pytest.raises(ConfigError, match=name):
            load_settings({name: "graph.microsoft.us"})


def test_the_global_service_url_means_the_configured_endpoint() -> None:
    us = "https://graph.microsoft.us"
    assert graph_origin("https://graph.microsoft.com", us) == us
    assert graph_origin("https://graph.microsoft.com/", us) == us
    assert graph_origin("", us) == us
    # A ServiceUrl naming another endpoint is used as given.
    assert graph_origin("https://dod-graph.microsoft.us", us) == "https://dod-graph.microsoft.us"
    assert graph_origin("https://graph.microsoft.com", "https://graph.microsoft.com") == (
        "https://graph.microsoft.com"
    )


def creatio_fields(address: str, creatio: CreatioStandIn, **fields: Any) -> dict[str, Any]:
    """What Creatio sends for a Microsoft 365 mailbox: no emlisten extension field."""
    body: dict[str, Any] = {
        "Id": str(uuid.uuid4()),
        "UserName": address,
        "SenderEmailAddress": address,
        "ServiceUrl": "https://graph.microsoft.com",
        "BpmEndpoint": creatio.endpoint(),
        "BpmUser": "Supervisor",
        "FolderIds": [],
    }
    body.update(fields)
    return body


async def test_creatio_fields_reach_the_configured_graph_endpoint(
    nursery: trio.Nursery, graph_sim: GraphSimulator, creatio: CreatioStandIn
) -> None:
    tenant, client, secret = str(uuid.uuid4()), str(uuid.uuid4()), "app-secret-" + uuid.uuid4().hex
    register_secret(secret)
    graph_sim.register_app(tenant, client, secret)
    node = await start_graph_service(
        nursery,
        graph_sim,
        creatio,
        source_from_settings=True,
        graph_base_url=graph_sim.base_url,
        graph_authority=graph_sim.base_url,
        graph_tenant_id=tenant,
        graph_client_id=client,
        graph_client_secret=secret,
    )
    try:
        delegated, token = node.account()
        app_only, _ = node.account()
        with_token = creatio_fields(delegated, creatio, UseOAuth=True, AccessToken=token)
        # App-only access: the password Creatio requires is not used for Graph.
        without_token = creatio_fields(app_only, creatio, Password="unused-by-graph")
        register_secret("unused-by-graph")
        response = await node.http.post("/api/listeners/create", json=[with_token, without_token])
        assert response.status_code == 200, response.text
        for body in (with_token, without_token):
            await node.wait_state(body["Id"], MailboxState.LISTENING)
        graph_sim.add_message(delegated, mime("to the delegated mailbox"))
        graph_sim.add_message(app_only, mime("to the app-only mailbox"))
        (first,) = await creatio.wait_for_emails(with_token["Id"], 1, timeout=15)
        (second,) = await creatio.wait_for_emails(without_token["Id"], 1, timeout=15)
        assert first["Subject"] == "to the delegated mailbox"
        assert second["Subject"] == "to the app-only mailbox"
        assert graph_sim.token_requests == 1  # at the configured authority
    finally:
        await node.aclose()
