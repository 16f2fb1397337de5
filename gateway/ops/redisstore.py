"""The shared state on Redis: the Message-ID ledger and the rate budgets of a fleet of hosts and workers.

One `RedisState` per process holds redis-py's asyncio client (its own connection pool) for the [state]
URL: redis://, rediss:// (TLS) or unix://. Connect and command timeouts are short, and redis-py's own
retries are off: a store that does not answer within them is an outage (StoreUnavailable), which the
callers turn into 451 (the ledger) or a local budget (guard.py's checks), never a long stall of the SMTP
session. A connection that failed is dropped by redis-py and a new one is made on the next call, so the
store comes back by itself when the server does: no restart, no new client.

Every key has a TTL, so Redis never holds more than the last `[ledger] days` of records and the budgets
of clients seen in the last minutes. The layout, under `key_prefix` (default "batv:"):

    batv:ledger:<hex of the 32-octet HMAC>           hash a (packed address keys), e (expires), r (replies)
    batv:guess-budget:{198.51.100.0/24}:ip:198.51.100.7    GCRA TAT of one client
    batv:guess-budget:{198.51.100.0/24}:net:198.51.100.0/24    GCRA TAT of its /24 (or IPv6 /48)
    batv:null-sender-rate:{198.51.100.0/24}:net:198.51.100.0/24

Each script touches one ledger key, or the buckets of one network, which share the network as their hash
tag ({...}): Redis Cluster keeps keys with the same tag in one slot, so each script runs on one node.

Why Lua scripts and not MULTI: `record` must read the entry to merge it (the addresses' union, at most
MAX_RECORD_ADDRESSES of them, the later expiry, the count kept), and a charge must read every bucket
before it knows whether to write any. MULTI cannot branch on what it read; WATCH would add a round trip
and a retry loop under contention, which is exactly when a budget is charged most. A script is one round
trip and atomic. The addresses are one packed field (16-octet keys, sorted, as in the SQLite store)
rather than a set: one key per entry, and about half the memory of a set of 16-octet members.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..policy.guard import NO_PENALTY, Penalty
from ..policy.guessbudget import BudgetRule, RateBudget, client_block
from ..policy.ledger import (
    ADDRESS_KEY_SIZE,
    MAX_RECORD_ADDRESSES,
    LedgerEntry,
    LedgerRecord,
    LedgerStore,
    StoreUnavailable,
    pack_address_keys,
    unpack_address_keys,
)
from .state import redact

T = TypeVar("T")
log = logging.getLogger("gateway.state")

CONNECT_TIMEOUT = 0.5  # seconds; [state] connect_timeout
COMMAND_TIMEOUT = 0.5  # seconds; [state] command_timeout
KEY_PREFIX = "batv:"
MAX_LOOKUP = 64  # keys per lookup, as the SQLite store (the inbound scan yields at most 32)


class RedisState:
    """The client every Redis-backed store of a process shares. `where` is the URL without its secrets."""

    def __init__(
        self,
        url: str,
        key_prefix: str = KEY_PREFIX,
        connect_timeout: float = CONNECT_TIMEOUT,
        command_timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        self.url = url
        self.where = redact(url, url)
        self.key_prefix = key_prefix
        self.client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=command_timeout,
            # No retry of our own either: the caller decides (451, or the local budget) at once.
            retry=Retry(NoBackoff(), 0),
        )
        # A stalled TLS handshake or a half-open connection is bounded too.
        self._deadline = connect_timeout + command_timeout
        self._closed = False

    async def call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one operation; any Redis or socket failure, or the deadline, is StoreUnavailable."""
        if self._closed:
            raise StoreUnavailable(f"state store {self.where} is closed")
        try:
            async with asyncio.timeout(self._deadline):
                return await operation()
        except (RedisError, OSError, TimeoutError) as error:
            what = redact(str(error), self.url) or type(error).__name__
            raise StoreUnavailable(f"state store {self.where}: {what}") from None

    async def ping(self) -> bool:
        """Whether the store answers now (a readiness detail)."""
        try:
            return bool(await self.call(self.client.ping))
        except StoreUnavailable:
            return False

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.client.aclose()


# KEYS[1]: the entry. ARGV: packed addresses (sorted), expires, ttl, now, MAX_RECORD_ADDRESSES, key size.
# The same merge as LedgerRecord.merge; the sort compares octets (Lua's own `<` on strings follows the
# server's locale).
_RECORD = """
local key, addresses, expires, replies = KEYS[1], ARGV[1], ARGV[2], '0'
local old = redis.call('HMGET', key, 'a', 'e', 'r')
if old[2] and tonumber(old[2]) > tonumber(ARGV[4]) then
  local size, seen, list = tonumber(ARGV[6]), {}, {}
  local joined = old[1] .. addresses
  for i = 1, #joined - size + 1, size do
    local one = string.sub(joined, i, i + size - 1)
    if not seen[one] then seen[one] = true; list[#list + 1] = one end
  end
  table.sort(list, function(x, y)
    for i = 1, size do
      local a, b = string.byte(x, i), string.byte(y, i)
      if a ~= b then return a < b end
    end
    return false
  end)
  addresses = table.concat(list, '', 1, math.min(#list, tonumber(ARGV[5])))
  if tonumber(old[2]) > tonumber(expires) then expires = old[2] end
  replies = old[3] or '0'
end
redis.call('HSET', key, 'a', addresses, 'e', expires, 'r', replies)
local ttl = tonumber(ARGV[3])
if redis.call('TTL', key) < ttl then redis.call('EXPIRE', key, ttl) end
return 1
"""

