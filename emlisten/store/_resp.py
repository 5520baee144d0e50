"""A small Trio-native Redis client (RESP2) for the Redis store: only what the store uses.

Commands go out as arrays of bulk strings; replies are parsed incrementally (``bytes.find`` on
CRLF, bulk strings taken by their length). A bounded pool of connections, each set up with AUTH,
SELECT and CLIENT SETNAME; registered Lua scripts (EVALSHA, EVAL on NOSCRIPT); pipelines, MULTI
/ EXEC; one SUBSCRIBE connection per subscription.

Failures are this module's exceptions: :class:`ReplyError` (Redis answered with an error: never
retried) and :class:`RedisConnectionError` (connect, socket, TLS, protocol, pool exhausted, no
answer in time). A dropped connection or a refused connect is retried (:data:`RETRIES` more
attempts, jittered exponential backoff capped at 1 s) before :class:`RedisConnectionError` is
raised; a server that does not answer in time (:class:`Unanswered`) is not: the retries would
multiply the wait. Messages never carry the URL's password or AUTH's arguments.

Why not redis-py: from Trio it ran on trio-asyncio's loop, at 258-280 us of CPU per call
(docs/architecture.md, "The asyncio bridge").
"""

from __future__ import annotations

import hashlib
import math
import random
import ssl
import time
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Final, TypeAlias, Union
from urllib.parse import parse_qs, unquote, urlsplit

import trio

Reply: TypeAlias = Union[bytes, int, list["Reply"], "ReplyError", None]
Arg: TypeAlias = str | bytes | int | float

#: Reconnect attempts after the first before an operation fails.
RETRIES: Final = 5
_BACKOFF_BASE: Final = 0.05
_BACKOFF_CAP: Final = 1.0
#: A connection idle longer than this is checked with PING before use.
HEALTH_CHECK_INTERVAL: Final = 30.0
#: Longest the server may stay silent while a call waits for it (the store passes the lease TTL).
COMMAND_TIMEOUT: Final = 10.0
_READ_SIZE: Final = 64 * 1024
#: A big payload is sent in pieces of this size, each within the command timeout.
_SEND_CHUNK: Final = 1024 * 1024
#: Redis's own limit on one bulk string (proto-max-bulk-len's default).
MAX_BULK: Final = 512 * 1024 * 1024
_MAX_LINE: Final = 64 * 1024
_MAX_ARRAY: Final = 1 << 31


class RedisError(Exception):
    """Base of this module's errors."""


class ReplyError(RedisError):
    """An error reply from Redis (``-ERR ...``, ``-WRONGTYPE ...``, ``-NOSCRIPT ...``)."""

    @property
    def code(self) -> str:
        return str(self).split(" ", 1)[0]


class RedisConnectionError(RedisError):
    """Redis could not be reached, the connection broke, or it spoke something we cannot read."""


class ProtocolError(RedisConnectionError):
    """Bytes that are not RESP2 (or over this module's bounds)."""


class _ConnectionLost(RedisConnectionError):
    """The server closed the connection (EOF)."""


class Unanswered(RedisConnectionError):
    """The server did not answer in time. Not retried: a retry would most likely wait as long."""


class CommandTimeout(Unanswered):
    """No complete answer within the client's ``command_timeout`` (the commands may have run)."""


class ConnectTimeout(Unanswered):
    """A new connection was not set up within the client's ``connect_timeout``."""


# -- encoder -------------------------------------------------------------------------------------


def _arg_bytes(arg: Arg) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, bool):  # bool is an int: refuse it rather than send "True"
        raise TypeError("a bool is not a Redis argument")
    if isinstance(arg, int):
        return b"%d" % arg
    if isinstance(arg, float):
        return repr(arg).encode()
    raise TypeError(f"not a Redis argument: {type(arg).__name__}")


