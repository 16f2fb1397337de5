"""BATV prvs (draft-levine-smtp-batv-01 section 4): sign like Exim 4.96, verify by the draft.

A signed address is `prvs=KDDDHHHHHH=local@domain`:
- K is the key id (one digit), DDD the *expiry* day, (unix_time // 86400 + lifetime) mod 1000, and
- HHHHHH the first 3 bytes, in lower-case hex, of HMAC-SHA1(secret, K || DDD || local@domain).

Signing is byte-for-byte Exim's `${prvs{address}{secret}{K}}` (src/expand.c, `prvs_hmac_sha1`). The HMAC
covers the original address as RFC 5321 writes it, which for every ordinary address is the address as
given, domain case included.

Verification follows the draft, not Exim: the tag type and the hex digits are compared without regard to
case, and a tag is valid while 0 <= (DDD - today) mod 1000 <= lifetime. Exim compares the hex with case and
treats DDD >= today mod 1000 as unexpired, which accepts tags hundreds of days stale after the 999 -> 000
wrap (see docs/interop.md). The outcome is a `PrvsResult`, never an exception.
"""

from __future__ import annotations

import enum
import hmac
import re
from dataclasses import dataclass

from .addresses import (
    MAX_ADDRESS,
    MAX_LOCAL,
    PLAIN_DOMAIN,
    PLAIN_LOCAL,
    Address,
    parse_path,
    plain_lengths_ok,
    quote_local,
    within_path_limit,
)
from .errors import AddressError, KeyringError, PrvsError
from .keyring import Keyring

DEFAULT_LIFETIME = 7  # days; Exim's ${prvs} always uses 7
_DAYS = 1000  # DDD wraps every 1000 days
_TAG_LENGTH = len("prvs=KDDDHHHHHH=")

# The whole local part of a tagged address: tag type, key digit, day stamp, 6 hex digits, original local.
# re.ASCII throughout: without it IGNORECASE lets "ſ" (U+017F, long s) stand for "s".
_TAGGED_LOCAL = re.compile(r"prvs=([0-9])([0-9]{3})([0-9a-f]{6})=(.+)", re.IGNORECASE | re.DOTALL | re.ASCII)
# The cheap test behind is_prvs: the same shape at the start of a local part or an address.
_TAG_PREFIX = re.compile(r'<?"?prvs=[0-9]{4}[0-9a-f]{6}=.', re.IGNORECASE | re.DOTALL | re.ASCII)
_SRS_PREFIX = re.compile(r"srs[01][=+-]", re.IGNORECASE | re.ASCII)
# Hot paths: a whole plain ASCII address in one match, so the common case never builds an Address.
# (Angle brackets and everything else unusual take the slow path.)
_PLAIN_TAGGED = re.compile(rf"[pP][rR][vV][sS]=[0-9]{{4}}[0-9a-fA-F]{{6}}=({PLAIN_LOCAL})@({PLAIN_DOMAIN})")
# A plain address to sign; a local part that starts like a prvs or SRS tag goes to the slow path, which
# tells a real tag (refused) from a look-alike. The source is PlainSigner's precondition too, and
# socketmap.FastForward compiles it for bytes.
PLAIN_SIGNABLE = rf"(?!(?i:prvs=|srs[01][=+-]))({PLAIN_LOCAL})@({PLAIN_DOMAIN})"
_PLAIN_SIGNABLE = re.compile(PLAIN_SIGNABLE, re.ASCII)
# Day stamps as text and back, computed once: formatting them per call costs more than a lookup.
_STAMPS = tuple(f"{day:03d}" for day in range(_DAYS))
_DAY_OF = {stamp: day for day, stamp in enumerate(_STAMPS)}
_SHORT = 64  # an address this long or shorter is within every RFC 5321 limit, tagged or not


class PrvsVerdict(enum.Enum):
    VALID = "valid"
    UNSIGNED = "unsigned"
    MALFORMED = "malformed"
    BAD_HASH = "bad-hash"
    EXPIRED = "expired"
    UNKNOWN_KEY = "unknown-key"


@dataclass(frozen=True)
class PrvsResult:
    """What a check found. key_id, expiry_day and address are set whenever the tag could be read.

    expiry_day is a UTC day number: the day stamp DDD resolved to the day within 1000 days that is nearest
    to today on the valid side, i.e. in (today + lifetime - 1000, today + lifetime].
    address is the original (untagged) address, for VALID and also for a tag that failed a check.
    """

    verdict: PrvsVerdict
    reason: str
    key_id: int | None = None
    expiry_day: int | None = None
    address: str | None = None


_new_object = object.__new__
_compare_digest = hmac.compare_digest
_VALID = PrvsVerdict.VALID


