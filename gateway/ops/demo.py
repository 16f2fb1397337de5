"""`batv-gateway demo`: the whole story in a few seconds, on loopback, with nothing to set up.

It runs the real gateway (gateway.ops.serve.Gateway: both listeners, the relay engine, the one policy) with a
throwaway keyring in a temporary folder, between two in-process SMTP sinks that stand for "the internet"
(the outbound listener's next hop) and "your mail server" (the inbound listener's next hop). A scripted
client plays Alice's MTA, Bob's MTA and a spammer's victim:

1. a message goes out through the outbound listener and arrives with its MAIL FROM signed (prvs);
2. Bob's server bounces it to that signed return path; the bounce comes in through the inbound listener
   and reaches your mail server with the tag stripped;
3. a bounce of mail Alice never sent (backscatter: a spammer forged her address) comes to the bare address
   and is refused with 550 at RCPT, so nothing reaches your mail server.

The client side is smtplib in a worker thread: it is the demo's stand-in for other MTAs, not the mail path.
The sinks are a few lines of asyncio here, so the demo needs nothing but the package.
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from . import config as config_module
from . import keystore
from .serve import Gateway

LOCALHOST = "127.0.0.1"
DOMAIN = "example.com"  # the domain whose return paths the demo signs
SRS_ALIAS = "fwd.example.com"
SENDER = f"alice@{DOMAIN}"
REMOTE = "bob@example.net"


# ------------------------------------------------------------------------------------------------ the sinks


@dataclass
class Delivery:
    """One transaction as a sink received it."""

    mail_from: str  # "" is the null sender
    rcpts: list[str]
    data: bytes


@dataclass
class Sink:
    """A minimal in-process SMTP server that accepts everything and records each transaction."""

    name: str
    deliveries: list[Delivery] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._session, LOCALHOST, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the gateway hung up: nothing to record
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def reply(text: str) -> None:
            writer.write(text.encode() + b"\r\n")

        reply(f"220 {self.name}.demo ESMTP sink")
        mail_from: str | None = None
        rcpts: list[str] = []
        while line := await reader.readline():
            await writer.drain()
            command = line.decode("utf-8", "replace").rstrip("\r\n")
            verb = command.split(" ", 1)[0].split(":", 1)[0].upper()
            if verb == "EHLO":
                reply(f"250-{self.name}.demo\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES")
            elif verb == "HELO":
                reply(f"250 {self.name}.demo")
            elif verb == "MAIL":
                mail_from, rcpts = _path(command), []
                reply("250 2.1.0 Ok")
            elif verb == "RCPT" and mail_from is not None:
                rcpts.append(_path(command))
                reply("250 2.1.5 Ok")
            elif verb == "DATA" and rcpts and mail_from is not None:
                reply("354 End data with <CR><LF>.<CR><LF>")
                await writer.drain()
                data = await _read_data(reader)
                self.deliveries.append(Delivery(mail_from, rcpts, data))
                mail_from, rcpts = None, []
                reply("250 2.0.0 Ok: delivered")
            elif verb == "RSET":
                mail_from, rcpts = None, []
                reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                reply("221 2.0.0 Bye")
                await writer.drain()
                return
            else:
                reply("503 5.5.1 Bad sequence of commands")
        await writer.drain()


def _path(command: str) -> str:
    """The address inside <...> of a MAIL or RCPT command ("" for <>)."""
    start, end = command.find("<"), command.find(">")
    return command[start + 1 : end] if 0 <= start < end else ""


async def _read_data(reader: asyncio.StreamReader) -> bytes:
    lines = []
    while (line := await reader.readuntil(b"\n")) != b".\r\n":
        lines.append(line[1:] if line.startswith(b".") else line)  # RFC 5321 4.5.2: undo dot-stuffing
    return b"".join(lines)


# ------------------------------------------------------------------------------------------------ the client


@dataclass
class Step:
    """One SMTP command the scripted client sent and the reply it got."""

    command: str
    code: int
    text: str


def send(port: int, helo: str, mail_from: str, rcpts: list[str], message: str) -> list[Step]:
    """One transaction with smtplib (in a worker thread): MAIL, each RCPT, and DATA if any was accepted."""
    steps: list[Step] = []
    with smtplib.SMTP(LOCALHOST, port, local_hostname=helo, timeout=30) as client:
        client.ehlo()
        code, text = client.mail(mail_from)
        steps.append(Step(f"MAIL FROM:<{mail_from}>", code, text.decode()))
        accepted = 0
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt)
            steps.append(Step(f"RCPT TO:<{rcpt}>", code, text.decode()))
            accepted += code // 100 == 2
        if accepted:
            code, text = client.data(message.replace("\n", "\r\n").encode())
            steps.append(Step("DATA ... .", code, text.decode()))
        else:
            client.rset()
    return steps


# ------------------------------------------------------------------------------------------------ the story


class Story:
    """What the reader sees: numbered scenes, the wire, and what each sink received."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def wire(self, who: str, steps: list[Step]) -> None:
        for step in steps:
            self.say(f"     {who} > {step.command}")
            self.say(f"     {'gateway':>{len(who)}} < {step.code} {step.text}")

    def received(self, sink: Sink, before: int) -> Delivery | None:
        new = sink.deliveries[before:]
        if not new:
            self.say(f"     {sink.name} received nothing.")
            return None
        for got in new:
            rcpts = ", ".join(f"<{r}>" for r in got.rcpts)
            self.say(f"     {sink.name} received: MAIL FROM:<{got.mail_from}>  RCPT TO:{rcpts}")
        return new[-1]


