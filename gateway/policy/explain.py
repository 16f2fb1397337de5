"""`batv-gateway explain`, in words: what the gateway would do with an address or a message, and why.

Pure: it takes the Policy (settings and keyring), `today` and the message's bytes as arguments. Every
decision comes from `Policy.inbound_rcpt`, `Policy.rewrite_exemption` and `Policy.outbound_sender`, every
tag field from `prvs.verify`/`prvs.tag_days` and `srs.reverse`/`srs.parts`, and a malformed address from
`addresses.parse_path` with the SMTP edge's own reply (`replies.malformed_address`): nothing here decides,
it only puts the typed results into sentences an operator can read. No secret and no expected hash is
ever part of an explanation; a hash is only said to match or not.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message
from typing import Any

from ..core import prvs, replies, srs
from ..core.addresses import Address, parse_path
from ..core.errors import AddressError, UsageError
from ..core.keyring import KeyState
from .policy import Action, Policy, RcptVerdict, Reason, SenderVerdict

# The reasons of what the SMTP edge refuses before the policy is asked (the policy's own are policy.Reason).
MALFORMED_ADDRESS = "malformed-address"
NULL_RECIPIENT = "null-recipient"

# What a non-null sender is, for the inbound policy: any sender but <> gets the same verdict, so the
# explanation names none.
ANY_SENDER = Address("sender", "example.net")

# Why, per Reason, in the operator's words. Every Reason has its sentence (tests/test_explain.py checks).
WHY: dict[Reason, str] = {
    Reason.VALID_PRVS: "a valid prvs tag: it is stripped and the recipient is sent on untagged",
    Reason.VALID_SRS: "a valid SRS address in our alias domain: it is decoded and sent on to the address "
    "it stands for",
    Reason.NOT_BOUNCE: "mail from a non-null sender to an untagged address: there is nothing to check",
    Reason.NOT_SIGNED_DOMAIN: "a bounce to a local domain whose return paths we do not sign "
    "([gateway] signed_domains): BATV does not apply to it",
    Reason.EXEMPT: "the recipient is exempt ([policy] exempt_local_parts, postmaster and abuse by default, "
    "or exempt_recipients): bounces to it are never refused",
    Reason.GRACE: "the address carries no tag, but signing began less than a tag's lifetime ago (keys init "
    "records when), so the bounce may answer mail sent before signing: it is accepted and counted ([policy] "
    "bounce_grace = false turns this off)",
    Reason.LEDGER: "the address carries no tag, but the Message-ID ledger is on: the bounce is sent on at "
    "RCPT and decided at the end of DATA; it passes when it refers to a message we sent from this address "
    "(an auto-reply, a read receipt, a DSN to the header From), else 550 5.7.1 (docs/ledger.md)",
    Reason.TAG_INVALID_ACCEPTED: "the tag is invalid, but the sender is not null and [policy] "
    'invalid_tag_with_sender = "accept": the mail is sent on with the tag removed where it could be read',
    Reason.UNSIGNED: "the address carries no tag, so we never used it as a return path: a bounce to it "
    "answers mail someone else sent in our name (backscatter)",
    Reason.MALFORMED: "the tag is broken, so it cannot be ours",
    Reason.BAD_HASH: "the tag's hash does not match its key: forged, altered in transit, or made with "
    "another secret",
    Reason.EXPIRED: "the tag is past its lifetime: the mail it was on left too long ago",
    Reason.UNKNOWN_KEY: "the tag names a key this keyring does not hold, or has retired",
    Reason.RELAY_DENIED: "the domain is not one of ours ([gateway] local_domains, signed_domains, "
    "[srs] alias): the gateway relays only to its own domains",
    Reason.SOURCE_ROUTED: "the address carries sender-specified routing (%, ! or a quoted @), which the "
    "gateway never relays",
    Reason.PRVS: "a sender in a signed domain: it gets a prvs tag made with the active key",
    Reason.SRS0: "a sender outside our signed domains (forwarded mail): it is rewritten to SRS0 in our "
    "alias domain, so that bounces come back to us",
    Reason.SRS1: "an SRS0 address of another forwarder: it is wrapped in SRS1 in our alias domain",
    Reason.NULL_SENDER: "the null sender <> is never tagged: bounces keep an empty return path",
    Reason.ALREADY_TAGGED: "it already carries a prvs tag or is one of our SRS addresses: it is never "
    "tagged twice",
    Reason.EXEMPT_SENDER: "the sender is listed in [policy] exempt_senders",
    Reason.EXEMPT_RECIPIENT: "the recipient is listed in [policy] exempt_recipients",
    Reason.LOCAL_RECIPIENT: "mail to our own domains with [policy] skip_local_recipients = true",
    Reason.ALIAS_DOMAIN: "a sender already in our SRS alias domain: left alone ([srs] always_rewrite "
    "would rewrite it)",
    Reason.NOT_REWRITTEN: "a sender we cannot rewrite: outside our signed domains with no [srs] alias, or "
    "one that prvs or SRS cannot take (another forwarder's SRS address, or over the RFC 5321 path limit)",
    Reason.NO_ACTIVE_KEY: "the keyring has no active key to sign with: the mail is deferred "
    "(run 'batv-gateway keys activate ID')",
}

_KEY_STATES = {
    KeyState.ACTIVE: "active (signs and verifies)",
    KeyState.VERIFY: "verify (verifies, no longer signs)",
    KeyState.RETIRED: "retired (verifies nothing; kept so that its id is not reused too soon)",
}


@dataclass(frozen=True)
class Verdict:
    """One role's answer for the address, in words."""

    role: str  # "inbound, null sender (a bounce)", "outbound, as the envelope sender", ...
    inbound: bool  # the inbound role's verdict (the exit code follows these)
    action: str  # policy.Action's value, or "reject" for what the SMTP edge refuses before the policy
    reason: str  # policy.Reason's value, or MALFORMED_ADDRESS / NULL_RECIPIENT
    outcome: str  # the verdict line: "reject (550 5.7.1 ...)", "relay to bob@example.com", ...
    why: str
    reply: str | None = None  # the SMTP reply refused mail gets (observe mode: what enforce mode would say)
    passes: bool = True


