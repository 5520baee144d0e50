"""Where Dovecot's hibernation hand-off windows fall after new mail, and what a look does to them.

One emlisten listener (``ImapSource``, prefetch, TLS) per trial on the bench's hibernating Dovecot
(``imap_hibernate_timeout 2s``): a first mail wakes the session, a second one lands ``gap``
seconds after it, and the time until the listener hands the second one on is printed per gap.
A mail in a window the server does not announce waits for a look (``--look``, ``--late-look``).
``--other-client`` adds a bare IDLE client that SELECTs the same folder, as a user's mail program
(or the random-traffic bench's floor probe) does.

    python -m bench.experiments.hibernation_windows --other-client --look 3 --gaps 3.1,3.2,3.3

Findings of 2026-12-06 are in docs/architecture.md ("A safety net for notifications a server
drops"). Not a benchmark scenario: no result file, it prints a table.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import trio

from bench._harness import DOVECOT_EXTRA_CONFIG
from bench._rawimap import RawImap
from emlisten.abc import Prefetch
from emlisten.mail.imap import ImapSource
from emlisten.models import Checkpoint, Security, SyncTask
from tests.servers.dovecot import Dovecot, MailUser, mailbox_for, make_message

_GIVE_UP_SECONDS = 20.0


async def _no_checkpoint(folder: str) -> Checkpoint | None:
    return None


async def _trial(
    source: ImapSource, dovecot: Dovecot, user: MailUser, gap: float, other_client: bool
) -> float | None:
    """Seconds from the second mail's APPEND until it was handed on (None: not within 20 s)."""
    send, receive = trio.open_memory_channel[tuple[float, SyncTask]](100)

    async def sink(task: SyncTask) -> None:
        await send.send((time.monotonic(), task))

    mailbox = mailbox_for(dovecot, user, Security.SSL_ON_CONNECT)
    prefetch = Prefetch(max_message_bytes=1 << 20, max_messages=20, checkpoint=_no_checkpoint)
    async with trio.open_nursery() as nursery:
        if other_client:
            other = await RawImap.connect(dovecot.host, dovecot.imaps_port, dovecot.client_ssl_context())
            await other.login(user.name, user.password)
            await other.select("INBOX")
            tag = await other.idle_start()
            nursery.start_soon(other.watch, tag, lambda count, at: None)

        async def listen(task_status: trio.TaskStatus[object]) -> None:
            await source.listen(mailbox, "INBOX", sink, prefetch=prefetch, task_status=task_status)

        await nursery.start(listen)
        await receive.receive()  # the catch-up
        await trio.sleep(4)  # hibernated by now
        first_at = time.monotonic()
        await dovecot.aappend(user, make_message())
        await receive.receive()
        await trio.sleep(max(0.0, first_at + gap - time.monotonic()))
        second_at = time.monotonic()
        await dovecot.aappend(user, make_message())
        waited: float | None = None
        with trio.move_on_after(_GIVE_UP_SECONDS):
            while True:
                at, task = await receive.receive()
                if task.prefetched and task.reason == "exists":
                    waited = at - second_at
                    break
        nursery.cancel_scope.cancel()
    return waited


async def _run(args: argparse.Namespace) -> None:
    gaps = [float(g) for g in args.gaps.split(",")]
    with Dovecot(hibernate_timeout="2s", extra_config=DOVECOT_EXTRA_CONFIG) as dovecot:
        source = ImapSource(
            ca_file=str(dovecot.ca_file),
            recheck_seconds=args.look,
            recheck_late_seconds=args.late_look,
            recheck_after_connect=False,
        )
        results: dict[float, list[float | None]] = defaultdict(list)

        async def one(gap: float) -> None:
            results[gap].append(await _trial(source, dovecot, dovecot.add_user(), gap, args.other_client))

        async with trio.open_nursery() as nursery:
            for _ in range(args.repeat):
                for gap in gaps:
                    nursery.start_soon(one, gap)
                    await trio.sleep(0.17)  # spread the trials' appends
    print(f"look {args.look:g} s, late look {args.late_look:g} s, other client: {args.other_client}")
    for gap in sorted(results):
        waits = sorted((w for w in results[gap] if w is not None), key=float)
        missing = sum(w is None for w in results[gap])
        text = ", ".join(f"{w:.2f}" for w in waits) + (f", {missing} not within 20 s" if missing else "")
        print(f"second mail {gap:.2f} s after the first: handed on after {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--look", type=float, default=4.0, help="EMLISTEN_RECHECK_SECONDS (0: none)")
    parser.add_argument("--late-look", type=float, default=12.0, help="EMLISTEN_RECHECK_LATE_SECONDS")
    parser.add_argument("--other-client", action="store_true", help="a bare client SELECTs the folder too")
    parser.add_argument("--gaps", default="1.6,1.8,2.0,3.0,3.2,3.4,4.2", help="seconds, comma-separated")
    parser.add_argument("--repeat", type=int, default=4)
    trio.run(_run, parser.parse_args())


if __name__ == "__main__":
    main()
