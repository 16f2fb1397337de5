"""redisstore: the ledger's store contract over SQLite and a real redis-server alike, every Redis key with a
TTL, a Cluster-safe layout, and an outage (the server killed, stopped, back) that is StoreUnavailable and
recovers on the same client. The guess budget on Redis is in tests/test_guessbudget.py."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

from gateway.ops.ledgerstore import SqliteLedgerStore
from gateway.ops.redisstore import RedisBudget, RedisLedgerStore, RedisState
from gateway.policy.guessbudget import BudgetRule
from gateway.policy.ledger import (
    MAX_RECORD_ADDRESSES,
    LedgerAction,
    LedgerEntry,
    LedgerKeys,
    LedgerReason,
    LedgerRecord,
    LedgerStore,
    StoreUnavailable,
    check,
)
from gateway.policy.messageids import FoundReferences, MessageKind, Reference, ReferenceSource
from tests.redis_server import RedisServer
from tests.smtp_peers import run

NOW = 1_796_450_000
A, B, C = b"a" * 16, b"b" * 16, b"c" * 16
TTL = 30 * 86400
FOUND = FoundReferences(
    (Reference("1@example.com", ReferenceSource.IN_REPLY_TO),), MessageKind.AUTO_REPLY, False
)


def key(n: int) -> bytes:
    return n.to_bytes(32, "big")


Opener = Callable[[Callable[[], float]], Any]


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """The same contract over both stores: `async with open_store(clock) as store`."""
    server: RedisServer | None = request.getfixturevalue("redis_server") if request.param == "redis" else None

    @asynccontextmanager
    async def opened(clock: Callable[[], float]) -> AsyncIterator[LedgerStore]:
        if server is None:
            store: LedgerStore = await SqliteLedgerStore.open(tmp_path / "state.sqlite", clock=clock)
            try:
                yield store
            finally:
                await store.close()
            return
        state = RedisState(server.url)
        try:
            yield RedisLedgerStore(state, clock=clock)
        finally:
            await state.close()

    yield opened


def test_record_lookup_take_reply_and_merge(open_store: Opener) -> None:
    async def body() -> None:
        async with open_store(lambda: float(NOW)) as store:
            await store.record(key(1), LedgerRecord(frozenset({A, B}), NOW + 100), 100)
            assert await store.lookup([key(1), key(2)]) == {
                key(1): LedgerEntry(LedgerRecord(frozenset({A, B}), NOW + 100), 0)
            }
            assert await store.take_reply(key(1)) == 1
            assert await store.take_reply(key(1)) == 2
            assert await store.take_reply(key(2)) == 0  # nothing there, and nothing made
            assert await store.lookup([key(2)]) == {}
            # The same Message-ID sent again: the addresses are merged, the later expiry and the count kept.
            await store.record(key(1), LedgerRecord(frozenset({C}), NOW + 50), 50)
            assert await store.lookup([key(1)]) == {
                key(1): LedgerEntry(LedgerRecord(frozenset({A, B, C}), NOW + 100), 2)
            }
            assert await store.lookup([]) == {}

    run(body())


def test_a_record_group_is_each_record_merged_as_record_would(open_store: Opener) -> None:
    async def body() -> None:
        async with open_store(lambda: float(NOW)) as store:
            await store.record(key(1), LedgerRecord(frozenset({A}), NOW + 100), 100)
            await store.take_reply(key(1))
            await store.record_group(
                [
                    (key(1), LedgerRecord(frozenset({B}), NOW + 50), 50),  # merged, count and expiry kept
                    (key(2), LedgerRecord(frozenset({A}), NOW + 100), 100),
                    (key(2), LedgerRecord(frozenset({C}), NOW + 200), 200),  # twice in one group
                    (key(3), LedgerRecord(frozenset({C}), NOW + 100), 100),
                ]
            )
            await store.record_group([])
            assert await store.lookup([key(1), key(2), key(3)]) == {
                key(1): LedgerEntry(LedgerRecord(frozenset({A, B}), NOW + 100), 1),
                key(2): LedgerEntry(LedgerRecord(frozenset({A, C}), NOW + 200), 0),
                key(3): LedgerEntry(LedgerRecord(frozenset({C}), NOW + 100), 0),
            }

    run(body())


def test_a_merged_record_keeps_the_addresses_the_pure_merge_keeps(open_store: Opener) -> None:
    # Octets above 0x7f sort after the others only when compared as octets (not by a locale).
    first = frozenset(bytes([n * 7 % 256]) * 16 for n in range(30))
    second = frozenset(bytes([n * 11 % 256, 0x80]) * 8 for n in range(30))
    expected = LedgerRecord(first, NOW + 100).merge(LedgerRecord(second, NOW + 200))
    assert len(expected.addresses) == MAX_RECORD_ADDRESSES

    async def body() -> None:
        async with open_store(lambda: float(NOW)) as store:
            await store.record(key(1), LedgerRecord(first, NOW + 100), 100)
            await store.record(key(1), LedgerRecord(second, NOW + 200), 200)
            assert await store.lookup([key(1)]) == {key(1): LedgerEntry(expected, 0)}

    run(body())


def test_an_expired_entry_is_not_answered_and_recorded_again_starts_afresh(open_store: Opener) -> None:
    clock = [float(NOW)]

    async def body() -> None:
        async with open_store(lambda: clock[0]) as store:
            await store.record(key(1), LedgerRecord(frozenset({A}), NOW + 10), 10)
            assert await store.take_reply(key(1)) == 1
            clock[0] = NOW + 10  # expiry is exclusive: at `expires` the entry is gone
            assert await store.lookup([key(1)]) == {}
            assert await store.take_reply(key(1)) == 0
            await store.record(key(1), LedgerRecord(frozenset({B}), NOW + 99), 89)
            assert await store.lookup([key(1)]) == {
                key(1): LedgerEntry(LedgerRecord(frozenset({B}), NOW + 99), 0)
            }

    run(body())


def test_the_decision_over_the_store_vouches_then_caps(open_store: Opener) -> None:
    keys = LedgerKeys(b"s" * 32)
    found = FOUND

    async def body() -> None:
        async with open_store(lambda: float(NOW)) as store:
            record = LedgerRecord(frozenset({keys.address_key("a@example.com")}), NOW + TTL)  # type: ignore[arg-type]
            await store.record(keys.message_key("1@example.com"), record, TTL)
            verdicts = [
                await check(store, found, "a@example.com", keys, NOW, max_replies=2) for _ in range(3)
            ]
            assert [v.reason for v in verdicts] == [
                LedgerReason.VOUCHED,
                LedgerReason.VOUCHED,
                LedgerReason.REPLAY_CAP,
            ]

    run(body())


def test_every_key_has_a_ttl_and_a_merge_never_shortens_it(redis_server: RedisServer) -> None:
    async def body() -> None:
        state = RedisState(redis_server.url)
        try:
            store = RedisLedgerStore(state, clock=lambda: float(NOW))
            await store.record(key(1), LedgerRecord(frozenset({A}), NOW + TTL), TTL)
            await store.record(key(1), LedgerRecord(frozenset({B}), NOW + 60), 60)
            await store.take_reply(key(1))
            await store.take_reply(key(2))
            for ip in ("198.51.100.7", "2001:db8:1:2::5"):
                await RedisBudget(BudgetRule("guess-budget", 1.0, 5), state).charge(ip, NOW)
                await RedisBudget(BudgetRule("null-sender-rate", 1.0, 5, per_client=False), state).charge(
                    ip, NOW
                )
        finally:
            await state.close()

    run(body())
    names = redis_server.command("KEYS", "*")
    assert names.count("batv:") == 7  # one ledger entry; per IP: two guess buckets, one null-sender
    for name in eval(names):  # a Python list repr of the key names
        ttl = int(redis_server.command("TTL", name))
        assert ttl > 0, name
        if name.startswith("batv:ledger:"):
            assert TTL - 5 < ttl <= TTL  # the later record asked for 60 s; the first one's TTL stands
    assert "batv:ledger:" + key(2).hex() not in names  # take_reply on nothing makes nothing


def test_the_keys_one_script_touches_share_a_cluster_slot() -> None:
    state = RedisState("unix:///nonexistent/redis.sock", key_prefix="mx:")
    budget = RedisBudget(BudgetRule("guess-budget", 1.0, 5), state)
    for ip in ("198.51.100.7", "2001:db8:1:2::5", "::ffff:198.51.100.9"):
        names = budget.keys(ip)
        assert len(names) == 2 and all(name.startswith("mx:guess-budget:{") for name in names)
        assert len({key_slot(name.encode()) for name in names}) == 1, names
    # Clients of one network meet in its buckets; another network's go elsewhere.
    assert budget.keys("198.51.100.7")[1] == budget.keys("198.51.100.200")[1]
    assert budget.keys("198.51.100.7")[1] != budget.keys("198.51.101.7")[1]
    assert budget.keys("2001:db8:1:2::5")[1].endswith(":net:2001:db8:1::/48")
    assert budget.keys("2001:db8:1:2::5")[0].endswith(":ip:2001:db8:1:2::/64")
    assert RedisLedgerStore(state).key(key(1)) == "mx:ledger:" + key(1).hex()


def test_an_outage_is_store_unavailable_and_the_same_client_recovers(redis_server: RedisServer) -> None:
    keys = LedgerKeys(b"s" * 32)
    found = FOUND
    record = LedgerRecord(frozenset({keys.address_key("a@example.com")}), NOW + TTL)  # type: ignore[arg-type]

    async def body() -> None:
        state = RedisState(redis_server.url)
        store = RedisLedgerStore(state, clock=lambda: float(NOW))
        try:
            await store.record(key(1), record, TTL)
            redis_server.stop()
            for operation in (
                store.record(key(1), record, TTL),
                store.record_group([(key(1), record, TTL), (key(2), record, TTL)]),
                store.lookup([key(1)]),
                store.take_reply(key(1)),
            ):
                with pytest.raises(StoreUnavailable, match=r"^state store unix:///tmp/redis-"):
                    await operation
            # What the inbound role decides meanwhile: 451 4.3.0, never a 5xx for our outage.
            verdict = await check(store, found, "a@example.com", keys, NOW)
            assert verdict.action is LedgerAction.TEMPFAIL
            assert verdict.reason is LedgerReason.STORE_UNAVAILABLE
            assert verdict.reply is not None and (verdict.reply.code, verdict.reply.status) == (451, "4.3.0")
            assert not await state.ping()

            redis_server.start()  # empty: no persistence, as a restarted cache
            assert await state.ping()
            assert await store.lookup([keys.message_key("1@example.com")]) == {}
            await store.record(keys.message_key("1@example.com"), record, TTL)  # the script is loaded again
            verdict = await check(store, found, "a@example.com", keys, NOW)
            assert verdict.reason is LedgerReason.VOUCHED
        finally:
            await state.close()

    run(body())


def test_a_server_that_stops_answering_is_an_outage_within_the_timeouts(redis_server: RedisServer) -> None:
    async def body() -> None:
        state = RedisState(redis_server.url, connect_timeout=0.2, command_timeout=0.2)
        store = RedisLedgerStore(state, clock=lambda: float(NOW))
        try:
            await store.record(key(1), LedgerRecord(frozenset({A}), NOW + 60), 60)
            pid = redis_server.pid
            os.kill(pid, signal.SIGSTOP)
            try:
                with pytest.raises(StoreUnavailable):
                    await store.lookup([key(1)])
            finally:
                os.kill(pid, signal.SIGCONT)
            assert await store.take_reply(key(1)) == 1
        finally:
            await state.close()

    run(body())


def test_a_closed_state_answers_store_unavailable(redis_server: RedisServer) -> None:
    async def body() -> None:
        state = RedisState(redis_server.url)
        await state.close()
        await state.close()  # once is enough, twice is harmless
        with pytest.raises(StoreUnavailable, match="is closed"):
            await RedisLedgerStore(state).lookup([key(1)])

    run(body())


def test_no_error_shows_the_password(redis_server: RedisServer) -> None:
    redis_server.command("CONFIG", "SET", "requirepass", "hunter2-very-secret")

    async def body() -> list[str]:
        messages = []
        urls = (
            f"{redis_server.url}?password=wrong-but-secret",  # the server refuses it
            "redis://:hunter2-very-secret@127.0.0.1:1/0",  # nothing listens on port 1
            "redis://user:hunter2%2Fvery@[::1]:1/0",
        )
        for url in urls:
            state = RedisState(url, connect_timeout=0.5)
            assert "***" in state.where and "secret" not in state.where and "very" not in state.where
            try:
                with pytest.raises(StoreUnavailable) as caught:
                    await RedisLedgerStore(state).lookup([key(1)])
                messages.append(str(caught.value))
            finally:
                await state.close()
        # And the right password works.
        state = RedisState(f"{redis_server.url}?password=hunter2-very-secret")
        try:
            assert await RedisLedgerStore(state).lookup([key(1)]) == {}
        finally:
            await state.close()
        return messages

    messages = run(body())
    for message in messages:
        assert "secret" not in message and "hunter2" not in message and "***" in message, message
