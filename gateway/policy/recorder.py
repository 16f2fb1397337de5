"""Ledger records on their way to the store, made and written behind the mail in groups.

The outbound role records every message it relays and must not hold the client's reply for it: an
answer to that message comes seconds later at the soonest. So `add` only queues what was read of the
message (`Sent`: its header block, unparsed, and the envelope sender), with no task, future or wait of
its own. One task per recorder then takes the queue in groups: a message waits up to `delay` for others,
at most `batch` go together; it makes each record (ledger.make_record: the header block parsed, the
HMACs) in one loop, and hands the group to the store (`LedgerStore.record_group`: for SQLite one
transaction and one thread hop). Parsing and hashing a group in one loop costs less than half of doing it
message by message between the sessions' other work (measured in the outbound role, 19 against 46 µs a
message: the code and data stay in the CPU's caches), and that was most of what the ledger cost the
outbound role's 1 KiB rate (bench/smtp.py --ledger, docs/ledger.md).

A group the store cannot take is lost, logged (naming the sessions or queue ids) and counted, never
retried: the client's message went through, and an answer to it will be refused later (as for a message
sent while the ledger was off), nothing worse. Both front ends that record use it: the relay
(gateway/edge/relay.py) and the milter (gateway/postfix/milterledger.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import NamedTuple

from .ledger import LedgerKeys, LedgerRecord, LedgerStore, RecordOutcome, StoreUnavailable, make_record
from .messageids import OutboundHeaders

log = logging.getLogger("gateway.ledger")

COMMIT_DELAY = 0.25  # seconds a message waits for others to share its group
RECORD_BATCH = 1000  # messages in one group at most (one SQLite transaction)

NAMES_SHOWN = 10  # sessions or queue ids named in the line for a group the store could not take
# Messages queued at most: a store that stalls (its lock held, Redis away) must not make the queue, and
# the header blocks it holds, grow without bound. Past it a message is not recorded (counted, logged).
MAX_QUEUED = 2 * RECORD_BATCH


class Sent(NamedTuple):
    """A relayed message as queued for the ledger; its record is made when its group is written."""

    keys: LedgerKeys
    headers: OutboundHeaders  # fed with the message's header block
    sender: str | None  # the envelope sender as the client gave it (unsigned); None for <>
    now: int  # unix seconds when it was relayed
    days: int
    name: str  # what the log names it by: a session or a queue id


# (an outcome, the names of the messages that had it): once per outcome a group had, for the metrics
# (and the milter's "not ledgered" lines)
OnOutcome = Callable[[RecordOutcome, tuple[str, ...]], None]


class LedgerRecorder:
    """Queue records for a store (`store_of()` at write time: None when it is closed) and write them in
    groups; `written()` waits for all queued so far, as a stop must before it closes the store."""

    def __init__(
        self,
        store_of: Callable[[], LedgerStore | None],
        names: str = "sessions",
        on_outcome: OnOutcome | None = None,
        delay: float = COMMIT_DELAY,
        batch: int = RECORD_BATCH,
    ) -> None:
        self.store_of = store_of
        self.names = names  # what the names of `Sent` are, for the log line
        self.on_outcome = on_outcome
        self.delay = delay
        self.batch = batch
        self._queue: list[Sent] = []
        self._writer: asyncio.Task[None] | None = None
        self._overflow = 0  # messages turned away since the queue was last full

    def add(self, sent: Sent) -> None:
        if len(self._queue) >= MAX_QUEUED:
            if not self._overflow:
                log.warning(
                    "the ledger's queue is full (%d messages; the store is slow or away): "
                    "messages are relayed without a record (%s %s, ...)",
                    MAX_QUEUED,
                    self.names,
                    sent.name,
                )
            self._overflow += 1
            self._report(RecordOutcome.STORE_UNAVAILABLE, [sent.name])
            return
        self._overflow = 0
        self._queue.append(sent)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def written(self) -> None:
        while self._writer is not None:
            await asyncio.shield(self._writer)

    async def _write(self) -> None:
        try:
            while self._queue:
                if len(self._queue) < self.batch and self.delay > 0:
                    await asyncio.sleep(self.delay)
                group, self._queue = self._queue[: self.batch], self._queue[self.batch :]
                await self._write_group(group)
        finally:
            self._writer = None

    async def _write_group(self, group: list[Sent]) -> None:
        items: list[tuple[bytes, LedgerRecord, int]] = []
        recorded: list[str] = []
        other: dict[RecordOutcome, list[str]] = {}
        for sent in group:
            recording = make_record(sent.keys, sent.headers.result(), sent.sender, sent.now, sent.days)
            if recording.outcome is RecordOutcome.RECORDED and recording.key and recording.record:
                items.append((recording.key, recording.record, recording.ttl))
                recorded.append(sent.name)
            else:
                other.setdefault(recording.outcome, []).append(sent.name)
        if items:
            failure: StoreUnavailable | None = None
            try:
                store = self.store_of()
                if store is None:
                    raise StoreUnavailable("the ledger store is closed")
                await store.record_group(items)
            except StoreUnavailable as error:
                failure = error
            except Exception as error:  # the contract is StoreUnavailable; a bug must not end the writer
                log.exception("the ledger store failed")
                failure = StoreUnavailable(f"the ledger store failed: {type(error).__name__}")
            if failure is None:
                self._report(RecordOutcome.RECORDED, recorded)
            else:
                more = " ..." if len(recorded) > NAMES_SHOWN else ""
                log.warning(
                    "%d messages not recorded in the ledger (%s %s%s): %s",
                    len(recorded),
                    self.names,
                    " ".join(recorded[:NAMES_SHOWN]),
                    more,
                    failure,
                )
                self._report(RecordOutcome.STORE_UNAVAILABLE, recorded)
        for outcome, names in other.items():
            self._report(outcome, names)

    def _report(self, outcome: RecordOutcome, names: list[str]) -> None:
        if self.on_outcome is not None:
            try:
                self.on_outcome(outcome, tuple(names))
            except Exception:  # watching the mail must never stop the mail
                log.exception("the ledger's outcome report failed")