def demo_config(keyring_path: Path, internet: Sink, mailbox: Sink) -> config_module.Config:
    return config_module.parse(
        {
            "gateway": {
                "hostname": "gateway.demo",
                "keyring": str(keyring_path),
                "local_domains": [DOMAIN],
            },
            "srs": {"alias": SRS_ALIAS},
            "limits": {"shutdown_deadline": 5},
            "listener": [
                {
                    "name": "outbound",
                    "role": "outbound",
                    "listen": f"{LOCALHOST}:0",
                    "next_hop": f"{LOCALHOST}:{internet.port}",
                },
                {
                    "name": "inbound",
                    "role": "inbound",
                    "listen": f"{LOCALHOST}:0",
                    "next_hop": f"{LOCALHOST}:{mailbox.port}",
                },
            ],
        },
        "<demo>",
    )


async def run(out: TextIO) -> int:
    story = Story(out)
    internet, mailbox = Sink("the internet"), Sink("your mail server")
    with tempfile.TemporaryDirectory(prefix="batv-demo-") as folder:
        keyring_path = Path(folder) / "keyring.toml"
        keystore.save(keyring_path, keystore.new_keyring(datetime.now(UTC)))
        keyring = keystore.load(keyring_path).keyring
        await internet.start()
        await mailbox.start()
        gateway = Gateway(demo_config(keyring_path, internet, mailbox), keyring)
        try:
            await gateway.start()
            outbound, inbound = (lst.address[1] for lst in gateway.listeners)
            story.say("batv-gateway demo: BATV on loopback, with a real gateway and two in-process sinks.")
            story.say(f"  keyring:  a throwaway one in {folder} (key {keyring.active_id} signs)")
            story.say(f"  outbound: {LOCALHOST}:{outbound} -> the internet ({LOCALHOST}:{internet.port})")
            story.say(f"  inbound:  {LOCALHOST}:{inbound} -> your mail server ({LOCALHOST}:{mailbox.port})")
            story.say(f"  signed domain: {DOMAIN}")
            return await _scenes(story, outbound, inbound, internet, mailbox)
        finally:
            await gateway.stop(5.0)
            await internet.close()
            await mailbox.close()


