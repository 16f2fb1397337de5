"""The in-session relay: each client transaction is mirrored onto a next-hop transaction as it happens.

Nothing is ever held or queued here. The rules of a role (inbound now, outbound later) decide per RCPT
whether a recipient goes on and as what address; the next hop then decides, and its answer is the answer
our client gets: per recipient at RCPT, and for the message after the final dot. When the next hop cannot
be reached, times out or breaks, the client gets a 4xx with an enhanced code and keeps the message; it is
never told 250 for something the next hop did not say 250 to.

The next-hop MAIL is sent with the first recipient the rules let through, not at the client's MAIL: a
bounce whose every recipient is refused (the backscatter this product exists to stop) costs the next hop
nothing and is never seen by it. A next hop's refusal of the sender is then reported at that RCPT.

The Message-ID ledger (docs/ledger.md): the outbound role reads each message's header block as it streams
past and records it once the next hop said 2xx to the final dot. The inbound role sends a bounce to an
untagged address on at RCPT (policy Action.DEFER) and reads a bounded prefix of its message as it streams;
before the final dot goes to the next hop, the ledger decides: a refused message never gets its dot.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..core import replies
from ..core.logs import TransactionLog
from ..core.replies import Reply
from ..policy import ledger
from ..policy.ledger import LedgerKeys, LedgerStore, LedgerVerdict, RecordOutcome
from ..policy.messageids import FoundReferences, InboundReferences, OutboundHeaders
from ..policy.policy import Action, Policy, Reason
from ..policy.recorder import LedgerRecorder, Sent
from .nexthop import (
    BASELINE,
    Capabilities,
    NextHopConnection,
    NextHopError,
    NextHopErrorKind,
    NextHopPool,
    NextHopReply,
)
from .smtpcore import DATA_FAILURE_REPLIES, DataFailure, MailCommand, Offer, RcptCommand

_TRUSTED_CACHE_SIZE = 4096  # client addresses whose trust verdict is kept (OutboundRules)
# A scanned prefix larger than this is parsed on a thread: a full 256 KiB takes milliseconds.
_SCAN_ON_THREAD = 64 * 1024

log = logging.getLogger("gateway.relay")

ReplyLike = Reply | NextHopReply


# ------------------------------------------------------------------------------------------------ events


@dataclass(frozen=True)
class SessionInfo:
    session: str  # a short random id, the same in every log line of the session
    client_ip: str
    client_port: int
    listener: str
    role: str


@dataclass(frozen=True)
class DecisionEvent:
    """One recipient decision, for the log line and the metrics (see logs.DecisionEvent)."""

    session: str
    client: str
    role: str
    sender: str | None  # None: the null sender
    recipient: str  # as the client gave it
    action: object  # policy.Action (RELAY, REJECT, TEMPFAIL)
    reason: object  # policy.Reason
    key_id: int | None
    next_hop_reply: str | None  # what the next hop said to this recipient (None: not asked)
    duration: float | None  # seconds from the client's RCPT to our answer
    would_reject: Reply | None  # observe mode: what enforce mode would have said
    address: str | None = None  # what was sent on to the next hop, if it was
    transaction_end: bool = False


DecisionObserver = Callable[[DecisionEvent], None]


@dataclass(frozen=True)
class TransactionEvent:
    """How one message ended, for its log line (see logs.TransactionEvent)."""

    session: str
    client: str
    role: str
    sender: str | None  # None: the null sender
    recipients: int  # accepted by the next hop
    action: object  # policy.Action: RELAY (2xx), TEMPFAIL (4xx), REJECT (5xx), as the client was told
    next_hop_reply: str | None  # the next hop's reply to the final dot, or our 4xx for not reaching it
    reply: str | None  # what the client was told, where that is not next_hop_reply
    duration: float  # seconds from the client's MAIL


def verdict_of(reply: ReplyLike) -> Action:
    """The verdict a reply amounts to, as the decision and transaction lines name it."""
    if reply.code < 400:
        return Action.RELAY
    return Action.TEMPFAIL if reply.code < 500 else Action.REJECT


class RelayWatch(Protocol):
    """What the metrics hear from the engine besides decisions (metrics.Metrics is one)."""

    def next_hop_error(self, kind: object) -> None: ...

    def transaction_done(self, role: object, seconds: float) -> None: ...

    def ledger_record(self, outcome: str, count: int) -> None: ...


@dataclass
class LedgerSettings:
    """The ledger as both roles use it: `store` is set by serve once open (None: the ledger is off)."""

    store: LedgerStore | None = None
    days: int = ledger.LEDGER_DAYS
    max_replies: int = ledger.MAX_REPLIES
    clock: Callable[[], float] = time.time

    def keys(self, policy: Policy) -> LedgerKeys | None:
        """The keys for a transaction under `policy`, or None when the ledger is off for it (no store, or
        no ledger secret in the keyring)."""
        return policy.ledger_keys if self.store is not None else None


# ------------------------------------------------------------------------------------------------ roles


@dataclass(frozen=True)
class RcptDecision:
    relay: bool
    address: str  # what to send on (the tag stripped, SRS reversed)
    reason: object
    reply: Reply | None = None  # when not relayed
    failed_guess: bool = False
    would_reject: Reply | None = None
    key_id: int | None = None
    action: object = None  # the policy's own Action, for events; derived from `relay` when None
    # The outbound role rewrites the sender once per transaction, decided at its first recipient.
    sender: str | None = None
    deferred: bool = False  # relayed now, decided by the ledger at the end of DATA
    observe: bool = False  # ... where a refusal is only counted


class Transaction(Protocol):
    """One client transaction as a role sees it: a decision per recipient."""

    # The ledger's keys when the ledger is on for this transaction (the outbound role records, the
    # inbound role decides deferred recipients), else None.
    ledger_keys: LedgerKeys | None

    def rcpt(self, rcpt: RcptCommand) -> RcptDecision: ...


class RoleRules(Protocol):
    """What a listener's role decides. The engine (this module) is the same for every role."""

    role: str
    ledger: LedgerSettings

    def transaction(self, info: SessionInfo, mail: MailCommand) -> Transaction | Reply:
        """At the client's MAIL: the transaction's rules, or the refusal (an untrusted client, ...)."""
        ...

    def forwards_client(self, ip: str) -> bool:
        """May this client say, with XFORWARD, who its own client was (an MTA handing us its mail)?"""
        ...


