"""CPU per IDLE keepalive: N listeners (``ImapSource.listen``, TLS) on a Dovecot that sends its
``* OK Still here`` every ``--interval`` seconds, to all of them in the same second.

Dovecot times its IDLE keepalive (``imap_idle_notify_interval``, 2 min by default) to the client's
address, so every session of one emlisten node gets it at once: the cost per keepalive times the
number of sessions is how long the event loop is busy with one wave, and mail arriving meanwhile
waits. Prints the process CPU over ``--seconds`` divided by the keepalives received.

    python -m bench.experiments.keepalive_cost --sessions 2000

Findings of 2026-12-07 are in docs/architecture.md ("A server's IDLE keepalives do not wake a
listener"). Not a benchmark scenario: no result file, it prints one line.
"""

from __future__ import annotations

import argparse
import gc
import resource
import time

import trio

from emlisten.mail.imap import ImapSource, _idle_reader
from emlisten.models import MailboxConfig, Security, ServerEndpoint, SyncTask
from tests.servers.dovecot import Dovecot


class _Passes(trio.abc.Instrument):
    """The longest run of task steps between two looks at the network: how long mail that
    arrives meanwhile waits for its next step."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._began: float | None = None

    def after_io_wait(self, timeout: float) -> None:
        self._began = time.perf_counter()

    def before_io_wait(self, timeout: float) -> None:
        if self._began is not None:
            self.longest = max(self.longest, time.perf_counter() - self._began)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(dovecot: Dovecot, sessions: int, interval: float, seconds: float) -> None:
    users = [dovecot.add_user() for _ in range(max(1, sessions // 50))]
    # No looks: they would add sessions of their own to the window.
    source = ImapSource(
        ca_file=str(dovecot.ca_file), recheck_after_connect=False, recheck_seconds=0, recheck_late_seconds=0
    )

    async def on_new_mail(task: SyncTask) -> None:
        pass

    async with trio.open_nursery() as nursery:
        for index in range(sessions):
            user = users[index % len(users)]
            mailbox = MailboxConfig(
                id=f"m{index}",
                user_name=user.name,
                password=user.password,
                imap=ServerEndpoint(dovecot.host, dovecot.imaps_port, Security.SSL_ON_CONNECT),
                bpm_endpoint="",
            )
            await nursery.start(source.listen, mailbox, "INBOX", on_new_mail)
        await trio.sleep(interval + 3)  # past the hibernation of the last sessions
        gc.collect()
        gc.freeze()
        passes = _Passes()
        trio.lowlevel.add_instrument(passes)
        before = _cpu_seconds()
        await trio.sleep(seconds)
        spent = _cpu_seconds() - before
        trio.lowlevel.remove_instrument(passes)
        keepalives = sessions * round(seconds / interval)
        print(
            f"{sessions} TLS sessions, {seconds:g} s, a keepalive every {interval:g} s: "
            f"CPU {spent:.3f} s, {spent / keepalives * 1e6:.1f} us per keepalive, "
            f"longest event-loop pass {passes.longest * 1000:.1f} ms "
            f"({'one task per socket' if not _idle_reader.ENABLED else 'shared idle reader'})"
        )
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--interval", type=int, default=5, help="imap_idle_notify_interval, seconds")
    parser.add_argument("--seconds", type=float, default=30.0, help="the measured window")
    parser.add_argument("--per-task-waits", action="store_true", help="each session waits on its own socket")
    args = parser.parse_args()
    if args.per_task_waits:
        _idle_reader.ENABLED = False
    extra = f"imap_idle_notify_interval = {args.interval} secs\n"
    with Dovecot(hibernate_timeout="2s", extra_config=extra) as dovecot:
        trio.run(_measure, dovecot, args.sessions, args.interval, args.seconds)


if __name__ == "__main__":
    main()
