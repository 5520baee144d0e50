"""A misbehaving IMAP server: just enough IMAP to be listened to, and every FETCH answered with
many large literals (``literals`` x ``literal_bytes``), whatever was asked.

It runs in the test's Trio loop on a free loopback port. Any user name and password log in; the
mailbox has 10 messages and, once a session idles, announces an 11th, so a listener fetches.
Only the first ``attacks`` FETCH commands get the huge answer (each sent until the client hangs
up); later ones get an empty one, so a test's CPU is not spent on endless copies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)

CHUNK = b"x" * (1024 * 1024)


@dataclass
class HostileImapServer:
    literals: int = 6
    literal_bytes: int = 50 * 1024 * 1024
    attacks: int = 2
    host: str = "127.0.0.1"
    port: int = 0
    #: FETCH commands answered with the huge literals so far, and bytes of them sent.
    attacks_made: int = 0
    bytes_sent: int = 0
    #: Set once every attack is over (the client took it all or hung up).
    all_attacks_over: trio.Event = field(default_factory=trio.Event)
    _attacks_over: int = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._session, listeners)

    async def _session(self, stream: trio.SocketStream) -> None:
        try:
            await self._converse(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _converse(self, stream: trio.SocketStream) -> None:
        await stream.send_all(b"* OK [CAPABILITY IMAP4rev1 IDLE UIDPLUS] hostile server ready\r\n")
        buffer = b""
        idle_tag = b"*"
        while True:
            while b"\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            line, buffer = buffer.split(b"\r\n", 1)
            tag, _, rest = line.partition(b" ")
            command = rest.split(b" ", 1)[0].upper()
            if command == b"UID":
                command = rest.split(b" ", 2)[1].upper()
            if command == b"CAPABILITY":
                await stream.send_all(b"* CAPABILITY IMAP4rev1 IDLE UIDPLUS\r\n" + tag + b" OK done\r\n")
            elif command in (b"SELECT", b"EXAMINE"):
                await stream.send_all(
                    b"* 10 EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 7] ok\r\n* OK [UIDNEXT 11] ok\r\n"
                    b"* FLAGS (\\Seen)\r\n" + tag + b" OK [READ-WRITE] selected\r\n"
                )
            elif command == b"IDLE":
                idle_tag = tag
                await stream.send_all(b"+ idling\r\n* 11 EXISTS\r\n")
            elif line.upper() == b"DONE":
                await stream.send_all(idle_tag + b" OK idle done\r\n")
            elif command == b"SEARCH":
                await stream.send_all(b"* SEARCH 11\r\n" + tag + b" OK searched\r\n")
            elif command == b"FETCH":
                await self._fetch(stream, tag)
            elif command == b"LOGOUT":
                await stream.send_all(b"* BYE bye\r\n" + tag + b" OK bye\r\n")
                return
            else:  # LOGIN, NOOP, ENABLE, ID...: fine
                await stream.send_all(tag + b" OK done\r\n")

    async def _fetch(self, stream: trio.SocketStream, tag: bytes) -> None:
        if self.attacks_made >= self.attacks:
            await stream.send_all(tag + b" OK nothing\r\n")
            return
        self.attacks_made += 1
        log.info("hostile IMAP: FETCH answered with %d x %d bytes", self.literals, self.literal_bytes)
        try:
            for number in range(11, 11 + self.literals):
                head = b"* %d FETCH (UID %d RFC822.SIZE %d BODY[] {%d}\r\n" % (
                    number,
                    number,
                    self.literal_bytes,
                    self.literal_bytes,
                )
                await stream.send_all(head)
                left = self.literal_bytes
                while left:
                    piece = CHUNK[: min(left, len(CHUNK))]
                    await stream.send_all(piece)
                    left -= len(piece)
                    self.bytes_sent += len(piece)
                await stream.send_all(b")\r\n")
            await stream.send_all(tag + b" OK fetched\r\n")
        finally:
            self._attacks_over += 1
            if self._attacks_over >= self.attacks:
                self.all_attacks_over.set()
