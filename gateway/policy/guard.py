"""Forgery resistance and error limits: pure bookkeeping, with the clock injected.

A prvs tag carries 24 bits of hash and the answer at RCPT says at once whether a guess was right, so an
unthrottled client at 1000 guesses a second finds a valid tag for a chosen address in about 2**23 / 1000 s,
some 2.3 hours on average. Two brakes, both Postfix-style:

- `ErrorTally`, per session: every error reply of ours (a failed tag check, a policy refusal, a syntax
  error) counts, and so does a next hop's 5xx; a next hop's 4xx, or our 4xx for a next hop that cannot
  be talked to, does not: a next hop that caps recipients per transaction (452 4.5.3 after 50, say) must
  not get a client with 70 recipients disconnected before DATA (Postfix too keeps recipient overshoot
  apart, in smtpd_recipient_overshoot_limit), nor a next hop's outage cost a client its session. Past
  `soft_error_limit` each error reply is delayed by `error_sleep_time` (smtpd_soft_error_limit,
  smtpd_error_sleep_time); at `hard_error_limit` the session is closed with 421 (smtpd_hard_error_limit).
  Like Postfix, the count is never reset within a session, so delivering one message does not buy a
  client a fresh set of guesses.
- `GuessLimiter`, per client network (an IPv4 address, an IPv6 /64, since one host owns a whole /64):
  failed tag checks are answered at `rate` per second after a burst of `burst`, across all of that
  client's sessions (GCRA, the "virtual scheduling" form of a token bucket). A client that would have to
  wait longer than `max_delay` for its answer is disconnected instead of queued, so a flood cannot pin
  sessions open.

With the defaults (1 answered guess a second) a single source needs on average 2**23 s, about 97 days, to
hit one valid tag for one address and day; and a tag expires after 7 days, so the search restarts.

Neither class sleeps: each returns a `Penalty` (how long to hold the answer, whether to disconnect) and the
SMTP edge acts on it. The policyd front end reuses both.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class GuardSettings:
    soft_error_limit: int = 10  # Postfix smtpd_soft_error_limit
    hard_error_limit: int = 20  # Postfix smtpd_hard_error_limit
    error_sleep_time: float = 1.0  # Postfix smtpd_error_sleep_time (seconds)
    guess_rate: float = 1.0  # answered failed tag checks per second per client network; 0 turns it off
    guess_burst: int = 5  # failed checks answered at once before the rate applies
    max_guess_delay: float = 30.0  # hold an answer at most this long; past it, disconnect

    def __post_init__(self) -> None:
        if self.soft_error_limit < 0 or self.hard_error_limit < 1:
            raise ValueError("error limits must be soft >= 0 and hard >= 1")
        if self.error_sleep_time < 0 or self.guess_rate < 0 or self.max_guess_delay < 0:
            raise ValueError("guard times and rates must not be negative")
        if self.guess_burst < 1:
            raise ValueError("guess_burst must be at least 1")


@dataclass(frozen=True)
class Penalty:
    delay: float = 0.0  # seconds to hold the reply
    disconnect: bool = False  # answer 421 4.7.0 and close instead

    def then(self, other: Penalty) -> Penalty:
        return Penalty(self.delay + other.delay, self.disconnect or other.disconnect)


NO_PENALTY = Penalty()


class Answer(Protocol):
    """A reply as the tally sees it: replies.Reply, or nexthop.NextHopReply (always from_next_hop)."""

    @property
    def code(self) -> int: ...
    @property
    def from_next_hop(self) -> bool: ...


def client_error(reply: Answer) -> bool:
    """Whether a reply counts against the client: a 4xx or 5xx of our own, except 421 (we close anyway),
    and a next hop's 5xx. A next hop's 4xx (its recipient cap, its trouble) is not the client's doing; its
    5xx (550 5.1.1 user unknown) is, and counting it keeps a directory harvest through us as slow as the
    next hop's own smtpd would keep it, which counts its rejects the same way."""
    if reply.code < 400 or reply.code == 421:
        return False
    return not reply.from_next_hop or reply.code >= 500


class ErrorTally:
    """One SMTP session's errors (not shared: a session is one coroutine)."""

    __slots__ = ("_settings", "errors")

    def __init__(self, settings: GuardSettings) -> None:
        self._settings = settings
        self.errors = 0

    def reply(self, reply: Answer) -> Penalty:
        """What to do before sending this reply: count it if it is the client's error (client_error)."""
        return self.error() if client_error(reply) else NO_PENALTY

    def error(self) -> Penalty:
        """Count one error reply; what to do before sending it."""
        self.errors += 1
        s = self._settings
        if self.errors >= s.hard_error_limit:
            return Penalty(0.0, disconnect=True)
        if self.errors > s.soft_error_limit:
            return Penalty(s.error_sleep_time)
        return NO_PENALTY


def client_network(ip: str) -> str:
    """The unit a limit applies to: the IPv4 address, or the /64 of an IPv6 address."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class GuessLimiter:
    """Failed tag checks answered per client network; shared by every session of a process."""

    # Forget clients whose schedule has run out, now and then, so the table stays small.
    _PRUNE_EVERY = 1024

    def __init__(self, settings: GuardSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._interval = 1.0 / settings.guess_rate if settings.guess_rate > 0 else 0.0
        self._tolerance = (settings.guess_burst - 1) * self._interval
        self._tat: dict[str, float] = {}  # per client: the theoretical arrival time of its next guess
        self._calls = 0

    @property
    def enabled(self) -> bool:
        return self._interval > 0

    def failed_guess(self, client_ip: str) -> Penalty:
        """A failed tag check from this client: how long its answer must wait, or disconnect."""
        if not self.enabled:
            return NO_PENALTY
        now = self._clock()
        self._calls += 1
        if self._calls % self._PRUNE_EVERY == 0:
            self._prune(now)
        key = client_network(client_ip)
        tat = max(self._tat.get(key, now), now)
        delay = max(0.0, tat - self._tolerance - now)
        if delay > self._settings.max_guess_delay:
            # Not scheduled: a disconnected guess is never answered, so it costs no slot.
            return Penalty(0.0, disconnect=True)
        self._tat[key] = tat + self._interval
        return Penalty(delay)

    def _prune(self, now: float) -> None:
        for key in [k for k, tat in self._tat.items() if tat <= now]:
            del self._tat[key]

    def __len__(self) -> int:
        return len(self._tat)
