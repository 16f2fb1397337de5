"""The Message-ID ledger end to end: `batv-gateway serve` on the embedded default (no config), both roles.

The embedded default's listeners have fixed ports, so each role runs as its own `serve` with `--role`,
`--listen 127.0.0.1:0` and `--metrics off`, in one working folder: the first makes the development
keyring (with its ledger secret) in keys/, and both share keys/ledger.sqlite, as the two roles of one
host do. Their next hop is a fake that records what it gets (tests/smtp_peers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

from tests import generators
from tests.postfix_instance import private_root
from tests.smtp_peers import FakeNextHop, run
from tests.test_cli_serve import field, start_serve

SENT_ID = "<20261205.sent-1@mta.example.com>"
UNKNOWN_ID = "<never-sent@mta.example.com>"
QUEUED = b"2.0.0 Ok: queued as FAKE"  # the fake next hop's reply to the final dot
SENT = (
    "From: Alice <alice@example.com>\r\nReply-To: Alice's desk <desk@example.com>\r\n"
    "Disposition-Notification-To: receipts@example.com\r\nTo: friend@remote.test\r\n"
    f"Subject: hello\r\nMessage-ID: {SENT_ID}\r\n\r\nHello.\r\n"
)


def auto_reply(to: str, refers_to: str) -> str:
    """RFC 3834 §3.1.5 and §5: In-Reply-To and References name the message answered."""
    return (
        f"From: friend@remote.test\r\nTo: {to}\r\nSubject: Auto: hello\r\nAuto-Submitted: auto-replied\r\n"
        f"In-Reply-To: {refers_to}\r\nReferences: {refers_to}\r\n\r\nI am away.\r\n"
    )


def mdn(to: str, refers_to: str) -> str:
    """RFC 8098 §3: a multipart/report whose message/disposition-notification part has Original-Message-ID."""
    return (
        f"From: friend@remote.test\r\nTo: {to}\r\nSubject: Read: hello\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=disposition-notification; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain\r\n\r\nYour message was displayed.\r\n"
        "--b1\r\nContent-Type: message/disposition-notification\r\n\r\n"
        "Reporting-UA: remote.test; a reader\r\nFinal-Recipient: rfc822;friend@remote.test\r\n"
        f"Original-Message-ID: {refers_to}\r\n"
        "Disposition: manual-action/MDN-sent-manually; displayed\r\n\r\n--b1--\r\n"
    )


def dsn(to: str, refers_to: str) -> str:
    """RFC 3464 §2: a multipart/report with the returned headers (text/rfc822-headers), to the header From."""
    return (
        f"From: MAILER-DAEMON@remote.test\r\nTo: {to}\r\nSubject: Undelivered Mail\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b2"\r\n\r\n'
        "--b2\r\nContent-Type: text/plain\r\n\r\nIt could not be delivered.\r\n"
        "--b2\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; remote.test\r\n\r\n"
        "Final-Recipient: rfc822; friend@remote.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
        "--b2\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: Alice <alice@example.com>\r\nMessage-ID: {refers_to}\r\nSubject: hello\r\n\r\n--b2--\r\n"
    )


class Served:
    """One `batv-gateway serve --role ROLE` on the embedded default, stopped with SIGTERM."""

    def __init__(self, folder: Path, role: str, next_hop: int) -> None:
        self.proc = start_serve(
            folder, "--role", role, "--listen", "127.0.0.1:0", "--next-hop", f"127.0.0.1:{next_hop}",
            "--metrics", "off",
        )  # fmt: skip
        self.lines: list[str] = []
        deadline = time.monotonic() + 20
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            if "msg=ready" in line:
                break
        assert "msg=ready" in self.lines[-1], "".join(self.lines)
        self.port = int(field(self.lines[-1], "listeners").rsplit(":", 1)[1])

        self.output = ""

    def stop(self) -> None:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=40)
        self.output = "".join(self.lines) + err
        assert self.proc.returncode == 0, err


@contextlib.asynccontextmanager
async def both_roles(folder: Path) -> AsyncIterator[tuple[Served, Served, FakeNextHop]]:
    async with FakeNextHop() as hop:
        # The outbound one first: it makes the development keyring that the inbound one then reads.
        outbound = await asyncio.to_thread(Served, folder, "outbound", hop.port)
        try:
            inbound = await asyncio.to_thread(Served, folder, "inbound", hop.port)
            try:
                yield outbound, inbound, hop
            finally:
                await asyncio.to_thread(inbound.stop)
        finally:
            await asyncio.to_thread(outbound.stop)


async def ledgered(folder: Path, count: int, timeout: float = 5.0) -> None:
    """Until the ledger holds `count` records: the outbound role writes them in groups, after its 250
    (gateway/policy/recorder.py, within COMMIT_DELAY), so a test that answers at once waits for it here."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.closing(sqlite3.connect(folder / "keys" / "ledger.sqlite")) as db:
            if db.execute("SELECT count(*) FROM ledger").fetchone()[0] >= count:
                return
        assert time.monotonic() < deadline, "the outbound role did not record the message"
        await asyncio.sleep(0.02)


