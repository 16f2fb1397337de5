"""gateway/policy/recorder.py: records queued without a task each, written in groups, failures named."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.ops.ledgerstore import SqliteLedgerStore
from gateway.policy.ledger import LedgerRecord
from gateway.policy.recorder import NAMES_SHOWN, LedgerRecorder
from tests.smtp_peers import run

NOW = 1_800_000_000
A = b"a" * 16


def key(n: int) -> bytes:
    return n.to_bytes(32, "big")


def record() -> LedgerRecord:
    return LedgerRecord(frozenset({A}), NOW + 100)


class Counted(SqliteLedgerStore):
    """The real store, counting the groups it is handed."""

    groups: list[int]

    async def record_group(self, items: Sequence[tuple[bytes, LedgerRecord, int]]) -> None:
        self.groups.append(len(items))
        await super().record_group(items)


async def counted(path: Path) -> Counted:
    store = await Counted.open(path, clock=lambda: float(NOW))
    assert isinstance(store, Counted)
    store.groups = []
    return store


def test_records_added_together_are_one_group_and_one_task(tmp_path: Path) -> None:
    written: list[tuple[int, bool]] = []

    async def body() -> None:
        store = await counted(tmp_path / "state.sqlite")
        recorder = LedgerRecorder(lambda: store, on_written=lambda n, ok: written.append((n, ok)))
        tasks = len(asyncio.all_tasks())
        for n in range(100):
            recorder.add(key(n), record(), 100, f"s{n}")
        # One writer for the lot: no task, future or wait per record.
        assert len(asyncio.all_tasks()) == tasks + 1
        assert recorder.queued == 100
        await recorder.written()
        assert store.groups == [100]
        assert recorder.queued == 0
        assert len(await store.lookup([key(n) for n in range(50)])) == 50
        # A record added after the writer finished starts the next one.
        recorder.add(key(100), record(), 100)
        await recorder.written()
        assert store.groups == [100, 1]
        await store.close()

    run(body())
    assert written == [(100, True), (1, True)]


def test_a_long_queue_is_written_in_groups_of_batch(tmp_path: Path) -> None:
    async def body() -> None:
        store = await counted(tmp_path / "state.sqlite")
        recorder = LedgerRecorder(lambda: store, delay=0, batch=30)
        for n in range(70):
            recorder.add(key(n), record(), 100)
        await recorder.written()
        assert store.groups == [30, 30, 10]
        await store.close()

    run(body())


def test_a_group_the_store_cannot_take_is_one_line_naming_its_sessions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.sqlite"
    written: list[tuple[int, bool]] = []

    async def body() -> None:
        store = await SqliteLedgerStore.open(path, clock=lambda: float(NOW))
        recorder = LedgerRecorder(lambda: store, on_written=lambda n, ok: written.append((n, ok)))
        path.unlink()  # the file is gone: StoreUnavailable, never re-created
        for n in range(NAMES_SHOWN + 2):
            recorder.add(key(n), record(), 100, f"s{n}")
        with caplog.at_level(logging.WARNING, "gateway.ledger"):
            await recorder.written()
        await store.close()

    run(body())
    assert written == [(NAMES_SHOWN + 2, False)]
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.ledger"]
    assert len(lines) == 1
    shown = " ".join(f"s{n}" for n in range(NAMES_SHOWN))
    assert lines[0].startswith(
        f"{NAMES_SHOWN + 2} messages not recorded in the ledger (sessions {shown} ...): "
    )
    assert "is gone" in lines[0]


def test_a_closed_store_and_a_broken_one_lose_the_group_not_the_writer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    written: list[tuple[int, bool]] = []

    class Broken(SqliteLedgerStore):
        async def record_group(self, items: Sequence[tuple[bytes, LedgerRecord, int]]) -> None:
            raise RuntimeError("a bug, not an outage")

    async def body() -> None:
        stores: list[SqliteLedgerStore | None] = [None]
        recorder = LedgerRecorder(lambda: stores[0], "queue ids", lambda n, ok: written.append((n, ok)))
        recorder.add(key(1), record(), 100, "4ABC")
        await recorder.written()
        broken = await Broken.open(tmp_path / "broken.sqlite")
        stores[0] = broken
        recorder.add(key(2), record(), 100, "4DEF")
        with caplog.at_level(logging.WARNING, "gateway.ledger"):
            await recorder.written()
        await broken.close()
        good = await SqliteLedgerStore.open(tmp_path / "good.sqlite", clock=lambda: float(NOW))
        stores[0] = good
        recorder.add(key(3), record(), 100, "4GHI")
        await recorder.written()
        assert list(await good.lookup([key(3)])) == [key(3)]
        await good.close()

    run(body())
    assert written == [(1, False), (1, False), (1, True)]
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.ledger"]
    assert "the ledger store failed" in lines
    assert any("(queue ids 4DEF)" in line and "RuntimeError" in line for line in lines)