def _result(
    verdict: PrvsVerdict,
    reason: str,
    key_id: int | None = None,
    expiry_day: int | None = None,
    address: str | None = None,
) -> PrvsResult:
    """A PrvsResult, built without the frozen dataclass's __init__.

    That __init__ pays one object.__setattr__ per field, which on the verify hot path cost as much as the
    HMAC itself. Filling the instance dict directly gives the same object (equality, repr, hash and
    immutability all work as for one made by __init__).
    """
    result: PrvsResult = _new_object(PrvsResult)
    fields = result.__dict__
    fields["verdict"] = verdict
    fields["reason"] = reason
    fields["key_id"] = key_id
    fields["expiry_day"] = expiry_day
    fields["address"] = address
    return result


def is_prvs(address: str) -> bool:
    """True when a local part or an address starts with a well-formed prvs tag (`prvs=KDDDHHHHHH=`)."""
    return _TAG_PREFIX.match(address) is not None


def sign(address: str, keyring: Keyring, today: int, lifetime: int = DEFAULT_LIFETIME) -> str:
    """The address with a prvs tag made with the keyring's active key, expiring at today + lifetime.

    Raises PrvsError for the null sender, an address that is already prvs-tagged or SRS, an address that
    does not parse, a keyring without an active key, or a result over RFC 5321's path limit.
    """
    if not 0 <= lifetime < _DAYS:
        _check_lifetime(lifetime)
    m = _PLAIN_SIGNABLE.fullmatch(address)
    fast = m is not None and (
        len(address) <= _SHORT or (len(m[1]) <= MAX_LOCAL and plain_lengths_ok(m[1], m[2], _TAG_LENGTH))
    )
    if fast and m is not None:
        # The common case: a plain address that is its own RFC 5321 form, so it is hashed as given, and
        # short enough that the tagged address is within every limit.
        local, domain = m.group(1, 2)
        original = address
    else:
        local, domain = _signable(address)
        original = f"{quote_local(local)}@{domain}"
    try:
        key_id = keyring.active_id
    except KeyringError as exc:
        raise PrvsError(f"cannot sign: {exc}") from exc
    stamp = str(key_id) + _STAMPS[(today + lifetime) % _DAYS]
    # The keyring's cached HMAC state for the key (never hmac.new per call): see Keyring.mac.
    digest = keyring.mac(key_id, f"{stamp}{original}".encode())
    if digest is None:  # cannot happen: the active key always verifies, so it has a cached state
        raise PrvsError(f"cannot sign: key {key_id} has no cached HMAC state")
    tagged_local = f"prvs={stamp}{digest[:3].hex()}={local}"
    if fast:
        return f"{tagged_local}@{domain}"
    return within_path_limit(Address(tagged_local, domain), address, "signed", PrvsError)


class PlainSigner:
    """sign for the common sender, in bytes and without building objects: `local`@`domain` with a tag made
    with the active key, or None when the tagged address would be over RFC 5321's path limit (sign raises).

    Only for a sender that `addresses.parse_path` takes on its fast path (`local` a PLAIN_LOCAL within 64
    octets, `domain` a PLAIN_DOMAIN) and whose local part does not start like a prvs or SRS tag: then the
    result is byte for byte what sign returns, encoded (tests/test_prvs.py checks it with hypothesis).
    Built once per keyring, day and lifetime by a caller that signs many senders (the socketmap); raises
    PrvsError as sign does for a lifetime out of range or a keyring without an active key.
    """

    __slots__ = ("_key_id", "_keyring", "_stamp")

    def __init__(self, keyring: Keyring, today: int, lifetime: int = DEFAULT_LIFETIME) -> None:
        _check_lifetime(lifetime)
        try:
            self._key_id = keyring.active_id
        except KeyringError as exc:
            raise PrvsError(f"cannot sign: {exc}") from exc
        self._keyring = keyring
        self._stamp = (str(self._key_id) + _STAMPS[(today + lifetime) % _DAYS]).encode()

    def __call__(self, local: bytes, domain: bytes) -> bytes | None:
        if len(local) + len(domain) + _TAG_LENGTH >= MAX_ADDRESS:
            return None
        digest = self._keyring.mac(self._key_id, self._stamp + local + b"@" + domain)
        if digest is None:  # cannot happen: the active key always has a cached HMAC state
            return None
        return b"prvs=%b%b=%b@%b" % (self._stamp, digest[:3].hex().encode(), local, domain)


def _signable(address: str) -> tuple[str, str]:
    """The slow path of sign: parse any address and refuse what must not be signed."""
    try:
        parsed = parse_path(address)
    except AddressError as exc:
        raise PrvsError(f"cannot sign: {exc}") from exc
    if parsed is None:
        raise PrvsError("the null sender <> is never signed: bounces must keep an empty return path")
    if _TAGGED_LOCAL.match(parsed.local):
        raise PrvsError(f"{_short(address)} already carries a prvs tag; it is never signed twice")
    if _SRS_PREFIX.match(parsed.local):
        raise PrvsError(f"{_short(address)} is an SRS address; its forwarder must get its bounces untagged")
    return parsed.local, parsed.domain


