"""A deadline that moves on every command and almost never expires, kept with one timer.

The edge's idle timeout (smtpd.py) and the next-hop reply timeout (nexthop.py) are re-armed several times
per message. A fresh TimerHandle (or an `asyncio.timeout()`) each time cost more than the rest of reading a
command (bench/README.md, "Session 2"). Here the deadline is a number that is moved; the one timer is set
again only when it fires early (the deadline moved on, or nobody waits now: then it lapses), or brought
forward when a new deadline is earlier than the time it is set for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    """`set(seconds)` before a wait, `clear()` after it; `on_expiry` runs if a wait outlasts its deadline."""

    __slots__ = ("_at", "_loop", "_on_expiry", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expiry: Callable[[], None]) -> None:
        self._loop = loop
        self._on_expiry = on_expiry
        self._at: float | None = None  # loop time; None while nobody waits
        self._timer: asyncio.TimerHandle | None = None

    def set(self, seconds: float) -> None:
        self._at = at = self._loop.time() + seconds
        timer = self._timer
        if timer is None or timer.when() > at:  # none set, or set for later than this deadline
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(at, self._check)

    def clear(self) -> None:
        self._at = None

    def cancel(self) -> None:
        """For good (the connection is gone): no timer is left behind."""
        self._at = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        at = self._at
        if at is None:
            return  # nobody waits now; the next set() sets the timer again
        if self._loop.time() < at:
            self._timer = self._loop.call_at(at, self._check)
            return
        self._at = None
        self._on_expiry()
