"""A fault-injecting TCP proxy: pure bytes forwarding from a free loopback port to a target.

Serve with ``await nursery.start(proxy.serve)`` and point the client at ``proxy.port``. Faults:

- ``cut()``: every open connection is reset at once, in both directions (RST, no FIN), as when
  a network path dies or the server crashes; new connections are accepted as before.
- ``block()``: until ``unblock()``, new connections are reset as soon as they arrive (the
  client sees "connection reset") and the open ones are cut; ``refuse_new()`` leaves the open
  ones alone.
- ``black_hole()``: until ``restore()``, nothing passes in either direction and new connections
  get no answer (their upstream is not dialled): a path that silently drops packets. The bytes
  held meanwhile travel on afterwards, as TCP retransmission would deliver them; a client whose
  own timeout fires first sees a dead connection, as it would.
- ``drop_server_lines``: while set, lines from the server that match this pattern are dropped
  (e.g. ``* 3 EXISTS``: a server that fails to announce new mail). Only for line protocols, and
  only lines that cannot occur inside a literal.

Counters (``accepted``, ``refused``, ``cuts``, ``open_count``) and ``wait_accepted`` let a
test see the clients reconnect without sleeping.
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field

import trio

_CHUNK = 64 * 1024


@dataclass(eq=False)
class _Link:
    client: trio.SocketStream
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    upstream: trio.SocketStream | None = None
    cut: bool = False


def _reset_on_close(stream: trio.SocketStream) -> None:
    # SO_LINGER with a zero timeout: close() sends RST instead of FIN (an abrupt end).
    with suppress(OSError):  # already closed
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class FaultProxy:
    """One listening port forwarding to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = 0  # known once serve() has started
        self.accepted = 0  # connections forwarded (or attempted to be) since start
        self.refused = 0  # connections reset on arrival while blocked
        self.cuts = 0  # connections reset by cut() or block()
        self.drop_server_lines: re.Pattern[bytes] | None = None
        self.dropped_lines = 0
        self._links: set[_Link] = set()
        self._blocked = False
        self._changed = trio.Event()
        self._path_open = trio.Event()
        self._path_open.set()

    @property
    def open_count(self) -> int:
        return len(self._links)

    @property
    def blocked(self) -> bool:
        return self._blocked

    def url(self, scheme: str, userinfo: str = "", path: str = "") -> str:
        """``scheme://[userinfo@]127.0.0.1:port[path]`` for a client to connect through the proxy."""
        at = f"{userinfo}@" if userinfo else ""
        return f"{scheme}://{at}{self.host}:{self.port}{path}"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and forward until cancelled; ``started()`` once the port listens."""
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)
        finally:
            self.cut()

    # -- faults ----------------------------------------------------------------------------------

    def cut(self) -> int:
        """Reset every open connection now (both sides). Returns how many were cut."""
        links = list(self._links)
        for link in links:
            link.cut = True
            link.scope.cancel()
        self.cuts += len(links)
        return len(links)

    def block(self) -> int:
        """Reset new connections on arrival until ``unblock()``; cut the open ones."""
        self._blocked = True
        return self.cut()

    def refuse_new(self) -> None:
        """Reset new connections on arrival until ``unblock()``; the open ones go on (a server
        that refuses more sessions, as at a per-user connection limit)."""
        self._blocked = True

    def unblock(self) -> None:
        self._blocked = False

    def black_hole(self) -> None:
        """Hold every byte and every new connection until ``restore()`` (no reset, no answer)."""
        if self._path_open.is_set():
            self._path_open = trio.Event()

    def restore(self) -> None:
        """End a ``black_hole()``: the held bytes and connections go on."""
        self._path_open.set()

    @property
    def black_holed(self) -> bool:
        return not self._path_open.is_set()

    async def _through_path(self) -> None:
        while not self._path_open.is_set():
            await self._path_open.wait()

    # -- observing -------------------------------------------------------------------------------

    async def wait_accepted(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``accepted`` reaches ``count`` (e.g. the clients reconnected)."""
        with trio.move_on_after(timeout):
            while self.accepted < count:
                await self._changed.wait()
            return
        raise AssertionError(
            f"timed out after {timeout}s waiting for {count} connections through the proxy to "
            f"{self.target_host}:{self.target_port} (accepted {self.accepted}, refused {self.refused})"
        )

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- forwarding ------------------------------------------------------------------------------

    async def _handle(self, client: trio.SocketStream) -> None:
        if self._blocked:
            self.refused += 1
            self._notify()
            _reset_on_close(client)
            await trio.aclose_forcefully(client)
            return
        self.accepted += 1
        self._notify()
        link = _Link(client)
        self._links.add(link)
        try:
            with link.scope:
                await self._through_path()
                try:
                    link.upstream = await trio.open_tcp_stream(self.target_host, self.target_port)
                except OSError:
                    link.cut = True  # the target is down: the client sees a reset, as it would
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, link.upstream, link)
                    nursery.start_soon(self._pump, link.upstream, client, link, self._filter)
        finally:
            self._links.discard(link)
            for stream in (client, link.upstream):
                if stream is not None:
                    if link.cut:
                        _reset_on_close(stream)
                    await trio.aclose_forcefully(stream)

    def _filter(self, pending: bytearray) -> bytes:
        """The complete lines of ``pending`` that may pass (consumed from it); a partial line
        waits for the rest while a pattern is set."""
        pattern = self.drop_server_lines
        if pattern is None:
            data = bytes(pending)
            pending.clear()
            return data
        end = pending.rfind(b"\n") + 1
        lines = bytes(pending[:end]).splitlines(keepends=True)
        del pending[:end]
        kept = []
        for line in lines:
            if pattern.fullmatch(line):
                self.dropped_lines += 1
                self._notify()
            else:
                kept.append(line)
        return b"".join(kept)

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        link: _Link,
        line_filter: Callable[[bytearray], bytes] | None = None,
    ) -> None:
        pending = bytearray()
        try:
            while data := await source.receive_some(_CHUNK):
                if line_filter is not None:
                    pending += data
                    data = line_filter(pending)
                    if not data:
                        continue
                await self._through_path()
                await sink.send_all(data)
            # A clean half-close travels on; the other direction keeps flowing.
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            # One side broke: end the whole link abruptly, as a real path failure would.
            link.cut = True
            link.scope.cancel()