class PolicyHolder:
    """The policy that new transactions read. A reload swaps it; a transaction takes it once at MAIL, so
    it is never judged half by one policy and half by another."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def replace(self, policy: Policy) -> None:
        self.policy = policy


def utc_today(clock: Callable[[], float] = time.time) -> int:
    return int(clock()) // 86400


class InboundRules:
    """The MX side: one policy call per RCPT (refuse backscatter, strip tags, refuse relaying)."""

    role = "inbound"

    def __init__(
        self,
        holder: PolicyHolder,
        observe: bool = False,
        clock: Callable[[], float] = time.time,
        ledger: LedgerSettings | None = None,
    ):
        self.holder = holder
        self.observe = observe
        self.clock = clock
        self.ledger = ledger if ledger is not None else LedgerSettings()

    def transaction(self, info: SessionInfo, mail: MailCommand) -> Transaction:
        policy = self.holder.policy
        return _InboundTransaction(policy, mail, self.observe, self.clock, self.ledger.keys(policy))

    def forwards_client(self, ip: str) -> bool:
        return False  # the internet is the client here: nobody speaks for anyone else


@dataclass
class _InboundTransaction:
    policy: Policy
    mail: MailCommand
    observe: bool
    clock: Callable[[], float]
    ledger_keys: LedgerKeys | None = None
    deferred: bool | None = None  # the class of the relayed recipients, set by the first of them

    def rcpt(self, rcpt: RcptCommand) -> RcptDecision:
        decision = self._decide(rcpt)
        if decision.relay:
            if self.deferred is not None and self.deferred != decision.deferred:
                # One message gets one reply to its final dot: recipients the ledger decides there never
                # share it with recipients decided here (the later class waits for its own transaction).
                return RcptDecision(
                    relay=False,
                    address=rcpt.path,
                    reason=decision.reason,
                    reply=replies.SEPARATE_TRANSACTION,
                    action=Action.TEMPFAIL,
                )
            self.deferred = decision.deferred
        return decision

    def _decide(self, rcpt: RcptCommand) -> RcptDecision:
        if rcpt.bare_postmaster:
            # RFC 5321 §4.5.1: always accepted, and our next hop must take it too.
            return RcptDecision(relay=True, address=rcpt.path, reason=Reason.EXEMPT, action=Action.RELAY)
        verdict = self.policy.inbound_rcpt(
            self.mail.sender,
            rcpt.recipient,
            utc_today(self.clock),
            observe=self.observe,
            ledger=self.ledger_keys is not None,
        )
        if verdict.action is Action.DEFER:
            return RcptDecision(
                relay=True,
                address=verdict.address,
                reason=verdict.reason,
                action=Action.DEFER,
                deferred=True,
                observe=self.policy.observes(rcpt.recipient, self.observe),
            )
        relay = verdict.action is Action.RELAY
        reply = verdict.reply
        if not relay and reply is None:  # a policy that says no must say why; never a silent 250
            reply = replies.LOCAL_ERROR
        return RcptDecision(
            relay=relay,
            address=verdict.address,
            reason=verdict.reason,
            reply=reply,
            failed_guess=verdict.failed_guess and not relay,
            would_reject=verdict.would_reject,
            key_id=verdict.key_id,
            action=verdict.action,
        )


class OutboundRules:
    """The relay hop: only trusted clients; the sender rewritten once per transaction (prvs for our
    domains, SRS for forwarded mail), the recipients and the content untouched."""

    role = "outbound"

    def __init__(
        self,
        holder: PolicyHolder,
        trusted: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
        clock: Callable[[], float] = time.time,
        ledger: LedgerSettings | None = None,
    ) -> None:
        self.holder = holder
        self.trusted = tuple(trusted)
        self.clock = clock
        self.ledger = ledger if ledger is not None else LedgerSettings()
        # The verdict per client address: an MTA relays through us from a handful of addresses, and
        # parsing one costs more than the rest of MAIL. Bounded: cleared when it fills.
        self._trusted_ips: dict[str, bool] = {}

    def _trusted(self, ip: str) -> bool:
        known = self._trusted_ips.get(ip)
        if known is None:
            if len(self._trusted_ips) >= _TRUSTED_CACHE_SIZE:
                self._trusted_ips.clear()
            known = self._trusted_ips[ip] = self._in_trusted_networks(ip)
        return known

    def _in_trusted_networks(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted)

    def transaction(self, info: SessionInfo, mail: MailCommand) -> Transaction | Reply:
        # Never an open relay: anyone outside the trusted networks is refused at MAIL.
        if not self._trusted(info.client_ip):
            return replies.client_not_trusted(info.client_ip)
        policy = self.holder.policy
        return _OutboundTransaction(policy, mail, self.clock, self.ledger.keys(policy))

    def forwards_client(self, ip: str) -> bool:
        # The MTA we relay for (Postfix's smtp_send_xforward_command) may name its own client.
        return self._trusted(ip)


@dataclass
class _OutboundTransaction:
    policy: Policy
    mail: MailCommand
    clock: Callable[[], float]
    ledger_keys: LedgerKeys | None = None
    exempt: bool | None = None  # decided at the first recipient: is this transaction left alone?
    sender: str | None = None
    sender_reason: object = None
    key_id: int | None = None

    def rcpt(self, rcpt: RcptCommand) -> RcptDecision:
        exemption = self.policy.rewrite_exemption(self.mail.sender, rcpt.recipient)
        if self.exempt is not None and self.exempt != (exemption is not None):
            # One transaction is never half rewritten: the other class goes in a transaction of its own.
            return RcptDecision(
                relay=False,
                address=rcpt.path,
                reason=exemption or self.sender_reason,
                reply=replies.SEPARATE_TRANSACTION,
                action=Action.TEMPFAIL,
            )
        if self.sender is None:
            verdict = self.policy.outbound_sender(self.mail.sender, utc_today(self.clock), exemption)
            if verdict.action is not Action.RELAY:
                return RcptDecision(
                    relay=False,
                    address=rcpt.path,
                    reason=verdict.reason,
                    reply=verdict.reply or replies.KEYRING_UNAVAILABLE,
                    action=verdict.action,
                )
            self.exempt = exemption is not None
            self.sender, self.sender_reason, self.key_id = verdict.address, verdict.reason, verdict.key_id
        return RcptDecision(
            relay=True,
            address=rcpt.path,
            reason=self.sender_reason,
            key_id=self.key_id,
            action=Action.RELAY,
            sender=self.sender,
        )


# ------------------------------------------------------------------------------------------------ engine


def _done(value: tuple[ReplyLike, bool]) -> Callable[[], Awaitable[tuple[ReplyLike, bool]]]:
    async def ready() -> tuple[ReplyLike, bool]:
        return value

    return ready


def client_reply(reply: NextHopReply) -> ReplyLike:
    """The next hop's reply as our client gets it. A 421 is the next hop closing ITS connection; to our
    client it would mean that we close, so it becomes a 451 with the same text."""
    if reply.code == 421:
        return NextHopReply(451, reply.lines)
    return reply


@dataclass
class Relay:
    """One listener's relay engine: the role, the next-hop pool, and who hears about decisions."""

    name: str
    rules: RoleRules
    pool: NextHopPool
    message_size_limit: int = 0
    observers: tuple[DecisionObserver, ...] = ()
    watch: RelayWatch | None = None
    # Told how each message ended (the next hop's reply to the final dot): one log line per message.
    on_transaction: Callable[[TransactionEvent], None] = field(default_factory=TransactionLog)
    # The ledger records on their way to the store (RelaySession._record), written behind the mail.
    recorder: LedgerRecorder = field(init=False)

    def __post_init__(self) -> None:
        self.recorder = LedgerRecorder(lambda: self.rules.ledger.store, "sessions", self._ledger_outcome)

    async def records_written(self) -> None:
        """Until every ledger record asked for so far is written (or has failed): before the store closes."""
        await self.recorder.written()

    def _ledger_outcome(self, outcome: RecordOutcome, sessions: tuple[str, ...]) -> None:
        if self.watch is not None:
            self.watch.ledger_record(outcome.value, len(sessions))

    def on_decision(self, observer: DecisionObserver) -> None:
        """Subscribe to every recipient decision (the log line and the metrics do)."""
        self.observers = (*self.observers, observer)

    def emit(self, event: DecisionEvent) -> None:
        for observer in self.observers:
            try:
                observer(event)
            except Exception:
                # Watching the mail must never stop the mail.
                log.exception("a decision observer failed")

    def offer(self, tls: bool) -> Offer:
        """What EHLO offers: only what the next hop (as last seen) can carry on."""
        caps = self.pool.capabilities
        if caps is None:
            # Not reached yet: offer only what any SMTP server carries, and go and ask.
            self.pool.probe_soon()
            caps = BASELINE
        limit = self.message_size_limit
        size: int | None = limit
        if caps.size:
            size = min(limit, caps.size) if limit else caps.size
        return Offer(
            size=size,
            eight_bit=caps.has("8BITMIME"),
            smtputf8=caps.has("SMTPUTF8") and caps.has("8BITMIME"),
            dsn=caps.has("DSN"),
            starttls=tls,
        )

    def session(self, client_ip: str, client_port: int) -> RelaySession:
        # A log correlation id, not a secret: 40 bits from `random` (reseeded in forked workers by the
        # random module itself), without the getrandom(2) call per session that secrets.token_hex makes.
        session_id = f"{random.getrandbits(40):010x}"
        info = SessionInfo(session_id, client_ip, client_port, self.name, self.rules.role)
        return RelaySession(self, info)


