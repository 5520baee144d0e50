"""The IMAP client's byte stream: a non-blocking socket, with TLS through ``ssl.SSLObject``.

Why not ``trio.SocketStream`` + ``trio.SSLStream``: they are general (any number of tasks, any
transport below), and that costs three task steps per read that waits (the wake-up, the inner
lock's checkpoint, the socket's checkpoint after a successful ``recv``) and about 130 µs of CPU
per small TLS record. Dovecot sends its IDLE keepalive (``* OK Still here``, every
``imap_idle_notify_interval``, 2 min by default) to every session of one client address in the
same second, so at 10,000 sessions the event loop spent 1-2 s on one wave, every two minutes,
and mail that arrived meanwhile waited for it. Here a read that waits is one task step: wait
until the socket is readable, ``recv``, decrypt.

The rules that keep it correct:

- One receiving task and one sending task at a time (a second one of either kind gets
  ``trio.BusyResourceError``); the IMAP client uses one task for both anyway.
- Cancel-safe while waiting: nothing is taken from the socket or the TLS buffers before a wait
  ends. A send cancelled half-way leaves the stream unusable (the client then closes it), as
  with Trio's streams.
- A read that finds data already there does not yield to the scheduler; to keep a long stream
  of data (a 100 MB mail) from holding the event loop, every ``YIELD_EVERY_BYTES`` received or
  sent without a wait costs one checkpoint, taken before anything is consumed.
- A read given ``skip`` (the listener's IDLE wait) that has to wait parks in the shared idle
  reader (``_idle_reader``), which reads for it and wakes this task only for data it keeps; a
  read without ``skip`` waits on its own socket.
- Errors are the ones Trio's streams raise (``OSError``, ``ssl.SSLError``,
  ``trio.ClosedResourceError``, ``trio.BusyResourceError``), so the client maps them as before.
"""

from __future__ import annotations

import socket
import ssl
from contextlib import suppress

import trio

from emlisten.mail.imap._idle_reader import STAY, SharedReader, Skip, Stay, shared_reader

RECEIVE_BYTES = 65536
YIELD_EVERY_BYTES = 256 * 1024


