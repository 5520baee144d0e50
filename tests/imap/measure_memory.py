"""Memory per IDLE session of ImapSource.listen against a private Dovecot (not a test).

    .venv/bin/python -m tests.imap.measure_memory [sessions] [tls|plain]

Starts N listeners (one trio task each, like the service does), waits until all are in IDLE,
and prints the growth of the process RSS and of Python allocations (tracemalloc) per session.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc
from pathlib import Path

import trio

from emlisten.mail.imap import ImapSource
from emlisten.models import MailboxConfig, Security, ServerEndpoint, SyncTask
from tests.servers.dovecot import Dovecot


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def measure(dovecot: Dovecot, sessions: int, tls: bool) -> None:
    users = [dovecot.add_user() for _ in range(max(1, sessions // 100))]
    port = dovecot.imaps_port if tls else dovecot.imap_port
    security = Security.SSL_ON_CONNECT if tls else Security.NONE
    source = ImapSource(ca_file=str(dovecot.ca_file))

    async def on_new_mail(task: SyncTask) -> None:
        pass

    async with trio.open_nursery() as nursery:
        # Warm up: one session first, so one-time costs (SSLContext, imports) are not counted.
        warm = MailboxConfig(
            id="warm",
            user_name=users[0].name,
            password=users[0].password,
            imap=ServerEndpoint(dovecot.host, port, security),
            bpm_endpoint="",
        )
        await nursery.start(source.listen, warm, "INBOX", on_new_mail)
        gc.collect()
        rss_before = rss_kib()
        tracemalloc.start()
        traced_before = tracemalloc.get_traced_memory()[0]
        for i in range(sessions):
            user = users[i % len(users)]
            mailbox = MailboxConfig(
                id=f"m{i}",
                user_name=user.name,
                password=user.password,
                imap=ServerEndpoint(dovecot.host, port, security),
                bpm_endpoint="",
            )
            await nursery.start(source.listen, mailbox, "INBOX", on_new_mail)
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - traced_before
        tracemalloc.stop()
        # tracemalloc's own bookkeeping inflates RSS: measure RSS in a second, untraced round.
        rss_mid = rss_kib()
        for i in range(sessions):
            user = users[i % len(users)]
            mailbox = MailboxConfig(
                id=f"n{i}",
                user_name=user.name,
                password=user.password,
                imap=ServerEndpoint(dovecot.host, port, security),
                bpm_endpoint="",
            )
            await nursery.start(source.listen, mailbox, "INBOX", on_new_mail)
        gc.collect()
        rss_after = rss_kib()
        kind = "TLS" if tls else "plain"
        print(f"{sessions} {kind} IDLE sessions")
        print(f"  python allocations (tracemalloc): {traced / 1024 / sessions:.1f} KiB/session")
        print(f"  process RSS (untraced round):      {(rss_after - rss_mid) / sessions:.1f} KiB/session")
        print(f"  process RSS (traced round):        {(rss_mid - rss_before) / sessions:.1f} KiB/session")
        nursery.cancel_scope.cancel()


def main() -> None:
    sessions = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    tls = (sys.argv[2] if len(sys.argv) > 2 else "tls") == "tls"
    with Dovecot() as dovecot:
        trio.run(measure, dovecot, sessions, tls)


if __name__ == "__main__":
    main()
