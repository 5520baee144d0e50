"""A bench node whose port another process bound first starts again on another port, instead
of the bench talking to the other process in its place (seen in CI: a secondary of the soak
exited with "Address already in use" while another test's node answered on its port)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

import bench._harness as harness
from bench._harness import EmlistenProcess


def _node_env(node_id: str) -> dict[str, str]:
    return {"EMLISTEN_NODE_ID": node_id, "EMLISTEN_LOG_LEVEL": "INFO"}


async def test_a_node_whose_port_was_taken_starts_again_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = EmlistenProcess(_node_env("other"), tmp_path, name="other")
    ours = EmlistenProcess(_node_env("ours"), tmp_path, name="ours")
    # No keep-alive: an open connection holds a node's shutdown up by Hypercorn's grace.
    async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0)) as http:
        other.spawn()
        try:
            await other.wait_ready(http)
            # free_port() hands out the port the other node holds, once: as when another
            # process binds a port between our check and our bind.
            ports = iter([other.port])
            free_port = harness.free_port
            monkeypatch.setattr(harness, "free_port", lambda: next(ports, None) or free_port())
            ours.spawn()
            assert ours.port == other.port
            try:
                await ours.wait_ready(http)
                assert ours.port != other.port
                status = (await http.get(f"{ours.url}/api/listeners/status")).json()
                assert status["Node"] == "ours"
                assert "Address already in use" in (tmp_path / "ours-0.log").read_text()
            finally:
                await ours.stop()
        finally:
            await other.stop()
