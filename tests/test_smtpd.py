"""smtpd.py: the DATA stream decoder (pure), and the server edge's ESMTP handling over real sockets."""

from __future__ import annotations

import asyncio
import re
import ssl
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import replies
from gateway.smtpcore import BareNewline, DataDecoder, DataFailure
from tests.smtp_peers import (
    FakeNextHop,
    RawClient,
    gateway_config,
    gateway_port,
    make_cert,
    run,
    running_gateway,
)


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


# ------------------------------------------------------------------------------------------------ the edge


def test_past_the_size_limit_the_next_hop_transaction_is_dropped_without_the_final_dot() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop:
            cfg = gateway_config(hop.port, limits={"message_size_limit": 10_000})
            async with running_gateway(cfg) as gw:
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                await client.open_data("alice@example.org", "bob@example.com")
                client.send((b"z" * 98 + b"\r\n") * 300 + b".\r\n")
                assert await client.reply() == (552, "5.3.4 " + replies.MESSAGE_TOO_BIG.text)
                # The session goes on, and a message within the limit is relayed.
                await client.open_data("alice@example.org", "bob@example.com")
                assert await client.cmd("small\r\n.") == (250, "2.0.0 Ok: queued as FAKE")
                await client.close()
            assert len(hop.messages) == 1 and hop.messages[0].data == b"small\r\n"
            assert hop.commands.count("DATA") == 2

    run(body())


def test_smuggling_with_bare_newlines_does_not_make_a_second_message() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            await client.open_data("alice@example.org", "bob@example.com")
            client.send(
                b"Subject: one\r\n\r\nfirst\n.\nMAIL FROM:<evil@example.org>\nRCPT TO:<bob@example.com>\n"
                b"DATA\nSubject: two\r\n.\r\n"
            )
            assert (await client.reply())[0] == 250
            await client.close()
            (message,) = hop.messages
            assert message.data == (
                b"Subject: one\r\n\r\nfirst\r\n\r\nMAIL FROM:<evil@example.org>\r\n"
                b"RCPT TO:<bob@example.com>\r\nDATA\r\nSubject: two\r\n"
            )
            assert hop.commands.count("MAIL") == 1

    run(body())


def test_a_line_over_the_limit_is_refused() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop:
            async with running_gateway(gateway_config(hop.port, limits={"line_length_limit": 100})) as gw:
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                await client.open_data("alice@example.org", "bob@example.com")
                client.send(b"a" * 200 + b"\r\n.\r\n")
                assert await client.reply() == (500, "5.5.2 Line too long")
                await client.close()
            assert hop.messages == []

    run(body())


def test_too_many_recipients() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop:
            async with running_gateway(gateway_config(hop.port, limits={"recipient_limit": 2})) as gw:
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                assert (await client.cmd("MAIL FROM:<alice@example.org>"))[0] == 250
                assert (await client.cmd("RCPT TO:<bob@example.com>"))[0] == 250
                # A refused recipient does not use up the limit (Postfix counts accepted ones).
                assert (await client.cmd("RCPT TO:<someone@elsewhere.test>"))[0] == 554
                assert (await client.cmd("RCPT TO:<carol@example.com>"))[0] == 250
                assert await client.cmd("RCPT TO:<dave@example.com>") == (452, "4.5.3 Too many recipients")
                assert (await client.cmd("DATA"))[0] == 354
                assert (await client.cmd("x\r\n."))[0] == 250
                await client.close()
            assert len(hop.messages[0].rcpts) == 2

    run(body())


