"""The web console served at ``/ui`` (docs/console.md): static files in ``static/``, plain HTML,
CSS and JavaScript modules with no build step, and uPlot vendored under ``static/vendor/``.
The routes are in :mod:`emlisten.ui.routes`."""

from __future__ import annotations

from importlib import resources
from typing import Any

__all__ = ["PUBLIC_PATHS", "static_files"]


def static_files() -> list[str]:
    """Paths of the shipped files, relative to ``static/`` (e.g. ``vendor/uPlot.min.css``)."""
    found: list[str] = []

    def walk(folder: Any, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif not entry.name.startswith("."):
                found.append(prefix + entry.name)

    walk(resources.files(__name__) / "static", "")
    return sorted(found)


#: What answers without the API token: the page and its files, which hold no data (the page
#: asks for the token and sends it with every API call).
PUBLIC_PATHS = ("/ui", "/ui/", *(f"/ui/static/{path}" for path in static_files()))
