"""relay.py end to end: a real client, the gateway and a real (fault-injecting) next hop, over 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core import logs, prvs, replies
from gateway.core.keyring import Key, Keyring
from gateway.edge.relay import DecisionEvent, OutboundRules, _xtext
from gateway.policy.policy import Action, Reason
from tests.smtp_peers import (
    SECRET,
    AiosmtpdSink,
    FakeNextHop,
    RawClient,
    Script,
    free_port,
    gateway_config,
    gateway_port,
    make_keyring,
    run,
    running_gateway,
)

TODAY = int(time.time()) // 86400


def tag(address: str, today: int = TODAY) -> str:
    return prvs.sign(address, make_keyring(), today)


def forged(address: str) -> str:
    good = tag(address)
    head, _, rest = good.partition("=")
    code, _, local = rest.partition("=")
    flipped = code[:-1] + ("0" if code[-1] != "0" else "1")
    return f"{head}={flipped}={local}"


def transactions(hop: FakeNextHop) -> list[str]:
    """The next hop's commands, without the EHLO/QUIT of connection set-up and the start-up probe."""
    return [c for c in hop.commands if c not in ("EHLO", "QUIT", "RSET")]


async def send_message(client: RawClient, body: bytes = b"Subject: test\r\n\r\nhello\r\n") -> tuple[int, str]:
    code, text = await client.cmd("DATA")
    assert code == 354, (code, text)
    client.send(body + b".\r\n")
    await client.writer.drain()
    return await client.reply()


def test_a_valid_bounce_is_relayed_with_the_tag_stripped() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            assert (await client.ehlo())[0] == 250
            assert await client.cmd("MAIL FROM:<>") == (250, "2.1.0 Sender OK")
            assert (await client.cmd(f"RCPT TO:<{tag('bob@example.com')}>"))[0] == 250
            # The next hop's own verdict on the message is what the client hears.
            assert await send_message(client) == (250, "2.0.0 Ok: queued as FAKE")
            assert (await client.cmd("QUIT"))[0] == 221
            await client.close()
            (message,) = hop.messages
            assert message.mail == b"MAIL FROM:<>"
            assert message.rcpts == [b"RCPT TO:<bob@example.com>"]
            assert message.data == b"Subject: test\r\n\r\nhello\r\n"

    run(body())


def test_forged_expired_and_unsigned_bounces_are_refused_at_rcpt_and_the_next_hop_sees_nothing() -> None:
    async def body() -> None:
        events: list[DecisionEvent] = []
        async with (
            FakeNextHop() as hop,
            running_gateway(gateway_config(hop.port), observers=[events.append]) as gw,
        ):
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            assert (await client.cmd("MAIL FROM:<>"))[0] == 250
            for rcpt, why in [
                (forged("bob@example.com"), "bad-hash"),
                (tag("bob@example.com", TODAY - 30), "expired"),
                ("bob@example.com", "unsigned"),
            ]:
                code, text = await client.cmd(f"RCPT TO:<{rcpt}>")
                assert code == 550 and text.startswith("5.7.1 "), (rcpt, code, text)
                assert why in text
            assert await client.cmd("DATA") == (554, "5.5.1 Error: no valid recipients")
            await client.cmd("QUIT")
            await client.close()
            assert transactions(hop) == []
            assert hop.messages == []
            assert [e.action for e in events] == [Action.REJECT] * 3
            assert [e.reason for e in events] == [Reason.BAD_HASH, Reason.EXPIRED, Reason.UNSIGNED]
            assert all(e.next_hop_reply is None for e in events)

    run(body())


def test_postmaster_is_exempt() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            await client.cmd("MAIL FROM:<>")
            assert (await client.cmd("RCPT TO:<postmaster@example.com>"))[0] == 250
            assert (await client.cmd("RCPT TO:<abuse@example.com>"))[0] == 250
            assert (await send_message(client))[0] == 250
            await client.close()
            assert hop.messages[0].rcpts == [
                b"RCPT TO:<postmaster@example.com>",
                b"RCPT TO:<abuse@example.com>",
            ]

    run(body())


def test_observe_mode_accepts_and_reports_the_would_reject() -> None:
    async def body() -> None:
        events: list[DecisionEvent] = []
        async with FakeNextHop() as hop:
            cfg = gateway_config(hop.port, observe=True)
            async with running_gateway(cfg, observers=[events.append]) as gw:
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                await client.cmd("MAIL FROM:<>")
                assert (await client.cmd("RCPT TO:<bob@example.com>"))[0] == 250
                assert (await send_message(client))[0] == 250
                await client.close()
            assert hop.messages[0].rcpts == [b"RCPT TO:<bob@example.com>"]
            (event,) = events
            assert event.action is Action.RELAY
            assert event.would_reject is not None and event.would_reject.code == 550
            assert event.next_hop_reply is not None and event.next_hop_reply.startswith("250")

    run(body())


def test_an_untagged_bounce_is_accepted_in_the_grace_window_and_refused_after_it() -> None:
    # The day is moved through the keyring, not the clock: signing began today, then (after the gateway's
    # own reload) seven days earlier, one lifetime_days, which puts today just past the window.
    def began(day: int) -> Keyring:
        return Keyring((Key(1, SECRET),), signing_began=datetime.fromtimestamp(day * 86400, UTC))

    async def body() -> None:
        events: list[DecisionEvent] = []
        async with FakeNextHop() as hop:
            cfg = gateway_config(hop.port)
            async with running_gateway(cfg, began(TODAY), observers=[events.append]) as gw:
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                assert (await client.cmd("MAIL FROM:<>"))[0] == 250
                assert (await client.cmd("RCPT TO:<bob@example.com>"))[0] == 250
                code, text = await client.cmd(f"RCPT TO:<{forged('bob@example.com')}>")
                assert code == 550 and "bad-hash" in text  # a forged tag is never covered
                assert (await send_message(client))[0] == 250

                gw.apply(cfg, began(TODAY - 7))
                assert (await client.cmd("MAIL FROM:<>"))[0] == 250
                code, text = await client.cmd("RCPT TO:<bob@example.com>")
                assert code == 550 and text.startswith("5.7.1 ") and "unsigned" in text
                await client.cmd("QUIT")
                await client.close()
            assert [m.rcpts for m in hop.messages] == [[b"RCPT TO:<bob@example.com>"]]
            assert [(e.action, e.reason) for e in events] == [
                (Action.RELAY, Reason.GRACE),
                (Action.REJECT, Reason.BAD_HASH),
                (Action.REJECT, Reason.UNSIGNED),
            ]

    run(body())


