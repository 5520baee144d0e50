"""Finding what stops the event loop: a Trio instrument that logs any task step longer than a
threshold (``EMLISTEN_SLOW_STEP_MS``; off by default).

Every mailbox shares one event loop, so a step that runs long (a walk over every mailbox, a
garbage collection it happened to trigger) holds all their mail. Seen from outside that is a
run of mails delivered together with linearly falling delays and no log line in the gap; this
names the task whose step it was and where it stopped next.
"""

from __future__ import annotations

import logging
import time
import traceback

import trio

log = logging.getLogger(__name__)


class SlowStepLog(trio.abc.Instrument):
    """Logs a WARNING for every task step that holds the loop ``threshold_ms`` or longer."""

    def __init__(self, threshold_ms: float) -> None:
        self.threshold = threshold_ms / 1000
        self._stepping: trio.lowlevel.Task | None = None
        self._step_started = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._stepping = task
        self._step_started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is not self._stepping:
            return  # its step began before the instrument was added
        self._stepping = None
        held = time.perf_counter() - self._step_started
        if held >= self.threshold:
            log.warning(
                "the event loop was held %.0f ms by one step of task %s (which then waited at %s)",
                held * 1000,
                task.name,
                _where(task),
            )


def _where(task: trio.lowlevel.Task) -> str:
    frame = getattr(task.coro, "cr_frame", None)
    if frame is None:
        return "its end"
    # Innermost first, as far as the coroutine chain is visible from its outer frame.
    frames = [f"{f.f_code.co_name}:{line}" for f, line in traceback.walk_stack(frame)]
    return " < ".join(frames[:6])


__all__ = ["SlowStepLog"]
