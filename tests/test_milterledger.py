"""The Message-ID ledger at the milter's end of message (gateway/postfix/milterledger.py): a real
MilterService over a socket with the hook and a real SQLite store, driven by the hand-written MTA side of
test_milterd."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from test_milterd import MtaSide, strings
from test_socketmap import ALIAS

from gateway.core import replies
from gateway.edge.relay import PolicyHolder
from gateway.ops import keystore
from gateway.ops.ledgerstore import SqliteLedgerStore
from gateway.policy import ledger
from gateway.policy.ledger import LedgerKeys
from gateway.policy.messageids import SCAN_LIMIT
from gateway.policy.policy import Policy, PolicySettings
from gateway.postfix.milterd import MilterService, MilterSettings
from gateway.postfix.milterledger import LedgerHook, wire_stream

KEYRING = keystore.new_keyring(datetime.now(UTC), ledger=True).keyring
assert KEYRING.ledger_secret is not None
KEYS = LedgerKeys(KEYRING.ledger_secret)
SETTINGS = PolicySettings(
    local_domains=frozenset({"example.org"}),
    signed_domains=frozenset({"example.org"}),
    srs_alias=ALIAS,
    bounce_grace=False,
)
SENT = "<sent-1@mail.example.org>"

Exchange = Callable[[MtaSide], Coroutine[Any, Any, Any]]


async def with_hook(
    path: Path, body: Exchange, max_replies: int = ledger.MAX_REPLIES, close_store_first: bool = False
) -> Any:
    store = await SqliteLedgerStore.open(path / "ledger.sqlite")
    holder = PolicyHolder(Policy(SETTINGS, KEYRING))
    hook = LedgerHook(holder, store, max_replies=max_replies)
    service = MilterService(holder, MilterSettings(), hook)
    server = await asyncio.start_server(service.handle, "127.0.0.1", 0)
    try:
        if close_store_first:
            await store.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        mta = MtaSide(reader, writer)
        try:
            got = await body(mta)
        finally:
            await mta.close()
        await hook.records_written()
        return got
    finally:
        server.close()
        await service.close_connections()
        await server.wait_closed()
        await store.close()


async def message(
    mta: MtaSide, headers: list[tuple[str, str]], body: bytes = b""
) -> list[tuple[bytes, bytes]]:
    for name, value in headers:
        assert await mta.ask(b"L", strings(name, value)) == (b"c", b"")
    assert await mta.ask(b"N") == (b"c", b"")
    for start in range(0, len(body), 65535):  # a body chunk is at most 64 KiB in the milter protocol
        assert await mta.ask(b"B", body[start : start + 65535]) == (b"c", b"")  # no SMFIP_NR_BODY offered
    await mta.send(b"E")
    return await mta.until_final()


def outbound(mid: str = SENT, sender: str = "user@example.org") -> Exchange:
    async def body(mta: MtaSide) -> list[tuple[bytes, bytes]]:
        await mta.negotiate()
        await mta.connect("127.0.0.1")
        await mta.mail(sender)
        assert await mta.rcpt("friend@remote.test") == (b"c", b"")
        headers = [("Message-ID", mid), ("From", "Other <from@example.org>"), ("Reply-To", "rt@example.org")]
        return await message(mta, headers)

    return body


def auto_reply(
    headers: list[tuple[str, str]], body: bytes = b"out of office\r\n", rcpt: str = "rt@example.org"
) -> Exchange:
    async def exchange(mta: MtaSide) -> tuple[tuple[bytes, bytes], list[tuple[bytes, bytes]]]:
        _, _, steps = await mta.negotiate()
        assert not steps & 0x10  # SMFIP_NOBODY: the body was asked for
        await mta.connect("192.0.2.1")
        await mta.mail("")
        held = await mta.rcpt(rcpt)
        return held, await message(mta, [("Auto-Submitted", "auto-replied"), *headers], body)

    return exchange


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


async def recorded(path: Path) -> None:
    await with_hook(path, outbound())


def reply_of(eom: list[tuple[bytes, bytes]]) -> str:
    ((command, data),) = eom
    assert command in (b"y", b"c"), eom
    return data.rstrip(b"\0").decode()


# ------------------------------------------------------------------------------------------ outbound


def test_an_outbound_message_is_recorded_with_its_sender_before_signing_and_its_header_addresses(
    tmp_path: Path,
) -> None:
    async def go() -> tuple[list[tuple[bytes, bytes]], dict[bytes, ledger.LedgerEntry]]:
        eom = await with_hook(tmp_path, outbound())
        store = await SqliteLedgerStore.open(tmp_path / "ledger.sqlite")
        try:
            return eom, dict(await store.lookup([KEYS.message_key(SENT)]))
        finally:
            await store.close()

    eom, found = run(go())
    assert [c for c, _ in eom] == [b"e", b"c"]  # signed as before
    entry = found[KEYS.message_key(SENT)]
    wanted = {KEYS.address_key(a) for a in ("user@example.org", "from@example.org", "rt@example.org")}
    assert entry.record.addresses == wanted and entry.replies == 0
    assert entry.record.expires > time.time() + (ledger.LEDGER_DAYS - 1) * 86400


# ------------------------------------------------------------------------------------------ inbound


def test_an_auto_reply_to_a_ledgered_message_passes_at_end_of_message(tmp_path: Path) -> None:
    async def go() -> Any:
        await recorded(tmp_path)
        return await with_hook(tmp_path, auto_reply([("In-Reply-To", "<sent-1@MAIL.Example.ORG>")]))

    held, eom = run(go())
    assert held == (b"c", b"")  # deferred, not refused, at RCPT
    assert eom == [(b"c", b"")]


def test_a_reference_in_the_body_vouches_too_so_the_body_is_read(tmp_path: Path) -> None:
    mdn = (
        b"--b\r\nContent-Type: text/plain\r\n\r\nread\r\n"
        b"--b\r\nContent-Type: message/disposition-notification\r\n\r\n"
        b"Final-Recipient: rfc822;friend@remote.test\r\n"
        b"Original-Message-ID: "
        + SENT.encode()
        + b"\r\nDisposition: manual-action/MDN-sent-manually; displayed\r\n"
        b"\r\n--b--\r\n"
    )
    ctype = 'multipart/report; report-type=disposition-notification; boundary="b"'

    async def go() -> Any:
        await recorded(tmp_path)
        return await with_hook(tmp_path, auto_reply([("Content-Type", ctype)], mdn))

    _, eom = run(go())
    assert eom == [(b"c", b"")]


@pytest.mark.parametrize(
    ("headers", "rcpt", "why"),
    [
        ([("In-Reply-To", "<never-sent@mail.example.org>")], "rt@example.org", "unknown-message-id"),
        ([], "rt@example.org", "no-reference"),
        ([("References", SENT)], "someone@example.org", "recipient-not-recorded"),
    ],
)
def test_an_auto_reply_the_ledger_cannot_vouch_for_is_refused_at_end_of_message(
    tmp_path: Path, headers: list[tuple[str, str]], rcpt: str, why: str
) -> None:
    async def go() -> Any:
        await recorded(tmp_path)
        return await with_hook(tmp_path, auto_reply(headers, rcpt=rcpt))

    held, eom = run(go())
    assert held == (b"c", b"")
    reason = ledger.LedgerReason(why)
    assert reply_of(eom) == str(ledger.refused_reply(rcpt, reason, ledger.LEDGER_DAYS, ledger.MAX_REPLIES))
    assert eom[0][0] == b"y"


def test_a_ledgered_message_vouches_for_max_replies_answers_only(tmp_path: Path) -> None:
    async def go() -> list[Any]:
        await recorded(tmp_path)
        got = []
        for _ in range(2):
            _, eom = await with_hook(tmp_path, auto_reply([("In-Reply-To", SENT)]), max_replies=1)
            got.append(eom)
        return got

    first, second = run(go())
    assert first == [(b"c", b"")]
    cap = ledger.refused_reply("rt@example.org", ledger.LedgerReason.REPLAY_CAP, ledger.LEDGER_DAYS, 1)
    assert reply_of(second) == str(cap)


def test_a_message_with_no_reference_within_the_scan_bound_is_too_big(tmp_path: Path) -> None:
    _, eom = run(with_hook(tmp_path, auto_reply([], b"x" * 76 + b"\r\n" + b"y" * SCAN_LIMIT)))
    assert reply_of(eom) == str(replies.ledger_too_big("rt@example.org", SCAN_LIMIT))
    assert eom[0][0] == b"y" and reply_of(eom).startswith("552 5.3.4 ")


def test_the_store_away_is_451_never_a_refusal(tmp_path: Path) -> None:
    held, eom = run(with_hook(tmp_path, auto_reply([("In-Reply-To", SENT)]), close_store_first=True))
    assert held == (b"c", b"")
    assert eom == [(b"y", str(replies.ledger_unavailable("rt@example.org")).encode() + b"\0")]


def test_a_forged_tag_is_not_held_but_refused_at_rcpt(tmp_path: Path) -> None:
    """The ledger vouches for untagged addresses only: a forged tag is refused at RCPT as without it."""

    async def body(mta: MtaSide) -> tuple[bytes, bytes]:
        await mta.negotiate()
        await mta.connect("192.0.2.1")
        await mta.mail("")
        return await mta.rcpt("prvs=0000000000=user@example.org")

    command, data = run(with_hook(tmp_path, body))
    assert command == b"y" and data.startswith(b"550 5.7.1 <prvs=0000000000=user@example.org>: bounce")


def test_the_stream_given_to_the_feeders_is_dot_stuffed_and_bounded() -> None:
    stream = wire_stream((("Subject", "a"), ("X-Folded", "one\n\ttwo")), b".\r\n.hidden\r\nbody\r\n", 1000)
    assert stream == b"Subject: a\r\nX-Folded: one\n\ttwo\r\n\r\n..\r\n..hidden\r\nbody\r\n"
    assert len(wire_stream((("S", "a"),), b"z" * 100, 10)) == 10


# ------------------------------------------------------------------------------------------ at start


def ledger_config(tmp_path: Path, **tables: dict[str, Any]) -> Any:
    from gateway.ops import config

    return config.parse({"gateway": {"keyring": str(tmp_path / "keyring.toml")}, **tables})


def test_the_ledger_is_off_when_disabled_or_without_a_secret_and_one_line_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.ops.state import open_ledger

    with caplog.at_level(logging.INFO, logger="gateway.state"):
        assert run(open_ledger(ledger_config(tmp_path, ledger={"enabled": False}), True)) is None
        assert run(open_ledger(ledger_config(tmp_path), False)) is None
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("ledger off ([ledger] enabled = false)")
    assert lines[1].startswith("ledger off: the keyring ") and "no ledger secret" in lines[1]
    assert not (tmp_path / "ledger.sqlite").exists()


def test_the_ledger_on_sqlite_is_opened_at_its_path_and_closed_with_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.ops.state import open_ledger

    async def go() -> None:
        opened = await open_ledger(ledger_config(tmp_path), True)
        assert opened is not None and opened.where == str(tmp_path / "ledger.sqlite")
        assert await opened.store.lookup([KEYS.message_key(SENT)]) == {}
        await opened.close()
        with pytest.raises(ledger.StoreUnavailable):
            await opened.store.lookup([KEYS.message_key(SENT)])

    with caplog.at_level(logging.INFO, logger="gateway.state"):
        run(go())
    assert caplog.records[-1].getMessage() == (
        f"ledger on: {tmp_path / 'ledger.sqlite'}, answers accepted for 30 days, 20 per message"
    )


def test_the_ledger_on_redis_is_the_fleet_s_store(tmp_path: Path) -> None:
    """The [state] stores' own when the front end made them (and left to it to close), else made here."""
    from gateway.ops.state import make_stores, open_ledger

    cfg = ledger_config(tmp_path, state={"backend": "redis", "url": "redis://127.0.0.1:1/0"})

    async def go() -> None:
        stores = await make_stores(cfg)
        try:
            shared = await open_ledger(cfg, True, stores)
            assert shared is not None and shared.store is stores.ledger and shared.where == "redis ([state])"
            await shared.close()  # not its to close
            own = await open_ledger(cfg, True)
            assert own is not None and own.store is not stores.ledger and own.where == "redis ([state])"
            await own.close()
        finally:
            await stores.close()

    run(go())
