"""Rate budgets shared by every worker and host: the failed-guess budget and the null-sender rate limit.

`guard.GuessLimiter` holds one process's budget. A fleet of MX hosts and workers must count a client's
failed tag checks across all of them, or N processes give a guesser N times the budget. A `RateBudget`
answers the same question as `GuessLimiter.failed_guess` (a `Penalty`: how long to hold the answer, or
disconnect) from state kept in one place:

- `LocalBudget`: the process's own, `GuessLimiter`s as they are (the fallback, and `workers = 1`);
- `SqliteBudget`: one SQLite file (WAL) for every worker on one host;
- `redisstore.RedisBudget`: one Redis for the fleet.

The arithmetic is GuessLimiter's: GCRA, the "virtual scheduling" form of a token bucket, with a
theoretical arrival time (TAT) per bucket. A charge may touch two buckets: the client's own (its IPv4
address, or the /64 of an IPv6 one, as `guard.client_network`) and its network's (a /24, or an IPv6 /48),
whose rate and burst are `network_factor` times the client's. A client is held as long as the fuller of
the two says, and disconnected when either would hold it past `max_delay` (then neither is charged: a
guess never answered costs nothing). The network bucket is what stops a guesser that spreads over the
addresses of one provider's block. The TAT is wall-clock seconds: monotonic clocks are per boot and cannot
be compared across hosts.

When the store is away, `FallbackBudget` answers from a `LocalBudget` (one log line when it falls back,
one when the store is back, every charge answered locally counted) and asks the store again after
`retry_after` seconds: recovery needs no restart. docs/operations.md, "A fleet on Redis", has the policy.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..core import logs
from .guard import NO_PENALTY, GuardSettings, GuessLimiter, Penalty, client_network
from .ledger import StoreUnavailable
from .sqlitefile import SqliteFile, sqlite_setup

log = logging.getLogger("gateway.state")

NETWORK_FACTOR = 4  # [state] guess_network_factor: a /24 or /48 gets 4 times one client's budget
RETRY_AFTER = 5.0  # seconds between tries of a store that was away
BUSY_TIMEOUT = 1.0  # seconds an SQLite call waits for another process's write lock
PURGE_BATCH = 64  # run-out buckets deleted per SQLite charge at most


def client_block(ip: str) -> str:
    """The network a client's provider hands out addresses in: the /24 of IPv4, the /48 of IPv6."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip  # not an IP (a unix-socket peer): its own block
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        else:
            return str(ipaddress.IPv6Network((address, 48), strict=False))
    return str(ipaddress.IPv4Network((address, 24), strict=False))


@dataclass(frozen=True)
class Bucket:
    """One GCRA bucket a charge touches: its name in the store, and its spacing and slack (seconds)."""

    key: str
    interval: float
    tolerance: float


@dataclass(frozen=True)
class BudgetRule:
    """`rate` charges a second after `burst` at once, per client and (times `network_factor`) per network.

    `per_client = False` keeps the network bucket only (the null-sender rate limit is per network);
    `network_factor = 0` keeps the client bucket only. `rate = 0` turns the budget off.
    """

    check: str  # what the budget is for, in log lines and store keys: "guess-budget", "null-sender-rate"
    rate: float
    burst: int
    max_delay: float = GuardSettings.max_guess_delay
    network_factor: int = NETWORK_FACTOR
    per_client: bool = True

    def __post_init__(self) -> None:
        if self.rate < 0 or self.max_delay < 0 or self.burst < 1 or self.network_factor < 0:
            raise ValueError("a budget needs rate >= 0, burst >= 1, max_delay >= 0 and network_factor >= 0")
        if not self.per_client and not self.network_factor:
            raise ValueError("a budget needs a client bucket, a network bucket or both")

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def levels(self) -> list[tuple[str, int]]:
        levels = [("ip", 1)] if self.per_client else []
        return levels + ([("net", self.network_factor)] if self.network_factor else [])

    def settings(self, factor: int) -> GuardSettings:
        """GuessLimiter's settings for a bucket of `factor` times one client's budget."""
        return GuardSettings(
            guess_rate=self.rate * factor, guess_burst=self.burst * factor, max_guess_delay=self.max_delay
        )

    def buckets(self, client_ip: str) -> tuple[Bucket, ...]:
        """The buckets a charge from `client_ip` touches, the client's first."""
        out = []
        for level, factor in self.levels():
            unit = client_network(client_ip) if level == "ip" else client_block(client_ip)
            interval = 1.0 / (self.rate * factor)
            out.append(Bucket(f"{level}:{unit}", interval, (self.burst * factor - 1) * interval))
        return tuple(out)


