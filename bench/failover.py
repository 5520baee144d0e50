"""Scenario ``failover``: not available yet.

It needs several emlisten nodes sharing the Redis store and leases (design: "failover < 10 s"),
which this version does not have. It exits with status 2 and says so; it never prints a figure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench._harness import RESULTS_DIR, BenchError, Result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mailboxes", type=int, default=1000, help="(not used yet)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="(not used yet)")


def run(args: argparse.Namespace) -> Result:
    raise BenchError(
        "the failover scenario is not available yet: it needs several emlisten nodes sharing the "
        "Redis store with mailbox leases, which this version does not have. No figure was measured."
    )
