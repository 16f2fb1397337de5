"""guessbudget: one contract over the three budgets (the process's own, SQLite, a real redis-server), the
budget counted across independent clients of one store, and the outage fallback: logged once, counted,
recovered without a restart."""

from __future__ import annotations

import asyncio
import io
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.ops.redisstore import RedisBudget, RedisState
from gateway.policy.guard import NO_PENALTY, Penalty
from gateway.policy.guessbudget import (
    BudgetRule,
    FallbackBudget,
    LocalBudget,
    RateBudget,
    SqliteBudget,
    client_block,
    schedule,
)
from gateway.policy.ledger import StoreUnavailable
from tests.redis_server import RedisServer
from tests.smtp_peers import run

NOW = 1_796_450_000.0
ROOT = Path(__file__).resolve().parent.parent
GUESS = BudgetRule("guess-budget", rate=1.0, burst=3, max_delay=10.0, network_factor=2)

class Budgets:
    """Budgets of one kind, all on one event loop (a Redis client's connections belong to the loop that
    made them); those of a shared kind share one store (one file, one server)."""

    def __init__(self, kind: str, folder: Path, server: RedisServer | None) -> None:
        self.kind, self.folder, self.server = kind, folder, server
        self.runner = asyncio.Runner()
        self.made: list[RateBudget] = []
        self.states: list[RedisState] = []

    def make(self, rule: BudgetRule) -> RateBudget:
        budget: RateBudget
        if self.kind == "local":
            budget = LocalBudget(rule)
        elif self.server is None:
            budget = SqliteBudget(rule, self.folder / "state.sqlite")
        else:
            self.states.append(RedisState(self.server.url))
            budget = RedisBudget(rule, self.states[-1])
        self.made.append(budget)
        return budget

    def charges(self, budget: RateBudget, ip: str, times: list[float]) -> list[Penalty]:
        async def body() -> list[Penalty]:
            return [await budget.charge(ip, at) for at in times]

        return self.runner.run(body())

    def close(self) -> None:
        async def body() -> None:
            for budget in self.made:
                await budget.close()
            for state in self.states:
                await state.close()

        try:
            self.runner.run(body())
        finally:
            self.runner.close()


@pytest.fixture(params=["local", "sqlite", "redis"])
def budgets(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Budgets]:
    server: RedisServer | None = request.getfixturevalue("redis_server") if request.param == "redis" else None
    made = Budgets(request.param, tmp_path, server)
    try:
        yield made
    finally:
        made.close()


def charges(budget: RateBudget, ip: str, times: list[float]) -> list[Penalty]:
    """For budgets that hold no connection (one loop per call will do)."""

    async def body() -> list[Penalty]:
        return [await budget.charge(ip, at) for at in times]

    return run(body())


def test_a_burst_at_once_then_the_rate(budgets: Budgets) -> None:
    budget = budgets.make(GUESS)
    assert budgets.charges(budget, "198.51.100.7", [NOW] * 5) == [
        NO_PENALTY,
        NO_PENALTY,
        NO_PENALTY,
        Penalty(1.0),
        Penalty(2.0),
    ]
    # Time pays the debt back: 5 s later the client owes nothing again.
    assert budgets.charges(budget, "198.51.100.7", [NOW + 5]) == [NO_PENALTY]


def test_past_max_delay_the_client_is_disconnected(budgets: Budgets) -> None:
    budget = budgets.make(BudgetRule("guess-budget", 1.0, 1, max_delay=2.0, network_factor=0))
    penalties = budgets.charges(budget, "2001:db8::1", [NOW] * 5)
    assert penalties == [NO_PENALTY, Penalty(1.0), Penalty(2.0), Penalty(0.0, True), Penalty(0.0, True)]
    # The same /64 is the same client; another /64 is not.
    assert budgets.charges(budget, "2001:db8::ffff", [NOW]) == [Penalty(0.0, True)]
    assert budgets.charges(budget, "2001:db8:0:1::1", [NOW]) == [NO_PENALTY]


