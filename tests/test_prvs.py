"""BATV prvs: sign like Exim, verify by the draft, and the properties that make a tag worth checking.

Properties (hypothesis, derandomized so every run checks the same examples):
- sign then verify round-trips, for plain, quoted and UTF-8 addresses and every key id;
- changing any single character of a signed address fails verification. "Changing" means putting a
  different character in its place, where in the tag (`prvs=KDDDHHHHHH=`) a mere change of letter case
  does not count: the draft compares the tag type and the hex without regard to case, so `PRVS=` and
  upper-case hex stay valid (tested separately). In the address part every different character counts,
  case included: the HMAC covers the address exactly as signed, as Exim's does.
- the expiry boundary holds to the day, across the 999 -> 000 wrap too.
"""

from __future__ import annotations

import hmac
import string

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.core import prvs
from gateway.core.addresses import Address, parse_address
from gateway.core.errors import PrvsError
from gateway.core.keyring import Key, Keyring, KeyState
from gateway.core.prvs import PrvsVerdict

SECRET = b"0123456789abcdef0123456789abcdef"
TODAY = 19723  # 2024-01-01


def ring(*ids: int, secret: bytes = SECRET) -> Keyring:
    return Keyring.from_secrets([(i, secret + bytes([i])) for i in ids])


ALL_KEYS = ring(*range(10))


# --- examples -----------------------------------------------------------------------------------------


def test_sign_format_and_result_fields() -> None:
    keyring = ring(3)
    signed = prvs.sign("user@example.com", keyring, TODAY)
    digest = hmac.digest(SECRET + b"\x03", b"3730user@example.com", "sha1")
    assert signed == f"prvs=3730{digest[:3].hex()}=user@example.com"
    result = prvs.verify(signed, keyring, TODAY + 2)
    assert result == prvs.PrvsResult(PrvsVerdict.VALID, result.reason, 3, TODAY + 7, "user@example.com")
    assert prvs.is_prvs(signed) and prvs.is_prvs(signed.split("@")[0]) and prvs.is_prvs(f"<{signed}>")
    assert not prvs.is_prvs("user@example.com") and not prvs.is_prvs("prvs=1730abc=user@example.com")


def test_signing_uses_the_active_key() -> None:
    keyring = Keyring((Key(2, SECRET, KeyState.VERIFY), Key(5, SECRET, KeyState.ACTIVE)))
    assert prvs.sign("a@example.com", keyring, TODAY).startswith("prvs=5730")


def test_angle_brackets_are_not_signed() -> None:
    keyring = ring(1)
    assert prvs.sign("<user@example.com>", keyring, TODAY) == prvs.sign("user@example.com", keyring, TODAY)


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("<>", "null sender"),
        ("prvs=1730abcdef=user@example.com", "already carries a prvs tag"),
        ("PRVS=1730ABCDEF=user@example.com", "already carries a prvs tag"),
        ("SRS0=HHHH=TT=example.org=user@fwd.example", "SRS address"),
        ("srs1+HHHH=example.org==HHHH=TT=x=y@fwd.example", "SRS address"),
        ("user", "cannot sign"),
        ("a b@example.com", "cannot sign"),
    ],
)
def test_never_signed(address: str, words: str) -> None:
    with pytest.raises(PrvsError, match=words):
        prvs.sign(address, ALL_KEYS, TODAY)


def test_a_prvs_look_alike_is_signed() -> None:
    # Not a tag (5 hex digits): an ordinary local part that happens to start with "prvs=".
    signed = prvs.sign("prvs=1730abcde=user@example.com", ring(1), TODAY)
    assert prvs.verify(signed, ring(1), TODAY).address == "prvs=1730abcde=user@example.com"


def test_no_active_key_is_a_prvs_error() -> None:
    verify_only = Keyring((Key(1, SECRET, KeyState.VERIFY),))
    with pytest.raises(PrvsError, match="no active key"):
        prvs.sign("user@example.com", verify_only, TODAY)