def _cannot_carry(caps: Capabilities, mail: MailCommand) -> bool:
    return (
        (mail.eight_bit and not caps.has("8BITMIME"))
        or (mail.smtputf8 and not caps.has("SMTPUTF8"))
        or (mail.dsn and not caps.has("DSN"))
        or (bool(mail.params) and not caps.esmtp)
    )


class RelaySession:
    """One client connection's transactions, mirrored onto next-hop transactions."""

    def __init__(self, relay: Relay, info: SessionInfo) -> None:
        self.relay = relay
        self.info = info
        self.helo: str | None = None
        self.protocol = "SMTP"
        # What a trusted client said with XFORWARD about its own client (xtext, as received), for the
        # next transaction only: an MTA sends it ahead of each message.
        self.forwarded: dict[str, str] = {}
        self._clear()

    def greeted(self, helo: str, esmtp: bool, tls: bool) -> None:
        """HELO/EHLO: what XFORWARD tells a next hop that wants to know who the client really is."""
        self.helo = helo
        self.protocol = ("ESMTPS" if tls else "ESMTP") if esmtp else "SMTP"

    @property
    def offers_xforward(self) -> bool:
        return self.relay.rules.forwards_client(self.info.client_ip)

    def xforward(self, attributes: dict[str, str]) -> None:
        """XFORWARD from a client that may send it (offers_xforward): attributes add up until the end
        of the next transaction, as Postfix's smtpd keeps them."""
        self.forwarded.update(attributes)

    def _xforward(self, conn: NextHopConnection) -> None:
        """Postfix's XFORWARD (only where the next hop offers it, i.e. trusts us): its logs then name
        the real client, not the gateway: ours, or the one a trusted client forwarded to us. Pipelined
        ahead of MAIL; each value xtext-encoded, so nothing a client chose can break the command line."""
        forwarded = self.forwarded
        fields = [
            f"NAME={forwarded.get('NAME', XFORWARD_UNAVAILABLE)}",
            f"ADDR={forwarded.get('ADDR') or _xtext(self.info.client_ip)}",
            f"PROTO={forwarded.get('PROTO', self.protocol)}",
        ]
        if "HELO" in forwarded:
            fields.append(f"HELO={forwarded['HELO']}")
        elif self.helo:
            fields.append(f"HELO={_xtext(self.helo[:255])}")
        # The reply is read in order ahead of MAIL's; a refusal of XFORWARD costs nothing but the data.
        conn.send("XFORWARD " + " ".join(fields), conn.timeouts.command)

    def _clear(self) -> None:
        self._mail: MailCommand | None = None
        self._rules: Transaction | None = None
        self._conn: NextHopConnection | None = None
        self._mail_reply: Awaitable[NextHopReply] | None = None
        self._sender_path = ""
        self._rcpt_lines: list[str] = []  # as sent, so a stale pooled connection can be replayed
        self._rcpt_replies: list[Awaitable[NextHopReply]] = []
        self._data_reply: Awaitable[NextHopReply] | None = None
        self._reused = False  # the connection came from the pool
        self._retried = False
        self._failure: NextHopError | None = None
        self._refusal: ReplyLike | None = None  # the next hop refused the sender: every RCPT gets it
        self._relayed = 0  # recipients sent to the next hop
        self._troubled = False  # the next hop said 4xx to MAIL or DATA: do not pool its connection
        self._accepted = 0  # ... that it accepted
        self._in_data = False
        self._started = time.monotonic()
        # The ledger: deferred recipients the next hop accepted, and what is read of the message for them
        # (inbound), or the header block read for the record (outbound).
        self._deferred: list[tuple[RcptCommand, RcptDecision]] = []
        self._scan: InboundReferences | None = None
        self._headers: OutboundHeaders | None = None

    # ------------------------------------------------------------------ MAIL

    def mail(self, mail: MailCommand) -> Reply:
        rules = self.relay.rules.transaction(self.info, mail)
        if isinstance(rules, Reply):
            return rules
        self._clear()
        self._mail = mail
        self._rules = rules
        return replies.SENDER_OK

    async def _open(self, sender_path: str) -> NextHopConnection:
        """A next-hop connection with our MAIL on it (its reply pending)."""
        assert self._mail is not None
        conn, self._reused = await self.relay.pool.acquire()
        if _cannot_carry(conn.capabilities, self._mail):
            self.relay.pool.release(conn)
            raise _CannotCarry()
        self._sender_path = sender_path
        self._conn = conn
        self._send_mail(conn)
        if not conn.capabilities.pipelining:
            await self._mail_answer()  # RFC 2920: without PIPELINING, one command at a time
        return self._conn

    def _send_mail(self, conn: NextHopConnection) -> None:
        assert self._mail is not None
        if conn.capabilities.has("XFORWARD") and conn.capabilities.pipelining:
            self._xforward(conn)
        line = f"MAIL FROM:<{self._sender_path}>"
        if self._mail.params:
            line += " " + " ".join(self._mail.params)
        self._mail_reply = conn.send(line, conn.timeouts.command)

    async def _mail_answer(self) -> NextHopReply:
        """The next hop's reply to MAIL. A pooled connection the next hop closed just as we used it (its
        idle timeout, a restart) fails on this very first reply, broken or out of step (its goodbye
        arrived as we wrote): then, once, the transaction so far is replayed on a fresh connection.
        Nothing was accepted on the old one, so nothing can be doubled."""
        assert self._mail_reply is not None
        try:
            return await self._mail_reply
        except NextHopError as error:
            if not self._reused or self._retried or error.kind not in _STALE:
                raise
        self._retried = True
        log.info(
            "session %s: pooled next-hop connection was stale; replaying on a new one", self.info.session
        )
        assert self._mail is not None
        if self._conn is not None:
            self._conn.abort()
        conn = await self.relay.pool.fresh()
        self._conn = conn
        if _cannot_carry(conn.capabilities, self._mail):
            conn.abort()
            raise NextHopError(
                NextHopErrorKind.PROTOCOL, "the next hop no longer offers what this message needs"
            )
        self._send_mail(conn)
        pipelining = conn.capabilities.pipelining
        if not pipelining:
            await self._mail_reply
        replayed: list[Awaitable[NextHopReply]] = []
        for line in self._rcpt_lines:
            pending = conn.send(line, conn.timeouts.command)
            if not pipelining:
                await pending
            replayed.append(pending)
        self._rcpt_replies = replayed
        if self._data_reply is not None:
            self._data_reply = conn.send("DATA", conn.timeouts.data_init)
        return await self._mail_reply

    # ------------------------------------------------------------------ RCPT

    async def rcpt(self, rcpt: RcptCommand) -> Callable[[], Awaitable[tuple[ReplyLike, bool]]]:
        """Decide now; send on now; return how to get the answer (awaited in the client's order)."""
        mail = self._mail
        assert mail is not None
        began = time.monotonic()
        assert self._rules is not None
        decision = self._rules.rcpt(rcpt)
        if not decision.relay:
            reply = decision.reply or replies.LOCAL_ERROR
            self._event(rcpt, decision, None, began)
            return _done((reply, decision.failed_guess))
        if self._refusal is not None:
            self._event(rcpt, decision, self._refusal, began)
            return _done((self._refusal, False))
        if self._failure is not None:
            self._event(rcpt, decision, self._failure.reply, began)
            return _done((self._failure.reply, False))
        if rcpt.dsn and self._conn is not None and not self._conn.capabilities.has("DSN"):
            return _done((replies.NEXT_HOP_CANNOT_CARRY, False))
        try:
            conn = self._conn if self._conn is not None else await self._open(decision.sender or mail.path)
            if rcpt.dsn and not conn.capabilities.has("DSN"):
                return _done((replies.NEXT_HOP_CANNOT_CARRY, False))
            line = f"RCPT TO:<{decision.address}>"
            if rcpt.params:
                line += " " + " ".join(rcpt.params)
            index = len(self._rcpt_lines)
            self._rcpt_lines.append(line)
            self._rcpt_replies.append(conn.send(line, conn.timeouts.command))
            if not conn.capabilities.pipelining:
                await self._rcpt_replies[index]
        except _CannotCarry:
            self._event(rcpt, decision, replies.NEXT_HOP_CANNOT_CARRY, began)
            return _done((replies.NEXT_HOP_CANNOT_CARRY, False))
        except NextHopError as error:
            self._fail(error)
            self._event(rcpt, decision, error.reply, began)
            return _done((error.reply, False))
        self._relayed += 1

        async def answer() -> tuple[ReplyLike, bool]:
            reply = await self._rcpt_answer(index)
            if decision.deferred and 200 <= reply.code < 300:
                self._deferred.append((rcpt, decision))
            self._event(rcpt, decision, reply, began)
            return reply, False

        return answer

    async def _rcpt_answer(self, index: int) -> ReplyLike:
        if self._failure is not None:
            return self._failure.reply
        if self._refusal is not None:
            return self._refusal
        try:
            mail_reply = await self._mail_answer()
            if not mail_reply.positive:
                # The next hop refused the sender: that is its verdict on every recipient.
                self._troubled = mail_reply.transient
                self._refusal = client_reply(mail_reply)
                return self._refusal
            reply = await self._rcpt_replies[index]
        except NextHopError as error:
            self._fail(error)
            return error.reply
        if 200 <= reply.code < 300:
            self._accepted += 1
            return client_reply(reply)
        if reply.code < 400:  # 3xx to RCPT: not SMTP as we know it
            return replies.NEXT_HOP_PROTOCOL
        return client_reply(reply)

    # ------------------------------------------------------------------ DATA

    async def data_start(self) -> Callable[[], Awaitable[ReplyLike]]:
        """Send DATA on behind the pipelined RCPTs; the returned callable gives the answer (354 or not)
        once the RCPT replies owed to the client have been sent."""
        conn = self._conn
        if conn is None or self._relayed == 0 or self._failure is not None:
            reply = self._failure.reply if self._failure is not None else replies.NO_VALID_RECIPIENTS
            self._end()

            async def refused() -> ReplyLike:
                return reply

            return refused
        try:
            if conn.capabilities.pipelining:
                self._data_reply = conn.send("DATA", conn.timeouts.data_init)
        except NextHopError as error:
            self._fail(error)
        return self._data_answer

    async def _data_answer(self) -> ReplyLike:
        # Read the state only now: the RCPT answers before this may have replayed the transaction on a
        # fresh connection (see _mail_answer).
        conn = self._conn
        if self._failure is not None or conn is None:
            reply: ReplyLike = self._failure.reply if self._failure is not None else replies.LOCAL_ERROR
            self._end()
            return reply
        try:
            if self._data_reply is None:
                if self._accepted == 0:
                    self._end()
                    return self._refusal or replies.NO_VALID_RECIPIENTS
                self._data_reply = conn.send("DATA", conn.timeouts.data_init)
            data_reply = await self._data_reply
        except NextHopError as error:
            self._fail(error)
            self._ended(error.reply, error.reply)
            self._end()
            return error.reply
        if self._accepted == 0:
            if data_reply.code == 354:
                # The next hop wants a message for no recipient it accepted: do not give it one.
                conn.abort()
                self._conn = None
            self._end()
            return self._refusal or replies.NO_VALID_RECIPIENTS
        if data_reply.code != 354:
            self._troubled = data_reply.transient
            refused = client_reply(data_reply) if data_reply.code >= 400 else replies.NEXT_HOP_PROTOCOL
            self._ended(refused, data_reply)
            self._end()
            return refused
        self._in_data = True
        keys = self._rules.ledger_keys if self._rules is not None else None
        if keys is not None:
            if self._deferred:
                self._scan = InboundReferences()
            elif isinstance(self._rules, _OutboundTransaction):
                self._headers = OutboundHeaders()
        return data_reply

    async def data_chunk(self, chunk: bytes) -> None:
        # Read as it streams past, within the feeders' bounds; the message is never held.
        if self._scan is not None and not self._scan.full:
            self._scan.feed(chunk)
        elif self._headers is not None and not self._headers.done:
            self._headers.feed(chunk)
        if self._failure is not None or self._conn is None:
            return  # keep reading the client's message; it will get our 4xx at the end
        try:
            await self._conn.send_data(chunk)
        except NextHopError as error:
            self._fail(error)

    async def data_end(self, failure: DataFailure | None) -> ReplyLike:
        """The client's final dot: the next hop's verdict on the message, or our 4xx/5xx. Never a
        250 unless the next hop said 250 to the message."""
        self._in_data = False
        try:
            reply, next_hop = await self._final_reply(failure)
            self._ended(reply, next_hop)
            return reply
        finally:
            if self.relay.watch is not None:
                self.relay.watch.transaction_done(self.info.role, time.monotonic() - self._started)
            self._end()

    async def _final_reply(self, failure: DataFailure | None) -> tuple[ReplyLike, ReplyLike | None]:
        """What the client is told for the message, and what the next hop said to it (or our reply for
        not reaching it; None where the next hop had no part in the answer)."""
        conn = self._conn
        if failure is not None:
            # Past the size limit (or a bad line): abandon the next-hop transaction without the final
            # dot, as Postfix's proxy does, so that nothing partial is delivered.
            self.abort()
            return DATA_FAILURE_REPLIES[failure], None
        if self._failure is not None:
            reply = self._failure.reply
            self.abort()
            return reply, reply
        if conn is None:
            self.abort()
            return replies.LOCAL_ERROR, None
        if self._deferred:
            refused = await self._ledger_decision()
            if refused is not None:
                # The next hop never gets the final dot for a message the ledger refuses: the connection
                # is dropped mid-DATA, so nothing partial is delivered (as past the size limit). The
                # transaction itself is cleared by data_end, after its log line.
                conn.abort()
                self._conn = None
                return refused, None
        try:
            final = await conn.end_data()
        except NextHopError as error:
            self._fail(error)
            return error.reply, error.reply
        if final.code < 200 or 300 <= final.code < 400:
            conn.abort()
            self._conn = None
            return replies.NEXT_HOP_PROTOCOL, final
        # After the reply to the final dot the next hop's transaction is over (RFC 5321 §4.1.1.4),
        # whatever it said: the connection is clean and can be reused without RSET; unless it said 4xx.
        if final.transient:
            self.relay.pool.retire(conn)
        else:
            self.relay.pool.release(conn)
        self._conn = None
        conn.transactions += 1
        if self._headers is not None and final.positive:
            self._record()
        return client_reply(final), final

    # ------------------------------------------------------------------ the ledger

    async def _ledger_decision(self) -> ReplyLike | None:
        """The ledger's decision on the message, before its final dot: None when every deferred recipient
        passes, else the first refusal's reply (one message, one reply). A decision line per recipient."""
        assert self._rules is not None and self._rules.ledger_keys is not None
        keys = self._rules.ledger_keys
        settings = self.relay.rules.ledger
        scan = self._scan if self._scan is not None else InboundReferences()
        found = await asyncio.to_thread(scan.result) if scan.held > _SCAN_ON_THREAD else scan.result()
        refusal: LedgerVerdict | None = None
        for rcpt, decision in self._deferred:
            began = time.monotonic()
            if refusal is None:
                verdict = await self._ledger_check(found, decision, keys, settings)
                if not verdict.passes:
                    refusal = verdict
            else:
                verdict = refusal  # the message is refused already: so is this recipient
            self._ledger_event(rcpt, decision, verdict, began)
        return None if refusal is None else refusal.reply

    async def _ledger_check(
        self, found: FoundReferences, decision: RcptDecision, keys: LedgerKeys, settings: LedgerSettings
    ) -> LedgerVerdict:
        now, cap, observe, days = int(settings.clock()), settings.max_replies, decision.observe, settings.days
        store = settings.store
        if store is None:  # closed by a stop since the RCPT: as for any store outage
            return ledger.decide(found, decision.address, None, keys, now, cap, observe, days)
        return await ledger.check(store, found, decision.address, keys, now, cap, observe, days)

    def _ledger_event(
        self, rcpt: RcptCommand, decision: RcptDecision, verdict: LedgerVerdict, began: float
    ) -> None:
        if not self.relay.observers:
            return
        mail = self._mail
        self.relay.emit(
            DecisionEvent(
                session=self.info.session,
                client=self.info.client_ip,
                role=self.info.role,
                sender=None if mail is None or mail.sender is None else str(mail.sender),
                recipient=rcpt.path,
                action=Action.RELAY if verdict.reply is None else verdict_of(verdict.reply),
                reason=verdict.reason,
                key_id=None,
                next_hop_reply=None,
                duration=time.monotonic() - began,
                would_reject=verdict.would_reject,
                address=decision.address,
                transaction_end=True,
            )
        )

    def _record(self) -> None:
        """Record the message the next hop took, without holding up the client's reply: the recorder makes
        and writes the records in groups (gateway/policy/recorder.py). An outage is logged and counted;
        the client's message is never failed for it (an answer to it would be refused later, nothing
        worse)."""
        headers, self._headers = self._headers, None
        assert headers is not None and self._rules is not None and self._rules.ledger_keys is not None
        settings = self.relay.rules.ledger
        mail = self._mail
        sender = None if mail is None or mail.sender is None else str(mail.sender)
        now = int(settings.clock())
        self.relay.recorder.add(
            Sent(self._rules.ledger_keys, headers, sender, now, settings.days, self.info.session)
        )

    # ------------------------------------------------------------------ the end of a transaction

    def _ended(self, reply: ReplyLike, next_hop: ReplyLike | None) -> None:
        """The message's line: call before _end() clears the transaction."""
        mail = self._mail
        said = None if next_hop is None else str(next_hop)
        told = str(reply)
        try:
            self.relay.on_transaction(
                TransactionEvent(
                    session=self.info.session,
                    client=self.info.client_ip,
                    role=self.info.role,
                    sender=None if mail is None or mail.sender is None else str(mail.sender),
                    recipients=self._accepted,
                    action=verdict_of(reply),
                    next_hop_reply=said,
                    reply=None if told == said else told,
                    duration=time.monotonic() - self._started,
                )
            )
        except Exception:
            # Watching the mail must never stop the mail.
            log.exception("the transaction log failed")

    def _fail(self, error: NextHopError) -> None:
        if self._failure is None:
            self._failure = error
            log.warning("session %s: next hop %s", self.info.session, error.detail)
            if self.relay.watch is not None:
                self.relay.watch.next_hop_error(error.kind)
        if self._conn is not None:
            self._conn.abort()
            self._conn = None

    def _end(self) -> None:
        """The transaction is over on our side; give the connection back in a clean state."""
        conn = self._conn
        self._conn = None
        if conn is not None:
            if self._in_data:
                conn.abort()
            elif self._troubled:
                self.relay.pool.retire(conn)
            else:
                self.relay.pool.reset_later(conn)
        self._clear()
        self.forwarded.clear()

    def reset(self) -> None:
        """RSET, HELO/EHLO, QUIT or STARTTLS from the client."""
        self.forwarded.clear()
        if self._mail is None and self._conn is None:
            return  # nothing begun since the last end (MAIL starts every transaction): already clean
        self._end()

    def abort(self) -> None:
        """The client went away, or DATA failed: drop the next-hop transaction without its final dot."""
        if self._conn is not None:
            self._conn.abort()
            self._conn = None
        self._clear()
        self.forwarded.clear()

    def close(self) -> None:
        """The client connection is gone."""
        if self._in_data:
            self.abort()
        else:
            self._end()

    # ------------------------------------------------------------------ events

    def _event(
        self, rcpt: RcptCommand, decision: RcptDecision, reply: ReplyLike | None, began: float
    ) -> None:
        if not self.relay.observers:
            return
        mail = self._mail
        if decision.action is not None:
            action = decision.action
        else:
            action = Action.RELAY if decision.relay else Action.REJECT
        if decision.relay and reply is not None and reply.code >= 400:
            # Relayed by our rules, refused downstream (or the next hop could not be reached): the verdict
            # is what the client was told, 4xx tempfail, 5xx reject; next_hop says whose it is.
            action = verdict_of(reply)
        self.relay.emit(
            DecisionEvent(
                session=self.info.session,
                client=self.info.client_ip,
                role=self.info.role,
                sender=None if mail is None or mail.sender is None else str(mail.sender),
                recipient=rcpt.path,
                action=action,
                reason=decision.reason,
                key_id=decision.key_id,
                next_hop_reply=None if reply is None or not decision.relay else _one_line(reply),
                duration=time.monotonic() - began,
                would_reject=decision.would_reject,
                address=decision.address if decision.relay else None,
            )
        )