@dataclass(frozen=True)
class Explanation:
    input: str
    facts: tuple[tuple[str, str], ...]  # (label, words), in the order an operator reads them
    verdicts: tuple[Verdict, ...]

    @property
    def passes(self) -> bool:
        """True when every inbound verdict lets the mail through (outbound ones do not count)."""
        return all(v.passes for v in self.verdicts if v.inbound)

    def lines(self) -> list[str]:
        out = [f"{label}: {words}" for label, words in self.facts]
        for verdict in self.verdicts:
            out += [f"{verdict.role}:", f"  verdict: {verdict.outcome}", f"  why: {verdict.why}"]
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "passes": self.passes,
            "facts": dict(self.facts),
            "verdicts": [
                {
                    "role": v.role,
                    "action": v.action,
                    "reason": v.reason,
                    "reply": v.reply,
                    "passes": v.passes,
                    "verdict": v.outcome,
                    "why": v.why,
                }
                for v in self.verdicts
            ],
        }


# ---------------------------------------------------------------- an address


def explain_address(
    text: str,
    policy: Policy,
    today: int,
    *,
    senders: Sequence[Address | None] = (None, ANY_SENDER),
    observe: bool = False,
    ledger: bool = False,
    outbound: bool = True,
    facts: Sequence[tuple[str, str]] = (),
) -> Explanation:
    """What the inbound role does with `text` as a recipient (once per sender in `senders`, None being the
    null sender) and, with `outbound`, what the outbound role does with it as the envelope sender.
    `observe`: the inbound listener is in observe mode. `ledger`: the inbound listener has the Message-ID
    ledger on (it defers an untagged bounce to the end of DATA). `facts`: lines to put first."""
    found = list(facts)
    try:
        address = parse_path(text)
    except AddressError as exc:
        reply = replies.malformed_address(exc.status_hint)
        found.append(("address", f"malformed: {exc}"))
        refusals = [_refused("inbound, RCPT TO", True, MALFORMED_ADDRESS, reply, str(exc))]
        if outbound:
            refusals.append(_refused("outbound, MAIL FROM", False, MALFORMED_ADDRESS, reply, str(exc)))
        return Explanation(text, tuple(found), tuple(refusals))

    if address is None:
        found.append(("address", "<> (the null sender)"))
        verdicts = [
            _refused(
                "inbound, RCPT TO",
                True,
                NULL_RECIPIENT,
                replies.NULL_RECIPIENT,
                "the null address <> can be a sender only, never a recipient",
            )
        ]
        if outbound:
            verdicts.append(_outbound(policy.outbound_sender(None, today), None))
        return Explanation(text, tuple(found), tuple(verdicts))

    found.append(("address", str(address)))
    found += _domain_facts(address, policy)
    found += _tag_facts(address, policy, today)
    verdicts = [
        _inbound(sender, policy.inbound_rcpt(sender, address, today, observe=observe, ledger=ledger))
        for sender in senders
    ]
    if outbound:
        exemption = policy.rewrite_exemption(address, None)
        verdicts.append(_outbound(policy.outbound_sender(address, today, exemption), address))
    return Explanation(text, tuple(found), tuple(verdicts))