def schedule(
    rule: BudgetRule, buckets: Sequence[Bucket], tats: Sequence[float | None], now: float
) -> tuple[Penalty, tuple[float, ...] | None]:
    """One charge against `buckets` whose TATs are `tats` (None: never charged or run out). Pure.

    The penalty, and the new TATs (None when disconnected: nothing is charged). RedisBudget's Lua script
    does the same sums; the contract tests hold all three budgets to the same answers.
    """
    starts = [now if tat is None else max(tat, now) for tat in tats]
    pairs = list(zip(starts, buckets, strict=True))
    delay = max(max(0.0, start - bucket.tolerance - now) for start, bucket in pairs)
    if delay > rule.max_delay:
        return Penalty(0.0, disconnect=True), None
    return Penalty(delay), tuple(start + bucket.interval for start, bucket in pairs)


def bucket_ttl(tat: float, now: float) -> int:
    """Whole seconds a bucket must be kept: past its TAT it says what a fresh one does."""
    return max(1, math.ceil(tat - now) + 1)


class RateBudget(Protocol):
    """A budget shared by whoever holds the same store. `charge` may raise StoreUnavailable, nothing else."""

    rule: BudgetRule

    async def charge(self, client_ip: str, now: float) -> Penalty:
        """One more charge from `client_ip` at `now` (wall-clock seconds): hold the answer, or disconnect."""

    async def close(self) -> None: ...


class LocalBudget:
    """One process's budget: a `GuessLimiter` per bucket level, fed the caller's clock. Never unavailable.

    Unlike the shared budgets, a charge refused by the network bucket has already been counted by the
    client's (GuessLimiter schedules as it answers); a disconnected client pays one slot it never used.
    """

    def __init__(self, rule: BudgetRule) -> None:
        self.rule = rule
        self._now = 0.0
        self._limiters = [
            (level, GuessLimiter(rule.settings(factor), clock=self._clock)) for level, factor in rule.levels()
        ]

    def _clock(self) -> float:
        return self._now

    async def charge(self, client_ip: str, now: float) -> Penalty:
        if not self.rule.enabled:
            return NO_PENALTY
        self._now = now
        delay = 0.0
        for level, limiter in self._limiters:
            # GuessLimiter keys by guard.client_network, which leaves a "/24" network name as it is.
            penalty = limiter.failed_guess(client_ip if level == "ip" else client_block(client_ip))
            if penalty.disconnect:
                return penalty
            delay = max(delay, penalty.delay)
        return Penalty(delay)

    async def close(self) -> None:
        return None


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS budget ("
    " key TEXT PRIMARY KEY,"  # "<check>:ip:<address or /64>" or "<check>:net:<the /24 or /48>"
    " tat REAL NOT NULL"  # the bucket's theoretical arrival time, wall-clock seconds
    ") WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS budget_tat ON budget (tat)",
)


