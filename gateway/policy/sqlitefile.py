"""One SQLite file that several processes share, used from one thread of its own: the plumbing of the
ledger's store (ops/ledgerstore.py) and the SQLite rate budget (guessbudget.py).

The blocking calls run on the store's one thread (so its connection is only ever used from it) and the
event loop only awaits them: a lock wait or an fsync never stalls other sessions. Any SQLite or OS error
is StoreUnavailable, and the connection is dropped: one that failed mid-transaction may be left inside
it, so the next call starts afresh.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from .ledger import StoreUnavailable

T = TypeVar("T")

SETUP_RETRY_SECONDS = 10.0  # how long opening a shared SQLite file may retry a lock (see `sqlite_setup`)


def sqlite_setup(
    db: sqlite3.Connection, statements: Sequence[str], deadline: float = SETUP_RETRY_SECONDS
) -> None:
    """Run a connection's set-up statements (PRAGMA journal_mode=WAL, the schema) on a file that other
    processes open at the same moment: every worker of a host starts at once on the one [state] file. The
    switch to WAL and the first schema write can answer "database is locked" at once, without waiting in
    the busy handler, while another process does the same; so the set-up is retried, briefly and bounded,
    before it counts as the store being unavailable. Each statement is idempotent."""
    give_up = time.monotonic() + deadline
    pause = 0.01
    while True:
        try:
            for statement in statements:
                db.execute(statement)
            return
        except sqlite3.OperationalError as error:
            if ("locked" not in str(error) and "busy" not in str(error)) or time.monotonic() > give_up:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


class SqliteFile:
    """A store on the SQLite file at `path`, with its own thread. A subclass names itself in errors
    (`store_name`), says what happens before each call (`_before_call`) and sets up each new connection
    (`_setup`)."""

    store_name = "sqlite store"  # "<store_name> <path>: <error>" in every StoreUnavailable
    thread_name = "sqlite"

    def __init__(self, path: Path, busy_timeout: float) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._db: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we opened
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.thread_name)
        self._closed = False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # One thread, first in first out: a write already handed to it is committed before this.
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close)
        finally:
            self._executor.shutdown(wait=True)

    # --- on the store's thread -----------------------------------------------------------------------
    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise StoreUnavailable(f"{self.store_name} {self.path} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._guarded, fn, args)

    def _guarded(self, fn: Callable[..., T], args: tuple[object, ...]) -> T:
        try:
            self._before_call(fn)
            return fn(*args)
        except (sqlite3.Error, OSError) as error:
            # A connection that failed mid-transaction may be left inside it: start afresh next time.
            self._close()
            raise StoreUnavailable(f"{self.store_name} {self.path}: {error}") from None

    def _before_call(self, fn: Callable[..., object]) -> None:
        """What the subclass does on the thread before each call `fn`: connect, or check the file."""
        raise NotImplementedError

    def _setup(self, db: sqlite3.Connection) -> None:
        """A new connection's pragmas (and schema): the subclass's."""
        raise NotImplementedError

    def _connect(self, create: bool = False) -> sqlite3.Connection:
        """A new connection to the file (made first, mode 0600, if `create`), set up by `_setup`."""
        self._close()
        if create:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
        stat = os.stat(self.path)
        uri = "file:" + urllib.parse.quote(str(self.path.absolute())) + "?mode=rw"
        db = sqlite3.connect(
            uri, uri=True, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._setup(db)
        except BaseException:
            db.close()
            raise
        self._db = db
        self._identity = (stat.st_dev, stat.st_ino)
        return db

    def _check_file(self) -> None:
        """SQLite keeps writing to a file that was removed: notice it, and a file put in its place."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self._close()
            raise StoreUnavailable(f"{self.store_name} {self.path} is gone") from None
        if self._db is None or self._identity != (stat.st_dev, stat.st_ino):
            self._connect()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreUnavailable(f"{self.store_name} {self.path} is not open")
        return self._db

    def _close(self) -> None:
        db, self._db, self._identity = self._db, None, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                pass
