"""messageids: the outbound header reader and the inbound reference scanner, on crafted and real mail."""

from __future__ import annotations

import base64
from email import policy as email_policy
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy.messageids import (
    ADDRESS_FIELD_LIMIT,
    HEADER_LIMIT,
    MAX_ADDRESSES,
    MAX_REFERENCES,
    FoundReferences,
    HeaderStatus,
    InboundReferences,
    MessageKind,
    OutboundHeaders,
    ReferenceSource,
    SentHeaders,
    header_fields,
    message_ids_in,
    normalise_address,
    normalise_message_id,
)
from tests import generators
from tests.postfix_instance import become_subreaper, private_root, zombie_children
from tests.smtp_peers import run

SENT = (
    b"Received: from client.example.com (client.example.com [192.0.2.1])\r\n"
    b"\tby gw.signed.example; Sat, 5 Dec 2026 07:00:00 +0000\r\n"
    b"From: =?utf-8?q?B=C3=B6b_Example?= <Bob@Signed.Example> (the boss),\r\n"
    b" Carol <carol@signed.example>\r\n"
    b'Reply-To: Team: team@signed.example, "Help Desk" <help@signed.example>;\r\n'
    b"Disposition-Notification-To: =?iso-8859-1?q?R=E9ceipts?=\r\n"
    b"  <receipts@signed.example>\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: =?utf-8?q?hello?=\r\n"
    b"Message-ID: <\r\n 20261205.AbC-1@MTA.Signed.EXAMPLE>\r\n"
    b"\r\n"
    b"..a dot-stuffed body line\r\n"
    b"Message-ID: <not-this@body>\r\n"
)


def sent_headers(chunks: list[bytes], limit: int = HEADER_LIMIT) -> SentHeaders:
    reader = OutboundHeaders(limit)
    for chunk in chunks:
        reader.feed(chunk)
    return reader.result()


def references(chunks: list[bytes], limit: int = 256 * 1024) -> FoundReferences:
    scanner = InboundReferences(limit)
    for chunk in chunks:
        scanner.feed(chunk)
    return scanner.result()


# --- normal forms -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "normal"),
    [
        ("<abc@example.com>", "<abc@example.com>"),
        ("<AbC@Example.COM>", "<AbC@example.com>"),  # id-left keeps its case, id-right is lowercased
        ("  <abc@example.com>  (a comment)", "<abc@example.com>"),
        ("(comment <fake@x>) <real@x>", "<real@x>"),  # an id inside a comment is not one
        ("<\r\n abc@example.com>", "<abc@example.com>"),  # folded inside the brackets
        ("<a@b@C>", "<a@b@c>"),  # the last "@" splits it
        ("<no-at-sign>", "<no-at-sign>"),  # kept whole, case and all
        ("<NO-AT-SIGN>", "<NO-AT-SIGN>"),
        ("abc@example.com", None),  # no brackets: not a msg-id
        ("<>", None),
        ("<" + "a" * 999 + "@x>", None),  # over RFC 5322's line limit
        ("", None),
    ],
)
def test_normalise_message_id(value: str, normal: str | None) -> None:
    assert normalise_message_id(value) == normal


def test_message_ids_in_keeps_order_drops_repeats_and_is_bounded() -> None:
    assert message_ids_in("<a@X> <b@x>\r\n <a@x> <c@x>") == ("<a@x>", "<b@x>", "<c@x>")
    many = " ".join(f"<{n}@x>" for n in range(100))
    assert len(message_ids_in(many)) == MAX_REFERENCES


@pytest.mark.parametrize(
    ("spec", "normal"),
    [
        ("Bob@Signed.Example", "bob@signed.example"),
        ('"a b"@x.org', '"a b"@x.org'),
        ("no-domain", None),
        ("@x.org", None),
        ("a@", None),
        ("a\r\n@x", None),
    ],
)
def test_normalise_address(spec: str, normal: str | None) -> None:
    assert normalise_address(spec) == normal


# --- the outbound header reader ------------------------------------------------------------------------

EXPECTED_SENT = SentHeaders(
    HeaderStatus.OK,
    "<20261205.AbC-1@mta.signed.example>",
    ("bob@signed.example", "carol@signed.example"),
    ("team@signed.example", "help@signed.example"),
    ("receipts@signed.example",),
)