def test_command_syntax_and_sequence() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            assert (await client.reply())[0] == 220
            assert (await client.cmd("MAIL FROM:<a@example.org>"))[0] == 503
            assert (await client.cmd("HELO client.test"))[0] == 250
            assert (await client.cmd("MAIL FROM:<a@example.org> SIZE=10"))[0] == 501  # no EHLO, no parameters
            assert (await client.cmd("RCPT TO:<bob@example.com>"))[0] == 503
            assert (await client.cmd("EHLO client.test"))[0] == 250
            assert (await client.cmd("MAIL FROM:a@example.org"))[0] == 501
            assert (await client.cmd("MAIL FROM:<a@example.org> FOO=BAR"))[0] == 555
            assert (await client.cmd("MAIL FROM:<a@example.org> SIZE=1 SIZE=2"))[0] == 501
            assert (await client.cmd("MAIL FROM:<a@example.org>"))[0] == 250
            assert (await client.cmd("MAIL FROM:<a@example.org>"))[0] == 503
            assert (await client.cmd("DATA"))[0] == 503
            assert (await client.cmd("RCPT TO:<>"))[0] == 501
            assert (await client.cmd("RCPT TO:<bob@example.com> NOTIFY=SOMETIMES"))[0] == 501
            assert (await client.cmd("RSET"))[0] == 250
            assert (await client.cmd("VRFY bob"))[0] == 252
            assert (await client.cmd("EXPN list"))[0] == 502
            assert (await client.cmd("NOOP"))[0] == 250
            assert (await client.cmd("HELP"))[0] == 214
            assert (await client.cmd("AUTH PLAIN AGFAYg=="))[0] == 500  # not offered, not known
            assert (await client.cmd("QUIT"))[0] == 221
            assert await client.rest() == b""
            await client.close()

    run(body())


def test_helo_and_ehlo_without_a_name_are_refused_and_the_session_goes_on() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            assert (await client.reply())[0] == 220
            assert await client.cmd("HELO") == (501, "5.5.4 Syntax: HELO hostname")
            assert await client.cmd("EHLO") == (501, "5.5.4 Syntax: EHLO hostname")
            assert await client.cmd("MAIL FROM:<a@example.org>") == (503, "5.5.1 Error: send HELO/EHLO first")
            assert (await client.cmd("HELO client.test"))[0] == 250
            assert (await client.cmd("EHLO client.test"))[0] == 250
            await client.close()

    run(body())


def test_odd_but_valid_addresses_take_the_slow_path_and_pass_unchanged() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            assert (await client.cmd('MAIL FROM:<"odd sender"@example.org>'))[0] == 250
            assert (await client.cmd("RCPT TO:<bob@example.com>"))[0] == 250
            assert (await client.cmd("DATA"))[0] == 354
            assert (await client.cmd("x\r\n."))[0] == 250
            # UTF-8 needs SMTPUTF8 (RFC 6531 §3.4).
            assert (await client.cmd("MAIL FROM:<jörg@example.org>"))[0] == 553
            assert (await client.cmd("MAIL FROM:<jörg@example.org> SMTPUTF8"))[0] == 250
            assert (await client.cmd("RCPT TO:<bob@example.com>"))[0] == 250
            await client.close()
            assert hop.messages[0].mail == b'MAIL FROM:<"odd sender"@example.org>'

    run(body())


def test_an_over_long_command_line_is_refused_and_the_session_goes_on() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            assert await client.cmd("NOOP " + "x" * 5000) == (500, "5.5.2 Line too long")
            assert (await client.cmd("NOOP"))[0] == 250
            await client.close()

    run(body())


def test_an_idle_client_is_told_421_and_disconnected() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop:
            async with running_gateway(gateway_config(hop.port, limits={"command_timeout": 0.3})) as gw:
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                assert await client.rest() == f"{replies.TIMEOUT}\r\n".encode()
                await client.close()

    run(body())


def test_the_idle_timeout_counts_from_the_last_command_not_the_first() -> None:
    # One timer per session whose deadline moves (smtpd._reset_timeout): a client that keeps talking for
    # several timeouts in all must never be cut off by a deadline that has already moved on.
    async def body() -> None:
        async with FakeNextHop() as hop:
            async with running_gateway(gateway_config(hop.port, limits={"command_timeout": 0.3})) as gw:
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                for _ in range(6):  # 1.2 s in all, 0.2 s apart
                    await asyncio.sleep(0.2)
                    assert (await client.cmd("NOOP"))[0] == 250
                assert await client.rest() == f"{replies.TIMEOUT}\r\n".encode()
                await client.close()

    run(body())


def test_a_client_stalling_mid_data_is_cut_at_the_data_timeout() -> None:
    # The DATA timeout is shorter than the command timeout here: the session's one timer, already set for
    # the later command deadline, must be brought forward, not left to fire 30 s from now.
    async def body() -> None:
        async with FakeNextHop() as hop:
            limits = {"command_timeout": 30, "data_timeout": 0.3}
            async with running_gateway(gateway_config(hop.port, limits=limits)) as gw:
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                await client.open_data("a@example.org", "bob@example.com")
                client.send(b"Subject: half a message\r\n")
                rest = await asyncio.wait_for(client.rest(), 10)
                assert rest == f"{replies.TIMEOUT}\r\n".encode()
                await client.close()
        assert hop.messages == []

    run(body())