def test_result_over_path_limit_is_refused() -> None:
    long = "a" * 60 + "@" + ".".join(["b" * 63] * 2) + "." + "c" * 62  # 250 octets: fits untagged
    assert parse_address(long)
    with pytest.raises(PrvsError, match="path limit"):
        prvs.sign(long, ring(1), TODAY)


@pytest.mark.parametrize("lifetime", [-1, 1000])
def test_lifetime_out_of_range(lifetime: int) -> None:
    with pytest.raises(PrvsError, match="lifetime"):
        prvs.sign("user@example.com", ring(1), TODAY, lifetime)
    with pytest.raises(PrvsError, match="lifetime"):
        prvs.verify("user@example.com", ring(1), TODAY, lifetime)


@pytest.mark.parametrize(
    ("address", "verdict", "words"),
    [
        ("user@example.com", PrvsVerdict.UNSIGNED, "carries no prvs tag"),
        ("<>", PrvsVerdict.UNSIGNED, "null sender"),
        ("prvs=1730abc=user@example.com", PrvsVerdict.MALFORMED, "prvs=KDDDHHHHHH="),
        ("prvs=x730abcdef=user@example.com", PrvsVerdict.MALFORMED, "prvs=KDDDHHHHHH="),
        ("prvs=1730abcdef=@example.com", PrvsVerdict.MALFORMED, "prvs=KDDDHHHHHH="),
        ("prvs=1730abcdef=user", PrvsVerdict.MALFORMED, "no '@'"),
        ("not an address", PrvsVerdict.MALFORMED, "not a usable address"),
        # Only the draft's syntax is read: a tag after the local part is not a tag.
        ("user=prvs=1730abcdef@example.com", PrvsVerdict.UNSIGNED, "carries no prvs tag"),
    ],
)
def test_verdicts_for_what_is_not_a_valid_tag(address: str, verdict: PrvsVerdict, words: str) -> None:
    result = prvs.verify(address, ALL_KEYS, TODAY)
    assert result.verdict is verdict
    assert words in result.reason
    assert result.address is None and result.key_id is None


def test_unknown_key_and_bad_hash() -> None:
    signed = prvs.sign("user@example.com", ring(4), TODAY)
    unknown = prvs.verify(signed, ring(1), TODAY)
    assert unknown.verdict is PrvsVerdict.UNKNOWN_KEY
    assert unknown.key_id == 4 and "key 4" in unknown.reason
    retired = Keyring((Key(1, SECRET, KeyState.ACTIVE), Key(4, SECRET + b"\x04", KeyState.RETIRED)))
    assert prvs.verify(signed, retired, TODAY).verdict is PrvsVerdict.UNKNOWN_KEY
    other_secret = ring(4, secret=b"another secret of thirty-two byt")
    forged = prvs.verify(signed, other_secret, TODAY)
    assert forged.verdict is PrvsVerdict.BAD_HASH
    assert forged.address == "user@example.com"  # the tag could be read, so the result says what it named


def test_forged_and_expired_is_reported_as_forged() -> None:
    signed = prvs.sign("user@example.com", ring(1), TODAY)
    forged = signed.replace("=user", "=usr")
    assert prvs.verify(forged, ring(1), TODAY + 100).verdict is PrvsVerdict.BAD_HASH


def test_reasons_are_one_line_and_never_hold_the_secret() -> None:
    signed = prvs.sign("user@example.com", ring(1), TODAY)
    for day in (TODAY, TODAY + 30):
        for keyring in (ring(1), ring(2), ring(1, secret=b"x" * 32)):
            result = prvs.verify(signed, keyring, day)
            assert result.reason and "\n" not in result.reason
            assert SECRET.decode() not in result.reason and SECRET.decode() not in repr(result)