def test_outbound_reads_folded_encoded_grouped_headers() -> None:
    got = sent_headers([SENT])
    assert got == EXPECTED_SENT
    assert got.addresses == (
        "bob@signed.example",
        "carol@signed.example",
        "team@signed.example",
        "help@signed.example",
        "receipts@signed.example",
    )


def test_outbound_every_split_point_gives_the_same_result() -> None:
    for cut in range(len(SENT) + 1):
        assert sent_headers([SENT[:cut], SENT[cut:]]) == EXPECTED_SENT, cut
    assert sent_headers([SENT[i : i + 1] for i in range(len(SENT))]) == EXPECTED_SENT
    for cut in range(0, len(SENT), 7):  # three chunks
        assert sent_headers([SENT[:cut], SENT[cut : cut + 13], SENT[cut + 13 :]]) == EXPECTED_SENT, cut


@pytest.mark.parametrize(
    "message",
    [
        SENT,
        b"Message-ID: <m@x>\r\n..From: a@signed.example\r\nFrom: b@signed.example\r\n\r\nbody\r\n",
        b".From: a@signed.example\r\nMessage-ID: <m@x>\r\n\r\n",
        b"Message-ID: <m@x>\r\nFrom: a@signed.example\r\n.\r\nFrom: b@signed.example\r\n\r\n",
        b"Message-ID: <m@x>\rFrom: a@signed.example\r\n\r\nbody\r\n",  # a bare CR ends a line
        b"Message-ID: <m@x>\r\nX: y\r\r\nFrom: a@signed.example\r\n\r\n",  # ... and "\r\r\n" a block
        b"Message-ID: <m@x>\nFrom: a@signed.example\n\nFrom: b@signed.example\n",  # bare LF
        b"Message-ID: <m@x>\r\nFrom: a@signed.example\r\n\r\nFrom: b@signed.example\r\n",
        b"Message-ID: <m@x>\r\nFrom: a@signed.example\r\n" + b"X: " + b"y" * 40 + b"\r\n\r\n",
    ],
)
@pytest.mark.parametrize("limit", [HEADER_LIMIT, 64, 90, 91, 92])
def test_outbound_a_whole_header_block_in_one_chunk_reads_as_line_by_line(message: bytes, limit: int) -> None:
    # One chunk holding the header block is taken with a few scans (OutboundHeaders._whole_block); fed
    # an octet at a time it goes line by line. Both read the same, at and around the bound too.
    octets = sent_headers([message[i : i + 1] for i in range(len(message))], limit)
    assert sent_headers([message], limit) == octets


def test_outbound_stops_at_the_end_of_the_header_block() -> None:
    reader = OutboundHeaders()
    reader.feed(SENT)
    assert reader.done
    reader.feed(b"X-Late: yes\r\n" * 100_000)  # the body is neither read nor held
    assert reader.result() == EXPECTED_SENT
    # The body after the header block does not count against the bound.
    assert sent_headers([SENT + b"x" * 998 + b"\r\n"] * 3, limit=len(SENT)) == EXPECTED_SENT


def test_outbound_a_lone_dot_ends_the_message_and_a_doubled_dot_is_undone() -> None:
    headerless_end = b"From: a@signed.example\r\nMessage-ID: <m@x>\r\n.\r\nMAIL FROM:<x@y>\r\n"
    assert sent_headers([headerless_end]) == SentHeaders(
        HeaderStatus.OK, "<m@x>", ("a@signed.example",), (), ()
    )
    # No body at all, and the stream ends without CRLF: the header block is still read.
    assert sent_headers([b"Message-ID: <m@x>\r\nFrom: a@signed.example"]).from_ == ("a@signed.example",)


def test_outbound_without_message_id_is_not_ledgered() -> None:
    got = sent_headers([b"From: a@signed.example\r\nMessage-ID: no brackets@x\r\n\r\nbody\r\n"])
    assert got.status is HeaderStatus.NO_MESSAGE_ID and got.message_id is None


