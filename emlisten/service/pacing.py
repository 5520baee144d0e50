"""How fast a node opens mail sessions: a bounded number at once, at a rate the servers can take.

A cold start (or a failover) asks for thousands of sessions at once. Mail servers accept them
through a few login processes (Dovecot's imap-login proxies every TLS session), so beyond some
rate more attempts only queue up there and time out. The pacer spaces attempts at most
``max_per_second`` apart and halves the rate when attempts fail to connect (timeouts, refusals),
then climbs back by a tenth of the maximum per second of successes: additive increase,
multiplicative decrease, as TCP does.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

#: The rate never drops below this (attempts per second), so a node always makes progress.
MIN_RATE = 5.0


class ConnectPacer:
    """``async with pacer.attempt() as attempt: ...; attempt.failed()`` around each connect."""

    def __init__(self, *, max_concurrent: int, max_per_second: float) -> None:
        self.max_per_second = max_per_second
        #: The current rate (attempts per second); infinite when no maximum is set.
        self.rate = max_per_second if max_per_second > 0 else math.inf
        self._slots = trio.Semaphore(max_concurrent)
        self._next_start = -math.inf
        self._last_cut = -math.inf

    @asynccontextmanager
    async def attempt(self) -> AsyncIterator[Attempt]:
        """Wait for a slot and for the next start time; the block runs one connect attempt."""
        async with self._slots:
            if self.rate != math.inf:
                now = trio.current_time()
                start = max(now, self._next_start)
                self._next_start = start + 1 / self.rate
                await trio.sleep_until(start)
            attempt = Attempt()
            try:
                yield attempt
            finally:
                if attempt.outcome is not None:
                    self._record(attempt.outcome)

    def _record(self, ok: bool) -> None:
        if self.max_per_second <= 0:
            return
        now = trio.current_time()
        if ok:
            # Additive increase: a tenth of the maximum per second's worth of successes.
            self.rate = min(self.max_per_second, self.rate + self.max_per_second / 10 / max(self.rate, 1))
        elif now - self._last_cut >= 1.0:
            # Multiplicative decrease, at most once a second: attempts that were already under
            # way when the server got overloaded all fail together, and that is one signal.
            self._last_cut = now
            self.rate = max(MIN_RATE, self.rate / 2)


class Attempt:
    """The outcome of one connect attempt, told by the caller (unknown: not counted)."""

    __slots__ = ("outcome",)

    def __init__(self) -> None:
        self.outcome: bool | None = None

    def succeeded(self) -> None:
        self.outcome = True

    def failed(self) -> None:
        self.outcome = False


__all__ = ["MIN_RATE", "Attempt", "ConnectPacer"]
