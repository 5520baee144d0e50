"""_Held (prefetch memory one fetch holds) gives back exactly what it took, on every path: shrunk
once the answer is in, released at the end, released again by a second finally, and when the
fetch fails or is cancelled. Checked on a budget others hold part of, so ByteBudget.give_back's
cap at its total cannot hide an over-release."""

from __future__ import annotations

import pytest
import trio

from emlisten.mail.imap.source import ByteBudget, _Held


def _budget_with_others(total: int, others: int) -> ByteBudget:
    budget = ByteBudget(total)
    assert budget.try_take(others)
    return budget


def test_shrinking_and_releasing_give_back_exactly_what_was_taken() -> None:
    budget = _budget_with_others(1000, 400)
    assert budget.try_take(500)
    held = _Held(budget, 500)
    held.shrink_to(120)
    assert budget.available == 1000 - 400 - 120
    held.shrink_to(300)  # never grows back (the budget was not asked for more)
    held.shrink_to(120)
    assert (budget.available, held.size) == (1000 - 400 - 120, 120)
    held.release()
    held.release()  # a second finally gives back nothing more
    assert budget.available == 1000 - 400


@pytest.mark.parametrize("shrunk", [False, True])
async def test_a_failed_or_cancelled_fetch_gives_back_what_it_held(shrunk: bool) -> None:
    budget = _budget_with_others(1000, 400)

    async def fetch(held: _Held) -> None:
        if shrunk:
            held.shrink_to(50)
        await trio.sleep_forever()

    assert budget.try_take(500)
    held = _Held(budget, 500)
    with trio.move_on_after(0.01):
        try:
            await fetch(held)
        finally:
            held.release()
    assert budget.available == 1000 - 400

    assert budget.try_take(500)
    held = _Held(budget, 500)
    with pytest.raises(RuntimeError):
        try:
            if shrunk:
                held.shrink_to(0)
            raise RuntimeError("the server broke the session")
        finally:
            held.release()
    assert budget.available == 1000 - 400