def test_outbound_header_block_over_the_bound_is_not_ledgered() -> None:
    big = b"X-Filler: " + b"y" * 900 + b"\r\n"
    block = b"Message-ID: <m@x>\r\nFrom: a@signed.example\r\n" + big * 80 + b"\r\nbody\r\n"
    got = sent_headers([block], limit=64 * 1024)
    assert got.status is HeaderStatus.HEADERS_TOO_BIG and got.message_id is None
    # One line longer than the bound, never ended: the held tail is bounded too.
    reader = OutboundHeaders(1024)
    for _ in range(100):
        reader.feed(b"z" * 100)
    assert reader.done and reader.result().status is HeaderStatus.HEADERS_TOO_BIG
    # Just under the bound is read.
    assert sent_headers([block[: block.index(b"\r\n\r\n") + 4]], limit=len(block)).message_id == "<m@x>"


def test_outbound_garbage_addresses_give_no_address() -> None:
    got = sent_headers(
        [
            b'Message-ID: <m@x>\r\nFrom: <<<@@@>>> ,,, "unterminated\r\n'
            b"Reply-To: =?bogus?x?zz?= @@ \x80\xff\r\nDisposition-Notification-To: ;;;:\r\n\r\n"
        ]
    )
    assert got.message_id == "<m@x>"
    assert all("\r" not in a and "@" in a for a in got.addresses)


def test_header_fields_unfolds_and_keeps_only_the_named_fields() -> None:
    block = b"From : a@x\r\nX-Other: b@y\r\n\tcontinued\r\nFROM: c@z\r\n (comment)\r\n folded\r\n"
    assert header_fields(block, ("from", "reply-to")) == {
        "from": [" a@x", " c@z (comment) folded"],
        "reply-to": [],
    }


def line_by_line_fields(block: bytes, names: tuple[str, ...]) -> dict[str, list[str]]:
    """header_fields as it was (a split on lines and a lookup per line): the oracle for the faster one."""
    wanted: dict[str, list[str]] = {name: [] for name in names}
    current: list[str] | None = None
    for line in block.decode("utf-8", "surrogateescape").split("\n"):
        line = line.removesuffix("\r")
        if line[:1] in (" ", "\t"):
            if current is not None:
                current[-1] += line
            continue
        name, colon, value = line.partition(":")
        values = wanted.get(name.rstrip(" \t").lower()) if colon else None
        if values is not None and len(values) < MAX_ADDRESSES:
            values.append(value)
            current = values
        else:
            current = None
    return wanted


FIELD_NAME = st.sampled_from(
    [
        "From",
        "FROM",
        "from",
        "Reply-To",
        "rEPLY-tO",
        "Message-ID",
        "Disposition-Notification-To",
        "To",
        "Received",
        "Fromage",
        "X-From",
        "\u017fubject",
        "Reply-To-Not",
        "Re\u017fent-From",
        "Di\u017fpo\u017fition-Notification-To",
    ]
)
HEADER_LINE = st.one_of(
    st.builds(
        lambda name, gap, value, end: f"{name}{gap}:{value}{end}",
        FIELD_NAME,
        st.sampled_from(["", " ", "\t", " \t "]),
        st.text(alphabet="ab@<>., \t\r\u00e9", max_size=12),
        st.sampled_from(["\r\n", "\n", "\r\r\n", ""]),
    ),
    st.builds(  # a continuation line, or a stray one
        lambda lead, value, end: f"{lead}{value}{end}",
        st.sampled_from([" ", "\t", "", ":"]),
        st.text(alphabet="cd@ \r", max_size=8),
        st.sampled_from(["\r\n", "\n", ""]),
    ),
)


@given(st.lists(HEADER_LINE, max_size=40), st.binary(max_size=3))
def test_header_fields_takes_what_a_line_by_line_reading_takes(lines: list[str], tail: bytes) -> None:
    block = "".join(lines).encode("utf-8") + tail
    names = ("message-id", "from", "reply-to", "disposition-notification-to")
    assert header_fields(block, names) == line_by_line_fields(block, names)


def test_header_fields_keeps_at_most_max_addresses_values_of_a_field() -> None:
    block = b"".join(b"From: a%d@x\r\n continued\r\n" % n for n in range(MAX_ADDRESSES + 3))
    got = header_fields(block, ("from",))["from"]
    assert got == [f" a{n}@x continued" for n in range(MAX_ADDRESSES)]


