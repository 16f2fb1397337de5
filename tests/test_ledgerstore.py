"""ledgerstore: the SQLite store for real, in a temp folder: modes, WAL, expiry, several processes, and
every way the file can fail under it (each one StoreUnavailable, never a crash)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway.ops.ledgerstore import RECORD_BATCH, SqliteLedgerStore
from gateway.policy.ledger import LedgerEntry, LedgerRecord, StoreUnavailable
from tests.smtp_peers import run

NOW = 1_796_450_000
ROOT = Path(__file__).resolve().parent.parent
A, B, C = b"a" * 16, b"b" * 16, b"c" * 16


def key(n: int) -> bytes:
    return n.to_bytes(32, "big")


def rows(path: Path, where: str = "1") -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(f"SELECT count(*) FROM ledger WHERE {where}").fetchone()[0])


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.sqlite"


def test_the_file_is_private_and_in_wal_mode(path: Path) -> None:
    async def body() -> dict[str, int]:
        store = await SqliteLedgerStore.open(path)
        try:
            await store.record(key(1), LedgerRecord(frozenset({A}), NOW * 2), 60)
            return {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()}
        finally:
            await store.close()

    modes = run(body())
    # SQLite gives the -wal and -shm files the mode of the database file.
    assert modes == {"ledger.sqlite": 0o600, "ledger.sqlite-wal": 0o600, "ledger.sqlite-shm": 0o600}
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_record_lookup_take_reply_and_merge(path: Path) -> None:
    async def body() -> None:
        store = await SqliteLedgerStore.open(path, clock=lambda: float(NOW))
        try:
            await store.record(key(1), LedgerRecord(frozenset({A, B}), NOW + 100), 100)
            assert await store.lookup([key(1), key(2)]) == {
                key(1): LedgerEntry(LedgerRecord(frozenset({A, B}), NOW + 100), 0)
            }
            assert await store.take_reply(key(1)) == 1
            assert await store.take_reply(key(1)) == 2
            assert await store.take_reply(key(2)) == 0  # nothing there
            # The same Message-ID sent again: the addresses are merged, the count is kept.
            await store.record(key(1), LedgerRecord(frozenset({C}), NOW + 50), 50)
            assert await store.lookup([key(1)]) == {
                key(1): LedgerEntry(LedgerRecord(frozenset({A, B, C}), NOW + 100), 2)
            }
            assert await store.lookup([]) == {}
        finally:
            await store.close()

    run(body())


def test_expired_entries_are_not_answered_and_are_purged_a_batch_at_a_time(path: Path) -> None:
    clock = [float(NOW)]

    async def body() -> None:
        store = await SqliteLedgerStore.open(path, purge_batch=64, clock=lambda: clock[0])
        try:
            for n in range(200):
                await store.record(key(n), LedgerRecord(frozenset({A}), NOW + 10), 10)
            await store.take_reply(key(0))
            clock[0] = NOW + 10  # expiry is exclusive: at `expires` the entry is gone
            assert await store.lookup([key(0), key(1)]) == {}
            assert await store.take_reply(key(0)) == 0
            assert rows(path) == 200  # lookups never write
            await store.record(key(1000), LedgerRecord(frozenset({A}), NOW + 99), 99)
            assert rows(path, f"expires <= {NOW + 10}") == 200 - 64  # bounded work per call
            # An expired entry recorded again starts afresh: its old count is gone.
            await store.record(key(199), LedgerRecord(frozenset({B}), NOW + 99), 89)
            assert await store.lookup([key(199)]) == {
                key(199): LedgerEntry(LedgerRecord(frozenset({B}), NOW + 99), 0)
            }
        finally:
            await store.close()

    run(body())


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from gateway.policy.ledger import LedgerRecord
    from gateway.ops.ledgerstore import SqliteLedgerStore

    async def main(path, first, count):
        store = await SqliteLedgerStore.open(Path(path), busy_timeout=10.0)
        try:
            for n in range(first, first + count):
                record = LedgerRecord(frozenset({bytes([n % 256]) * 16}), 4_000_000_000)
                await store.record(n.to_bytes(32, "big"), record, 60)
                await store.take_reply((0).to_bytes(32, "big"))
                found = await store.lookup([n.to_bytes(32, "big")])
                assert len(found) == 1, found
        finally:
            await store.close()

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
    """
)


def test_two_processes_write_and_read_the_same_file(path: Path) -> None:
    async def seed() -> None:
        store = await SqliteLedgerStore.open(path)
        try:
            await store.record(key(0), LedgerRecord(frozenset({A}), 4_000_000_000), 60)
        finally:
            await store.close()

    run(seed())
    count = 150
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(first), str(count)],
            cwd=ROOT,
            stderr=subprocess.PIPE,
        )
        for first in (1, 1 + count)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()

    async def read() -> tuple[int, int]:
        store = await SqliteLedgerStore.open(path)
        try:
            found = await store.lookup([key(n) for n in range(1, 1 + 2 * count)][:64])
            return len(found), await store.take_reply(key(0))
        finally:
            await store.close()

    seen, replies = run(read())
    assert seen == 64
    assert rows(path) == 1 + 2 * count
    assert replies == 2 * count + 1  # every increment from both processes counted, none lost


LOCKER = textwrap.dedent(
    """
    import sqlite3, sys
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    sys.stdin.read()
    db.execute("ROLLBACK")
    """
)


