"""The milter front end: the whole gateway inside Postfix's or Sendmail's own SMTP session (`milter`).

One asyncio stream per MTA connection. Postfix opens one per SMTP session (and one per message for
non_smtpd_milters); Sendmail may carry several sessions on one (SMFIC_QUIT_NC), and each session several
transactions (SMFIC_ABORT between them). milter.py turns the bytes into messages; `MilterSession` holds
what a session and its transaction have said so far and asks policy.py, and nothing else, what to do:

Direction. A transaction is outbound (its sender is signed) when any of these hold, decided at MAIL FROM:
- the `{daemon_name}` macro is one of `[milter] outbound_daemons` (Postfix's milter_macro_daemon_name,
  "ORIGINATING" on the submission service by OpenDKIM's convention);
- the client address is in `[milter] trusted` (loopback by default: Postfix's non_smtpd_milters present
  sendmail(1) and pickup mail as a connection from 127.0.0.1);
- `{auth_authen}` is set (the client authenticated) and `[milter] authenticated_outbound` is true.
Every other transaction is inbound. Postfix and Sendmail send `{daemon_name}` with the connect macros and
`{auth_authen}` with the MAIL macros by default, so no macro list is negotiated.

Inbound, at each RCPT: policy.inbound_rcpt decides, as for the policy service (policyd.py). A refusal is
sent as our own reply (550 5.7.1 and the same text); a relay-denied verdict is left to the MTA, whose
relay rules are its own business. A recipient with a valid tag (prvs stripped, SRS reversed) cannot be
rewritten in place: at end of message it is deleted (SMFIR_DELRCPT) and its address without the tag is
added (SMFIR_ADDRCPT_PAR with the RCPT's ESMTP parameters when the MTA offers it, SMFIR_ADDRCPT
otherwise). The other way, Postfix's recipient_canonical_maps through the socketmap, needs no milter.

Outbound, at end of message (SMFIR_CHGFROM is allowed only there): the envelope sender becomes
policy.outbound_sender's prvs or SRS address, keeping MAIL FROM's RET and ENVID, when at least one
recipient is remote (not in `[gateway] local_domains`) and not exempt; mail only to our own domains is
left alone. No active key: the message is deferred (451 4.3.5).

The ledger's seam: `EndOfMessageHook` (the Message-ID ledger's is milterledger.LedgerHook). Given one, the
session also asks the MTA for the headers and the body (neither answered when the MTA can skip the wait),
asks the policy to defer an untagged bounce rather than refuse it while the hook `reads` under the
current policy, lets the hook keep such a recipient for a decision at end of message (`holds`), and asks
it at end of message (`end_of_message`); a reply from it refuses or defers the message, and nothing else
is changed. Of the body only the first MAX_BODY octets are kept, and only in a transaction that has a
held recipient (the ledger's inbound scan reads no further: messageids.SCAN_LIMIT).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..core import replies
from ..core.addresses import Address, parse_path
from ..core.errors import GatewayError
from ..core.logs import log_fields
from ..core.replies import Reply
from ..policy.messageids import SCAN_LIMIT
from ..policy.policy import Action, Policy, RcptVerdict, Reason
from . import milter
from .socketmap import PolicySource

log = logging.getLogger("gateway.milter")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_IDLE_TIMEOUT = 3600.0  # Postfix keeps the connection for the SMTP session (smtpd_timeout is 300 s)
MAX_HEADERS = 1000  # headers kept for the hook; past it the rest are not kept (Postfix caps a header block)
MAX_BODY = SCAN_LIMIT + 1  # body octets kept for the hook: the ledger's scan bound, and one to see it crossed


class Direction(enum.Enum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


@dataclass(frozen=True)
class MilterSettings:
    """`[milter]`'s rules for telling outbound mail from inbound."""

    outbound_daemons: frozenset[str] = frozenset({"ORIGINATING"})
    trusted: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    authenticated_outbound: bool = True


@dataclass(frozen=True)
class Recipient:
    raw: str  # as the MTA gave it, for SMFIR_DELRCPT
    args: tuple[str, ...]
    address: Address | None  # None: one we could not parse (the MTA accepted it; we leave it alone)
    verdict: RcptVerdict | None = None  # inbound only
    held: bool = False  # refused by the policy, kept for the hook to decide at end of message