def test_case_of_tag_type_and_hex_does_not_matter() -> None:
    signed = prvs.sign("user@example.com", ring(1), TODAY)
    tag, rest = signed[:16], signed[16:]
    for variant in (tag.upper(), tag.lower(), "PrVs" + tag[4:].upper(), "prvs" + tag[4:].upper()):
        assert prvs.verify(variant + rest, ring(1), TODAY).verdict is PrvsVerdict.VALID, variant


def test_address_case_does_matter() -> None:
    # Exim hashes the address as given; so does the draft. A relay that changes it breaks the tag.
    signed = prvs.sign("User@Example.com", ring(1), TODAY)
    assert prvs.verify(signed.replace("User", "user"), ring(1), TODAY).verdict is PrvsVerdict.BAD_HASH
    assert prvs.verify(signed.replace("Example", "example"), ring(1), TODAY).verdict is PrvsVerdict.BAD_HASH


def test_quoted_local_part_is_signed_in_rfc5321_form() -> None:
    # The HMAC covers the original address as RFC 5321 writes it; the whole tagged local part is quoted.
    # (Exim would write prvs=...="a b"@x, which is not a valid local part.)
    keyring = ring(1)
    signed = prvs.sign('"a b"@example.com', keyring, TODAY)
    digest = hmac.digest(SECRET + b"\x01", b'1730"a b"@example.com', "sha1")
    assert signed == f'"prvs=1730{digest[:3].hex()}=a b"@example.com'
    result = prvs.verify(signed, keyring, TODAY)
    assert result.verdict is PrvsVerdict.VALID and result.address == '"a b"@example.com'
    # Needless quotes are dropped before hashing: "abc"@x is abc@x.
    assert prvs.sign('"abc"@example.com', keyring, TODAY) == prvs.sign("abc@example.com", keyring, TODAY)


def test_exim_wrap_bug_is_not_copied() -> None:
    """Exim 4.96 treats DDD >= today mod 1000 as unexpired, so after the wrap a stale tag looks fresh."""
    keyring = ring(1)
    signed_day = 20000 + 493  # DDD = 500
    signed = prvs.sign("user@example.com", keyring, signed_day)
    assert signed.startswith("prvs=1500")
    checked_day = 21100  # today mod 1000 = 100: 600 days after expiry; Exim: 500 >= 100, "valid"
    result = prvs.verify(signed, keyring, checked_day)
    assert result.verdict is PrvsVerdict.EXPIRED
    assert "expired 600 day(s) ago" in result.reason
    assert result.expiry_day == 20500


# --- properties ---------------------------------------------------------------------------------------

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
plain_locals = st.lists(st.text(alphabet=ATEXT, min_size=1, max_size=8), min_size=1, max_size=3).map(".".join)
quoted_locals = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=12)
utf8_locals = st.text(alphabet="äöüßéñ漢字δ" + string.ascii_lowercase, min_size=1, max_size=10)
labels = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=3).map(".".join)


@st.composite
def addresses(draw: st.DrawFn) -> str:
    local = draw(st.one_of(plain_locals, quoted_locals, utf8_locals))
    address = str(Address(local, draw(domains)))
    if prvs.is_prvs(address) or address.lstrip('"')[:4].upper() in ("SRS0", "SRS1"):
        local = "x" + local
        address = str(Address(local, draw(domains)))
    return address


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    address=addresses(),
    key_id=st.integers(0, 9),
    today=st.integers(0, 60000),
    lifetime=st.integers(0, 998),
    age=st.integers(0, 998),
)
def test_sign_then_verify_round_trips(address: str, key_id: int, today: int, lifetime: int, age: int) -> None:
    keyring = Keyring.from_secrets(
        [(key_id, SECRET), *((i, SECRET + b"x") for i in range(10) if i != key_id)]
    )
    signed = prvs.sign(address, keyring, today, lifetime)
    assert prvs.is_prvs(signed)
    assert parse_address(signed)  # always a valid RFC 5321 address
    age = age % (lifetime + 1)
    result = prvs.verify(signed, keyring, today + age, lifetime)
    assert result.verdict is PrvsVerdict.VALID, result.reason
    assert result.address == str(parse_address(address))
    assert result.key_id == key_id
    assert result.expiry_day == today + lifetime


