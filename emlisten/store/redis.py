"""Redis Store: the shared state of a multi-node deployment (Trio-native RESP client, _resp).

Pure Trio: no asyncio bridge::

    async with RedisStore.open(url, secret_key=key, prefix="emlisten:") as store:
        ...

The store speaks RESP itself over Trio sockets (:mod:`emlisten.store._resp`). It used redis-py on
trio-asyncio's loop until 2026-12-06: one call cost 258-280 us of CPU through the bridge, a
quarter of a primary's CPU at a 10,000-mailbox cold start (docs/architecture.md, "The asyncio
bridge"). Still, an operation that needs several commands sends them as one Lua script (one
round trip, atomic). The client's exceptions become ``StoreError`` here; nothing else in
emlisten sees them.

Keys (``P`` is the prefix):

========================  ======  ===================================================
``P mailboxes``           hash    mailbox id -> encrypted mailbox document (_crypto)
``P status``              hash    mailbox id -> status JSON (its ``delivered`` unused)
``P delivered``           hash    mailbox id -> delivered counter (HINCRBY)
``P checkpoints:<id>``    hash    folder -> checkpoint JSON ``{"uidvalidity", "last_uid"}``
``P floors:<id>``         hash    folder -> history floor (checkpoint JSON, set with the seed)
``P history:<id>:<v>:<f>``  set   UIDs of folder f (UIDVALIDITY v) delivered by history loads
``P history-index:<id>``  set     names of the mailbox's ``history:`` sets (for remove_mailbox)
``P nodes``               hash    node id -> NodeInfo JSON (its last heartbeat)
``P node-expiry``         zset    node id -> heartbeat expiry (Redis server time, ms)
``P lease:<id>``          string  node id holding the mailbox's lease, with a TTL (PX)
``P changes``             pubsub  mailbox ids that were created, changed or removed
``P incarnation``         string  id of the data set (Store.incarnation), created when absent
``P wh:endpoints``        set     webhook endpoints whose outbox is not empty
``P wh:seq``              string  counter giving outbox events their order
``P wh:outbox:<e>``       zset    event id -> order, the outbox of endpoint e
``P wh:events:<e>``       hash    event id -> encrypted event document (_crypto)
``P wh:dead``             hash    event id -> encrypted event document (dead letters)
``P wh:dead-order``       zset    event id -> dead_at (listing order)
========================  ======  ===================================================

Webhook events carry mail (subjects, bodies, attachments) and the receiver's URL, which may hold
a token: their documents are encrypted like mailbox documents, with the event id as associated
data.

Expiry (heartbeats, leases) is decided by the Redis server's clock (TIME, key TTLs), never by
the nodes' clocks, so skew between nodes cannot make two of them own one mailbox.

Checkpoint updates are Lua scripts, so they are atomic against ``remove_mailbox`` and against each
other: a delivery that finishes after ``/close`` cannot resurrect a mailbox's checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from typing import TypeVar

import trio

from emlisten.abc import ClaimedFolder, Store
from emlisten.errors import ConfigError, StoreError
from emlisten.models import Checkpoint, MailboxConfig, MailboxState, MailboxStatus, NodeInfo, WebhookEvent
from emlisten.store._codec import (
    CodecError,
    decode_checkpoint,
    decode_mailbox,
    decode_node,
    decode_status,
    decode_webhook_event,
    encode_checkpoint,
    encode_mailbox,
    encode_node,
    encode_status,
    encode_webhook_event,
)
from emlisten.store._crypto import CredentialCipher
from emlisten.store._resp import (
    COMMAND_TIMEOUT,
    Arg,
    Client,
    RedisError,
    Reply,
    Script,
    Subscription,
    describe,
    parse_url,
)

T = TypeVar("T")

DEFAULT_PREFIX = "emlisten:"
#: Bound on how long shielded cleanup (giving a lease back) may take.
_CLEANUP_TIMEOUT = 5.0
#: Reconnect attempts (with jittered backoff up to 1 s) before an operation fails.
_RETRIES = 5
#: Ids per script call where a script unpacks its arguments.
_UNPACK_CHUNK = 2000

# KEYS[1] mailboxes hash, KEYS[2] this mailbox's checkpoints hash, KEYS[3] its floors hash;
# ARGV[1] mailbox id, ARGV[2] folder, ARGV[3] checkpoint JSON. The seeded checkpoint is also
# the folder's history floor (where live delivery starts), recorded in the same atomic step.
_SEED = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local set = redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3])
if set == 1 then redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[3]) end
return set
"""

# As _SEED, plus ARGV[4] uidvalidity, ARGV[5] last_uid. A new UIDVALIDITY (the folder was
# rebuilt, live delivery restarts at its end) moves the history floor there too. KEYS[4] status
# hash, KEYS[5] delivered hash, ARGV[6] count: add_delivered in the same call (the mail just
# accepted), moved or not; pcall, so a counter HINCRBY refuses (not an integer) cannot fail the
# checkpoint's write.
_ADVANCE = """
if tonumber(ARGV[6]) > 0 and redis.call('HEXISTS', KEYS[4], ARGV[1]) == 1 then
  redis.pcall('HINCRBY', KEYS[5], ARGV[1], ARGV[6])
end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
local current = redis.call('HGET', KEYS[2], ARGV[2])
if current then
  local cp = cjson.decode(current)
  if tonumber(cp['uidvalidity']) == tonumber(ARGV[4]) then
    if tonumber(cp['last_uid']) >= tonumber(ARGV[5]) then return 0 end
  else
    redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
  end
else
  redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[3])
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""

# KEYS[1] incarnation key; ARGV[1] a fresh id, kept only when there is none (a Redis that lost
# its data has none: the first node to ask after that names the new data set).
_INCARNATION = """
local current = redis.call('GET', KEYS[1])
if current then return current end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""