def _one_line(reply: ReplyLike) -> str:
    if isinstance(reply, NextHopReply):
        return str(reply)
    return str(reply)


# How a pooled connection that the next hop gave up on fails at its first reply.
_STALE = (NextHopErrorKind.BROKEN, NextHopErrorKind.PROTOCOL)


class _CannotCarry(Exception):
    pass


XFORWARD_UNAVAILABLE = "[UNAVAILABLE]"  # Postfix's word for "no reverse DNS name looked up"


def _xtext(value: str) -> str:
    """RFC 3461 §4 xtext: "+", "=" and anything outside 33-126 as +HH (of the UTF-8 bytes)."""
    if value.isascii() and value.isprintable() and " " not in value and "+" not in value and "=" not in value:
        return value  # nothing to encode (the usual IP address and HELO name), tested in C
    return "".join(
        chr(b) if 33 <= b <= 126 and b not in (0x2B, 0x3D) else f"+{b:02X}"
        for b in value.encode("utf-8", "surrogateescape")
    )


__all__ = [
    "DecisionEvent",
    "InboundRules",
    "LedgerSettings",
    "OutboundRules",
    "PolicyHolder",
    "RcptDecision",
    "Relay",
    "RelaySession",
    "RoleRules",
    "SessionInfo",
    "Transaction",
    "TransactionEvent",
]
