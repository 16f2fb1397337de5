"""A Postfix policy delegation server (SMTPD_POLICY_README) for `check_policy_service`.

Postfix asks once per RCPT with `name=value` lines and an empty line; we answer one `action=...` line and
an empty line. The decision is policy.inbound_rcpt's, the same as the inbound SMTP role's; this module
only translates it:
- REJECT or TEMPFAIL: the policy's own reply as a numeric action ("550 5.7.1 <x@y>: bounce to an address
  we never signed (bad-hash)"), which access(5) allows and Postfix sends as it is.
- RELAY: DUNNO, never OK, so that the restrictions after ours (reject_unauth_destination above all) still
  run; a relay verdict here only means "nothing against it".
- relay-denied: DUNNO too. Which domains Postfix relays for is Postfix's own decision, and a site's own
  users send null-sender mail (auto-replies, MDNs) to other domains through the same smtpd.
- Observe mode (`--observe`, or a domain in `policy.observe_domains`): what enforce mode would have refused
  is accepted, logged, and marked with one `PREPEND`ed header per message.
- Failed guesses (a wrong hash, an unknown key id) are charged to the failed-guess budget per client
  network, as in the SMTP role; `batv-gateway policy` charges the same [state] store as `serve`
  (guessbudget.py: counted across processes and, on Redis, hosts). The answer is held back (Postfix
  waits up to smtpd_policy_service_timeout, 100 s, and guard holds at most 30 s), and past the limit it
  is `421`, which makes Postfix disconnect the client.
  Postfix counts our rejects in its own smtpd_soft/hard_error_limit, so guard.ErrorTally is not repeated.

A request that is not the protocol (a line without `=`, a line or request over the limits, non-UTF-8) is
answered DEFER_IF_PERMIT and the connection closed: Postfix never sends one, and it treats a policy server
it cannot use the same way (451 4.3.5).

What Postfix does when it cannot reach us (smtpd_policy_service_default_action) we never see; what we can
count is what it does ask (PolicyCounters), and the alerts in deploy/prometheus/alerts.yml read the silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..core import replies
from ..core.addresses import Address, parse_address, parse_path
from ..core.errors import GatewayError
from ..core.logs import DecisionLog
from ..core.replies import Reply
from ..policy.guard import GuardSettings
from ..policy.guessbudget import BudgetRule, LocalBudget, RateBudget
from ..policy.policy import Action, RcptVerdict, Reason
from .socketmap import PolicySource

log = logging.getLogger("gateway.policyd")

MAX_LINE = 8192  # octets of one attribute line (certificate subjects and SASL names can be long)
MAX_REQUEST = 65536  # octets of one request
MAX_ATTRIBUTES = 200  # Postfix 3.7 sends about 40
DEFAULT_IDLE_TIMEOUT = 600.0  # Postfix's smtpd_policy_service_max_idle is 300 s
OBSERVE_HEADER = "X-BATV-Observe"


class Verb(enum.Enum):
    DUNNO = "DUNNO"
    PREPEND = "PREPEND"
    REPLY = "REPLY"  # a numeric action: the policy's Reply, sent by Postfix as it is
    DEFER_IF_PERMIT = "DEFER_IF_PERMIT"


@dataclass(frozen=True)
class PolicyAnswer:
    verb: Verb
    reply: Reply | None = None  # for REPLY
    text: str = ""  # the header for PREPEND, the reason for DEFER_IF_PERMIT

    def action(self) -> str:
        if self.verb is Verb.REPLY and self.reply is not None:
            return str(self.reply)
        if self.text:
            return f"{self.verb.value} {self.text}"
        return self.verb.value

    def wire(self) -> bytes:
        # A value holds no newline: replies are ours, and headers are built from enum values.
        return f"action={self.action()}\n\n".encode()


DUNNO = PolicyAnswer(Verb.DUNNO)


@dataclass(frozen=True)
class Decision:
    """What one request came to: the answer, and the verdict behind it (None: the policy was not asked)."""

    answer: PolicyAnswer
    verdict: RcptVerdict | None = None
    sender: Address | None = None
    recipient: str = ""


class ProtocolError(GatewayError, ValueError):
    pass


# --- the pure part ------------------------------------------------------------------------------------


class RequestReader:
    """Splits a byte stream into requests (attribute dicts), with every size bounded before buffering."""

    def __init__(
        self, max_line: int = MAX_LINE, max_request: int = MAX_REQUEST, max_attributes: int = MAX_ATTRIBUTES
    ) -> None:
        self.max_line, self.max_request, self.max_attributes = max_line, max_request, max_attributes
        self._buf = bytearray()
        self._attrs: dict[str, str] = {}
        self._size = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> dict[str, str] | None:
        """The next whole request, None if more bytes are needed; raises ProtocolError."""
        buf = self._buf
        while (nl := buf.find(b"\n")) >= 0:
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            if len(line) > self.max_line:
                raise ProtocolError(f"attribute line over {self.max_line} octets")
            if not line:
                attrs, self._attrs, self._size = self._attrs, {}, 0
                return attrs
            self._size += nl + 1
            if self._size > self.max_request:
                raise ProtocolError(f"request over {self.max_request} octets")
            name, eq, value = line.partition(b"=")
            if not eq or not name:
                raise ProtocolError("an attribute line is name=value")
            if len(self._attrs) >= self.max_attributes:
                raise ProtocolError(f"request over {self.max_attributes} attributes")
            try:
                self._attrs[name.decode("utf-8")] = value.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolError("attribute is not UTF-8") from None
        if len(buf) > self.max_line:
            raise ProtocolError(f"attribute line over {self.max_line} octets")
        return None


def decide(source: PolicySource, attrs: Mapping[str, str], today: int, observe: bool = False) -> Decision:
    """One request → the answer, from policy.inbound_rcpt alone."""
    if attrs.get("request") != "smtpd_access_policy" or attrs.get("protocol_state", "").upper() != "RCPT":
        return Decision(DUNNO)
    recipient = attrs.get("recipient", "")
    try:
        # Postfix sends the envelope addresses without <>; an empty sender is the null sender.
        sender_text = attrs.get("sender", "")
        sender = parse_path(sender_text) if sender_text else None
        rcpt = parse_address(recipient)
    except GatewayError:
        # smtpd accepted the address, so it is for Postfix's rules to judge, not ours.
        return Decision(DUNNO, recipient=recipient)
    verdict = source.policy.inbound_rcpt(sender, rcpt, today, observe=observe)
    if verdict.action is Action.RELAY:
        if verdict.would_reject is not None:
            header = f"{OBSERVE_HEADER}: would-reject reason={verdict.reason.value}"
            return Decision(PolicyAnswer(Verb.PREPEND, text=header), verdict, sender, recipient)
        return Decision(DUNNO, verdict, sender, recipient)
    if verdict.reason is Reason.RELAY_DENIED:
        return Decision(DUNNO, verdict, sender, recipient)
    reply = verdict.reply or replies.LOCAL_ERROR
    return Decision(PolicyAnswer(Verb.REPLY, reply), verdict, sender, recipient)


@dataclass(frozen=True)
class PolicyEvent:
    """One decision for the log line (logs.DecisionEvent's fields)."""

    session: str  # Postfix's queue id, or its instance id before there is one
    client: str
    role: str
    sender: str | None
    recipient: str
    action: object
    reason: object
    key_id: int | None
    next_hop_reply: str | None
    duration: float | None
    would_reject: Reply | None


# --- the asyncio edge -------------------------------------------------------------------------------


class PolicyCounters:
    """What the policy service counts, in a registry of the caller's (metrics.Metrics.registry).

    Postfix keeps a connection per smtpd process and asks once per RCPT, so while mail arrives requests
    never stop: requests at zero while the service is up mean Postfix is not asking (a wrong
    check_policy_service, or a socket it cannot open), and then it applies
    smtpd_policy_service_default_action to every recipient."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connections = Counter(
            "batv_policy_connections",
            "Connections accepted from Postfix's smtpd processes",
            registry=registry,
        )
        self.open_connections = Gauge(
            "batv_policy_open_connections", "Connections from Postfix open now", registry=registry
        )
        self.requests = Counter(
            "batv_policy_requests",
            "Policy requests answered, by action: dunno, reply (a numeric reply: 550 refuses a forged bounce,"
            " 421 a client that keeps guessing tags), prepend (observe mode), defer_if_permit (an error)",
            ["action"],
            registry=registry,
        )
        self.errors = Counter(
            "batv_policy_errors",
            "Requests that could not be decided, by kind: protocol (not the policy protocol; the connection"
            " is closed) and internal (a failure of ours); both answered DEFER_IF_PERMIT",
            ["kind"],
            registry=registry,
        )
        self._answers = {verb: self.requests.labels(verb.value.lower()) for verb in Verb}
        for kind in ("protocol", "internal"):
            self.errors.labels(kind)  # exported at 0 from the start, so that rate() sees the first one

    def answered(self, answer: PolicyAnswer) -> None:
        self._answers[answer.verb].inc()


LINGER_SECONDS = 1.0  # how long a refused client's unread input is drained before the close
LINGER_OCTETS = 1 << 20


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A lingering close, as Postfix and Apache do: closing with the client's input unread makes the kernel
    send a reset, which can destroy the answer before the client reads it (a request over the line limit
    always leaves input unread). So: end our side, then read and drop what is left, bounded in time and
    octets, and only then close."""
    if writer.can_write_eof():
        writer.write_eof()
    dropped = 0
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        async with asyncio.timeout(LINGER_SECONDS):
            while dropped < LINGER_OCTETS and (data := await reader.read(65536)):
                dropped += len(data)


class PolicyService:
    """What every connection shares: the policy source, the guess limiter, the clock and the mode."""

    def __init__(
        self,
        source: PolicySource,
        *,
        observe: bool = False,
        guard: GuardSettings | None = None,
        guesses: RateBudget | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_decision: Callable[[PolicyEvent], None] | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        counters: PolicyCounters | None = None,
    ) -> None:
        self.source = source
        self.observe = observe
        # One budget for all connections: Postfix runs many smtpd processes, each with its own connection.
        if guesses is None:
            g = guard or GuardSettings()
            rule = BudgetRule("guess-budget", g.guess_rate, g.guess_burst, g.max_guess_delay, 0)
            guesses = LocalBudget(rule)
        self.guesses = guesses
        self.clock = clock
        self.sleep = sleep
        self.on_decision = on_decision if on_decision is not None else DecisionLog()
        self.idle_timeout = idle_timeout
        self.writers: set[asyncio.StreamWriter] = set()
        self.counters = counters
        if counters is not None:
            counters.open_connections.set_function(lambda: len(self.writers))

    def close_connections(self) -> None:
        for writer in list(self.writers):
            writer.close()

    async def respond(self, attrs: Mapping[str, str], prepended: set[str]) -> PolicyAnswer:
        """The answer to one request. `prepended`: this connection's messages that already got the
        observe header (one per message is enough)."""
        started = time.monotonic()
        try:
            decision = decide(self.source, attrs, int(self.clock()) // 86400, self.observe)
        except Exception:
            # A bug costs this recipient a retry, never the server.
            log.exception("policy decision failed")
            if self.counters is not None:
                self.counters.errors.labels("internal").inc()
            return PolicyAnswer(Verb.DEFER_IF_PERMIT, text="4.3.0 policy service error, try again later")
        answer = decision.answer
        client = attrs.get("client_address", "")
        verdict = decision.verdict
        if verdict is not None and verdict.failed_guess and verdict.action is Action.REJECT:
            penalty = await self.guesses.charge(client, self.clock())
            if penalty.disconnect:
                log.info("client %s: too many failed tag guesses, disconnecting", client)
                answer = PolicyAnswer(Verb.REPLY, replies.TOO_MANY_ERRORS)
            elif penalty.delay:
                await self.sleep(penalty.delay)
        if answer.verb is Verb.PREPEND:
            message = attrs.get("instance", "")
            if message in prepended:
                answer = DUNNO
            else:
                if len(prepended) > 100:
                    prepended.clear()
                prepended.add(message)
        if verdict is not None:
            self.on_decision(
                PolicyEvent(
                    session=attrs.get("queue_id") or attrs.get("instance", ""),
                    client=client,
                    role="policyd",
                    sender=str(decision.sender) if decision.sender is not None else None,
                    recipient=decision.recipient,
                    action=verdict.action,
                    reason=verdict.reason,
                    key_id=verdict.key_id,
                    next_hop_reply=None,
                    duration=time.monotonic() - started,
                    would_reject=verdict.would_reject,
                )
            )
        return answer

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests = RequestReader()
        prepended: set[str] = set()
        peer = writer.get_extra_info("peername")
        self.writers.add(writer)
        counters = self.counters
        if counters is not None:
            counters.connections.inc()
        try:
            while True:
                try:
                    attrs = requests.next()
                except ProtocolError as exc:
                    log.warning("protocol error from %s: %s; connection closed", peer, exc)
                    bad = PolicyAnswer(Verb.DEFER_IF_PERMIT, text="4.3.5 malformed policy request")
                    if counters is not None:
                        counters.errors.labels("protocol").inc()
                        counters.answered(bad)
                    writer.write(bad.wire())
                    await writer.drain()
                    await _linger(reader, writer)
                    return
                if attrs is None:
                    data = await asyncio.wait_for(reader.read(65536), self.idle_timeout or None)
                    if not data:
                        return
                    requests.feed(data)
                    continue
                answer = await self.respond(attrs, prepended)
                if counters is not None:
                    counters.answered(answer)
                writer.write(answer.wire())
                await writer.drain()
        except (TimeoutError, ConnectionError):
            return
        finally:
            self.writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def start_policyd(service: PolicyService, host: str, port: int) -> asyncio.Server:
    return await asyncio.start_server(service.handle, host, port)