def send(port: int, sender: str, recipient: str, message: str | bytes) -> tuple[int, int, bytes]:
    """(RCPT code, end-of-DATA code, its text); DATA is not sent when RCPT is refused."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20) as client:
        client.ehlo()
        client.mail(sender)
        rcpt, _ = client.rcpt(recipient)
        if rcpt != 250:
            return rcpt, 0, b""
        code, text = client.data(message)
        return rcpt, code, text


def callout(port: int, recipient: str) -> int:
    """Sender verification as MTAs do it: MAIL FROM:<>, RCPT TO, QUIT (no DATA)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="callout.test", timeout=20) as client:
        client.ehlo()
        client.mail("")
        return client.rcpt(recipient)[0]


def test_answers_to_a_sent_message_pass_and_others_never_reach_the_next_hop(tmp_path: Path) -> None:
    async def body() -> None:
        async with both_roles(tmp_path) as (outbound, inbound, hop):
            # Out through the outbound role: signed, and ledgered once the next hop said 250.
            sent = await asyncio.to_thread(
                send, outbound.port, "alice@example.com", "friend@remote.test", SENT
            )
            assert sent == (250, 250, QUEUED)
            tagged = hop.messages[0].mail.split(b"<", 1)[1].split(b">", 1)[0].decode()
            assert tagged.startswith("prvs=") and tagged.endswith("=alice@example.com")
            await ledgered(tmp_path, 1)

            answers = [
                ("desk@example.com", auto_reply("desk@example.com", SENT_ID)),
                ("receipts@example.com", mdn("receipts@example.com", SENT_ID)),
                ("alice@example.com", dsn("alice@example.com", SENT_ID)),
            ]
            for to, message in answers:
                # 250 at RCPT (sent on, decided at the end of DATA), and passed.
                assert await asyncio.to_thread(send, inbound.port, "", to, message) == (
                    250,
                    250,
                    QUEUED,
                )
            assert len(hop.messages) == 4

            for to, message in answers:
                forged = message.replace(SENT_ID, UNKNOWN_ID)
                rcpt, code, text = await asyncio.to_thread(send, inbound.port, "", to, forged)
                assert (rcpt, code) == (250, 550), text
                assert (
                    text.startswith(b"5.7.1 <" + to.encode()) and b"no message we sent in the last 30" in text
                )
            # The three refused never reached the next hop complete: no final dot, so no message.
            assert len(hop.messages) == 4

            # A callout: MAIL FROM:<>, RCPT TO, QUIT.
            assert await asyncio.to_thread(callout, inbound.port, "alice@example.com") == 250

            # The store goes away: the deferred decisions say 451; everything else goes on.
            for name in ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm"):
                (tmp_path / "keys" / name).unlink(missing_ok=True)
            rcpt, code, text = await asyncio.to_thread(
                send, inbound.port, "", "alice@example.com", dsn("alice@example.com", SENT_ID)
            )
            assert (rcpt, code) == (250, 451) and text.startswith(b"4.3.0 "), text
            # A refusal that needs no store is still a refusal, not a 451.
            rcpt, code, _ = await asyncio.to_thread(
                send, inbound.port, "", "alice@example.com", "Subject: x\r\n\r\nx\r\n"
            )
            assert (rcpt, code) == (250, 550)
            # Tag verdicts at RCPT need no store: a bounce to the tag passes, a forged tag is refused there.
            bounce = await asyncio.to_thread(send, inbound.port, "", tagged, "Subject: bounce\r\n\r\nx\r\n")
            assert bounce == (250, 250, QUEUED)
            assert (
                await asyncio.to_thread(send, inbound.port, "", "prvs=0123abcdef=alice@example.com", "x")
            )[0] == 550
            # The outbound role relays on (the lost record is logged and counted).
            assert (
                await asyncio.to_thread(send, outbound.port, "alice@example.com", "friend@remote.test", SENT)
            )[1] == 250
            assert len(hop.messages) == 6
        assert "not recorded in the ledger" in outbound.output
        assert "ledger on: keys/ledger.sqlite" in inbound.output

    run(body(), timeout=120)


def test_real_generators_answers_pass(tmp_path: Path) -> None:
    """Pigeonhole's Sieve vacation and Postfix's own bounce, on a message the outbound role sent.

    Both answer the envelope sender, which on mail we sign is the tag (prvs lets that through already).
    Mail resent by a path that does not sign (a list, a second MTA) reaches them with the header From as
    its envelope sender: that is the untagged header address the ledger vouches for, so each generator is
    run with it as the envelope sender, and its answer is sent through the inbound role to the address
    it chose. The classic vacation program names no message in its reply (tests/test_messageids.py), so
    the ledger cannot vouch for it and it is not used here.
    """
    original = SENT.replace("\r\n", "\n").encode()

    async def body() -> None:
        async with both_roles(tmp_path) as (outbound, inbound, hop):
            code = (
                await asyncio.to_thread(send, outbound.port, "alice@example.com", "friend@remote.test", SENT)
            )[1]
            assert code == 250
            await ledgered(tmp_path, 1)
            sieve = await asyncio.to_thread(
                generators.sieve_vacation, original, "alice@example.com", "friend@remote.test"
            )
            assert sieve.sender == "" and sieve.recipients == ("alice@example.com",)
            with private_root(keep_log_in=tmp_path) as root:
                bounce = await generators.postfix_bounce(
                    root, SENT.encode(), "alice@example.com", "friend@remote.test"
                )
            assert bounce.sender == "" and bounce.recipients == ("alice@example.com",)
            for answer in (sieve, bounce):
                result = await asyncio.to_thread(send, inbound.port, "", answer.recipients[0], answer.message)
                assert result == (250, 250, QUEUED), answer.message[:400]
            assert len(hop.messages) == 3

    run(body(), timeout=180)
