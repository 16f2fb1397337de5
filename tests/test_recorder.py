"""gateway/policy/recorder.py: messages queued without a task each, recorded in groups, failures named."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.ops.ledgerstore import SqliteLedgerStore
from gateway.policy.ledger import LedgerKeys, LedgerRecord, RecordOutcome
from gateway.policy.messageids import OutboundHeaders
from gateway.policy.recorder import MAX_QUEUED, NAMES_SHOWN, LedgerRecorder, Sent
from tests.smtp_peers import run

NOW = 1_800_000_000
A = b"a" * 16


KEYS = LedgerKeys(b"s" * 32)


def sent(n: int, name: str = "-", message_id: bool = True) -> Sent:
    headers = OutboundHeaders()
    block = f"From: <bob@example.com>\r\nMessage-ID: <{n}@example.com>\r\n\r\nhi\r\n"
    headers.feed((block if message_id else block.replace("Message-ID", "X-Not-It")).encode())
    return Sent(KEYS, headers, "bob@example.com", NOW, 30, name)


def key(n: int) -> bytes:
    return KEYS.message_key(f"<{n}@example.com>")


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


def test_messages_added_together_are_one_group_and_one_task(tmp_path: Path) -> None:
    outcomes: list[tuple[RecordOutcome, tuple[str, ...]]] = []

    async def body() -> None:
        store = await counted(tmp_path / "state.sqlite")
        recorder = LedgerRecorder(lambda: store, on_outcome=lambda o, names: outcomes.append((o, names)))
        tasks = len(asyncio.all_tasks())
        for n in range(100):
            recorder.add(sent(n, f"s{n}", message_id=n != 7))
        # One writer for the lot: no task, future or wait per record.
        assert len(asyncio.all_tasks()) == tasks + 1
        assert recorder.queued == 100
        await recorder.written()
        assert store.groups == [99]  # the one without a Message-ID is not ledgered
        assert recorder.queued == 0
        entries = await store.lookup([key(n) for n in range(50)])
        assert len(entries) == 49
        assert entries[key(0)].record == LedgerRecord(
            frozenset({KEYS.address_key("bob@example.com")}), NOW + 30 * 86400
        )
        # A message added after the writer finished starts the next one.
        recorder.add(sent(100, "s100"))
        await recorder.written()
        assert store.groups == [99, 1]
        await store.close()

    run(body())
    names = tuple(f"s{n}" for n in range(100) if n != 7)
    assert outcomes == [
        (RecordOutcome.RECORDED, names),
        (RecordOutcome.NO_MESSAGE_ID, ("s7",)),
        (RecordOutcome.RECORDED, ("s100",)),
    ]


def test_a_long_queue_is_written_in_groups_of_batch(tmp_path: Path) -> None:
    async def body() -> None:
        store = await counted(tmp_path / "state.sqlite")
        recorder = LedgerRecorder(lambda: store, delay=0, batch=30)
        for n in range(70):
            recorder.add(sent(n))
        await recorder.written()
        assert store.groups == [30, 30, 10]
        await store.close()

    run(body())


def test_a_group_the_store_cannot_take_is_one_line_naming_its_sessions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.sqlite"
    outcomes: list[tuple[RecordOutcome, int]] = []

    async def body() -> None:
        store = await SqliteLedgerStore.open(path, clock=lambda: float(NOW))
        recorder = LedgerRecorder(lambda: store, on_outcome=lambda o, names: outcomes.append((o, len(names))))
        path.unlink()  # the file is gone: StoreUnavailable, never re-created
        for n in range(NAMES_SHOWN + 2):
            recorder.add(sent(n, f"s{n}"))
        with caplog.at_level(logging.WARNING, "gateway.ledger"):
            await recorder.written()
        await store.close()

    run(body())
    assert outcomes == [(RecordOutcome.STORE_UNAVAILABLE, NAMES_SHOWN + 2)]
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
    outcomes: list[tuple[RecordOutcome, tuple[str, ...]]] = []

    class Broken(SqliteLedgerStore):
        async def record_group(self, items: Sequence[tuple[bytes, LedgerRecord, int]]) -> None:
            raise RuntimeError("a bug, not an outage")

    async def body() -> None:
        stores: list[SqliteLedgerStore | None] = [None]
        recorder = LedgerRecorder(
            lambda: stores[0], "queue ids", lambda o, names: outcomes.append((o, names))
        )
        recorder.add(sent(1, "4ABC"))
        await recorder.written()
        broken = await Broken.open(tmp_path / "broken.sqlite")
        stores[0] = broken
        recorder.add(sent(2, "4DEF"))
        with caplog.at_level(logging.WARNING, "gateway.ledger"):
            await recorder.written()
        await broken.close()
        good = await SqliteLedgerStore.open(tmp_path / "good.sqlite", clock=lambda: float(NOW))
        stores[0] = good
        recorder.add(sent(3, "4GHI"))
        await recorder.written()
        assert list(await good.lookup([key(3)])) == [key(3)]
        await good.close()

    run(body())
    unavailable, recorded = RecordOutcome.STORE_UNAVAILABLE, RecordOutcome.RECORDED
    assert outcomes == [(unavailable, ("4ABC",)), (unavailable, ("4DEF",)), (recorded, ("4GHI",))]
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.ledger"]
    assert "the ledger store failed" in lines
    assert any("(queue ids 4DEF)" in line and "RuntimeError" in line for line in lines)


def test_a_full_queue_turns_messages_away_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outcomes: list[tuple[RecordOutcome, tuple[str, ...]]] = []

    async def body() -> None:
        store = await counted(tmp_path / "state.sqlite")
        recorder = LedgerRecorder(lambda: store, on_outcome=lambda o, names: outcomes.append((o, names)))
        one = sent(1)
        with caplog.at_level(logging.WARNING, "gateway.ledger"):
            for _ in range(MAX_QUEUED):
                recorder.add(one)
            recorder.add(sent(2, "s-late"))
            recorder.add(sent(3, "s-later"))
        assert recorder.queued == MAX_QUEUED
        await recorder.written()
        assert sum(store.groups) == MAX_QUEUED
        await store.close()

    run(body())
    assert outcomes[:2] == [
        (RecordOutcome.STORE_UNAVAILABLE, ("s-late",)),
        (RecordOutcome.STORE_UNAVAILABLE, ("s-later",)),
    ]
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.ledger"]
    assert len(lines) == 1 and "queue is full" in lines[0] and "s-late" in lines[0]
