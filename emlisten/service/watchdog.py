"""Finding what stops the event loop: a Trio instrument that logs any task step, and any pass
of the loop, longer than a threshold (``EMLISTEN_SLOW_STEP_MS``; off by default).

Every mailbox shares one event loop, so a step that runs long (a walk over every mailbox, a
garbage collection it happened to trigger) holds all their mail. Seen from outside that is a
run of mails delivered together with linearly falling delays and no log line in the gap; this
names the task whose step it was and where it stopped next.

Many short steps hold the loop as well: a pass runs every task that was runnable when it began
(after the I/O wait and the expiry of deadlines) before it looks at the network again, so
thousands of tasks woken together (an event every mailbox waits on, deadlines expiring at once)
make one long pass out of steps that are each quick. A slow pass is logged with its step count,
the time inside and outside steps, and the task names (grouped by the part before the first
``:``) that took most of it.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import defaultdict

import trio

log = logging.getLogger(__name__)


class SlowStepLog(trio.abc.Instrument):
    """Logs a WARNING for every task step, and every pass of the loop, that holds the loop
    ``threshold_ms`` or longer."""

    def __init__(self, threshold_ms: float) -> None:
        self.threshold = threshold_ms / 1000
        self._stepping: trio.lowlevel.Task | None = None
        self._step_started = 0.0
        self._pass_started: float | None = None
        self._pass_steps = 0
        self._pass_in_steps = 0.0
        self._pass_in_logged_steps = 0.0
        self._pass_by_name: defaultdict[str, float] = defaultdict(float)

    def after_io_wait(self, timeout: float) -> None:
        self._pass_started = time.perf_counter()
        self._pass_steps = 0
        self._pass_in_steps = 0.0
        self._pass_in_logged_steps = 0.0
        self._pass_by_name.clear()

    def before_io_wait(self, timeout: float) -> None:
        started, self._pass_started = self._pass_started, None
        if started is None:
            return  # the first pass after the instrument was added
        held = time.perf_counter() - started
        if held - self._pass_in_logged_steps < self.threshold:
            return  # not slow, or slow only by the steps already logged one by one
        busiest = ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in _top(self._pass_by_name))
        log.warning(
            "one pass of the event loop held it %.0f ms: %d task step(s) took %.0f ms (busiest: %s); "
            "%.0f ms went outside task steps (expiring deadlines, the scheduler)",
            held * 1000,
            self._pass_steps,
            self._pass_in_steps * 1000,
            busiest or "none",
            (held - self._pass_in_steps) * 1000,
        )

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._stepping = task
        self._step_started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is not self._stepping:
            return  # its step began before the instrument was added
        self._stepping = None
        held = time.perf_counter() - self._step_started
        if self._pass_started is not None:
            self._pass_steps += 1
            self._pass_in_steps += held
            self._pass_by_name[task.name.partition(":")[0]] += held
        if held >= self.threshold:
            self._pass_in_logged_steps += held
            log.warning(
                "the event loop was held %.0f ms by one step of task %s (which then waited at %s)",
                held * 1000,
                task.name,
                _where(task),
            )


def _top(seconds_by_name: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(seconds_by_name.items(), key=lambda item: item[1], reverse=True)[:3]


def _where(task: trio.lowlevel.Task) -> str:
    frame = getattr(task.coro, "cr_frame", None)
    if frame is None:
        return "its end"
    # Innermost first, as far as the coroutine chain is visible from its outer frame.
    frames = [f"{f.f_code.co_name}:{line}" for f, line in traceback.walk_stack(frame)]
    return " < ".join(frames[:6])


__all__ = ["SlowStepLog"]