@dataclass(frozen=True)
class FinishedMessage:
    """What the hook sees at end of message."""

    direction: Direction
    queue_id: str
    client: str
    sender: Address | None
    recipients: tuple[Recipient, ...]
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""  # the first MAX_BODY octets, kept only when a recipient is held


class EndOfMessageHook(Protocol):
    """Where the Message-ID ledger plugs in (docs/ledger.md)."""

    def reads(self, policy: Policy) -> bool:
        """True: the hook decides deferred bounces under `policy` (the ledger: its keyring has the secret)."""
        ...

    def holds(self, verdict: RcptVerdict) -> bool:
        """True: accept this refused inbound recipient at RCPT and decide at end of message."""
        ...

    async def end_of_message(self, message: FinishedMessage) -> Reply | None:
        """None: go on (the modifications are sent); a reply refuses (5xx) or defers (4xx) the message."""
        ...


def direction(settings: MilterSettings, client: str, macros: dict[str, str]) -> Direction:
    if macros.get("{daemon_name}", "") in settings.outbound_daemons:
        return Direction.OUTBOUND
    if settings.authenticated_outbound and macros.get("{auth_authen}"):
        return Direction.OUTBOUND
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return Direction.INBOUND
    return Direction.OUTBOUND if any(ip in net for net in settings.trusted) else Direction.INBOUND


@dataclass
class _Transaction:
    direction: Direction
    mail: milter.MailFrom
    sender: Address | None
    parsed: bool  # False: a sender we could not parse; the transaction is left alone
    recipients: list[Recipient] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)