def test_sessions_per_client_are_limited() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop:
            async with running_gateway(gateway_config(hop.port, limits={"max_sessions_per_client": 1})) as gw:
                first = await RawClient.connect(gateway_port(gw))
                await first.ehlo()
                second = await RawClient.connect(gateway_port(gw))
                assert await second.rest() == f"{replies.TOO_MANY_FROM_CLIENT}\r\n".encode()
                await second.close()
                await first.cmd("QUIT")
                await first.close()
                for _ in range(100):  # the server notices the first session's end
                    if not gw.listeners[0].sessions:
                        break
                    await asyncio.sleep(0.01)
                third = await RawClient.connect(gateway_port(gw))
                assert (await third.ehlo())[0] == 250
                await third.close()

    run(body())


def test_too_many_errors_end_the_session() -> None:
    async def body() -> None:
        limits = {"soft_error_limit": 1, "hard_error_limit": 3, "error_sleep_time": 0.0}
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port, limits=limits)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            assert (await client.cmd("RCPT TO:<bob@example.com>"))[0] == 503
            assert (await client.cmd("DATA"))[0] == 503
            assert (await client.cmd("BOGUS"))[0] == 500
            assert await client.rest() == f"{replies.TOO_MANY_ERRORS}\r\n".encode()
            await client.close()

    run(body())


def test_starttls_when_the_listener_has_a_certificate(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)

    async def body() -> None:
        listener = {"tls_cert": str(cert), "tls_key": str(key)}
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port, listener=listener)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            _, ehlo = await client.ehlo()
            assert "STARTTLS" in ehlo.split("\n")
            assert (await client.cmd("STARTTLS"))[0] == 220
            context = ssl.create_default_context(cafile=str(cert))
            await client.writer.start_tls(context, server_hostname="gw.test")
            # RFC 3207 §4.2: the client starts over, and STARTTLS is not offered again.
            assert (await client.cmd("MAIL FROM:<a@example.org>"))[0] == 503
            code, ehlo = await client.cmd("EHLO client.test")
            assert code == 250 and "STARTTLS" not in ehlo.split("\n")
            await client.open_data("a@example.org", "bob@example.com")
            assert (await client.cmd("secret\r\n."))[0] == 250
            assert (await client.cmd("QUIT"))[0] == 221
            await client.close()
            assert hop.messages[0].data == b"secret\r\n"

    run(body())


def test_no_starttls_without_a_certificate() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            _, ehlo = await client.ehlo()
            assert "STARTTLS" not in ehlo.split("\n")
            assert (await client.cmd("STARTTLS"))[0] == 502
            await client.close()

    run(body())


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=40),
    st.integers(min_value=3, max_value=50),
)
def test_the_long_line_check_agrees_with_splitting(lengths: list[int], limit: int) -> None:
    lines = b"".join(b"x" * n + b"\r\n" for n in lengths)
    expected = max(lengths) + 2 > limit
    assert DataDecoder(None, limit)._has_long_line(lines) is expected


def test_commands_pipelined_behind_starttls_are_thrown_away(tmp_path: Path) -> None:
    # CVE-2011-0411 (STARTTLS command injection): plaintext sent after STARTTLS must not be run inside TLS.
    cert, key = make_cert(tmp_path)

    async def body() -> None:
        listener = {"tls_cert": str(cert), "tls_key": str(key)}
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port, listener=listener)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            client.send("STARTTLS\r\nMAIL FROM:<injected@example.org>")
            assert (await client.reply())[0] == 220
            await client.writer.start_tls(
                ssl.create_default_context(cafile=str(cert)), server_hostname="gw.test"
            )
            code, text = await client.cmd("EHLO client.test")
            assert code == 250 and text.startswith("gw.test")
            # Had the injected MAIL run, this would be a nested MAIL (503).
            assert (await client.cmd("MAIL FROM:<a@example.org>"))[0] == 250
            await client.close()

    run(body())