def encode_command(args: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _arg_bytes(arg)
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


# -- parser --------------------------------------------------------------------------------------


class _Incomplete:
    pass


INCOMPLETE: Final = _Incomplete()


class Parser:
    """Incremental RESP2 reply parser: ``feed`` bytes, ``get`` replies (or :data:`INCOMPLETE`).

    Resumable: a reply split over many reads is not parsed again from its start (array elements
    already read are kept), so a big reply costs linear time. What it buffers is bounded by one
    bulk string (:data:`MAX_BULK`) plus one read.
    """

    __slots__ = ("_buf", "_chunks", "_chunks_len", "_need", "_pos", "_stack")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        # Reads not yet joined to _buf: joined once enough has arrived for the element waited on,
        # so a big bulk string arriving in many reads is copied once, not once per read.
        self._chunks: list[bytes] = []
        self._chunks_len = 0
        self._need = 0  # bytes needed from _pos before parsing can go on (0: unknown, a line)
        self._stack: list[tuple[list[Reply], int]] = []  # arrays being filled, with their sizes

    def feed(self, data: bytes | bytearray) -> None:
        if not data:
            return
        if not isinstance(data, bytes):
            data = bytes(data)
        if self._pos >= len(self._buf) and not self._chunks:
            self._buf = data
            self._pos = 0
        else:
            self._chunks.append(data)
            self._chunks_len += len(data)

    @property
    def pending(self) -> bool:
        """Whether a reply was begun and not finished (or bytes are waiting)."""
        return bool(self._stack) or self._pos < len(self._buf) or bool(self._chunks)

    def _join(self) -> None:
        self._buf = self._buf[self._pos :] + b"".join(self._chunks)
        self._pos = 0
        self._chunks = []
        self._chunks_len = 0

    def get(self) -> Reply | _Incomplete:
        if self._chunks and (self._need == 0 or len(self._buf) - self._pos + self._chunks_len >= self._need):
            self._join()
        buf = self._buf
        pos = self._pos
        stack = self._stack
        while True:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if len(buf) - pos > _MAX_LINE:
                    raise ProtocolError("a reply line is too long")
                self._pos = pos
                self._need = 0
                return INCOMPLETE
            kind = buf[pos]
            value: Reply
            if kind == 36:  # $ bulk string
                size = _int(buf, pos, end)
                if size < 0:
                    value = None
                    pos = end + 2
                else:
                    if size > MAX_BULK:
                        raise ProtocolError("a bulk string is too long")
                    stop = end + 2 + size
                    if len(buf) < stop + 2:
                        self._pos = pos
                        self._need = stop + 2 - pos
                        return INCOMPLETE
                    if buf[stop : stop + 2] != b"\r\n":
                        raise ProtocolError("a bulk string does not end with CRLF")
                    value = buf[end + 2 : stop]
                    pos = stop + 2
            elif kind == 42:  # * array
                size = _int(buf, pos, end)
                pos = end + 2
                if size < 0:
                    value = None
                elif size == 0:
                    value = []
                else:
                    if size > _MAX_ARRAY:
                        raise ProtocolError("an array is too long")
                    stack.append(([], size))
                    continue
            elif kind == 58:  # : integer
                value = _int(buf, pos, end)
                pos = end + 2
            elif kind == 43:  # + simple string
                value = buf[pos + 1 : end]
                pos = end + 2
            elif kind == 45:  # - error
                value = ReplyError(buf[pos + 1 : end].decode(errors="replace"))
                pos = end + 2
            else:
                raise ProtocolError(f"unknown reply type {bytes([kind])!r}")
            while stack:
                items, size = stack[-1]
                items.append(value)
                if len(items) < size:
                    break
                stack.pop()
                value = items
            else:
                self._pos = pos
                if pos >= len(buf):
                    self._buf = b""
                    self._pos = 0
                return value


def _int(buf: bytes, pos: int, end: int) -> int:
    try:
        return int(buf[pos + 1 : end])
    except ValueError:
        raise ProtocolError("a malformed number in a reply") from None


# -- URLs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """Where and how to connect. ``repr`` leaves the password out."""

    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def parse_url(url: str) -> Address:
    """``redis://[[user]:password@]host[:port][/db]`` or ``rediss://`` (TLS).

    ``rediss`` query options, as redis-py read them: ``ssl_cert_reqs`` (none, optional,
    required: the default) and ``ssl_ca_certs`` (a CA file instead of the system's). Raises
    ``ValueError`` (without the password) when the URL is malformed.
    """
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
        host = parts.hostname
    except ValueError:
        raise ValueError("malformed URL") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("the scheme must be redis:// or rediss://")
    if not host:
        raise ValueError("no host")
    path = parts.path.strip("/")
    options = parse_qs(parts.query)
    if "db" in options and not path:
        path = options.pop("db")[-1]
    else:
        options.pop("db", None)
    try:
        db = int(path) if path else 0
    except ValueError:
        raise ValueError("the database must be a number") from None
    tls = parts.scheme == "rediss"
    context: ssl.SSLContext | None = None
    if tls:
        context = ssl.create_default_context(cafile=_one(options.pop("ssl_ca_certs", None)))
        reqs = _one(options.pop("ssl_cert_reqs", None))
        if reqs is not None:
            if reqs.lower() not in _CERT_REQS:
                raise ValueError("ssl_cert_reqs must be none, optional or required")
            if _CERT_REQS[reqs.lower()] != ssl.CERT_REQUIRED:
                context.check_hostname = False
            context.verify_mode = _CERT_REQS[reqs.lower()]
    if options:
        raise ValueError(f"unknown URL option(s): {', '.join(sorted(options))}")
    return Address(
        host=host,
        port=port,
        db=db,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=tls,
        ssl_context=context,
    )


def _one(values: list[str] | None) -> str | None:
    return values[-1] if values else None


# -- connections ---------------------------------------------------------------------------------


class Connection:
    """One connection to Redis. Used by one task at a time."""

    __slots__ = ("_parser", "_stream", "broken", "last_used")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._parser = Parser()
        self.last_used = time.monotonic()
        self.broken = False

    async def send(self, data: bytes, stall_timeout: float = math.inf) -> None:
        """Raises ``trio.TooSlowError`` when the server takes none of a ``_SEND_CHUNK`` within
        ``stall_timeout`` seconds (a big payload on a slow link is fine while it moves)."""
        if len(data) <= _SEND_CHUNK:
            with trio.fail_after(stall_timeout):
                await self._stream.send_all(data)
            return
        view = memoryview(data)
        for start in range(0, len(view), _SEND_CHUNK):
            with trio.fail_after(stall_timeout):
                await self._stream.send_all(view[start : start + _SEND_CHUNK])

    async def read_reply(self, stall_timeout: float = math.inf) -> Reply:
        """Raises ``trio.TooSlowError`` when no byte arrives for ``stall_timeout`` seconds."""
        parser = self._parser
        while True:
            reply = parser.get()
            if not isinstance(reply, _Incomplete):
                return reply
            with trio.fail_after(stall_timeout):
                data = await self._stream.receive_some(_READ_SIZE)
            if not data:
                raise _ConnectionLost("the server closed the connection")
            parser.feed(data)

    async def request(self, *args: Arg) -> Reply:
        """One command; an error reply is raised."""
        await self.send(encode_command(args))
        reply = await self.read_reply()
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    def close(self) -> None:
        """Close the socket at once, without QUIT or TLS close_notify: synchronous, so it can
        run where a request was cancelled half-way; Redis drops a client whose socket closed."""
        self.broken = True
        stream: object = self._stream
        while isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        if isinstance(stream, trio.SocketStream):
            stream.socket.close()


async def connect(address: Address, *, client_name: str | None, connect_timeout: float) -> Connection:
    """A new connection, set up: AUTH (when the URL has a password), SELECT, CLIENT SETNAME."""
    conn: Connection | None = None
    try:
        with trio.fail_after(connect_timeout):
            stream: trio.abc.Stream = await trio.open_tcp_stream(address.host, address.port)
            if address.tls:
                assert address.ssl_context is not None
                tls_stream = trio.SSLStream(stream, address.ssl_context, server_hostname=address.host)
                stream = tls_stream
                await tls_stream.do_handshake()
            conn = Connection(stream)
            setup: list[list[Arg]] = []
            if address.password is not None:
                auth: list[Arg] = ["AUTH"]
                if address.username:
                    auth.append(address.username)
                auth.append(address.password)
                setup.append(auth)
            if address.db:
                setup.append(["SELECT", address.db])
            if client_name:
                setup.append(["CLIENT", "SETNAME", client_name])
            if setup:
                await conn.send(b"".join(encode_command(args) for args in setup))
                replies = [await conn.read_reply() for _ in setup]
                for args, reply in zip(setup, replies, strict=True):
                    if isinstance(reply, ReplyError):
                        # The command's name only: AUTH's arguments are the credentials.
                        raise ReplyError(f"{_arg_bytes(args[0]).decode()} failed: {reply}")
            return conn
    except trio.TooSlowError:
        if conn is not None:
            conn.close()
        raise ConnectTimeout(f"connecting to {address} timed out after {connect_timeout:g} s") from None
    except (OSError, trio.BrokenResourceError, RedisConnectionError) as exc:
        if conn is not None:
            conn.close()
        raise RedisConnectionError(f"cannot connect to {address}: {describe(exc)}") from None
    except BaseException:
        if conn is not None:
            conn.close()
        raise


def describe(exc: BaseException) -> str:
    """``Type: message``, with the cause of a Trio error that wraps one (a TLS failure is an
    ``SSLError`` inside ``BrokenResourceError``). Nothing here carries credentials."""
    text = str(exc)
    described = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        described += f" ({describe(exc.__cause__)})"
    return described


#: What a dropped connection looks like from Trio's side.
_DROPPED = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, _ConnectionLost)