class MilterSession:
    """One MTA connection's state: negotiation, the SMTP session's macros and client, the transaction.
    `handle` returns the replies to send, in order (none when the MTA does not wait for one)."""

    def __init__(
        self,
        source: PolicySource,
        settings: MilterSettings,
        hook: EndOfMessageHook | None = None,
        today: Callable[[], int] = lambda: int(time.time()) // 86400,
    ) -> None:
        self.source = source
        self.settings = settings
        self.hook = hook
        self.today = today
        self.negotiated: milter.Negotiated | None = None
        self.client = ""
        self.macros: dict[str, dict[str, str]] = {}  # command octet → the macros sent with it
        self.transaction: _Transaction | None = None
        self.closed = False

    def _macros(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for values in self.macros.values():
            merged.update(values)
        return merged

    async def handle(self, message: milter.Message) -> list[milter.Response] | milter.ProtocolError:
        if isinstance(message, milter.OptNeg):
            if self.negotiated is not None:
                return milter.ProtocolError("a second option negotiation")
            hooked = self.hook is not None
            negotiated = milter.negotiate(message, headers=hooked, body=hooked)
            if isinstance(negotiated, milter.ProtocolError):
                return negotiated
            self.negotiated = negotiated
            return [negotiated.reply]
        if self.negotiated is None:
            return milter.ProtocolError(f"{type(message).__name__} before option negotiation")
        answer = await self._answer(message)
        if isinstance(answer, milter.ProtocolError):
            return answer
        return answer if self.negotiated.expects_reply(message) else []

    async def _answer(self, message: milter.Message) -> list[milter.Response] | milter.ProtocolError:
        match message:
            case milter.Macro(command, values):
                self.macros[command] = dict(values)
            case milter.Connect(_, family, _, address):
                self.client = address if family in "46" else ("unix" if family == "L" else "")
                self.transaction = None
            case milter.MailFrom():
                self._mail(message)
            case milter.RcptTo():
                return self._rcpt(message)
            case milter.Header(name, value):
                t = self.transaction
                if t is not None and self.hook is not None and len(t.headers) < MAX_HEADERS:
                    t.headers.append((name, value))
            case milter.Body(chunk):
                t = self.transaction
                if t is not None and len(t.body) < MAX_BODY and any(r.held for r in t.recipients):
                    t.body += chunk[: MAX_BODY - len(t.body)]
            case milter.EndOfMessage():
                responses = await self._end_of_message()
                self._end_transaction()
                return responses
            case milter.Abort():
                self._end_transaction()
            case milter.QuitNewConnection():
                self._end_transaction()
                self.macros.clear()
                self.client = ""
            case milter.Quit():
                self.closed = True
        return [milter.Continue()]

    def _end_transaction(self) -> None:
        self.transaction = None
        for command in "MRTLNE":  # the transaction's macros; the connect and HELO ones stay
            self.macros.pop(command, None)

    def _mail(self, mail: milter.MailFrom) -> None:
        way = direction(self.settings, self.client, self._macros())
        try:
            sender = parse_path(mail.address)
        except GatewayError:
            self.transaction = _Transaction(way, mail, None, parsed=False)
            return
        self.transaction = _Transaction(way, mail, sender, parsed=True)

    def _rcpt(self, rcpt: milter.RcptTo) -> list[milter.Response]:
        t = self.transaction
        if t is None:
            return [milter.Continue()]  # the MTA's sequence; not ours to police
        try:
            address = parse_path(rcpt.address)
        except GatewayError:
            address = None
        if address is None or not t.parsed or t.direction is Direction.OUTBOUND:
            t.recipients.append(Recipient(rcpt.address, rcpt.args, address))
            return [milter.Continue()]
        policy = self.source.policy
        deferrable = self.hook is not None and self.hook.reads(policy)
        verdict = policy.inbound_rcpt(t.sender, address, self.today(), ledger=deferrable)
        self._log_rcpt(t, verdict)
        refused = verdict.action is not Action.RELAY and verdict.reason is not Reason.RELAY_DENIED
        if refused and self.hook is not None and self.hook.holds(verdict):
            t.recipients.append(Recipient(rcpt.address, rcpt.args, address, verdict, held=True))
            return [milter.Continue()]
        if refused:
            reply = verdict.reply or replies.LOCAL_ERROR
            return [milter.Reject(reply) if reply.permanent else milter.TempFail(reply)]
        t.recipients.append(Recipient(rcpt.address, rcpt.args, address, verdict))
        return [milter.Continue()]

    async def _end_of_message(self) -> list[milter.Response]:
        t = self.transaction
        if t is None:
            return [milter.Continue()]
        changes: list[milter.Response] = []
        if t.parsed and t.direction is Direction.OUTBOUND:
            change = self._sign(t)
            if isinstance(change, milter.TempFail):
                return [change]
            if change is not None:
                changes.append(change)
        elif t.parsed:
            changes.extend(self._strip_tags(t))
        if self.hook is not None:
            finished = FinishedMessage(
                t.direction,
                self._macros().get("i", ""),
                self.client,
                t.sender,
                tuple(t.recipients),
                tuple(t.headers),
                bytes(t.body),
            )
            reply = await self.hook.end_of_message(finished)
            if reply is not None:
                return [milter.Reject(reply) if reply.permanent else milter.TempFail(reply)]
        return [*changes, milter.Continue()]

    def _sign(self, t: _Transaction) -> milter.ChangeFrom | milter.TempFail | None:
        policy = self.source.policy
        local = policy.settings.local_domains
        sender = t.sender
        exemption = policy.rewrite_exemption(sender, None)  # the null sender, exempt_senders
        remote = [
            r.address
            for r in t.recipients
            if r.address is not None
            and r.address.domain.lower().rstrip(".") not in local
            and policy.rewrite_exemption(sender, r.address) is None
        ]
        if exemption is None and not remote:
            self._log_sender(t, "relay", Reason.LOCAL_RECIPIENT.value, str(sender or ""))
            return None
        verdict = policy.outbound_sender(sender, self.today(), exemption)
        self._log_sender(t, verdict.action.value, verdict.reason.value, verdict.address)
        if verdict.action is Action.TEMPFAIL:
            return milter.TempFail(verdict.reply or replies.KEYRING_UNAVAILABLE)
        if sender is None or verdict.address == str(sender):
            return None
        return milter.ChangeFrom(verdict.address, sender_params(t.mail.args))

    def _strip_tags(self, t: _Transaction) -> list[milter.Response]:
        assert self.negotiated is not None
        with_args = bool(self.negotiated.actions & milter.Act.ADDRCPT_PAR)
        out: list[milter.Response] = []
        for r in t.recipients:
            v = r.verdict
            if v is None or r.held or r.address is None or v.address == str(r.address):
                continue
            out.append(milter.DelRcpt(r.raw))
            out.append(milter.AddRcpt(v.address, r.args if with_args else ()))
        return out

    def _log_rcpt(self, t: _Transaction, verdict: RcptVerdict) -> None:
        self._log_decision(
            t,
            recipient=verdict.address,
            verdict=verdict.action.value,
            reason=verdict.reason.value,
            key_id=verdict.key_id,
        )

    def _log_sender(self, t: _Transaction, action: str, reason: str, address: str) -> None:
        self._log_decision(t, rewritten=address, verdict=action, reason=reason)

    def _log_decision(self, t: _Transaction, **fields: object) -> None:
        log_fields(
            log,
            logging.INFO,
            "decision",
            event="decision",
            queue_id=self._macros().get("i", ""),
            client=self.client,
            role=t.direction.value,
            sender=str(t.sender or ""),
            **fields,
        )


# The MAIL FROM parameters that travel with the envelope sender (RFC 3461 RET and ENVID). The others
# (SIZE, BODY, SMTPUTF8) describe the message the MTA already holds, and Postfix's cleanup logs each one
# given with SMFIR_CHGFROM as a warning ("Ignoring bad ESMTP parameter") and drops it.
_SENDER_PARAMS = ("RET=", "ENVID=")


def sender_params(args: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(a for a in args if a.upper().startswith(_SENDER_PARAMS))


class MilterService:
    """The asyncio edge: one MilterSession per MTA connection."""

    def __init__(
        self,
        source: PolicySource,
        settings: MilterSettings,
        hook: EndOfMessageHook | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        self.source = source
        self.settings = settings
        self.hook = hook
        self.idle_timeout = idle_timeout
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def close_connections(self) -> None:
        """Close every MTA connection and wait for their handlers to see it (Python 3.11's wait_closed
        does not; a handler still running when the loop ends would be cancelled and logged as an error).
        The MTA applies milter_default_action to what was in flight."""
        for writer in list(self.writers):
            writer.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Over TCP, Postfix writes a macro packet and then its command as two small segments, and Nagle on
        # its side holds the second until we ACK the first; the macro needs no reply, so our kernel would
        # delay that ACK (40 ms on Linux) on every command. TCP_QUICKACK, which Linux clears as it goes,
        # is set again before each read (bench/milter.py --tcp: 34 msgs/s without it, 147 with).
        sock = writer.get_extra_info("socket")
        quickack = (
            sock is not None
            and sock.family in (socket.AF_INET, socket.AF_INET6)
            and hasattr(socket, "TCP_QUICKACK")
        )
        decoder = milter.MilterDecoder()
        session = MilterSession(self.source, self.settings, self.hook)
        self.writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            while not session.closed:
                event = decoder.next_event()
                if event is milter.NEED_DATA:
                    if quickack:
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                    data = await asyncio.wait_for(reader.read(65536), self.idle_timeout or None)
                    if not data:
                        return
                    decoder.receive_data(data)
                    continue
                assert not isinstance(event, milter._NeedData)
                if isinstance(event, milter.ProtocolError):
                    self._garbage(writer, event)
                    return
                try:
                    answer = await session.handle(event)
                except Exception:
                    # A bug of ours must cost one connection (the MTA applies milter_default_action),
                    # never the service.
                    log.exception("milter session failed; connection closed")
                    return
                if isinstance(answer, milter.ProtocolError):
                    self._garbage(writer, answer)
                    return
                if answer:
                    writer.write(b"".join(milter.encode(r) for r in answer))
                    await writer.drain()
        except (TimeoutError, ConnectionError):
            return
        finally:
            self.writers.discard(writer)
            if task is not None:
                self.tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @staticmethod
    def _garbage(writer: asyncio.StreamWriter, error: milter.ProtocolError) -> None:
        peer = writer.get_extra_info("peername") or "unix"
        log.warning("milter protocol error from %s: %s; connection closed", peer, error.reason)
