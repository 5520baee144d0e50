"""The worker's "busy" signal for holding rechecks back: tasks taken in the last second."""

from __future__ import annotations

from emlisten.service.delivery import _RecentCount


def test_counts_the_current_and_the_previous_second() -> None:
    recent = _RecentCount()
    for i in range(70):
        recent.add(100.0 + i / 100)
    assert recent.in_last_second(100.9) == 70
    # A second later the previous second still speaks for the rate ...
    assert recent.in_last_second(101.5) == 70
    # ... two seconds later nothing does, also after a gap of several seconds.
    assert recent.in_last_second(102.1) == 0
    recent.add(110.0)
    assert recent.in_last_second(110.2) == 1
    assert recent.in_last_second(112.0) == 0
