"""Scenario ``backlog``: N mailboxes x M mails appended while emlisten is frozen, then the drain.

The N x M shape of ``burst`` (bench/burst.py, same code): N listening mailboxes (default 1,000),
M mails of about 5 KB each (default 5) appended to every one of them while emlisten is stopped
(SIGSTOP), then SIGCONT. Reported: the drain rate (mails delivered / (last callback - SIGCONT)),
lost, duplicated, and how many IMAP sessions emlisten opened meanwhile: LOGIN/AUTHENTICATE
answered OK, from ``emlisten_imap_commands_total`` on each process's ``/metrics`` read before the
freeze and after the drain, next to how many of the mail connections held before the freeze are
still the same sockets afterwards, and the "lost N lease(s)" lines logged meanwhile.

Appending N x M mails takes a while (some hundreds of APPENDs per second here), so the freeze
lasts longer than the default lease TTL (5 s): with ``--topology all`` (in-memory store) the
process finds its leases expired when it is thawed, and what that costs shows in the session
figures. With ``--topology primary+secondary`` (Redis + RabbitMQ, both processes frozen) the
lease TTL is raised as in burst (``--lease-ttl``, 60 s) so that the run measures the drain, not
a failover.

Targets: >= 1,000 mails/s with ``--topology all``, >= 700 mails/s with primary+secondary; 0 lost,
0 duplicated.
"""

from __future__ import annotations

import argparse

from bench import burst
from bench._harness import BenchError, Result

TARGETS = {"all": 1000.0, "primary+secondary": 700.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    burst.add_arguments(parser, mailboxes=1000)
    parser.add_argument(
        "--mails-per-mailbox",
        type=int,
        default=5,
        help="mails appended to every mailbox while frozen (default 5; --mails is ignored)",
    )
    parser.set_defaults(floor=True)


def run(args: argparse.Namespace) -> Result:
    if args.mailboxes < 1 or args.mails_per_mailbox < 1:
        raise BenchError("--mailboxes and --mails-per-mailbox must be at least 1")
    args.mails = args.mailboxes * args.mails_per_mailbox
    return burst.run_scenario(args, "backlog", TARGETS)
