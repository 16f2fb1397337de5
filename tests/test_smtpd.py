"""smtpd.py: the server edge's ESMTP handling over real sockets (its state machine: test_smtpcore.py)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

from gateway.core import replies
from tests.smtp_peers import (
    FakeNextHop,
    RawClient,
    Script,
    free_port,
    gateway_config,
    gateway_port,
    make_cert,
    run,
    running_gateway,
)

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


def test_a_next_hop_capping_recipients_costs_no_errors_and_the_rest_go_in_a_second_transaction() -> None:
    async def body() -> None:
        slept: list[float] = []

        async def tarpit(seconds: float) -> None:
            slept.append(seconds)

        rcpts = [f"user{n}@example.com" for n in range(75)]
        async with FakeNextHop(Script(max_recipients=50)) as hop:
            # The default limits: soft 10, hard 20 errors.
            async with running_gateway(gateway_config(hop.port), sleep=tarpit) as gw:
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                client.send(
                    "MAIL FROM:<alice@example.org>\r\n"
                    + "".join(f"RCPT TO:<{r}>\r\n" for r in rcpts)
                    + "DATA"
                )
                assert (await client.reply())[0] == 250
                answers = [await client.reply() for _ in rcpts]
                assert [code for code, _ in answers] == [250] * 50 + [452] * 25
                # The next hop's own words reach the client.
                assert answers[-1] == (452, "4.5.3 Error: too many recipients")
                assert (await client.reply())[0] == 354
                assert await client.cmd("hello\r\n.") == (250, "2.0.0 Ok: queued as FAKE")
                # The rest, in a second transaction of the same session.
                assert (await client.cmd("MAIL FROM:<alice@example.org>"))[0] == 250
                for r in rcpts[50:]:
                    assert (await client.cmd(f"RCPT TO:<{r}>"))[0] == 250
                assert await client.cmd("DATA") == (354, "End data with <CR><LF>.<CR><LF>")
                assert (await client.cmd("hello\r\n."))[0] == 250
                # Our own refusals still count.
                assert (await client.cmd("RCPT TO:<bob@example.com>"))[0] == 503
                assert (await client.cmd("QUIT"))[0] == 221
                await client.close()
            assert slept == []
            first, second = hop.messages
            assert first.rcpts == [f"RCPT TO:<{r}>".encode() for r in rcpts[:50]]
            assert second.rcpts == [f"RCPT TO:<{r}>".encode() for r in rcpts[50:]]

    run(body())


def test_a_next_hop_outage_does_not_use_up_the_error_limit() -> None:
    async def body() -> None:
        limits = {"soft_error_limit": 1, "hard_error_limit": 3, "error_sleep_time": 0.0}
        async with running_gateway(gateway_config(free_port(), limits=limits)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            for _ in range(5):
                assert (await client.cmd("MAIL FROM:<alice@example.org>"))[0] == 250
                assert await client.cmd("RCPT TO:<bob@example.com>") == (
                    451,
                    f"4.4.1 {replies.NEXT_HOP_DOWN.text}",
                )
                assert (await client.cmd("RSET"))[0] == 250
            # ... and the client's own errors still do.
            assert (await client.cmd("DATA"))[0] == 503
            assert (await client.cmd("DATA"))[0] == 503
            assert (await client.cmd("DATA"))[0] == 503
            assert await client.rest() == f"{replies.TOO_MANY_ERRORS}\r\n".encode()


def test_a_client_flooding_while_the_next_hop_thinks_is_not_read_past_the_limit() -> None:
    # Reading stops while a command is in hand and what the client sent beyond it passes a bound, as
    # asyncio's StreamReader stopped at twice its limit: memory does not grow with what a client pushes.
    async def body() -> None:
        async with (
            FakeNextHop(Script(delays={"RCPT": 1.0})) as hop,
            running_gateway(gateway_config(hop.port)) as gw,
        ):
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            await client.cmd("MAIL FROM:<a@example.org>")
            client.send("RCPT TO:<bob@example.com>")
            await asyncio.sleep(0.1)  # the gateway now waits on the next hop's RCPT reply
            client.send(b"NOOP\r\n" * 1_000_000)  # 6 MB of commands it cannot take yet
            await asyncio.sleep(0.4)
            (session,) = gw.listeners[0].sessions
            assert session.core.buffered_octets < 1024 * 1024
            assert (await client.reply())[0] == 250  # the RCPT, once the next hop has answered
            for _ in range(1000):
                assert (await client.reply())[0] == 250  # and the NOOPs, in order
            await client.close()

    run(body())


def test_a_client_that_does_not_read_its_replies_is_not_served_past_the_write_limit() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # so the replies back up at our end
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway_port(gw)))
            client = RawClient(*await asyncio.open_connection(sock=sock))
            await client.ehlo()
            client.send(b"EHLO c\r\n" * 200_000)  # some 30 MB of EHLO replies owed, none read
            await asyncio.sleep(1.0)
            (session,) = gw.listeners[0].sessions
            assert session.transport.get_write_buffer_size() < 1024 * 1024
            for _ in range(1000):
                assert (await client.reply())[0] == 250
            await client.close()

    run(body())
