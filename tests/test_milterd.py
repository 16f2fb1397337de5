"""The milter front end (gateway/postfix/milterd.py): sessions over a real socket, driven by a hand-written
MTA side; `batv-gateway milter` inside a private Postfix driven by swaks; OpenDKIM's miltertest as an
independent MTA side (tests/milter/*.lua)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import smtplib
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from postfix_instance import PostfixInstance, SmtpSink, free_port, load_snippet, private_root
from test_socketmap import ALIAS, Command, socket_config, spool_socket, today, write_keyring

from gateway.core import prvs, replies, srs
from gateway.core.keyring import Keyring
from gateway.core.logs import FIELDS_ATTR
from gateway.core.replies import Reply
from gateway.edge.relay import PolicyHolder
from gateway.ops import keystore
from gateway.ops.ledgerstore import SqliteLedgerStore
from gateway.policy import ledger
from gateway.policy.policy import Action, Policy, PolicySettings, RcptVerdict
from gateway.postfix.milterd import MAX_HEADERS, FinishedMessage, MilterService, MilterSettings

REPO = Path(__file__).resolve().parent.parent
DEPLOY_POSTFIX = REPO / "deploy" / "postfix"
LUA = Path(__file__).resolve().parent / "milter"
T = TypeVar("T")

ALL_ACTIONS = 0x1FF
ALL_STEPS = 0x1FFFFF
NR_FREE_STEPS = 0x77F  # an MTA that offers no SMFIP_NR_*: every step is answered


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + command + data


def strings(*parts: str) -> bytes:
    return b"".join(p.encode() + b"\0" for p in parts)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class MtaSide:
    """What an MTA says to a milter, packet by packet, and the replies it reads back (command, data)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, command: bytes, data: bytes = b"") -> None:
        self.writer.write(packet(command, data))
        await self.writer.drain()

    async def reply(self) -> tuple[bytes, bytes]:
        (length,) = struct.unpack(">I", await asyncio.wait_for(self.reader.readexactly(4), 5))
        body = await asyncio.wait_for(self.reader.readexactly(length), 5)
        return body[:1], body[1:]

    async def ask(self, command: bytes, data: bytes = b"") -> tuple[bytes, bytes]:
        await self.send(command, data)
        return await self.reply()

    async def until_final(self) -> list[tuple[bytes, bytes]]:
        """The replies to end of message: the modifications, then the final one."""
        got = [await self.reply()]
        while got[-1][0] not in (b"c", b"a", b"r", b"t", b"y", b"d"):
            got.append(await self.reply())
        return got

    async def negotiate(self, steps: int = NR_FREE_STEPS) -> tuple[int, int, int]:
        command, data = await self.ask(b"O", struct.pack(">III", 6, ALL_ACTIONS, steps))
        assert command == b"O"
        version, actions, taken = struct.unpack(">III", data)
        return version, actions, taken

    async def connect(self, ip: str, daemon: str = "mx", auth: str = "") -> None:
        await self.send(b"D", b"C" + strings("j", "mx.example.org", "{daemon_name}", daemon))
        assert await self.ask(b"C", b"client\0" + b"4" + struct.pack(">H", 4711) + strings(ip)) == (b"c", b"")
        if auth:
            await self.send(b"D", b"M" + strings("{auth_authen}", auth))

    async def mail(self, sender: str, *args: str) -> None:
        assert await self.ask(b"M", strings(f"<{sender}>", *args)) == (b"c", b"")

    async def rcpt(self, rcpt: str, *args: str) -> tuple[bytes, bytes]:
        return await self.ask(b"R", strings(f"<{rcpt}>", *args))

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@dataclass
class Hook:
    """A stand-in for the ledger at the seam: holds unsigned bounces, records what it sees, answers
    `reply`."""

    reply: Reply | None = None
    seen: list[FinishedMessage] = field(default_factory=list)

    def reads(self, policy: Policy) -> bool:
        return False  # the policy refuses unsigned bounces at RCPT, as without a ledger

    def holds(self, verdict: RcptVerdict) -> bool:
        return verdict.reason.value == "unsigned"

    async def end_of_message(self, message: FinishedMessage) -> Reply | None:
        self.seen.append(message)
        return self.reply


