"""``python -m bench <scenario> [options]``: run one benchmark scenario and write its results."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bench import (
    backlog,
    burst,
    cold_start,
    ews_ntlm,
    exchange_history,
    failover,
    follow_up,
    idle,
    latency,
    pause,
    random_traffic,
    restarts,
    soak,
    sqlite_store,
    webhook_outage,
)
from bench._harness import BenchError, print_table, write_results

SCENARIOS = {
    "idle": (idle, "memory per mailbox, idle CPU and cold start of N listening mailboxes"),
    "latency": (latency, "APPEND-done to callback, next to a bare IDLE client's EXISTS (the floor)"),
    "burst": (burst, "drain rate, losses and duplicates after a backlog built while emlisten was frozen"),
    "failover": (
        failover,
        "SIGKILL a primary of a Redis + RabbitMQ cluster: takeover time, mail lost or doubled",
    ),
    "backlog": (
        backlog,
        "N mailboxes x M mails appended while emlisten was frozen: drain rate, sessions re-opened",
    ),
    "pause": (
        pause,
        "one node frozen longer than its lease TTL: sessions re-opened, then one mail per mailbox",
    ),
    "cold-start": (
        cold_start,
        "N mailboxes in one create call to a fresh process, beside the bare-client floor",
    ),
    "follow-up": (follow_up, "a second mail 1.4-2.0 s after the first on a hibernating Dovecot: its delay"),
    "random-traffic": (random_traffic, "mail to random mailboxes at a fixed rate: delays, mails that waited"),
    "restarts": (
        restarts,
        "a single container (SQLite data directory) restarted N times while mail arrives: lost, doubled",
    ),
    "sqlite-store": (
        sqlite_store,
        "the durable embedded store: checkpoint advances/s, load and start-up time with N mailboxes",
    ),
    "soak": (soak, "faults one after another while mail flows: every mail of the ledger delivered, once"),
    "webhook-latency": (
        webhook_outage.latency,
        "APPEND-done to the webhook call, next to the Creatio callback of the same kind of mailbox",
    ),
    "webhook-outage": (
        webhook_outage.outage,
        "receiver down N s while mails arrive: all delivered once after it returns; another one meanwhile",
    ),
    "ews-ntlm": (
        ews_ntlm,
        "EWS mailboxes on an NTLM-only server: memory per mailbox vs Basic, cold start, connections",
    ),
    "exchange-history": (
        exchange_history,
        "history load of N messages from the EWS simulator beside live mail: mails/s, duplicates",
    ),
}


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = root.add_subparsers(dest="scenario", required=True)
    for name, (module, help_text) in SCENARIOS.items():
        sub = commands.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    module, _ = SCENARIOS[args.scenario]
    try:
        result = module.run(args)
    except BenchError as exc:
        print(f"bench {args.scenario}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bench {args.scenario}: interrupted", file=sys.stderr)
        return 130
    print_table(result)
    json_path, md_path = write_results(result, args.results_dir)
    print(f"\nresults: {json_path}\n         {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
