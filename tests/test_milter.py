"""The milter codec (gateway/postfix/milter.py), byte by byte: every message we accept, split at every
boundary, oversize and garbage, option negotiation, and every reply's bytes.

The packets here are built by hand from the protocol's description (a 4-octet length, a command octet,
the data), not with the codec, so a mistake in the codec cannot hide behind the same mistake here."""

from __future__ import annotations

import struct

import pytest

from gateway.core import replies
from gateway.core.replies import Reply
from gateway.postfix import milter
from gateway.postfix.milter import Act, Step


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + command + data


ALL_ACTIONS = 0x1FF
ALL_STEPS = 0x1FFFFF

# Every message type, as Postfix sends it, and what it decodes to.
CASES: list[tuple[bytes, milter.Message]] = [
    (
        packet(b"O", struct.pack(">III", 6, ALL_ACTIONS, ALL_STEPS)),
        milter.OptNeg(6, Act(ALL_ACTIONS), Step(ALL_STEPS)),
    ),
    (
        packet(b"D", b"C" + b"j\0mx.example.org\0{daemon_name}\0ORIGINATING\0"),
        milter.Macro("C", (("j", "mx.example.org"), ("{daemon_name}", "ORIGINATING"))),
    ),
    (packet(b"D", b"T"), milter.Macro("T", ())),
    (
        packet(b"C", b"client.example.net\0" + b"4" + struct.pack(">H", 2525) + b"192.0.2.1\0"),
        milter.Connect("client.example.net", "4", 2525, "192.0.2.1"),
    ),
    (
        packet(b"C", b"[IPv6:2001:db8::1]\0" + b"6" + struct.pack(">H", 25) + b"2001:db8::1\0"),
        milter.Connect("[IPv6:2001:db8::1]", "6", 25, "2001:db8::1"),
    ),
    (packet(b"C", b"localhost\0U"), milter.Connect("localhost", "U", 0, "")),
    (packet(b"H", b"client.example.net\0"), milter.Helo("client.example.net")),
    (packet(b"M", b"<>\0"), milter.MailFrom("<>", ())),
    (
        packet(b"M", b"<user@example.org>\0SIZE=100\0BODY=8BITMIME\0"),
        milter.MailFrom("<user@example.org>", ("SIZE=100", "BODY=8BITMIME")),
    ),
    (
        packet(b"R", b"<prvs=1234abcdef=user@example.org>\0NOTIFY=NEVER\0"),
        milter.RcptTo("<prvs=1234abcdef=user@example.org>", ("NOTIFY=NEVER",)),
    ),
    (packet(b"T"), milter.Data()),
    (packet(b"L", b"Subject\0hello\0"), milter.Header("Subject", "hello")),
    (packet(b"L", b"X-Empty\0\0"), milter.Header("X-Empty", "")),
    (packet(b"N"), milter.EndOfHeaders()),
    (packet(b"B", b"line one\r\nline two\r\n"), milter.Body(b"line one\r\nline two\r\n")),
    (packet(b"E"), milter.EndOfMessage()),
    (packet(b"A"), milter.Abort()),
    (packet(b"U", b"XYZZY\0"), milter.Unknown("XYZZY")),
    (packet(b"K"), milter.QuitNewConnection()),
    (packet(b"Q"), milter.Quit()),
]
STREAM = b"".join(wire for wire, _ in CASES)
EXPECTED = [message for _, message in CASES]


def events(decoder: milter.MilterDecoder) -> list[milter.Event]:
    out: list[milter.Event] = []
    while (event := decoder.next_event()) is not milter.NEED_DATA:
        assert not isinstance(event, milter._NeedData)
        out.append(event)
        if isinstance(event, milter.ProtocolError):
            break
    return out


@pytest.mark.parametrize(("wire", "message"), CASES, ids=[type(m).__name__ for _, m in CASES])
def test_each_message_type_decodes(wire: bytes, message: milter.Message) -> None:
    decoder = milter.MilterDecoder()
    decoder.receive_data(wire)
    assert events(decoder) == [message]


def test_a_stream_split_at_every_boundary_gives_the_same_messages() -> None:
    for cut in range(len(STREAM) + 1):
        decoder = milter.MilterDecoder()
        decoder.receive_data(STREAM[:cut])
        got = events(decoder)
        decoder.receive_data(STREAM[cut:])
        got += events(decoder)
        assert got == EXPECTED, cut


def test_a_stream_fed_one_octet_at_a_time() -> None:
    decoder = milter.MilterDecoder()
    got: list[milter.Event] = []
    for octet in STREAM:
        decoder.receive_data(bytes([octet]))
        got += events(decoder)
    assert got == EXPECTED


