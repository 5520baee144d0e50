"""Pure unit tests of the sync task's wire form (what RabbitMQ carries between processes)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from emlisten.models import Checkpoint, RawMessage, SyncTask

text = st.text(max_size=20)
dates = st.none() | st.datetimes(timezones=st.just(UTC))


@st.composite
def tasks(draw: st.DrawFn) -> SyncTask:
    uidvalidity = draw(st.integers(0, 2**32 - 1))
    count = draw(st.integers(0, 3))
    first = draw(st.integers(1, 1000))
    prefetched = tuple(
        RawMessage(
            uid=first + n,
            data=draw(st.binary(max_size=300)),
            internal_date=draw(dates),
            size=draw(st.none() | st.integers(0, 2**40)),
            key=draw(text),
            position=Checkpoint(uidvalidity, first + n),
        )
        for n in range(count)
    )
    return SyncTask(
        mailbox_id=draw(text),
        folder=draw(text),
        uidvalidity=uidvalidity,
        uid_hint=draw(st.integers(0, 2**32)),
        reason=draw(st.sampled_from(["exists", "catch-up", "recheck"])),
        seen_at=draw(st.floats(0, 2e9)),
        seed_cursor=draw(text),
        prefetched=prefetched,
        prefetch_from=first if count else 0,
        prefetch_to=first + count - 1 if count else 0,
    )


@settings(max_examples=300)
@given(tasks())
def test_to_json_is_to_dict_as_json(task: SyncTask) -> None:
    # Earlier workers read the body with json.loads: the hand-built form must be the same JSON.
    assert json.loads(task.to_json()) == task.to_dict()
    assert task.to_json() == json.dumps(task.to_dict(), separators=(",", ":")).encode()


@settings(max_examples=300)
@given(tasks())
def test_wire_round_trip_keeps_carried_mail_byte_for_byte(task: SyncTask) -> None:
    assert SyncTask.from_dict(json.loads(task.to_json())) == task


def test_eight_bit_mail_survives_the_wire() -> None:
    raw = bytes(range(256)) + b'\r\n.\r\n\x00"\\'
    task = SyncTask(
        "m1",
        "Входящие",
        uidvalidity=7,
        uid_hint=3,
        prefetched=(RawMessage(3, raw, datetime(2026, 12, 7, tzinfo=UTC), 262, "7/3", Checkpoint(7, 3)),),
        prefetch_from=3,
        prefetch_to=3,
    )
    back = SyncTask.from_dict(json.loads(task.to_json()))
    assert back.prefetched[0].data == raw
    assert back.folder == "Входящие"