def _refused(role: str, inbound: bool, reason: str, reply: replies.Reply, why: str) -> Verdict:
    """What the SMTP edge refuses before the policy is asked."""
    return Verdict(role, inbound, Action.REJECT.value, reason, f"reject ({reply})", why, str(reply), False)


def _domain_facts(address: Address, policy: Policy) -> list[tuple[str, str]]:
    s = policy.settings
    domain = address.domain.lower().rstrip(".")
    kinds = []
    if domain in s.local_domains:
        kinds.append("local")
    if domain in s.signed_domains:
        kinds.append("signed")
    if domain == s.srs_alias:
        kinds.append("our SRS alias")
    if domain in s.observe_domains:
        kinds.append("in observe mode")
    words = f"ours ({', '.join(kinds)})" if kinds else "not one of ours"
    return [("domain", f"{address.domain}: {words}")]


def _tag_facts(address: Address, policy: Policy, today: int) -> list[tuple[str, str]]:
    s = policy.settings
    text = str(address)
    if prvs.is_prvs(address.local):
        return _prvs_facts(prvs.verify(text, policy.keyring, today, s.lifetime_days), policy, today)
    if srs.is_srs(text):
        if address.domain.lower().rstrip(".") != s.srs_alias:
            return [("tag", "none: it looks like SRS, but only SRS addresses in our alias domain are ours")]
        return _srs_facts(text, policy, today)
    if address.local[:5].lower() == "prvs=":
        return [
            (
                "tag",
                "none: it starts with prvs= but is not prvs=KDDDHHHHHH= (key digit, 3-digit day "
                "stamp, 6 hex digits), so it is read as unsigned",
            )
        ]
    return [("tag", "none (unsigned)")]


def _prvs_facts(result: prvs.PrvsResult, policy: Policy, today: int) -> list[tuple[str, str]]:
    lifetime = policy.settings.lifetime_days
    facts = [("tag", f"prvs ({result.verdict.value}): {result.reason}")]
    if result.key_id is not None:
        key = policy.keyring.get(result.key_id)
        state = _KEY_STATES[key.state] if key is not None else "unknown (not in this keyring)"
        facts.append(("key", f"{result.key_id}: {state}"))
    days = prvs.tag_days(result, today, lifetime)
    if days is not None:
        if days.days_left >= 0:
            left = f"{days.days_left} day(s) left" if days.days_left else "its last day"
        else:
            left = f"expired {-days.days_left} day(s) ago"
        facts.append(("day stamp", f"{days.stamp}: valid until {date_words(days.expiry_day)}; {left}"))
        facts.append(
            (
                "signed",
                f"{date_words(days.signed_day)}, {_ago(days.age)}, if made with our {lifetime}-day lifetime",
            )
        )
    facts.append(("hash", _PRVS_HASH[result.verdict]))
    if result.address is not None:
        facts.append(("original address", result.address))
    return facts


_PRVS_HASH = {
    prvs.PrvsVerdict.VALID: "matches",
    prvs.PrvsVerdict.EXPIRED: "matches (checked before the date: the tag is ours, only too old)",
    prvs.PrvsVerdict.BAD_HASH: "does not match",
    prvs.PrvsVerdict.UNKNOWN_KEY: "not checked: there is no key to check it with",
    prvs.PrvsVerdict.MALFORMED: "not checked: the tag cannot be read",
    prvs.PrvsVerdict.UNSIGNED: "none: there is no tag",
}


