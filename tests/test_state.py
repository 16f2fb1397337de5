"""state: what [state] makes (the SQLite file beside the keyring, or one Redis client for every store),
and the redaction of a Redis URL's secrets."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import pytest

from gateway.ops import config
from gateway.ops.redisstore import RedisLedgerStore
from gateway.ops.state import make_stores, redact, state_path, url_problem, url_secrets
from gateway.policy.guard import NO_PENALTY, Penalty
from gateway.policy.ledger import LedgerRecord
from tests.redis_server import RedisServer
from tests.smtp_peers import run

NOW = 1_796_450_000


def test_sqlite_is_one_file_beside_the_keyring_for_the_ledger_and_both_budgets(tmp_path: Path) -> None:
    cfg = config.parse(
        {
            "gateway": {"keyring": str(tmp_path / "keys" / "keyring.toml")},
            "limits": {"guess_burst": 1},
            "state": {"null_sender_rate": 1.0, "null_sender_burst": 1},
        }
    )
    (tmp_path / "keys").mkdir()
    assert state_path(cfg) == tmp_path / "keys" / "state.sqlite"

    async def body() -> None:
        stores = await make_stores(cfg)
        try:
            assert stores.backend == "sqlite" and await stores.available()
            await stores.ledger.record(bytes(32), LedgerRecord(frozenset({b"a" * 16}), NOW * 2), 60)
            assert await stores.guess_budget.charge("198.51.100.7", NOW) == NO_PENALTY
            assert await stores.guess_budget.charge("198.51.100.7", NOW) == Penalty(1.0)
            assert await stores.null_sender_rate.charge("198.51.100.8", NOW) == NO_PENALTY
            # One /24; over the rate is refused at once, never held (`disconnect`: not charged).
            assert await stores.null_sender_rate.charge("198.51.100.9", NOW) == Penalty(0.0, disconnect=True)
        finally:
            await stores.close()

    run(body())
    assert {p.name for p in (tmp_path / "keys").iterdir()} >= {"state.sqlite"}


def test_the_null_sender_rate_is_off_by_default(tmp_path: Path) -> None:
    cfg = config.parse({"state": {"path": str(tmp_path / "state.sqlite")}})

    async def body() -> list[Penalty]:
        stores = await make_stores(cfg)
        try:
            return [await stores.null_sender_rate.charge("198.51.100.8", NOW) for _ in range(100)]
        finally:
            await stores.close()

    assert set(run(body())) == {NO_PENALTY}


def test_redis_is_one_client_for_every_store(redis_server: RedisServer) -> None:
    cfg = config.parse({"state": {"backend": "redis", "url": redis_server.url, "key_prefix": "mx1:"}})

    async def body() -> None:
        stores = await make_stores(cfg)
        try:
            assert stores.backend == "redis" and stores.redis is not None and await stores.available()
            assert isinstance(stores.ledger, RedisLedgerStore) and stores.ledger.state is stores.redis
            await stores.ledger.record(bytes(32), LedgerRecord(frozenset({b"a" * 16}), NOW * 2), 60)
            await stores.guess_budget.charge("198.51.100.7", NOW)
            redis_server.stop()
            assert not await stores.available()
            assert await stores.guess_budget.charge("198.51.100.7", NOW) == NO_PENALTY  # the local budget
            assert stores.guess_budget.fallbacks == 1
        finally:
            await stores.close()

    run(body())


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cr3t@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
        ("rediss://batv:s3cr3t@redis.example.com:6380/0", "rediss://batv:***@redis.example.com:6380/0"),
        ("unix:///run/redis.sock?db=1&password=s3cr3t", "unix:///run/redis.sock?db=1&password=***"),
        ("redis://:s3cr3t%40x@[::1]:63x9/0", "redis://:***@[::1]:63x9/0"),  # a broken port too
        ("redis://10.0.0.5:6379/0", "redis://10.0.0.5:6379/0"),
    ],
)
def test_redact_leaves_the_password_out(url: str, shown: str) -> None:
    assert redact(url, url) == shown
    for secret in url_secrets(url):
        assert redact(f"error with {secret} in it", url) == "error with *** in it"
    assert "s3cr3t" not in redact(f"{url} {urllib.parse.unquote(url)}", url)


def test_url_problem_accepts_the_three_schemes() -> None:
    for url in ("redis://10.0.0.5:6379/0", "rediss://:pw@redis.example.com/0", "unix:///run/redis/redis.sock"):
        assert url_problem(url) is None
