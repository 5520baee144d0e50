"""The IMAP client's own byte stream: what Trio's streams guaranteed, kept."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from emlisten.mail.imap import _idle_reader, _transport
from emlisten.mail.imap._idle_reader import shared_reader
from emlisten.mail.imap._transport import Transport


def _pair() -> tuple[Transport, socket.socket]:
    ours, theirs = socket.socketpair()
    return Transport(ours), theirs


async def test_a_long_read_of_buffered_data_lets_other_tasks_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Scaled down (a socket buffer holds less than the real 256 KiB step): 8 KiB per checkpoint.
    monkeypatch.setattr(_transport, "YIELD_EVERY_BYTES", 8 * 1024)
    transport, theirs = _pair()
    sent = 64 * 1024
    theirs.sendall(b"x" * sent)  # all of it waits in our socket: no read ever has to wait
    received = 0
    seen_mid_read: set[int] = set()

    async def watcher() -> None:
        while True:
            if 0 < received < sent:
                seen_mid_read.add(received)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher)
        while received < sent:
            received += len(await transport.receive_some(4096))
        nursery.cancel_scope.cancel()
    assert received == sent
    # Trio runs each runnable task once per pass, in an order it varies: the watcher sees the
    # count before or after each of the reader's 8 KiB steps, so with a checkpoint every 8 KiB
    # it sees at least 3 different counts mid-read; without one, none (the read is one step).
    assert len(seen_mid_read) >= 3, sorted(seen_mid_read)
    await transport.aclose()
    theirs.close()


async def test_a_wait_cancelled_loses_nothing_and_close_reads_as_end() -> None:
    transport, theirs = _pair()
    with trio.move_on_after(0.05) as scope:
        await transport.receive_some()
    assert scope.cancelled_caught
    theirs.sendall(b"* OK after the cancelled wait\r\n")
    assert await transport.receive_some() == b"* OK after the cancelled wait\r\n"
    theirs.close()
    assert await transport.receive_some() == b""
    await transport.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await transport.send_all(b"x")


async def test_two_receivers_at_once_is_an_error() -> None:
    transport, theirs = _pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.receive_some)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await transport.receive_some()
        nursery.cancel_scope.cancel()
    await transport.aclose()
    theirs.close()


async def test_a_send_larger_than_the_socket_buffer_arrives_whole() -> None:
    ours, theirs = socket.socketpair()
    transport = Transport(ours)
    payload = bytes(range(256)) * 16 * 1024  # 4 MiB: many waits for the socket to drain
    received = bytearray()

    async def drain() -> None:
        theirs.setblocking(False)
        while len(received) < len(payload):
            await trio.lowlevel.wait_readable(theirs)
            received.extend(theirs.recv(1 << 20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        await transport.send_all(payload)
    assert bytes(received) == payload
    await transport.aclose()
    theirs.close()


# -- reads that pass something over wait through the shared reader ---------------------------

KEEPALIVE = b"* OK Still here\r\n"


def _is_keepalive(data: bytes) -> bool:
    return data == KEEPALIVE


class _StepCounter(trio.abc.Instrument):
    """Counts the task steps of the tasks named ``receiver``."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name == "receiver":
            self.steps += 1


async def test_what_is_passed_over_never_wakes_the_waiting_tasks() -> None:
    reader = shared_reader()
    assert reader is not None
    pairs = [_pair() for _ in range(300)]  # more than one CHUNK of the reader
    got: dict[int, bytes] = {}
    counter = _StepCounter()

    async def receiver(index: int, transport: Transport) -> None:
        got[index] = await transport.receive_some(skip=_is_keepalive)

    async with trio.open_nursery() as nursery:
        for index, (transport, _) in enumerate(pairs):
            nursery.start_soon(receiver, index, transport, name="receiver")
        await trio.testing.wait_all_tasks_blocked()
        assert reader.parked_count == len(pairs)
        trio.lowlevel.add_instrument(counter)
        try:
            for _, theirs in pairs:
                theirs.sendall(KEEPALIVE)
            await trio.testing.wait_all_tasks_blocked()
            assert counter.steps == 0  # 300 keepalives read, no receiver woken
            assert got == {}
            pairs[7][1].sendall(b"* 1 EXISTS\r\n")
            pairs[9][1].sendall(KEEPALIVE + b"* 2 EXISTS\r\n")
            await trio.testing.wait_all_tasks_blocked()
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert got == {7: b"* 1 EXISTS\r\n", 9: KEEPALIVE + b"* 2 EXISTS\r\n"}  # one read, not skipped
        assert counter.steps == 2
        nursery.cancel_scope.cancel()
    assert reader.parked_count == 0
    for transport, theirs in pairs:
        await transport.aclose()
        theirs.close()


async def test_a_cancelled_shared_wait_leaves_the_connection_as_it_was() -> None:
    reader = shared_reader()
    assert reader is not None
    transport, theirs = _pair()
    with trio.move_on_after(0.05) as scope:
        await transport.receive_some(skip=_is_keepalive)
    assert scope.cancelled_caught
    assert reader.parked_count == 0
    theirs.sendall(b"* 3 EXISTS\r\n")
    assert await transport.receive_some() == b"* 3 EXISTS\r\n"
    theirs.close()
    assert await transport.receive_some(skip=_is_keepalive) == b""  # the end is not passed over
    await transport.aclose()


async def test_closing_a_connection_ends_its_shared_wait() -> None:
    reader = shared_reader()
    assert reader is not None
    transport, theirs = _pair()
    async with trio.open_nursery() as nursery:

        async def wait() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await transport.receive_some(skip=_is_keepalive)

        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        assert reader.parked_count == 1
        await transport.aclose()
    assert reader.parked_count == 0
    theirs.close()


async def test_without_the_shared_reader_a_read_still_passes_over(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_idle_reader, "ENABLED", False)
    assert shared_reader() is None
    transport, theirs = _pair()
    theirs.sendall(KEEPALIVE)
    with trio.move_on_after(0.05):
        await transport.receive_some(skip=_is_keepalive)
        raise AssertionError("a keepalive ended the read")
    theirs.sendall(b"* 4 EXISTS\r\n")
    assert await transport.receive_some(skip=_is_keepalive) == b"* 4 EXISTS\r\n"
    await transport.aclose()
    theirs.close()