def _srs_facts(text: str, policy: Policy, today: int) -> list[tuple[str, str]]:
    options = policy.settings.srs_options
    result = srs.reverse(text, policy.keyring.srs_secrets(), today, options)
    parts = srs.parts(text, today)
    facts = [("tag", f"{parts.tag if parts else 'SRS'} ({result.verdict.value}): {result.reason}")]
    if parts is not None and parts.timestamp is not None and parts.age is not None:
        left = options.max_age - parts.age
        when = f"{left} day(s) left" if left >= 0 else f"past the max_age of {options.max_age} days"
        facts.append(("timestamp", f"{parts.timestamp}: {_ago(parts.age)}; {when}"))
    elif parts is not None:
        facts.append(("timestamp", f"none in SRS1: {parts.host} checks the SRS0 timestamp"))
    facts.append(("hash", _SRS_HASH[result.verdict]))
    if result.address is not None:
        facts.append(("decoded address", result.address))
    elif parts is not None:
        facts.append(("claims to stand for", f"{parts.original} (not decoded: the address did not verify)"))
    return facts


_SRS_HASH = {
    srs.SrsVerdict.VALID: "matches one of our keys",
    srs.SrsVerdict.EXPIRED: "matches one of our keys (checked before the age: ours, only too old)",
    srs.SrsVerdict.BAD_HASH: "does not match any of our keys",
    srs.SrsVerdict.MALFORMED: "not checked: the address cannot be read",
    srs.SrsVerdict.NOT_SRS: "none: it is not an SRS address",
}


def _inbound(sender: Address | None, verdict: RcptVerdict) -> Verdict:
    role = (
        "inbound, null sender (a bounce)"
        if sender is None
        else ("inbound, any other sender" if sender is ANY_SENDER else f"inbound, sender <{sender}>")
    )
    why = WHY[verdict.reason]
    if verdict.key_id is not None and verdict.reason is Reason.VALID_PRVS:
        why += f" (key {verdict.key_id})"
    action, reason = verdict.action.value, verdict.reason.value
    if verdict.action is Action.DEFER:
        # Not refused at RCPT: the verdict is the ledger's, on the message and the store, neither of which
        # explain has. Counted as through, as observe mode is: nothing is refused here.
        outcome = (
            f"accept the RCPT and relay to {verdict.address}; the message is decided at the end of DATA by "
            "the Message-ID ledger, which explain cannot see: it passes only if it refers to a message we "
            "sent from this address, else 550 5.7.1"
        )
        return Verdict(role, True, action, reason, outcome, why)
    if verdict.action is Action.RELAY:
        if verdict.would_reject is not None:
            outcome = (
                f"relay to {verdict.address} in observe mode; enforce mode would reply {verdict.would_reject}"
            )
            return Verdict(role, True, action, reason, outcome, why, str(verdict.would_reject))
        outcome = f"relay to {verdict.address} (the next hop answers the RCPT)"
        return Verdict(role, True, action, reason, outcome, why)
    reply = verdict.reply or replies.LOCAL_ERROR
    return Verdict(role, True, action, reason, f"{action} ({reply})", why, str(reply), passes=False)


def _outbound(verdict: SenderVerdict, sender: Address | None) -> Verdict:
    role = "outbound, as the envelope sender"
    why = WHY[verdict.reason]
    if verdict.key_id is not None:
        why += f" (key {verdict.key_id})"
    action, reason = verdict.action.value, verdict.reason.value
    if verdict.action is not Action.RELAY:
        reply = verdict.reply or replies.LOCAL_ERROR
        return Verdict(role, False, action, reason, f"{action} ({reply})", why, str(reply), passes=False)
    shown = f"<{verdict.address}>"
    changed = sender is not None and verdict.address != str(sender)
    outcome = f"relay as {shown}" if changed else f"relay with {shown} left as it is"
    return Verdict(role, False, action, reason, outcome, why)


def date_words(day: int) -> str:
    return f"{datetime.fromtimestamp(day * 86400, UTC).date().isoformat()} (day {day})"


def _ago(days: int) -> str:
    if days == 0:
        return "today"
    return f"{days} day(s) ago" if days > 0 else f"{-days} day(s) from now"


# ---------------------------------------------------------------- a message


@dataclass(frozen=True)
class Envelope:
    """What a saved message says about its envelope, and where each part was taken from."""

    recipient: str | None  # the envelope recipient as written (no angle brackets), None when none found
    recipient_from: str | None  # the header it came from
    sender: str | None  # the Return-Path's path ("" = the null sender), None when there is no Return-Path
    dsn: tuple[tuple[str, str], ...] = ()  # a DSN's returned fields, for information


_RECIPIENT_HEADERS = ("Delivered-To", "X-Original-To")
_ANGLE = re.compile(r"<([^<>]*)>")