# KEYS[1]: the entry. ARGV[1]: now. An entry past its expiry counts as gone, as in the SQLite store.
_TAKE_REPLY = """
local expires = redis.call('HGET', KEYS[1], 'e')
if not expires or tonumber(expires) <= tonumber(ARGV[1]) then return 0 end
return redis.call('HINCRBY', KEYS[1], 'r', 1)
"""

# KEYS: the buckets. ARGV: now, max_delay, then interval and tolerance of each bucket. guessbudget.schedule
# in Lua: returns {disconnect, delay} (the delay as a string: Lua numbers come back as integers).
_CHARGE = """
local now, max_delay = tonumber(ARGV[1]), tonumber(ARGV[2])
local starts, delay = {}, 0
for i, key in ipairs(KEYS) do
  local tat, start = tonumber(redis.call('GET', key)), now
  if tat and tat > now then start = tat end
  starts[i] = start
  local wait = start - tonumber(ARGV[2 + 2 * i]) - now
  if wait > delay then delay = wait end
end
if delay > max_delay then return {1, '0'} end
for i, key in ipairs(KEYS) do
  local tat = starts[i] + tonumber(ARGV[1 + 2 * i])
  redis.call('SET', key, string.format('%.17g', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
end
return {0, string.format('%.17g', delay)}
"""


class RedisLedgerStore:
    """`LedgerStore` on Redis: a hash per Message-ID key, with the record's TTL. `clock` is wall time."""

    def __init__(self, state: RedisState, clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.clock = clock
        self._record = state.client.register_script(_RECORD)
        self._take_reply = state.client.register_script(_TAKE_REPLY)

    def key(self, key: bytes) -> str:
        return f"{self.state.key_prefix}ledger:{key.hex()}"

    def _record_args(self, record: LedgerRecord, ttl: int, now: int) -> list[bytes | int]:
        addresses = pack_address_keys(record.addresses)
        return [addresses, record.expires, max(1, ttl), now, MAX_RECORD_ADDRESSES, ADDRESS_KEY_SIZE]

    async def record(self, key: bytes, record: LedgerRecord, ttl: int) -> None:
        args = self._record_args(record, ttl, int(self.clock()))
        await self.state.call(lambda: self._record(keys=[self.key(key)], args=args))

    async def record_group(self, items: Sequence[tuple[bytes, LedgerRecord, int]]) -> None:
        if not items:
            return
        now = int(self.clock())

        async def write() -> None:
            # One round trip for the group; not a transaction (in a Cluster the keys are on many nodes).
            pipe = self.state.client.pipeline(transaction=False)
            for key, record, ttl in items:
                # With a pipeline the script call only queues (EVALSHA, loaded at execute if missing).
                args = self._record_args(record, ttl, now)
                await self._record(keys=[self.key(key)], args=args, client=pipe)
            await pipe.execute()

        await self.state.call(write)

    async def lookup(self, keys: Sequence[bytes]) -> Mapping[bytes, LedgerEntry]:
        wanted = tuple(keys[:MAX_LOOKUP])
        if not wanted:
            return {}

        async def fetch() -> list[Any]:
            # Not a transaction: each HMGET is on its own key (and, in a Cluster, maybe its own node).
            pipe = self.state.client.pipeline(transaction=False)
            for key in wanted:
                pipe.hmget(self.key(key), ["a", "e", "r"])
            return await pipe.execute()

        rows = await self.state.call(fetch)
        now = int(self.clock())
        found = {}
        for key, (addresses, expires, replies) in zip(wanted, rows, strict=True):
            if expires is not None and int(expires) > now:
                record = LedgerRecord(unpack_address_keys(addresses or b""), int(expires))
                found[key] = LedgerEntry(record, int(replies or 0))
        return found

    async def take_reply(self, key: bytes) -> int:
        now = int(self.clock())
        count = await self.state.call(lambda: self._take_reply(keys=[self.key(key)], args=[now]))
        return int(count)

    async def close(self) -> None:
        """The client is the RedisState's, closed by whoever made it."""


class RedisBudget:
    """A `RateBudget` on Redis: guessbudget.schedule as one Lua script over the buckets of one charge."""

    def __init__(self, rule: BudgetRule, state: RedisState) -> None:
        self.rule = rule
        self.state = state
        self._charge = state.client.register_script(_CHARGE)

    def keys(self, client_ip: str) -> list[str]:
        # The client's network is the hash tag of every bucket of a charge: one Cluster slot.
        head = f"{self.state.key_prefix}{self.rule.check}:{{{client_block(client_ip)}}}"
        return [f"{head}:{bucket.key}" for bucket in self.rule.buckets(client_ip)]

    async def charge(self, client_ip: str, now: float) -> Penalty:
        if not self.rule.enabled:
            return NO_PENALTY
        args: list[str] = [repr(now), repr(self.rule.max_delay)]
        for bucket in self.rule.buckets(client_ip):
            args += [repr(bucket.interval), repr(bucket.tolerance)]
        keys = self.keys(client_ip)
        disconnect, delay = await self.state.call(lambda: self._charge(keys=keys, args=args))
        if int(disconnect):
            return Penalty(0.0, disconnect=True)
        return Penalty(float(delay))

    async def close(self) -> None:
        """The client is the RedisState's, closed by whoever made it."""


def _keeps_the_protocols(ledger: RedisLedgerStore, budget: RedisBudget) -> tuple[LedgerStore, RateBudget]:
    return ledger, budget  # mypy checks here that the classes keep to the protocols
