"""The Message-ID ledger: which messages we sent, so that a null-sender answer to one may pass.

A null-sender message to an untagged address in a signed domain is refused today. Wanted mail looks like
that too: RFC 3834 auto-replies to Reply-To/From, RFC 8098 MDNs to Disposition-Notification-To, DSNs some
MTAs send to the header From, sender-verification callouts. The outbound role records each message it
relays (`make_record`); the inbound role, at the end of DATA, passes such a message only when it refers
to a recorded Message-ID and its recipient is one of the addresses recorded for it (`decide`).

This module is the pure part (keys, records, the decision, their replies) and the store's interface
(`LedgerStore`); `check` strings them together over any store and does no IO of its own. The SQLite store
is `ledgerstore.py`; `recorder.py` writes records behind the mail. What is stored, for how long and at
what cost: docs/ledger.md.

Keys are HMAC-SHA256 under the ledger secret, so the store never holds a Message-ID in clear. The
recipient addresses are stored as HMACs too (truncated to 16 octets), though the issue only asks it of
Message-IDs: the decision only ever needs "is this address one of them", which a keyed hash answers, and a
store shared by every worker (and later a Redis elsewhere) should not be a 30-day list of who wrote from
which address. The cost is that the store cannot tell an operator which addresses a record holds.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..core.errors import GatewayError
from ..core.replies import Reply, bounce_refused
from ..core.replies import ledger_too_big as too_big_reply
from ..core.replies import ledger_unavailable as unavailable_reply
from .messageids import SCAN_LIMIT, FoundReferences, HeaderStatus, SentHeaders, normalise_address

LEDGER_DAYS = 30  # [ledger] days: how long a sent message can be answered
MAX_REPLIES = 20  # [ledger] max_replies: how many messages one ledgered Message-ID vouches for
MIN_SECRET = 16  # octets
ADDRESS_KEY_SIZE = 16  # octets: a 128-bit tag for an equality test among a handful of addresses
MAX_RECORD_ADDRESSES = 32  # a record merged from several transactions stays small
_DAY = 86400


class StoreUnavailable(GatewayError):
    """The ledger's store cannot answer now (locked too long, a disk error, its file gone).

    The decision is then 451 4.3.0: our outage is never the sender's 5xx. The message never holds a key.
    """


class LedgerKeys:
    """The ledger's keyed hashes. Two labels keep a Message-ID and an address from ever sharing a key."""

    __slots__ = ("_mac",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET:
            raise ValueError(f"the ledger secret must be at least {MIN_SECRET} octets")
        self._mac = hmac.new(secret, digestmod=hashlib.sha256)

    def _digest(self, label: bytes, text: str) -> bytes:
        mac = self._mac.copy()
        mac.update(label + b"\0" + text.encode("utf-8", "surrogateescape"))
        return mac.digest()

    def message_key(self, message_id: str) -> bytes:
        """32 octets for a normalised Message-ID (messageids.normalise_message_id)."""
        return self._digest(b"message-id", message_id)

    def address_key(self, address: str) -> bytes | None:
        """16 octets for an address, compared as messageids.normalise_address does, or None."""
        normal = normalise_address(address)
        return None if normal is None else self.normal_address_key(normal)

    def normal_address_key(self, normal: str) -> bytes:
        """`address_key` of an address already normalised (messageids.normalise_address's result)."""
        return self._digest(b"address", normal)[:ADDRESS_KEY_SIZE]


@dataclass(frozen=True)
class LedgerRecord:
    """One sent message: who may be answered for it, and until when (unix seconds)."""

    addresses: frozenset[bytes]  # LedgerKeys.address_key of each
    expires: int

    def merge(self, other: LedgerRecord) -> LedgerRecord:
        """The same Message-ID sent again (another transaction, a resend): both sets, the later expiry."""
        addresses = self.addresses | other.addresses
        if len(addresses) > MAX_RECORD_ADDRESSES:
            addresses = frozenset(sorted(addresses)[:MAX_RECORD_ADDRESSES])
        return LedgerRecord(addresses, max(self.expires, other.expires))


def pack_address_keys(addresses: frozenset[bytes]) -> bytes:
    """A record's address keys as the stores keep them: sorted, one after another (ADDRESS_KEY_SIZE each)."""
    return b"".join(sorted(addresses))


def unpack_address_keys(blob: bytes) -> frozenset[bytes]:
    size = ADDRESS_KEY_SIZE
    return frozenset(blob[i : i + size] for i in range(0, len(blob) - size + 1, size))


@dataclass(frozen=True)
class LedgerEntry:
    """What the store answers for one key: the record, and how many messages it has vouched for."""

    record: LedgerRecord
    replies: int


class RecordOutcome(enum.Enum):
    RECORDED = "recorded"
    NO_MESSAGE_ID = "no-message-id"  # not ledgered (counted)
    HEADERS_TOO_BIG = "headers-too-big"  # not ledgered (counted)
    NO_ADDRESS = "no-address"  # nothing an answer could be sent to (counted)
    STORE_UNAVAILABLE = "store-unavailable"  # made, but the store could not write it (logged, counted)


@dataclass(frozen=True)
class Recording:
    outcome: RecordOutcome
    key: bytes | None = None
    record: LedgerRecord | None = None
    ttl: int = 0  # seconds, for the store's expiry


def make_record(
    keys: LedgerKeys, headers: SentHeaders, envelope_sender: str | None, now: int, days: int = LEDGER_DAYS
) -> Recording:
    """What the outbound role records for one relayed message (`envelope_sender` unsigned, None for <>)."""
    if headers.message_id is None:
        too_big = headers.status is HeaderStatus.HEADERS_TOO_BIG
        return Recording(RecordOutcome.HEADERS_TOO_BIG if too_big else RecordOutcome.NO_MESSAGE_ID)
    # The header's addresses are normalised already; the envelope sender is most often the From too: one
    # HMAC per distinct address.
    sender = normalise_address(envelope_sender) if envelope_sender else None
    normals = dict.fromkeys(((sender,) if sender else ()) + headers.addresses)
    addresses = frozenset(map(keys.normal_address_key, normals))
    if not addresses:
        return Recording(RecordOutcome.NO_ADDRESS)
    ttl = days * _DAY
    record = LedgerRecord(addresses, now + ttl)
    return Recording(RecordOutcome.RECORDED, keys.message_key(headers.message_id), record, ttl)


class LedgerStore(Protocol):
    """Where records live. Every method may raise StoreUnavailable; none raises anything else.

    The shape is the one a Redis store keeps too (a hash per key with a TTL, SADD for the addresses,
    HINCRBY for the count): `record` merges, `lookup` leaves out what is missing or expired, `take_reply`
    counts atomically.
    """

    async def record(self, key: bytes, record: LedgerRecord, ttl: int) -> None:
        """Store `record` under `key` for `ttl` seconds, merged with one already there."""

    async def record_group(self, items: Sequence[tuple[bytes, LedgerRecord, int]]) -> None:
        """`record` for each (key, record, ttl), in as few round trips as the store allows (the relay
        writes its records behind the mail in groups: recorder.py). After StoreUnavailable some of them
        may be written; the caller counts none."""

    async def lookup(self, keys: Sequence[bytes]) -> Mapping[bytes, LedgerEntry]:
        """The live entries among `keys` (missing and expired ones are left out)."""

    async def take_reply(self, key: bytes) -> int:
        """Count one more message vouched for by `key`; the new count (0: the entry is gone)."""

    async def close(self) -> None: ...


class LedgerAction(enum.Enum):
    PASS = "pass"  # noqa: S105 (a verdict, not a password)
    REFUSE = "refuse"
    TEMPFAIL = "tempfail"


class LedgerReason(enum.Enum):
    VOUCHED = "vouched"  # passes: a ledgered Message-ID, a recorded recipient, under the cap
    NO_REFERENCE = "no-reference"
    UNKNOWN_MESSAGE_ID = "unknown-message-id"
    RECIPIENT_NOT_RECORDED = "recipient-not-recorded"
    REPLAY_CAP = "replay-cap"
    TOO_BIG = "too-big"
    STORE_UNAVAILABLE = "store-unavailable"


# What an operator reads after "bounce to an address we never signed (...)".
_WHY = {
    LedgerReason.NO_REFERENCE: "it refers to no message we sent",
    LedgerReason.UNKNOWN_MESSAGE_ID: "it refers to no message we sent in the last {days} days",
    LedgerReason.RECIPIENT_NOT_RECORDED: "the message it refers to was not from this address",
    LedgerReason.REPLAY_CAP: "the message it refers to has been answered {cap} times already",
}


def refused_reply(recipient: str, reason: LedgerReason, days: int, cap: int) -> Reply:
    """550 5.7.1: the policy refuses it (RFC 3463 X.7.1, as for every other unsigned bounce)."""
    return bounce_refused(recipient, _WHY[reason].format(days=days, cap=cap))


@dataclass(frozen=True)
class LedgerVerdict:
    """The end-of-DATA decision for one recipient. `reply` is None when it passes (the next hop's reply
    stands); in observe mode a refusal or a tempfail passes with `observed` set and its reason kept."""

    action: LedgerAction
    reason: LedgerReason
    reply: Reply | None = None
    key: bytes | None = None  # the ledger entry that vouched (take_reply charges it)
    message_id: str | None = None  # the reference that vouched, for the log line (it is ours)
    observed: bool = False
    would_reject: Reply | None = None  # observe mode: what enforce mode would have said

    def __post_init__(self) -> None:
        # The class of the reply follows the action: a "refuse" with a 4xx cannot be built by mistake.
        if self.action is LedgerAction.PASS and self.reply is not None:
            raise ValueError("a passing verdict carries no reply")
        if self.action is LedgerAction.REFUSE and not (self.reply and self.reply.permanent):
            raise ValueError(f"a refusal needs a 5xx reply, not {self.reply}")
        if self.action is LedgerAction.TEMPFAIL and not (self.reply and self.reply.transient):
            raise ValueError(f"a tempfail needs a 4xx reply, not {self.reply}")

    @property
    def passes(self) -> bool:
        return self.action is LedgerAction.PASS


def _verdict(action: LedgerAction, reason: LedgerReason, reply: Reply, observe: bool) -> LedgerVerdict:
    if observe:
        return LedgerVerdict(LedgerAction.PASS, reason, None, observed=True, would_reject=reply)
    return LedgerVerdict(action, reason, reply)


def lookup_keys(found: FoundReferences, keys: LedgerKeys) -> tuple[bytes, ...]:
    """The store keys to ask for, one per reference, nearest first."""
    return tuple(keys.message_key(message_id) for message_id in found.message_ids)


def decide(
    found: FoundReferences,
    recipient: str,
    answers: Mapping[bytes, LedgerEntry] | None,
    keys: LedgerKeys,
    now: int,
    max_replies: int = MAX_REPLIES,
    observe: bool = False,
    days: int = LEDGER_DAYS,
    limit: int = SCAN_LIMIT,
) -> LedgerVerdict:
    """The decision for a null-sender message to the untagged `recipient`. Pure.

    `answers` is the store's answer for `lookup_keys(found, keys)`, or None when it could not answer.
    `limit` is the scan's bound (for the too-big reply's text). Order: a message cut off by the bound
    with nothing found is too big; nothing found is no-reference; then the store: outage, unknown ids,
    a recipient not recorded for any of them, every vouching entry at its cap; else it passes.
    """
    if not found.references:
        if found.exceeded:
            return _verdict(
                LedgerAction.REFUSE, LedgerReason.TOO_BIG, too_big_reply(recipient, limit), observe
            )
        reason = LedgerReason.NO_REFERENCE
        return _verdict(
            LedgerAction.REFUSE, reason, refused_reply(recipient, reason, days, max_replies), observe
        )
    if answers is None:
        reason = LedgerReason.STORE_UNAVAILABLE
        return _verdict(LedgerAction.TEMPFAIL, reason, unavailable_reply(recipient), observe)
    address = keys.address_key(recipient)
    known = False
    recorded = False
    for message_id in found.message_ids:
        key = keys.message_key(message_id)
        entry = answers.get(key)
        if entry is None or entry.record.expires <= now:
            continue
        known = True
        if address is None or address not in entry.record.addresses:
            continue
        recorded = True
        if entry.replies >= max_replies:
            continue
        return LedgerVerdict(LedgerAction.PASS, LedgerReason.VOUCHED, None, key, message_id)
    if not known:
        reason = LedgerReason.UNKNOWN_MESSAGE_ID
    elif not recorded:
        reason = LedgerReason.RECIPIENT_NOT_RECORDED
    else:
        reason = LedgerReason.REPLAY_CAP
    return _verdict(LedgerAction.REFUSE, reason, refused_reply(recipient, reason, days, max_replies), observe)


def charged(
    verdict: LedgerVerdict,
    count: int,
    recipient: str,
    max_replies: int = MAX_REPLIES,
    days: int = LEDGER_DAYS,
) -> LedgerVerdict:
    """The verdict once `take_reply` counted it: over the cap (another worker took the last one between
    lookup and take, or the entry expired: count 0), it is refused after all. Pure."""
    if not verdict.passes or verdict.observed or 0 < count <= max_replies:
        return verdict
    reason = LedgerReason.REPLAY_CAP if count else LedgerReason.UNKNOWN_MESSAGE_ID
    return LedgerVerdict(LedgerAction.REFUSE, reason, refused_reply(recipient, reason, days, max_replies))


async def check(
    store: LedgerStore,
    found: FoundReferences,
    recipient: str,
    keys: LedgerKeys,
    now: int,
    max_replies: int = MAX_REPLIES,
    observe: bool = False,
    days: int = LEDGER_DAYS,
) -> LedgerVerdict:
    """lookup → decide → take_reply over any store; StoreUnavailable becomes the 451 verdict."""
    wanted = lookup_keys(found, keys)
    answers: Mapping[bytes, LedgerEntry] | None = {}
    if wanted:
        try:
            answers = await store.lookup(wanted)
        except StoreUnavailable:
            answers = None
    verdict = decide(found, recipient, answers, keys, now, max_replies, observe, days)
    if not verdict.passes or verdict.key is None:
        return verdict
    try:
        count = await store.take_reply(verdict.key)
    except StoreUnavailable:
        return decide(found, recipient, None, keys, now, max_replies, observe, days)
    return charged(verdict, count, recipient, max_replies, days)