def test_a_network_has_its_own_budget_shared_by_its_clients(budgets: Budgets) -> None:
    budget = budgets.make(GUESS)  # per client burst 3, per /24 burst 6 at 2 a second
    spread = [budgets.charges(budget, f"198.51.100.{n}", [NOW, NOW]) for n in range(1, 5)]
    # Each client stays within its own burst of 3; the /24's 6 are spent by the first three clients.
    assert spread == [[NO_PENALTY] * 2] * 3 + [[Penalty(0.5), Penalty(1.0)]]
    assert budgets.charges(budget, "198.51.101.1", [NOW]) == [NO_PENALTY]  # another /24
    assert budgets.charges(budget, "2001:db8:1:2::1", [NOW]) == [NO_PENALTY]


def test_the_null_sender_rate_is_per_network_and_off_when_its_rate_is_0(budgets: Budgets) -> None:
    rule = BudgetRule("null-sender-rate", 1.0, 2, network_factor=1, per_client=False)
    budget = budgets.make(rule)
    one = budgets.charges(budget, "198.51.100.1", [NOW])
    assert one + budgets.charges(budget, "198.51.100.2", [NOW, NOW]) == [NO_PENALTY, NO_PENALTY, Penalty(1.0)]
    off = budgets.make(BudgetRule("null-sender-rate", 0.0, 2, network_factor=1, per_client=False))
    assert budgets.charges(off, "198.51.100.1", [NOW] * 50)[-1] == NO_PENALTY


def test_the_budget_is_counted_across_independent_clients_of_one_store(budgets: Budgets) -> None:
    first, second = budgets.make(GUESS), budgets.make(GUESS)
    together = budgets.charges(first, "198.51.100.7", [NOW] * 2)
    together += budgets.charges(second, "198.51.100.7", [NOW] * 2)
    if isinstance(first, LocalBudget):
        # Two processes' own budgets: each gives the whole burst (why a fleet needs a shared store).
        assert together == [NO_PENALTY] * 4
    else:
        assert together == [NO_PENALTY, NO_PENALTY, NO_PENALTY, Penalty(1.0)]


def test_the_shared_budgets_answer_what_the_pure_schedule_answers(budgets: Budgets) -> None:
    """The Lua script, the SQLite transaction and GuessLimiter do guessbudget.schedule's sums, to the last
    bit (max_delay is out of reach here: past it, the local budget charges the client's bucket anyway)."""
    rule = BudgetRule("guess-budget", rate=1.0, burst=3, max_delay=1000.0, network_factor=2)
    budget = budgets.make(rule)
    times = [NOW + 0.37 * (n % 7) + 0.1 * n for n in range(40)]
    ips = [f"198.51.100.{n % 3}" for n in range(40)]
    tats: dict[str, float] = {}
    expected = []
    for ip, at in zip(ips, times, strict=True):
        buckets = rule.buckets(ip)
        penalty, new = schedule(rule, buckets, [tats.get(b.key) for b in buckets], at)
        if new is not None:
            tats.update(zip((b.key for b in buckets), new, strict=True))
        expected.append(penalty)
    got = [budgets.charges(budget, ip, [at])[0] for ip, at in zip(ips, times, strict=True)]
    assert got == expected
    assert any(p.delay > 0 and p.delay != int(p.delay) for p in got)  # fractions, not whole seconds


def test_client_block_is_the_24_or_the_48() -> None:
    assert client_block("198.51.100.7") == "198.51.100.0/24"
    assert client_block("::ffff:198.51.100.7") == "198.51.100.0/24"
    assert client_block("2001:db8:1:2::5") == "2001:db8:1::/48"
    assert client_block("not-an-ip") == "not-an-ip"


def test_a_rule_refuses_what_cannot_be_a_budget() -> None:
    with pytest.raises(ValueError, match="burst >= 1"):
        BudgetRule("guess-budget", 1.0, 0)
    with pytest.raises(ValueError, match="client bucket, a network bucket or both"):
        BudgetRule("null-sender-rate", 1.0, 1, network_factor=0, per_client=False)


