"""ledger: keys, records, the decision table, the replay cap, expiry (injected clock), and no clear text."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from gateway.ops.ledgerstore import SqliteLedgerStore
from gateway.policy import ledger
from gateway.policy.ledger import (
    LedgerAction,
    LedgerEntry,
    LedgerKeys,
    LedgerReason,
    LedgerRecord,
    LedgerVerdict,
    RecordOutcome,
    StoreUnavailable,
    charged,
    check,
    decide,
    lookup_keys,
    make_record,
)
from gateway.policy.messageids import (
    FoundReferences,
    HeaderStatus,
    InboundReferences,
    MessageKind,
    OutboundHeaders,
    Reference,
    ReferenceSource,
    SentHeaders,
)
from tests.smtp_peers import run

SECRET = bytes(range(32))
KEYS = LedgerKeys(SECRET)
NOW = 1_796_450_000
MSGID = "<20261205.Secret-Id-7f3a@mta.signed.example>"
SENT = SentHeaders(
    HeaderStatus.OK, MSGID, ("bob@signed.example",), ("team@signed.example",), ("receipts@signed.example",)
)
RECIPIENT = "team@signed.example"


def found(*message_ids: str, exceeded: bool = False) -> FoundReferences:
    refs = tuple(Reference(m, ReferenceSource.IN_REPLY_TO) for m in message_ids)
    return FoundReferences(refs, MessageKind.AUTO_REPLY, exceeded)


def recorded(replies: int = 0, expires: int = NOW + 86400) -> dict[bytes, LedgerEntry]:
    rec = make_record(KEYS, SENT, "bob@signed.example", NOW)
    assert rec.key is not None and rec.record is not None
    return {rec.key: LedgerEntry(LedgerRecord(rec.record.addresses, expires), replies)}


# --- keys and records -----------------------------------------------------------------------------------


def test_keys_are_keyed_hashes_never_the_clear_text() -> None:
    key = KEYS.message_key(MSGID)
    assert len(key) == 32 and MSGID.encode() not in key and key != MSGID.encode()
    assert key == LedgerKeys(SECRET).message_key(MSGID)  # stable across processes and restarts
    assert key != LedgerKeys(bytes(32)).message_key(MSGID)  # and depends on the secret
    address = KEYS.address_key("Team@Signed.Example")
    assert address == KEYS.address_key("team@signed.example") and address is not None and len(address) == 16
    # The labels keep a Message-ID and an address from sharing a key.
    assert KEYS.message_key("a@b")[:16] != KEYS.address_key("a@b")
    assert KEYS.address_key("no-at-sign") is None


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 octets") as caught:
        LedgerKeys(b"k" * 15)
    assert "kkk" not in str(caught.value)


def test_make_record_covers_the_envelope_sender_and_the_header_addresses() -> None:
    rec = make_record(KEYS, SENT, "bob.envelope@signed.example", NOW, days=30)
    assert rec.outcome is RecordOutcome.RECORDED and rec.record is not None
    assert rec.key == KEYS.message_key(MSGID)
    assert rec.ttl == 30 * 86400 and rec.record.expires == NOW + 30 * 86400
    wanted = {"bob.envelope@signed.example", *SENT.addresses}
    assert rec.record.addresses == {KEYS.address_key(a) for a in wanted}


def test_make_record_keys_each_address_once_as_address_key_does() -> None:
    # The envelope sender is most often the From, in another case: one address, keyed as address_key.
    sent = SentHeaders(HeaderStatus.OK, "<m@x>", ("bob@signed.example",), (), ())
    rec = make_record(KEYS, sent, "Bob@Signed.Example", NOW)
    assert rec.record is not None and rec.record.addresses == {KEYS.address_key("bob@signed.example")}
    assert KEYS.normal_address_key("bob@signed.example") == KEYS.address_key("BOB@signed.example")
    nobody = SentHeaders(HeaderStatus.OK, "<m@x>", (), (), ())
    assert make_record(KEYS, nobody, "no-at-sign", NOW).outcome is RecordOutcome.NO_ADDRESS


def test_make_record_counts_what_it_cannot_ledger() -> None:
    none = SentHeaders(HeaderStatus.NO_MESSAGE_ID, None, ("a@x",), (), ())
    assert make_record(KEYS, none, "a@x", NOW).outcome is RecordOutcome.NO_MESSAGE_ID
    big = SentHeaders(HeaderStatus.HEADERS_TOO_BIG, None, (), (), ())
    assert make_record(KEYS, big, "a@x", NOW).outcome is RecordOutcome.HEADERS_TOO_BIG
    nobody = SentHeaders(HeaderStatus.OK, "<m@x>", (), (), ())
    assert make_record(KEYS, nobody, None, NOW).outcome is RecordOutcome.NO_ADDRESS
    assert make_record(KEYS, nobody, "a@x", NOW).outcome is RecordOutcome.RECORDED


def test_record_merge_is_a_union_with_the_later_expiry_and_bounded() -> None:
    a = LedgerRecord(frozenset({b"a" * 16}), NOW + 10)
    b = LedgerRecord(frozenset({b"b" * 16}), NOW + 5)
    assert a.merge(b) == LedgerRecord(frozenset({b"a" * 16, b"b" * 16}), NOW + 10)
    many = LedgerRecord(frozenset(bytes([n]) * 16 for n in range(100)), NOW)
    assert len(many.merge(a).addresses) == ledger.MAX_RECORD_ADDRESSES


# --- the decision table -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("references", "answers", "recipient", "action", "reason", "reply"),
    [
        (found(), {}, RECIPIENT, LedgerAction.REFUSE, LedgerReason.NO_REFERENCE, "550 5.7.1"),
        (found(exceeded=True), {}, RECIPIENT, LedgerAction.REFUSE, LedgerReason.TOO_BIG, "552 5.3.4"),
        (found(MSGID), None, RECIPIENT, LedgerAction.TEMPFAIL, LedgerReason.STORE_UNAVAILABLE, "451 4.3.0"),
        (found("<other@x>"), recorded(), RECIPIENT, LedgerAction.REFUSE, LedgerReason.UNKNOWN_MESSAGE_ID,
         "550 5.7.1"),
        (found(MSGID), recorded(expires=NOW), RECIPIENT, LedgerAction.REFUSE,
         LedgerReason.UNKNOWN_MESSAGE_ID, "550 5.7.1"),
        (found(MSGID), recorded(), "eve@signed.example", LedgerAction.REFUSE,
         LedgerReason.RECIPIENT_NOT_RECORDED, "550 5.7.1"),
        (found(MSGID), recorded(), "not an address", LedgerAction.REFUSE,
         LedgerReason.RECIPIENT_NOT_RECORDED, "550 5.7.1"),
        (found(MSGID), recorded(replies=20), RECIPIENT, LedgerAction.REFUSE, LedgerReason.REPLAY_CAP,
         "550 5.7.1"),
        (found(MSGID), recorded(replies=19), RECIPIENT, LedgerAction.PASS, LedgerReason.VOUCHED, None),
        (found(MSGID), recorded(), "TEAM@signed.example", LedgerAction.PASS, LedgerReason.VOUCHED, None),
        # Too big but a reference was found before the bound: decided on it.
        (found(MSGID, exceeded=True), recorded(), RECIPIENT, LedgerAction.PASS, LedgerReason.VOUCHED, None),
        # No reference needs no store: an outage does not turn a plain refusal into a tempfail.
        (found(), None, RECIPIENT, LedgerAction.REFUSE, LedgerReason.NO_REFERENCE, "550 5.7.1"),
    ],
)  # fmt: skip
def test_decision_table(
    references: FoundReferences,
    answers: Mapping[bytes, LedgerEntry] | None,
    recipient: str,
    action: LedgerAction,
    reason: LedgerReason,
    reply: str | None,
) -> None:
    verdict = decide(references, recipient, answers, KEYS, NOW, max_replies=20)
    assert (verdict.action, verdict.reason) == (action, reason)
    if reply is None:
        assert (
            verdict.reply is None and verdict.key == KEYS.message_key(MSGID) and verdict.message_id == MSGID
        )
    else:
        assert verdict.reply is not None and str(verdict.reply).startswith(reply)
        assert f"<{recipient}>" in verdict.reply.text
        assert MSGID not in verdict.reply.text  # the reply never names a Message-ID
        assert verdict.key is None


def test_refusal_texts_say_why() -> None:
    texts = {
        reason: str(decide(refs, RECIPIENT, answers, KEYS, NOW, max_replies=20, days=30).reply)
        for reason, refs, answers in [
            (LedgerReason.NO_REFERENCE, found(), {}),
            (LedgerReason.UNKNOWN_MESSAGE_ID, found("<o@x>"), {}),
            (LedgerReason.REPLAY_CAP, found(MSGID), recorded(replies=20)),
            (LedgerReason.TOO_BIG, found(exceeded=True), {}),
            (LedgerReason.STORE_UNAVAILABLE, found(MSGID), None),
        ]
    }
    assert texts[LedgerReason.NO_REFERENCE] == (
        "550 5.7.1 <team@signed.example>: bounce to an address we never signed "
        "(it refers to no message we sent)"
    )
    assert "in the last 30 days" in texts[LedgerReason.UNKNOWN_MESSAGE_ID]
    assert "answered 20 times already" in texts[LedgerReason.REPLAY_CAP]
    assert "within its first 256 KiB" in texts[LedgerReason.TOO_BIG]
    assert texts[LedgerReason.STORE_UNAVAILABLE] == (
        "451 4.3.0 <team@signed.example>: message ledger unavailable, try again later"
    )


def test_a_later_reference_vouches_when_the_nearest_is_at_its_cap() -> None:
    other = make_record(KEYS, SentHeaders(HeaderStatus.OK, "<older@x>", (RECIPIENT,), (), ()), None, NOW)
    assert other.key is not None and other.record is not None
    answers = {**recorded(replies=20), other.key: LedgerEntry(other.record, 0)}
    verdict = decide(found(MSGID, "<older@x>"), RECIPIENT, answers, KEYS, NOW, max_replies=20)
    assert verdict.passes and verdict.message_id == "<older@x>" and verdict.key == other.key


@pytest.mark.parametrize(
    ("references", "answers", "reason"),
    [
        (found(), {}, LedgerReason.NO_REFERENCE),
        (found(exceeded=True), {}, LedgerReason.TOO_BIG),
        (found(MSGID), None, LedgerReason.STORE_UNAVAILABLE),
        (found(MSGID), {}, LedgerReason.UNKNOWN_MESSAGE_ID),
        (found(MSGID), recorded(replies=20), LedgerReason.REPLAY_CAP),
    ],
)
def test_observe_mode_passes_and_keeps_the_reason(
    references: FoundReferences, answers: Mapping[bytes, LedgerEntry] | None, reason: LedgerReason
) -> None:
    verdict = decide(references, RECIPIENT, answers, KEYS, NOW, max_replies=20, observe=True)
    enforced = decide(references, RECIPIENT, answers, KEYS, NOW, max_replies=20)
    assert enforced.action is not LedgerAction.PASS
    # The reply enforce mode would have given is kept for the would-reject count and the log line.
    expected = LedgerVerdict(LedgerAction.PASS, reason, None, observed=True, would_reject=enforced.reply)
    assert verdict == expected


def test_a_verdict_reply_must_match_its_action() -> None:
    with pytest.raises(ValueError, match="5xx"):
        LedgerVerdict(LedgerAction.REFUSE, LedgerReason.NO_REFERENCE, ledger.unavailable_reply(RECIPIENT))
    with pytest.raises(ValueError, match="4xx"):
        LedgerVerdict(
            LedgerAction.TEMPFAIL,
            LedgerReason.STORE_UNAVAILABLE,
            ledger.refused_reply(RECIPIENT, LedgerReason.NO_REFERENCE, 30, 20),
        )
    with pytest.raises(ValueError, match="no reply"):
        LedgerVerdict(LedgerAction.PASS, LedgerReason.VOUCHED, ledger.unavailable_reply(RECIPIENT))


def test_charged_refuses_what_another_worker_took_first() -> None:
    passed = decide(found(MSGID), RECIPIENT, recorded(replies=1), KEYS, NOW, max_replies=2)
    assert passed.passes
    assert charged(passed, 2, RECIPIENT, max_replies=2) is passed
    over = charged(passed, 3, RECIPIENT, max_replies=2)
    assert (over.action, over.reason) == (LedgerAction.REFUSE, LedgerReason.REPLAY_CAP)
    gone = charged(passed, 0, RECIPIENT, max_replies=2)  # expired or purged between lookup and take
    assert (gone.action, gone.reason) == (LedgerAction.REFUSE, LedgerReason.UNKNOWN_MESSAGE_ID)


# --- the whole check over the SQLite store -------------------------------------------------------------


def sent_message(message_id: str = MSGID) -> bytes:
    return (
        f"From: Bob <bob@signed.example>\r\nReply-To: team@signed.example\r\n"
        f"Message-ID: {message_id}\r\nSubject: hi\r\n\r\nbody\r\n"
    ).encode()


def answer(in_reply_to: str = MSGID) -> FoundReferences:
    scanner = InboundReferences()
    scanner.feed(f"From: a@example.org\r\nIn-Reply-To: {in_reply_to}\r\n\r\nI am away.\r\n".encode())
    return scanner.result()


async def ledger_sent(store: SqliteLedgerStore, now: int, message: bytes) -> None:
    reader = OutboundHeaders()
    reader.feed(message)
    rec = make_record(KEYS, reader.result(), "bob@signed.example", now, days=30)
    assert rec.key is not None and rec.record is not None
    await store.record(rec.key, rec.record, rec.ttl)


def test_check_passes_an_answer_then_caps_it_then_forgets_it(tmp_path: Path) -> None:
    clock = [float(NOW)]

    async def body() -> list[tuple[LedgerAction, LedgerReason]]:
        store = await SqliteLedgerStore.open(tmp_path / "ledger.sqlite", clock=lambda: clock[0])
        try:
            await ledger_sent(store, NOW, sent_message())
            out = []
            for _ in range(3):  # max_replies=2: the third is over the cap
                verdict = await check(store, answer(), RECIPIENT, KEYS, int(clock[0]), max_replies=2)
                out.append((verdict.action, verdict.reason))
            out.append(
                ((v := await check(store, answer(), "eve@signed.example", KEYS, NOW)).action, v.reason)
            )
            # 30 days later, to the second: forgotten, by the store (its clock) and by the decision.
            clock[0] = NOW + 30 * 86400
            await ledger_sent(store, NOW + 30 * 86400, sent_message("<another@x>"))  # purges lazily
            verdict = await check(store, answer(), RECIPIENT, KEYS, int(clock[0]), max_replies=2)
            out.append((verdict.action, verdict.reason))
            assert await store.lookup([KEYS.message_key(MSGID)]) == {}
            return out
        finally:
            await store.close()

    assert run(body()) == [
        (LedgerAction.PASS, LedgerReason.VOUCHED),
        (LedgerAction.PASS, LedgerReason.VOUCHED),
        (LedgerAction.REFUSE, LedgerReason.REPLAY_CAP),
        (LedgerAction.REFUSE, LedgerReason.RECIPIENT_NOT_RECORDED),
        (LedgerAction.REFUSE, LedgerReason.UNKNOWN_MESSAGE_ID),
    ]


class _DownStore:
    """A store that cannot answer: on lookup, or only when charging."""

    def __init__(self, lookup_works: bool) -> None:
        self.lookup_works = lookup_works

    async def record(self, key: bytes, record: LedgerRecord, ttl: int) -> None:
        raise StoreUnavailable("down")

    async def lookup(self, keys: Sequence[bytes]) -> Mapping[bytes, LedgerEntry]:
        if self.lookup_works:
            return recorded()
        raise StoreUnavailable("down")

    async def take_reply(self, key: bytes) -> int:
        raise StoreUnavailable("down")

    async def close(self) -> None:
        return None


@pytest.mark.parametrize("lookup_works", [False, True])
def test_check_store_outage_is_451_never_5xx(lookup_works: bool) -> None:
    verdict = run(check(_DownStore(lookup_works), answer(), RECIPIENT, KEYS, NOW))
    assert (verdict.action, verdict.reason) == (LedgerAction.TEMPFAIL, LedgerReason.STORE_UNAVAILABLE)
    assert verdict.reply is not None and (verdict.reply.code, verdict.reply.status) == (451, "4.3.0")
    observed = run(check(_DownStore(lookup_works), answer(), RECIPIENT, KEYS, NOW, observe=True))
    assert observed.passes and observed.observed


def test_check_asks_the_store_nothing_without_a_reference() -> None:
    no_refs = FoundReferences((), MessageKind.OTHER, False)
    assert lookup_keys(no_refs, KEYS) == ()
    verdict = run(check(_DownStore(False), no_refs, RECIPIENT, KEYS, NOW))
    assert verdict.reason is LedgerReason.NO_REFERENCE


def test_the_database_never_holds_a_message_id_or_an_address_in_clear(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    secrets = [MSGID, "Secret-Id-7f3a", "bob@signed.example", "team@signed.example", "signed.example"]

    def files() -> bytes:
        return b"".join(p.read_bytes() for p in sorted(tmp_path.iterdir()) if p.is_file())

    async def body() -> tuple[bytes, bytes]:
        store = await SqliteLedgerStore.open(path, clock=lambda: float(NOW))
        try:
            await ledger_sent(store, NOW, sent_message())
            await check(store, answer(), RECIPIENT, KEYS, NOW)
            while_open = files()  # the WAL holds the newest pages until a checkpoint
        finally:
            await store.close()
        return while_open, files()

    while_open, after = run(body())
    assert len(while_open) > 0 and len(after) > 0
    assert KEYS.message_key(MSGID) in while_open + after  # the record is there, under its key
    for text in secrets:
        for blob in (while_open, after):
            assert text.encode() not in blob and text.lower().encode() not in blob, text