def test_a_packet_of_the_largest_size_is_accepted() -> None:
    chunk = b"x" * milter.MAX_DATA
    decoder = milter.MilterDecoder()
    decoder.receive_data(packet(b"B", chunk))
    assert events(decoder) == [milter.Body(chunk)]


def test_an_oversize_length_is_refused_before_its_data_arrives() -> None:
    decoder = milter.MilterDecoder()
    decoder.receive_data(struct.pack(">I", milter.MAX_DATA + 2) + b"B")
    (error,) = events(decoder)
    assert isinstance(error, milter.ProtocolError) and "65537 octets" in error.reason
    # Whatever follows is not buffered, and the error stays.
    decoder.receive_data(b"x" * 100_000)
    assert decoder.next_event() == error and len(decoder._buf) == 0


def test_a_huge_length_is_refused() -> None:
    decoder = milter.MilterDecoder()
    decoder.receive_data(b"\xff\xff\xff\xff")
    (error,) = events(decoder)
    assert isinstance(error, milter.ProtocolError)


GARBAGE = [
    (packet(b"Z", b"anything"), "unknown command octet"),
    (struct.pack(">I", 0), "length 0"),
    (packet(b"O", struct.pack(">II", 6, 0)), "option negotiation: 8 octets"),
    (packet(b"H", b"no terminating nul"), "without its terminating NUL"),
    (packet(b"H", b"one\0two\0"), "one string expected"),
    (packet(b"C", b"host\0"), "no host name and family"),
    (packet(b"C", b"host\0X" + struct.pack(">H", 1) + b"a\0"), "unknown address family"),
    (packet(b"C", b"host\x004\x00"), "no port and address"),
    (packet(b"C", b"host\0U1.2.3.4\0"), "connect (family U)"),
    (packet(b"M", b"\0"), "an empty address"),
    (packet(b"L", b"Subject\0"), "a name and a value"),
    (packet(b"D"), "macro: no command octet"),
    (packet(b"D", b"Mi\0"), "a name without a value"),
    (packet(b"T", b"x"), "data: carries 1 octets"),
    (packet(b"A", b"x"), "abort: carries"),
    (packet(b"Q", b"x"), "quit: carries"),
]


@pytest.mark.parametrize(("wire", "reason"), GARBAGE, ids=[r for _, r in GARBAGE])
def test_garbage_is_an_error_event_and_the_codec_stays_stopped(wire: bytes, reason: str) -> None:
    decoder = milter.MilterDecoder()
    decoder.receive_data(wire + packet(b"A"))
    (error,) = events(decoder)
    assert isinstance(error, milter.ProtocolError) and reason in error.reason, error
    decoder.receive_data(packet(b"A"))
    assert decoder.next_event() == error


def test_non_utf8_addresses_decode_and_encode_back_unchanged() -> None:
    decoder = milter.MilterDecoder()
    decoder.receive_data(packet(b"R", b"<\xff\xfe@example.org>\0"))
    (rcpt,) = events(decoder)
    assert isinstance(rcpt, milter.RcptTo)
    assert milter.encode(milter.DelRcpt(rcpt.address)) == packet(b"-", b"<\xff\xfe@example.org>\0")


# ------------------------------------------------------------------------------------------ negotiation

POSTFIX_OFFER = milter.OptNeg(6, Act(ALL_ACTIONS), Step(ALL_STEPS))


def test_negotiation_takes_only_the_actions_and_steps_we_use() -> None:
    done = milter.negotiate(POSTFIX_OFFER)
    assert isinstance(done, milter.Negotiated)
    assert done.actions == Act.CHGFROM | Act.ADDRCPT | Act.DELRCPT | Act.ADDRCPT_PAR
    off = Step.NOHELO | Step.NODATA | Step.NOUNKNOWN | Step.NOBODY | Step.NOHDRS | Step.NOEOH
    no_reply = Step.NR_CONN | Step.NR_MAIL | Step.NR_HDR | Step.NR_EOH
    assert done.steps == off | no_reply
    assert milter.encode(done.reply) == packet(b"O", struct.pack(">III", 6, 0xCC, int(off | no_reply)))


def test_negotiation_asks_for_the_headers_when_the_hook_wants_them() -> None:
    done = milter.negotiate(POSTFIX_OFFER, headers=True)
    assert isinstance(done, milter.Negotiated)
    assert not done.steps & (Step.NOHDRS | Step.NOEOH) and done.steps & Step.NR_HDR


def test_negotiation_asks_for_the_body_unanswered_when_the_hook_wants_it() -> None:
    done = milter.negotiate(POSTFIX_OFFER, headers=True, body=True)
    assert isinstance(done, milter.Negotiated)
    assert not done.steps & Step.NOBODY and done.steps & Step.NR_BODY
    assert not done.expects_reply(milter.Body(b"x"))