def test_dsn_and_other_parameters_arrive_at_the_next_hop_byte_for_byte() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            _, ehlo = await client.ehlo()
            assert (
                "DSN" in ehlo.split("\n")
                and "8BITMIME" in ehlo.split("\n")
                and "SMTPUTF8" in ehlo.split("\n")
            )
            mail_params = "SIZE=1234 BODY=8BITMIME RET=HDRS ENVID=QQ314159+2Bx SMTPUTF8"
            rcpt_params = "NOTIFY=SUCCESS,DELAY ORCPT=rfc822;Bob+2BTag@Example.COM"
            assert (await client.cmd(f"MAIL FROM:<alice@example.org> {mail_params}"))[0] == 250
            assert (await client.cmd(f"RCPT TO:<bob@example.com> {rcpt_params}"))[0] == 250
            assert (await client.cmd("RCPT TO:<carol@example.com> notify=never"))[0] == 250
            assert (await send_message(client))[0] == 250
            await client.close()
            message = hop.messages[0]
            assert message.mail == f"MAIL FROM:<alice@example.org> {mail_params}".encode()
            assert message.rcpts == [
                f"RCPT TO:<bob@example.com> {rcpt_params}".encode(),
                b"RCPT TO:<carol@example.com> notify=never",
            ]

    run(body())


def test_extensions_the_next_hop_cannot_carry_are_not_offered_and_their_parameters_refused() -> None:
    async def body() -> None:
        script = Script(extensions=("PIPELINING", "SIZE 1000000"))
        async with FakeNextHop(script) as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            _, ehlo = await client.ehlo()
            offered = ehlo.split("\n")
            assert "DSN" not in offered and "8BITMIME" not in offered and "SMTPUTF8" not in offered
            # SIZE is the smaller of ours and the next hop's.
            assert "SIZE 1000000" in offered
            code, _ = await client.cmd("MAIL FROM:<a@example.org> RET=FULL")
            assert code == 555
            code, _ = await client.cmd("MAIL FROM:<a@example.org> BODY=8BITMIME")
            assert code == 555
            code, text = await client.cmd("MAIL FROM:<a@example.org> SIZE=2000000")
            assert (code, text) == (552, "5.3.4 Message size exceeds fixed maximum message size")
            await client.close()

    run(body())


def test_a_next_hop_that_refuses_one_recipient_of_two_is_reported_per_recipient() -> None:
    async def body() -> None:
        script = Script(rcpt_replies={"nobody@example.com": "550 5.1.1 <nobody@example.com>: User unknown"})
        events: list[DecisionEvent] = []
        async with (
            FakeNextHop(script) as hop,
            running_gateway(gateway_config(hop.port), observers=[events.append]) as gw,
        ):
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            await client.cmd("MAIL FROM:<alice@example.org>")
            assert (await client.cmd("RCPT TO:<bob@example.com>"))[0] == 250
            assert await client.cmd("RCPT TO:<nobody@example.com>") == (
                550,
                "5.1.1 <nobody@example.com>: User unknown",
            )
            assert (await send_message(client))[0] == 250
            await client.close()
            assert hop.messages[0].rcpts == [b"RCPT TO:<bob@example.com>"]
            assert [e.next_hop_reply for e in events] == [
                "250 2.1.5 Ok",
                "550 5.1.1 <nobody@example.com>: User unknown",
            ]
            # The verdict is what the client was told; next_hop says that the refusal was the next hop's.
            assert [e.action for e in events] == [Action.RELAY, Action.REJECT]

    run(body())


def test_pipelined_commands_are_answered_in_order() -> None:
    async def body() -> None:
        script = Script(rcpt_replies={"nobody@example.com": "450 4.2.0 try later"})
        async with FakeNextHop(script) as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            client.send(
                "MAIL FROM:<>\r\n"
                f"RCPT TO:<{tag('bob@example.com')}>\r\n"
                "RCPT TO:<bob@example.com>\r\n"
                "RCPT TO:<postmaster@example.com>\r\n"
                f"RCPT TO:<{tag('nobody@example.com')}>\r\n"
                "DATA"
            )
            codes = [(await client.reply())[0] for _ in range(6)]
            assert codes == [250, 250, 550, 250, 450, 354]
            client.send(b"hi\r\n.\r\nQUIT\r\n")
            assert (await client.reply())[0] == 250
            assert (await client.reply())[0] == 221
            await client.close()
            assert hop.messages[0].rcpts == [
                b"RCPT TO:<bob@example.com>",
                b"RCPT TO:<postmaster@example.com>",
            ]

    run(body())


def test_a_dead_next_hop_gives_a_4xx_and_never_a_250() -> None:
    async def body() -> None:
        async with running_gateway(gateway_config(free_port())) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            assert (await client.cmd("MAIL FROM:<>"))[0] == 250
            assert await client.cmd(f"RCPT TO:<{tag('bob@example.com')}>") == (
                451,
                "4.4.1 " + replies.NEXT_HOP_DOWN.text,
            )
            code, _ = await client.cmd("DATA")
            assert 400 <= code < 500
            await client.close()

    run(body())


