"""pysrs 1.0.3 (Stuart Gathman's port of Mail::SRS) as an independent oracle for our SRS.

Two things about pysrs 1.0.3 on Python 3, both handled here and nowhere else:
- Its hash_create/hash_verify call base64.encodestring, which Python 3.9 removed. base64.encodebytes is
  the same function under its new name (same output, trailing newline and all), so the test installs it
  under the old name for the duration of each check.
- Its reverse() checks the hash and the timestamp with `assert`: under `python -O` every forged address
  would pass. The module refuses to run in that mode rather than compare against a blind oracle.

pysrs reads the clock with time.time(); the test pins it by replacing the `time` module that SRS.Base
sees (and only that one), so both sides work on the same UTC day.
"""

from __future__ import annotations

import base64
import contextlib
import types
from collections.abc import Iterator
from typing import Any
from unittest import mock

import SRS  # pysrs, a test dependency (pyproject's "test" extra)
import SRS.Base
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import srs
from gateway.core.addresses import Address
from gateway.core.srs import SrsOptions, SrsVerdict

DEFAULT = SrsOptions()


def test_pysrs_is_the_oracle_we_think() -> None:
    assert SRS.__version__ == "1.0.3"
    assert __debug__, "pysrs checks hashes with assert: do not run this under python -O"


@contextlib.contextmanager
def pysrs_on_day(day: int) -> Iterator[None]:
    """pysrs working on UTC day `day`, with the Python 3 shim it needs."""
    clock = types.SimpleNamespace(time=lambda: day * 86400 + 43200)
    with (
        mock.patch.object(SRS.Base, "time", clock),
        # base64.encodestring was removed in Python 3.9; encodebytes is the same function renamed.
        mock.patch.object(base64, "encodestring", base64.encodebytes, create=True),
    ):
        yield


def pysrs_new(secrets: list[str], options: SrsOptions) -> Any:
    return SRS.new(
        secret=secrets,
        maxage=options.max_age,
        hashlength=options.hash_length,
        hashmin=options.hash_min,
        separator=options.separator,
        alwaysrewrite=options.always_rewrite,
    )


def pysrs_forward(sender: str, alias: str, secrets: list[str], day: int, options: SrsOptions) -> str:
    with pysrs_on_day(day):
        return str(pysrs_new(secrets, options).forward(sender, alias))


def pysrs_reverse(address: str, secrets: list[str], day: int, options: SrsOptions) -> str | None:
    with pysrs_on_day(day), contextlib.redirect_stderr(None):  # its case-smash warning goes to stderr
        try:
            return str(pysrs_new(secrets, options).reverse(address))
        except (AssertionError, ValueError):
            return None


ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/?^_`{|}~-"
dot_strings = st.lists(st.text(alphabet=ATEXT, min_size=1, max_size=8), min_size=1, max_size=3).map(".".join)
utf8_locals = st.text(alphabet="äöüßéñ漢字δÄÉ" + "abcXYZ.", min_size=1, max_size=10).filter(
    lambda s: not s.startswith(".") and not s.endswith(".") and ".." not in s
)
# Quoted local parts that need their quotes (else we drop them and pysrs keeps them) and hold no '"' or
# '\': pysrs strips the outer quotes but does not resolve escapes, we do (see docs/interop.md).
quoted_locals = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126, exclude_characters='"\\'),
    min_size=1,
    max_size=12,
).filter(lambda s: not Address(s, "x").__str__().startswith(s))
labels = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=3).map(".".join)
secret_lists = st.lists(
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=8, max_size=40),
    min_size=1,
    max_size=3,
)
option_sets = st.builds(
    lambda separator, length, always: SrsOptions(
        separator=separator, hash_length=length, hash_min=length, always_rewrite=always
    ),
    st.sampled_from(["=", "+", "-"]),
    st.integers(4, 27),
    st.booleans(),
)


@st.composite
def senders(draw: st.DrawFn) -> str:
    local = draw(st.one_of(dot_strings, utf8_locals, quoted_locals))
    if srs.is_srs(local):
        local = "x" + local
    return str(Address(local, draw(domains)))


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    sender=senders(),
    alias=st.one_of(domains, domains.map(lambda d: "postmaster@" + d)),
    secrets=secret_lists,
    day=st.integers(0, 100000),
    age=st.integers(-3, 30),
    options=option_sets,
)
def test_forward_and_reverse_agree_with_pysrs(
    sender: str, alias: str, secrets: list[str], day: int, age: int, options: SrsOptions
) -> None:
    keys = [s.encode() for s in secrets]
    ours = srs.forward(sender, alias, keys, day, options)
    assert ours == pysrs_forward(sender, alias, secrets, day, options)
    # Each side reverses the other's (identical) address to the same result, on any later day.
    theirs_back = pysrs_reverse(ours, secrets[::-1], day + age, options)
    our_back = srs.reverse(ours, keys[::-1], day + age, options)
    if ours == sender:  # in the alias domain: not rewritten, nothing to reverse
        return
    assert our_back.address == theirs_back, our_back.reason
    assert (our_back.verdict is SrsVerdict.VALID) == (0 <= age <= options.max_age)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(sender=senders(), secrets=secret_lists, day=st.integers(0, 100000), options=option_sets)
def test_srs1_agrees_with_pysrs(sender: str, secrets: list[str], day: int, options: SrsOptions) -> None:
    keys = [s.encode() for s in secrets]
    first = srs.forward(sender, "first.example", [b"another forwarder's secret"], day)
    ours = srs.forward(first, "second.example", keys, day, options)
    assert ours == pysrs_forward(first, "second.example", secrets, day, options)
    third = srs.forward(ours, "third.example", keys, day, options)
    assert third == pysrs_forward(ours, "third.example", secrets, day, options)
    for address in (ours, third):
        assert srs.reverse(address, keys, day + 400, options).address == pysrs_reverse(
            address, secrets, day + 400, options
        )


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    sender=senders(),
    secrets=secret_lists,
    day=st.integers(0, 100000),
    position=st.integers(0, 26),
    replacement=st.sampled_from("ABCxyz019+/"),
    smash=st.sampled_from(["none", "lower", "upper"]),
)
def test_tampered_and_case_smashed_hashes_agree_with_pysrs(
    sender: str, secrets: list[str], day: int, position: int, replacement: str, smash: str
) -> None:
    keys = [s.encode() for s in secrets]
    forwarded = srs.forward(sender, "fwd.example", keys, day)
    local, _, domain = forwarded.rpartition("@")
    quote = '"' if local.startswith('"') else ""
    body = local.strip('"')
    hash_ = body[5:9]
    index = position % 4
    hash_ = hash_[:index] + replacement + hash_[index + 1 :]
    hash_ = {"none": hash_, "lower": hash_.lower(), "upper": hash_.upper()}[smash]
    tampered = f"{quote}{body[:5]}{hash_}{body[9:]}{quote}@{domain}"
    ours = srs.reverse(tampered, keys, day, DEFAULT)
    assert ours.address == pysrs_reverse(tampered, secrets, day, DEFAULT), ours.reason
