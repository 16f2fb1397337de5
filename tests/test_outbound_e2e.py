"""The outbound role end to end, over real sockets on 127.0.0.1: what the next hop really receives.

Each test runs the real gateway (gateway.ops.serve.Gateway from a config the strict loader built) in front of
a recording next hop (tests/smtp_peers.FakeNextHop), and talks SMTP to it line by line. The tags the next hop
sees are checked against oracles that share no code with the gateway: Exim's prvscheck rules
(tests/test_interop_live.exim_prvscheck) and the SRS hash formula of tests/vectors/README.md, written out
here with hmac and base64.

Shown:
- a sender in a signed domain is rewritten to prvs; the recipients, their parameters and the content arrive
  untouched; each transaction of a session is rewritten on its own;
- a foreign sender gets SRS0 in the alias domain; an SRS0 sender gets SRS1, an SRS1 sender keeps its first
  hop and gets a new hash;
- not rewritten: the null sender, a tagged sender, exempt senders, exempt recipients, and mail whose
  recipients are all local when skip_local_recipients is set (but signed when it is not);
- a client outside the trusted networks is refused with 554 5.7.1, while the inbound listener of the same
  process goes on taking bounces from it;
- both roles in one process: what went out signed (prvs or SRS) comes back in and is accepted, the tag
  stripped; the bare address is refused with 550;
- the quick-start flags of `batv-gateway serve` (--role outbound, --srs-alias, --trusted) in a subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from gateway.core import prvs, srs
from gateway.ops import config, keystore
from tests.smtp_peers import (
    SECRET,
    FakeNextHop,
    RawClient,
    Received,
    free_port,
    gateway_port,
    make_keyring,
    run,
    running_gateway,
)
from tests.test_interop_live import exim_prvscheck

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")
ALIAS = "fwd.example.com"
BODY = (
    b"From: <alice@example.com>\r\nTo: <friend@elsewhere.test>\r\nSubject: hi\r\n\r\n"
    b"..dot-stuffed line\r\nhello\r\n"
)


def outbound_config(
    hop_port: int, *, policy: dict[str, Any] | None = None, inbound_port: int | None = None, **listener: Any
) -> config.Config:
    """An outbound listener (and an inbound one, when inbound_port is given), built by the strict loader."""
    listeners: list[dict[str, Any]] = [
        {"name": "relay", "role": "outbound", "listen": "127.0.0.1:0", "next_hop": f"127.0.0.1:{hop_port}"}
        | listener
    ]
    if inbound_port is not None:
        listeners.append(
            {
                "name": "mx",
                "role": "inbound",
                "listen": "127.0.0.1:0",
                "next_hop": f"127.0.0.1:{inbound_port}",
            }
        )
    data: dict[str, Any] = {
        "gateway": {
            "hostname": "gw.test",
            "keyring": "unused.toml",
            "local_domains": ["example.com", "example.org"],
        },
        "srs": {"alias": ALIAS},
        "limits": {"shutdown_deadline": 5},
        "listener": listeners,
    }
    if policy:
        data["policy"] = policy
    return config.parse(data, "<test>")


def today() -> int:
    return int(time.time()) // 86400


def on_one_day(body: Callable[[], Coroutine[Any, Any, T]]) -> tuple[int, T]:
    """run(body()) and the UTC day it ran on: run again if midnight fell in between (the tags carry it)."""
    for _ in range(2):
        day = today()
        result = run(body())
        if today() == day:
            return day, result
    raise AssertionError("the UTC day changed twice during one test")


def sender_of(received: Received) -> str:
    return received.mail.split(b"<", 1)[1].split(b">", 1)[0].decode()


async def transaction(
    client: RawClient, sender: str, rcpts: list[str], body: bytes = BODY, mail_params: str = ""
) -> list[tuple[int, str]]:
    """MAIL, each RCPT, and DATA when one was accepted; every reply, in order."""
    replies = [await client.cmd(f"MAIL FROM:<{sender}>{mail_params}")]
    for rcpt in rcpts:
        replies.append(await client.cmd(f"RCPT TO:{rcpt}" if rcpt.startswith("<") else f"RCPT TO:<{rcpt}>"))
    if any(code == 250 for code, _ in replies[1:]):
        code, text = await client.cmd("DATA")
        assert code == 354, (code, text)
        client.send(body + b".\r\n")
        await client.writer.drain()
        replies.append(await client.reply())
    else:
        replies.append(await client.cmd("RSET"))
    return replies


async def send_through(port: int, *transactions: tuple[str, list[str]]) -> list[list[tuple[int, str]]]:
    client = await RawClient.connect(port)
    try:
        await client.ehlo("mail.example.com")
        return [await transaction(client, sender, rcpts) for sender, rcpts in transactions]
    finally:
        await client.close()


async def relay_outbound(
    *transactions: tuple[str, list[str]], policy: dict[str, Any] | None = None
) -> tuple[list[Received], list[list[tuple[int, str]]]]:
    """The transactions, in one session, through a fresh outbound gateway: what the next hop got, and
    every reply the client heard."""
    async with FakeNextHop() as hop:
        async with running_gateway(outbound_config(hop.port, policy=policy)) as gw:
            results = await send_through(gateway_port(gw), *transactions)
        return hop.messages, results


def srs_hash(*fields: str, secret: bytes = SECRET) -> str:
    """tests/vectors/README.md: base64 of HMAC-SHA1 over the ASCII-lowercased fields, 4 characters."""
    mac = hmac.new(secret, b"".join(f.lower().encode() for f in fields), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()[:4]


def srs_stamp(day: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    return alphabet[(day >> 5) & 31] + alphabet[day & 31]


# ----------------------------------------------------------------------------------------------- rewriting


def test_a_signed_domain_sender_is_rewritten_to_prvs_and_nothing_else_changes() -> None:
    async def body() -> list[Received]:
        async with FakeNextHop() as hop:
            async with running_gateway(outbound_config(hop.port)) as gw:
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                for sender in ("alice@example.com", "Bob.Smith@EXAMPLE.org"):
                    replies = await transaction(
                        client,
                        sender,
                        [
                            "<friend@elsewhere.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;friend@elsewhere.test",
                            "<other@elsewhere.test>",
                        ],
                        mail_params=" BODY=8BITMIME ENVID=q1",
                    )
                    assert [code for code, _ in replies] == [250, 250, 250, 250], replies
                await client.close()
            return hop.messages

    day, (first, second) = on_one_day(body)
    for got, sender in ((first, "alice@example.com"), (second, "Bob.Smith@EXAMPLE.org")):
        tag = sender_of(got)
        assert re.fullmatch(rf"prvs=1{(day + 7) % 1000:03d}[0-9a-f]{{6}}={re.escape(sender)}", tag), tag
        assert got.mail == f"MAIL FROM:<{tag}> BODY=8BITMIME ENVID=q1".encode()
        # Exim would accept this tag (an oracle independent of gateway/core/prvs.py), and so do we.
        assert exim_prvscheck(tag, lambda _key: SECRET, day) == "valid"
        checked = prvs.verify(tag, make_keyring(), day)
        assert (checked.verdict, checked.address) == (prvs.PrvsVerdict.VALID, sender)
        # The recipients, their DSN parameters and the content: exactly what the client sent.
        assert got.rcpts == [
            b"RCPT TO:<friend@elsewhere.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;friend@elsewhere.test",
            b"RCPT TO:<other@elsewhere.test>",
        ]
        assert got.data == BODY


def test_a_foreign_sender_gets_srs0_and_an_srs_sender_gets_srs1() -> None:
    senders = [
        "carol@example.net",
        "SRS0=AbCd=IL=orig.example=dave@forwarder.example",
        "SRS1=WxYz=orig.example==AbCd=IL=example.org=erin@hop2.example",
    ]

    async def body() -> list[Received]:
        messages, results = await relay_outbound(*((s, ["friend@elsewhere.test"]) for s in senders))
        assert all(r[-1][0] == 250 for r in results), results
        return messages

    day, messages = on_one_day(body)
    srs0, wrapped, rewrapped = (sender_of(m) for m in messages)
    stamp = srs_stamp(day)
    assert srs0 == f"SRS0={srs_hash(stamp, 'example.net', 'carol')}={stamp}=example.net=carol@{ALIAS}"
    # Guarded SRS: SRS1=HASH=first-hop==rest (the SRS0 separator kept), hashed over first-hop and rest.
    rest = "=AbCd=IL=orig.example=dave"
    assert wrapped == f"SRS1={srs_hash('forwarder.example', rest)}=forwarder.example={rest}@{ALIAS}"
    rest = "=AbCd=IL=example.org=erin"
    assert rewrapped == f"SRS1={srs_hash('orig.example', rest)}=orig.example={rest}@{ALIAS}"
    reversed_ = srs.reverse(srs0, make_keyring().srs_secrets(), day)
    assert reversed_.address == "carol@example.net"


def test_the_null_sender_and_tagged_senders_are_left_alone() -> None:
    day = today()
    tagged = prvs.sign("alice@example.com", make_keyring(), day)
    ours = srs.forward("carol@example.net", ALIAS, make_keyring().srs_secrets(), day)
    senders = ["", tagged, ours]

    async def body() -> list[Received]:
        messages, results = await relay_outbound(*((s, ["friend@elsewhere.test"]) for s in senders))
        assert all(r[-1][0] == 250 for r in results), results
        return messages

    assert [m.mail for m in run(body())] == [f"MAIL FROM:<{s}>".encode() for s in senders]


def test_exempt_senders_are_not_rewritten() -> None:
    policy = {"exempt_senders": ["lists.example.com", "noreply@example.com"]}

    messages, _ = run(
        relay_outbound(
            ("announce@lists.example.com", ["friend@elsewhere.test"]),
            ("NoReply@Example.com", ["friend@elsewhere.test"]),
            ("alice@example.com", ["friend@elsewhere.test"]),  # the control: not exempt
            policy=policy,
        )
    )
    exempt_domain, exempt_address, control = (sender_of(m) for m in messages)
    assert (exempt_domain, exempt_address) == ("announce@lists.example.com", "NoReply@Example.com")
    assert control.startswith("prvs=") and control.endswith("=alice@example.com")


def test_exempt_recipients_leave_their_transaction_unrewritten() -> None:
    """A mailing list that matches subscribers by envelope sender gets the bare address; the next
    transaction of the same session is signed again, and a transaction is never half rewritten."""
    policy = {"exempt_recipients": ["list.example.net", "ml@lists.example.org"]}

    messages, results = run(
        relay_outbound(
            ("alice@example.com", ["members@list.example.net"]),
            ("alice@example.com", ["ML@lists.example.org"]),
            ("alice@example.com", ["friend@elsewhere.test", "members@list.example.net"]),
            policy=policy,
        )
    )
    assert [sender_of(m) for m in messages[:2]] == ["alice@example.com", "alice@example.com"]
    assert sender_of(messages[2]).startswith("prvs=")
    assert messages[2].rcpts == [b"RCPT TO:<friend@elsewhere.test>"]
    assert results[2][2][0] == 452 and results[2][2][1].startswith("4.5.3")


def test_all_local_recipients_are_not_rewritten_when_configured() -> None:
    async def body(skip: bool) -> list[Received]:
        messages, _ = await relay_outbound(
            ("alice@example.com", ["bob@example.org", "carol@example.com"]),
            ("alice@example.com", ["friend@elsewhere.test"]),
            policy={"skip_local_recipients": skip},
        )
        return messages

    local, remote = run(body(skip=True))
    assert sender_of(local) == "alice@example.com"
    assert local.rcpts == [b"RCPT TO:<bob@example.org>", b"RCPT TO:<carol@example.com>"]
    assert sender_of(remote).startswith("prvs=")
    # Without the setting, mail to our own domains is signed like any other.
    local, remote = run(body(skip=False))
    assert sender_of(local).startswith("prvs=") and sender_of(remote).startswith("prvs=")


# ------------------------------------------------------------------------------------------------- trust


def test_untrusted_clients_are_refused_and_the_inbound_listener_still_takes_bounces() -> None:
    async def body() -> None:
        async with FakeNextHop() as out_hop, FakeNextHop() as in_hop:
            cfg = outbound_config(out_hop.port, trusted=["192.0.2.0/24", "::1/128"], inbound_port=in_hop.port)
            async with running_gateway(cfg) as gw:
                client = await RawClient.connect(gateway_port(gw, 0))
                await client.ehlo()
                code, text = await client.cmd("MAIL FROM:<alice@example.com>")
                assert code == 554 and text.startswith("5.7.1") and "127.0.0.1" in text, (code, text)
                code, text = await client.cmd("RCPT TO:<friend@elsewhere.test>")
                assert code >= 500, (code, text)  # never a 250: no transaction was opened
                code, text = await client.cmd("MAIL FROM:<>")
                assert code == 554 and text.startswith("5.7.1"), (code, text)
                await client.close()
                # Trust is the outbound listener's: the MX listener of the same process takes bounces.
                tag = prvs.sign("alice@example.com", make_keyring(), today())
                (result,) = await send_through(gateway_port(gw, 1), ("", [tag]))
                assert [code for code, _ in result] == [250, 250, 250], result
            assert b"MAIL" not in b" ".join(out_hop.lines)
            assert out_hop.messages == []
            assert [m.rcpts for m in in_hop.messages] == [[b"RCPT TO:<alice@example.com>"]]

    run(body())


# ---------------------------------------------------------------------------------------- both roles


def test_what_goes_out_signed_comes_back_in_and_the_bare_address_is_refused() -> None:
    async def body() -> None:
        async with FakeNextHop() as internet, FakeNextHop() as mailbox:
            cfg = outbound_config(internet.port, inbound_port=mailbox.port)
            async with running_gateway(cfg) as gw:
                out_port, in_port = gateway_port(gw, 0), gateway_port(gw, 1)
                await send_through(
                    out_port,
                    ("alice@example.com", ["friend@elsewhere.test"]),
                    ("carol@example.net", ["friend@elsewhere.test"]),  # forwarded mail: SRS
                )
                signed, forwarded = (sender_of(m) for m in internet.messages)
                # The genuine bounces (null sender) to both return paths come back in and are accepted.
                results = await send_through(in_port, ("", [signed]), ("", [forwarded]))
                assert all([code for code, _ in r] == [250, 250, 250] for r in results), results
                # Backscatter to the bare address is refused at RCPT.
                (refused,) = await send_through(in_port, ("", ["alice@example.com"]))
                code, text = refused[1]
                assert code == 550 and text.startswith("5.7.1 <alice@example.com>"), refused
            assert [m.rcpts for m in mailbox.messages] == [
                [b"RCPT TO:<alice@example.com>"],
                [b"RCPT TO:<carol@example.net>"],
            ]
            assert all(m.mail == b"MAIL FROM:<>" for m in mailbox.messages)

    run(body())


# ------------------------------------------------------------------------------------------- the CLI


def test_serve_flags_run_an_outbound_listener(tmp_path: Path) -> None:
    """`batv-gateway serve --role outbound --srs-alias ... --trusted ...` as a subprocess."""
    keyring_path = tmp_path / "keyring.toml"
    keystore.save(keyring_path, keystore.new_keyring(datetime.now(UTC)))
    keyring = keystore.load(keyring_path).keyring

    async def serve(hop: FakeNextHop, trusted: str) -> tuple[list[list[tuple[int, str]]], str]:
        for _attempt in range(3):
            port = free_port()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "serve", "--role", "outbound",
                "--listen", f"127.0.0.1:{port}", "--next-hop", f"127.0.0.1:{hop.port}",
                "--keyring", str(keyring_path), "--domain", "example.com", "--srs-alias", ALIAS,
                "--trusted", trusted, "--metrics", "off",  # the embedded default has 9425, maybe in use
                cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )  # fmt: skip
            try:
                if await _wait_for(port, proc):
                    results = await send_through(
                        port,
                        ("alice@example.com", ["friend@elsewhere.test"]),
                        ("carol@example.net", ["friend@elsewhere.test"]),
                    )
                    proc.send_signal(signal.SIGTERM)
                    assert await asyncio.wait_for(proc.wait(), 20) == 0
                    assert proc.stderr is not None
                    return results, (await proc.stderr.read()).decode()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        raise AssertionError("serve did not start listening")

    async def body() -> None:
        async with FakeNextHop() as hop:
            results, log = await serve(hop, "127.0.0.0/8")
            assert all(r[-1][0] == 250 for r in results), (results, log)
            signed, forwarded = (sender_of(m) for m in hop.messages)
            day = today()
            assert prvs.verify(signed, keyring, day).address == "alice@example.com"
            assert srs.reverse(forwarded, keyring.srs_secrets(), day).address == "carol@example.net"
            assert forwarded.endswith("@" + ALIAS)
        async with FakeNextHop() as hop:
            results, log = await serve(hop, "192.0.2.0/24")
            assert all(r[0][0] == 554 for r in results), (results, log)
            assert hop.messages == []

    run(body(), timeout=90)


async def _wait_for(port: int, proc: asyncio.subprocess.Process, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.returncode is None:
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return True
    return False