def test_a_next_hop_that_drops_the_connection_mid_data_gives_a_4xx() -> None:
    async def body() -> None:
        async with (
            FakeNextHop(Script(drop_after_bytes=5000)) as hop,
            running_gateway(gateway_config(hop.port)) as gw,
        ):
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            await client.cmd("MAIL FROM:<a@example.org>")
            await client.cmd("RCPT TO:<bob@example.com>")
            code, text = await send_message(client, b"x" * 70 + b"\r\n" * 1 + (b"y" * 70 + b"\r\n") * 2000)
            assert (code, text) == (451, "4.4.2 " + replies.NEXT_HOP_BROKEN.text)
            assert hop.messages == []
            # The session goes on: the next transaction gets a fresh next-hop connection.
            await client.cmd("MAIL FROM:<a@example.org>")
            await client.cmd("RCPT TO:<bob@example.com>")
            hop.script.drop_after_bytes = None
            assert (await send_message(client))[0] == 250
            await client.close()

    run(body())


def test_a_next_hop_too_slow_with_its_verdict_gives_a_4xx() -> None:
    async def body() -> None:
        limits = {"next_hop_data_done_timeout": 0.3}
        async with (
            FakeNextHop(Script(delays={"DOT": 5})) as hop,
            running_gateway(gateway_config(hop.port, limits=limits)) as gw,
        ):
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            await client.cmd("MAIL FROM:<a@example.org>")
            await client.cmd("RCPT TO:<bob@example.com>")
            assert await send_message(client) == (451, "4.4.2 " + replies.NEXT_HOP_TIMEOUT.text)
            await client.close()

    run(body())


def test_a_next_hop_refusing_the_sender_is_reported_at_rcpt() -> None:
    async def body() -> None:
        script = Script(mail_reply="451 4.3.0 sender check failed, try later")
        async with FakeNextHop(script) as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            assert (await client.cmd("MAIL FROM:<a@example.org>"))[0] == 250
            assert await client.cmd("RCPT TO:<bob@example.com>") == (
                451,
                "4.3.0 sender check failed, try later",
            )
            assert await client.cmd("RCPT TO:<carol@example.com>") == (
                451,
                "4.3.0 sender check failed, try later",
            )
            assert (await client.cmd("DATA"))[0] in (451, 554)
            await client.close()

    run(body())


def test_a_421_from_the_next_hop_is_not_passed_on_as_421() -> None:
    async def body() -> None:
        script = Script(rcpt_replies={"bob@example.com": "421 4.3.2 shutting down"})
        async with FakeNextHop(script) as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            await client.cmd("MAIL FROM:<a@example.org>")
            assert await client.cmd("RCPT TO:<bob@example.com>") == (451, "4.3.2 shutting down")
            await client.close()

    run(body())


def test_relaying_is_refused_and_the_next_hop_sees_nothing() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            await client.cmd("MAIL FROM:<a@example.org>")
            for rcpt in [
                "someone@elsewhere.test",
                "bob%elsewhere.test@example.com",
                '"bob@elsewhere.test"@example.com',
            ]:
                code, text = await client.cmd(f"RCPT TO:<{rcpt}>")
                assert code == 554 and text.startswith("5.7.1"), (rcpt, code, text)
            await client.close()
            assert transactions(hop) == []

    run(body())


def test_the_next_hop_connection_is_reused_across_messages() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            for _ in range(3):
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                await client.cmd("MAIL FROM:<a@example.org>")
                await client.cmd("RCPT TO:<bob@example.com>")
                assert (await send_message(client))[0] == 250
                await client.cmd("QUIT")
                await client.close()
            assert len(hop.messages) == 3
            assert hop.connections == 1  # the start-up probe's connection, reused for all three

    run(body())


