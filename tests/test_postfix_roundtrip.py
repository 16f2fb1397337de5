"""A round trip through real Postfix: Postfix's own RFC 3464 DSN to a signed return path is accepted.

The cast, all on 127.0.0.1, all started and stopped by the test:
- a private Postfix instance (tests/postfix_instance.py) with two smtpd listeners. On its first port it is
  the internal MTA: mail for remote.test goes through the gateway's outbound listener (transport_maps).
  On its second port it is the remote side that accepts that mail, queues it and then fails to deliver it:
  `-o content_filter` sends whatever arrives there to a next hop that refuses the recipient;
- the gateway (gateway.ops.serve.Gateway), in-process, with an outbound listener whose next hop is Postfix's
  second port, and an inbound listener (the MX of example.com) whose next hop is the final sink;
- two recording next hops (tests/smtp_peers.FakeNextHop): "remote", which refuses bob@remote.test with 550,
  and "mailbox", the final sink behind the inbound listener.

Postfix's queue manager meets the 550, and its bounce daemon writes the DSN to the return path it was
given: the prvs address the outbound gateway wrote. transport_maps routes example.com to the inbound
listener, which verifies the tag, strips it and relays the DSN to the mailbox. A hand-made bounce to the
bare address is refused at RCPT. Every assertion is on what a hop really received (the sinks' recordings
and the replies on the wire); Postfix's log is only shown when something fails.

One Postfix instance plays both MTAs: the content_filter on its second port keeps the remote side's mail
from being routed to the gateway again, and a second instance would only cost another start.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.core import prvs
from gateway.ops import config
from tests.postfix_instance import PostfixInstance, free_port, private_root, zombie_children
from tests.smtp_peers import (
    FakeNextHop,
    RawClient,
    Received,
    Script,
    gateway_port,
    make_keyring,
    run,
    running_gateway,
)

REFUSAL = "550 5.1.1 <bob@remote.test>: Recipient address rejected: User unknown in virtual mailbox table"
SENDER = "alice@example.com"
RCPT = "bob@remote.test"
MESSAGE = (
    f"From: Alice <{SENDER}>\r\nTo: Bob <{RCPT}>\r\nSubject: round trip\r\nMessage-ID: <rt-1@example.com>\r\n"
    "\r\nThis message will bounce.\r\n"
)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    with private_root(keep_log_in=tmp_path) as path:
        yield path


def gateway_config(remote_port: int, mailbox_port: int) -> config.Config:
    return config.parse(
        {
            "gateway": {"hostname": "gw.test", "keyring": "unused.toml", "local_domains": ["example.com"]},
            "limits": {"shutdown_deadline": 5},
            "listener": [
                {
                    "name": "relay",
                    "role": "outbound",
                    "listen": "127.0.0.1:0",
                    "next_hop": f"127.0.0.1:{remote_port}",
                },
                {
                    "name": "mx",
                    "role": "inbound",
                    "listen": "127.0.0.1:0",
                    "next_hop": f"127.0.0.1:{mailbox_port}",
                },
            ],
        },
        "<test>",
    )


def postfix(root: Path, outbound: int, inbound: int, remote_side: int, refusing: int) -> PostfixInstance:
    pf = PostfixInstance(root / "postfix", hostname="mta.example.com")
    # Internal MTA: remote.test goes out through the outbound gateway; example.com's MX is the inbound
    # gateway, so the DSN for the signed return path is delivered through it.
    pf.main["transport_maps"] = (
        f"inline:{{ remote.test=smtp:[127.0.0.1]:{outbound}, example.com=smtp:[127.0.0.1]:{inbound} }}"
    )
    # The remote side: mail that arrives here (from the outbound gateway) is sent to the refusing next hop.
    pf.add_master(
        f"127.0.0.1:{remote_side} inet n - n - - smtpd -o content_filter=smtp:[127.0.0.1]:{refusing}"
    )
    return pf


def submit(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.com", timeout=30) as client:
        client.sendmail(SENDER, [RCPT], MESSAGE.encode())
        return client.noop()


def sender_of(line: bytes) -> str:
    return line.split(b"<", 1)[1].split(b">", 1)[0].decode()


async def wait_for(
    pf: PostfixInstance, hop: FakeNextHop, count: int, timeout: float = 60.0
) -> list[Received]:
    """Flush Postfix's queue and poll until the hop holds `count` messages (a bounded deadline)."""
    deadline = time.monotonic() + timeout
    while len(hop.messages) < count:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{len(hop.messages)} of {count} messages after {timeout}s:\n{pf.log_tail(40)}"
            )
        await asyncio.to_thread(pf.run, "/usr/sbin/postqueue", "-c", str(pf.config_dir), "-f", check=False)
        await asyncio.sleep(0.25)
    return hop.messages