def test_sqlite_deletes_run_out_buckets_a_batch_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    budget = SqliteBudget(GUESS, path, purge_batch=10)

    async def body() -> None:
        try:
            for n in range(30):
                await budget.charge(f"198.51.{n}.1", NOW)
            await budget.charge("203.0.113.1", NOW + 3600)
        finally:
            await budget.close()

    run(body())
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM budget").fetchone()[0] == 60 - 10 + 2


def test_the_store_away_falls_back_to_the_local_budget_and_comes_back(
    redis_server: RedisServer, log_stream: io.StringIO
) -> None:
    async def body() -> None:
        state = RedisState(redis_server.url)
        budget = FallbackBudget(RedisBudget(GUESS, state), "redis", retry_after=5.0)
        try:
            assert await budget.charge("198.51.100.7", NOW) == NO_PENALTY
            redis_server.stop()
            # The local budget is fresh: the shared one's charge is not carried over.
            local = [await budget.charge("198.51.100.7", NOW + 1) for _ in range(4)]
            assert local == [NO_PENALTY, NO_PENALTY, NO_PENALTY, Penalty(1.0)]
            assert not budget.available and budget.outages == 1 and budget.fallbacks == 4
            redis_server.start()
            # Within retry_after the store is not asked again; past it, it is, and answers.
            assert await budget.charge("198.51.101.1", NOW + 2) == NO_PENALTY
            assert not budget.available and budget.fallbacks == 5
            assert await budget.charge("198.51.101.1", NOW + 6) == NO_PENALTY
            assert budget.available and budget.fallbacks == 5
            bucket = "batv:guess-budget:{198.51.101.0/24}:ip:198.51.101.1"
            assert redis_server.command("EXISTS", bucket) == "1"
            # A second outage is logged again, once.
            redis_server.stop()
            for _ in range(3):
                await budget.charge("198.51.100.7", NOW + 8)
            assert budget.outages == 2 and budget.fallbacks == 8
        finally:
            await budget.close()
            await state.close()

    run(body())
    lines = log_stream.getvalue().splitlines()
    assert len(lines) == 3, lines
    down, up, down_again = lines
    for line in (down, down_again):
        assert 'msg="state store unavailable"' in line and "level=warning" in line
        assert "backend=redis check=guess-budget fallback=local" in line
        assert "error=" in line
    assert 'msg="state store available"' in up and "backend=redis check=guess-budget" in up


def test_a_store_that_raises_is_never_seen_by_the_caller() -> None:
    class Away:
        rule = GUESS

        async def charge(self, client_ip: str, now: float) -> Penalty:
            raise StoreUnavailable("state store redis://***@10.0.0.5/0: Connection refused")

        async def close(self) -> None:
            return None

    budget = FallbackBudget(Away(), "redis", retry_after=0.0)
    assert charges(budget, "198.51.100.7", [NOW] * 4)[-1] == Penalty(1.0)
    assert budget.outages == 1 and budget.fallbacks == 4


CHARGER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from gateway.policy.guessbudget import BudgetRule, SqliteBudget
    from gateway.ops.redisstore import RedisBudget, RedisState

    async def main(kind, where, count):
        rule = BudgetRule("guess-budget", 1.0, 3, max_delay=1e6, network_factor=0)
        state = None
        if kind == "redis":
            state = RedisState(where, command_timeout=10.0)
            budget = RedisBudget(rule, state)
        else:
            budget = SqliteBudget(rule, Path(where), busy_timeout=10.0)
        try:
            for _ in range(count):
                penalty = await budget.charge("198.51.100.7", 1_796_450_000.0)
                print(penalty.delay)
        finally:
            await budget.close()
            if state is not None:
                await state.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_processes_charging_at_once_lose_no_charge(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Workers and hosts charge one client at the same moment: every charge is counted once, so between
    them they get the burst and then one more second each, exactly as one process would."""
    where = request.getfixturevalue("redis_server").url if kind == "redis" else str(tmp_path / "state.sqlite")
    count = 60
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHARGER, kind, where, str(count)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    delays: list[float] = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        delays += [float(line) for line in out.split()]
    assert sorted(delays) == [0.0, 0.0] + [float(n) for n in range(2 * count - 2)]