def _tag_span(signed: str) -> range:
    """Where `prvs=KDDDHHHHHH=` sits in a signed address (after a leading quote, if any)."""
    start = 1 if signed.startswith('"') else 0
    return range(start, start + 16)


REPLACEMENTS = string.ascii_letters + string.digits + '=@."\\ -+_<>é'


@settings(max_examples=500, derandomize=True, deadline=None)
@given(address=addresses(), data=st.data())
@example(address="user@example.com", data=None)
def test_changing_any_single_character_fails(address: str, data: st.DataObject | None) -> None:
    signed = prvs.sign(address, ALL_KEYS, TODAY)
    positions = range(len(signed))
    changes: list[tuple[int, str]]
    if data is None:  # the explicit example: every position, every replacement
        changes = [(i, c) for i in positions for c in REPLACEMENTS]
    else:
        changes = [(data.draw(st.sampled_from(positions)), data.draw(st.sampled_from(REPLACEMENTS)))]
    tag = _tag_span(signed)
    for index, replacement in changes:
        original = signed[index]
        if index in tag and replacement.lower() == original.lower():
            continue  # a case change in the tag is no change (draft section 4)
        if replacement == original:
            continue
        tampered = signed[:index] + replacement + signed[index + 1 :]
        result = prvs.verify(tampered, ALL_KEYS, TODAY)
        assert result.verdict is not PrvsVerdict.VALID, (tampered, result)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(signed_day=st.integers(0, 60000), lifetime=st.integers(0, 998))
@example(signed_day=19992, lifetime=7)  # expires on stamp 999
@example(signed_day=19993, lifetime=7)  # expires on stamp 000: the wrap
@example(signed_day=19999, lifetime=7)  # signed on stamp 999, expires on 006
@example(signed_day=19500, lifetime=0)
@example(signed_day=0, lifetime=998)
def test_expiry_boundary_to_the_day(signed_day: int, lifetime: int) -> None:
    keyring = ring(1)
    signed = prvs.sign("user@example.com", keyring, signed_day, lifetime)
    assert signed[6:9] == f"{(signed_day + lifetime) % 1000:03d}"
    last_day = signed_day + lifetime
    assert prvs.verify(signed, keyring, signed_day, lifetime).verdict is PrvsVerdict.VALID
    assert prvs.verify(signed, keyring, last_day, lifetime).verdict is PrvsVerdict.VALID
    expired = prvs.verify(signed, keyring, last_day + 1, lifetime)
    assert expired.verdict is PrvsVerdict.EXPIRED
    assert expired.expiry_day == last_day
    # The day before signing, the tag is from the future: not valid either.
    assert prvs.verify(signed, keyring, signed_day - 1, lifetime).verdict is PrvsVerdict.EXPIRED


def test_tag_type_case_is_ascii_only() -> None:
    # Unicode case folding would let "ſ" (U+017F, long s) stand for "s"; the draft means ASCII case.
    signed = prvs.sign("user@example.com", ring(1), TODAY)
    lookalike = "prvſ" + signed[4:]
    assert not prvs.is_prvs(lookalike)
    assert prvs.verify(lookalike, ring(1), TODAY).verdict is PrvsVerdict.UNSIGNED
    assert (
        prvs.verify(
            "<" + signed.upper().replace("EXAMPLE.COM", "example.com").replace("USER", "user") + ">",
            ring(1),
            TODAY,
        ).verdict
        is PrvsVerdict.VALID
    )