ATOM = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_+=?!#$%&'*/^`{|}~",
    min_size=1,
    max_size=12,
)
# RFC 5322 dot-atoms (no leading, trailing or doubled dot): on those the two parsers must agree. On
# malformed dots they differ (the fast path keeps the text as written), which costs at most a match.
DOT_ATOM = st.lists(ATOM, min_size=1, max_size=3).map(".".join)
QUOTED = st.text(alphabet=st.characters(codec="ascii", exclude_characters='"\\\r\n'), max_size=8)
WORD = ATOM | QUOTED.map(lambda text: f'"{text}"')


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(WORD, max_size=3), DOT_ATOM, DOT_ATOM, st.sampled_from(["", " ", "\t "])),
        min_size=1,
        max_size=4,
    )
)
def test_the_fast_path_agrees_with_the_stdlib_parser(shapes: list[tuple[list[str], str, str, str]]) -> None:
    pieces = []
    for words, local, domain, space in shapes:
        address = f"{local}@{domain}"
        pieces.append(f"{space}{' '.join(words)} <{address}>{space}" if words else f"{space}{address}{space}")
    value = ",".join(pieces)
    stdlib = email_policy.default.header_factory("To", value).addresses
    wanted = tuple(dict.fromkeys(a.lower() for a in (x.addr_spec for x in stdlib) if "@" in a))
    got = sent_headers([f"Message-ID: <m@x>\r\nFrom:{value}\r\n\r\n".encode()]).from_
    assert got == wanted[:16]