def verify(address: str, keyring: Keyring, today: int, lifetime: int = DEFAULT_LIFETIME) -> PrvsResult:
    """Check a prvs-tagged address by the draft's rule. Never raises for any input string."""
    if not 0 <= lifetime < _DAYS:
        _check_lifetime(lifetime)
    m = _PLAIN_TAGGED.fullmatch(address)
    if m is not None and (len(address) <= _SHORT or plain_lengths_ok(m[1], m[2], _TAG_LENGTH)):
        # Slices, not groups: the match fixed where everything is ("prvs=" K DDD HHHHHH "=" original).
        stamp, given, original = address[5:9], address[9:15], address[16:]
    else:
        read = _read_slow(address)
        if isinstance(read, PrvsResult):
            return read
        stamp, given, original = read
    key_id = ord(stamp[0]) - 48  # one ASCII digit, matched above
    ddd = stamp[1:]
    days_left = (_DAY_OF[ddd] - today) % _DAYS
    # The day with this stamp nearest to today on the valid side: today + days_left, or 1000 days earlier.
    expiry_day = today + days_left if days_left <= lifetime else today + days_left - _DAYS
    digest = keyring.mac(key_id, (stamp + original).encode())
    if digest is None:
        return _result(
            PrvsVerdict.UNKNOWN_KEY,
            f"tag made with key {key_id}, which this keyring does not hold (or has retired)",
            key_id,
            expiry_day,
            original,
        )
    # Constant time, and without regard to case: the draft lets a relay change the case of the hex.
    if not _compare_digest(digest[:3].hex(), given.lower()):
        return _result(
            PrvsVerdict.BAD_HASH,
            f"tag hash does not match key {key_id}: forged, altered in transit, or made with another secret",
            key_id,
            expiry_day,
            original,
        )
    if days_left > lifetime:
        return _result(
            PrvsVerdict.EXPIRED,
            f"tag expired {_DAYS - days_left} day(s) ago (day stamp {ddd}, today's is {today % _DAYS:03d}, "
            f"lifetime {lifetime} days)",
            key_id,
            expiry_day,
            original,
        )
    # _result, inlined: this is the hot path, and a Python call is a tenth of the budget.
    result: PrvsResult = _new_object(PrvsResult)
    fields = result.__dict__
    fields["verdict"] = _VALID
    fields["reason"] = "valid tag"
    fields["key_id"] = key_id
    fields["expiry_day"] = expiry_day
    fields["address"] = original
    return result


@dataclass(frozen=True)
class TagDays:
    """A readable tag's dates, for `batv-gateway explain`. Day numbers are UTC days, as `today` is."""

    stamp: str  # DDD as the tag writes it
    expiry_day: int  # PrvsResult.expiry_day: the last day the tag is valid
    signed_day: int  # expiry_day - lifetime: the day it was made, if it was made with this lifetime
    days_left: int  # expiry_day - today: 0 on its last day, negative once it has expired
    age: int  # today - signed_day


def tag_days(result: PrvsResult, today: int, lifetime: int = DEFAULT_LIFETIME) -> TagDays | None:
    """The dates of the tag `verify` read (any verdict that got as far as the tag), or None."""
    if result.expiry_day is None:
        return None
    signed_day = result.expiry_day - lifetime
    return TagDays(
        _STAMPS[result.expiry_day % _DAYS], result.expiry_day, signed_day, result.expiry_day - today,
        today - signed_day,
    )


def _read_slow(address: str) -> PrvsResult | tuple[str, str, str]:
    """The slow path of verify: any address. The tag's parts and the original address, or a verdict."""
    try:
        parsed = parse_path(address)
    except AddressError as exc:
        return _result(PrvsVerdict.MALFORMED, f"not a usable address: {exc}")
    if parsed is None:
        return _result(PrvsVerdict.UNSIGNED, "the null sender <> carries no tag")
    m = _TAGGED_LOCAL.fullmatch(parsed.local)
    if m is None:
        if parsed.local[:5].encode().lower() == b"prvs=":
            return _result(
                PrvsVerdict.MALFORMED,
                f"{_short(address)}: a prvs tag must be prvs=KDDDHHHHHH= "
                "(key digit, 3-digit day stamp, 6 hex digits)",
            )
        return _result(PrvsVerdict.UNSIGNED, f"{_short(address)} carries no prvs tag")
    key_digit, ddd, given, local = m.group(1, 2, 3, 4)
    return key_digit + ddd, given, f"{quote_local(local)}@{parsed.domain}"


def _check_lifetime(lifetime: int) -> None:
    if not 0 <= lifetime < _DAYS:
        raise PrvsError(f"lifetime {lifetime} is out of range: a prvs day stamp covers 0 to 999 days")


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")
