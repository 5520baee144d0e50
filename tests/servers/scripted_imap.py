"""A small IMAP server for behaviours the RFCs allow and Dovecot does not show on demand.

One folder (INBOX) whose mail the test lands (``land``); any user name and password log in;
plain TCP on a free loopback port, in the test's Trio loop. What it can be told to do:

- ``land_during_next_fetch``: mail that lands while the next ``UID FETCH`` runs. Its answer
  holds the mail the folder had when the command started, and announces the new mail at its
  end (``* n EXISTS`` before the tagged OK), as a server that syncs its view after each
  command does (RFC 3501 7.3.1 allows EXISTS in any command's answer).
- ``refuse_pipelined_idle``: ``IDLE`` that arrives in the same read as an earlier command is
  refused (``BAD``), as a strict server may; IDLE sent on its own is accepted.

``commands`` records each command's name in order (``DONE`` included), ``pipelined_idles`` the
IDLEs that came behind another command.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

_UIDVALIDITY = 7


@dataclass(eq=False)
class _Session:
    stream: trio.SocketStream
    idle_tag: bytes | None = None
    known: int = 0  # messages this session has been told of
    lock: trio.Lock = field(default_factory=trio.Lock)

    async def send(self, data: bytes) -> None:
        async with self.lock:
            await self.stream.send_all(data)


@dataclass(eq=False)
class ScriptedImapServer:
    refuse_pipelined_idle: bool = False
    land_during_next_fetch: list[bytes] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    messages: list[bytes] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    pipelined_idles: int = 0
    _sessions: set[_Session] = field(default_factory=set)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._session, listeners)

    async def land(self, raw: bytes) -> int:
        """Add a mail (its UID is returned) and announce it to every idling session."""
        self.messages.append(raw)
        for session in list(self._sessions):
            if session.idle_tag is not None:
                session.known = len(self.messages)
                await session.send(b"* %d EXISTS\r\n" % session.known)
        return len(self.messages)

    async def _session(self, stream: trio.SocketStream) -> None:
        session = _Session(stream)
        self._sessions.add(session)
        try:
            await self._converse(session)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._sessions.discard(session)
            await trio.aclose_forcefully(stream)

    async def _converse(self, session: _Session) -> None:
        await session.send(b"* OK [CAPABILITY IMAP4rev1 IDLE UIDPLUS] scripted server ready\r\n")
        buffer = b""
        while True:
            while b"\r\n" not in buffer:
                data = await session.stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            # Lines after the first of one read came pipelined behind it.
            first = True
            while b"\r\n" in buffer:
                line, buffer = buffer.split(b"\r\n", 1)
                if not await self._command(session, line, pipelined=not first):
                    return
                first = False

    async def _command(self, session: _Session, line: bytes, *, pipelined: bool) -> bool:
        if line.upper() == b"DONE":
            self.commands.append("DONE")
            tag, session.idle_tag = session.idle_tag or b"*", None
            await session.send(tag + b" OK idle done\r\n")
            return True
        tag, _, rest = line.partition(b" ")
        words = rest.split(b" ")
        name = words[0].upper()
        if name == b"UID" and len(words) > 1:
            name = words[1].upper()
        self.commands.append(name.decode("ascii", "replace"))
        if name == b"CAPABILITY":
            await session.send(b"* CAPABILITY IMAP4rev1 IDLE UIDPLUS\r\n" + tag + b" OK done\r\n")
        elif name in (b"SELECT", b"EXAMINE"):
            session.known = len(self.messages)
            await session.send(
                b"* %d EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY %d] ok\r\n* OK [UIDNEXT %d] ok\r\n"
                b"* FLAGS (\\Seen)\r\n%s OK [READ-ONLY] selected\r\n"
                % (session.known, _UIDVALIDITY, len(self.messages) + 1, tag)
            )
        elif name == b"STATUS":
            count = len(self.messages)
            await session.send(
                b"* STATUS INBOX (MESSAGES %d UIDNEXT %d UIDVALIDITY %d UNSEEN 0)\r\n%s OK status\r\n"
                % (count, count + 1, _UIDVALIDITY, tag)
            )
        elif name == b"IDLE":
            if pipelined:
                self.pipelined_idles += 1
                if self.refuse_pipelined_idle:
                    await session.send(tag + b" BAD IDLE must be sent on its own\r\n")
                    return True
            session.idle_tag = tag
            await session.send(b"+ idling\r\n")
            if session.known < len(self.messages):
                session.known = len(self.messages)
                await session.send(b"* %d EXISTS\r\n" % session.known)
        elif name == b"FETCH":
            await self._fetch(session, tag, words)
        elif name == b"NOOP":
            answer = b""
            if session.known < len(self.messages):
                session.known = len(self.messages)
                answer = b"* %d EXISTS\r\n" % session.known
            await session.send(answer + tag + b" OK noop\r\n")
        elif name == b"LOGOUT":
            await session.send(b"* BYE bye\r\n" + tag + b" OK bye\r\n")
            return False
        else:  # LOGIN, ENABLE, ID: fine
            await session.send(tag + b" OK done\r\n")
        return True

    async def _fetch(self, session: _Session, tag: bytes, words: list[bytes]) -> None:
        """``UID FETCH first:* items``, over the messages the session knows of (its view)."""
        first = int(words[2].split(b":")[0])
        in_view = self.messages[: session.known]
        chosen = list(range(max(first, 1), len(in_view) + 1))
        if not chosen and in_view:
            chosen = [len(in_view)]  # "n:*" matches the newest message when n is above every UID
        with_body = b"BODY" in b" ".join(words[3:]).upper()
        answer = bytearray()
        for uid in chosen:
            raw = in_view[uid - 1]
            answer += b'* %d FETCH (UID %d RFC822.SIZE %d INTERNALDATE "01-Jan-2026 00:00:00 +0000"' % (
                uid,
                uid,
                len(raw),
            )
            if with_body:
                answer += b" BODY[]<0> {%d}\r\n" % len(raw) + raw
            answer += b")\r\n"
        if self.land_during_next_fetch:
            self.messages.extend(self.land_during_next_fetch)
            self.land_during_next_fetch = []
            session.known = len(self.messages)
            answer += b"* %d EXISTS\r\n" % session.known
        await session.send(bytes(answer) + tag + b" OK fetched\r\n")