def test_hostile_address_fields_are_bounded() -> None:
    quoted = '"a, b" <q{n}@signed.example>'
    # Each quoted value goes to the stdlib; past its budget (1024 characters a block) they give nothing.
    values = "".join(f"Reply-To: {quoted.format(n=n)} {'(x)' * 60}\r\n" for n in range(8))
    got = sent_headers([f"Message-ID: <m@x>\r\n{values}\r\n".encode()])
    assert 0 < len(got.reply_to) < 8 and got.reply_to[0] == "q0@signed.example"
    # A simple list over the field limit gives nothing; under it, every address (at most 16).
    long_list = ",".join(f"u{n}@signed.example" for n in range(ADDRESS_FIELD_LIMIT // 10))
    assert sent_headers([f"Message-ID: <m@x>\r\nFrom: {long_list}\r\n\r\n".encode()]).from_ == ()
    short_list = ",".join(f"u{n}@signed.example" for n in range(20))
    assert len(sent_headers([f"Message-ID: <m@x>\r\nFrom: {short_list}\r\n\r\n".encode()]).from_) == 16
    for hostile in ("a " * 900 + "<", "(" * 2000, ",".join(["x@y"] * 500) + ",("):
        assert sent_headers([f"Message-ID: <m@x>\r\nFrom: {hostile}\r\n\r\n".encode()]).from_ == ()


# --- the inbound reference scanner --------------------------------------------------------------------

OURS = "<20261205.AbC-1@mta.signed.example>"

AUTO_REPLY = (
    b"From: alice@example.org\r\nTo: bob@signed.example\r\nAuto-Submitted: auto-replied\r\n"
    b"In-Reply-To: <20261205.AbC-1@MTA.signed.example>\r\n"
    b"References: <root@x> (a <comment@x>)\r\n <middle@x>\r\n\t<20261205.AbC-1@mta.signed.example>\r\n"
    b"\r\nI am away.\r\n"
)

MDN = (
    b"From: alice@example.org\r\nTo: receipts@signed.example\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/report; report-type=disposition-notification;\r\n boundary="b1"\r\n\r\n'
    b"--b1\r\nContent-Type: text/plain\r\n\r\nYour message was displayed.\r\n"
    b"--b1\r\nContent-Type: message/disposition-notification\r\n\r\n"
    b"Reporting-UA: mua.example.org; Example MUA\r\nFinal-Recipient: rfc822;alice@example.org\r\n"
    b"Original-Message-ID: <20261205.AbC-1@mta.signed.example>\r\n"
    b"Disposition: manual-action/MDN-sent-manually; displayed\r\n\r\n"
    b"--b1--\r\n"
)


def dsn(returned_type: bytes, returned: bytes, encoding: bytes = b"7bit") -> bytes:
    return (
        b"From: MAILER-DAEMON@mx.example.org\r\nTo: bob@signed.example\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b2"\r\n\r\n'
        b"--b2\r\nContent-Type: text/plain\r\n\r\nDelivery failed.\r\n"
        b"--b2\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mx.example.org\r\n\r\nFinal-Recipient: rfc822; x@example.org\r\n"
        b"Action: failed\r\nStatus: 5.1.1\r\n\r\n"
        b"--b2\r\nContent-Type: " + returned_type + b"\r\n"
        b"Content-Transfer-Encoding: " + encoding + b"\r\n\r\n" + returned + b"\r\n--b2--\r\n"
    )


RETURNED = b"From: bob@signed.example\r\nSubject: x\r\nMessage-ID: <20261205.AbC-1@mta.signed.example>\r\n"


def test_inbound_auto_reply_references_nearest_first() -> None:
    got = references([AUTO_REPLY])
    assert got.kind is MessageKind.AUTO_REPLY and not got.exceeded
    assert got.references[0].source is ReferenceSource.IN_REPLY_TO
    assert got.message_ids == (OURS, "<middle@x>", "<root@x>")  # the comment's id is no reference


def test_inbound_mdn_original_message_id() -> None:
    got = references([MDN])
    assert got.kind is MessageKind.MDN
    assert [(r.message_id, r.source) for r in got.references] == [(OURS, ReferenceSource.MDN_ORIGINAL)]


@pytest.mark.parametrize(
    ("returned_type", "body", "encoding"),
    [
        (b"text/rfc822-headers", RETURNED, b"7bit"),
        (b"message/rfc822", RETURNED + b"\r\nthe returned body\r\n", b"7bit"),
        (b"text/rfc822-headers", base64.encodebytes(RETURNED), b"base64"),
        (b"message/global-headers", RETURNED, b"8bit"),
    ],
)
def test_inbound_dsn_returned_headers(returned_type: bytes, body: bytes, encoding: bytes) -> None:
    got = references([dsn(returned_type, body, encoding)])
    assert got.kind is MessageKind.DSN
    assert [(r.message_id, r.source) for r in got.references] == [(OURS, ReferenceSource.DSN_RETURNED)]


def test_inbound_every_split_point_gives_the_same_result() -> None:
    for message in (AUTO_REPLY, MDN, dsn(b"text/rfc822-headers", RETURNED)):
        whole = references([message])
        assert whole.references
        for cut in range(len(message) + 1):
            assert references([message[:cut], message[cut:]]) == whole, cut
        assert references([message[i : i + 1] for i in range(len(message))]) == whole


def test_inbound_undoes_dot_stuffing_and_stops_at_the_lone_dot() -> None:
    message = (
        b"From: x@example.org\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        b"..X-Dotted: in the returned headers\r\nMessage-ID: <dot@x>\r\n\r\n--b--\r\n"
        b".\r\nIn-Reply-To: <after-the-end@x>\r\n"
    )
    assert references([message]).message_ids == ("<dot@x>",)


def test_inbound_over_the_bound_keeps_what_it_found_before() -> None:
    filler = b"X-Filler: " + b"y" * 500 + b"\r\n"
    early = b"In-Reply-To: <early@x>\r\n" + filler * 100 + b"\r\nbody\r\n"
    got = references([early], limit=8 * 1024)
    assert got.exceeded and got.message_ids == ("<early@x>",)
    late = filler * 100 + b"In-Reply-To: <late@x>\r\n\r\nbody\r\n"
    got = references([late], limit=8 * 1024)
    assert got.exceeded and got.message_ids == ()
    # A big DSN whose returned headers come early is read (RET=FULL of a large message).
    big = dsn(b"message/rfc822", RETURNED + b"\r\n" + (b"z" * 998 + b"\r\n") * 100)
    got = references([big], limit=16 * 1024)
    assert got.exceeded and got.message_ids == (OURS,)
    # Under the bound: not exceeded; what is held is the whole message, and never more than the bound.
    assert not references([late], limit=len(late)).exceeded
    scanner = InboundReferences(8 * 1024)
    scanner.feed(late)
    assert scanner.full and scanner.held <= 8 * 1024
    scanner = InboundReferences(len(late))
    scanner.feed(late)
    assert not scanner.full and scanner.held == len(late)


def test_inbound_plain_message_without_references() -> None:
    got = references([b"From: x@example.org\r\nSubject: hi\r\n\r\nhello\r\n"])
    assert got == FoundReferences((), MessageKind.OTHER, False)
    assert references([b"Auto-Submitted: no\r\n\r\n"]).kind is MessageKind.OTHER


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_garbage_never_raises(chunks: list[bytes]) -> None:
    sent_headers(chunks)
    references(chunks)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b"Content-Type: multipart/report; boundary=b\r\n",
                b"Content-Type: message/rfc822\r\n",
                b"Content-Type: message/disposition-notification\r\n",
                b"Content-Transfer-Encoding: base64\r\n",
                b"--b\r\n",
                b"--b--\r\n",
                b"\r\n",
                b"In-Reply-To: <a@b\r\n",
                b"References: ((((<x@y>\r\n",
                b"Message-ID: <m@x>\r\n",
                b"Original-Message-ID: <o@x>\r\n",
                b" folded\r\n",
                b"\x80\xff\xfe\r\n",
                b"From: =?utf-8?b?!!!?= <@>\r\n",
            ]
        ),
        max_size=40,
    )
)
def test_mime_shaped_garbage_never_raises(lines: list[bytes]) -> None:
    message = b"".join(lines)
    sent_headers([message])
    got = references([message])
    assert all(r.message_id.startswith("<") for r in got.references)


