"""Where a listener's DONE + UID FETCH spends its time: the server or emlisten's event loop.

The timing comes from a throwaway patch (``fetch_trace.patch`` next to this file), not from
emlisten itself: it turns on ``SO_TIMESTAMPNS`` on every IMAP socket, so each read knows when
its first packet reached the kernel, and writes one line per listener fetch to
``/tmp/fetchtrace.<pid>``:

    exists_kernel exists_read done_sent first_answer_kernel first_answer_read idle_ok fetch_done last_kernel

(wall-clock seconds). "done_sent -> first_answer_kernel" is the server's (and the loopback's)
share; the kernel -> read gaps are emlisten's event loop. To use it::

    git apply bench/experiments/fetch_trace.patch      # in a scratch clone, not in main
    python -m bench latency --mailboxes 10000 --mails 1300 --spacing 0.1 --tls --settle-looks \\
        --fetch-floor --env EMLISTEN_TRACE_FETCH=1
    python -m bench.experiments.fetch_trace /tmp/fetchtrace.*

Results: docs/performance.md, session 12.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence

SPANS = {
    "EXISTS: kernel -> read (emlisten's loop)": (0, 1),
    "EXISTS read -> DONE + UID FETCH sent (emlisten)": (1, 2),
    "sent -> first answer in the kernel (the server)": (2, 3),
    "first answer: kernel -> read (emlisten's loop)": (3, 4),
    "first answer read -> IDLE's OK parsed": (4, 5),
    "IDLE's OK -> FETCH's OK parsed": (5, 6),
    "sent -> FETCH's OK parsed (all of it)": (2, 6),
}


def read(paths: Sequence[str]) -> list[list[float]]:
    rows = []
    for path in paths:
        with open(path) as lines:
            for line in lines:
                values = [float(v) for v in line.split()]
                if len(values) == 8 and values[0] > 0 and values[3] > 0:
                    rows.append(values)
    return rows


def describe(ms: list[float]) -> str:
    ms = sorted(ms)
    n = len(ms)
    return f"p50 {ms[n // 2]:6.2f}  p90 {ms[int(n * 0.9)]:6.2f}  mean {statistics.fmean(ms):6.2f} ms"


def main(paths: Sequence[str]) -> None:
    rows = read(paths)
    print(f"{len(rows)} fetches")
    if not rows:
        return
    for name, (start, end) in SPANS.items():
        print(f"{name:50s} {describe([(row[end] - row[start]) * 1000 for row in rows])}")


if __name__ == "__main__":
    main(sys.argv[1:])
