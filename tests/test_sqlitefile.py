"""sqlitefile: opening the one SQLite file that every worker of a host opens at the same moment. The
stores on it (their errors, the file removed or replaced, closing) are tested through them:
test_ledgerstore.py and test_guessbudget.py."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from gateway.policy.sqlitefile import sqlite_setup


def test_set_up_waits_out_a_lock_that_answers_at_once(tmp_path: Path) -> None:
    """Every worker opens the one [state] file at once; a set-up statement can meet "database is locked"
    without the busy handler waiting (timeout 0 here makes every lock answer at once): it is retried."""
    path = tmp_path / "state.sqlite"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.3, lambda: holder.execute("COMMIT")).start()
    db = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            db.execute("CREATE TABLE first (x)")  # what set-up met before it retried
        sqlite_setup(db, ("CREATE TABLE IF NOT EXISTS t (x)",), deadline=5)
        assert db.execute("SELECT count(*) FROM t").fetchone() == (0,)
    finally:
        db.close()
        holder.close()
