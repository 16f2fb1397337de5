"""The session limits (`max_sessions`, `max_sessions_per_client`) held across the workers of one host.

With `[gateway] workers = N` the kernel spreads one client's connections over every worker, so a count
kept in each worker would let a client hold N times its limit. Sessions are connections to this host, so
the count is this host's alone: a table in shared memory that the main process makes before it forks the
workers (cli_serve.py), rather than the [state] store (a file or a network round trip on every connection).

The table: for each listener and each worker slot, the slot's open sessions and, in `buckets` counters, its
open sessions per client IP hashed into a bucket. A worker writes only its own slot; admitting sums the
slots. So a worker that dies (SIGKILL: it cleans nothing up) leaves its counts in its slot alone, and the
main process zeroes that slot once the worker is reaped, before the replacement (which takes the same slot)
starts (workers.supervise's `clear_slot`): no count leaks.

What holds: admit reads the sums and counts itself in under an fcntl lock on the table (a POSIX record lock:
the kernel drops it when its holder dies, so a worker killed inside admit blocks nobody), so two workers
cannot both take the last place: per listener, never more than `max_sessions` sessions on this host, and
never more than `max_sessions_per_client` in one bucket. A bucket is exact for a client that has it alone;
clients whose IPs share a bucket share its limit, so a client can be refused early (never admitted beyond
its limit). `bucket_count` makes at least 64 buckets per session a listener may hold, so at any moment a
given client shares its bucket with another open client with a chance under 1 in 64, and is refused early
only if the two together reach the limit. The hash is Python's (SipHash, keyed at random per start and
inherited by every worker through the fork), so a client cannot pick its IPs to land in another's bucket.
Leave needs no lock: a slot has one writer, and a reader that sees the count before its decrement is only
more careful.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass

from ..core import replies
from ..core.replies import Reply

_COUNTER = 4  # bytes: an unsigned 32-bit count ("I"), aligned, so a store is never seen half done
MIN_BUCKETS = 4096
MAX_BUCKETS = 1 << 20
BUCKETS_PER_SESSION = 64
_UNLIMITED_BUCKETS = 1 << 16  # max_sessions = 0: as many buckets as 1024 sessions would be given


@dataclass(frozen=True)
class ListenerLimits:
    """One listener's limits (0: not limited), as the table counts them."""

    max_sessions: int
    max_per_client: int


def bucket_count(limits: Sequence[ListenerLimits]) -> int:
    """A power of two at least BUCKETS_PER_SESSION times the most sessions any listener may hold."""
    most = max((lim.max_sessions for lim in limits), default=0)
    if any(lim.max_sessions == 0 for lim in limits):
        return _UNLIMITED_BUCKETS
    wanted = max(MIN_BUCKETS, most * BUCKETS_PER_SESSION)
    return min(MAX_BUCKETS, 1 << (wanted - 1).bit_length())


class SessionTable:
    """Made by the main process before the fork; each worker takes `gates(slot)`."""

    def __init__(self, workers: int, limits: Sequence[ListenerLimits], buckets: int | None = None) -> None:
        self.workers = workers
        self.limits = tuple(limits)
        self.buckets = buckets if buckets is not None else bucket_count(self.limits)
        self._row = 1 + self.buckets  # a slot's row: its total, then its buckets
        size = len(self.limits) * workers * self._row * _COUNTER
        # A memfd rather than anonymous memory: the lock needs a file. Shared by fork, never by name.
        self._fd = os.memfd_create("batv-sessions", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, max(size, _COUNTER))
        self._map = mmap.mmap(self._fd, max(size, _COUNTER))
        self._counts = memoryview(self._map).cast("I")

    def gates(self, slot: int) -> list[SharedGate]:
        """The gates of worker `slot` (0 .. workers - 1), one per listener in the config's order."""
        if not 0 <= slot < self.workers:
            raise ValueError(f"slot {slot} is not one of {self.workers} workers")
        return [SharedGate(self, index, slot) for index in range(len(self.limits))]

    def clear(self, slot: int) -> None:
        """Forget what worker `slot` held: called once that worker is dead, before its replacement runs."""
        for index in range(len(self.limits)):
            start = self._base(index, slot)
            self._counts[start : start + self._row] = memoryview(bytes(self._row * _COUNTER)).cast("I")

    def open_sessions(self, listener: int) -> int:
        """Sessions open on this listener over every worker (tests, and an operator's debugger)."""
        return sum(self._counts[self._base(listener, slot)] for slot in range(self.workers))

    def close(self) -> None:
        self._counts.release()
        self._map.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def _base(self, listener: int, slot: int) -> int:
        return (listener * self.workers + slot) * self._row

    def _bucket(self, ip: str) -> int:
        return 1 + hash(ip) % self.buckets

    def _admit(self, listener: int, slot: int, ip: str) -> Reply | None:
        limits = self.limits[listener]
        bucket = self._bucket(ip)
        counts = self._counts
        first = self._base(listener, 0)
        rows = range(first, first + self.workers * self._row, self._row)
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            if limits.max_sessions and sum(counts[row] for row in rows) >= limits.max_sessions:
                return replies.TOO_MANY_SESSIONS
            if limits.max_per_client and sum(counts[row + bucket] for row in rows) >= limits.max_per_client:
                return replies.TOO_MANY_FROM_CLIENT
            mine = self._base(listener, slot)
            counts[mine] += 1
            counts[mine + bucket] += 1
            return None
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _leave(self, listener: int, slot: int, ip: str) -> None:
        mine = self._base(listener, slot)
        bucket = mine + self._bucket(ip)
        # Never below zero: a slot cleared under a live worker (it cannot be: the worker is reaped first)
        # would otherwise wrap to four billion and refuse everyone.
        if self._counts[mine]:
            self._counts[mine] -= 1
        if self._counts[bucket]:
            self._counts[bucket] -= 1


class SharedGate:
    """smtpd.SessionGate's admit and leave, counted in the table across every worker of the host."""

    def __init__(self, table: SessionTable, listener: int, slot: int) -> None:
        self._table = table
        self._listener = listener
        self._slot = slot

    def admit(self, ip: str) -> Reply | None:
        """None if admitted (then `leave` must be called once), else the 421 to send."""
        return self._table._admit(self._listener, self._slot, ip)

    def leave(self, ip: str) -> None:
        self._table._leave(self._listener, self._slot, ip)
