"""Real SMTP peers for tests, all on 127.0.0.1 with kernel-chosen ports, all stopped by their owner.

- `FakeNextHop`: a scriptable, recording next hop. It keeps every raw command line (so a test can check
  that ESMTP parameters arrived byte for byte) and every message as received (still dot-stuffed), and it
  injects faults: a slow reply to any command, a 4xx/5xx for one recipient or for the sender, a cap on
  recipients per transaction, a dropped connection in the middle of DATA, a refusing greeting, replies
  sent before their command (a script's reply may hold several lines: they leave in one write), a
  goodbye to idle connections as it stops.
- `AiosmtpdSink`: aiosmtpd's own server with a recording handler: an independent SMTP implementation as
  the next hop.
- `SmtpSink`: Postfix's `smtp-sink`, started on a free port and stopped again.
- `free_port()`: a port nobody listens on (a "down" next hop).
- `RawClient`: a line-level SMTP client, so a test controls pipelining, bare LFs and half-closes exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiosmtpd.smtp import SMTP as AiosmtpdSMTP
from aiosmtpd.smtp import Envelope, Session

T = TypeVar("T")
LOCALHOST = "127.0.0.1"


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run one async test body in a fresh loop (a hung test fails instead of hanging the suite)."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (connecting to it is refused)."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------------------ next hop


@dataclass
class Received:
    """One message as the next hop got it."""

    mail: bytes  # the raw MAIL line
    rcpts: list[bytes]  # the raw RCPT lines it accepted
    data: bytes  # the body as received: dot-stuffed, CRLF line ends, without the final dot line


@dataclass
class Script:
    """What the fake next hop does. Replies are full reply lines (code and text, no CRLF)."""

    greeting: str = "220 nexthop.test ESMTP fake"
    ehlo_reply: str | None = None  # e.g. "502 5.5.2 EHLO not known" (then HELO is answered)
    extensions: tuple[str, ...] = (
        "PIPELINING",
        "SIZE 52428800",
        "8BITMIME",
        "SMTPUTF8",
        "DSN",
        "ENHANCEDSTATUSCODES",
    )
    mail_reply: str = "250 2.1.0 Sender ok"
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # recipient (lower case) -> reply
    # Recipients accepted per transaction; past it each RCPT gets `too_many_reply` (Postfix's
    # smtpd_recipient_limit, Exchange's and Gmail's caps).
    max_recipients: int | None = None
    too_many_reply: str = "452 4.5.3 Error: too many recipients"
    data_reply: str = "354 End data with <CR><LF>.<CR><LF>"
    final_reply: str = "250 2.0.0 Ok: queued as FAKE"
    # The final reply on one connection only (1 is the first accepted): a next-hop process that is in
    # trouble (say an smtpd left behind by a killed master, its cleanup gone) while new ones are fine.
    final_replies: dict[int, str] = field(default_factory=dict)
    mail_replies: dict[int, str] = field(default_factory=dict)  # the same for MAIL
    # seconds before answering "GREETING", "EHLO", "MAIL", "RCPT", "DATA" or "DOT" (the final dot)
    delays: dict[str, float] = field(default_factory=dict)
    drop_after_bytes: int | None = None  # close the connection after this much of the message
    # close the connection, unanswered, on the first such command (e.g. "MAIL")
    drop_once_on: str | None = None


class FakeNextHop:
    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.lines: list[bytes] = []  # every command line, raw, in order, across connections
        self.messages: list[Received] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, LOCALHOST, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self, farewell: str | None = None) -> None:
        """Stop. With `farewell` (e.g. "421 4.3.2 Service shutting down"), each open connection is told so
        and closed gracefully, as a next hop that says goodbye does; otherwise connections are reset."""
        self._closing.set()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            if farewell is not None:
                writer.write(farewell.encode() + b"\r\n")
                writer.close()
            else:
                writer.transport.abort()
        # Not task.cancel(): asyncio's start_server logs a cancelled client task as an error. An aborted
        # transport ends each session by itself (its reader sees the end of the stream).
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FakeNextHop:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def commands(self) -> list[str]:
        return [line.split(b" ", 1)[0].split(b":", 1)[0].decode().upper() for line in self.lines]

    async def _delay(self, what: str) -> None:
        seconds = self.script.delays.get(what)
        if seconds:
            # Interrupted by close(), so that a slow next hop never outlives its test.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._closing.wait()
            if self._closing.is_set():
                raise ConnectionResetError("next hop closed by the test")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            await self._session(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        script = self.script

        async def send(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        await self._delay("GREETING")
        await send(script.greeting)
        if not script.greeting.startswith("220"):
            return
        mail: bytes | None = None
        rcpts: list[bytes] = []
        while True:
            raw = await reader.readuntil(b"\r\n")
            line = raw[:-2]
            self.lines.append(line)
            verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
            if script.drop_once_on is not None and verb.decode() == script.drop_once_on:
                # What a next hop whose idle timeout fired just as our command arrived looks like.
                script.drop_once_on = None
                writer.transport.abort()
                return
            if verb == b"EHLO":
                await self._delay("EHLO")
            if verb == b"EHLO" and script.ehlo_reply is not None:
                await send(script.ehlo_reply)
            elif verb == b"EHLO":
                ext = ["nexthop.test", *script.extensions]
                await send("\r\n".join(f"250-{e}" for e in ext[:-1]) + f"\r\n250 {ext[-1]}")
            elif verb == b"HELO":
                await send("250 nexthop.test")
            elif verb == b"MAIL":
                await self._delay("MAIL")
                mail_reply = script.mail_replies.get(number, script.mail_reply)
                await send(mail_reply)
                if mail_reply.startswith("2"):
                    mail, rcpts = line, []
            elif verb == b"RCPT":
                await self._delay("RCPT")
                address = line.split(b"<", 1)[1].split(b">", 1)[0].decode().lower()
                reply = script.rcpt_replies.get(address, "250 2.1.5 Ok")
                if script.max_recipients is not None and len(rcpts) >= script.max_recipients:
                    reply = script.too_many_reply
                if mail is None:
                    reply = "503 5.5.1 Error: need MAIL command"
                await send(reply)
                if reply.startswith("2"):
                    rcpts.append(line)
            elif verb == b"DATA":
                await self._delay("DATA")
                if mail is None or not rcpts:
                    await send("554 5.5.1 Error: no valid recipients")
                    continue
                await send(script.data_reply)
                if not script.data_reply.startswith("354"):
                    continue
                body = await self._read_data(reader, writer)
                if body is None:
                    return
                await self._delay("DOT")
                self.messages.append(Received(mail, rcpts, body))
                await send(script.final_replies.get(number, script.final_reply))
                mail, rcpts = None, []
            elif verb == b"RSET":
                mail, rcpts = None, []
                await send("250 2.0.0 Ok")
            elif verb == b"XFORWARD" and "XFORWARD NAME ADDR PROTO HELO" in script.extensions:
                await send("250 2.0.0 Ok")
            elif verb == b"NOOP":
                await send("250 2.0.0 Ok")
            elif verb == b"QUIT":
                await send("221 2.0.0 Bye")
                return
            else:
                await send("502 5.5.2 Error: command not recognized")

    async def _read_data(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            if line == b".\r\n":
                return b"".join(chunks)
            chunks.append(line)
            size += len(line)
            limit = self.script.drop_after_bytes
            if limit is not None and size >= limit:
                writer.transport.abort()
                return None


# ------------------------------------------------------------------------------------------------ aiosmtpd


@dataclass
class SinkMessage:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes


class _RecordingHandler:
    def __init__(self) -> None:
        self.messages: list[SinkMessage] = []

    async def handle_DATA(self, server: AiosmtpdSMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self.messages.append(SinkMessage(str(envelope.mail_from), list(envelope.rcpt_tos), bytes(content)))
        return "250 2.0.0 Ok: recorded"


class AiosmtpdSink:
    """aiosmtpd as the next hop (an SMTP implementation that is not ours), in the test's own loop."""

    def __init__(self) -> None:
        self.handler = _RecordingHandler()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._protocols: list[AiosmtpdSMTP] = []

    @property
    def messages(self) -> list[SinkMessage]:
        return self.handler.messages

    async def __aenter__(self) -> AiosmtpdSink:
        loop = asyncio.get_running_loop()

        def factory() -> AiosmtpdSMTP:
            proto = AiosmtpdSMTP(self.handler, hostname="sink.test", loop=loop)
            self._protocols.append(proto)
            return proto

        self._server = await loop.create_server(factory, LOCALHOST, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for proto in self._protocols:
            if proto.transport is not None:
                proto.transport.close()
        await asyncio.sleep(0)
        await self._server.wait_closed()


# ------------------------------------------------------------------------------------------------ smtp-sink

SMTP_SINK = shutil.which("smtp-sink") or (
    "/usr/sbin/smtp-sink" if Path("/usr/sbin/smtp-sink").exists() else None
)


class SmtpSink:
    """Postfix's smtp-sink on a free loopback port, dumping each message into a folder (-d)."""

    def __init__(self, folder: Path, backlog: int = 64) -> None:
        self.folder = folder
        self.backlog = backlog
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SmtpSink:
        assert SMTP_SINK is not None, "smtp-sink is not installed (apt-get install postfix)"
        # smtp-sink cannot be told port 0 and report back; a free port is taken and retried if lost.
        # As root, smtp-sink insists on -u; staying root keeps the dump folder (under pytest's private
        # tmp_path) writable for it.
        user = ["-u", "root"] if os.geteuid() == 0 else []
        for _ in range(5):
            self.port = free_port()
            self.process = subprocess.Popen(
                [SMTP_SINK, "-d", f"{self.folder}/%M.", *user, f"{LOCALHOST}:{self.port}", str(self.backlog)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if _wait_port(self.port, self.process):
                return self
            self._stop()
        raise RuntimeError("smtp-sink did not start")

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            if self.process.stderr is not None:
                self.process.stderr.close()
            self.process = None

    def messages(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.folder.iterdir()) if p.is_file()]


def _wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            return False
        with socket.socket() as sock:
            if sock.connect_ex((LOCALHOST, port)) == 0:
                return True
        time.sleep(0.02)
    return False


# ------------------------------------------------------------------------------------------------ client


class RawClient:
    """A line-level SMTP client: `send` writes raw lines, `reply` reads one (multi-line) reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, host: str = LOCALHOST) -> RawClient:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def reply(self, timeout: float = 10.0) -> tuple[int, str]:
        """(code, text): the text of every line joined with newlines. (0, "") at end of stream."""
        lines: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.reader.readline()
                if not raw:
                    return 0, "\n".join(lines)
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                lines.append(text[4:])
                if text[3:4] != "-":
                    return int(text[:3]), "\n".join(lines)

    def send(self, data: str | bytes) -> None:
        self.writer.write(data.encode() + b"\r\n" if isinstance(data, str) else data)

    async def cmd(self, line: str) -> tuple[int, str]:
        self.send(line)
        await self.writer.drain()
        return await self.reply()

    async def ehlo(self, name: str = "client.test") -> tuple[int, str]:
        greeting = await self.reply()
        assert greeting[0] == 220, greeting
        return await self.cmd(f"EHLO {name}")

    async def open_data(self, sender: str, recipient: str) -> None:
        """MAIL, RCPT and DATA, each answered positively: the server now waits for the message."""
        assert (await self.cmd(f"MAIL FROM:<{sender}>"))[0] == 250
        assert (await self.cmd(f"RCPT TO:<{recipient}>"))[0] == 250
        assert (await self.cmd("DATA"))[0] == 354

    async def close(self) -> None:
        self.writer.transport.abort()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    async def rest(self, timeout: float = 10.0) -> bytes:
        """Everything the server still sends until it closes the connection (a timeout fails the test)."""
        async with asyncio.timeout(timeout):
            return await self.reader.read()


# ------------------------------------------------------------------------------------------------ gateway

SECRET = b"s3cret-for-tests-only-0123456789abcdef"


def make_keyring() -> Any:
    from gateway.core.keyring import Key, Keyring

    return Keyring((Key(1, SECRET),))


def gateway_config(
    next_hop_port: int,
    *,
    observe: bool = False,
    domains: tuple[str, ...] = ("example.com",),
    limits: dict[str, Any] | None = None,
    listener: dict[str, Any] | None = None,
    policy: dict[str, Any] | None = None,
    srs_alias: str | None = None,
) -> Any:
    """A Config as the loader builds it from TOML: one inbound listener on 127.0.0.1 port 0."""
    from gateway.ops import config

    data: dict[str, Any] = {
        "gateway": {"hostname": "gw.test", "keyring": "unused.toml", "local_domains": list(domains)},
        "listener": [
            {
                "name": "mx",
                "role": "inbound",
                "listen": f"{LOCALHOST}:0",
                "next_hop": f"{LOCALHOST}:{next_hop_port}",
                "observe": observe,
                **(listener or {}),
            }
        ],
        "limits": {"shutdown_deadline": 5, **(limits or {})},
    }
    if policy:
        data["policy"] = policy
    if srs_alias:
        data["srs"] = {"alias": srs_alias}
    return config.parse(data, "<test>")


@contextlib.asynccontextmanager
async def running_gateway(cfg: Any, keyring: Any = None, **kwargs: Any) -> AsyncIterator[Any]:
    """A started gateway.ops.serve.Gateway; stopped (and every session and port closed) on the way out."""
    from gateway.ops.serve import Gateway

    gw = Gateway(cfg, keyring if keyring is not None else make_keyring(), **kwargs)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop(5)


def gateway_port(gw: Any, index: int = 0) -> int:
    return int(gw.listeners[index].address[1])


def make_cert(folder: Path, name: str = "gw.test") -> tuple[Path, Path]:
    """A throwaway self-signed certificate and key (PEM) for STARTTLS tests."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path
