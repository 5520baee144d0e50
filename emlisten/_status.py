"""``emlisten status``: what a running cluster is doing, from any node's admin API.

Exit codes: 0 healthy, 1 degraded (some mailboxes failing), 2 unreachable.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

EXIT_HEALTHY = 0
EXIT_DEGRADED = 1
EXIT_UNREACHABLE = 2

FAILING_STATES = frozenset({"authenticationError", "connectError"})


class Unreachable(Exception):
    pass


def fetch(url: str, token: str | None, timeout: float = 10.0) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    base = url.rstrip("/")
    try:
        with httpx.Client(timeout=timeout, headers=headers) as client:
            nodes = client.get(f"{base}/v1/nodes")
            mailboxes = client.get(f"{base}/v1/mailboxes")
            for response in (nodes, mailboxes):
                response.raise_for_status()
            snapshot = {"nodes": nodes.json()["nodes"], "mailboxes": mailboxes.json()["mailboxes"]}
            # /readyz says which routes anyone can call without a token (503 still has a body).
            ready = client.get(f"{base}/readyz")
            opened = ready.json().get("open_without_token") if ready.content else None
            if opened:
                snapshot["open_without_token"] = list(opened)
            return snapshot
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise Unreachable(f"cannot read {base}: {exc}") from None


def summarise(snapshot: dict[str, Any]) -> dict[str, int]:
    mailboxes = snapshot["mailboxes"]
    return {
        "nodes": len(snapshot["nodes"]),
        "mailboxes": len(mailboxes),
        "listening": sum(m["state"] == "listening" for m in mailboxes),
        "failing": sum(m["state"] in FAILING_STATES for m in mailboxes),
        "starting": sum(m["state"] in ("starting", "connecting") for m in mailboxes),
        "delivered": sum(int(m.get("delivered") or 0) for m in mailboxes),
    }


def exit_code(summary: dict[str, int]) -> int:
    return EXIT_DEGRADED if summary["failing"] else EXIT_HEALTHY


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render(console: Console, snapshot: dict[str, Any], *, limit: int) -> None:
    nodes = Table(title="Nodes", title_justify="left")
    for column in ("node", "role", "mailboxes", "heartbeat", "uptime", "version"):
        nodes.add_column(
            column, justify="right" if column in ("mailboxes", "heartbeat", "uptime") else "left"
        )
    for node in snapshot["nodes"]:
        nodes.add_row(
            node["id"],
            node["role"],
            str(node["mailboxes"]),
            _age(node.get("heartbeat_age_seconds")),
            _age(node.get("uptime_seconds")),
            node.get("version", ""),
        )
    console.print(nodes)

    now = time.time()
    mailboxes = Table(title="Mailboxes", title_justify="left")
    for column in ("mailbox", "email", "state", "node", "delivered", "since"):
        mailboxes.add_column(column, no_wrap=True)
    mailboxes.add_column("last error", overflow="fold")
    ordered = sorted(snapshot["mailboxes"], key=lambda m: (m["state"] not in FAILING_STATES, m["email"]))
    for m in ordered[:limit]:
        style = (
            "red" if m["state"] in FAILING_STATES else ("green" if m["state"] == "listening" else "yellow")
        )
        updated = m.get("updated_at")
        mailboxes.add_row(
            m["id"],
            m["email"],
            f"[{style}]{m['state']}[/{style}]",
            m.get("node") or "-",
            str(m.get("delivered", 0)),
            _age(now - updated) if updated else "-",
            m.get("last_error") or "",
        )
    console.print(mailboxes)
    if len(ordered) > limit:
        console.print(f"... and {len(ordered) - limit} more (use --json for all)")
    for routes in snapshot.get("open_without_token", []):
        console.print(f"[red]warning: open to anyone without a token: {routes}[/red]")
    s = summarise(snapshot)
    console.print(
        f"{s['nodes']} node(s), {s['mailboxes']} mailbox(es): [green]{s['listening']} listening[/green], "
        f"[red]{s['failing']} failing[/red], {s['starting']} starting; {s['delivered']} delivered"
    )


def run(url: str, *, as_json: bool, watch: float | None, token: str | None, limit: int) -> int:
    # Piped output keeps whole lines (greppable); a terminal gets its own width.
    console = Console() if sys.stdout.isatty() else Console(width=240, no_color=True)
    while True:
        try:
            snapshot = fetch(url, token)
        except Unreachable as exc:
            print(f"emlisten status: {exc}", file=sys.stderr)
            code = EXIT_UNREACHABLE
        else:
            summary = summarise(snapshot)
            code = exit_code(summary)
            if as_json:
                print(json.dumps({**snapshot, "summary": summary}, indent=2, ensure_ascii=False))
            else:
                if watch:
                    console.clear()
                render(console, snapshot, limit=limit)
        if not watch:
            return code
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return code