def backoff(failures: int) -> float:
    """Full jitter, exponential, capped (redis-py's ExponentialWithJitterBackoff(1.0, 0.05))."""
    return random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**failures))


# -- the client ----------------------------------------------------------------------------------


@dataclass(eq=False)
class Client:
    """A bounded pool of connections to one Redis, and the commands the store sends.

    ``max_connections`` bounds the connections (subscriptions included); a caller beyond it
    waits up to ``pool_timeout`` seconds for one. A connection is returned to the pool only after
    a complete exchange: one that errored or was cancelled half-way is closed.

    ``command_timeout`` bounds how long the server may stay silent during one exchange (no byte
    of the replies arriving, or no piece of the commands taken), not the whole exchange: a big
    reply on a slow link is fine while it moves. A Redis that accepts connections and never
    answers (stopped, or behind a path that drops packets without a reset) fails the call with
    :class:`CommandTimeout` instead of hanging it.
    That is not retried: the commands may have run, and the server that did not answer would
    most likely not answer the retry either; nor is a connect past ``connect_timeout``. So a
    silent server holds one call about ``command_timeout`` plus ``connect_timeout`` plus the
    retries' backoff (a few seconds) at most, once it has its pool slot.
    """

    address: Address
    _: KW_ONLY
    max_connections: int = 32
    client_name: str | None = None
    pool_timeout: float = 20.0
    connect_timeout: float = 5.0
    retries: int = RETRIES
    health_check_interval: float = HEALTH_CHECK_INTERVAL
    command_timeout: float = COMMAND_TIMEOUT

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if not self.command_timeout > 0:
            raise ValueError("command_timeout must be positive")
        self._slots = trio.Semaphore(self.max_connections)
        self._idle: list[Connection] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"Client({self.address})"

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def in_use(self) -> int:
        return self.max_connections - self._slots.value

    # -- the pool --------------------------------------------------------------------------------

    async def _acquire_slot(self) -> None:
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(self.pool_timeout):
                await self._slots.acquire()
                return
            raise RedisConnectionError(
                f"no connection to {self.address} free within {self.pool_timeout:g} s "
                f"(max_connections={self.max_connections})"
            ) from None

    async def _take(self) -> Connection:
        """A set-up connection, from the pool or new (the caller holds a slot)."""
        if self._closed:
            raise RedisError("the client is closed")  # not a RedisConnectionError: no retries
        while self._idle:
            conn = self._idle.pop()
            if time.monotonic() - conn.last_used < self.health_check_interval:
                return conn
            try:
                with trio.fail_after(self.command_timeout):
                    await conn.request("PING")
                return conn
            except (*_DROPPED, RedisError):
                conn.close()  # dead while idle: try the next one, or a new one
            except trio.TooSlowError:
                # The rest were idle longer still: checking each would take as long again.
                conn.close()
                idle, self._idle = self._idle, []
                for other in idle:
                    other.close()
            except BaseException:
                conn.close()
                raise
        return await connect(self.address, client_name=self.client_name, connect_timeout=self.connect_timeout)

    def _give_back(self, conn: Connection) -> None:
        if conn.broken or self._closed:
            conn.close()
        else:
            conn.last_used = time.monotonic()
            self._idle.append(conn)

    async def _exchange(self, payload: bytes, count: int) -> list[Reply]:
        """Send ``payload`` (``count`` commands), read their replies; retried when the connection
        drops or cannot be made. Error replies are returned, not raised."""
        failures = 0
        while True:
            await self._acquire_slot()
            try:
                conn = await self._take()
                done = False
                timeout = self.command_timeout
                try:
                    await conn.send(payload, timeout)
                    read = conn.read_reply
                    replies = [await read(timeout) for _ in range(count)]
                    done = True
                except trio.TooSlowError:
                    raise CommandTimeout(f"no answer from {self.address} within {timeout:g} s") from None
                finally:
                    if done:
                        self._give_back(conn)
                    else:
                        conn.close()  # failed, cancelled or timed out half-way: unusable
                return replies
            except _DROPPED as exc:
                error: RedisConnectionError = RedisConnectionError(
                    f"connection to {self.address} lost: {describe(exc)}"
                )
            except (ProtocolError, Unanswered):
                raise  # not a dropped connection: a retry would read the same, or wait as long
            except RedisConnectionError as exc:  # could not connect
                error = exc
            finally:
                self._slots.release()
            failures += 1
            if failures > self.retries:
                raise error
            await trio.sleep(backoff(failures))

    # -- commands --------------------------------------------------------------------------------

    async def execute(self, *args: Arg) -> Reply:
        """One command; an error reply is raised as :class:`ReplyError`."""
        (reply,) = await self._exchange(encode_command(args), 1)
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    def pipeline(self, *, transaction: bool = False) -> Pipeline:
        return Pipeline(self, transaction=transaction)

    def register_script(self, source: str) -> Script:
        return Script(self, source)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    async def subscribe(self, channel: str) -> Subscription:
        """A subscription to ``channel`` on a connection of its own, holding one of the pool's
        slots until :meth:`Subscription.close`; confirmed by the server before this returns."""
        await self._acquire_slot()
        subscription = Subscription(self, channel)
        try:
            await subscription.restart()
        except BaseException:
            subscription.close()
            raise
        return subscription


