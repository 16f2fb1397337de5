"""Suite-wide: the `log_stream` and `redis_server` fixtures, and a report of how many recorded interop
cases ran, by file.

tests/test_vectors.py runs one test per case id (`prvs-exim-0001`, `srs-postsrsd-0042`, ...). The count
is printed at the end of every run, so a CI log shows that every case of every vector file was run.
"""

from __future__ import annotations

import io
import logging
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.core import logs
from tests.redis_server import RedisServer, running_redis


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The gateway's logging set up in logfmt into a string; reset afterwards (no handler, NOTSET)."""
    stream = io.StringIO()
    logs.setup(logs.LogFormat.LOGFMT, stream=stream)
    yield stream
    logger = logging.getLogger("gateway")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a unix socket of its own, killed at teardown (tests/redis_server.py)."""
    yield from running_redis()


_CASE = re.compile(r"tests/test_vectors\.py::\w+\[((?:prvs|srs)-[a-z-]+?)-\d+\]$")
_passed: Counter[str] = Counter()
_failed: Counter[str] = Counter()


def pytest_runtest_logreport(report: Any) -> None:
    if report.when != "call":
        return
    found = _CASE.search(report.nodeid)
    if found:
        (_passed if report.passed else _failed)[found.group(1)] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _passed and not _failed:
        return
    files = sorted(set(_passed) | set(_failed))
    parts = [
        f"{name}.jsonl {_passed[name]} passed" + (f", {_failed[name]} failed" if _failed[name] else "")
        for name in files
    ]
    total = sum(_passed.values()) + sum(_failed.values())
    terminalreporter.write_line(f"interop vector cases run: {total} ({'; '.join(parts)})")