def test_a_lock_held_too_long_is_store_unavailable_and_the_loop_keeps_running(path: Path) -> None:
    async def body() -> tuple[str, int, dict[bytes, LedgerEntry]]:
        store = await SqliteLedgerStore.open(path, busy_timeout=0.5)
        # Another process takes the write lock and keeps it until its stdin closes.
        locker = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert locker.stdin is not None and locker.stdout is not None
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        try:
            assert await asyncio.to_thread(locker.stdout.readline) == b"locked\n"
            ticks = 0
            with pytest.raises(StoreUnavailable) as caught:
                await store.record(key(1), LedgerRecord(frozenset({A}), NOW * 2), 60)
            during = ticks
            with pytest.raises(StoreUnavailable):
                await store.take_reply(key(1))
            found = dict(await store.lookup([key(1)]))  # WAL: readers do not wait for the writer
            # The lock goes away: the same store works again.
            locker.stdin.close()
            await asyncio.to_thread(locker.wait, 10)
            await store.record(key(1), LedgerRecord(frozenset({A}), NOW * 2), 60)
            assert await store.take_reply(key(1)) == 1
            return str(caught.value), during, found
        finally:
            task.cancel()
            if locker.poll() is None:
                locker.kill()
                locker.wait(10)
            locker.stdout.close()
            await store.close()

    message, ticks, found = run(body())
    assert "locked" in message and str(path) in message
    assert ticks > 0  # the event loop ran other tasks while the store waited for the lock
    assert found == {}


def test_a_removed_file_is_store_unavailable(path: Path, tmp_path: Path) -> None:
    async def body() -> None:
        store = await SqliteLedgerStore.open(path)
        try:
            await store.record(key(1), LedgerRecord(frozenset({A}), NOW * 2), 60)
            backup = tmp_path / "backup.sqlite"
            with sqlite3.connect(path) as src, sqlite3.connect(backup) as dst:
                src.backup(dst)
            for name in ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm"):
                (tmp_path / name).unlink(missing_ok=True)
            for call in (
                store.lookup([key(1)]),
                store.take_reply(key(1)),
                store.record(key(2), LedgerRecord(frozenset({A}), NOW * 2), 60),
            ):
                with pytest.raises(StoreUnavailable, match="is gone"):
                    await call
            assert not path.exists()  # an empty ledger would refuse every answer: not re-created
            os.replace(backup, path)  # put back: used again on the next call
            assert list(await store.lookup([key(1)])) == [key(1)]
        finally:
            await store.close()

    run(body())


@pytest.mark.parametrize("how", ["garbage", "directory"])
def test_a_broken_file_is_store_unavailable(path: Path, how: str) -> None:
    async def body() -> None:
        store = await SqliteLedgerStore.open(path)
        try:
            await store.record(key(1), LedgerRecord(frozenset({A}), NOW * 2), 60)
            for suffix in ("-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            if how == "garbage":
                path.unlink()
                path.write_bytes(b"not a database " * 1000)
            else:
                path.unlink()
                path.mkdir()
            for _ in range(2):  # it stays unavailable; it never raises anything else
                with pytest.raises(StoreUnavailable):
                    await store.record(key(2), LedgerRecord(frozenset({A}), NOW * 2), 60)
                with pytest.raises(StoreUnavailable):
                    await store.lookup([key(1)])
        finally:
            await store.close()

    run(body())


def test_opening_a_file_that_is_not_a_database_is_store_unavailable(path: Path) -> None:
    path.write_bytes(os.urandom(8192))
    with pytest.raises(StoreUnavailable, match="not a database"):
        run(SqliteLedgerStore.open(path))


def test_open_where_no_file_can_be_made_is_store_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="no-such-folder"):
        run(SqliteLedgerStore.open(tmp_path / "no-such-folder" / "ledger.sqlite"))


def test_a_closed_store_is_store_unavailable_and_closes_once(path: Path) -> None:
    async def body() -> None:
        store = await SqliteLedgerStore.open(path)
        await store.close()
        await store.close()
        with pytest.raises(StoreUnavailable, match="closed"):
            await store.lookup([key(1)])

    run(body())


def test_a_record_group_is_one_transaction_and_close_writes_what_was_handed_over(path: Path) -> None:
    async def body() -> None:
        store = await SqliteLedgerStore.open(path, clock=lambda: float(NOW))
        transactions: list[int] = []
        write_group = store._record_group

        def counted(group: list[tuple[bytes, LedgerRecord]]) -> None:
            transactions.append(len(group))
            write_group(group)

        store._record_group = counted  # type: ignore[method-assign]
        items = [(key(n), LedgerRecord(frozenset({A}), NOW + 100), 100) for n in range(40)]
        # The same Message-ID twice in one group (a resend): one row, both addresses.
        items.append((key(0), LedgerRecord(frozenset({B}), NOW + 100), 100))
        await store.record_group(items)
        assert transactions == [41]
        assert (await store.lookup([key(0)]))[key(0)].record.addresses == {A, B}
        # Past RECORD_BATCH a group is split: SQLite takes at most 999 "?" marks in one statement.
        record = LedgerRecord(frozenset({C}), NOW + 100)
        many = [(key(1000 + n), record, 100) for n in range(RECORD_BATCH + 10)]
        await store.record_group(many)
        assert transactions == [41, RECORD_BATCH, 10]
        # A group already handed to the store's thread when it closes is written before it closes.
        waiting = asyncio.ensure_future(store.record(key(99), LedgerRecord(frozenset({C}), NOW + 100), 100))
        await asyncio.sleep(0)
        await store.close()
        await waiting
        with pytest.raises(StoreUnavailable):
            await store.record(key(100), LedgerRecord(frozenset({C}), NOW + 100), 100)

    run(body())
    assert rows(path) == 41 + RECORD_BATCH + 10