async def _scenes(story: Story, outbound: int, inbound: int, internet: Sink, mailbox: Sink) -> int:
    story.say()
    story.say(f"1. Alice ({SENDER}) writes to {REMOTE}.")
    story.say("   Her mail server relays it through the outbound listener.")
    message = f"From: <{SENDER}>\nTo: <{REMOTE}>\nSubject: lunch?\n\nAre you free on Friday?\n"
    steps = await asyncio.to_thread(send, outbound, "mail.example.com", SENDER, [REMOTE], message)
    story.wire("alice's MTA", steps)
    got = story.received(internet, 0)
    if got is None or got.mail_from == SENDER or not got.mail_from.startswith("prvs="):
        story.say("   The return path was not signed: the demo stops here.")
        return 1
    signed = got.mail_from
    story.say(f"   The return path is signed: {signed}")
    story.say("   (prvs=, key id, expiry day, 6 hex digits of HMAC-SHA1, '=', the address.)")

    story.say()
    story.say(f"2. {REMOTE} has no such mailbox after all: Bob's server bounces to the signed return path.")
    bounce = _dsn(signed, REMOTE, "mx.example.net")
    before = len(mailbox.deliveries)
    steps = await asyncio.to_thread(send, inbound, "mx.example.net", "", [signed], bounce)
    story.wire("bob's MTA", steps)
    got = story.received(mailbox, before)
    if got is None or got.rcpts != [SENDER]:
        story.say("   The genuine bounce did not arrive with its tag stripped: the demo stops here.")
        return 1
    story.say(f"   Accepted: the tag verified, and it was stripped. Alice gets her bounce at {SENDER}.")

    story.say()
    story.say(f"3. A spammer forged {SENDER} as the sender of mail Alice never sent.")
    story.say("   The bounce of that mail (backscatter) comes to her bare, unsigned address.")
    forged = _dsn(SENDER, "victim@example.org", "mx.example.org")
    before = len(mailbox.deliveries)
    steps = await asyncio.to_thread(send, inbound, "mx.example.org", "", [SENDER], forged)
    story.wire("some MTA", steps)
    got = story.received(mailbox, before)
    refused = [s for s in steps if s.command.startswith("RCPT") and s.code == 550]
    if got is not None or not refused:
        story.say("   The forged bounce was not refused: the demo stops here.")
        return 1
    story.say("   Refused at RCPT, during the SMTP session: nothing was accepted, nothing will bounce again.")

    story.say()
    story.say(
        "That is BATV. To run it for real (serve makes a development keyring at keys/keyring.toml if there"
        " is none; for production, 'batv-gateway keys init --keyring PATH' and --keyring PATH):"
    )
    story.say(
        "  batv-gateway serve --role outbound --listen 127.0.0.1:2587 --next-hop smtp.your-isp.example:25"
        f" --domain {DOMAIN} --srs-alias {SRS_ALIAS}"
    )
    story.say(
        f"  batv-gateway serve --role inbound --listen 0.0.0.0:25 --next-hop 127.0.0.1:10025"
        f" --domain {DOMAIN}"
    )
    story.say("Or both listeners in one process: batv-gateway serve --config deploy/gateway.example.toml")
    return 0


def _dsn(to: str, failed: str, reporter: str) -> str:
    """A small RFC 3464 delivery status notification, as a remote MTA would send it."""
    boundary = "demo-boundary"
    return (
        f"From: MAILER-DAEMON@{reporter}\nTo: <{to}>\nSubject: Undelivered Mail Returned to Sender\n"
        "MIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\n'
        f"\n--{boundary}\nContent-Type: text/plain\n\n<{failed}>: user unknown\n"
        f"\n--{boundary}\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; {reporter}\n\n"
        f"Final-Recipient: rfc822; {failed}\nAction: failed\nStatus: 5.1.1\n"
        f"\n--{boundary}--\n"
    )


def main(out: TextIO) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(out))
    return 130
