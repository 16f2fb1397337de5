"""smtpd.py: the DATA stream decoder (pure), and the server edge's ESMTP handling over real sockets."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.smtpd import BareNewline, DataDecoder, DataFailure


def decode(
    *chunks: bytes, size: int | None = None, line: int = 1000, mode: BareNewline = BareNewline.NORMALIZE
):
    decoder = DataDecoder(size, line, mode)
    out = b""
    for chunk in chunks:
        if decoder.done:
            break
        out += decoder.feed(chunk)
    return decoder, out


# ------------------------------------------------------------------------------------------------ DataDecoder


def test_a_clean_message_passes_unchanged_and_still_dot_stuffed() -> None:
    body = b"Subject: hi\r\n\r\n..a stuffed line\r\nend\r\n"
    decoder, out = decode(body + b".\r\n")
    assert decoder.done and decoder.failure is None
    assert out == body
    assert decoder.size == len(body)


def test_the_end_is_found_across_any_chunk_boundary() -> None:
    stream = b"line one\r\nline two\r\n.\r\nQUIT\r\n"
    for cut in range(1, len(stream)):
        decoder = DataDecoder(None, 1000)
        out = decoder.feed(stream[:cut])
        rest = stream[cut:]
        if not decoder.done:
            out += decoder.feed(rest)
            rest = b""
        assert decoder.done, cut
        assert out == b"line one\r\nline two\r\n", cut
        assert decoder.leftover + rest == b"QUIT\r\n", cut


def test_an_empty_message() -> None:
    decoder, out = decode(b".\r\nQUIT\r\n")
    assert decoder.done and out == b"" and decoder.leftover == b"QUIT\r\n"


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        # A bare LF ends a line (Postfix normalize) but "\n.\n" never ends DATA: the dot line is sent on
        # as the empty line it stands for, so the next hop cannot see an end of DATA in it either.
        (b"a\n.\nb\r\n.\r\n", b"a\r\n\r\nb\r\n"),
        (b"a\r\n.\nb\r\n.\r\n", b"a\r\n\r\nb\r\n"),
        (b"a\n.\r\nb\r\n.\r\n", b"a\r\n\r\nb\r\n"),
        (b"a\r.\r\nb\r\n.\r\n", b"a .\r\nb\r\n"),
        # Stray CR and NUL become spaces (Postfix cleanup_replace_stray_cr_lf).
        (b"a\rb\r\n.\r\n", b"a b\r\n"),
        (b"a\x00b\r\n.\r\n", b"a b\r\n"),
        (b"x\r\r\n.\r\n", b"x \r\n"),
    ],
)
def test_bare_newlines_and_stray_characters_are_normalised(stream: bytes, expected: bytes) -> None:
    decoder, out = decode(stream)
    assert decoder.done and decoder.failure is None
    assert out == expected


def test_reject_mode_refuses_a_bare_newline() -> None:
    decoder, out = decode(b"a\nb\r\n.\r\n", mode=BareNewline.REJECT)
    assert decoder.done and decoder.failure is DataFailure.BARE_NEWLINE and out == b""


def test_past_the_size_limit_nothing_more_is_passed_on_but_the_end_is_still_found() -> None:
    decoder = DataDecoder(100, 1000)
    first = decoder.feed(b"x" * 60 + b"\r\n")
    assert first
    assert decoder.feed(b"y" * 60 + b"\r\n") == b""
    assert decoder.failure is DataFailure.TOO_BIG
    assert decoder.feed(b"z" * 5000 + b"\r\n.\r\nQUIT\r\n") == b""
    assert decoder.done and decoder.leftover == b"QUIT\r\n"


def test_a_line_over_the_limit_fails_in_one_chunk_or_many() -> None:
    decoder, _ = decode(b"a" * 999 + b"\r\n.\r\n", line=1000)
    assert decoder.failure is DataFailure.LINE_TOO_LONG
    decoder, _ = decode(b"a" * 998 + b"\r\n.\r\n", line=1000)
    assert decoder.failure is None
    # An unfinished line is never buffered past the limit, and the end is found after it.
    decoder = DataDecoder(None, 1000)
    for _ in range(100):
        assert decoder.feed(b"b" * 4096) == b""
    assert decoder.failure is DataFailure.LINE_TOO_LONG
    decoder.feed(b"\r\nmore\r\n.\r\n")
    assert decoder.done


def test_a_line_limit_of_zero_means_none() -> None:
    decoder, out = decode(b"a" * 50_000 + b"\r\n.\r\n", line=0)
    assert decoder.failure is None and len(out) == 50_002


lines = st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=30)


def stuffed(body_lines: list[bytes]) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in body_lines)


@settings(max_examples=200, deadline=None)
@given(lines, st.lists(st.integers(min_value=1, max_value=64), max_size=10))
def test_a_well_formed_body_passes_unchanged_however_it_is_cut(
    body_lines: list[bytes], cuts: list[int]
) -> None:
    body = stuffed(body_lines)
    stream = body + b".\r\nQUIT\r\n"
    decoder = DataDecoder(None, 1000)
    out = b""
    position = 0
    for cut in [*cuts, len(stream)]:
        if decoder.done:
            break
        out += decoder.feed(stream[position : position + cut])
        position += cut
    while not decoder.done:
        out += decoder.feed(stream[position:])
        position = len(stream)
    assert out == body.replace(b"\x00", b" ")
    assert decoder.leftover + stream[position:] == b"QUIT\r\n"


_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n|\x00")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=1, max_value=50), max_size=8))
def test_nothing_the_next_hop_gets_is_bare_or_ends_data_early(junk: bytes, cuts: list[int]) -> None:
    # Whatever a client sends, what goes on has only CRLF line ends, no NUL, and no end of DATA in it.
    stream = junk.replace(b"\r\n.\r\n", b"\r\n..\r\n")
    if stream.startswith(b".\r\n"):
        stream = b"." + stream
    stream += b"\r\n.\r\n"
    decoder = DataDecoder(None, 1000)
    out = b""
    position = 0
    for cut in [*cuts, len(stream)]:
        if decoder.done:
            break
        out += decoder.feed(stream[position : position + cut])
        position += cut
    assert decoder.done
    if decoder.failure is None:
        assert not _BARE.search(out)
        assert b"\r\n.\r\n" not in out and not out.startswith(b".\r\n")
        assert out == b"" or out.endswith(b"\r\n")