class Script:
    """A Lua script run by its SHA1 (EVALSHA); sent whole (EVAL) when Redis does not have it."""

    def __init__(self, client: Client, source: str) -> None:
        self.client = client
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source, usedforsecurity=False).hexdigest()
        #: Whether Redis ran it (so has it cached, unless flushed or restarted since).
        self.loaded = False

    def command(self, keys: Sequence[Arg], args: Sequence[Arg]) -> list[Arg]:
        return ["EVALSHA", self.sha, len(keys), *keys, *args]

    def eval_command(self, keys: Sequence[Arg], args: Sequence[Arg]) -> list[Arg]:
        return ["EVAL", self.source, len(keys), *keys, *args]

    async def __call__(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Reply:
        if not self.loaded:  # its first run on this client: whole, which caches it
            (reply,) = await self.client._exchange(encode_command(self.eval_command(keys, args)), 1)
            self.loaded = True
            if isinstance(reply, ReplyError):
                raise reply
            return reply
        (reply,) = await self.client._exchange(encode_command(self.command(keys, args)), 1)
        if isinstance(reply, ReplyError) and reply.code == "NOSCRIPT":
            # Not cached (a restarted or flushed Redis): EVAL runs it and caches it again.
            (reply,) = await self.client._exchange(encode_command(self.eval_command(keys, args)), 1)
        self.loaded = True
        if isinstance(reply, ReplyError):
            raise reply
        return reply


class Pipeline:
    """Commands written in one send, replies read in order; with ``transaction``, in MULTI/EXEC.

    A script queued with :meth:`script` goes by SHA1 once it ran on this client, whole (EVAL)
    before, so it runs in its place. One that Redis lost meanwhile (NOSCRIPT: it did not run) is
    run again with EVAL after the others, on its own (outside a transaction, which it aborts).
    """

    def __init__(self, client: Client, *, transaction: bool = False) -> None:
        self.client = client
        self.transaction = transaction
        self._commands: list[Sequence[Arg]] = []
        self._scripts: list[tuple[Script, Sequence[Arg], Sequence[Arg]] | None] = []

    def __len__(self) -> int:
        return len(self._commands)

    def command(self, *args: Arg) -> Pipeline:
        self._commands.append(args)
        self._scripts.append(None)
        return self

    def script(self, script: Script, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Pipeline:
        if script.loaded and not self.transaction:
            self._commands.append(script.command(keys, args))
        else:
            self._commands.append(script.eval_command(keys, args))
        self._scripts.append((script, keys, args))
        return self

    async def execute(self, *, raise_on_error: bool = True) -> list[Reply]:
        """The replies, in order. The first error reply is raised unless ``raise_on_error`` is
        false (then error replies are in the list)."""
        if not self._commands:
            return []
        commands = list(self._commands)
        if self.transaction:
            commands = [("MULTI",), *commands, ("EXEC",)]
        payload = b"".join(encode_command(args) for args in commands)
        replies = await self.client._exchange(payload, len(commands))
        if self.transaction:
            for reply in replies[:-1]:
                if isinstance(reply, ReplyError):
                    raise reply  # queued wrong: EXEC was refused
            executed = replies[-1]
            if not isinstance(executed, list):
                raise ReplyError(f"EXEC did not run the transaction: {executed!r}")
            replies = executed
        else:
            missing: list[int] = []
            again: list[bytes] = []
            for i, reply in enumerate(replies):
                queued = self._scripts[i]
                if queued is not None and isinstance(reply, ReplyError) and reply.code == "NOSCRIPT":
                    script, keys, args = queued
                    missing.append(i)
                    again.append(encode_command(script.eval_command(keys, args)))
            if missing:
                answers = await self.client._exchange(b"".join(again), len(missing))
                for i, reply in zip(missing, answers, strict=True):
                    replies[i] = reply
        for queued in self._scripts:
            if queued is not None:
                queued[0].loaded = True
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, ReplyError):
                    raise reply
        return replies


class Subscription:
    """One channel's messages (``PUBLISH``ed payloads), read from a connection of its own.

    When its connection drops, it reconnects and subscribes again (the client's retries and
    backoff); messages published meanwhile are lost. An idle connection is checked with PING
    every ``health_check_interval`` seconds; no answer within one more interval is a drop.
    """

    def __init__(self, client: Client, channel: str) -> None:
        """Use :meth:`Client.subscribe` (this takes a pool slot the caller holds)."""
        self.client = client
        self.channel = channel
        self._conn: Connection | None = None
        self._holds_slot = True

    async def start(self) -> None:
        client = self.client
        conn = await connect(
            client.address, client_name=client.client_name, connect_timeout=client.connect_timeout
        )
        try:
            with trio.fail_after(self.client.connect_timeout):
                await conn.send(encode_command(["SUBSCRIBE", self.channel]))
                # Only after the confirmation is a later PUBLISH sure to reach us.
                while True:
                    reply = await conn.read_reply()
                    if isinstance(reply, ReplyError):
                        raise reply
                    if isinstance(reply, list) and reply and reply[0] == b"subscribe":
                        break
        except trio.TooSlowError:
            conn.close()
            raise Unanswered(f"{self.client.address} did not confirm SUBSCRIBE") from None
        except _DROPPED as exc:
            conn.close()
            raise RedisConnectionError(f"subscribing at {self.client.address}: {describe(exc)}") from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def restart(self) -> None:
        """:meth:`start`, retried as the client retries a dropped connection."""
        failures = 0
        while True:
            try:
                await self.start()
                return
            except Unanswered:
                raise
            except RedisConnectionError:
                failures += 1
                if failures > self.client.retries:
                    raise
            await trio.sleep(backoff(failures))

    async def next_message(self) -> bytes:
        """The next message's payload; reconnects when the connection drops. Raises
        :class:`RedisConnectionError` when it cannot get back (after the retries)."""
        interval = self.client.health_check_interval
        while True:
            conn = self._conn
            if conn is None:
                raise RedisConnectionError("the subscription is closed")
            try:
                pinged = False
                while True:
                    with trio.move_on_after(interval):
                        reply = await conn.read_reply()
                        break
                    if pinged:
                        raise _ConnectionLost(f"no answer to PING within {interval:g} s")
                    await conn.send(encode_command(["PING"]))
                    pinged = True
            except _DROPPED as exc:
                conn.close()
                self._conn = None
                try:
                    await self.restart()
                except RedisConnectionError as again:
                    raise RedisConnectionError(
                        f"subscription lost: {describe(exc)}; {describe(again)}"
                    ) from None
                continue
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                payload = reply[2]
                if isinstance(payload, bytes):
                    return payload
            elif isinstance(reply, ReplyError):
                raise reply
            # subscribe confirmations, PING's pong: nothing to hand on

    def close(self) -> None:
        """Close the connection and give the pool slot back (idempotent)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._holds_slot:
            self._holds_slot = False
            self.client._slots.release()
