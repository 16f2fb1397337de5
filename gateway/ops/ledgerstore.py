"""The ledger's embedded store: one SQLite file (WAL) shared by both roles and every worker on the host.

Several processes open the same file: SQLite's own locks order them, WAL lets a lookup read while another
process writes, and each call is one short transaction (`busy_timeout` bounds the wait for a writer's
lock). The blocking calls run on one thread per store (so the connection is only ever used from it) and
the event loop only awaits them: a lock wait or an fsync never stalls other sessions. docs/ledger.md has
the measured costs.

Expiry is lazy: a lookup leaves expired rows out, and each write transaction deletes at most
`purge_batch` of them (bounded work per call; the index on `expires` finds them without a scan).

Records come in groups (`record_group`: gateway/policy/recorder.py gathers them behind the mail), and a
group is one transaction and one thread hop: one per message cost about a third of the outbound role's
1 KiB rate (bench/smtp.py --ledger).

Every failure is StoreUnavailable, which the decision turns into 451 4.3.0: a lock held past
`busy_timeout`, a disk or format error, and the file removed or replaced under us. A file that is gone is
not re-created (an empty ledger would refuse, with a 5xx, every answer to what we sent before); a file put
back at the path (restored, replaced) is opened again on the next call.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import ConfigError
from ..policy.ledger import (
    LedgerEntry,
    LedgerRecord,
    LedgerStore,
    StoreUnavailable,
    pack_address_keys,
    unpack_address_keys,
)
from ..policy.sqlitefile import SqliteFile, sqlite_setup

if TYPE_CHECKING:
    from .config import Config

BUSY_TIMEOUT = 1.0  # seconds a call waits for another process's write lock
PURGE_BATCH = 64  # expired rows deleted per record() at most
MAX_LOOKUP = 64  # keys per lookup (the inbound scan yields at most 32)
RECORD_BATCH = 1000  # records committed in one transaction at most
# Statements stay under SQLite's oldest limit of 999 "?" marks (SQLITE_MAX_VARIABLE_NUMBER before 3.32).
_INSERT_ROWS = 200  # rows per INSERT statement: 4 "?" marks a row
_SELECT_KEYS = 500  # keys per SELECT

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS ledger ("
    " key BLOB PRIMARY KEY,"  # LedgerKeys.message_key: HMAC-SHA256, never a Message-ID
    " addresses BLOB NOT NULL,"  # the sorted LedgerKeys.address_key values, concatenated
    " expires INTEGER NOT NULL,"  # unix seconds
    " replies INTEGER NOT NULL DEFAULT 0"
    ") WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS ledger_expires ON ledger (expires)",
)


class SqliteLedgerStore(SqliteFile):
    """`LedgerStore` on a SQLite file. Create it with `open` (makes the file, mode 0600, and the schema)."""

    store_name = "ledger store"
    thread_name = "ledger-sqlite"

    def __init__(
        self,
        path: Path,
        busy_timeout: float = BUSY_TIMEOUT,
        purge_batch: int = PURGE_BATCH,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(path, busy_timeout)
        self.purge_batch = purge_batch
        self.clock = clock

    @classmethod
    async def open(
        cls,
        path: Path,
        busy_timeout: float = BUSY_TIMEOUT,
        purge_batch: int = PURGE_BATCH,
        clock: Callable[[], float] = time.time,
    ) -> SqliteLedgerStore:
        store = cls(path, busy_timeout, purge_batch, clock)
        try:
            await store._run(store._create)
        except StoreUnavailable:
            await store.close()
            raise
        return store

    # --- the LedgerStore interface -------------------------------------------------------------------
    async def record(self, key: bytes, record: LedgerRecord, ttl: int) -> None:
        await self.record_group(((key, record, ttl),))

    async def record_group(self, items: Sequence[tuple[bytes, LedgerRecord, int]]) -> None:
        # SQLite keeps record.expires; the ttl is for stores that expire keys themselves (Redis).
        for start in range(0, len(items), RECORD_BATCH):
            part = [(key, record) for key, record, _ in items[start : start + RECORD_BATCH]]
            await self._run(self._record_group, part)

    async def lookup(self, keys: Sequence[bytes]) -> Mapping[bytes, LedgerEntry]:
        if not keys:
            return {}
        return await self._run(self._lookup, tuple(keys[:MAX_LOOKUP]))

    async def take_reply(self, key: bytes) -> int:
        return await self._run(self._take_reply, key)

    # --- on the store's thread -----------------------------------------------------------------------
    def _before_call(self, fn: Callable[..., object]) -> None:
        if fn != self._create:
            self._check_file()

    def _create(self) -> None:
        self._connect(create=True)
        sqlite_setup(self._conn(), _SCHEMA)

    def _setup(self, db: sqlite3.Connection) -> None:
        # WAL: readers never wait for the writer; NORMAL: a crash of the host may lose the last
        # records (an answer to them is then refused), never corrupt the file.
        sqlite_setup(db, ("PRAGMA journal_mode=WAL",))
        mode = db.execute("PRAGMA journal_mode").fetchone()
        if not mode or str(mode[0]).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot use WAL (journal_mode is {mode})")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")

    def _record_group(self, group: list[tuple[bytes, LedgerRecord]]) -> None:
        db = self._conn()
        now = int(self.clock())
        merged: dict[bytes, LedgerRecord] = {}
        for key, record in group:  # the same Message-ID twice in one group (a resend): one row
            merged[key] = merged[key].merge(record) if key in merged else record
        db.execute("BEGIN IMMEDIATE")
        try:
            # A new Message-ID is the rule: those rows are written in one statement; a key already there
            # (another transaction of the same message) is merged with what it holds.
            keys = tuple(merged)
            found = {}
            for start in range(0, len(keys), _SELECT_KEYS):
                asked = keys[start : start + _SELECT_KEYS]
                marks = ",".join("?" * len(asked))
                for row in db.execute(
                    f"SELECT key, addresses, expires, replies FROM ledger WHERE key IN ({marks})",  # noqa: S608 (only "?" marks)
                    asked,
                ):
                    found[row[0]] = row[1:]
            rows = []
            for key, record in merged.items():
                replies = 0
                old = found.get(key)
                if old is not None and old[1] > now:
                    record = record.merge(LedgerRecord(unpack_address_keys(old[0]), old[1]))
                    replies = old[2]
                rows.append((key, pack_address_keys(record.addresses), record.expires, replies))
            # One statement for many rows, not executemany: each step releases and retakes the GIL.
            for start in range(0, len(rows), _INSERT_ROWS):
                part = rows[start : start + _INSERT_ROWS]
                db.execute(
                    "INSERT OR REPLACE INTO ledger (key, addresses, expires, replies) VALUES "  # noqa: S608 (only "?" marks)
                    + ",".join(("(?,?,?,?)",) * len(part)),
                    tuple(value for row in part for value in row),
                )
            db.execute(
                "DELETE FROM ledger WHERE key IN "
                "(SELECT key FROM ledger WHERE expires <= ? ORDER BY expires LIMIT ?)",
                (now, self.purge_batch),
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _lookup(self, keys: tuple[bytes, ...]) -> dict[bytes, LedgerEntry]:
        marks = ",".join("?" * len(keys))
        rows = (
            self._conn()
            .execute(
                f"SELECT key, addresses, expires, replies FROM ledger WHERE key IN ({marks}) AND expires > ?",  # noqa: S608 (only "?" marks)
                (*keys, int(self.clock())),
            )
            .fetchall()
        )
        return {
            row[0]: LedgerEntry(LedgerRecord(unpack_address_keys(row[1]), row[2]), row[3]) for row in rows
        }

    def _take_reply(self, key: bytes) -> int:
        row = (
            self._conn()
            .execute(
                "UPDATE ledger SET replies = replies + 1 WHERE key = ? AND expires > ? RETURNING replies",
                (key, int(self.clock())),
            )
            .fetchone()
        )
        return int(row[0]) if row else 0


def _is_a_ledger_store(store: SqliteLedgerStore) -> LedgerStore:
    return store  # mypy checks here that the class keeps to the protocol


async def open_store(config: Config) -> LedgerStore:
    """The ledger's store for `config`: the one place serve picks one (the SQLite file by default, at
    `config.ledger_path`). A store that cannot be opened stops start-up with a line naming the file."""
    path = config.ledger_path
    try:
        return await SqliteLedgerStore.open(path)
    except StoreUnavailable as error:
        raise ConfigError(
            f"[ledger] path: cannot open the ledger at {path} ({error}); the gateway's user must be able to "
            "write that folder (the systemd unit's StateDirectory=), or set [ledger] enabled = false"
        ) from None
