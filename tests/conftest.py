"""Suite-wide reporting: how many recorded interop cases ran, by the file they came from.

tests/test_vectors.py runs one test per case id (`prvs-exim-0001`, `srs-postsrsd-0042`, ...). The count
is printed at the end of every run, so a CI log shows that every case of every vector file was run.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

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
