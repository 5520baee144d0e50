"""A deliberately tiny IMAP client on raw Trio streams, independent of emlisten.

The benchmarks use it for the two things they must not borrow from the code under test: appending
mail (so "APPEND done" is timed in the bench's own event loop) and the latency floor probe (a bare
IDLE session that timestamps ``* n EXISTS`` as soon as the bytes arrive). It handles only what
Dovecot answers to LOGIN, SELECT, APPEND and IDLE, and the backlog floor's UID FETCH of whole
bodies (one literal per FETCH line).
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Callable

import trio

from emlisten.config import Settings

#: What emlisten's listener asks for new mail (ImapSource: the size and arrival date with the
#: body, cut at the prefetch limit), so that a floor that fetches asks the server the same.
LISTENER_FETCH_ITEMS = b"(UID RFC822.SIZE INTERNALDATE BODY.PEEK[]<0.%d>)" % (
    Settings().prefetch_max_bytes + 1
)


class RawImapError(RuntimeError):
    pass


def _quoted(text: str) -> bytes:
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').encode() + b'"'


class RawImap:
    """One connection. Not safe for concurrent commands: give each task its own."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._tags = 0
        self.capabilities: set[str] = set()

    @classmethod
    async def connect(cls, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> RawImap:
        tcp = await trio.open_tcp_stream(host, port)
        stream: trio.abc.Stream = tcp
        if ssl_context is not None:
            tls = trio.SSLStream(tcp, ssl_context, server_hostname=host)
            await tls.do_handshake()
            stream = tls
        client = cls(stream)
        greeting = await client.read_line()
        if not greeting.startswith(b"* OK"):
            await client.aclose()
            raise RawImapError(f"unexpected greeting {greeting[:80]!r}")
        client._note_capabilities(greeting)
        return client

    async def aclose(self) -> None:
        with trio.move_on_after(2) as scope:
            scope.shield = True
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self._stream.aclose()

    def _note_capabilities(self, line: bytes) -> None:
        text = line.decode(errors="replace")
        start = text.find("[CAPABILITY ")
        if start >= 0:
            end = text.find("]", start)
            self.capabilities = set(text[start + 12 : end].upper().split())
        elif text.startswith("* CAPABILITY "):
            self.capabilities = set(text[13:].upper().split())

    async def read_line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                return line
            data = await self._stream.receive_some(65536)
            if not data:
                raise RawImapError("connection closed by the server")
            self._buffer += data

    def _next_tag(self) -> bytes:
        self._tags += 1
        return b"b%d" % self._tags

    async def _finish(self, tag: bytes) -> tuple[list[bytes], bytes]:
        untagged: list[bytes] = []
        while True:
            line = await self.read_line()
            if line.startswith(tag + b" "):
                if not line[len(tag) + 1 :].startswith(b"OK"):
                    raise RawImapError(f"command failed: {line[:200]!r}")
                return untagged, line
            self._note_capabilities(line)
            untagged.append(line)

    async def command(self, text: bytes) -> tuple[list[bytes], bytes]:
        tag = self._next_tag()
        await self._stream.send_all(tag + b" " + text + b"\r\n")
        return await self._finish(tag)

    async def login(self, user: str, password: str) -> None:
        await self.command(b"LOGIN " + _quoted(user) + b" " + _quoted(password))

    async def select(self, folder: str = "INBOX") -> int:
        """SELECT the folder; returns its EXISTS count."""
        exists, _ = await self.select_with_uidnext(folder)
        return exists

    async def select_with_uidnext(self, folder: str = "INBOX", *, examine: bool = False) -> tuple[int, int]:
        """SELECT (or EXAMINE, read-only, as emlisten's listener does) the folder; returns its
        EXISTS count and UIDNEXT (0 if the server sent none)."""
        untagged, _ = await self.command((b"EXAMINE " if examine else b"SELECT ") + _quoted(folder))
        exists = uidnext = 0
        for line in untagged:
            parts = line.split()
            if len(parts) == 3 and parts[2] == b"EXISTS":
                exists = int(parts[1])
            start = line.find(b"[UIDNEXT ")
            if start >= 0:
                uidnext = int(line[start + 9 : line.index(b"]", start)])
        return exists, uidnext

    async def _read_exact(self, size: int) -> bytes:
        while len(self._buffer) < size:
            data = await self._stream.receive_some(max(65536, size - len(self._buffer)))
            if not data:
                raise RawImapError("connection closed by the server")
            self._buffer += data
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        return chunk

    async def uid_fetch_bodies(
        self,
        first_uid: int,
        *,
        ending_idle: bytes | None = None,
        items: bytes = b"(UID BODY.PEEK[])",
        idle_tag: bytes | None = None,
    ) -> tuple[int, int]:
        """``UID FETCH first:* items`` (default ``(UID BODY.PEEK[])``), literals read and dropped.
        Returns how many messages at or above ``first_uid`` came back and the highest UID seen
        (for the next call).

        ``ending_idle``: the tag of an IDLE to end first, with DONE in the same packet as the
        FETCH (as emlisten's listener does). ``idle_tag``: ``tag IDLE`` goes in that packet too,
        behind the FETCH (as emlisten's listener does since session 13); its ``+`` is left for
        ``idle_started``. Only the shape Dovecot answers: one literal per FETCH line, announced
        as ``{n}``."""
        tag = self._next_tag()
        command = tag + b" UID FETCH %d:* %s\r\n" % (first_uid, items)
        if idle_tag is not None:
            command += idle_tag + b" IDLE\r\n"
        await self._stream.send_all(command if ending_idle is None else b"DONE\r\n" + command)
        if ending_idle is not None:
            while not (line := await self.read_line()).startswith(ending_idle + b" "):
                pass
            if not line[len(ending_idle) + 1 :].startswith(b"OK"):
                raise RawImapError(f"IDLE ended with {line[:200]!r}")
        count, highest = 0, first_uid - 1
        while True:
            line = await self.read_line()
            if line.startswith(tag + b" "):
                if not line[len(tag) + 1 :].startswith(b"OK"):
                    raise RawImapError(f"UID FETCH failed: {line[:200]!r}")
                return count, highest
            if b" FETCH " in line:
                start = line.find(b"UID ")
                uid = int(line[start + 4 :].split(maxsplit=1)[0].rstrip(b")")) if start >= 0 else 0
                if uid >= first_uid:  # "n:*" answers the last message when n is past it
                    count += 1
                    highest = max(highest, uid)
            while line.endswith(b"}") and b"{" in line:
                await self._read_exact(int(line[line.rindex(b"{") + 1 : -1]))
                line = await self.read_line()

    async def idle_done(self, idle_tag: bytes) -> None:
        """End the IDLE started by ``idle_start`` (untagged lines meanwhile are dropped)."""
        await self._stream.send_all(b"DONE\r\n")
        while not (line := await self.read_line()).startswith(idle_tag + b" "):
            pass
        if not line[len(idle_tag) + 1 :].startswith(b"OK"):
            raise RawImapError(f"IDLE ended with {line[:200]!r}")

    async def append(self, message: bytes, folder: str = "INBOX") -> bytes:
        """APPEND; returns the tagged OK line (with APPENDUID) once the server confirmed it."""
        tag = self._next_tag()
        head = tag + b" APPEND " + _quoted(folder) + b" "
        if "LITERAL+" in self.capabilities:
            await self._stream.send_all(head + b"{%d+}\r\n" % len(message) + message + b"\r\n")
        else:
            await self._stream.send_all(head + b"{%d}\r\n" % len(message))
            while not (line := await self.read_line()).startswith(b"+"):
                if line.startswith(tag + b" "):
                    raise RawImapError(f"APPEND refused: {line[:200]!r}")
            await self._stream.send_all(message + b"\r\n")
        _, tagged = await self._finish(tag)
        return tagged

    async def idle_start(self) -> bytes:
        """Send IDLE and return the tag once the server's ``+`` continuation arrived."""
        tag = self._next_tag()
        await self._stream.send_all(tag + b" IDLE\r\n")
        return await self.idle_started(tag)

    async def idle_started(self, tag: bytes) -> bytes:
        """Wait for the ``+`` of the IDLE sent with ``tag``; returns the tag."""
        while not (line := await self.read_line()).startswith(b"+"):
            if line.startswith(tag + b" "):
                raise RawImapError(f"IDLE refused: {line[:200]!r}")
        return tag

    async def watch_and_fetch(
        self,
        idle_tag: bytes,
        uidnext: int,
        on_exists: Callable[[int, float], None],
        on_fetched: Callable[[int, float], None],
        *,
        pipelined_idle: bool = False,
    ) -> None:
        """``watch``, and on each new EXISTS what emlisten's listener does: DONE + UID FETCH of
        the new mail in one packet, then IDLE again (with ``pipelined_idle`` in that packet too,
        as emlisten does). ``on_fetched(count, monotonic_time)`` once the mail up to EXISTS
        ``count`` has been read whole."""
        known = 0
        while True:
            count, seen_at = await self._next_exists(idle_tag)
            on_exists(count, seen_at)
            if count <= known:
                continue
            known = count
            next_idle = self._next_tag() if pipelined_idle else None
            fetched, highest = await self.uid_fetch_bodies(
                uidnext, ending_idle=idle_tag, items=LISTENER_FETCH_ITEMS, idle_tag=next_idle
            )
            if fetched:
                on_fetched(count, time.monotonic())
                uidnext = highest + 1
            idle_tag = await (self.idle_started(next_idle) if next_idle is not None else self.idle_start())

    async def watch(self, idle_tag: bytes, on_exists: Callable[[int, float], None]) -> None:
        """After ``idle_start``: call ``on_exists(count, monotonic_time)`` for each ``* n EXISTS``
        until cancelled. (Dovecot ends IDLE only after 30 min of silence, longer than any run.)"""
        while True:
            on_exists(*await self._next_exists(idle_tag))

    async def _next_exists(self, idle_tag: bytes) -> tuple[int, float]:
        """In IDLE: the count of the next ``* n EXISTS`` and when it was read (time.monotonic);
        other lines are dropped."""
        while True:
            line = await self.read_line()
            seen_at = time.monotonic()
            if line.startswith(idle_tag + b" "):
                raise RawImapError(f"IDLE ended: {line[:200]!r}")
            parts = line.split()
            if len(parts) == 3 and parts[0] == b"*" and parts[2] == b"EXISTS":
                return int(parts[1]), seen_at