KEYRING = keystore.new_keyring(datetime.now(UTC)).keyring
SETTINGS = PolicySettings(
    local_domains=frozenset({"example.org"}),
    signed_domains=frozenset({"example.org"}),
    srs_alias=ALIAS,
    bounce_grace=False,
)


async def serving(
    body: Callable[[MtaSide], Coroutine[Any, Any, T]],
    hook: Hook | None = None,
    settings: MilterSettings | None = None,
) -> T:
    service = MilterService(PolicyHolder(Policy(SETTINGS, KEYRING)), settings or MilterSettings(), hook)
    server = await asyncio.start_server(service.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        mta = MtaSide(reader, writer)
        try:
            return await body(mta)
        finally:
            await mta.close()
    finally:
        server.close()
        await service.close_connections()
        await server.wait_closed()


def bare(data: bytes) -> str:
    return data.rstrip(b"\0").decode()


# ------------------------------------------------------------------------------------------ inbound


def test_a_forged_bounce_is_refused_at_rcpt_with_the_policy_reply() -> None:
    async def body(mta: MtaSide) -> list[tuple[bytes, bytes]]:
        await mta.negotiate()
        await mta.connect("192.0.2.1")
        await mta.mail("")
        return [
            await mta.rcpt("user@example.org"),
            await mta.rcpt("prvs=0000000000=user@example.org"),
            await mta.rcpt("postmaster@example.org"),
            await mta.rcpt("someone@elsewhere.test"),  # relaying is the MTA's business
        ]

    unsigned, forged, postmaster, foreign = run(serving(body))
    assert unsigned == (b"y", str(replies.bounce_refused("user@example.org", "unsigned")).encode() + b"\0")
    assert forged[0] == b"y" and forged[1].startswith(b"550 5.7.1 <prvs=0000000000=user@example.org>: bounce")
    assert postmaster == (b"c", b"") and foreign == (b"c", b"")


def test_a_genuine_bounce_passes_and_its_tag_is_stripped_at_end_of_message() -> None:
    tagged = prvs.sign("user@example.org", KEYRING, today())

    async def body(mta: MtaSide) -> tuple[tuple[bytes, bytes], list[tuple[bytes, bytes]]]:
        await mta.negotiate()
        await mta.connect("192.0.2.1")
        await mta.mail("")
        rcpt = await mta.rcpt(tagged, "NOTIFY=NEVER")
        await mta.send(b"E")
        return rcpt, await mta.until_final()

    rcpt, eom = run(serving(body))
    assert rcpt == (b"c", b"")
    assert eom == [
        (b"-", f"<{tagged}>\0".encode()),
        (b"2", b"<user@example.org>\0NOTIFY=NEVER\0"),
        (b"c", b""),
    ]


def test_a_reply_to_a_tagged_address_is_stripped_too_and_without_params_uses_plain_addrcpt() -> None:
    tagged = prvs.sign("user@example.org", KEYRING, today())

    async def body(mta: MtaSide) -> list[tuple[bytes, bytes]]:
        # An MTA that does not offer SMFIF_ADDRCPT_PAR.
        command, data = await mta.ask(b"O", struct.pack(">III", 6, 0x4C, NR_FREE_STEPS))
        assert command == b"O" and struct.unpack(">III", data)[1] == 0x4C
        await mta.connect("192.0.2.1")
        await mta.mail("someone@elsewhere.test")
        assert await mta.rcpt(tagged, "NOTIFY=NEVER") == (b"c", b"")
        await mta.send(b"E")
        return await mta.until_final()

    eom = run(serving(body))
    assert eom == [(b"-", f"<{tagged}>\0".encode()), (b"+", b"<user@example.org>\0"), (b"c", b"")]


# ------------------------------------------------------------------------------------------ outbound


def outbound_eom(
    sender: str, rcpts: list[str], ip: str = "127.0.0.1", **connect: str
) -> list[tuple[bytes, bytes]]:
    async def body(mta: MtaSide) -> list[tuple[bytes, bytes]]:
        await mta.negotiate()
        await mta.connect(ip, **connect)
        await mta.mail(sender, "SIZE=120", "RET=HDRS", "BODY=8BITMIME", "ENVID=x1")
        for rcpt in rcpts:
            assert await mta.rcpt(rcpt) == (b"c", b"")
        await mta.send(b"E")
        return await mta.until_final()

    return run(serving(body))


def chgfrom(eom: list[tuple[bytes, bytes]]) -> tuple[str, bytes]:
    (change, args), final = eom
    assert change == b"e" and final == (b"c", b"")
    address, _, rest = args.partition(b"\0")
    return address.decode().strip("<>"), rest


def test_outbound_mail_from_a_trusted_client_gets_a_prvs_sender_with_its_dsn_params() -> None:
    for _ in range(2):
        day = today()
        address, rest = chgfrom(outbound_eom("user@example.org", ["friend@remote.test", "other@example.org"]))
        if today() == day:
            break
    assert prvs.verify(address, KEYRING, day).address == "user@example.org"
    assert rest == b"RET=HDRS ENVID=x1\0"  # the DSN parameters; the MTA keeps SIZE and BODY itself


def test_a_forwarded_sender_gets_srs() -> None:
    address, _ = chgfrom(outbound_eom("someone@elsewhere.test", ["friend@remote.test"]))
    assert address.startswith("SRS0=") and address.endswith("@" + ALIAS)
    assert srs.reverse(address, KEYRING.srs_secrets(), today(), SETTINGS.srs_options).address == (
        "someone@elsewhere.test"
    )


def test_mail_only_to_local_recipients_is_not_rewritten() -> None:
    assert outbound_eom("user@example.org", ["other@example.org", "third@EXAMPLE.ORG"]) == [(b"c", b"")]


def test_the_submission_daemon_name_or_an_authenticated_client_makes_mail_outbound() -> None:
    remote = ["friend@remote.test"]
    assert outbound_eom("user@example.org", remote, ip="192.0.2.7") == [(b"c", b"")]  # inbound: not signed
    for how in ({"daemon": "ORIGINATING"}, {"auth": "alice"}):
        address, _ = chgfrom(outbound_eom("user@example.org", remote, ip="192.0.2.7", **how))
        assert address.startswith("prvs="), how


def test_without_an_active_key_outbound_mail_is_deferred() -> None:
    from gateway.core.keyring import KeyState

    key = KEYRING.keys[0]
    retired = Keyring([type(key)(key.id, key.secret, KeyState.VERIFY, key.created, key.changed)])

    async def body(mta: MtaSide) -> list[tuple[bytes, bytes]]:
        await mta.negotiate()
        await mta.connect("127.0.0.1")
        await mta.mail("user@example.org")
        await mta.rcpt("friend@remote.test")
        await mta.send(b"E")
        return await mta.until_final()

    async def serve_retired() -> list[tuple[bytes, bytes]]:
        service = MilterService(PolicyHolder(Policy(SETTINGS, retired)), MilterSettings())
        server = await asyncio.start_server(service.handle, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            return await body(MtaSide(reader, writer))
        finally:
            writer.close()
            server.close()
            await service.close_connections()
            await server.wait_closed()

    assert run(serve_retired()) == [(b"y", str(replies.KEYRING_UNAVAILABLE).encode() + b"\0")]


# ------------------------------------------------------------------------------------------ sessions


def test_many_transactions_and_sessions_on_one_connection() -> None:
    """Abort ends a transaction, QUIT_NC a session (Sendmail reuses the connection); each starts clean."""

    async def body(mta: MtaSide) -> list[Any]:
        await mta.negotiate()
        await mta.connect("192.0.2.1", auth="alice")
        await mta.mail("user@example.org")
        await mta.rcpt("friend@remote.test")
        await mta.send(b"A")
        await mta.mail("")  # {auth_authen} came with the aborted MAIL: this one is inbound
        refused = await mta.rcpt("user@example.org")
        await mta.send(b"A")
        await mta.send(b"K")
        await mta.connect("127.0.0.1")
        await mta.mail("user@example.org")
        await mta.rcpt("friend@remote.test")
        await mta.send(b"E")
        return [refused, await mta.until_final()]

    refused, eom = run(serving(body))
    assert refused[0] == b"y" and refused[1].startswith(b"550 5.7.1 ")
    assert eom[0][0] == b"e"


def test_postfix_style_no_reply_steps_are_not_answered() -> None:
    async def body(mta: MtaSide) -> list[tuple[bytes, bytes]]:
        _, _, steps = await mta.negotiate(ALL_STEPS)
        assert steps & 0x1000 and steps & 0x4000  # NR_CONN, NR_MAIL
        await mta.send(b"C", b"client\0" + b"4" + struct.pack(">H", 1) + strings("192.0.2.1"))
        await mta.send(b"M", strings("<>"))
        return [await mta.rcpt("user@example.org")]  # the first reply read is the RCPT's

    ((command, data),) = run(serving(body))
    assert command == b"y" and b"never signed (unsigned)" in data


def test_garbage_closes_the_connection_and_the_service_serves_the_next(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body(mta: MtaSide) -> bytes:
        await mta.negotiate()
        mta.writer.write(packet(b"Z", b"junk"))
        await mta.writer.drain()
        return await asyncio.wait_for(mta.reader.read(), 5)

    with caplog.at_level(logging.WARNING, logger="gateway.milter"):
        assert run(serving(body)) == b""  # closed, nothing sent
        assert outbound_eom("user@example.org", ["other@example.org"]) == [(b"c", b"")]
    assert "unknown command octet" in caplog.text


def test_a_command_before_negotiation_is_a_protocol_error(caplog: pytest.LogCaptureFixture) -> None:
    async def body(mta: MtaSide) -> bytes:
        await mta.send(b"M", strings("<>"))
        return await asyncio.wait_for(mta.reader.read(), 5)

    with caplog.at_level(logging.WARNING, logger="gateway.milter"):
        assert run(serving(body)) == b""
    assert "MailFrom before option negotiation" in caplog.text


# ------------------------------------------------------------------------------------------ the seam


def test_the_end_of_message_hook_sees_headers_and_held_recipients_and_may_refuse() -> None:
    hook = Hook(reply=Reply(550, "5.7.1", "refused by the hook"))

    async def body(mta: MtaSide) -> tuple[int, tuple[bytes, bytes], list[tuple[bytes, bytes]]]:
        _, _, steps = await mta.negotiate()
        await mta.connect("192.0.2.1")
        await mta.mail("")
        held = await mta.rcpt("user@example.org")  # unsigned: refused without the hook
        await mta.send(b"T")
        assert await mta.reply() == (b"c", b"")
        for name, value in (("Message-ID", "<a@b>"), ("In-Reply-To", "<x@example.org>")):
            assert await mta.ask(b"L", strings(name, value)) == (b"c", b"")
        assert await mta.ask(b"N") == (b"c", b"")
        await mta.send(b"E")
        return steps, held, await mta.until_final()

    steps, held, eom = run(serving(body, hook=hook))
    assert not steps & 0x20  # SMFIP_NOHDRS: the headers were asked for
    assert held == (b"c", b"")
    assert eom == [(b"y", b"550 5.7.1 refused by the hook\0")]
    (seen,) = hook.seen
    assert seen.headers == (("Message-ID", "<a@b>"), ("In-Reply-To", "<x@example.org>"))
    (rcpt,) = seen.recipients
    assert rcpt.held and rcpt.verdict is not None and rcpt.verdict.action is Action.REJECT
    assert seen.sender is None and seen.direction.value == "inbound" and seen.client == "192.0.2.1"


def test_a_hook_that_lets_the_message_pass_keeps_the_changes() -> None:
    hook = Hook()
    tagged = prvs.sign("user@example.org", KEYRING, today())

    async def body(mta: MtaSide) -> list[tuple[bytes, bytes]]:
        await mta.negotiate()
        await mta.connect("192.0.2.1")
        await mta.mail("")
        assert await mta.rcpt(tagged) == (b"c", b"")
        await mta.send(b"E")
        return await mta.until_final()

    eom = run(serving(body, hook=hook))
    assert [c for c, _ in eom] == [b"-", b"+", b"c"] and len(hook.seen) == 1


# ------------------------------------------------------------------------------------------ Postfix


def postfix_with_milter(root: Path, sink_port: int, submission_port: int) -> PostfixInstance:
    """A private Postfix with deploy/postfix/milter-main.cf as shipped (unix:batv/milter in its queue
    directory), an MX port and a submission port that says {daemon_name} = ORIGINATING."""
    pf = PostfixInstance(
        root / "pf",
        hostname="mx.example.org",
        relayhost=f"[127.0.0.1]:{sink_port}",
        main={"relay_domains": "example.org", "smtpd_error_sleep_time": "0"},
        master=[
            f"127.0.0.1:{submission_port} inet n - n - - smtpd -o milter_macro_daemon_name=ORIGINATING",
        ],
    )
    pf.add_main(load_snippet(DEPLOY_POSTFIX / "milter-main.cf"))
    return pf


def swaks(
    port: int, sender: str, rcpt: str, header: str = "Subject: t", data: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`data`: the whole message (header block, empty line, body) instead of swaks' own with `header`."""
    message = ["--data", data] if data is not None else ["--header", header]
    return subprocess.run(
        ["swaks", "--server", "127.0.0.1", "--port", str(port), "--from", sender, "--to", rcpt,
         "--helo", "client.test", "--timeout", "20", *message],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_postfix_with_the_milter_signs_outbound_and_refuses_forged_bounces(root: Path) -> None:
    kf = write_keyring(root / "keyring.toml")
    # No trusted network: the MX port's mail from 127.0.0.1 is inbound; the submission port's is outbound.
    config = socket_config(root, "milter", spool_socket(root, "milter"), extra="")
    config.write_text(config.read_text() + "trusted = []\n")
    cmd = Command("milter", "--config", str(config))
    submission = free_port()
    try:
        cmd.wait_listening(1)
        with SmtpSink(root / "sink") as sink:
            pf = postfix_with_milter(root, sink.port, submission)
            with pf:
                day = today()
                signed = swaks(submission, "user@example.org", "friend@remote.test", "Subject: out")
                forwarded = swaks(submission, "someone@elsewhere.test", "friend@remote.test", "Subject: fwd")
                local = swaks(submission, "user@example.org", "other@example.org", "Subject: local")
                forged = swaks(pf.smtp_port, "<>", "user@example.org", "Subject: forged")
                genuine_tag = prvs.sign("user@example.org", kf.keyring, day)
                genuine = swaks(pf.smtp_port, "<>", genuine_tag, "Subject: genuine")
                with smtplib.SMTP("127.0.0.1", submission) as client:
                    # ESMTP parameters of MAIL FROM: Postfix takes SMFIR_CHGFROM's without a warning.
                    client.sendmail(
                        "user@example.org", ["friend@remote.test"], b"Subject: params\r\n\r\nx\r\n",
                        mail_options=["BODY=8BITMIME", "RET=HDRS", "ENVID=abc"],
                    )  # fmt: skip
                with smtplib.SMTP("127.0.0.1", pf.smtp_port) as client:
                    # A genuine bounce whose RCPT has DSN parameters: SMFIR_ADDRCPT_PAR carries them.
                    client.sendmail(
                        "<>", [genuine_tag], b"Subject: genuine-params\r\n\r\nx\r\n",
                        rcpt_options=["NOTIFY=NEVER", f"ORCPT=rfc822;{genuine_tag}"],
                    )  # fmt: skip
                got = {subject(m.data): m for m in sink.wait_for_messages(6)}
            log = pf.log_text()
    finally:
        code, gateway_log = cmd.stop()
    assert code == 0, gateway_log
    for done in (signed, forwarded, local, genuine):
        assert done.returncode == 0, done.stdout + done.stderr
    assert prvs.verify(got["out"].mail_from, kf.keyring, day).address == "user@example.org"
    fwd = got["fwd"].mail_from
    assert fwd.startswith("SRS0=") and fwd.endswith("@" + ALIAS), fwd
    assert got["local"].mail_from == "user@example.org"
    assert got["genuine"].mail_from == "" and got["genuine"].rcpts == ("user@example.org",)
    assert "forged" not in got
    assert forged.returncode != 0
    refusal = str(replies.bounce_refused("user@example.org", "unsigned"))
    assert f"<** {refusal}" in forged.stdout, forged.stdout
    assert "milter-reject: RCPT from" in log
    assert prvs.verify(got["params"].mail_from, kf.keyring, day).address == "user@example.org"
    assert got["genuine-params"].rcpts == ("user@example.org",), log
    assert "warning" not in log, log
    for key in kf.keyring.keys:
        assert key.secret.hex() not in gateway_log


def wait_for_record(path: Path, key: bytes, timeout: float = 20) -> ledger.LedgerEntry:
    """The ledger entry under `key` once the milter has written it (it writes after its reply)."""

    async def poll() -> ledger.LedgerEntry:
        store = await SqliteLedgerStore.open(path)
        try:
            end = time.monotonic() + timeout
            while True:
                found = await store.lookup([key])
                if key in found:
                    return found[key]
                assert time.monotonic() < end, f"no ledger record in {path}"
                await asyncio.sleep(0.05)
        finally:
            await store.close()

    return run(poll())


def test_postfix_with_the_milter_and_the_ledger_lets_in_an_auto_reply_to_a_sent_message(root: Path) -> None:
    """The ledger at end of message: a message sent through the submission port is recorded; an RFC 3834
    auto-reply to its untagged From through the MX port passes to the sink, one to an unknown Message-ID is
    refused at end of DATA."""
    kf = keystore.new_keyring(datetime.now(UTC), ledger=True)
    keystore.save(root / "keyring.toml", kf)
    assert kf.keyring.ledger_secret is not None
    keys = ledger.LedgerKeys(kf.keyring.ledger_secret)
    config = socket_config(root, "milter", spool_socket(root, "milter"), extra="")
    config.write_text(config.read_text() + "trusted = []\n")
    cmd = Command("milter", "--config", str(config))
    submission = free_port()
    sent_id = "<ledgered-1@example.org>"

    def auto_reply(subject_: str, refers_to: str) -> str:
        return (
            f"From: friend@remote.test\nTo: writer@example.org\nSubject: {subject_}\n"
            f"In-Reply-To: {refers_to}\nReferences: {refers_to}\nAuto-Submitted: auto-replied\n\n"
            "I am away.\n"
        )

    try:
        cmd.wait_listening(1)
        with SmtpSink(root / "sink") as sink:
            pf = postfix_with_milter(root, sink.port, submission)
            with pf:
                sent = swaks(
                    submission, "user@example.org", "friend@remote.test",
                    data=f"From: Writer <writer@example.org>\nMessage-ID: {sent_id}\nSubject: out\n\nhello\n",
                )  # fmt: skip
                entry = wait_for_record(root / "ledger.sqlite", keys.message_key(sent_id))
                vouched = swaks(pf.smtp_port, "<>", "writer@example.org", data=auto_reply("away", sent_id))
                unknown = swaks(
                    pf.smtp_port, "<>", "writer@example.org", data=auto_reply("stray", "<never@example.org>")
                )
                got = {subject(m.data): m for m in sink.wait_for_messages(2)}
            log = pf.log_text()
    finally:
        code, gateway_log = cmd.stop()
    assert code == 0, gateway_log
    assert "ledger on: " in gateway_log, gateway_log
    assert sent.returncode == 0 and vouched.returncode == 0, sent.stdout + vouched.stdout + gateway_log
    assert keys.address_key("writer@example.org") in entry.record.addresses
    assert keys.address_key("user@example.org") in entry.record.addresses  # the sender before signing
    assert got["away"].mail_from == "" and got["away"].rcpts == ("writer@example.org",)
    assert "stray" not in got and unknown.returncode != 0
    refusal = ledger.refused_reply(
        "writer@example.org", ledger.LedgerReason.UNKNOWN_MESSAGE_ID, ledger.LEDGER_DAYS, ledger.MAX_REPLIES
    )
    assert f"<** {refusal}" in unknown.stdout, unknown.stdout
    assert "milter-reject: END-OF-MESSAGE" in log, log
    assert kf.keyring.ledger_secret.hex() not in gateway_log


def test_postfix_that_cannot_reach_the_milter_defers(root: Path) -> None:
    """milter_default_action = tempfail as shipped: with the milter down, mail is deferred, not let in."""
    spool_socket(root, "milter")  # the folder, and no socket in it
    with SmtpSink(root / "sink") as sink:
        pf = postfix_with_milter(root, sink.port, free_port())
        with pf:
            forged = swaks(pf.smtp_port, "<>", "user@example.org")
            log = pf.log_text()
    assert "<** 451 4.7.1 Service unavailable - try again later" in forged.stdout, forged.stdout
    assert "connect to Milter service unix:batv/milter: No such file or directory" in log, log


# ------------------------------------------------------------------------------------------ miltertest


@pytest.mark.parametrize("script", sorted(p.name for p in LUA.glob("*.lua")))
def test_miltertest_scripts(root: Path, script: str) -> None:
    """OpenDKIM's miltertest (libmilter's MTA side, not ours) runs tests/milter/SCRIPT against the command."""
    assert shutil.which("miltertest"), "apt-get install miltertest (.ci/run installs it)"
    kf = write_keyring(root / "keyring.toml")
    cmd = Command("milter", "--listen", "127.0.0.1:0", "--keyring", str(root / "keyring.toml"),
                  "--domain", "example.org", "--srs-alias", ALIAS)  # fmt: skip
    try:
        port = cmd.wait_listening(1)["milter"]
        tagged = prvs.sign("user@example.org", kf.keyring, today())
        done = subprocess.run(
            ["miltertest", "-s", str(LUA / script), "-D", f"port={port}", "-D", f"tagged={tagged}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        code, gateway_log = cmd.stop()
    assert done.returncode == 0, done.stdout + done.stderr + gateway_log
    assert "ok" in done.stdout
    assert code == 0, gateway_log


def subject(data: str) -> str:
    return data.split("Subject: ", 1)[1].split("\n", 1)[0].strip()


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    with private_root(keep_log_in=tmp_path) as path:
        yield path


def test_postfix_check_accepts_the_snippet(root: Path) -> None:
    pf = postfix_with_milter(root, free_port(), free_port()).configure()
    assert pf.check() == ""
    assert pf.postconf("-h", "smtpd_milters").strip() == "unix:batv/milter"
    assert pf.postconf("-h", "milter_default_action").strip() == "tempfail"


# ------------------------------------------------------------------------------------------ [milter]


def test_the_milter_table_loads_with_its_defaults_and_the_example_file() -> None:
    import ipaddress

    from gateway.ops import config as gateway_config

    default = gateway_config.default().milter
    assert str(default.listen) == "127.0.0.1:10032" and default.outbound_daemons == ("ORIGINATING",)
    example = gateway_config.load(REPO / "deploy" / "gateway.example.toml").milter
    assert str(example.listen) == "unix:/var/spool/postfix/batv/milter" and example.socket_group == "postfix"
    mine = gateway_config.parse(
        {"milter": {"trusted": ["10.0.0.0/8"], "outbound_daemons": [], "authenticated_outbound": False}}
    ).milter
    assert mine.trusted == (ipaddress.ip_network("10.0.0.0/8"),) and mine.outbound_daemons == ()
    assert not mine.authenticated_outbound


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"listne": "127.0.0.1:1"}, "unknown key"),
        ({"listen": "127.0.0.1:1", "socket_mode": "0660"}, "applies to a unix:/PATH listen address only"),
        ({"trusted": ["not a network"]}, "is not a network in CIDR form"),
        ({"authenticated_outbound": "yes"}, "authenticated_outbound"),
    ],
)
def test_the_milter_table_is_strict(table: dict[str, Any], message: str) -> None:
    from gateway.core.errors import ConfigError
    from gateway.ops import config as gateway_config

    with pytest.raises(ConfigError, match=message) as caught:
        gateway_config.parse({"milter": table}, "gw.toml")
    assert "gw.toml" in str(caught.value) and "milter" in str(caught.value)


def test_the_benchmark_runs_tiny_and_loses_nothing(tmp_path: Path) -> None:
    """bench/milter.py --smoke: the harness works, every message arrives, exactly the milter's are signed.
    Speed is not asserted."""
    report = tmp_path / "smoke.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "milter.py"), "--smoke", "--json", str(report)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(report.read_text())
    assert data["problems"] == [] and data["ratio"] > 0


def test_an_outbound_null_sender_is_left_alone_and_logged_as_such(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.milter"):
        assert outbound_eom("", ["friend@remote.test"]) == [(b"c", b"")]
    (record,) = [r for r in caplog.records if r.name == "gateway.milter"]
    assert getattr(record, FIELDS_ATTR)["reason"] == "null-sender"


def test_quit_closes_the_connection_from_our_side() -> None:
    async def body(mta: MtaSide) -> bytes:
        await mta.negotiate()
        await mta.send(b"Q")
        return await asyncio.wait_for(mta.reader.read(), 5)

    assert run(serving(body)) == b""


def test_headers_kept_for_the_hook_are_bounded() -> None:
    hook = Hook()

    async def body(mta: MtaSide) -> list[tuple[bytes, bytes]]:
        await mta.negotiate(ALL_STEPS)  # NR_CONN, NR_MAIL, NR_HDR: none of these is answered
        await mta.send(b"C", b"client\0" + b"4" + struct.pack(">H", 1) + strings("127.0.0.1"))
        await mta.send(b"M", strings("<user@example.org>"))
        assert await mta.rcpt("other@example.org") == (b"c", b"")
        for n in range(MAX_HEADERS + 5):
            await mta.send(b"L", strings(f"X-N{n}", "v"))
        await mta.send(b"E")
        return await mta.until_final()

    assert run(serving(body, hook=hook)) == [(b"c", b"")]
    assert len(hook.seen[0].headers) == MAX_HEADERS and hook.seen[0].headers[-1][0] == f"X-N{MAX_HEADERS - 1}"


class BrokenHook(Hook):
    async def end_of_message(self, message: FinishedMessage) -> Reply | None:
        raise RuntimeError("a bug in the hook")


def test_a_failure_of_ours_costs_one_connection_not_the_service(caplog: pytest.LogCaptureFixture) -> None:
    async def body(mta: MtaSide) -> tuple[bytes, tuple[str, ...]]:
        await mta.negotiate()
        await mta.connect("127.0.0.1")
        await mta.mail("user@example.org")
        await mta.rcpt("other@example.org")
        await mta.send(b"E")
        closed = await asyncio.wait_for(mta.reader.read(), 5)
        # The service still answers a new connection.
        reader, writer = await asyncio.open_connection(*mta.writer.get_extra_info("peername"))
        second = MtaSide(reader, writer)
        try:
            version, _, _ = await second.negotiate()
        finally:
            await second.close()
        return closed, (str(version),)

    with caplog.at_level(logging.ERROR, logger="gateway.milter"):
        assert run(serving(body, hook=BrokenHook())) == (b"", ("6",))
    assert "milter session failed; connection closed" in caplog.text


def test_every_decision_line_names_the_queue_id_client_role_and_sender(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.milter"):
        outbound_eom("user@example.org", ["friend@remote.test"])
    lines = [getattr(r, FIELDS_ATTR) for r in caplog.records if r.name == "gateway.milter"]
    assert lines, "no decision line"
    for fields in lines:
        assert fields["event"] == "decision"
        assert {"queue_id", "client", "role", "sender", "verdict", "reason"} <= set(fields)
        assert (fields["client"], fields["role"], fields["sender"]) == (
            "127.0.0.1",
            "outbound",
            "user@example.org",
        )
