"""The IMAP client's own byte stream: what Trio's streams guaranteed, kept."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from emlisten.mail.imap import _transport
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
