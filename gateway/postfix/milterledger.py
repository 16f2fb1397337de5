"""The Message-ID ledger at the milter's end of message (milterd.EndOfMessageHook; docs/ledger.md).

The proxy's two roles (relay.py), on what the MTA gave the milter instead of the DATA stream:
- outbound: the message is recorded with ledger.make_record from its header block (Message-ID, From,
  Reply-To, Disposition-Notification-To) and its envelope sender as the client gave it, before signing.
  The write goes on in the background (`records_written` waits for it): the MTA's reply is not held up,
  and an outage is logged, never the sender's failure.
- inbound: a null-sender message to an untagged address in a signed domain was deferred at RCPT (policy's
  Action.DEFER, Reason.LEDGER, kept by `holds`); here ledger.check decides each such recipient from the
  references in the headers and the first messageids.SCAN_LIMIT octets of the message, as the proxy's scan
  does. The first refusal is the message's reply: 550 5.7.1, 451 4.3.0 (the store could not answer) or
  552 5.3.4 (nothing found within the bound). Observe mode is [policy] observe_domains' (the milter has
  no listener of its own to be observing): there a refusal is logged and the message passes.

The MTA hands the milter the header fields one by one and the body unstuffed; both are put back into the
stream the feeders read (messageids.py takes SMTP's dot-stuffed form), so the parsing is theirs alone.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable

from ..core.logs import log_fields
from ..core.replies import Reply, ledger_unavailable
from ..policy import ledger
from ..policy.ledger import LedgerKeys, LedgerStore, LedgerVerdict, RecordOutcome
from ..policy.messageids import HEADER_LIMIT, SCAN_LIMIT, InboundReferences, OutboundHeaders
from ..policy.policy import Action, Policy, RcptVerdict, Reason
from ..policy.recorder import LedgerRecorder, Sent
from .milterd import Direction, FinishedMessage
from .socketmap import PolicySource

log = logging.getLogger("gateway.milter")

_SCAN_ON_THREAD = 64 * 1024  # as relay.py: a large prefix is parsed off the event loop
_LINE_START_DOT = re.compile(rb"^\.", re.MULTILINE)


def wire_stream(headers: tuple[tuple[str, str], ...], body: bytes, limit: int) -> bytes:
    """The message as the feeders read it: the header block, the empty line, the body, at most `limit`
    octets before stuffing (one more than a feeder's bound still shows it crossed), dot-stuffed."""
    lines = []
    for name, value in headers:
        # Postfix gives a folded value with bare LF line ends; the feeders unfold CRLF and LF alike.
        lines.append(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))
    raw = (b"".join(lines) + b"\r\n" + body)[:limit]
    return _LINE_START_DOT.sub(b"..", raw)


class LedgerHook:
    """milterd.EndOfMessageHook for the Message-ID ledger over `store` (open while the milter runs)."""

    def __init__(
        self,
        source: PolicySource,
        store: LedgerStore,
        days: int = ledger.LEDGER_DAYS,
        max_replies: int = ledger.MAX_REPLIES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.store = store
        self.days = days
        self.max_replies = max_replies
        self.clock = clock
        self.recorder = LedgerRecorder(lambda: self.store, "queue ids", self._not_ledgered)

    def reads(self, policy: Policy) -> bool:
        return policy.ledger_keys is not None

    def holds(self, verdict: RcptVerdict) -> bool:
        return verdict.action is Action.DEFER and verdict.reason is Reason.LEDGER

    async def end_of_message(self, message: FinishedMessage) -> Reply | None:
        policy = self.source.policy
        keys = policy.ledger_keys
        if message.direction is Direction.OUTBOUND:
            if keys is not None:
                self._record(message, keys)
            return None
        held = [r for r in message.recipients if r.held and r.verdict is not None]
        if not held:
            return None
        scan = InboundReferences()
        scan.feed(wire_stream(message.headers, message.body, SCAN_LIMIT + 1))
        found = await asyncio.to_thread(scan.result) if scan.held > _SCAN_ON_THREAD else scan.result()
        now = int(self.clock())
        refusal: LedgerVerdict | None = None
        for rcpt in held:
            assert rcpt.verdict is not None and rcpt.address is not None
            address = rcpt.verdict.address
            if refusal is not None:
                verdict = refusal  # one message, one reply: refused already
            else:
                observe = policy.observes(rcpt.address)
                if keys is None:
                    verdict = _unkeyed(address, observe)
                else:
                    verdict = await ledger.check(
                        self.store, found, address, keys, now, self.max_replies, observe, self.days
                    )
                if not verdict.passes:
                    refusal = verdict
            self._log(message, address, verdict)
        return None if refusal is None else refusal.reply

    def _record(self, message: FinishedMessage, keys: LedgerKeys) -> None:
        headers = OutboundHeaders()
        headers.feed(wire_stream(message.headers, b"", HEADER_LIMIT + 1))
        sender = None if message.sender is None else str(message.sender)
        now = int(self.clock())
        self.recorder.add(Sent(keys, headers, sender, now, self.days, message.queue_id or "-"))

    def _not_ledgered(self, outcome: RecordOutcome, queue_ids: tuple[str, ...]) -> None:
        if outcome in (RecordOutcome.RECORDED, RecordOutcome.STORE_UNAVAILABLE):
            return  # the recorder logs a group the store could not take
        for queue_id in queue_ids:
            log_fields(
                log, logging.INFO, "not ledgered", event="ledger", queue_id=queue_id, outcome=outcome.value
            )

    async def records_written(self) -> None:
        """Until every record asked for so far is written (or has failed): before the store closes."""
        await self.recorder.written()

    def _log(self, message: FinishedMessage, address: str, verdict: LedgerVerdict) -> None:
        reply = verdict.reply or verdict.would_reject
        log_fields(
            log,
            logging.INFO,
            "decision",
            event="decision",
            queue_id=message.queue_id,
            client=message.client,
            role=message.direction.value,
            sender="",
            recipient=address,
            verdict=verdict.action.value,
            reason=verdict.reason.value,
            observed=verdict.observed,
            reply=str(reply) if reply is not None else "",
        )


def _unkeyed(recipient: str, observe: bool) -> LedgerVerdict:
    """A keyring reloaded without its ledger secret between RCPT and end of message: nothing can be
    looked up, so it is the store outage's 451 (in observe mode, passed and logged)."""
    reply = ledger_unavailable(recipient)
    reason = ledger.LedgerReason.STORE_UNAVAILABLE
    if observe:
        return LedgerVerdict(ledger.LedgerAction.PASS, reason, None, observed=True, would_reject=reply)
    return LedgerVerdict(ledger.LedgerAction.TEMPFAIL, reason, reply)