def test_negotiation_asks_only_for_what_is_offered() -> None:
    offer = milter.OptNeg(6, Act(0x4C), Step.NOHELO | Step.NOBODY)  # an MTA without ADDRCPT_PAR or NR_*
    done = milter.negotiate(offer)
    assert isinstance(done, milter.Negotiated)
    assert done.actions == Act.CHGFROM | Act.ADDRCPT | Act.DELRCPT
    assert done.steps == Step.NOHELO | Step.NOBODY
    assert done.expects_reply(milter.Connect("h", "4", 1, "192.0.2.1"))
    assert done.expects_reply(milter.MailFrom("<>", ()))


def test_expects_reply_follows_the_negotiated_no_reply_steps() -> None:
    done = milter.negotiate(POSTFIX_OFFER, headers=True)
    assert isinstance(done, milter.Negotiated)
    assert not done.expects_reply(milter.Connect("h", "4", 1, "192.0.2.1"))
    assert not done.expects_reply(milter.MailFrom("<>", ()))
    assert not done.expects_reply(milter.Header("Subject", "x"))
    assert not done.expects_reply(milter.Macro("C", ()))
    assert not done.expects_reply(milter.Abort())
    assert done.expects_reply(milter.RcptTo("<a@b>", ()))
    assert done.expects_reply(milter.EndOfMessage())


@pytest.mark.parametrize(
    ("offer", "reason"),
    [
        (milter.OptNeg(2, Act(ALL_ACTIONS), Step(ALL_STEPS)), "protocol 2, not 6"),
        (milter.OptNeg(6, Act(0x0F), Step(ALL_STEPS)), "does not offer SMFIF_CHGFROM"),
        (milter.OptNeg(6, Act(0x40), Step(ALL_STEPS)), "SMFIF_ADDRCPT, SMFIF_DELRCPT"),
    ],
)
def test_negotiation_refuses_an_mta_that_cannot_do_our_job(offer: milter.OptNeg, reason: str) -> None:
    done = milter.negotiate(offer)
    assert isinstance(done, milter.ProtocolError) and reason in done.reason


# ------------------------------------------------------------------------------------------ replies


@pytest.mark.parametrize(
    ("response", "wire"),
    [
        (milter.Continue(), packet(b"c")),
        (milter.Accept(), packet(b"a")),
        (milter.Progress(), packet(b"p")),
        (
            milter.Reject(replies.bounce_refused("u@example.org", "unsigned")),
            packet(b"y", b"550 5.7.1 <u@example.org>: bounce to an address we never signed (unsigned)\0"),
        ),
        (
            milter.TempFail(Reply(451, "4.3.5", "Signing keys unavailable, try again later")),
            packet(b"y", b"451 4.3.5 Signing keys unavailable, try again later\0"),
        ),
        (milter.Reject(Reply(550, "5.7.1", "100% sure")), packet(b"y", b"550 5.7.1 100%% sure\0")),
        (milter.ChangeFrom("prvs=1x@example.org"), packet(b"e", b"<prvs=1x@example.org>\0")),
        (
            milter.ChangeFrom("prvs=1x@example.org", ("SIZE=100", "BODY=8BITMIME")),
            packet(b"e", b"<prvs=1x@example.org>\0SIZE=100 BODY=8BITMIME\0"),
        ),
        (milter.ChangeFrom(""), packet(b"e", b"<>\0")),
        (milter.AddRcpt("user@example.org"), packet(b"+", b"<user@example.org>\0")),
        (
            milter.AddRcpt("user@example.org", ("NOTIFY=NEVER",)),
            packet(b"2", b"<user@example.org>\0NOTIFY=NEVER\0"),
        ),
        (milter.DelRcpt("<prvs=1x@example.org>"), packet(b"-", b"<prvs=1x@example.org>\0")),
    ],
)
def test_each_reply_encodes(response: milter.Response, wire: bytes) -> None:
    assert milter.encode(response) == wire


def test_a_reject_needs_a_permanent_reply_and_a_tempfail_a_transient_one() -> None:
    with pytest.raises(ValueError, match="5xx"):
        milter.Reject(Reply(451, "4.3.0", "later"))
    with pytest.raises(ValueError, match="4xx"):
        milter.TempFail(Reply(550, "5.7.1", "no"))


def test_a_reply_that_cannot_go_on_the_wire_is_refused_not_sent() -> None:
    with pytest.raises(milter.EncodeError, match="line break"):
        milter.encode(milter.Reject(Reply(550, "5.7.1", "two\r\nlines")))
    with pytest.raises(milter.EncodeError, match="NUL"):
        milter.encode(milter.AddRcpt("a\0b@example.org"))
    with pytest.raises(milter.EncodeError, match="over the 65535"):
        milter.encode(milter.AddRcpt("a" * 70000 + "@example.org"))
