"""Envelope addresses: the null sender, the last-@ split, quoting, UTF-8, RFC 5321 limits, errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import addresses
from gateway.core.addresses import Address, parse_address, parse_domain, parse_path, quote_local
from gateway.core.errors import AddressError, GatewayError


def test_null_sender_is_none() -> None:
    assert parse_path("<>") is None


def test_parse_address_refuses_null_sender() -> None:
    with pytest.raises(AddressError, match="null sender"):
        parse_address("<>")


@pytest.mark.parametrize(
    ("text", "local", "domain"),
    [
        ("user@example.com", "user", "example.com"),
        ("<user@example.com>", "user", "example.com"),
        ("First.Last@Example.COM", "First.Last", "Example.COM"),  # case kept on both sides
        ("a+tag@sub.example.co.uk", "a+tag", "sub.example.co.uk"),
        ("x@[192.0.2.1]", "x", "[192.0.2.1]"),
        ("x@[IPv6:2001:db8::1]", "x", "[IPv6:2001:db8::1]"),
        ("<@relay.example,@other.example:user@example.com>", "user", "example.com"),  # source route dropped
        ("bounce_list@mail_host.example", "bounce_list", "mail_host.example"),
    ],
)
def test_plain_addresses(text: str, local: str, domain: str) -> None:
    assert parse_path(text) == Address(local, domain)


@pytest.mark.parametrize(
    ("text", "local", "formatted"),
    [
        ('"a b"@example.com', "a b", '"a b"@example.com'),
        ('"a@b"@example.com', "a@b", '"a@b"@example.com'),  # split at the last @
        ('"abc"@example.com', "abc", "abc@example.com"),  # quotes that are not needed are dropped
        (r'"a\"b"@example.com', 'a"b', r'"a\"b"@example.com'),
        (r'"a\\b"@example.com', "a\\b", r'"a\\b"@example.com'),
        (r'"a\bc"@example.com', "abc", "abc@example.com"),  # a quoted-pair stands for its character
        ('".user"@example.com', ".user", '".user"@example.com'),
        ('"a..b"@example.com', "a..b", '"a..b"@example.com'),
        ('""@example.com', "", '""@example.com'),
        ('<"a b"@example.com>', "a b", '"a b"@example.com'),
    ],
)
def test_quoted_local_parts(text: str, local: str, formatted: str) -> None:
    parsed = parse_address(text)
    assert parsed.local == local
    assert parsed.domain == "example.com"
    assert str(parsed) == formatted
    assert parse_address(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("text", "local", "domain"),
    [
        ("用户@例子.广告", "用户", "例子.广告"),
        ("δοκιμή@παράδειγμα.δοκιμή", "δοκιμή", "παράδειγμα.δοκιμή"),
        ("jörg@münchen.example", "jörg", "münchen.example"),
        ('"jörg müller"@example.com', "jörg müller", "example.com"),
    ],
)
def test_utf8_addresses(text: str, local: str, domain: str) -> None:
    parsed = parse_address(text)
    assert parsed == Address(local, domain)
    assert str(parsed) == text


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("user", "no '@'"),
        ("@example.com", "source route"),
        ("user@", "domain after '@' is empty"),
        ("<user@example.com", "unbalanced angle brackets"),
        ("user@example.com>", "unbalanced angle brackets"),
        ("a b@example.com", "' ' is not allowed"),
        (".user@example.com", "starts or ends with '.'"),
        ("user.@example.com", "starts or ends with '.'"),
        ("a..b@example.com", "'..'"),
        ('a"b"@example.com', "quoted string must be the whole local part"),
        ('"a"b@example.com', "one quoted string"),
        ('"a"b"@example.com', 'must be written \\"'),
        ('"a\x07b"@example.com', "control character"),
        ('"ab\\"@example.com', "ends in a lone backslash"),
        ("user@exa mple.com", "domain label"),
        ("user@-example.com", "domain label"),
        ("user@example-.com", "domain label"),
        ("user@example..com", "empty label"),
        ("user@example.com.", "empty label"),
        ("user@[not a literal]", "address literal"),
        ("user@ex\udcffample.com", "not valid UTF-8"),
        ("", "empty"),
    ],
)
def test_errors_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_path(text)
    assert words in str(caught.value)
    assert caught.value.status_hint.startswith("5.")
    assert isinstance(caught.value, GatewayError)
    assert "\n" not in str(caught.value)


def test_limits_local_part() -> None:
    assert parse_address("a" * 64 + "@example.com").local == "a" * 64
    with pytest.raises(AddressError, match="local part is 65 octets; RFC 5321 allows at most 64"):
        parse_address("a" * 65 + "@example.com")
    # Octets, not characters: 32 two-octet characters fill the limit, 33 exceed it.
    assert parse_address("é" * 32 + "@example.com")
    with pytest.raises(AddressError, match="66 octets"):
        parse_address("é" * 33 + "@example.com")
    # Quotes count: they are part of the local part on the wire.
    with pytest.raises(AddressError, match="66 octets"):
        parse_address('"' + "a" * 64 + '"@example.com')


def test_tagged_local_parts_may_exceed_64_octets() -> None:
    # A prvs or SRS rewriter adds its tag to a local part that was within the limit.
    long_prvs = "prvs=0123456789=" + "a" * 64 + "@example.com"
    assert parse_address(long_prvs).local == long_prvs.split("@")[0]
    long_srs = "SRS0=HHHH=TT=" + "d" * 40 + ".example=" + "a" * 40 + "@fwd.example"
    assert parse_address(long_srs).domain == "fwd.example"
    with pytest.raises(AddressError, match="65 octets"):
        parse_address("xprvs=0123456789=" + "a" * 48 + "@example.com")


def test_limits_domain_and_path() -> None:
    label = "a" * 63
    assert parse_domain(f"{label}.example") == f"{label}.example"
    with pytest.raises(AddressError, match="over 63 octets"):
        parse_address(f"u@{'a' * 64}.example")
    domain = ".".join([label] * 3) + "." + "b" * 61  # 253 octets: a legal domain
    assert len(domain) == 253
    with pytest.raises(AddressError, match="the path is 257 octets with its angle brackets"):
        parse_address("u@" + domain)  # 255 + 2 brackets = 257
    assert parse_address("u@" + domain[2:]).domain == domain[2:]  # exactly 256 with brackets
    too_long = ".".join([label] * 4) + ".x"
    with pytest.raises(AddressError, match="the domain is 257 octets"):
        parse_address("u@" + too_long)


def test_format_requotes_where_needed() -> None:
    assert str(Address("a b", "x.example")) == '"a b"@x.example'
    assert str(Address("a@b", "x.example")) == '"a@b"@x.example'
    assert str(Address('a"b\\c', "x.example")) == '"a\\"b\\\\c"@x.example'
    assert str(Address("a.b", "x.example")) == "a.b@x.example"
    assert quote_local("üser") == "üser"  # RFC 6531: UTF-8 is atext
    assert addresses.is_dot_string("a.b") and not addresses.is_dot_string("a..b")


# --- properties ---------------------------------------------------------------------------------------

ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
atoms = st.text(alphabet=ATEXT, min_size=1, max_size=10)
dot_strings = st.lists(atoms, min_size=1, max_size=4).map(".".join).filter(lambda s: len(s) <= 64)
labels = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,8}[A-Za-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)
quoted_bodies = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_characters="\x7f"), max_size=20
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(local=dot_strings, domain=domains, brackets=st.booleans())
def test_fast_path_agrees_with_slow_path(local: str, domain: str, brackets: bool) -> None:
    text = f"<{local}@{domain}>" if brackets else f"{local}@{domain}"
    fast = parse_path(text)
    slow = addresses._parse_slow(text)
    assert fast == slow == Address(local, domain)
    assert str(fast) == f"{local}@{domain}"


@settings(max_examples=300, derandomize=True, deadline=None)
@given(local=quoted_bodies, domain=domains)
def test_any_local_part_round_trips_through_its_rfc5321_form(local: str, domain: str) -> None:
    address = Address(local, domain)
    text = str(address)
    if len(text.encode()) - len(domain) - 1 > 64:
        with pytest.raises(AddressError):
            parse_address(text)
    else:
        assert parse_address(text) == address