# --- real generators -----------------------------------------------------------------------------------

ORIGINAL = (
    b"Return-Path: <prvs=1234abcd=bob@signed.example>\n"
    b"From: Bob <bob@signed.example>\nReply-To: Team <team@signed.example>\n"
    b"To: alice@example.org\nSubject: hello\nDate: Sat, 05 Dec 2026 07:00:00 +0000\n"
    b"Message-ID: <20261205.AbC-1@mta.signed.example>\n\nHello Alice.\n"
)


def test_generators_are_installed() -> None:
    assert generators.available() == {"vacation": True, "sieve-test": True, "postfix": True}


def test_dovecot_sieve_vacation_reply_refers_to_our_message() -> None:
    become_subreaper()  # as the Postfix tests make us: an orphan the generator left would show as a zombie
    reply = generators.sieve_vacation(ORIGINAL, "prvs=1234abcd=bob@signed.example")
    assert zombie_children() == []
    # RFC 5230 §4.5: from <> to the envelope sender (here the tag).
    assert reply.sender == "" and reply.recipients == ("prvs=1234abcd=bob@signed.example",)
    got = references([generators.wire(reply.message)])
    assert got.kind is MessageKind.AUTO_REPLY
    assert got.references[0].message_id == OURS
    assert {r.source for r in got.references} == {ReferenceSource.IN_REPLY_TO}  # References repeats it


def test_classic_vacation_reply_refers_to_nothing() -> None:
    become_subreaper()  # vacation leaves its sendmail orphaned: the generator must reap it
    reply = generators.classic_vacation(ORIGINAL)
    assert zombie_children() == []
    # It answers the Return-Path (the tag, which prvs already lets through), and names no message.
    assert reply.sender == "" and reply.recipients == ("prvs=1234abcd=bob@signed.example",)
    got = references([generators.wire(reply.message)])
    assert got.references == () and got.kind is MessageKind.OTHER


def test_postfix_dsn_returns_our_message_id(tmp_path: Path) -> None:
    with private_root(keep_log_in=tmp_path) as root:
        original = ORIGINAL.split(b"\n", 1)[1].replace(b"\n", b"\r\n")  # no Return-Path on the wire
        bounce = run(
            generators.postfix_bounce(root, original, "bob@signed.example", "nobody@remote.test"),
            timeout=90,
        )
    assert bounce.sender == "" and bounce.recipients == ("bob@signed.example",)
    got = references([generators.wire(bounce.message)])
    assert got.kind is MessageKind.DSN
    assert [(r.message_id, r.source) for r in got.references] == [(OURS, ReferenceSource.DSN_RETURNED)]
    assert zombie_children() == []