# Only forward (Store.reassert_checkpoints): set the folder's checkpoint (checkpoints hash cps)
# where it has none, advance it within the same UIDVALIDITY, leave any other alone; its history
# floor (hash floors) is set where it has none. 1 when it changed.
_FORWARD = """
local function forward(cps, floors, folder, doc)
  local current = redis.call('HGET', cps, folder)
  if current then
    local have, want = cjson.decode(current), cjson.decode(doc)
    if tonumber(have['uidvalidity']) ~= tonumber(want['uidvalidity'])
        or tonumber(have['last_uid']) >= tonumber(want['last_uid']) then
      return 0
    end
  end
  redis.call('HSET', cps, folder, doc)
  redis.call('HSETNX', floors, folder, doc)
  return 1
end
"""

# KEYS as _SEED; ARGV[1] mailbox id, ARGV[2] sealed mailbox document, then (folder, checkpoint
# JSON) pairs. Registers the mailbox if absent and moves each checkpoint forward to the one given
# (_FORWARD), in one step: a worker never sees the mailbox without them.
_RESTORE = (
    _FORWARD
    + """
local registered = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
for i = 3, #ARGV, 2 do forward(KEYS[2], KEYS[3], ARGV[i], ARGV[i + 1]) end
return registered
"""
)

# KEYS (checkpoints hash, floors hash) per folder, ARGV (folder, checkpoint JSON) per folder, in
# the same order. Each checkpoint moved forward (_FORWARD), registered mailbox or not. Returns
# how many changed.
_REASSERT = (
    _FORWARD
    + """
local changed = 0
for i = 1, #ARGV, 2 do changed = changed + forward(KEYS[i], KEYS[i + 1], ARGV[i], ARGV[i + 1]) end
return changed
"""
)