class Transport(trio.abc.AsyncResource):
    """A connected socket, TLS once :meth:`start_tls` has run. Not a ``trio.abc.Stream``
    subclass (its checkpoints differ, see the module docstring), but the same methods."""

    __slots__ = (
        "_drained",
        "_flushing",
        "_incoming",
        "_outgoing",
        "_receiving",
        "_sending",
        "_shared_reader",
        "_sock",
        "_tls",
        "_unyielded",
    )

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._tls: ssl.SSLObject | None = None
        self._incoming: ssl.MemoryBIO | None = None
        self._outgoing: ssl.MemoryBIO | None = None
        self._receiving = False
        self._sending = False
        self._flushing = False
        self._unyielded = 0
        # The last recv took less than it asked for, so the socket is most likely empty: wait
        # for it to become readable before the next recv instead of paying for a failing one.
        self._drained = False
        #: The shared reader this connection is parked in, told when the socket closes.
        self._shared_reader: SharedReader | None = None

    @classmethod
    def take(cls, stream: trio.SocketStream) -> Transport:
        """Takes over the socket of a connected ``trio.SocketStream`` (which is unusable after)."""
        return cls(socket.socket(fileno=stream.socket.detach()))

    @property
    def is_tls(self) -> bool:
        return self._tls is not None

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        """Client-side TLS handshake. Raises ``ssl.SSLError`` (a refused certificate included)
        or ``OSError``; the peer closing mid-handshake is an ``ssl.SSLEOFError``."""
        if self._tls is not None:
            raise RuntimeError("TLS is already on")
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=server_hostname)
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            break
        await self._flush()

    async def receive_some(self, max_bytes: int = RECEIVE_BYTES, *, skip: Skip | None = None) -> bytes:
        """At least one byte, or ``b""`` once the peer has closed the connection.

        ``skip``: what it returns True for is dropped, and the read goes on (a server's IDLE
        keepalive); such a read waits through the shared reader (``_idle_reader``), so what is
        skipped never wakes this task."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this connection")
        self._receiving = True
        try:
            await self._yield_if_due()
            while True:
                data = self._read_now(max_bytes)
                if self._outgoing is not None and self._outgoing.pending:
                    await self._flush()  # what TLS produced: handshake, or a key update answer
                if data is None:
                    data = await self._wait_for_data(max_bytes, skip)
                    if data is None:
                        continue
                elif skip is not None and data and skip(data):
                    continue
                return data
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this connection")
        self._sending = True
        try:
            await self._yield_if_due()
            sock = self._open_socket()
            if self._tls is None:
                await self._send_raw(sock, memoryview(data))
                return
            view = memoryview(data)
            while view:
                written = self._tls.write(view)
                view = view[written:]
            await self._flush()
        finally:
            self._sending = False

    async def aclose(self) -> None:
        """Closes the socket; over TLS, sends close_notify first if that can go at once (without
        waiting for the peer's)."""
        sock, self._sock = self._sock, None
        if sock is None:
            await trio.lowlevel.checkpoint()
            return
        try:
            if self._tls is not None and self._outgoing is not None and not self._flushing:
                # unwrap() raises while it waits for the peer's close_notify (never, here), or
                # when the session is broken; ours is in the output by then, if it can be.
                with suppress(ssl.SSLError, ValueError):
                    self._tls.unwrap()
                with suppress(OSError):
                    sock.send(self._outgoing.read())
        finally:
            if self._shared_reader is not None:
                self._shared_reader.closing(sock.fileno())
            trio.lowlevel.notify_closing(sock)
            sock.close()
        await trio.lowlevel.checkpoint()

    # -- the socket ------------------------------------------------------------------------

    def _open_socket(self) -> socket.socket:
        if self._sock is None:
            raise trio.ClosedResourceError("the connection is closed")
        return self._sock

    async def _yield_if_due(self) -> None:
        if self._unyielded >= YIELD_EVERY_BYTES:
            self._unyielded = 0
            await trio.lowlevel.checkpoint()

    def _read_now(self, max_bytes: int) -> bytes | None:
        """What can be read without waiting (``b""``: the peer closed), or None."""
        sock = self._open_socket()
        if self._tls is None:
            data = self._recv_now(sock, max_bytes)
        else:
            assert self._incoming is not None
            while True:
                try:
                    data = self._tls.read(max_bytes)
                except ssl.SSLWantReadError:
                    raw = self._recv_now(sock, RECEIVE_BYTES)
                    if raw is None:
                        return None
                    if raw:
                        self._incoming.write(raw)
                    else:
                        self._incoming.write_eof()
                    continue
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return b""  # closed, with close_notify or without (many servers after BYE)
                break
        if data is not None:
            self._unyielded += len(data)
        return data

    def _recv_now(self, sock: socket.socket, max_bytes: int) -> bytes | None:
        if self._drained:
            return None
        try:
            data = sock.recv(max_bytes)
        except BlockingIOError:
            self._drained = True
            return None
        # Less than asked for: the socket is most likely empty, and the next read waits for it
        # to become readable instead of paying for a failing recv.
        self._drained = len(data) < max_bytes
        return data

    async def _wait_for_data(self, max_bytes: int, skip: Skip | None) -> bytes | None:
        """Waits until the socket is readable (None), or through the shared reader for data
        ``skip`` does not drop (returned; None when the reader hands back without any)."""
        sock = self._open_socket()
        reader = shared_reader() if skip is not None else None
        if reader is None or skip is None:
            await trio.lowlevel.wait_readable(sock)
            self._readable()
            return None
        self._shared_reader = reader
        try:
            data = await reader.wait(self, sock.fileno(), max_bytes, skip)
        finally:
            self._shared_reader = None
        self._unyielded = 0
        return data

    def _readable(self) -> None:
        self._drained = False
        self._unyielded = 0

    def _read_for_shared_reader(self, max_bytes: int, skip: Skip) -> bytes | Stay | None:
        """The shared reader's read, in its task: data ``skip`` keeps, None when this
        connection's task must run (TLS has something to send), or STAY."""
        self._readable()
        while True:
            data = self._read_now(max_bytes)
            if data is not None and (not data or not skip(data)):
                return data
            if self._outgoing is not None and self._outgoing.pending:
                return None
            if data is None:
                return STAY

    async def _fill(self) -> None:
        """Moves what the socket has into the TLS input, waiting until it has something."""
        assert self._incoming is not None
        sock = self._open_socket()
        while (data := self._recv_now(sock, RECEIVE_BYTES)) is None:
            await trio.lowlevel.wait_readable(sock)
            self._readable()
            sock = self._open_socket()
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def _flush(self) -> None:
        """Sends what TLS has produced. One flusher at a time: a second caller leaves its bytes
        to the one already sending, which loops until the TLS output is empty."""
        assert self._outgoing is not None
        if self._flushing:
            return
        self._flushing = True
        try:
            while self._outgoing.pending:
                await self._send_raw(self._open_socket(), memoryview(self._outgoing.read()))
        finally:
            self._flushing = False

    async def _send_raw(self, sock: socket.socket, view: memoryview) -> None:
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                self._unyielded = 0
                sock = self._open_socket()
                continue
            view = view[sent:]
            self._unyielded += sent
