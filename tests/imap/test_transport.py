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
    # Scaled down (a socket buffer holds less than the real 256 KiB step): 16 KiB per checkpoint.
    monkeypatch.setattr(_transport, "YIELD_EVERY_BYTES", 16 * 1024)
    transport, theirs = _pair()
    sent = 64 * 1024
    theirs.sendall(b"x" * sent)  # all of it waits in our socket: no read ever has to wait
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    received = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        ticks = 0
        while received < sent:
            received += len(await transport.receive_some(4096))
        nursery.cancel_scope.cancel()
    assert received == sent
    assert ticks >= 3, ticks  # one checkpoint per YIELD_EVERY_BYTES at least
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
