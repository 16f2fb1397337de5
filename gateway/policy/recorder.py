"""Ledger records on their way to the store, written behind the mail in groups.

The outbound role makes a record for every message it relays (ledger.make_record) and must not hold the
client's reply for its write: an answer to that message comes seconds later at the soonest. So `add`
only queues the record, with no task, future or wait of its own, and one task per recorder hands the
queue to the store in groups (`LedgerStore.record_group`): a record waits up to `delay` for others, at
most `batch` go together. Per message that is a list append; per group, one store call (for SQLite one
transaction and one thread hop). A task and a future per message cost the outbound role about 3% of its
1 KiB rate on their own (bench/smtp.py --ledger, docs/ledger.md).

A group the store cannot take is lost, logged (naming the sessions or queue ids) and counted by
`on_written`, never retried: the client's
message went through, and an answer to it will be refused later (as for a message sent while the ledger
was off), nothing worse. Both front ends that record use it: the relay (gateway/edge/relay.py) and the
milter (gateway/postfix/milterledger.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .ledger import LedgerRecord, LedgerStore, StoreUnavailable

log = logging.getLogger("gateway.ledger")

COMMIT_DELAY = 0.1  # seconds a record waits for others to share its group
RECORD_BATCH = 250  # records in one group at most (one SQLite transaction: under its 999 "?" marks)

NAMES_SHOWN = 10  # sessions or queue ids named in the line for a group the store could not take

# (key, record, ttl, what the log names it by: a session or a queue id)
Pending = tuple[bytes, LedgerRecord, int, str]
# (how many records, whether the store took them): the metrics
OnWritten = Callable[[int, bool], None]


class LedgerRecorder:
    """Queue records for a store (`store_of()` at write time: None when it is closed) and write them in
    groups; `written()` waits for all queued so far, as a stop must before it closes the store."""

    def __init__(
        self,
        store_of: Callable[[], LedgerStore | None],
        names: str = "sessions",
        on_written: OnWritten | None = None,
        delay: float = COMMIT_DELAY,
        batch: int = RECORD_BATCH,
    ) -> None:
        self.store_of = store_of
        self.names = names  # what the names given to `add` are, for the log line
        self.on_written = on_written
        self.delay = delay
        self.batch = batch
        self._queue: list[Pending] = []
        self._writer: asyncio.Task[None] | None = None

    def add(self, key: bytes, record: LedgerRecord, ttl: int, name: str = "-") -> None:
        self._queue.append((key, record, ttl, name))
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
                failure: StoreUnavailable | None = None
                try:
                    store = self.store_of()
                    if store is None:
                        raise StoreUnavailable("the ledger store is closed")
                    await store.record_group([(key, record, ttl) for key, record, ttl, _ in group])
                except StoreUnavailable as error:
                    failure = error
                except Exception as error:  # the contract is StoreUnavailable; a bug must not end the writer
                    log.exception("the ledger store failed")
                    failure = StoreUnavailable(f"the ledger store failed: {type(error).__name__}")
                self._report(group, failure)
        finally:
            self._writer = None

    def _report(self, group: list[Pending], failure: StoreUnavailable | None) -> None:
        if failure is not None:
            names = " ".join(name for *_, name in group[:NAMES_SHOWN])
            more = " ..." if len(group) > NAMES_SHOWN else ""
            log.warning(
                "%d messages not recorded in the ledger (%s %s%s): %s",
                len(group),
                self.names,
                names,
                more,
                failure,
            )
        if self.on_written is not None:
            try:
                self.on_written(len(group), failure is None)
            except Exception:  # watching the mail must never stop the mail
                log.exception("the ledger's write report failed")
