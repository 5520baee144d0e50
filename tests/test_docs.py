"""Every setting is documented (docs/configuration.md is the reference operators read)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from emlisten.config import Settings, env_name

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_setting_is_in_the_configuration_reference() -> None:
    text = (DOCS / "configuration.md").read_text()
    missing = [
        env_name(f.name)
        for f in dataclasses.fields(Settings)
        if env_name(f.name) not in text and not _documented_as_group(text, f.name)
    ]
    assert missing == []


def _documented_as_group(text: str, name: str) -> bool:
    # "EMLISTEN_GRAPH_TENANT_ID, _CLIENT_ID, _CLIENT_SECRET" documents the group in one row.
    parts = env_name(name).split("_")
    for cut in range(len(parts) - 1, 1, -1):
        prefix, suffix = "_".join(parts[:cut]), "_" + "_".join(parts[cut:])
        if f"`{prefix}" in text and f"`{suffix}`" in text.replace(f"`{prefix}{suffix}`", ""):
            return True
    return False