def read_envelope(data: bytes) -> Envelope:
    """The envelope of a saved message (its header; a DSN's report parts): the recipient from the topmost
    Delivered-To, else X-Original-To, else the first address of To; the sender from Return-Path."""
    # Decoded first, as UTF-8 with U+FFFD for anything else: a header with raw 8-bit bytes (SMTPUTF8 mail,
    # or a broken one) then reads as text that prints, rather than as surrogates that do not.
    message = email.parser.Parser(policy=email.policy.compat32).parsestr(data.decode("utf-8", "replace"))
    recipient: str | None = None
    recipient_from: str | None = None
    for name in _RECIPIENT_HEADERS:
        value = message.get(name)
        if value is not None and _path(str(value)):
            recipient, recipient_from = _path(str(value)), name
            break
    else:
        to = message.get_all("To") or []
        pairs = [addr for _, addr in email.utils.getaddresses([str(v) for v in to]) if addr]
        if pairs:
            recipient, recipient_from = pairs[0], "To"
    return_path = message.get("Return-Path")
    sender = None if return_path is None else _path(str(return_path))
    return Envelope(recipient, recipient_from, sender, _dsn_fields(message))


def _path(value: str) -> str:
    """The address in a header such as Return-Path: <a@b> (the inside of the brackets), or the bare value."""
    found = _ANGLE.search(value)
    return (found.group(1) if found else value).strip()


def _dsn_fields(message: Message) -> tuple[tuple[str, str], ...]:
    """RFC 3464's per-recipient fields and the returned Message-ID, when the message is a DSN."""
    if message.get_content_type() != "multipart/report":
        return ()
    fields: list[tuple[str, str]] = []
    for part in message.walk():
        kind = part.get_content_type()
        payload = part.get_payload()
        if kind == "message/delivery-status" and isinstance(payload, list):
            # The first block is per message; the next ones are per recipient: show the first recipient.
            for block in payload[1:2]:
                if not isinstance(block, Message):
                    continue
                for name in ("Original-Recipient", "Final-Recipient", "Action", "Status"):
                    if block.get(name) is not None:
                        fields.append((f"dsn {name.lower()}", " ".join(str(block[name]).split())))
        elif kind == "text/rfc822-headers" and isinstance(payload, str):
            returned = email.parser.HeaderParser(policy=email.policy.compat32).parsestr(payload)
            fields += _message_id(returned)
        elif kind == "message/rfc822" and isinstance(payload, list):
            for returned_message in payload[:1]:
                if isinstance(returned_message, Message):
                    fields += _message_id(returned_message)
    return tuple(fields)


def _message_id(returned: Message) -> list[tuple[str, str]]:
    value = returned.get("Message-ID")
    return [] if value is None else [("dsn returned message-id", " ".join(str(value).split()))]


def explain_message(
    envelope: Envelope,
    policy: Policy,
    today: int,
    *,
    source: str,
    given_sender: tuple[Address | None] | None = None,
    observe: bool = False,
    ledger: bool = False,
) -> Explanation:
    """The inbound verdict for the message's envelope. `given_sender`: (the sender,) to use instead of the
    Return-Path (None in it is the null sender). `source`: what the message was read from, for the words.
    Raises UsageError when the message names no recipient."""
    if envelope.recipient is None:
        raise UsageError(
            f"{source}: no Delivered-To, X-Original-To or To address: give the recipient ADDRESS instead"
        )
    facts: list[tuple[str, str]] = [("message", source)]
    senders: tuple[Address | None, ...]
    if given_sender is not None:
        senders = given_sender
        facts.append(("sender", f"{_shown(given_sender[0])} (from --sender)"))
    elif envelope.sender is None:
        senders = (None, ANY_SENDER)
        facts.append(("sender", "unknown: no Return-Path header, so both cases are shown"))
    else:
        try:
            taken = parse_path(f"<{envelope.sender}>")
        except AddressError as exc:
            senders = (None, ANY_SENDER)
            facts.append(("sender", f"unknown: the Return-Path is not an address ({exc}); both cases shown"))
        else:
            senders = (taken,)
            bounce = ": a bounce" if taken is None else ""
            facts.append(("sender", f"{_shown(taken)} (from Return-Path{bounce})"))
    facts += envelope.dsn
    facts.append(("recipient", f"{envelope.recipient} (from {envelope.recipient_from})"))
    return explain_address(
        envelope.recipient,
        policy,
        today,
        senders=senders,
        observe=observe,
        ledger=ledger,
        outbound=False,
        facts=facts,
    )


def _shown(sender: Address | None) -> str:
    return "<>" if sender is None else f"<{sender}>"
