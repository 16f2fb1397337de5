"""SRS, the Guarded scheme (SRS0 and SRS1), byte for byte as Mail::SRS 0.31 and postsrsd 1.10 write it.

    SRS0: user@host                 -> SRS0<s>HHHH=TT=host=user@alias
    SRS1: SRS0<t>rest@h1            -> SRS1<s>HHHH=h1=<t>rest@alias      (the SRS0 separator is kept)
          SRS1<t>XXXX=h1=rest@hN    -> SRS1<s>HHHH=h1=rest@alias         (only the hash and alias change)

TT is today mod 1024 in two base32 characters; HHHH the first hash_length characters of the base64
HMAC-SHA1 of the ASCII-lowercased fields, concatenated (TT, host, user for SRS0; h1, rest for SRS1).
Reversing SRS0 gives user@host after checking the hash and that TT is at most max_age days old; reversing
SRS1 gives the SRS0 address at h1 after checking the hash only (h1 checks the timestamp).

Where the implementations disagree this module chooses, and docs/interop.md explains why:
- a quoted local part is hashed unquoted and the whole SRS local part is quoted when it needs to be
  (`"a b"@x` -> `"SRS0=HHHH=TT=x=a b"@alias`), like pysrs; Mail::SRS and postsrsd put the quotes inside;
- `"a@b"@x` is split at the last `@` and rewritten like any other quoted local part, like pysrs;
  Mail::SRS refuses it and postsrsd splits at the first `@`;
- an SRS0 address is always wrapped in SRS1, even one we could verify (Mail::SRS; postsrsd leaves a
  verifiable one alone; nobody here reverses and re-forwards);
- a hash of any length from hash_min to 27 characters is accepted when every character matches the
  full HMAC (Mail::SRS); postsrsd compares only the first hash_length characters.
- hashes are accepted in both base64 alphabets, whichever `base64url` selects for writing.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .addresses import (
    MAX_ADDRESS,
    MAX_LABEL,
    PLAIN_DOMAIN,
    Address,
    parse_domain,
    parse_path,
    within_path_limit,
)
from .errors import AddressError, SrsError
from .keyring import _pads as keyring_pads

_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_BASE32_VALUE = {c: i for i, c in enumerate(_BASE32)} | {c.lower(): i for i, c in enumerate(_BASE32)}
_SLOTS = 1024  # two base32 characters of day number
_FULL_HASH = 27  # base64 characters of a 20-byte HMAC-SHA1, without padding
_SEPARATORS = ("=", "+", "-")
_PLAIN_HOST = re.compile(PLAIN_DOMAIN)
_TO_URLSAFE = str.maketrans("+/", "-_")
_FROM_URLSAFE = str.maketrans("-_", "+/")
_TO_URLSAFE_BYTES = bytes.maketrans(b"+/", b"-_")


@dataclass(frozen=True)
class SrsOptions:
    """The SRS parameters; the defaults are those of Mail::SRS, postsrsd and pysrs.

    hash_min below hash_length accepts shorter prefixes of the hash (Mail::SRS's HashMin); keep them equal
    unless you mean that. base64url writes hashes with '-' and '_' instead of '+' and '/' (postsrsd 2.2.6
    moved to that because some receivers refuse '/' and '+'); reading accepts both alphabets either way.
    """

    separator: str = "="
    hash_length: int = 4
    hash_min: int = 4
    max_age: int = 21
    always_rewrite: bool = False
    base64url: bool = False

    def __post_init__(self) -> None:
        if self.separator not in _SEPARATORS:
            raise SrsError(f"SRS separator {self.separator!r} is not one of = + -")
        if not 1 <= self.hash_length <= _FULL_HASH:
            raise SrsError(f"SRS hash_length {self.hash_length} is out of range: 1 to {_FULL_HASH}")
        if not 1 <= self.hash_min <= self.hash_length:
            raise SrsError(
                f"SRS hash_min {self.hash_min} is out of range: 1 to hash_length ({self.hash_length})"
            )
        if not 0 <= self.max_age < _SLOTS:
            raise SrsError(f"SRS max_age {self.max_age} is out of range: 0 to {_SLOTS - 1} days")


DEFAULT_OPTIONS = SrsOptions()


class SrsVerdict(enum.Enum):
    VALID = "valid"
    NOT_SRS = "not-srs"
    MALFORMED = "malformed"
    BAD_HASH = "bad-hash"
    EXPIRED = "expired"


@dataclass(frozen=True)
class SrsResult:
    """What reverse found. address is the decoded address, and is set only when the verdict is VALID."""

    verdict: SrsVerdict
    reason: str
    address: str | None = None


def is_srs(address: str) -> bool:
    """True when a local part or an address starts with SRS0 or SRS1 and a separator (any case)."""
    return _tag_of(address.lstrip('<"')) is not None


def _tag_of(local: str) -> str | None:
    """The tag, SRS0 or SRS1, when the local part starts with one (in any ASCII case) and a separator.

    ASCII case only, as Mail::SRS's /^SRS0([-+=])/i on bytes: str.upper() would turn "ſ" into "S".
    """
    head = local[:4]
    if head.isascii() and local[4:5] in _SEPARATORS:
        head = head.upper()
        if head in ("SRS0", "SRS1"):
            return head
    return None


def timestamp(today: int) -> str:
    """The SRS0 timestamp for a UTC day number: today mod 1024 as two base32 characters."""
    return _BASE32[(today >> 5) & 31] + _BASE32[today & 31]


def timestamp_age(stamp: str, today: int) -> int:
    """Days since an SRS0 timestamp (two base32 characters, checked by the caller), modulo 1024."""
    return (today - (_BASE32_VALUE[stamp[0]] << 5 | _BASE32_VALUE[stamp[1]])) % _SLOTS


@dataclass(frozen=True)
class SrsParts:
    """The fields of an SRS address as written, unchecked: what `batv-gateway explain` shows."""

    tag: str  # "SRS0" or "SRS1"
    host: str  # SRS0: the original sender's domain; SRS1: the SRS0 host, which checks the timestamp
    local: str  # SRS0: the original sender's local part; SRS1: the opaque rest of the SRS0 address
    timestamp: str | None = None  # SRS0 only
    age: int | None = None  # SRS0 only: days since the timestamp, modulo 1024

    @property
    def original(self) -> str:
        """The address it stands for: the original sender (SRS0) or the SRS0 address at its host (SRS1)."""
        if self.tag == "SRS1":
            return str(Address("SRS0" + self.local, self.host))
        return str(Address(self.local, self.host))


def parts(address: str, today: int) -> SrsParts | None:
    """Split an SRS0 or SRS1 address into its fields, as `reverse` reads them; None when it is not one
    or is malformed (then `reverse` says why). Nothing is checked: `reverse` decides."""
    try:
        parsed = parse_path(address)
    except AddressError:
        return None
    if parsed is None:
        return None
    tag = _tag_of(parsed.local)
    if tag == "SRS1":
        fields = parsed.local[5:].split("=", 2)
        if len(fields) < 3 or not fields[1] or not fields[2] or not _is_domain(fields[1]):
            return None
        return SrsParts(tag, fields[1], fields[2])
    if tag == "SRS0":
        fields = parsed.local[5:].split("=", 3)
        if len(fields) < 4 or not fields[2] or not fields[3] or not _is_domain(fields[2]):
            return None
        stamp = fields[1]
        if len(stamp) != 2 or stamp[0] not in _BASE32_VALUE or stamp[1] not in _BASE32_VALUE:
            return None
        return SrsParts(tag, fields[2], fields[3], stamp, timestamp_age(stamp, today))
    return None


def forward(
    sender: str, alias: str, secrets: Sequence[bytes], today: int, options: SrsOptions = DEFAULT_OPTIONS
) -> str:
    """The sender rewritten into the alias domain (a domain, or an address at it).

    Returned unchanged (in its RFC 5321 form) when it is already in the alias domain, unless
    always_rewrite. Raises SrsError for the null sender, an unusable address or alias, no secret, or a
    result over RFC 5321's path limit.
    """
    if not secrets:
        raise SrsError("no SRS secret: the keyring has no key that signs")
    _alias_host(alias)  # a bad alias is reported before a bad sender, as it always was
    try:
        parsed = parse_path(sender)
    except AddressError as exc:
        raise SrsError(f"cannot rewrite the sender: {exc}") from exc
    if parsed is None:
        raise SrsError("the null sender <> is never rewritten: bounces must keep an empty return path")
    return forward_address(parsed, alias, secrets, today, options, sender)


def forward_address(
    parsed: Address,
    alias: str,
    secrets: Sequence[bytes],
    today: int,
    options: SrsOptions = DEFAULT_OPTIONS,
    given: str | None = None,
) -> str:
    """`forward` for a sender parsed already (the policy has it as an Address: no second parse).
    `given`: the sender as the caller wrote it, for error messages (default: the parsed form)."""
    if not secrets:
        raise SrsError("no SRS secret: the keyring has no key that signs")
    alias_host = _alias_host(alias)
    local, host = parsed.local, parsed.domain
    # Compared in ASCII case only, like Perl's lc and C's strcasecmp in Mail::SRS and postsrsd.
    if not options.always_rewrite and host.encode().lower() == alias_host.encode().lower():
        return str(parsed)
    tag = _tag_of(local)
    if tag == "SRS1":
        # Guarded: keep the original SRS0 host and its opaque part; only the hash and the alias change.
        fields = local[5:].split("=", 2)
        if len(fields) < 3 or not fields[1] or not fields[2]:
            raise SrsError(
                f"{_short(given or str(parsed))}: an SRS1 address must be SRS1=HASH=host=rest@domain"
            )
        h1, rest = fields[1], fields[2]
        new_local = f"SRS1{options.separator}{_hash(secrets[0], options, h1, rest)}={h1}={rest}"
    elif tag == "SRS0":
        # Guarded: wrap the SRS0 address, keeping its separator: SRS1=HHHH=host==HHHH=TT=...
        rest = local[4:]
        new_local = f"SRS1{options.separator}{_hash(secrets[0], options, host, rest)}={host}={rest}"
    else:
        stamp = timestamp(today)
        new_local = (
            f"SRS0{options.separator}{_hash(secrets[0], options, stamp, host, local)}={stamp}={host}={local}"
        )
    return within_path_limit(Address(new_local, alias_host), given or str(parsed), "SRS", SrsError)


class PlainForwarder:
    """forward_address for the common sender, in bytes and without building objects: an SRS0 address
    for `local`@`host`, or None when the result would be over RFC 5321's path limit (forward_address
    raises there) or `host` is the alias domain and always_rewrite is off (it returns the sender as it is).

    Only for a sender that `addresses.parse_path` takes on its fast path (`local` a PLAIN_LOCAL within 64
    octets, `host` a PLAIN_DOMAIN) and whose local part does not start like an SRS tag: then the result
    is byte for byte what forward_address returns, encoded (tests/test_srs.py checks it with hypothesis).
    Built once per alias, secret, day and options by a caller that forwards many senders (the socketmap).
    """

    __slots__ = ("_alias", "_alias_lower", "_always", "_inner", "_length", "_outer", "_prefix", "_stamp",
                 "_stamp_lower", "_urlsafe")  # fmt: skip

    def __init__(self, alias: str, secrets: Sequence[bytes], today: int, options: SrsOptions) -> None:
        if not secrets:
            raise SrsError("no SRS secret: the keyring has no key that signs")
        alias_host = _alias_host(alias).encode()
        self._alias = b"@" + alias_host
        self._alias_lower = alias_host.lower()
        self._always = options.always_rewrite
        self._inner, self._outer = _padded(secrets[0])
        stamp = timestamp(today).encode()
        self._stamp = b"=" + stamp + b"="  # as written: =TT=
        self._stamp_lower = stamp.lower()  # as hashed
        self._prefix = b"SRS0" + options.separator.encode()
        self._length = options.hash_length
        self._urlsafe = options.base64url

    def __call__(self, local: bytes, host: bytes) -> bytes | None:
        lowered = host.lower()
        if lowered == self._alias_lower and not self._always:
            return None
        # _full_hash over (stamp, host, local), ASCII-lowercased: the same bytes, fed in one update.
        inner = self._inner.copy()
        inner.update(self._stamp_lower + lowered + local.lower())
        outer = self._outer.copy()
        outer.update(inner.digest())
        digest = binascii.b2a_base64(outer.digest(), newline=False)[: self._length]
        if self._urlsafe:
            digest = digest.translate(_TO_URLSAFE_BYTES)
        # Every part is a dot-string piece (base64 and base32 characters, a host name, a plain local
        # part), so the local part needs no quotes: str(Address(...)) writes it as it is.
        rewritten = b"".join((self._prefix, digest, self._stamp, host, b"=", local, self._alias))
        return rewritten if len(rewritten) <= MAX_ADDRESS else None


def reverse(
    address: str, secrets: Sequence[bytes], today: int, options: SrsOptions = DEFAULT_OPTIONS
) -> SrsResult:
    """Decode an SRS0 or SRS1 address after checking it. Never raises for any input string."""
    try:
        parsed = parse_path(address)
    except AddressError as exc:
        return SrsResult(SrsVerdict.MALFORMED, f"not a usable address: {exc}")
    if parsed is None:
        return SrsResult(SrsVerdict.NOT_SRS, "the null sender <> is not an SRS address")
    local = parsed.local
    tag = _tag_of(local)
    if tag is None:
        return SrsResult(
            SrsVerdict.NOT_SRS, f"{_short(address)} does not start with SRS0 or SRS1 and = + or -"
        )
    if not secrets:
        return SrsResult(SrsVerdict.BAD_HASH, "no SRS secret to check the hash with: the keyring is empty")
    if tag == "SRS1":
        fields = local[5:].split("=", 2)
        if len(fields) < 3 or not fields[1] or not fields[2]:
            return SrsResult(
                SrsVerdict.MALFORMED, f"{_short(address)}: an SRS1 address is SRS1=HASH=host=rest@domain"
            )
        given, h1, rest = fields
        if not _is_domain(h1):
            return SrsResult(SrsVerdict.MALFORMED, f"{_short(address)}: {h1!r} is not a host name")
        match = _check_hash(given, secrets, options, h1, rest)
        if match is None:
            return SrsResult(SrsVerdict.BAD_HASH, _bad_hash_reason(given, options))
        return SrsResult(
            SrsVerdict.VALID,
            f"valid SRS1{match}: handed back to the SRS0 host {h1} (it checks the timestamp)",
            str(Address("SRS0" + rest, h1)),
        )
    fields = local[5:].split("=", 3)
    if len(fields) < 4 or not fields[2] or not fields[3]:
        return SrsResult(
            SrsVerdict.MALFORMED, f"{_short(address)}: an SRS0 address is SRS0=HASH=TT=host=user@domain"
        )
    given, stamp, host, user = fields
    if len(stamp) != 2 or stamp[0] not in _BASE32_VALUE or stamp[1] not in _BASE32_VALUE:
        return SrsResult(
            SrsVerdict.MALFORMED, f"{_short(address)}: timestamp {stamp!r} is not two base32 characters"
        )
    if not _is_domain(host):
        return SrsResult(SrsVerdict.MALFORMED, f"{_short(address)}: {host!r} is not a host name")
    # The hash first: a forged address must be reported as forged, never as merely expired.
    match = _check_hash(given, secrets, options, stamp, host, user)
    if match is None:
        return SrsResult(SrsVerdict.BAD_HASH, _bad_hash_reason(given, options))
    age = timestamp_age(stamp, today)
    if age > options.max_age:
        when = f"{age} days old" if age < _SLOTS // 2 else f"from the future or {age} days old"
        return SrsResult(
            SrsVerdict.EXPIRED, f"SRS0 timestamp {stamp} is {when}; max_age is {options.max_age} days"
        )
    return SrsResult(SrsVerdict.VALID, f"valid SRS0{match}, {age} day(s) old", str(Address(user, host)))


def _hash(secret: bytes, options: SrsOptions, *fields: str) -> str:
    full = _full_hash(secret, fields)[: options.hash_length]
    return full.translate(_TO_URLSAFE) if options.base64url else full


def _full_hash(secret: bytes, fields: Sequence[str]) -> str:
    """All 27 base64 characters of HMAC-SHA1 over the fields, each lowercased in ASCII only.

    bytes.lower() touches A-Z only, like Perl's lc on bytes and libsrs2's tolower in the C locale; UTF-8
    multi-byte sequences never contain A-Z bytes, so lowering the encoded field is exact.
    """
    # RFC 2104 from the cached pad states (as keyring.Keyring.mac does for prvs): two C-level copies are
    # cheaper than HMAC.copy(). One update over the concatenation: HMAC is over the bytes, however fed.
    inner_pad, outer_pad = _padded(secret)
    inner = inner_pad.copy()
    inner.update("".join(fields).encode("utf-8").lower())
    outer = outer_pad.copy()
    outer.update(inner.digest())
    return base64.b64encode(outer.digest())[:_FULL_HASH].decode("ascii")


@functools.lru_cache(maxsize=32)
def _padded(secret: bytes) -> tuple[Any, Any]:
    """The HMAC-SHA1 pad states per secret, cached: a copy per address instead of keying per address."""
    return keyring_pads(secret)


def _check_hash(given: str, secrets: Sequence[bytes], options: SrsOptions, *fields: str) -> str | None:
    """None when no secret made this hash; else "" or a note that it matched only without case."""
    n = len(given)
    if n < options.hash_min or n > _FULL_HASH or not given.isascii():
        return None
    wanted = given.translate(_FROM_URLSAFE)
    wanted_folded = wanted.lower().encode("ascii")
    for secret in secrets:
        full = _full_hash(secret, fields)[:n]
        # Constant time, and without regard to case (Mail::SRS, libsrs2): relays do smash case.
        if hmac.compare_digest(full.lower().encode("ascii"), wanted_folded):
            return "" if full == wanted else " (the hash matched only without regard to case)"
    return None


def _bad_hash_reason(given: str, options: SrsOptions) -> str:
    if len(given) < options.hash_min:
        return f"SRS hash {given!r} is shorter than hash_min ({options.hash_min}): forged or truncated"
    return (
        "SRS hash does not match any of our secrets: forged, altered in transit, or made with another secret"
    )


@functools.lru_cache(maxsize=64)  # the configured alias, parsed once rather than per address
def _alias_host(alias: str) -> str:
    """The alias domain from a domain or an address at it (the part after the last '@')."""
    host = alias.rpartition("@")[2]
    try:
        return parse_domain(host)
    except AddressError as exc:
        raise SrsError(f"SRS alias {alias!r} is not a domain or an address at one: {exc}") from exc


def _is_domain(text: str) -> bool:
    if len(text) <= MAX_LABEL and _PLAIN_HOST.fullmatch(text):
        return True  # the common case, without the slow path's per-label checks
    try:
        parse_domain(text)
    except AddressError:
        return False
    return True


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")
