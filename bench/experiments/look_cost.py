"""CPU per look: a short side session (TLS connect, LOGIN, STATUS, LOGOUT), as a listener's
safety-net look opens one, for emlisten's process and for Dovecot's processes together.

    python -m bench.experiments.look_cost --looks 500 --concurrency 4

Runs ``--looks`` of them, ``--concurrency`` at once (the look limiter's 4), against a private
Dovecot, and prints the CPU of this process and of every Dovecot process (live ones, and the
children that exited: the master's ``cutime``) per look. Not a benchmark scenario: no result
file, it prints one line. Findings in docs/performance.md ("What a look costs").
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import trio

from emlisten.mail.imap import ImapSource
from emlisten.models import MailboxConfig, Security, ServerEndpoint
from tests.servers.dovecot import Dovecot


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _group_cpu(pgid: int) -> float:
    """CPU seconds of every process in ``pgid``, with the children they reaped."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return total / tick


async def _measure(dovecot: Dovecot, looks: int, concurrency: int) -> None:
    users = [dovecot.add_user() for _ in range(50)]
    source = ImapSource(ca_file=str(dovecot.ca_file))
    mailboxes = [
        MailboxConfig(
            id=f"m{index}",
            user_name=user.name,
            password=user.password,
            imap=ServerEndpoint(dovecot.host, dovecot.imaps_port, Security.SSL_ON_CONNECT),
            bpm_endpoint="",
        )
        for index, user in enumerate(users)
    ]
    pgid = dovecot.process_group
    limiter = trio.CapacityLimiter(concurrency)

    async def look(index: int) -> None:
        async with limiter:
            client = await source.connect(mailboxes[index % len(mailboxes)])
            try:
                await client.status("INBOX", ("MESSAGES", "UIDNEXT", "UIDVALIDITY"))
            finally:
                await client.close()

    for index in range(20):  # warm-up: imap-login processes up, sessions cached
        await look(index)
    own, server, began = _own_cpu(), _group_cpu(pgid), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(looks):
            nursery.start_soon(look, index)
    own, server, wall = _own_cpu() - own, _group_cpu(pgid) - server, time.perf_counter() - began
    print(
        f"{looks} looks, {concurrency} at once; per look: "
        f"emlisten {own / looks * 1000:.2f} ms CPU, Dovecot {server / looks * 1000:.2f} ms CPU; "
        f"{looks / wall:.0f} looks/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--looks", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    with Dovecot(hibernate_timeout="2s") as dovecot:
        trio.run(_measure, dovecot, args.looks, args.concurrency)


if __name__ == "__main__":
    main()