def test_an_internal_error_never_leaks_to_the_client() -> None:
    class BrokenPolicy:
        def inbound_rcpt(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("secret internal detail")

    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            gw.holder.replace(BrokenPolicy())
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            await client.cmd("MAIL FROM:<>")
            code, text = await client.cmd("RCPT TO:<bob@example.com>")
            assert (code, text) == (451, "4.3.0 " + replies.LOCAL_ERROR.text)
            assert "secret" not in text
            await client.close()

    run(body())


def test_relaying_through_aiosmtpd() -> None:
    async def body() -> None:
        async with AiosmtpdSink() as sink, running_gateway(gateway_config(sink.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            await client.cmd("MAIL FROM:<>")
            await client.cmd(f"RCPT TO:<{tag('bob@example.com')}>")
            assert (await send_message(client, b"Subject: x\r\n\r\n..dot\r\n"))[0] == 250
            await client.close()
            (message,) = sink.messages
            assert message.rcpt_tos == ["bob@example.com"]
            assert message.content == b"Subject: x\r\n\r\n.dot\r\n"

    run(body())


# ------------------------------------------------------------------------------------------------ outbound
# The outbound role shares this engine; its full story is issue 6's. These show the seam works.

OUTBOUND = {"role": "outbound"}


def test_outbound_signs_our_sender_and_srs_rewrites_a_foreign_one() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop:
            cfg = gateway_config(hop.port, listener=OUTBOUND, srs_alias="fwd.example.com")
            async with running_gateway(cfg) as gw:
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                for sender in ["alice@example.com", "someone@elsewhere.test"]:
                    assert (await client.cmd(f"MAIL FROM:<{sender}> ENVID=x1"))[0] == 250
                    assert (await client.cmd("RCPT TO:<friend@elsewhere.test> NOTIFY=FAILURE"))[0] == 250
                    assert (await send_message(client))[0] == 250
                await client.close()
            signed, forwarded = hop.messages
            assert signed.mail.startswith(b"MAIL FROM:<prvs=1") and signed.mail.endswith(
                b"=alice@example.com> ENVID=x1"
            )
            assert (
                forwarded.mail.startswith(b"MAIL FROM:<SRS0=")
                and b"@fwd.example.com> ENVID=x1" in forwarded.mail
            )
            assert signed.rcpts == [b"RCPT TO:<friend@elsewhere.test> NOTIFY=FAILURE"]
            # The signed return path comes back in as a bounce through the inbound policy.
            returned = signed.mail.split(b"<", 1)[1].split(b">", 1)[0].decode()
            assert prvs.verify(returned, make_keyring(), TODAY).verdict is prvs.PrvsVerdict.VALID

    run(body())


def test_outbound_refuses_untrusted_clients_at_mail() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop:
            cfg = gateway_config(hop.port, listener={**OUTBOUND, "trusted": ["192.0.2.0/24"]})
            async with running_gateway(cfg) as gw:
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                code, text = await client.cmd("MAIL FROM:<alice@example.com>")
                assert code == 554 and text.startswith("5.7.1")
                await client.close()
            assert transactions(hop) == []

    run(body())


def test_outbound_never_half_rewrites_a_transaction() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop:
            cfg = gateway_config(
                hop.port, listener=OUTBOUND, policy={"exempt_recipients": ["list.example.net"]}
            )
            async with running_gateway(cfg) as gw:
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                await client.cmd("MAIL FROM:<alice@example.com>")
                assert (await client.cmd("RCPT TO:<friend@elsewhere.test>"))[0] == 250
                code, text = await client.cmd("RCPT TO:<members@list.example.net>")
                assert (code, text) == (452, "4.5.3 " + replies.SEPARATE_TRANSACTION.text)
                assert (await send_message(client))[0] == 250
                await client.close()
            assert hop.messages[0].rcpts == [b"RCPT TO:<friend@elsewhere.test>"]

    run(body())


def test_xforward_tells_a_next_hop_that_offers_it_who_the_client_is() -> None:
    async def body() -> None:
        script = Script(extensions=(*Script().extensions, "XFORWARD NAME ADDR PROTO HELO"))
        async with FakeNextHop(script) as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo("odd+helo=name")
            await client.cmd("MAIL FROM:<a@example.org>")
            await client.cmd("RCPT TO:<bob@example.com>")
            assert (await send_message(client))[0] == 250
            await client.close()
            start = hop.lines.index(
                b"XFORWARD NAME=[UNAVAILABLE] ADDR=127.0.0.1 PROTO=ESMTP HELO=odd+2Bhelo+3Dname"
            )
            assert hop.lines[start + 1].startswith(b"MAIL FROM:<a@example.org>")

    run(body())


def test_no_xforward_where_it_is_not_offered() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            await client.cmd("MAIL FROM:<a@example.org>")
            await client.cmd("RCPT TO:<bob@example.com>")
            await client.close()
            assert "XFORWARD" not in hop.commands

    run(body())


def test_a_trusted_client_names_its_own_client_with_xforward_for_one_transaction() -> None:
    """Postfix relaying through us with smtp_send_xforward_command: the next hop logs Postfix's client."""

    async def body() -> None:
        script = Script(extensions=(*Script().extensions, "XFORWARD NAME ADDR PROTO HELO"))
        async with FakeNextHop(script) as hop:
            async with running_gateway(gateway_config(hop.port, listener=OUTBOUND)) as gw:
                client = await RawClient.connect(gateway_port(gw))
                code, text = await client.ehlo()
                assert code == 250 and "XFORWARD NAME ADDR PROTO HELO" in text.splitlines()
                assert await client.cmd("XFORWARD NAME=mua.example.org ADDR=192.0.2.7") == (250, "2.0.0 OK")
                assert (await client.cmd("xforward helo=pc+2B1 proto=ESMTPSA"))[0] == 250  # adds up
                for _ in range(2):  # the second transaction has no XFORWARD: ours again
                    await client.cmd("MAIL FROM:<alice@example.com>")
                    await client.cmd("RCPT TO:<friend@elsewhere.test>")
                    assert (await send_message(client))[0] == 250
                await client.close()
            forwarded = [line for line in hop.lines if line.startswith(b"XFORWARD ")]
            assert forwarded == [
                b"XFORWARD NAME=mua.example.org ADDR=192.0.2.7 PROTO=ESMTPSA HELO=pc+2B1",
                b"XFORWARD NAME=[UNAVAILABLE] ADDR=127.0.0.1 PROTO=ESMTP HELO=client.test",
            ]

    run(body())


def test_xforward_is_refused_where_it_is_not_offered_and_checked_where_it_is() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop:
            async with running_gateway(gateway_config(hop.port)) as gw:  # inbound: the internet
                client = await RawClient.connect(gateway_port(gw))
                assert "XFORWARD" not in (await client.ehlo())[1]
                assert await client.cmd("XFORWARD ADDR=192.0.2.7") == (
                    550,
                    "5.7.0 Error: insufficient authorization",
                )
                await client.close()
            async with running_gateway(gateway_config(hop.port, listener=OUTBOUND)) as gw:
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                for bad in ("", " NAME", " SOURCE=LOCAL", " NAME=a=b", " NAME=a+2", " ADDR=" + "1" * 256):
                    code, text = await client.cmd("XFORWARD" + bad)
                    assert code == 501 and text.startswith("5.5.4 "), (bad, code, text)
                await client.cmd("MAIL FROM:<alice@example.com>")
                assert await client.cmd("XFORWARD ADDR=192.0.2.7") == (
                    503,
                    "5.5.1 Error: MAIL transaction in progress",
                )
                await client.cmd("RCPT TO:<friend@elsewhere.test>")
                assert (await send_message(client))[0] == 250, "the session goes on"
                await client.close()

    run(body())


def test_a_client_gone_while_the_next_hop_thinks_leaves_no_half_transaction_behind() -> None:
    async def body() -> None:
        async with (
            FakeNextHop(Script(delays={"RCPT": 0.3})) as hop,
            running_gateway(gateway_config(hop.port)) as gw,
        ):
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            await client.cmd("MAIL FROM:<a@example.org>")
            client.send("RCPT TO:<bob@example.com>")
            await client.writer.drain()
            await asyncio.sleep(0.05)  # the gateway is now waiting for the next hop's RCPT reply
            await client.close()
            await asyncio.sleep(0.4)
            # The next client is served normally, on a connection in a known state.
            hop.script.delays = {}
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            await client.cmd("MAIL FROM:<a@example.org>")
            await client.cmd("RCPT TO:<carol@example.com>")
            assert (await send_message(client))[0] == 250
            await client.close()
            assert [m.rcpts for m in hop.messages] == [[b"RCPT TO:<carol@example.com>"]]

    run(body())


def test_a_stale_pooled_connection_is_replayed_on_a_fresh_one() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            hop.script.drop_once_on = "MAIL"  # the start-up probe's pooled connection dies under us
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            client.send(
                "MAIL FROM:<a@example.org> ENVID=e1\r\n"
                "RCPT TO:<bob@example.com>\r\nRCPT TO:<carol@example.com>\r\nDATA"
            )
            assert [(await client.reply())[0] for _ in range(4)] == [250, 250, 250, 354]
            assert await client.cmd("hello\r\n.") == (250, "2.0.0 Ok: queued as FAKE")
            await client.close()
            assert hop.connections == 2
            (message,) = hop.messages
            assert message.mail == b"MAIL FROM:<a@example.org> ENVID=e1"
            assert message.rcpts == [b"RCPT TO:<bob@example.com>", b"RCPT TO:<carol@example.com>"]

    run(body())


def test_a_fresh_connection_that_breaks_is_not_retried() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop:
            cfg = gateway_config(hop.port, limits={"next_hop_pool_size": 0})
            async with running_gateway(cfg) as gw:
                hop.script.drop_once_on = "MAIL"
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                await client.cmd("MAIL FROM:<a@example.org>")
                assert await client.cmd("RCPT TO:<bob@example.com>") == (
                    451,
                    "4.4.2 " + replies.NEXT_HOP_BROKEN.text,
                )
                await client.close()
            assert hop.messages == []

    run(body())


def test_a_bare_postmaster_is_accepted_as_rfc_5321_requires() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            await client.cmd("MAIL FROM:<>")
            assert (await client.cmd("RCPT TO:<Postmaster>"))[0] == 250
            assert (await send_message(client))[0] == 250
            await client.close()
            assert hop.messages[0].rcpts == [b"RCPT TO:<Postmaster>"]

    run(body())


def test_a_client_gone_mid_data_leaves_nothing_delivered() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            await client.open_data("a@example.org", "bob@example.com")
            client.send(b"Subject: cut\r\n\r\n" + b"x" * 100_000 + b"\r\n")
            await client.writer.drain()
            client.writer.write_eof()  # the client is gone before its final dot
            assert await client.rest() == b""
            await client.close()
            await asyncio.sleep(0.1)
            assert hop.messages == []
            assert hop.commands.count("DATA") == 1

    run(body())


@given(st.text(max_size=40))
def test_xtext_fast_path_encodes_as_the_full_rule(value: str) -> None:
    # _xtext skips the per-character walk when nothing needs encoding; the answer must not change.
    def by_rule(text: str) -> str:
        return "".join(
            chr(b) if 33 <= b <= 126 and b not in (0x2B, 0x3D) else f"+{b:02X}"
            for b in text.encode("utf-8", "surrogateescape")
        )

    assert _xtext(value) == by_rule(value)
    assert _xtext("192.0.2.1") == "192.0.2.1"
    assert _xtext("a b=c+") == "a+20b+3Dc+2B"


def test_the_trust_verdict_per_client_address_is_kept_and_bounded() -> None:
    rules = OutboundRules(holder=None, trusted=[ipaddress.ip_network("192.0.2.0/24")])  # type: ignore[arg-type]
    assert rules._trusted("192.0.2.7") and rules._trusted("::ffff:192.0.2.8")
    assert not rules._trusted("198.51.100.1") and not rules._trusted("not an address")
    for n in range(5000):
        rules._trusted(f"10.0.{n // 256}.{n % 256}")
    assert len(rules._trusted_ips) <= 4096
    assert rules._trusted("192.0.2.7") and not rules._trusted("198.51.100.1")


def test_a_next_hop_that_judges_the_message_before_the_final_dot_gets_a_451_not_its_250() -> None:
    async def body() -> None:
        script = Script(data_reply="354 go ahead\r\n250 2.0.0 Ok: queued as EARLY")
        async with FakeNextHop(script) as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            client.send(f"MAIL FROM:<>\r\nRCPT TO:<{tag('bob@example.com')}>\r\nDATA")
            assert [(await client.reply())[0] for _ in range(2)] == [250, 250]
            assert await client.reply() == (451, "4.5.0 " + replies.NEXT_HOP_PROTOCOL.text)
            # The session goes on; the next transaction gets its own connection.
            assert (await client.cmd("RSET"))[0] == 250
            await client.close()
            assert hop.messages == []

    run(body())


@pytest.mark.parametrize("goodbye", [None, "421 4.3.2 Service shutting down"])
def test_the_first_transaction_after_a_next_hop_restart_succeeds(goodbye: str | None) -> None:
    async def body() -> None:
        hop = FakeNextHop()
        port = await hop.start()
        try:
            async with running_gateway(gateway_config(port)) as gw:
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                for number in (1, 2):
                    assert (await client.cmd("MAIL FROM:<>"))[0] == 250
                    assert (await client.cmd(f"RCPT TO:<{tag('bob@example.com')}>"))[0] == 250
                    assert (await send_message(client))[0] == 250
                    if number == 1:
                        # Stopped (idle connections reset, or told goodbye), then up again on its port.
                        await hop.close(goodbye)
                        hop = FakeNextHop()
                        await hop.start(port)
                await client.close()
                assert len(hop.messages) == 1
        finally:
            await hop.close()

    run(body())


def logged(stream: io.StringIO) -> list[dict[str, Any]]:
    """The JSON lines the gateway logged (held lines flushed: the loop that would have is gone)."""
    for handler in logging.getLogger("gateway").handlers:
        handler.flush()
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_message_is_logged_with_the_next_hops_reply_to_the_final_dot(log_stream: io.StringIO) -> None:
    logs.setup(logs.LogFormat.JSON, stream=log_stream)

    async def body() -> None:
        script = Script(final_reply='250 2.0.0 Ok: queued as 4XyZ12 "q" id=7')
        async with (
            FakeNextHop(script) as hop,
            running_gateway(gateway_config(hop.port), observers=[logs.DecisionLog()]) as gw,
        ):
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            await client.cmd("MAIL FROM:<alice@example.org>")
            assert (await client.cmd("RCPT TO:<bob@example.com>"))[0] == 250
            assert (await client.cmd("RCPT TO:<carol@example.com>"))[0] == 250
            assert await send_message(client) == (250, '2.0.0 Ok: queued as 4XyZ12 "q" id=7')
            await client.close()

    run(body())
    lines = [line for line in logged(log_stream) if line.get("logger") == "gateway.decision"]
    decisions = [line for line in lines if line["event"] == "decision"]
    (message,) = [line for line in lines if line["event"] == "transaction"]
    assert {line["session"] for line in decisions} == {message["session"]}
    assert message["next_hop"] == '250 2.0.0 Ok: queued as 4XyZ12 "q" id=7'
    assert (message["verdict"], message["rcpts"], message["sender"]) == ("relay", 2, "alice@example.org")
    assert "reply" not in message


def test_what_the_next_hop_tempfails_is_logged_as_tempfail(log_stream: io.StringIO) -> None:
    logs.setup(logs.LogFormat.JSON, stream=log_stream)

    async def body() -> None:
        script = Script(rcpt_replies={"busy@example.com": "450 4.2.1 Mailbox busy"})
        async with (
            FakeNextHop(script) as hop,
            running_gateway(gateway_config(hop.port), observers=[logs.DecisionLog()]) as gw,
        ):
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            for final in ("451 4.3.0 Error: queue file write error", "421 4.3.2 Shutting down"):
                hop.script.final_reply = final
                await client.cmd("MAIL FROM:<alice@example.org>")
                assert (await client.cmd("RCPT TO:<bob@example.com>"))[0] == 250
                assert (await client.cmd("RCPT TO:<busy@example.com>"))[0] == 450
                assert (await send_message(client))[0] == 451
            hop.script.drop_after_bytes = 1
            await client.cmd("MAIL FROM:<alice@example.org>")
            assert (await client.cmd("RCPT TO:<bob@example.com>"))[0] == 250
            assert await send_message(client) == (451, "4.4.2 " + replies.NEXT_HOP_BROKEN.text)
            await client.close()

    run(body())
    lines = [line for line in logged(log_stream) if line.get("logger") == "gateway.decision"]
    busy = [line for line in lines if line.get("rcpt") == "busy@example.com"]
    assert [(line["verdict"], line["next_hop"]) for line in busy] == [
        ("tempfail", "450 4.2.1 Mailbox busy")
    ] * 2
    messages = [line for line in lines if line["event"] == "transaction"]
    assert [(m["verdict"], m["next_hop"], m.get("reply")) for m in messages] == [
        ("tempfail", "451 4.3.0 Error: queue file write error", None),
        # A 421 is the next hop closing ITS connection: our client hears 451; the line keeps both.
        ("tempfail", "421 4.3.2 Shutting down", "451 4.3.2 Shutting down"),
        ("tempfail", str(replies.NEXT_HOP_BROKEN), None),
    ]


def test_a_connection_whose_next_hop_tempfailed_the_message_is_not_used_again() -> None:
    async def body() -> None:
        # Connection 1 (the start-up probe's, then the first message's) reaches a next-hop process that
        # cannot queue anything; the next message must not be sent to it again.
        script = Script(final_replies={1: "451 4.3.0 Error: queue file write error"})
        async with FakeNextHop(script) as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            for expected in (451, 250):
                assert (await client.cmd("MAIL FROM:<alice@example.org>"))[0] == 250
                assert (await client.cmd("RCPT TO:<bob@example.com>"))[0] == 250
                assert (await send_message(client))[0] == expected
            await client.close()
            assert hop.connections == 2

    run(body())


def test_a_connection_whose_next_hop_tempfailed_the_sender_is_not_used_again() -> None:
    async def body() -> None:
        script = Script(mail_replies={1: "451 4.3.0 Error: queue file write error"})
        async with FakeNextHop(script) as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            for expected in (451, 250):
                assert (await client.cmd("MAIL FROM:<alice@example.org>"))[0] == 250
                assert (await client.cmd("RCPT TO:<bob@example.com>"))[0] == expected
                assert (await client.cmd("RSET"))[0] == 250
            await client.close()
            assert hop.connections == 2

    run(body())


# ------------------------------------------------------------------------------------------------ the ledger

LEDGER_SECRET = b"ledger-secret-for-tests-0123456789"
SENT_ID = "<sent-1@mta.example.com>"


def ledger_keyring() -> Keyring:
    return Keyring((Key(1, SECRET),), ledger_secret=LEDGER_SECRET)


def ledger_config(hop_port: int, folder: Any, max_replies: int = 20, **kwargs: Any) -> Any:
    from dataclasses import replace

    from gateway.ops.config import LedgerConfig

    cfg = gateway_config(hop_port, **kwargs)
    return replace(cfg, ledger=LedgerConfig(max_replies=max_replies, path=folder / "ledger.sqlite"))


async def ledger_record(gw: Any, message_id: str, *addresses: str) -> None:
    """What the outbound role records for a message with this Message-ID sent from `addresses`."""
    from gateway.policy import ledger
    from gateway.policy.messageids import HeaderStatus, SentHeaders

    headers = SentHeaders(HeaderStatus.OK, message_id, tuple(addresses), (), ())
    recording = ledger.make_record(ledger.LedgerKeys(LEDGER_SECRET), headers, None, int(time.time()))
    assert recording.key is not None and recording.record is not None
    await gw.ledger.store.record(recording.key, recording.record, recording.ttl)


def answer_to(message_id: str) -> bytes:
    """An RFC 3834 auto-reply to `message_id`."""
    return (
        f"From: friend@remote.test\r\nSubject: Auto: hi\r\nAuto-Submitted: auto-replied\r\n"
        f"In-Reply-To: {message_id}\r\n\r\nAway.\r\n"
    ).encode()


async def bounce(port: int, rcpts: list[str], message: bytes | None) -> list[tuple[int, str]]:
    """MAIL FROM:<>, the RCPTs, and (when `message`) DATA: every reply after MAIL's."""
    client = await RawClient.connect(port)
    await client.ehlo()
    assert (await client.cmd("MAIL FROM:<>"))[0] == 250
    got = [await client.cmd(f"RCPT TO:<{rcpt}>") for rcpt in rcpts]
    if message is not None:
        got.append(await send_message(client, message))
    await client.cmd("QUIT")
    await client.close()
    return got


def test_ledger_a_bounce_to_an_untagged_address_passes_when_it_answers_a_message_sent_from_it(
    tmp_path: Any,
) -> None:
    async def body() -> None:
        events: list[DecisionEvent] = []
        async with (
            FakeNextHop() as hop,
            running_gateway(
                ledger_config(hop.port, tmp_path), ledger_keyring(), observers=[events.append]
            ) as gw,
        ):
            await ledger_record(gw, SENT_ID, "bob@example.com")
            got = await bounce(gateway_port(gw), ["bob@example.com"], answer_to(SENT_ID))
            assert got == [(250, "2.1.5 Ok"), (250, "2.0.0 Ok: queued as FAKE")]
            (message,) = hop.messages
            assert message.rcpts == [b"RCPT TO:<bob@example.com>"]
            assert [(e.action, e.reason.value) for e in events] == [
                (Action.DEFER, "ledger"),
                (Action.RELAY, "vouched"),
            ]

    run(body())


@pytest.mark.parametrize(
    ("message", "reply", "reason"),
    [
        (b"Subject: no reference\r\n\r\nx\r\n", "550 5.7.1 <bob@example.com>: bounce to an address we never "
         "signed (it refers to no message we sent)", "no-reference"),
        (answer_to("<other@mta.example.com>"), "550 5.7.1 <bob@example.com>: bounce to an address we never "
         "signed (it refers to no message we sent in the last 30 days)", "unknown-message-id"),
        (answer_to("<to-carol@mta.example.com>"), "550 5.7.1 <bob@example.com>: bounce to an address we "
         "never signed (the message it refers to was not from this address)", "recipient-not-recorded"),
        (b"Subject: big\r\n\r\n" + (b"z" * 900 + b"\r\n") * 330,
         "552 5.3.4 <bob@example.com>: a null-sender message to an address we never signed must show what "
         "it answers within its first 256 KiB", "too-big"),
    ],
)  # fmt: skip
def test_ledger_a_refused_bounce_never_gets_its_final_dot_to_the_next_hop(
    tmp_path: Any, message: bytes, reply: str, reason: str
) -> None:

    async def body() -> None:
        events: list[DecisionEvent] = []
        async with (
            FakeNextHop() as hop,
            running_gateway(
                ledger_config(hop.port, tmp_path), ledger_keyring(), observers=[events.append]
            ) as gw,
        ):
            await ledger_record(gw, "<to-carol@mta.example.com>", "carol@example.com")
            got = await bounce(gateway_port(gw), ["bob@example.com"], message)
            assert [f"{code} {text}" for code, text in got] == ["250 2.1.5 Ok", reply]
            # The next hop got the RCPT and DATA, then the connection dropped before the final dot.
            assert "DATA" in hop.commands
            assert hop.messages == []
            assert [e.reason.value for e in events][-1] == reason

    run(body())


def test_ledger_the_replay_cap_refuses_the_answer_past_max_replies(tmp_path: Any) -> None:
    async def body() -> None:
        async with (
            FakeNextHop() as hop,
            running_gateway(ledger_config(hop.port, tmp_path, max_replies=2), ledger_keyring()) as gw,
        ):
            await ledger_record(gw, SENT_ID, "bob@example.com")
            codes = [
                (await bounce(gateway_port(gw), ["bob@example.com"], answer_to(SENT_ID)))[-1]
                for _ in range(3)
            ]
            assert [code for code, _ in codes] == [250, 250, 550]
            assert "has been answered 2 times already" in codes[2][1]
            assert len(hop.messages) == 2

    run(body())


def test_ledger_deferred_and_rcpt_decided_recipients_never_share_a_transaction(tmp_path: Any) -> None:
    async def body() -> None:
        async with (
            FakeNextHop() as hop,
            running_gateway(ledger_config(hop.port, tmp_path), ledger_keyring()) as gw,
        ):
            await ledger_record(gw, SENT_ID, "bob@example.com")
            separate = (452, "4.5.3 Send this recipient in a separate transaction")
            got = await bounce(
                gateway_port(gw), ["bob@example.com", tag("carol@example.com")], answer_to(SENT_ID)
            )
            assert got == [(250, "2.1.5 Ok"), separate, (250, "2.0.0 Ok: queued as FAKE")]
            got = await bounce(
                gateway_port(gw), ["postmaster@example.com", "bob@example.com"], answer_to(SENT_ID)
            )
            assert got == [(250, "2.1.5 Ok"), separate, (250, "2.0.0 Ok: queued as FAKE")]
            assert [m.rcpts for m in hop.messages] == [
                [b"RCPT TO:<bob@example.com>"],
                [b"RCPT TO:<postmaster@example.com>"],
            ]

    run(body())


def test_ledger_a_callout_gets_250_at_rcpt(tmp_path: Any) -> None:
    async def body() -> None:
        async with (
            FakeNextHop() as hop,
            running_gateway(ledger_config(hop.port, tmp_path), ledger_keyring()) as gw,
        ):
            assert await bounce(gateway_port(gw), ["bob@example.com"], None) == [(250, "2.1.5 Ok")]
            assert hop.messages == []

    run(body())


def test_ledger_a_store_outage_is_451_for_deferred_decisions_and_changes_nothing_else(tmp_path: Any) -> None:
    async def body() -> None:
        async with (
            FakeNextHop() as hop,
            running_gateway(ledger_config(hop.port, tmp_path), ledger_keyring()) as gw,
        ):
            await ledger_record(gw, SENT_ID, "bob@example.com")
            for name in ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm"):
                (tmp_path / name).unlink(missing_ok=True)
            port = gateway_port(gw)
            got = await bounce(port, ["bob@example.com"], answer_to(SENT_ID))
            assert got[-1] == (451, "4.3.0 <bob@example.com>: message ledger unavailable, try again later")
            # What needs no store is decided as before: no reference is a 550, a tag passes at RCPT.
            assert (await bounce(port, ["bob@example.com"], b"Subject: x\r\n\r\nx\r\n"))[-1][0] == 550
            assert (await bounce(port, [tag("bob@example.com")], b"Subject: x\r\n\r\nx\r\n"))[-1][0] == 250
            assert (await bounce(port, [forged("bob@example.com")], None))[0][0] == 550
            assert [m.rcpts for m in hop.messages] == [[b"RCPT TO:<bob@example.com>"]]

    run(body())


def test_ledger_observe_mode_passes_and_counts_what_it_would_refuse(tmp_path: Any) -> None:
    async def body() -> None:
        events: list[DecisionEvent] = []
        async with (
            FakeNextHop() as hop,
            running_gateway(
                ledger_config(hop.port, tmp_path, observe=True), ledger_keyring(), observers=[events.append]
            ) as gw,
        ):
            got = await bounce(gateway_port(gw), ["bob@example.com"], answer_to(SENT_ID))
            assert got[-1] == (250, "2.0.0 Ok: queued as FAKE")
            assert len(hop.messages) == 1
            last = events[-1]
            assert (last.action, last.reason.value) == (Action.RELAY, "unknown-message-id")
            assert last.would_reject is not None and last.would_reject.code == 550

    run(body())


def test_ledger_without_a_secret_in_the_keyring_refuses_at_rcpt_as_before(tmp_path: Any) -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(ledger_config(hop.port, tmp_path)) as gw:
            ((code, text),) = await bounce(gateway_port(gw), ["bob@example.com"], None)
            assert code == 550 and "(unsigned)" in text
            assert not (tmp_path / "ledger.sqlite").exists()

    run(body())


def test_ledger_the_outbound_role_records_what_the_next_hop_took(tmp_path: Any) -> None:
    from gateway.ops.metrics import Metrics
    from gateway.policy import ledger

    async def body() -> None:
        metrics = Metrics()
        async with (
            FakeNextHop() as hop,
            running_gateway(
                ledger_config(hop.port, tmp_path, listener={"role": "outbound"}), ledger_keyring()
            ) as gw,
        ):
            gw.listeners[0].relay.watch = metrics
            port = gateway_port(gw)
            sent = (
                f"From: Bob <bob@example.com>\r\nReply-To: desk@example.com\r\nMessage-ID: {SENT_ID}\r\n"
                "\r\nhi\r\n"
            )
            for message in (sent.encode(), b"Subject: no id\r\n\r\nhi\r\n"):
                client = await RawClient.connect(port)
                await client.ehlo()
                await client.cmd("MAIL FROM:<bob@example.com>")
                await client.cmd("RCPT TO:<friend@remote.test>")
                assert (await send_message(client, message))[0] == 250
                await client.close()
            await gw.listeners[0].relay.records_written()  # the client's 250 does not wait for them
            keys = ledger.LedgerKeys(LEDGER_SECRET)
            (entry,) = (await gw.ledger.store.lookup([keys.message_key(SENT_ID)])).values()
            assert entry.record.addresses == {
                keys.address_key("bob@example.com"),
                keys.address_key("desk@example.com"),
            }
            # The store gone: the message is relayed all the same, the lost record counted.
            (tmp_path / "ledger.sqlite").unlink()
            client = await RawClient.connect(port)
            await client.ehlo()
            await client.cmd("MAIL FROM:<bob@example.com>")
            await client.cmd("RCPT TO:<friend@remote.test>")
            assert (await send_message(client, sent.encode()))[0] == 250
            await client.close()
            await gw.listeners[0].relay.records_written()
            assert len(hop.messages) == 3
        text = metrics.exposition().decode()
        for outcome in ("recorded", "no-message-id", "store-unavailable"):
            assert f'batv_ledger_records_total{{outcome="{outcome}"}} 1.0' in text

    run(body())