@settings(max_examples=200, derandomize=True, deadline=None)
@given(secret=st.binary(min_size=0, max_size=200), message=st.binary(max_size=300))
@example(secret=b"k" * 64, message=b"0730user@example.com")  # exactly one SHA-1 block
@example(secret=b"k" * 65, message=b"0730user@example.com")  # hashed first (RFC 2104)
def test_keyring_mac_is_hmac_sha1(secret: bytes, message: bytes) -> None:
    # prvs uses Keyring.mac (cached pads, RFC 2104's precomputation) instead of hmac.new per call.
    keyring = Keyring.from_secrets([(3, secret)])
    assert keyring.mac(3, message) == hmac.digest(secret, message, "sha1")
    assert keyring.mac(4, message) is None
    assert keyring.active_id == 3


_LONG_DOMAIN = "d" * 63 + "." + "e" * 63 + "." + "f" * 50 + ".org"  # 182 octets: some tags do not fit


@settings(max_examples=500, derandomize=True, deadline=None)
@given(
    local=plain_locals,
    domain=st.one_of(domains, st.just(_LONG_DOMAIN)),
    pad=st.integers(0, 60),
    key_id=st.integers(0, 9),
    today=st.integers(0, 60000),
    lifetime=st.integers(0, 999),
)
@example(local="a", domain=_LONG_DOMAIN, pad=55, key_id=0, today=0, lifetime=0)  # 255 octets tagged
@example(local="a", domain=_LONG_DOMAIN, pad=54, key_id=0, today=0, lifetime=0)  # 254: fits
def test_the_plain_signer_writes_what_sign_writes(
    local: str, domain: str, pad: int, key_id: int, today: int, lifetime: int
) -> None:
    # Up to the local-part and path limits, so that some tags do not fit.
    local = ("y" * pad + local)[: min(64, 253 - len(domain))].rstrip(".")
    if prvs.is_prvs(local) or local[:5].lower() == "prvs=" or local[:4].upper() in ("SRS0", "SRS1"):
        local = "x" + local[:63]
    keyring = Keyring.from_secrets([(key_id, SECRET)])
    address = f"{local}@{domain}"
    assert parse_address(address) == Address(local, domain)  # the signer's precondition
    got = prvs.PlainSigner(keyring, today, lifetime)(local.encode(), domain.encode())
    try:
        expected: bytes | None = prvs.sign(address, keyring, today, lifetime).encode()
    except PrvsError:
        expected = None
    assert got == expected


# --- tag_days: the dates batv-gateway explain shows ---------------------------------------------------


def test_tag_days_of_a_fresh_tag() -> None:
    keyring = ring(1)
    tagged = prvs.sign("user@example.com", keyring, TODAY, 7)
    days = prvs.tag_days(prvs.verify(tagged, keyring, TODAY + 2, 7), TODAY + 2, 7)
    assert days == prvs.TagDays(
        stamp=f"{(TODAY + 7) % 1000:03d}", expiry_day=TODAY + 7, signed_day=TODAY, days_left=5, age=2
    )
    assert tagged[6:9] == days.stamp


def test_tag_days_of_an_expired_tag_across_the_999_wrap() -> None:
    keyring = ring(1)
    signed = 19990  # expires on day 19997, stamp 997; checked on day 20003, stamp 003
    tagged = prvs.sign("user@example.com", keyring, signed, 7)
    result = prvs.verify(tagged, keyring, 20003, 7)
    assert result.verdict is PrvsVerdict.EXPIRED
    days = prvs.tag_days(result, 20003, 7)
    assert days is not None
    assert (days.stamp, days.expiry_day, days.signed_day, days.days_left, days.age) == (
        "997", 19997, 19990, -6, 13
    )


def test_tag_days_of_a_forged_tag_still_reads_its_stamp_and_of_no_tag_is_none() -> None:
    forged = prvs.verify("prvs=1730000000=user@example.com", ring(1), TODAY, 7)
    assert forged.verdict is PrvsVerdict.BAD_HASH
    days = prvs.tag_days(forged, TODAY, 7)
    assert days is not None and (days.stamp, days.days_left) == ("730", 7)
    assert prvs.tag_days(prvs.verify("user@example.com", ring(1), TODAY, 7), TODAY, 7) is None
