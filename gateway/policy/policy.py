"""The one policy: what happens to each envelope address. Pure: no sockets, no clock, no files.

Three front ends call it and none of them has a rule of its own: the SMTP gateway (`relay.py`), the
Postfix socketmap (`socketmap.py`) and the Postfix policy service (`policyd.py`).

Inbound (the MX side), per RCPT:
- A recipient outside our domains is refused as relaying, and so is one that carries sender-specified
  routing (`%`, `!`, `@` inside quotes): the next hop might honour it, and the policy must decide on the
  address it sends on.
- A valid prvs tag is stripped; a valid SRS address in our alias domain is reversed.
- A null sender (a DSN, RFC 3464) to an unsigned, malformed, forged, unknown-key or expired address in a
  signed domain is refused with 550 5.7.1, unless the recipient is exempt (postmaster and abuse always are)
  or the listener or domain is in observe mode, where it is accepted and reported as a would-reject.
- The grace window: for `lifetime_days` after the keyring began signing (`keys init`), a null sender to
  an untagged address in a signed domain is accepted (reason `grace`): it may be the bounce of mail sent
  before signing began. A tag that fails is never covered, and `bounce_grace = false` turns it off. In
  observe mode such a bounce is still reported as a would-reject, since finding them is observing's job.
- The Message-ID ledger (docs/ledger.md): past the grace window, when the front end can read the message
  and asks for it (`ledger=True`), such a bounce is deferred (Action.DEFER, reason `ledger`) instead of
  refused: sent on at RCPT and decided at the end of DATA on what it refers to (`ledger.decide`). A tag
  that fails is never deferred: the ledger only vouches for untagged addresses. In observe mode it is
  deferred too, and the end of DATA counts what it would have refused.
- A non-null sender writing to a tagged address (a reply, a callout) gets the tag stripped; an invalid tag
  there is accepted by default (`invalid_tag_with_sender`).

Outbound (the relay hop), per transaction: a sender in a signed domain gets a prvs tag, a foreign sender
(forwarded mail) gets SRS0 in our alias domain, or SRS1 when it already is SRS. The null sender, tagged
senders and configured exemptions are left alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..core import prvs, replies, srs
from ..core.addresses import Address, parse_address
from ..core.errors import GatewayError
from ..core.keyring import Keyring
from ..core.replies import Reply
from .ledger import LedgerKeys


class Action(enum.Enum):
    RELAY = "relay"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    # Inbound: sent on to the next hop at RCPT, decided at the end of DATA (the Message-ID ledger). Only
    # a front end that sees the message can ask for it: the policy service, which sees no body, never does.
    DEFER = "defer"


class Reason(enum.Enum):
    # inbound, relayed
    VALID_PRVS = "valid-prvs"
    VALID_SRS = "valid-srs"
    NOT_BOUNCE = "not-bounce"  # a non-null sender to an untagged address
    NOT_SIGNED_DOMAIN = "not-signed-domain"  # a bounce to a local domain we do not sign
    EXEMPT = "exempt"
    GRACE = "grace"  # a bounce to an untagged address in the days after signing began
    TAG_INVALID_ACCEPTED = "invalid-tag-accepted"  # a non-null sender to an invalid tag, accepted by config
    # inbound, deferred: a bounce to an untagged address, decided at the end of DATA by the ledger
    LEDGER = "ledger"
    # inbound, refused (or observed)
    UNSIGNED = "unsigned"
    MALFORMED = "malformed"
    BAD_HASH = "bad-hash"
    EXPIRED = "expired"
    UNKNOWN_KEY = "unknown-key"
    RELAY_DENIED = "relay-denied"
    SOURCE_ROUTED = "source-routed"
    # outbound
    PRVS = "prvs"
    SRS0 = "srs0"
    SRS1 = "srs1"
    NULL_SENDER = "null-sender"
    ALREADY_TAGGED = "already-tagged"
    EXEMPT_SENDER = "exempt-sender"
    EXEMPT_RECIPIENT = "exempt-recipient"
    LOCAL_RECIPIENT = "local-recipient"
    ALIAS_DOMAIN = "alias-domain"  # a sender already in our SRS alias domain
    NOT_REWRITTEN = "not-rewritten"  # a foreign sender with no SRS alias configured, or one SRS cannot take
    NO_ACTIVE_KEY = "no-active-key"


class InvalidTagAction(enum.Enum):
    """What a non-null sender writing to an invalid tag gets."""

    ACCEPT = "accept"
    REJECT = "reject"


_PRVS_REASONS = {
    prvs.PrvsVerdict.MALFORMED: Reason.MALFORMED,
    prvs.PrvsVerdict.BAD_HASH: Reason.BAD_HASH,
    prvs.PrvsVerdict.EXPIRED: Reason.EXPIRED,
    prvs.PrvsVerdict.UNKNOWN_KEY: Reason.UNKNOWN_KEY,
    prvs.PrvsVerdict.UNSIGNED: Reason.UNSIGNED,
}
_SRS_REASONS = {
    srs.SrsVerdict.MALFORMED: Reason.MALFORMED,
    srs.SrsVerdict.BAD_HASH: Reason.BAD_HASH,
    srs.SrsVerdict.EXPIRED: Reason.EXPIRED,
    srs.SrsVerdict.NOT_SRS: Reason.UNSIGNED,
}
# A wrong hash or a key id we never used is what a guessing attacker produces; an expired or unsigned
# address is what ordinary backscatter looks like. Only the first kind feeds the guess limiter.
_GUESSES = frozenset({Reason.BAD_HASH, Reason.UNKNOWN_KEY})


@dataclass(frozen=True)
class PolicySettings:
    local_domains: frozenset[str]
    signed_domains: frozenset[str]
    srs_alias: str | None = None
    srs_options: srs.SrsOptions = field(default_factory=srs.SrsOptions)
    lifetime_days: int = 7
    # RFC 5321 4.5.1 requires postmaster to accept mail; operators expect the same of abuse.
    exempt_local_parts: frozenset[str] = frozenset({"postmaster", "abuse"})
    exempt_recipients: frozenset[str] = frozenset()  # addresses or domains, compared without case
    exempt_senders: frozenset[str] = frozenset()  # addresses or domains, compared without case
    observe_domains: frozenset[str] = frozenset()
    invalid_tag_with_sender: InvalidTagAction = InvalidTagAction.ACCEPT
    skip_local_recipients: bool = False  # outbound: leave mail to our own domains unsigned
    # Inbound: accept bounces to untagged addresses for lifetime_days after the keyring began signing.
    bounce_grace: bool = True

    def __post_init__(self) -> None:
        # Normalise once here so that every comparison below is a plain set lookup.
        for name in (
            "local_domains",
            "signed_domains",
            "exempt_recipients",
            "exempt_senders",
            "observe_domains",
        ):
            object.__setattr__(self, name, frozenset(d.lower().rstrip(".") for d in getattr(self, name)))
        object.__setattr__(self, "exempt_local_parts", frozenset(p.lower() for p in self.exempt_local_parts))
        if self.srs_alias is not None:
            object.__setattr__(self, "srs_alias", self.srs_alias.lower().rstrip("."))

    @property
    def our_domains(self) -> frozenset[str]:
        alias = {self.srs_alias} if self.srs_alias else set()
        return self.local_domains | self.signed_domains | alias


@dataclass(frozen=True)
class RcptVerdict:
    action: Action
    address: str  # the canonical recipient to send on
    reason: Reason
    reply: Reply | None = None  # what the client is told when the action is not RELAY
    failed_guess: bool = False
    would_reject: Reply | None = None  # observe mode: what enforce mode would have said
    key_id: int | None = None


@dataclass(frozen=True)
class SenderVerdict:
    action: Action
    address: str  # the envelope sender to send on; "" is the null sender
    reason: Reason
    reply: Reply | None = None
    key_id: int | None = None


def _listed(address: Address, entries: frozenset[str]) -> bool:
    if not entries:
        return False
    domain = address.domain.lower().rstrip(".")
    return domain in entries or f"{address.local.lower()}@{domain}" in entries


def _routed(local: str) -> bool:
    """Sender-specified routing in a local part: user%host, host!user or "user@host"."""
    return "%" in local or "!" in local or "@" in local


class Policy:
    def __init__(self, settings: PolicySettings, keyring: Keyring) -> None:
        self.settings = settings
        self.keyring = keyring
        self._srs_secrets = keyring.srs_secrets()
        # None without a ledger secret in the keyring: the ledger is then off.
        self.ledger_keys = LedgerKeys(keyring.ledger_secret) if keyring.ledger_secret else None

    # --- inbound ------------------------------------------------------------------------------------
    def inbound_rcpt(
        self, sender: Address | None, rcpt: Address, today: int, observe: bool = False, ledger: bool = False
    ) -> RcptVerdict:
        """`ledger`: the caller reads the message and has the ledger on, so an untagged bounce in a signed
        domain may be deferred to the end of DATA rather than refused here."""
        s = self.settings
        domain = rcpt.domain.lower().rstrip(".")
        text = str(rcpt)
        if domain not in s.our_domains:
            return RcptVerdict(Action.REJECT, text, Reason.RELAY_DENIED, replies.relay_denied(text))

        target = text  # what is sent on
        failure: Reason | None = None
        key_id: int | None = None
        tag_valid = False
        if prvs.is_prvs(rcpt.local):
            checked = prvs.verify(text, self.keyring, today, s.lifetime_days)
            key_id = checked.key_id
            if checked.address is not None:
                target = checked.address
            tag_valid = checked.verdict is prvs.PrvsVerdict.VALID
            if not tag_valid:
                failure = _PRVS_REASONS[checked.verdict]
        elif domain == s.srs_alias and srs.is_srs(text):
            reversed_ = srs.reverse(text, self._srs_secrets, today, s.srs_options)
            if reversed_.verdict is srs.SrsVerdict.VALID and reversed_.address is not None:
                # A valid SRS address decodes to a foreign one: relaying it on is the point of SRS, and
                # the hash is what makes that safe. An invalid one is never decoded.
                return RcptVerdict(Action.RELAY, reversed_.address, Reason.VALID_SRS)
            failure = _SRS_REASONS[reversed_.verdict]

        try:
            final = _parse_target(target, rcpt)
        except GatewayError:
            final = rcpt
        if _routed(final.local):
            return RcptVerdict(Action.REJECT, text, Reason.SOURCE_ROUTED, replies.relay_denied(text))

        if tag_valid:
            return RcptVerdict(Action.RELAY, target, Reason.VALID_PRVS, key_id=key_id)

        if sender is not None:
            if failure is None:
                return RcptVerdict(Action.RELAY, target, Reason.NOT_BOUNCE)
            if s.invalid_tag_with_sender is InvalidTagAction.ACCEPT:
                return RcptVerdict(Action.RELAY, target, Reason.TAG_INVALID_ACCEPTED, key_id=key_id)
            reply = replies.tag_refused(text, failure.value)
        else:
            if final.local.lower() in s.exempt_local_parts or _listed(final, s.exempt_recipients):
                return RcptVerdict(Action.RELAY, target, Reason.EXEMPT, key_id=key_id)
            if failure is None:
                if domain not in s.signed_domains:
                    return RcptVerdict(Action.RELAY, target, Reason.NOT_SIGNED_DOMAIN)
                if not (observe or domain in s.observe_domains) and self.in_grace(today):
                    return RcptVerdict(Action.RELAY, target, Reason.GRACE)
                if ledger:
                    return RcptVerdict(Action.DEFER, target, Reason.LEDGER)
                failure = Reason.UNSIGNED
            reply = replies.bounce_refused(text, failure.value)

        guess = failure in _GUESSES
        if observe or domain in s.observe_domains:
            return RcptVerdict(
                Action.RELAY, target, failure, failed_guess=guess, would_reject=reply, key_id=key_id
            )
        return RcptVerdict(Action.REJECT, text, failure, reply, failed_guess=guess, key_id=key_id)

    def observes(self, rcpt: Address, observe: bool = False) -> bool:
        """Is a refusal for `rcpt` only counted (the listener's `observe`, or [policy] observe_domains)?"""
        return observe or rcpt.domain.lower().rstrip(".") in self.settings.observe_domains

    def in_grace(self, today: int) -> bool:
        """True while a bounce may still answer mail sent before signing began: the window lasts as long
        as a tag signed on the first day stays valid (`lifetime_days`), the time a bounce is given."""
        began = self.keyring.signing_began_day
        if not self.settings.bounce_grace or began is None:
            return False
        return today < began + self.settings.lifetime_days

    def reverse_recipient(self, rcpt: Address, today: int) -> str | None:
        """The address a tagged recipient stands for, or None when it is not validly tagged."""
        s = self.settings
        text = str(rcpt)
        if prvs.is_prvs(rcpt.local):
            checked = prvs.verify(text, self.keyring, today, s.lifetime_days)
            return checked.address if checked.verdict is prvs.PrvsVerdict.VALID else None
        if s.srs_alias and rcpt.domain.lower().rstrip(".") == s.srs_alias and srs.is_srs(text):
            reversed_ = srs.reverse(text, self._srs_secrets, today, s.srs_options)
            return reversed_.address if reversed_.verdict is srs.SrsVerdict.VALID else None
        return None

    # --- outbound -----------------------------------------------------------------------------------
    def rewrite_exemption(self, sender: Address | None, rcpt: Address | None) -> Reason | None:
        """Why this sender/recipient pair must not be rewritten, or None. Cheap: no HMAC."""
        s = self.settings
        if sender is None:
            return Reason.NULL_SENDER
        if _listed(sender, s.exempt_senders):
            return Reason.EXEMPT_SENDER
        if rcpt is not None:
            if _listed(rcpt, s.exempt_recipients):
                return Reason.EXEMPT_RECIPIENT
            if s.skip_local_recipients and rcpt.domain.lower().rstrip(".") in s.local_domains:
                return Reason.LOCAL_RECIPIENT
        return None

    @property
    def exempts_senders(self) -> bool:
        """False when rewrite_exemption(sender, None) is None for every sender but the null one, so that a
        caller on a hot path need not ask it per sender (socketmap.FastForward)."""
        return bool(self.settings.exempt_senders)

    def outbound_route(self, domain: str) -> Reason:
        """The per-domain half of outbound_sender: what happens to an untagged sender at `domain`
        (lowercase, no trailing dot) that no exemption covers. PRVS or SRS0 (SRS1 when the sender is an
        SRS0 address) rewrite it; NOT_REWRITTEN and ALIAS_DOMAIN leave it alone; NO_ACTIVE_KEY defers it.
        Callers that rewrite many senders may keep the answer per domain (socketmap.FastForward)."""
        s = self.settings
        if not self.keyring.has_active:
            return Reason.NO_ACTIVE_KEY
        if domain in s.signed_domains:
            return Reason.PRVS
        if s.srs_alias is None:
            return Reason.NOT_REWRITTEN
        if domain == s.srs_alias and not s.srs_options.always_rewrite:
            return Reason.ALIAS_DOMAIN
        return Reason.SRS0

    def outbound_sender(
        self, sender: Address | None, today: int, exemption: Reason | None = None
    ) -> SenderVerdict:
        s = self.settings
        if sender is None:
            return SenderVerdict(Action.RELAY, "", Reason.NULL_SENDER)
        text = str(sender)
        if exemption is not None:
            return SenderVerdict(Action.RELAY, text, exemption)
        domain = sender.domain.lower().rstrip(".")
        if prvs.is_prvs(sender.local) or (domain == s.srs_alias and srs.is_srs(text)):
            return SenderVerdict(Action.RELAY, text, Reason.ALREADY_TAGGED)
        route = self.outbound_route(domain)
        if route is Reason.NO_ACTIVE_KEY:
            return SenderVerdict(Action.TEMPFAIL, text, Reason.NO_ACTIVE_KEY, replies.KEYRING_UNAVAILABLE)
        if route is Reason.PRVS:
            try:
                tagged = prvs.sign(text, self.keyring, today, s.lifetime_days)
            except GatewayError:
                # Only what prvs must never sign gets here: an SRS address of another forwarder that
                # happens to be in one of our domains, or a result over the RFC 5321 path limit.
                return SenderVerdict(Action.RELAY, text, Reason.NOT_REWRITTEN)
            return SenderVerdict(Action.RELAY, tagged, Reason.PRVS, key_id=self.keyring.active.id)
        if route is not Reason.SRS0 or s.srs_alias is None:
            return SenderVerdict(Action.RELAY, text, route)
        try:
            forwarded = srs.forward_address(
                sender, s.srs_alias, self._srs_secrets, today, s.srs_options, text
            )
        except GatewayError:
            return SenderVerdict(Action.RELAY, text, Reason.NOT_REWRITTEN)
        # A quoted local part comes back quoted as a whole ("SRS1=...a b"@alias), so look past the quote.
        reason = Reason.SRS1 if forwarded.lstrip('"')[:4].upper() == "SRS1" else Reason.SRS0
        return SenderVerdict(Action.RELAY, forwarded, reason, key_id=self.keyring.active.id)


def _parse_target(target: str, rcpt: Address) -> Address:
    return rcpt if target == str(rcpt) else parse_address(target)
