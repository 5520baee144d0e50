"""The garbage-collector policy: survivors are frozen out of the collector's walks, and cyclic
garbage that reaches into them is still freed by the periodic full collection."""

from __future__ import annotations

import gc
import sys
import weakref

import pytest
import trio
import trio.testing

from emlisten.service.collector import FREEZE_EVERY_SECONDS, CollectorPolicy


class Node:
    """Something a cycle can be made of, with a weak reference to see it freed."""

    def __init__(self) -> None:
        self.other: object = None


def frozen_cycle() -> weakref.ref[Node]:
    # A cycle whose one end is frozen: only a collection of everything can free it.
    old, young = Node(), Node()
    gc.freeze()
    old.other, young.other = young, old
    return weakref.ref(old)


async def test_survivors_stay_frozen_until_released(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gc.unfreeze()
    pauses: list[tuple[int, float]] = []
    policy = CollectorPolicy(full_every=3600, on_pause=lambda gen, seconds: pauses.append((gen, seconds)))
    async with trio.open_nursery() as nursery:
        await nursery.start(policy.run)
        assert gc.get_freeze_count() == 0
        await trio.sleep(FREEZE_EVERY_SECONDS + 1)
        assert gc.get_freeze_count() > 1000  # everything alive now, this test's objects too
        assert any(gen == 1 for gen, _ in pauses)  # the young collection before the freeze
        assert all(seconds >= 0 for _, seconds in pauses)
        nursery.cancel_scope.cancel()
    # Still frozen while the node's other tasks unwind; released once they have.
    assert gc.get_freeze_count() > 1000
    freed = frozen_cycle()
    policy.release()
    assert gc.get_freeze_count() == 0
    assert freed() is None


async def test_cyclic_garbage_reaching_into_frozen_objects_is_freed_by_the_full_collection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gc.unfreeze()
    policy = CollectorPolicy(full_every=3 * FREEZE_EVERY_SECONDS)
    async with trio.open_nursery() as nursery:
        await nursery.start(policy.run)
        freed = frozen_cycle()
        await trio.sleep(FREEZE_EVERY_SECONDS + 1)
        gc.collect()  # a collection of what is not frozen does not reach it
        assert freed() is not None
        await trio.sleep(2 * FREEZE_EVERY_SECONDS)  # the full collection is due
        assert freed() is None
        assert gc.get_freeze_count() > 0  # and the survivors are frozen again
        nursery.cancel_scope.cancel()
    policy.release()


async def test_zero_leaves_pythons_collector_alone(autojump_clock: trio.testing.MockClock) -> None:
    gc.unfreeze()
    async with trio.open_nursery() as nursery:
        await nursery.start(CollectorPolicy(full_every=0).run)
        await trio.sleep(10 * FREEZE_EVERY_SECONDS)
        assert gc.get_freeze_count() == 0
        nursery.cancel_scope.cancel()


def test_a_shutdown_holds_the_collector_until_released() -> None:
    gc.unfreeze()
    policy = CollectorPolicy(full_every=3600)
    try:
        policy.hold()
        assert not gc.isenabled()  # no automatic collection while the node unwinds
    finally:
        policy.release()
    assert gc.isenabled()


def test_a_process_that_exits_next_skips_the_last_full_collection() -> None:
    gc.unfreeze()
    policy = CollectorPolicy(full_every=3600)
    policy.hold()
    freed = frozen_cycle()
    policy.release(collect=False)
    assert gc.isenabled()
    # Left frozen for the OS to reclaim: no walk over everything on the way out.
    assert gc.get_freeze_count() > 0 and freed() is not None
    gc.unfreeze()
    gc.collect()
    assert freed() is None


def test_zero_leaves_a_shutdown_alone() -> None:
    policy = CollectorPolicy(full_every=0)
    policy.hold()
    assert gc.isenabled()
    policy.release()


def test_a_collection_at_the_bottom_of_a_deep_recursion_is_recorded_quietly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A collection can start at any allocation, also near the recursion limit (the API's JSON
    parser refusing a body nested 10,000 deep): the pause callback then has no stack left, and
    must not raise (Python prints an "Exception ignored" for it; pytest fails the test)."""
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    pauses: list[int] = []
    policy = CollectorPolicy(full_every=3600, on_pause=lambda gen, seconds: pauses.append(gen))
    gc.callbacks.append(policy._observe)
    try:

        def room(depth: int = 0) -> int:
            try:
                return room(depth + 1)
            except RecursionError:
                return depth

        def dive(frames: int) -> None:
            if frames > 0:
                dive(frames - 1)
            else:
                gc.collect(0)

        # From a few frames short of the limit to one: room for the callback's own frame, not
        # for what it calls.
        frames = room()
        for margin in range(8, 0, -1):
            dive(frames - margin)
    finally:
        gc.callbacks.remove(policy._observe)
    assert unraisable == []
    assert pauses  # the collections with room for the callback were recorded
