"""state: what [state] makes (the SQLite file beside the keyring, or one Redis client for every store),
and the redaction of a Redis URL's secrets."""

from __future__ import annotations

import dataclasses
import io
import urllib.parse
from pathlib import Path

import pytest

from gateway.core.errors import ConfigError
from gateway.ops import config
from gateway.ops.redisstore import RedisLedgerStore
from gateway.ops.state import make_stores, redact, state_path, url_problem, url_secrets, workers_that_start
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
    for url in (
        "redis://10.0.0.5:6379/0",
        "rediss://:pw@redis.example.com/0",
        "unix:///run/redis/redis.sock",
    ):
        assert url_problem(url) is None


def workers_config(
    folder: Path, workers: object = None, state: dict[str, object] | None = None
) -> config.Config:
    gateway: dict[str, object] = {"keyring": str(folder / "keys" / "keyring.toml")}
    if workers is not None:
        gateway["workers"] = workers
    path = folder / "gateway.toml"
    return config.parse({"gateway": gateway, "state": state or {}}, str(path), path)


def test_several_workers_get_their_state_file_made_before_they_start(
    tmp_path: Path, log_stream: io.StringIO
) -> None:
    (tmp_path / "keys").mkdir()
    cfg = workers_config(tmp_path, 2)
    assert workers_that_start(cfg) is cfg
    assert (tmp_path / "keys" / "state.sqlite").is_file()
    # One process needs no file (state.budgets_shared), and Redis none on this host: nothing is made.
    (tmp_path / "keys" / "state.sqlite").unlink()
    for alone in (
        workers_config(tmp_path, 1),
        workers_config(tmp_path, 2, {"backend": "redis", "url": "redis://h"}),
    ):
        assert workers_that_start(alone) is alone
    assert not (tmp_path / "keys" / "state.sqlite").exists()
    assert log_stream.getvalue() == ""


def test_auto_workers_fall_back_to_one_where_the_state_file_cannot_be_made(
    tmp_path: Path, log_stream: io.StringIO
) -> None:
    """As beside a keyring in a read-only folder: one process ran there before "auto" became the default."""
    cfg = workers_config(tmp_path)  # no keys/ folder: state.sqlite beside the keyring cannot be made
    assert cfg.workers_auto
    cfg = dataclasses.replace(cfg, workers=4)  # "auto" on 4 CPUs, whatever this machine has
    started = workers_that_start(cfg)
    assert (started.workers, started.workers_auto) == (1, True)
    (line,) = log_stream.getvalue().splitlines()
    assert line.startswith("ts=") and "level=warning logger=gateway.state" in line
    said = f'msg="{tmp_path / "gateway.toml"}: [gateway] workers = \\"auto\\" would run 4 workers'
    assert said in line, line
    assert (
        f"{tmp_path / 'keys' / 'state.sqlite'} (not set: state.sqlite beside the keyring), cannot be made"
        in line
    )
    assert "serving with 1 worker; set [state] path to a file" in line


def test_a_number_of_workers_where_the_state_file_cannot_be_made_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "state.sqlite"
    with pytest.raises(ConfigError) as caught:
        workers_that_start(workers_config(tmp_path, 3, {"path": str(missing)}))
    assert str(caught.value).startswith(f"{tmp_path / 'gateway.toml'}: [state] path: cannot make {missing} (")
    assert "[gateway] workers = 3 share; set [state] path to a file" in str(caught.value)
    assert str(caught.value).endswith("or set [gateway] workers = 1")