class SqliteBudget(SqliteFile):
    """A `RateBudget` in an SQLite file shared by every worker of one host (the [state] file, beside the
    ledger's table). One short write transaction per charge; a thread per budget, as ledgerstore.py.
    Run-out buckets are deleted `purge_batch` at a time by the charges themselves."""

    store_name = "budget store"
    thread_name = "budget-sqlite"

    def __init__(
        self, rule: BudgetRule, path: Path, busy_timeout: float = BUSY_TIMEOUT, purge_batch: int = PURGE_BATCH
    ) -> None:
        super().__init__(path, busy_timeout)
        self.rule = rule
        self.purge_batch = purge_batch

    async def charge(self, client_ip: str, now: float) -> Penalty:
        if not self.rule.enabled:
            return NO_PENALTY
        return await self._run(self._charge, self.rule.buckets(client_ip), now)

    def _before_call(self, fn: Callable[..., object]) -> None:
        if self._db is None:
            self._connect(create=True)

    def _setup(self, db: sqlite3.Connection) -> None:
        # A budget lost in a host crash only forgives some guesses: no fsync per charge.
        sqlite_setup(db, ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", *_SCHEMA))

    def _charge(self, buckets: tuple[Bucket, ...], now: float) -> Penalty:
        db = self._conn()
        keys = [f"{self.rule.check}:{bucket.key}" for bucket in buckets]
        db.execute("BEGIN IMMEDIATE")
        try:
            found = dict(
                db.execute(
                    f"SELECT key, tat FROM budget WHERE key IN ({','.join('?' * len(keys))})",  # noqa: S608 (only "?" marks)
                    keys,
                ).fetchall()
            )
            penalty, tats = schedule(self.rule, buckets, [found.get(key) for key in keys], now)
            if tats is not None:
                db.executemany(
                    "INSERT OR REPLACE INTO budget (key, tat) VALUES (?, ?)", zip(keys, tats, strict=True)
                )
            db.execute(
                "DELETE FROM budget WHERE key IN "
                "(SELECT key FROM budget WHERE tat <= ? ORDER BY tat LIMIT ?)",
                (now, self.purge_batch),
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return penalty


class FallbackBudget:
    """A shared budget that answers from the process's own while its store is away.

    The first failure logs one warning and starts an outage; every charge answered locally is counted
    (`fallbacks`); the store is asked again `retry_after` seconds later, and the first answer it gives
    ends the outage with one line. Never raises StoreUnavailable.
    """

    def __init__(
        self,
        shared: RateBudget,
        backend: str,
        retry_after: float = RETRY_AFTER,
        local: LocalBudget | None = None,
    ) -> None:
        self.rule = shared.rule
        self.shared = shared
        self.backend = backend
        self.retry_after = retry_after
        self.local = local if local is not None else LocalBudget(shared.rule)
        self.available = True
        self.outages = 0  # times the store went away
        self.fallbacks = 0  # charges answered by the local budget
        # Told the check of every charge answered locally (metrics.Metrics.state_fallback: a counter
        # that every worker adds to, where `fallbacks` is one process's).
        self.on_fallback: Callable[[str], None] | None = None
        self._retry_at = 0.0

    async def charge(self, client_ip: str, now: float) -> Penalty:
        if not self.rule.enabled:
            return NO_PENALTY
        if self.available or now >= self._retry_at:
            try:
                penalty = await self.shared.charge(client_ip, now)
            except StoreUnavailable as error:
                self._retry_at = now + self.retry_after
                if self.available:
                    self.available = False
                    self.outages += 1
                    logs.log_fields(
                        log,
                        logging.WARNING,
                        "state store unavailable",
                        backend=self.backend,
                        check=self.rule.check,
                        fallback="local",
                        error=str(error),
                    )
            else:
                if not self.available:
                    self.available = True
                    fields = {"backend": self.backend, "check": self.rule.check}
                    logs.log_fields(log, logging.INFO, "state store available", **fields)
                return penalty
        self.fallbacks += 1
        if self.on_fallback is not None:
            self.on_fallback(self.rule.check)
        return await self.local.charge(client_ip, now)

    async def close(self) -> None:
        await self.shared.close()


def _is_a_rate_budget(local: LocalBudget, sqlite: SqliteBudget, fallback: FallbackBudget) -> list[RateBudget]:
    return [local, sqlite, fallback]  # mypy checks here that the classes keep to the protocol
