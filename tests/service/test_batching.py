"""The coalescing of single store calls into bulk calls (pure logic: the bulk call is a plain
async function that records what it was asked)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from emlisten.errors import StoreError
from emlisten.service.batching import Coalescer


class _Bulk:
    """Answers ``item * 10``; fails for items listed in ``failing``, or for any batch that holds
    more than one item when ``fail_batches`` is set."""

    def __init__(self, *, failing: frozenset[int] = frozenset(), fail_batches: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.failing = failing
        self.fail_batches = fail_batches
        self.entered = trio.Event()
        self.release: trio.Event | None = None

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        self.entered.set()
        if self.release is not None:
            await self.release.wait()
        await trio.lowlevel.checkpoint()
        if (self.fail_batches and len(items) > 1) or self.failing.intersection(items):
            raise StoreError(f"cannot answer {items}")
        return [item * 10 for item in items]


async def _gather(coalescer: Coalescer[int, int], items: list[int]) -> dict[int, int | BaseException]:
    answers: dict[int, int | BaseException] = {}

    async def one(item: int) -> None:
        try:
            answers[item] = await coalescer(item)
        except StoreError as exc:
            answers[item] = exc

    async with trio.open_nursery() as nursery:
        for item in items:
            nursery.start_soon(one, item)
    return answers


async def test_calls_within_the_window_make_one_bulk_call(autojump_clock: trio.testing.MockClock) -> None:
    bulk = _Bulk()
    answers = await _gather(Coalescer(bulk, window=0.005), list(range(1, 51)))
    assert [sorted(call) for call in bulk.calls] == [list(range(1, 51))]
    assert answers == {item: item * 10 for item in range(1, 51)}


async def test_a_full_batch_goes_at_once_and_the_rest_start_another(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bulk = _Bulk()
    started = trio.current_time()
    answers = await _gather(Coalescer(bulk, window=60.0, max_items=4), list(range(1, 7)))
    assert sorted(len(call) for call in bulk.calls) == [2, 4]
    assert sorted(item for call in bulk.calls for item in call) == list(range(1, 7))
    assert answers == {item: item * 10 for item in range(1, 7)}
    # The full batch did not wait out the window; the last one (not full) did.
    assert trio.current_time() - started == pytest.approx(60.0)


async def test_calls_after_the_window_closed_are_not_held_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bulk = _Bulk()
    coalescer = Coalescer(bulk, window=0.005)
    assert await coalescer(1) == 10
    assert await coalescer(2) == 20
    assert bulk.calls == [[1], [2]]


async def test_when_the_bulk_call_fails_each_caller_gets_its_own_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One bad item must not fail the others of its batch: after a failed bulk call each
    follower asks on its own, and only the bad one fails."""
    bulk = _Bulk(failing=frozenset({3}))
    answers = await _gather(Coalescer(bulk, window=0.005), [1, 2, 3, 4])
    assert sorted(bulk.calls[0]) == [1, 2, 3, 4]
    assert sorted(bulk.calls[1:]) == [[1], [2], [3], [4]]
    assert answers[1] == 10 and answers[2] == 20 and answers[4] == 40
    assert isinstance(answers[3], StoreError)


async def test_a_lone_call_that_fails_is_not_repeated(autojump_clock: trio.testing.MockClock) -> None:
    bulk = _Bulk(failing=frozenset({5}))
    with pytest.raises(StoreError):
        await Coalescer(bulk, window=0.005)(5)
    assert bulk.calls == [[5]]


async def test_a_cancelled_leader_leaves_the_others_to_ask_on_their_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bulk = _Bulk()
    bulk.release = trio.Event()
    coalescer = Coalescer(bulk, window=0.005)
    answers: dict[int, int] = {}

    async def follower(item: int) -> None:
        answers[item] = await coalescer(item)

    leader_scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_lead, coalescer, leader_scope)
        await trio.testing.wait_all_tasks_blocked()  # the leader waits out its window
        nursery.start_soon(follower, 2)
        nursery.start_soon(follower, 3)
        await bulk.entered.wait()  # the leader's bulk call for [1, 2, 3] is under way
        leader_scope.cancel()
        bulk.release.set()
    assert sorted(bulk.calls[0]) == [1, 2, 3]
    assert sorted(bulk.calls[1:]) == [[2], [3]]
    assert answers == {2: 20, 3: 30}


async def _lead(coalescer: Coalescer[int, int], scope: trio.CancelScope) -> None:
    with scope:
        await coalescer(1)
        raise AssertionError("the leader was to be cancelled")  # pragma: no cover


async def test_an_error_every_caller_shares_is_given_to_each_without_asking_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A failed write of documents the callers made is the store's failure (an outage): asking
    again one by one waited out the outage's timeout a second time. Each caller gets the error at
    once; an error that may be one item's (here a ValueError) is still asked about one by one."""
    bulk = _Bulk(fail_batches=True)
    coalescer = Coalescer(bulk, window=0.005, shared_errors=(StoreError,))
    answers = await _gather(coalescer, [1, 2, 3])
    assert [sorted(call) for call in bulk.calls] == [[1, 2, 3]]
    assert all(isinstance(answer, StoreError) for answer in answers.values())
    # Each its own exception object (one raised in three tasks would gather their tracebacks).
    assert len({id(answer) for answer in answers.values()}) == 3

    async def fails_with_a_value_error(items: list[int]) -> list[int]:
        await trio.lowlevel.checkpoint()
        if len(items) > 1:
            raise ValueError("one item may be bad")
        return [item * 10 for item in items]

    other = Coalescer(fails_with_a_value_error, window=0.005, shared_errors=(StoreError,))
    assert await _gather(other, [1, 2]) == {1: 10, 2: 20}