def test_postfix_dsn_to_the_signed_return_path_comes_back_and_a_forged_bounce_is_refused(root: Path) -> None:
    async def body() -> dict[str, Any]:
        remote_script = Script(rcpt_replies={RCPT: REFUSAL})
        async with FakeNextHop(remote_script) as remote, FakeNextHop() as mailbox:
            remote_side = free_port()
            async with running_gateway(gateway_config(remote_side, mailbox.port)) as gw:
                outbound, inbound = gateway_port(gw, 0), gateway_port(gw, 1)
                pf = postfix(root, outbound, inbound, remote_side, remote.port)
                await asyncio.to_thread(pf.start)
                try:
                    await asyncio.to_thread(submit, pf.smtp_port)
                    (dsn,) = await wait_for(pf, mailbox, 1)
                    # The hand-made bounce to the bare address, straight to the MX (inbound) listener.
                    client = await RawClient.connect(inbound)
                    await client.ehlo("mx.elsewhere.test")
                    forged = [await client.cmd("MAIL FROM:<>"), await client.cmd(f"RCPT TO:<{SENDER}>")]
                    forged.append(await client.cmd("DATA"))
                    await client.close()
                    log = pf.log_text()
                finally:
                    await asyncio.to_thread(pf.stop)
            return {"remote": remote, "mailbox": mailbox, "dsn": dsn, "forged": forged, "log": log}

    got = run(body(), timeout=100)
    remote: FakeNextHop = got["remote"]
    mailbox: FakeNextHop = got["mailbox"]
    dsn: Received = got["dsn"]

    # 1. The refusing next hop saw the message with the signed return path (Postfix took it from the
    #    outbound gateway, queued it, and tried to deliver it there).
    mails = [line for line in remote.lines if line.upper().startswith(b"MAIL FROM:")]
    assert mails, remote.lines
    signed = sender_of(mails[0])
    today = int(time.time()) // 86400
    checked = prvs.verify(signed, make_keyring(), today)
    assert (checked.verdict, checked.address) == (prvs.PrvsVerdict.VALID, SENDER), signed
    assert any(line.startswith(f"RCPT TO:<{RCPT}>".encode()) for line in remote.lines)
    assert remote.messages == []  # refused at RCPT: no message was taken

    # 2. Postfix's own DSN arrived at the mailbox through the inbound gateway: null sender, the tag stripped.
    assert dsn.mail.startswith(b"MAIL FROM:<>")
    assert len(dsn.rcpts) == 1 and dsn.rcpts[0].startswith(f"RCPT TO:<{SENDER}>".encode()), dsn.rcpts
    text = dsn.data.decode("utf-8", "replace")
    assert re.search(r"^Content-Type: multipart/report; report-type=delivery-status;", text, re.M), text
    assert re.search(rf"^To: {re.escape(signed)}\r?$", text, re.M), "Postfix addressed the DSN to the tag"
    assert re.search(rf"^Final-Recipient: rfc822; ?{re.escape(RCPT)}\r?$", text, re.M)
    assert re.search(r"^Action: failed\r?$", text, re.M)
    assert re.search(r"^Status: 5\.1\.1\r?$", text, re.M)
    assert "User unknown in virtual mailbox table" in text  # the refusing hop's own words
    assert "Message-ID: <rt-1@example.com>" in text  # the returned headers of our message

    # 3. The hand-made bounce to the unsigned address was refused at RCPT, and nothing more arrived.
    (mail_code, _), (rcpt_code, rcpt_text), (data_code, _) = got["forged"]
    assert mail_code == 250
    assert rcpt_code == 550 and rcpt_text.startswith(
        f"5.7.1 <{SENDER}>: bounce to an address we never signed"
    )
    assert data_code >= 500
    assert len(mailbox.messages) == 1

    assert zombie_children() == []
