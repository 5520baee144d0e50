"""Capped exponential backoff with jitter, shared by reconnects, auth retries and deliveries."""

from __future__ import annotations

import random

from emlisten.config import Backoff


class Retry:
    """Tracks consecutive failures of one thing and says how long to wait before the next try."""

    __slots__ = ("attempts", "policy")

    def __init__(self, policy: Backoff) -> None:
        self.policy = policy
        self.attempts = 0

    def next_delay(self) -> float:
        """Delay before the next attempt: base * 2^n capped, jittered into [50%, 100%] so that
        thousands of mailboxes failing together do not retry in lockstep."""

        ceiling = min(self.policy.cap, self.policy.base * (2 ** min(self.attempts, 32)))
        self.attempts += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0