# KEYS[1] mailboxes hash, KEYS[2] the mailbox's history index, KEYS[3] the history set of
# (folder, uidvalidity); ARGV[1] mailbox id, ARGV[2..] UIDs. Nothing for an unknown mailbox, so
# a load finishing after /close cannot leave records behind.
_MARK_HISTORY = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
if #ARGV < 2 then return 1 end
redis.call('SADD', KEYS[2], KEYS[3])
for i = 2, #ARGV, 1000 do
  redis.call('SADD', KEYS[3], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return 1
"""

# KEYS[1] status hash, KEYS[2] delivered hash; ARGV[1] mailbox id, ARGV[2] count.
_ADD_DELIVERED = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# Redis server time in milliseconds (scripts may call TIME since Redis 5's effects replication).
_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] nodes hash, KEYS[2] node-expiry zset; ARGV[1] node id, ARGV[2] NodeInfo JSON, ARGV[3] ttl ms.
_HEARTBEAT = (
    _NOW_MS
    + """
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do redis.call('HDEL', KEYS[1], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 1
"""
)

# KEYS as _HEARTBEAT. The documents of nodes whose heartbeat has not expired.
_LIST_NODES = (
    _NOW_MS
    + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. string.format('%d', now), '+inf')
if #ids == 0 then return {} end
return redis.call('HMGET', KEYS[1], unpack(ids))
"""
)

# KEYS lease keys; ARGV[1] node id, ARGV[2] ttl ms. Returns the (1-based) indexes now held.
# Claims and renewals: a renewal also re-takes a lease that expired with nobody taking it (the
# node was paused past the TTL); only a lease another node holds is lost.
_CLAIM = """
local held = {}
for i, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if not holder or holder == ARGV[1] then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    held[#held + 1] = i
  end
end
return held
"""

# KEYS[1] the lease, KEYS[2] mailboxes hash, KEYS[3] the mailbox's checkpoints hash; ARGV[1]
# node id, ARGV[2] ttl ms, ARGV[3] mailbox id, ARGV[4] folder. A claim of one lease as _CLAIM and,
# when held, the mailbox document and the folder's checkpoint read after it (a worker starting a
# sync): {} when another node holds the lease, else {1, document or nil, checkpoint or nil}.
_CLAIM_AND_READ = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return {} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local document = redis.call('HGET', KEYS[2], ARGV[3])
if not document then return {1} end
return {1, document, redis.call('HGET', KEYS[3], ARGV[4])}
"""

# KEYS lease keys; ARGV[1] node id.
_RELEASE = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 1
"""

# Small multi-command operations are Lua rather than MULTI/pipelines: one round trip, atomic
# (with redis-py, one EVALSHA measured ~400 us against ~650-750 us for a two-command MULTI).

# KEYS[1] status hash, KEYS[2] delivered hash; ARGV[1] mailbox id, ARGV[2] status JSON.
# The delivered counter is left alone: only add_delivered moves it, so a status write racing
# a delivery cannot lose a count.
_SET_STATUS = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS[1] mailboxes hash, KEYS[2] status hash. How many mailboxes are registered and how many of
# them are in each state, counted in Redis: {total, state, count, state, count, ...}. The status
# documents are compact JSON (_codec._dumps), so the state is matched, not decoded (cjson would
# cost Redis about five times as much at 10,000 mailboxes); a mailbox without one is "starting".
_STATE_COUNTS = """
local ids = redis.call('HKEYS', KEYS[1])
local counts = {}
for _, id in ipairs(ids) do
  local doc = redis.call('HGET', KEYS[2], id)
  local state = doc and string.match(doc, '"state":"([^"]*)"') or 'starting'
  counts[state] = (counts[state] or 0) + 1
end
local out = {#ids}
for state, n in pairs(counts) do
  out[#out + 1] = state
  out[#out + 1] = n
end
return out
"""

# KEYS as _SET_STATUS; ARGV mailbox ids. Returns {status documents, delivered counters}.
_GET_STATUSES = """
return {redis.call('HMGET', KEYS[1], unpack(ARGV)), redis.call('HMGET', KEYS[2], unpack(ARGV))}
"""

# KEYS[1] mailboxes, KEYS[2] the mailbox's checkpoints, KEYS[3] status, KEYS[4] delivered,
# KEYS[5] its lease, KEYS[6] its history floors, KEYS[7] its history index; ARGV[1] mailbox id,
# ARGV[2] CLOSED status JSON. The delivered counter survives (HSETNX); the lease is freed.
# The history sets are named by the index, not passed as KEYS: fine on one Redis server (the
# store's keys carry no hash tags, so Redis Cluster is not supported anyway).
_REMOVE = """
local existed = redis.call('HDEL', KEYS[1], ARGV[1])
for _, key in ipairs(redis.call('SMEMBERS', KEYS[7])) do redis.call('DEL', key) end
redis.call('DEL', KEYS[2], KEYS[5], KEYS[6], KEYS[7])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('HSETNX', KEYS[4], ARGV[1], 0)
return existed
"""

# KEYS checkpoints hashes. Each one's HGETALL, in one reply: a pipeline of HGETALLs cost three
# times the CPU in redis-py (0.41 against 0.12 s for 10,000 mailboxes), and primaries read every
# checkpoint they run periodically (MailboxManager, checkpoint_refresh_seconds).
_CHECKPOINTS_OF = """
local found = {}
for i, key in ipairs(KEYS) do found[i] = redis.call('HGETALL', key) end
return found
"""

# KEYS[1] mailboxes hash; ARGV mailbox ids. One flag per id, in one command.
_EXISTING = """
local flags = {}
for i, id in ipairs(ARGV) do flags[i] = redis.call('HEXISTS', KEYS[1], id) end
return flags
"""


# Webhook outboxes. KEYS[1] endpoints set, KEYS[2] seq counter, KEYS[3] the endpoint's outbox
# zset, KEYS[4] its events hash, KEYS[5] dead letters hash; ARGV[1] endpoint, then (id, document)
# pairs. Ids already waiting or dead are skipped. Returns how many were added.
_OUTBOX_ADD = """
local added = 0
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('HEXISTS', KEYS[4], id) == 0 and redis.call('HEXISTS', KEYS[5], id) == 0 then
    redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[2]), id)
    redis.call('HSET', KEYS[4], id, ARGV[i + 1])
    added = added + 1
  end
end
if added > 0 then redis.call('SADD', KEYS[1], ARGV[1]) end
return added
"""

# KEYS[1] outbox zset, KEYS[2] events hash; ARGV[1] limit. {ids, documents}, oldest first.
_OUTBOX_PEEK = """
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #ids == 0 then return {{}, {}} end
return {ids, redis.call('HMGET', KEYS[2], unpack(ids))}
"""

# KEYS[1] events hash; ARGV[1] id, ARGV[2] document. Only while it waits.
_OUTBOX_RETRY = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS[1] endpoints set, KEYS[2] outbox zset, KEYS[3] events hash, KEYS[4] dead hash,
# KEYS[5] dead-order zset; ARGV[1] endpoint, ARGV[2] id, ARGV[3] dead document or "" (delivered),
# ARGV[4] dead_at. Removes the waiting event; with a document, files it as a dead letter.
_OUTBOX_REMOVE = """
if redis.call('HDEL', KEYS[3], ARGV[2]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[2])
if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('SREM', KEYS[1], ARGV[1]) end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
  redis.call('ZADD', KEYS[5], ARGV[4], ARGV[2])
end
return 1
"""

# KEYS[1] dead hash, KEYS[2] dead-order zset; ARGV[1] offset, ARGV[2] limit.
# Returns {count, ids, documents}.
_DEAD_PAGE = """
local count = redis.call('ZCARD', KEYS[2])
local ids = redis.call('ZRANGE', KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[1]) + tonumber(ARGV[2]) - 1)
if #ids == 0 then return {count, {}, {}} end
return {count, ids, redis.call('HMGET', KEYS[1], unpack(ids))}
"""

# KEYS[1] dead hash, KEYS[2] dead-order zset. ARGV[1] id.
_DEAD_DROP = """
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('HDEL', KEYS[1], ARGV[1])
"""

# KEYS as _OUTBOX_ADD plus KEYS[6] dead-order zset; ARGV[1] endpoint, ARGV[2] id, ARGV[3] the
# queued document. Moves the dead letter back to the end of the outbox (unless it waits there).
_DEAD_REPLAY = """
if redis.call('HDEL', KEYS[5], ARGV[2]) == 0 then return 0 end
redis.call('ZREM', KEYS[6], ARGV[2])
if redis.call('HEXISTS', KEYS[4], ARGV[2]) == 0 then
  redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[2]), ARGV[2])
  redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
  redis.call('SADD', KEYS[1], ARGV[1])
end
return 1
"""


def _ttl_ms(ttl: float) -> int:
    return max(1, math.ceil(ttl * 1000))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _checkpoint_of(mailbox_id: str, document: bytes | str, what: str = "checkpoint") -> Checkpoint:
    """A stored checkpoint (or history floor) document; StoreError when it cannot be read."""
    try:
        return decode_checkpoint(document)
    except CodecError as exc:
        raise StoreError(f"stored {what} of {mailbox_id!r} is unreadable: {exc}") from None


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _unexpected(reply: Reply) -> StoreError:
    return StoreError(f"redis: unexpected reply of type {type(reply).__name__}")


def _bulk(reply: Reply) -> bytes | None:
    """A bulk string reply (or nil)."""
    if reply is None or isinstance(reply, bytes):
        return reply
    raise _unexpected(reply)


def _array(reply: Reply) -> list[Reply]:
    if isinstance(reply, list):
        return reply
    raise _unexpected(reply)


def _bulks(reply: Reply) -> list[bytes | None]:
    """An array of bulk strings (or nils)."""
    items = _array(reply)
    for item in items:
        if item is not None and not isinstance(item, bytes):
            raise _unexpected(item)
    return items  # type: ignore[return-value]  # checked just above


def _integer(reply: Reply) -> int:
    if isinstance(reply, int):
        return reply
    if isinstance(reply, bytes):  # a Lua number that went through a string
        return int(reply)
    raise _unexpected(reply)


class _Changes:
    """The iterator ``changes()`` yields. A class, so a cancelled ``anext`` leaves it usable."""

    def __init__(self, receive: trio.MemoryReceiveChannel[str]) -> None:
        self._receive = receive
        self.error: StoreError | None = None

    def __aiter__(self) -> _Changes:
        return self

    async def __anext__(self) -> str:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self.error is not None:
                raise self.error from None
            raise StopAsyncIteration from None


class RedisStore(Store):
    name = "redis"
    remote = True
    shared = True

    def __init__(self, client: Client, *, cipher: CredentialCipher, prefix: str = DEFAULT_PREFIX) -> None:
        """Use :meth:`open`; this takes an already created client."""

        self._client = client
        self._cipher = cipher
        self.prefix = prefix
        self._mailboxes_key = f"{prefix}mailboxes"
        self._status_key = f"{prefix}status"
        self._delivered_key = f"{prefix}delivered"
        self._channel = f"{prefix}changes"
        self._nodes_key = f"{prefix}nodes"
        self._node_expiry_key = f"{prefix}node-expiry"
        self._incarnation_key = f"{prefix}incarnation"
        self._seed = client.register_script(_SEED)
        self._incarnation = client.register_script(_INCARNATION)
        self._restore = client.register_script(_RESTORE)
        self._reassert = client.register_script(_REASSERT)
        self._advance = client.register_script(_ADVANCE)
        self._mark_history = client.register_script(_MARK_HISTORY)
        self._add_delivered = client.register_script(_ADD_DELIVERED)
        self._existing = client.register_script(_EXISTING)
        self._checkpoints_of = client.register_script(_CHECKPOINTS_OF)
        self._set_status = client.register_script(_SET_STATUS)
        self._state_counts = client.register_script(_STATE_COUNTS)
        self._get_statuses = client.register_script(_GET_STATUSES)
        self._remove = client.register_script(_REMOVE)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._list_nodes = client.register_script(_LIST_NODES)
        self._claim = client.register_script(_CLAIM)
        self._claim_and_read = client.register_script(_CLAIM_AND_READ)
        self._release = client.register_script(_RELEASE)
        self._wh_endpoints_key = f"{prefix}wh:endpoints"
        self._wh_seq_key = f"{prefix}wh:seq"
        self._wh_dead_key = f"{prefix}wh:dead"
        self._wh_dead_order_key = f"{prefix}wh:dead-order"
        self._outbox_add = client.register_script(_OUTBOX_ADD)
        self._outbox_peek = client.register_script(_OUTBOX_PEEK)
        self._outbox_retry = client.register_script(_OUTBOX_RETRY)
        self._outbox_remove = client.register_script(_OUTBOX_REMOVE)
        self._dead_page = client.register_script(_DEAD_PAGE)
        self._dead_drop = client.register_script(_DEAD_DROP)
        self._dead_replay = client.register_script(_DEAD_REPLAY)

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.prefix!r})"

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        url: str,
        *,
        secret_key: str,
        prefix: str = DEFAULT_PREFIX,
        max_connections: int = 32,
        client_name: str = "emlisten",
        command_timeout: float = COMMAND_TIMEOUT,
    ) -> AsyncIterator[RedisStore]:
        """Connect (``redis://[[user]:password@]host:port/db`` or ``rediss://``) and check with PING.

        Pure Trio (no asyncio bridge needed; it works inside one too). Raises ``ConfigError`` for
        an empty ``secret_key`` or a malformed URL, ``StoreError`` when Redis is unreachable or
        refuses the credentials. ``rediss://`` verifies the server's certificate against the
        system's CAs; the URL options ``ssl_ca_certs`` (a CA file) and ``ssl_cert_reqs`` (none,
        optional, required) change that. ``max_connections`` bounds the pool; callers beyond it
        wait for a free connection up to 20 s (each open ``changes()`` subscription holds one).
        ``client_name`` is set on every connection (CLIENT SETNAME), so operators can tell
        emlisten's connections apart.

        A dropped connection is re-established (5 more attempts, jittered backoff capped at
        1 s) before an operation fails with ``StoreError``; the ``changes()`` subscription
        reconnects and resubscribes the same way (notifications published while it was
        disconnected are lost, so the ownership loop must not rely on them alone).

        ``command_timeout`` bounds how long Redis may stay silent during an operation (one that
        accepts connections but never answers, stopped or behind a path that drops packets; a
        big reply that keeps arriving is waited for): past it the operation fails with
        ``StoreError`` and is not retried (it may have run). The node passes its
        lease TTL: an answer later than that cannot keep a lease anyway.
        """

        cipher = CredentialCipher(secret_key)
        try:
            address = parse_url(url)
        except (ValueError, OSError) as exc:  # OSError: an unreadable ssl_ca_certs
            raise ConfigError(f"bad Redis URL: {exc}") from None
        client = Client(
            address,
            max_connections=max_connections,
            client_name=client_name,
            pool_timeout=20,
            connect_timeout=5,
            command_timeout=command_timeout,
            # A retry after a lost reply runs an operation twice: the same state, but the
            # delivered counter counts twice (cosmetic) and some report "nothing done" the
            # second time (docs/architecture.md, "Redis is not on the bridge").
            retries=_RETRIES,
        )
        store = cls(client, cipher=cipher, prefix=prefix)
        try:
            await store.ping()
            yield store
        finally:
            await store.aclose()

    async def _run(self, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            return await operation()
        except RedisError as exc:
            raise StoreError(f"redis: {describe(exc)}") from exc

    async def _call(self, *args: Arg) -> Reply:
        return await self._run(lambda: self._client.execute(*args))

    async def _eval(self, script: Script, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Reply:
        return await self._run(lambda: script(keys, args))

    def _checkpoints_key(self, mailbox_id: str) -> str:
        return f"{self.prefix}checkpoints:{mailbox_id}"

    def _lease_key(self, mailbox_id: str) -> str:
        return f"{self.prefix}lease:{mailbox_id}"

    def _floors_key(self, mailbox_id: str) -> str:
        return f"{self.prefix}floors:{mailbox_id}"

    def _history_index_key(self, mailbox_id: str) -> str:
        return f"{self.prefix}history-index:{mailbox_id}"

    def _history_key(self, mailbox_id: str, folder: str, uidvalidity: int) -> str:
        return f"{self.prefix}history:{mailbox_id}:{uidvalidity}:{folder}"

    async def ping(self) -> None:
        await self._call("PING")

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- registry --------------------------------------------------------------------------------

    def _seal(self, mailbox: MailboxConfig) -> bytes:
        return self._cipher.encrypt(encode_mailbox(mailbox), associated_data=mailbox.id.encode())

    def _open(self, mailbox_id: str, blob: bytes) -> MailboxConfig:
        plaintext = self._cipher.decrypt(blob, associated_data=mailbox_id.encode())
        try:
            return decode_mailbox(plaintext)
        except CodecError as exc:
            raise StoreError(f"stored mailbox {mailbox_id!r} is unreadable: {exc}") from None

    async def put_mailbox(self, mailbox: MailboxConfig) -> None:
        await self._call("HSET", self._mailboxes_key, mailbox.id, self._seal(mailbox))

    async def get_mailbox(self, mailbox_id: str) -> MailboxConfig | None:
        blob = _bulk(await self._call("HGET", self._mailboxes_key, mailbox_id))
        return None if blob is None else self._open(mailbox_id, blob)

    async def put_mailboxes(self, mailboxes: Sequence[MailboxConfig]) -> None:
        if mailboxes:
            pairs: list[Arg] = []
            for mailbox in {mailbox.id: mailbox for mailbox in mailboxes}.values():
                pairs += [mailbox.id, self._seal(mailbox)]
            await self._call("HSET", self._mailboxes_key, *pairs)

    async def set_statuses(self, statuses: Mapping[str, MailboxStatus]) -> None:
        if statuses:
            pairs: list[Arg] = []
            for mailbox_id, status in statuses.items():
                pairs += [mailbox_id, encode_status(status)]
            await self._call("HSET", self._status_key, *pairs)

    async def get_mailboxes(self, mailbox_ids: Sequence[str]) -> dict[str, MailboxConfig]:
        ids = list(mailbox_ids)
        if not ids:
            return {}
        blobs = _bulks(await self._call("HMGET", self._mailboxes_key, *ids))
        return {mid: self._open(mid, blob) for mid, blob in zip(ids, blobs, strict=True) if blob is not None}

    async def remove_mailbox(self, mailbox_id: str) -> bool:
        keys = [
            self._mailboxes_key,
            self._checkpoints_key(mailbox_id),
            self._status_key,
            self._delivered_key,
            self._lease_key(mailbox_id),
            self._floors_key(mailbox_id),
            self._history_index_key(mailbox_id),
        ]
        args: list[Arg] = [mailbox_id, encode_status(MailboxStatus(MailboxState.CLOSED))]
        return bool(_integer(await self._eval(self._remove, keys, args)))

    async def list_mailbox_ids(self) -> list[str]:
        return [_text(i) for i in _bulks(await self._call("HKEYS", self._mailboxes_key)) if i is not None]

    async def existing(self, mailbox_ids: Iterable[str]) -> set[str]:
        ids = list(dict.fromkeys(mailbox_ids))
        if not ids:
            return set()
        flags = _array(await self._eval(self._existing, [self._mailboxes_key], ids))
        return {mid for mid, flag in zip(ids, flags, strict=True) if flag}

    # -- statuses --------------------------------------------------------------------------------

    async def set_status(self, mailbox_id: str, status: MailboxStatus) -> None:
        keys = [self._status_key, self._delivered_key]
        await self._eval(self._set_status, keys, [mailbox_id, encode_status(status)])

    async def state_counts(self) -> tuple[int, dict[str, int]]:
        keys = [self._mailboxes_key, self._status_key]
        reply = _array(await self._eval(self._state_counts, keys))
        counts = {
            _text(state) if isinstance(state, bytes) else str(state): _integer(count)
            for state, count in zip(reply[1::2], reply[2::2], strict=True)
        }
        return _integer(reply[0]), counts

    async def get_statuses(self, mailbox_ids: Iterable[str]) -> dict[str, MailboxStatus | None]:
        ids = list(mailbox_ids)
        if not ids:
            return {}

        keys = [self._status_key, self._delivered_key]
        # Lua's unpack() has a stack limit of a few thousand values: chunk big requests.
        documents: list[bytes | None] = []
        counters: list[bytes | None] = []
        for start in range(0, len(ids), _UNPACK_CHUNK):
            chunk = ids[start : start + _UNPACK_CHUNK]
            chunk_documents, chunk_counters = _array(await self._eval(self._get_statuses, keys, chunk))
            documents += _bulks(chunk_documents)
            counters += _bulks(chunk_counters)
        statuses: dict[str, MailboxStatus | None] = {}
        for mailbox_id, document, counter in zip(ids, documents, counters, strict=True):
            if document is None:
                statuses[mailbox_id] = None
                continue
            try:
                status = decode_status(document)
            except CodecError as exc:
                raise StoreError(f"stored status of {mailbox_id!r} is unreadable: {exc}") from None
            status.delivered = int(counter) if counter is not None else 0
            statuses[mailbox_id] = status
        return statuses

    async def add_delivered(self, mailbox_id: str, count: int) -> None:
        keys = [self._status_key, self._delivered_key]
        await self._eval(self._add_delivered, keys, [mailbox_id, count])

    # -- checkpoints -----------------------------------------------------------------------------

    async def get_checkpoint(self, mailbox_id: str, folder: str) -> Checkpoint | None:
        document = _bulk(await self._call("HGET", self._checkpoints_key(mailbox_id), folder))
        return None if document is None else _checkpoint_of(mailbox_id, document)

    async def seed_checkpoint(self, mailbox_id: str, folder: str, checkpoint: Checkpoint) -> bool:
        keys = [self._mailboxes_key, self._checkpoints_key(mailbox_id), self._floors_key(mailbox_id)]
        args: list[Arg] = [mailbox_id, folder, encode_checkpoint(checkpoint)]
        return bool(_integer(await self._eval(self._seed, keys, args)))

    async def advance_checkpoint(
        self, mailbox_id: str, folder: str, checkpoint: Checkpoint, *, delivered: int = 0
    ) -> bool:
        keys = [
            self._mailboxes_key,
            self._checkpoints_key(mailbox_id),
            self._floors_key(mailbox_id),
            self._status_key,
            self._delivered_key,
        ]
        args: list[Arg] = [
            mailbox_id,
            folder,
            encode_checkpoint(checkpoint),
            checkpoint.uidvalidity,
            checkpoint.last_uid,
            max(0, delivered),
        ]
        return bool(_integer(await self._eval(self._advance, keys, args)))

    # -- the data set's identity ------------------------------------------------------------------

    async def incarnation(self) -> str:
        fresh = str(uuid.uuid4())
        found = _bulk(await self._eval(self._incarnation, [self._incarnation_key], [fresh]))
        if found is None:
            raise _unexpected(found)
        return _text(found)

    async def restore_mailboxes(
        self, mailboxes: Sequence[MailboxConfig], checkpoints: Mapping[str, Mapping[str, Checkpoint]]
    ) -> list[str]:
        calls = []
        for mailbox in mailboxes:
            keys = [self._mailboxes_key, self._checkpoints_key(mailbox.id), self._floors_key(mailbox.id)]
            args: list[Arg] = [mailbox.id, self._seal(mailbox)]
            for folder, checkpoint in checkpoints.get(mailbox.id, {}).items():
                args += [folder, encode_checkpoint(checkpoint)]
            calls.append((mailbox.id, keys, args))

        # One script per mailbox (atomic each), sent in pipelines.
        restored: list[str] = []
        for start in range(0, len(calls), _UNPACK_CHUNK):
            chunk = calls[start : start + _UNPACK_CHUNK]
            pipe = self._client.pipeline(transaction=False)
            for _, keys, args in chunk:
                pipe.script(self._restore, keys, args)
            flags = await self._run(pipe.execute)
            restored += [
                mailbox_id for (mailbox_id, _, _), flag in zip(chunk, flags, strict=True) if _integer(flag)
            ]
        return restored

    async def reassert_checkpoints(self, checkpoints: Mapping[str, Mapping[str, Checkpoint]]) -> int:
        keys: list[Arg] = []
        args: list[Arg] = []
        for mailbox_id, folders in checkpoints.items():
            for folder, checkpoint in folders.items():
                keys += [self._checkpoints_key(mailbox_id), self._floors_key(mailbox_id)]
                args += [folder, encode_checkpoint(checkpoint)]

        # Chunked like get_checkpoints_of (a worker may remember 100,000 folders); atomic per
        # script call, which is more than per folder.
        changed = 0
        step = 2 * _UNPACK_CHUNK
        for start in range(0, len(keys), step):
            changed += _integer(
                await self._eval(self._reassert, keys[start : start + step], args[start : start + step])
            )
        return changed

    async def get_checkpoints(self, mailbox_id: str) -> dict[str, Checkpoint]:
        row = _bulks(await self._call("HGETALL", self._checkpoints_key(mailbox_id)))
        return self._checkpoint_row(mailbox_id, row)

    @staticmethod
    def _checkpoint_row(mailbox_id: str, row: list[bytes | None]) -> dict[str, Checkpoint]:
        # HGETALL's flat reply: folder, document, folder, document, ...
        try:
            return {
                _text(folder): decode_checkpoint(document)
                for folder, document in zip(row[::2], row[1::2], strict=True)
                if folder is not None and document is not None
            }
        except CodecError as exc:
            raise StoreError(f"stored checkpoint of {mailbox_id!r} is unreadable: {exc}") from None

    async def get_checkpoints_of(self, mailbox_ids: Sequence[str]) -> dict[str, dict[str, Checkpoint]]:
        ids = list(mailbox_ids)
        rows: list[Reply] = []
        for start in range(0, len(ids), _UNPACK_CHUNK):
            keys = [self._checkpoints_key(mailbox_id) for mailbox_id in ids[start : start + _UNPACK_CHUNK]]
            rows += _array(await self._eval(self._checkpoints_of, keys))
        return {
            mailbox_id: self._checkpoint_row(mailbox_id, _bulks(row))
            for mailbox_id, row in zip(ids, rows, strict=True)
        }

    # -- history loads ---------------------------------------------------------------------------

    async def get_history_floor(self, mailbox_id: str, folder: str) -> Checkpoint | None:
        document = _bulk(await self._call("HGET", self._floors_key(mailbox_id), folder))
        return None if document is None else _checkpoint_of(mailbox_id, document, "history floor")

    async def mark_history_delivered(
        self, mailbox_id: str, folder: str, uidvalidity: int, uids: Iterable[int]
    ) -> None:
        members = sorted(set(uids))
        if not members:
            return
        keys = [
            self._mailboxes_key,
            self._history_index_key(mailbox_id),
            self._history_key(mailbox_id, folder, uidvalidity),
        ]
        await self._eval(self._mark_history, keys, [mailbox_id, *members])

    async def history_delivered(self, mailbox_id: str, folder: str, uidvalidity: int) -> set[int]:
        members = _bulks(await self._call("SMEMBERS", self._history_key(mailbox_id, folder, uidvalidity)))
        return {int(member) for member in members if member is not None}

    # -- webhook outboxes and dead letters -------------------------------------------------------

    def _outbox_key(self, endpoint: str) -> str:
        return f"{self.prefix}wh:outbox:{endpoint}"

    def _events_key(self, endpoint: str) -> str:
        return f"{self.prefix}wh:events:{endpoint}"

    def _seal_event(self, event: WebhookEvent) -> bytes:
        return self._cipher.encrypt(encode_webhook_event(event), associated_data=event.id.encode())

    def _open_event(self, event_id: str, blob: bytes | str) -> WebhookEvent:
        plaintext = self._cipher.decrypt(_bytes(blob), associated_data=event_id.encode())
        try:
            return decode_webhook_event(plaintext)
        except CodecError as exc:
            raise StoreError(f"stored webhook event {event_id!r} is unreadable: {exc}") from None

    def _open_events(self, ids: Reply, blobs: Reply) -> list[WebhookEvent]:
        return [
            self._open_event(_text(event_id), blob)
            for event_id, blob in zip(_bulks(ids), _bulks(blobs), strict=True)
            if event_id is not None and blob is not None
        ]

    async def outbox_add(self, events: Sequence[WebhookEvent]) -> int:
        by_endpoint: dict[str, list[WebhookEvent]] = {}
        for event in events:
            by_endpoint.setdefault(event.endpoint, []).append(event)
        added = 0
        for endpoint, group in by_endpoint.items():
            keys = [
                self._wh_endpoints_key,
                self._wh_seq_key,
                self._outbox_key(endpoint),
                self._events_key(endpoint),
                self._wh_dead_key,
            ]
            args: list[Arg] = [endpoint]
            for event in group:
                args += [event.id, self._seal_event(event)]
            added += _integer(await self._eval(self._outbox_add, keys, args))
        return added

    async def outbox_endpoints(self) -> list[str]:
        members = _bulks(await self._call("SMEMBERS", self._wh_endpoints_key))
        return sorted(_text(member) for member in members if member is not None)

    async def outbox_peek(self, endpoint: str, limit: int) -> list[WebhookEvent]:
        if limit <= 0:
            return []
        keys = [self._outbox_key(endpoint), self._events_key(endpoint)]
        ids, blobs = _array(await self._eval(self._outbox_peek, keys, [limit]))
        return self._open_events(ids, blobs)

    async def outbox_count(self, endpoint: str) -> int:
        return _integer(await self._call("ZCARD", self._outbox_key(endpoint)))

    async def outbox_retry(self, event: WebhookEvent) -> bool:
        keys = [self._events_key(event.endpoint)]
        args: list[Arg] = [event.id, self._seal_event(event)]
        return bool(_integer(await self._eval(self._outbox_retry, keys, args)))

    def _remove_keys(self, endpoint: str) -> list[Arg]:
        return [
            self._wh_endpoints_key,
            self._outbox_key(endpoint),
            self._events_key(endpoint),
            self._wh_dead_key,
            self._wh_dead_order_key,
        ]

    async def outbox_done(self, endpoint: str, event_id: str) -> bool:
        args: list[Arg] = [endpoint, event_id, "", 0]
        return bool(_integer(await self._eval(self._outbox_remove, self._remove_keys(endpoint), args)))

    async def outbox_dead_letter(self, event: WebhookEvent) -> bool:
        keys = self._remove_keys(event.endpoint)
        args: list[Arg] = [event.endpoint, event.id, self._seal_event(event), event.dead_at]
        return bool(_integer(await self._eval(self._outbox_remove, keys, args)))

    async def list_dead_letters(self, *, offset: int = 0, limit: int = 100) -> tuple[int, list[WebhookEvent]]:
        if limit <= 0:
            return _integer(await self._call("ZCARD", self._wh_dead_order_key)), []
        keys = [self._wh_dead_key, self._wh_dead_order_key]
        count, ids, blobs = _array(await self._eval(self._dead_page, keys, [max(0, offset), limit]))
        return _integer(count), self._open_events(ids, blobs)

    async def get_dead_letter(self, event_id: str) -> WebhookEvent | None:
        blob = _bulk(await self._call("HGET", self._wh_dead_key, event_id))
        return None if blob is None else self._open_event(event_id, blob)

    async def drop_dead_letter(self, event_id: str) -> bool:
        keys = [self._wh_dead_key, self._wh_dead_order_key]
        return bool(_integer(await self._eval(self._dead_drop, keys, [event_id])))

    async def replay_dead_letter(self, event_id: str) -> WebhookEvent | None:
        event = await self.get_dead_letter(event_id)
        if event is None:
            return None
        queued = dataclasses.replace(event, attempts=0, next_attempt_at=0.0, dead_at=0.0)
        keys = [
            self._wh_endpoints_key,
            self._wh_seq_key,
            self._outbox_key(event.endpoint),
            self._events_key(event.endpoint),
            self._wh_dead_key,
            self._wh_dead_order_key,
        ]
        args: list[Arg] = [event.endpoint, event_id, self._seal_event(queued)]
        replayed = _integer(await self._eval(self._dead_replay, keys, args))
        return queued if replayed else None

    # -- nodes and leases ------------------------------------------------------------------------

    async def heartbeat(self, node: NodeInfo, ttl: float) -> None:
        keys = [self._nodes_key, self._node_expiry_key]
        await self._eval(self._heartbeat, keys, [node.id, encode_node(node), _ttl_ms(ttl)])

    async def list_nodes(self) -> list[NodeInfo]:
        keys = [self._nodes_key, self._node_expiry_key]
        documents = _bulks(await self._eval(self._list_nodes, keys))
        nodes = []
        for document in documents:
            if document is None:
                continue  # removed between the two reads of the script: cannot happen, but harmless
            try:
                nodes.append(decode_node(document))
            except CodecError as exc:
                raise StoreError(f"stored node is unreadable: {exc}") from None
        return nodes

    async def remove_node(self, node_id: str) -> None:
        pipe = self._client.pipeline(transaction=True)  # rare (shutdown): a MULTI is fine
        pipe.command("HDEL", self._nodes_key, node_id)
        pipe.command("ZREM", self._node_expiry_key, node_id)
        await self._run(pipe.execute)

    async def _leases_held(
        self, script: Script, node_id: str, mailbox_ids: Sequence[str], ttl: float
    ) -> list[str]:
        ids = list(mailbox_ids)
        if not ids:
            return []
        keys = [self._lease_key(mid) for mid in ids]
        indexes = _array(await self._eval(script, keys, [node_id, _ttl_ms(ttl)]))
        return [ids[_integer(index) - 1] for index in indexes]

    async def claim_leases(self, node_id: str, mailbox_ids: Sequence[str], ttl: float) -> list[str]:
        return await self._leases_held(self._claim, node_id, mailbox_ids, ttl)

    async def renew_leases(self, node_id: str, mailbox_ids: Sequence[str], ttl: float) -> list[str]:
        return await self._leases_held(self._claim, node_id, mailbox_ids, ttl)

    async def claim_lease_and_read_folder(
        self, node_id: str, lease: str, mailbox_id: str, folder: str, ttl: float
    ) -> ClaimedFolder | None:
        keys = [self._lease_key(lease), self._mailboxes_key, self._checkpoints_key(mailbox_id)]
        args: list[Arg] = [node_id, _ttl_ms(ttl), mailbox_id, folder]
        reply = _array(await self._eval(self._claim_and_read, keys, args))
        if not reply:
            return None
        try:
            blob = reply[1] if len(reply) > 1 else None
            if not isinstance(blob, bytes):
                return ClaimedFolder(None, None)
            mailbox = self._open(mailbox_id, blob)
            document = reply[2] if len(reply) > 2 else None
            if not isinstance(document, bytes):
                return ClaimedFolder(mailbox, None)
            return ClaimedFolder(mailbox, _checkpoint_of(mailbox_id, document))
        except StoreError:
            # Unreadable (a wrong key, a damaged document): the caller never learns it holds the
            # lease, so it is given back here, as a worker's finally did after a failed read.
            with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT), suppress(StoreError):
                await self.release_leases(node_id, [lease])
            raise

    async def release_leases(self, node_id: str, mailbox_ids: Sequence[str]) -> None:
        keys = [self._lease_key(mid) for mid in mailbox_ids]
        if keys:
            await self._eval(self._release, keys, [node_id])

    async def lease_owners(self, mailbox_ids: Sequence[str]) -> dict[str, str | None]:
        ids = list(mailbox_ids)
        if not ids:
            return {}
        holders = _bulks(await self._call("MGET", *[self._lease_key(mid) for mid in ids]))
        return {
            mid: None if holder is None else _text(holder) for mid, holder in zip(ids, holders, strict=True)
        }

    # -- change notifications --------------------------------------------------------------------

    async def publish_change(self, mailbox_id: str) -> None:
        await self._call("PUBLISH", self._channel, mailbox_id)

    @asynccontextmanager
    async def changes(self) -> AsyncIterator[AsyncIterator[str]]:
        # Unbounded, as in MemoryStore: the reader must never wait for the consumer (it would
        # stop reading the socket, and Redis drops a subscriber whose output buffer overflows).
        send, receive = trio.open_memory_channel[str](math.inf)
        iterator = _Changes(receive)

        async def pump(subscription: Subscription) -> None:
            try:
                while True:
                    payload = await subscription.next_message()
                    send.send_nowait(payload.decode(errors="replace"))
            except RedisError as exc:
                iterator.error = StoreError(f"redis: change subscription lost: {describe(exc)}")
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # the subscriber left (changes() is exiting)
            finally:
                send.close()

        try:
            subscription = await self._run(lambda: self._client.subscribe(self._channel))
            raised: BaseException | None = None
            try:
                # The reader lives in a nursery of this context's own, exactly as long as the
                # subscription; pump() raises nothing, so it never cancels the caller's body.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pump, subscription)
                    try:
                        yield iterator
                    except BaseException as exc:
                        # Raised again outside the nursery, which would wrap it in an
                        # ExceptionGroup: callers catch the StoreError of a lost feed as such.
                        raised = exc
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                subscription.close()
            if raised is not None:
                raise raised
        finally:
            send.close()
            receive.close()
