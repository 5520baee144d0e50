"""The ``emlisten`` command: ``serve`` runs a node, ``status`` asks a running one."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Sequence

import trio

from emlisten import __version__
from emlisten._logging import configure
from emlisten.config import Role, load_settings
from emlisten.errors import ConfigError, EmlistenError, QueueError, StoreError

log = logging.getLogger("emlisten")

EXIT_OK = 0
EXIT_CONFIG = 2
#: The store or queue could not be reached at start-up.
EXIT_UNAVAILABLE = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emlisten", description=__doc__)
    parser.add_argument("--version", action="version", version=f"emlisten {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run a node (flags override EMLISTEN_* variables)")
    serve.add_argument("--role", choices=[r.value for r in Role], help="default: all (env EMLISTEN_ROLE)")
    serve.add_argument(
        "--host", help="API bind address (env EMLISTEN_HOST, default 127.0.0.1; beyond it a token is needed)"
    )
    serve.add_argument("--port", type=int, help="API port (env EMLISTEN_PORT, default 8080)")
    serve.add_argument("--node-id", help="this node's id (env EMLISTEN_NODE_ID or PodName; default hostname)")
    serve.add_argument("--redis-url", help="shared store (env EMLISTEN_REDIS_URL); in-memory when unset")
    serve.add_argument("--amqp-url", help="work queue (env EMLISTEN_AMQP_URL); in-process when unset")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING... (env EMLISTEN_LOG_LEVEL)")
    serve.add_argument("--log-format", choices=["text", "json"], help="(env EMLISTEN_LOG_FORMAT)")

    status = commands.add_parser(
        "status",
        help="show what the cluster is doing (exit 0 healthy, 1 degraded, 2 unreachable)",
    )
    status.add_argument(
        "--url",
        default=os.environ.get("EMLISTEN_URL", "http://127.0.0.1:8080"),
        help="any node's API base URL (env EMLISTEN_URL)",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--watch", type=float, nargs="?", const=2.0, help="refresh every N seconds (default 2)"
    )
    status.add_argument("--limit", type=int, default=50, help="mailbox rows to show (default 50)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return _status(args)


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(
            role=Role(args.role) if args.role else None,
            host=args.host,
            port=args.port,
            node_id=args.node_id,
            redis_url=args.redis_url,
            amqp_url=args.amqp_url,
            log_level=args.log_level,
            log_format=args.log_format,
        )
    except ConfigError as exc:
        print(f"emlisten: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure(settings.log_level, settings.log_format, settings.node_id)
    from emlisten.service.node import check_topology, run_node
    from emlisten.service.watchdog import SlowStepLog

    instruments = [SlowStepLog(settings.slow_step_ms)] if settings.slow_step_ms > 0 else []
    try:
        check_topology(settings)
        trio.run(functools.partial(run_node, settings, process_exits=True), instruments=instruments)
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
    except Exception as exc:
        # Start-up failures arrive wrapped in exception groups by the nurseries: report the
        # cause in one line, not a traceback, when it is a known one.
        cause = _known_cause(exc)
        if cause is None:
            raise
        log.error("%s: %s", "configuration error" if isinstance(cause, ConfigError) else "stopped", cause)
        return EXIT_CONFIG if isinstance(cause, ConfigError) else EXIT_UNAVAILABLE
    return EXIT_OK


def _known_cause(exc: BaseException) -> EmlistenError | None:
    if isinstance(exc, (ConfigError, StoreError, QueueError)):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            cause = _known_cause(inner)
            if cause is not None:
                return cause
    return None


def _status(args: argparse.Namespace) -> int:
    from emlisten._status import run

    return run(
        args.url,
        as_json=args.json,
        watch=args.watch,
        token=os.environ.get("EMLISTEN_API_TOKEN") or None,
        limit=args.limit,
    )
