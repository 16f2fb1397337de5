"""smtpcore.py: the SMTP server's state machine, driven with bytes alone (no sockets, no loop)."""

from __future__ import annotations

import inspect
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import replies
from gateway.core.replies import Reply
from gateway.edge.smtpcore import (
    DATA_FAILURE_REPLIES,
    NEED_DATA,
    PAUSED,
    AnyReply,
    BareNewline,
    ConnectionClosed,
    Data,
    DataChunk,
    DataDecoder,
    DataFailure,
    Ehlo,
    EndOfData,
    Event,
    Expn,
    Helo,
    Help,
    Limits,
    Mail,
    Noop,
    Offer,
    ProtocolError,
    Quit,
    Rcpt,
    Refused,
    Rset,
    ServerConnection,
    StartTls,
    State,
    Vrfy,
    XForward,
)

DEFAULTS = Limits()
OFFER = Offer(size=1_000_000, eight_bit=True, smtputf8=True, dsn=True, starttls=True)


def connect(limits: Limits = DEFAULTS, tls: bool = False, xforward: bool = False) -> ServerConnection:
    core = ServerConnection("gw.test", limits, tls_available=tls, xforward=xforward)
    assert core.send(replies.greeting("gw.test")) == b"220 gw.test ESMTP\r\n"
    return core


def answer(event: Event) -> AnyReply:
    """What the edge says to each event when the relay accepts everything."""
    if isinstance(event, Refused):
        return event.reply
    if isinstance(event, EndOfData):
        return replies.OK if event.failure is None else DATA_FAILURE_REPLIES[event.failure]
    answers: dict[type[Event], AnyReply] = {
        Helo: replies.helo_ok("gw.test"),
        Ehlo: OFFER,
        Mail: replies.SENDER_OK,
        Rcpt: replies.RECIPIENT_OK,
        Data: replies.START_DATA,
        Rset: replies.OK,
        Noop: replies.OK,
        XForward: replies.OK,
        Quit: replies.BYE,
        Vrfy: replies.CANNOT_VRFY,
        Expn: replies.EXPN_NOT_IMPLEMENTED,
        Help: replies.HELP,
        StartTls: replies.READY_FOR_TLS,
    }
    return answers[type(event)]


class Edge:
    """An edge without IO: answers as `answer` says, holding RCPT replies while the client is still
    pipelining (as smtpd.py does, so that RCPTs go to the next hop together)."""

    def __init__(self, core: ServerConnection) -> None:
        self.core = core
        self.events: list[Event] = []
        self.wire = b""
        self._held: list[Rcpt] = []

    def _flush(self) -> None:
        for held in self._held:
            self.wire += self.core.send(answer(held))
        self._held.clear()

    def eof(self) -> Edge:
        self.core.receive_data(b"")
        return self.feed(b"")

    def feed(self, data: bytes) -> Edge:
        if data:
            self.core.receive_data(data)
        if self.events and isinstance(self.events[-1], ConnectionClosed):
            return self
        while True:
            event = self.core.next_event()
            if event is NEED_DATA or event is PAUSED:
                self._flush()
                if event is PAUSED or not self.core.owed:
                    return self
                continue
            if isinstance(event, DataChunk) and self.events and isinstance(self.events[-1], DataChunk):
                self.events[-1] = DataChunk(self.events[-1].data + event.data)  # chunk bounds do not matter
            else:
                self.events.append(event)
            if isinstance(event, ConnectionClosed):
                return self
            if isinstance(event, Rcpt):
                self._held.append(event)
                if not self.core.buffered_command:
                    self._flush()
            elif not isinstance(event, DataChunk):
                self._flush()
                self.wire += self.core.send(answer(event))


def codes(wire: bytes) -> list[int]:
    return [int(line[:3]) for line in wire.split(b"\r\n") if line[3:4] == b" "]


# ------------------------------------------------------------------------------------------------ pipelining

SESSION = (
    b"EHLO client.test\r\n"
    b"MAIL FROM:<alice@example.org> SIZE=20\r\n"
    b"RCPT TO:<bob@example.com>\r\n"
    b"RCPT TO:<carol@example.com> NOTIFY=NEVER\r\n"
    b"DATA\r\n"
    b"Subject: hi\r\n\r\n..stuffed\r\n.\r\n"
    b"NOOP\r\n"
    b"QUIT\r\n"
)


def test_a_whole_pipelined_session_in_one_chunk() -> None:
    edge = Edge(connect()).feed(SESSION)
    kinds = [type(event) for event in edge.events]
    assert kinds == [Ehlo, Mail, Rcpt, Rcpt, Data, DataChunk, EndOfData, Noop, Quit, ConnectionClosed]
    assert codes(edge.wire) == [250, 250, 250, 250, 354, 250, 250, 221]
    assert edge.events[5] == DataChunk(b"Subject: hi\r\n\r\n..stuffed\r\n")
    mail = edge.events[1]
    assert isinstance(mail, Mail) and mail.command.size == 20 and mail.command.params == ("SIZE=20",)
    assert edge.core.state is State.CLOSED
    assert edge.core.next_event() == ConnectionClosed()


def test_pipelined_commands_split_at_every_byte_boundary_mean_the_same() -> None:
    whole = Edge(connect()).feed(SESSION)
    for cut in range(1, len(SESSION)):
        split = Edge(connect()).feed(SESSION[:cut]).feed(SESSION[cut:])
        assert split.events == whole.events, cut
        assert split.wire == whole.wire, cut
    one_by_one = Edge(connect())
    for index in range(len(SESSION)):
        one_by_one.feed(SESSION[index : index + 1])
    assert one_by_one.events == whole.events and one_by_one.wire == whole.wire


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(SESSION) - 1), max_size=12))
def test_pipelined_commands_cut_anywhere_any_number_of_times(cuts: list[int]) -> None:
    whole = Edge(connect()).feed(SESSION)
    edge = Edge(connect())
    start = 0
    for cut in [*sorted(set(cuts)), len(SESSION)]:
        edge.feed(SESSION[start:cut])
        start = cut
    assert edge.events == whole.events and edge.wire == whole.wire


def test_rcpts_are_parsed_while_their_replies_are_owed_but_nothing_after_mail_until_its_reply() -> None:
    core = connect()
    Edge(core).feed(b"EHLO c\r\n")
    core.receive_data(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\n")
    assert isinstance(core.next_event(), Mail)
    assert core.next_event() is PAUSED  # whether RCPT is in sequence depends on MAIL's reply
    core.send(replies.SENDER_OK)
    assert isinstance(core.next_event(), Rcpt)
    assert core.buffered_command
    assert isinstance(core.next_event(), Rcpt)  # the first RCPT's reply is still owed
    assert not core.buffered_command and core.owed == 2
    assert core.next_event() is NEED_DATA
    assert core.send(replies.RECIPIENT_OK) == b"250 2.1.5 Recipient OK\r\n"


def test_a_refused_mail_leaves_pipelined_rcpts_out_of_sequence() -> None:
    core = connect()
    Edge(core).feed(b"EHLO c\r\n")
    core.receive_data(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    assert isinstance(core.next_event(), Mail)
    core.send(replies.client_not_trusted("192.0.2.1"))
    assert core.next_event() == Refused(replies.NEED_MAIL)
    core.send(replies.NEED_MAIL)
    assert core.next_event() == Refused(replies.NEED_MAIL)


def test_the_recipient_limit_counts_owed_and_accepted_recipients_not_refused_ones() -> None:
    core = connect(Limits(recipients=2))
    edge = Edge(core).feed(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n")
    core.receive_data(b"RCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\nRCPT TO:<d@example.com>\r\n")
    assert isinstance(core.next_event(), Rcpt)
    assert isinstance(core.next_event(), Rcpt)
    assert core.next_event() == Refused(replies.TOO_MANY_RECIPIENTS)
    core.send(replies.RECIPIENT_OK)
    core.send(replies.relay_denied("c@example.com"))  # refused: gives its place back
    core.send(replies.TOO_MANY_RECIPIENTS)
    edge.feed(b"RCPT TO:<e@example.com>\r\n")
    assert isinstance(edge.events[-1], Rcpt)


def test_eof_after_a_pipelined_dot_and_quit_still_gives_every_event() -> None:
    edge = Edge(connect()).feed(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    edge.feed(b"x\r\n.\r\nQUIT\r\n").eof()
    assert [type(event) for event in edge.events][-4:] == [DataChunk, EndOfData, Quit, ConnectionClosed]
    assert codes(edge.wire)[-2:] == [250, 221]


def test_eof_mid_data_closes_without_an_end_of_data() -> None:
    edge = Edge(connect()).feed(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
    edge.feed(b"half a line").eof()
    assert edge.events[-1] == ConnectionClosed()
    assert not any(isinstance(event, EndOfData) for event in edge.events)


def test_eof_between_commands_closes_and_a_partial_command_is_not_run() -> None:
    edge = Edge(connect()).feed(b"EHLO c\r\nQUI").eof()
    assert [type(event) for event in edge.events] == [Ehlo, ConnectionClosed]


# ------------------------------------------------------------------------------------------------ STARTTLS


@pytest.mark.parametrize(
    "injected", [b"MAIL FROM:<evil@example.org>\r\n", b"RSET\r\nMAIL FROM:<e@x.org>\r\nRC"]
)
def test_commands_pipelined_after_starttls_are_discarded_at_every_split(injected: bytes) -> None:
    # RFC 3207 §4.2, CVE-2011-0411: nothing sent in the clear after STARTTLS may run inside TLS.
    stream = b"EHLO c\r\nSTARTTLS\r\n" + injected
    for cut in range(1, len(stream) + 1):
        core = connect(tls=True)
        edge = Edge(core).feed(stream[:cut]).feed(stream[cut:])
        assert [type(event) for event in edge.events] == [Ehlo, StartTls], cut
        assert core.state is State.TLS
        core.receive_data(b"NOOP\r\n")  # still in the clear: dropped too
        assert core.next_event() is PAUSED
        core.tls_started()
        # The session starts over: the injected MAIL did not run, and EHLO is needed again.
        edge.feed(b"MAIL FROM:<a@example.org>\r\n")
        assert edge.events[-1] == Refused(replies.HELO_FIRST), cut
        edge.feed(b"EHLO c\r\n")
        assert b"STARTTLS" not in edge.wire.rsplit(b"250-gw.test", 1)[1]
        edge.feed(b"MAIL FROM:<a@example.org>\r\n")
        assert isinstance(edge.events[-1], Mail)


def test_starttls_is_refused_without_a_certificate_once_on_and_with_an_argument() -> None:
    edge = Edge(connect()).feed(b"EHLO c\r\nSTARTTLS\r\n")
    assert edge.events[-1] == Refused(replies.STARTTLS_NOT_AVAILABLE)
    assert b"STARTTLS" not in edge.wire.split(b"502")[0]  # not offered either
    core = connect(tls=True)
    edge = Edge(core).feed(b"EHLO c\r\n")
    assert b"250-STARTTLS\r\n" in edge.wire
    edge.feed(b"STARTTLS now\r\n")
    assert edge.events[-1] == Refused(replies.no_argument("STARTTLS"))
    edge.feed(b"STARTTLS\r\n")
    core.tls_started()
    edge.feed(b"STARTTLS\r\n")
    assert edge.events[-1] == Refused(replies.STARTTLS_NOT_AVAILABLE)


# ------------------------------------------------------------------------------------------------ line limits


def noop_line(octets: int) -> bytes:
    """A NOOP command line of exactly `octets` octets, its CRLF included."""
    return b"NOOP " + b"x" * (octets - 7) + b"\r\n"


@pytest.mark.parametrize("limit", [1000, 2048])
def test_a_command_line_at_the_limit_is_taken_and_one_octet_over_is_refused(limit: int) -> None:
    for octets, expected in [
        (limit - 1, Noop()),
        (limit, Noop()),
        (limit + 1, Refused(replies.LINE_TOO_LONG)),
    ]:
        line = noop_line(octets)
        assert len(line) == octets
        for cut in (1, limit - 2, limit - 1, limit, octets - 1):
            edge = Edge(connect(Limits(command_line=limit))).feed(line[:cut]).feed(line[cut:])
            edge.feed(b"QUIT\r\n")
            assert edge.events == [expected, Quit(), ConnectionClosed()], (octets, cut)


def test_an_over_long_command_line_is_dropped_as_it_arrives_not_buffered() -> None:
    core = connect(Limits(command_line=1000))
    edge = Edge(core)
    for _ in range(100):
        edge.feed(b"x" * 1000)
        assert len(core._buffer) < 1000  # the property under test is memory
    edge.feed(b"\r\nNOOP\r\n")
    assert edge.events == [Refused(replies.LINE_TOO_LONG), Noop()]


def data_session(body: bytes, limits: Limits = DEFAULTS) -> Edge:
    head = b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
    return Edge(connect(limits)).feed(head + body)


@pytest.mark.parametrize(
    ("octets", "failure"), [(999, None), (1000, None), (1001, DataFailure.LINE_TOO_LONG)]
)
def test_a_data_line_of_999_and_1000_octets_passes_and_1001_fails(
    octets: int, failure: DataFailure | None
) -> None:
    line = b"y" * (octets - 2) + b"\r\n"
    for cut in (0, 500, octets - 2, octets - 1):
        edge = data_session(line[:cut])
        edge.feed(line[cut:] + b".\r\nNOOP\r\n")
        assert EndOfData(failure) in edge.events, (octets, cut)
        assert (DataChunk(line) in edge.events) is (failure is None)
        assert edge.events[-1] == Noop()  # the session goes on after the end of DATA either way


# ---------------------------------------------------------------------------------------- bare CR, LF, NUL


@pytest.mark.parametrize(
    "line",
    [b"NOOP\rQUIT\r\n", b"NOOP\x00\r\n", b"HELO a\rb\r\n", b"MAIL FROM:<a\x00@example.org>\r\n", b"\r\r\n"],
)
def test_a_bare_cr_or_nul_in_a_command_refuses_it(line: bytes) -> None:
    edge = Edge(connect()).feed(b"EHLO c\r\n" + line + b"NOOP\r\n")
    assert edge.events[1:] == [Refused(replies.BARE_CR_OR_NUL), Noop()]


def test_a_bare_lf_ends_a_command_line() -> None:
    edge = Edge(connect()).feed(b"EHLO c\nNOOP\nMAIL FROM:<a@example.org>\n")
    assert [type(event) for event in edge.events] == [Ehlo, Noop, Mail]


@pytest.mark.parametrize(
    ("body", "passed_on"),
    [
        (b"a\nb\r\n", b"a\r\nb\r\n"),  # a bare LF ends a line
        (b"a\rb\r\n", b"a b\r\n"),  # a stray CR becomes a space
        (b"a\x00b\r\n", b"a b\r\n"),  # so does a NUL
        (b"a\n.\nb\r\n", b"a\r\n\r\nb\r\n"),  # "." between bare LFs: a stuffed empty line, not the end
        (b"a\r\n.\nb\r\n", b"a\r\n\r\nb\r\n"),
    ],
)
def test_bare_newlines_cr_and_nul_in_data_are_normalised(body: bytes, passed_on: bytes) -> None:
    edge = data_session(body + b".\r\nNOOP\r\n")
    assert edge.events[-3:] == [DataChunk(passed_on), EndOfData(None), Noop()]


def test_in_reject_mode_a_bare_newline_in_data_fails_the_message() -> None:
    edge = data_session(b"a\nb\r\n.\r\n", Limits(bare_newline=BareNewline.REJECT))
    assert edge.events[-1] == EndOfData(DataFailure.BARE_NEWLINE)
    assert edge.wire.endswith(f"{replies.BARE_NEWLINE}\r\n".encode())


def test_smuggled_commands_after_a_bare_lf_dot_are_part_of_the_message() -> None:
    edge = data_session(b"one\n.\nMAIL FROM:<evil@example.org>\r\n.\r\n")
    assert [type(event) for event in edge.events][-2:] == [DataChunk, EndOfData]
    assert sum(isinstance(event, Mail) for event in edge.events) == 1


def test_past_the_size_limit_the_message_fails_and_the_end_is_still_found() -> None:
    edge = data_session(b"z" * 98 + b"\r\n" + b"z" * 98 + b"\r\n.\r\nNOOP\r\n", Limits(message_size=150))
    assert EndOfData(DataFailure.TOO_BIG) in edge.events and edge.events[-1] == Noop()


# ------------------------------------------------------------------------------------------------ send()


def test_send_refuses_a_reply_the_state_does_not_allow() -> None:
    core = ServerConnection("gw.test")
    with pytest.raises(ProtocolError):
        core.send(replies.OK)  # the greeting is owed
    core.send(replies.greeting("gw.test"))
    with pytest.raises(ProtocolError):
        core.send(replies.OK)  # no command to answer
    core.receive_data(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\n")
    core.next_event()
    with pytest.raises(ProtocolError):
        core.send(replies.helo_ok("gw.test"))  # EHLO's positive reply is the Offer
    core.send(OFFER)
    core.next_event()
    with pytest.raises(ProtocolError):
        core.send(replies.START_DATA)
    core.send(replies.SENDER_OK)
    core.receive_data(b"RCPT TO:<b@example.com>\r\nBOGUS\r\n")
    core.next_event()
    with pytest.raises(ProtocolError):
        core.send(replies.BYE)
    core.send(replies.RECIPIENT_OK)
    assert core.next_event() == Refused(replies.UNKNOWN_COMMAND)
    with pytest.raises(ProtocolError):
        core.send(replies.SYNTAX_ERROR)  # a refusal is sent as the core made it
    assert core.send(replies.TIMEOUT) == f"{replies.TIMEOUT}\r\n".encode()  # 421 fits anything
    assert core.state is State.CLOSED
    with pytest.raises(ProtocolError):
        core.send(replies.OK)


def test_a_failed_data_start_ends_the_transaction() -> None:
    core = connect()
    edge = Edge(core).feed(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n")
    core.receive_data(b"DATA\r\nMAIL FROM:<a@example.org>\r\n")
    assert core.next_event() == Data()
    core.send(replies.NO_VALID_RECIPIENTS)
    assert isinstance(core.next_event(), Mail)
    assert edge.core.mail is None


def test_rset_and_the_end_of_a_message_each_end_the_transaction() -> None:
    # A second MAIL is taken after either (not refused as nested), and RCPT and DATA need it again.
    edge = Edge(connect()).feed(
        b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRSET\r\nRCPT TO:<b@example.com>\r\n"
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nhi\r\n.\r\n"
        b"DATA\r\nMAIL FROM:<a@example.org>\r\n"
    )
    assert [type(event) for event in edge.events] == [
        Ehlo, Mail, Rset, Refused, Mail, Rcpt, Data, DataChunk, EndOfData, Refused, Mail
    ]
    assert edge.events[3] == Refused(replies.NEED_MAIL) and edge.events[9] == Refused(replies.NEED_MAIL)
    assert codes(edge.wire) == [250, 250, 250, 503, 250, 250, 354, 250, 503, 250]


def test_too_many_unknown_commands_close_the_session() -> None:
    edge = Edge(connect(Limits(unknown_commands=3))).feed(b"A\r\nB\r\nC\r\nNOOP\r\n")
    assert edge.events == [Refused(replies.UNKNOWN_COMMAND)] * 3 + [
        Refused(replies.TOO_MANY_ERRORS, close=True),
        ConnectionClosed(),
    ]
    assert codes(edge.wire) == [500, 500, 500, 421]


# ------------------------------------------------------------------------------------------------ every reply


def scenario(
    stream: bytes, tls: bool = False, xforward: bool = False, limits: Limits = DEFAULTS
) -> list[Event]:
    return Edge(connect(limits, tls=tls, xforward=xforward)).feed(stream).events


HELLO = b"EHLO c\r\n"
IN_MAIL = HELLO + b"MAIL FROM:<a@example.org>\r\n"
SMALL = Offer(size=100, eight_bit=False, smtputf8=False, dsn=False, starttls=False)

# Every reply the core makes itself, with bytes that make it.
CORE_REPLIES: dict[str, tuple[Reply, bytes, dict[str, object]]] = {
    "LINE_TOO_LONG": (replies.LINE_TOO_LONG, b"NOOP " + b"x" * 3000 + b"\r\n", {}),
    "UNKNOWN_COMMAND": (replies.UNKNOWN_COMMAND, b"BDAT 10 LAST\r\n", {}),
    "TOO_MANY_ERRORS": (replies.TOO_MANY_ERRORS, b"X\r\n" * 10, {}),
    "BARE_CR_OR_NUL": (replies.BARE_CR_OR_NUL, b"NOOP\r\r\n", {}),
    "HELO_FIRST": (replies.HELO_FIRST, b"MAIL FROM:<a@example.org>\r\n", {}),
    "NESTED_MAIL": (replies.NESTED_MAIL, IN_MAIL + b"MAIL FROM:<a@example.org>\r\n", {}),
    "NEED_MAIL": (replies.NEED_MAIL, HELLO + b"RCPT TO:<b@example.com>\r\n", {}),
    "NEED_RCPT": (replies.NEED_RCPT, IN_MAIL + b"DATA\r\n", {}),
    "TOO_MANY_RECIPIENTS": (
        replies.TOO_MANY_RECIPIENTS,
        IN_MAIL + b"RCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\n",
        {"limits": Limits(recipients=1)},
    ),
    "MAIL_IN_PROGRESS": (
        replies.MAIL_IN_PROGRESS,
        IN_MAIL + b"XFORWARD ADDR=192.0.2.1\r\n",
        {"xforward": True},
    ),
    "XFORWARD_NOT_AUTHORIZED": (replies.XFORWARD_NOT_AUTHORIZED, HELLO + b"XFORWARD ADDR=192.0.2.1\r\n", {}),
    "bad_xforward": (
        replies.bad_xforward("Bad XFORWARD attribute name: PORT=25"),
        HELLO + b"XFORWARD PORT=25\r\n",
        {"xforward": True},
    ),
    "STARTTLS_NOT_AVAILABLE": (replies.STARTTLS_NOT_AVAILABLE, HELLO + b"STARTTLS\r\n", {}),
    "MAIL_SYNTAX": (replies.MAIL_SYNTAX, HELLO + b"MAIL TO:<a@example.org>\r\n", {}),
    "RCPT_SYNTAX": (replies.RCPT_SYNTAX, IN_MAIL + b"RCPT FROM:<b@example.com>\r\n", {}),
    "PATH_SYNTAX": (replies.PATH_SYNTAX, HELLO + b"MAIL FROM:a@example.org\r\n", {}),
    "MALFORMED_PATH": (replies.MALFORMED_PATH, HELLO + b'MAIL FROM:<"open@example.org\r\n', {}),
    "malformed_address": (replies.malformed_address("5.1.3"), HELLO + b"MAIL FROM:<nobody>\r\n", {}),
    "NULL_RECIPIENT": (replies.NULL_RECIPIENT, IN_MAIL + b"RCPT TO:<>\r\n", {}),
    "PARAMETERS_NEED_EHLO": (
        replies.PARAMETERS_NEED_EHLO,
        b"HELO c\r\nMAIL FROM:<a@example.org> SIZE=1\r\n",
        {},
    ),
    "PARAMETER_SYNTAX": (replies.PARAMETER_SYNTAX, HELLO + b"MAIL FROM:<a@example.org> =x\r\n", {}),
    "BAD_SIZE": (replies.BAD_SIZE, HELLO + b"MAIL FROM:<a@example.org> SIZE=big\r\n", {}),
    "MESSAGE_TOO_BIG": (replies.MESSAGE_TOO_BIG, HELLO + b"MAIL FROM:<a@example.org> SIZE=2000000\r\n", {}),
    "BAD_BODY": (replies.BAD_BODY, HELLO + b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\n", {}),
    "BAD_SMTPUTF8": (replies.BAD_SMTPUTF8, HELLO + b"MAIL FROM:<a@example.org> SMTPUTF8=yes\r\n", {}),
    "BAD_RET": (replies.BAD_RET, HELLO + b"MAIL FROM:<a@example.org> RET=ALL\r\n", {}),
    "BAD_ENVID": (replies.BAD_ENVID, HELLO + b"MAIL FROM:<a@example.org> ENVID=" + b"e" * 101 + b"\r\n", {}),
    "BAD_NOTIFY": (replies.BAD_NOTIFY, IN_MAIL + b"RCPT TO:<b@example.com> NOTIFY=NEVER,DELAY\r\n", {}),
    "BAD_ORCPT": (replies.BAD_ORCPT, IN_MAIL + b"RCPT TO:<b@example.com> ORCPT=b@example.com\r\n", {}),
    "NEEDS_SMTPUTF8": (replies.NEEDS_SMTPUTF8, HELLO + "MAIL FROM:<jörg@example.org>\r\n".encode(), {}),
    "helo_syntax": (replies.helo_syntax("HELO"), b"HELO\r\n", {}),
    "no_argument": (replies.no_argument("RSET"), b"RSET now\r\n", {}),
    "duplicate_parameter": (
        replies.duplicate_parameter("MAIL", "SIZE"),
        HELLO + b"MAIL FROM:<a@example.org> SIZE=1 SIZE=2\r\n",
        {},
    ),
    "unknown_parameter": (
        replies.unknown_parameter("MAIL", "FOO"),
        HELLO + b"MAIL FROM:<a@example.org> FOO\r\n",
        {},
    ),
}

# Replies the edge (smtpd.py) or the relay (relay.py) makes, given to the core as values: `send` takes
# them where the state allows (the answers above and the checks in test_send_refuses_...).
EDGE_REPLIES = {
    "greeting": "smtpd: the banner",
    "helo_ok": "smtpd: HELO",
    "READY_FOR_TLS": "smtpd: STARTTLS",
    "CANNOT_VRFY": "smtpd: VRFY",
    "HELP": "smtpd: HELP",
    "EXPN_NOT_IMPLEMENTED": "smtpd: EXPN",
    "OK": "smtpd: NOOP, RSET, XFORWARD",
    "BYE": "smtpd: QUIT",
    "START_DATA": "smtpd: DATA, when the next hop said 354",
    "SHUTTING_DOWN": "smtpd: shutdown",
    "TOO_MANY_SESSIONS": "smtpd: SessionGate",
    "TOO_MANY_FROM_CLIENT": "smtpd: SessionGate",
    "TIMEOUT": "smtpd: the idle timer",
    "LOCAL_ERROR": "smtpd and relay: an internal error",
    "NULL_SENDER_RATE": "smtpd: MAIL FROM:<> over [state] null_sender_rate",
    "BARE_NEWLINE": "relay: DATA_FAILURE_REPLIES (the core's EndOfData failure)",
    "SENDER_OK": "relay: MAIL",
    "RECIPIENT_OK": "policy/relay: RCPT",
    "NEXT_HOP_DOWN": "nexthop",
    "NEXT_HOP_TIMEOUT": "nexthop",
    "NEXT_HOP_BROKEN": "nexthop",
    "NEXT_HOP_PROTOCOL": "relay",
    "NEXT_HOP_CANNOT_CARRY": "relay",
    "NO_VALID_RECIPIENTS": "relay",
    "SEPARATE_TRANSACTION": "policy",
    "KEYRING_UNAVAILABLE": "policy",
    "SYNTAX_ERROR": "policy",
    "BAD_SEQUENCE": "policy",
    "relay_denied": "policy",
    "client_not_trusted": "relay: OutboundRules",
    "bounce_refused": "policy",
    "tag_refused": "policy",
    "bad_address": "policy",
    "ledger_too_big": "ledger: the end-of-DATA decision (relay)",
    "ledger_unavailable": "ledger: the end-of-DATA decision (relay)",
}


@pytest.mark.parametrize("name", sorted(CORE_REPLIES))
def test_every_reply_the_core_makes_comes_from_its_state(name: str) -> None:
    reply, stream, options = CORE_REPLIES[name]
    events = scenario(stream, **options)  # type: ignore[arg-type]
    assert any(isinstance(event, Refused) and event.reply == reply for event in events), events


def test_every_named_reply_is_made_by_the_core_or_the_edge() -> None:
    named = {
        name
        for name, value in vars(replies).items()
        if isinstance(value, Reply) or (inspect.isfunction(value) and value.__module__ == replies.__name__)
    }
    assert named == set(CORE_REPLIES) | set(EDGE_REPLIES)
    assert not set(CORE_REPLIES) & set(EDGE_REPLIES)


def test_ehlo_offers_what_the_edge_says_and_xforward_only_to_trusted_clients() -> None:
    wire = Edge(connect(xforward=True)).feed(HELLO).wire
    assert wire.split(b"\r\n")[:-1] == [
        b"250-gw.test",
        b"250-PIPELINING",
        b"250-SIZE 1000000",
        b"250-8BITMIME",
        b"250-SMTPUTF8",
        b"250-DSN",
        b"250-XFORWARD NAME ADDR PROTO HELO",
        b"250 ENHANCEDSTATUSCODES",
    ]
    core = connect()
    core.receive_data(HELLO + b"MAIL FROM:<a@example.org> BODY=8BITMIME\r\n")
    assert isinstance(core.next_event(), Ehlo)
    core.send(SMALL)
    # What was not offered is not a parameter the client may give.
    assert core.next_event() == Refused(replies.unknown_parameter("MAIL", "BODY"))
    assert b"XFORWARD" not in Edge(connect()).feed(HELLO).wire


# ------------------------------------------------------------------------------------------------ DataDecoder


def decode(
    *chunks: bytes, size: int | None = None, line: int = 1000, mode: BareNewline = BareNewline.NORMALIZE
):
    decoder = DataDecoder(size, line, mode)
    out = b""
    for chunk in chunks:
        if decoder.done:
            break
        out += decoder.feed(chunk)
    return decoder, out


# ------------------------------------------------------------------------------------------------ DataDecoder


def test_a_clean_message_passes_unchanged_and_still_dot_stuffed() -> None:
    body = b"Subject: hi\r\n\r\n..a stuffed line\r\nend\r\n"
    decoder, out = decode(body + b".\r\n")
    assert decoder.done and decoder.failure is None
    assert out == body
    assert decoder.size == len(body)


def test_the_end_is_found_across_any_chunk_boundary() -> None:
    stream = b"line one\r\nline two\r\n.\r\nQUIT\r\n"
    for cut in range(1, len(stream)):
        decoder = DataDecoder(None, 1000)
        out = decoder.feed(stream[:cut])
        rest = stream[cut:]
        if not decoder.done:
            out += decoder.feed(rest)
            rest = b""
        assert decoder.done, cut
        assert out == b"line one\r\nline two\r\n", cut
        assert decoder.leftover + rest == b"QUIT\r\n", cut


def test_an_empty_message() -> None:
    decoder, out = decode(b".\r\nQUIT\r\n")
    assert decoder.done and out == b"" and decoder.leftover == b"QUIT\r\n"


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        # A bare LF ends a line (Postfix normalize) but "\n.\n" never ends DATA: the dot line is sent on
        # as the empty line it stands for, so the next hop cannot see an end of DATA in it either.
        (b"a\n.\nb\r\n.\r\n", b"a\r\n\r\nb\r\n"),
        (b"a\r\n.\nb\r\n.\r\n", b"a\r\n\r\nb\r\n"),
        (b"a\n.\r\nb\r\n.\r\n", b"a\r\n\r\nb\r\n"),
        (b"a\r.\r\nb\r\n.\r\n", b"a .\r\nb\r\n"),
        # Stray CR and NUL become spaces (Postfix cleanup_replace_stray_cr_lf).
        (b"a\rb\r\n.\r\n", b"a b\r\n"),
        (b"a\x00b\r\n.\r\n", b"a b\r\n"),
        (b"x\r\r\n.\r\n", b"x \r\n"),
    ],
)
def test_bare_newlines_and_stray_characters_are_normalised(stream: bytes, expected: bytes) -> None:
    decoder, out = decode(stream)
    assert decoder.done and decoder.failure is None
    assert out == expected


def test_reject_mode_refuses_a_bare_newline() -> None:
    decoder, out = decode(b"a\nb\r\n.\r\n", mode=BareNewline.REJECT)
    assert decoder.done and decoder.failure is DataFailure.BARE_NEWLINE and out == b""


def test_past_the_size_limit_nothing_more_is_passed_on_but_the_end_is_still_found() -> None:
    decoder = DataDecoder(100, 1000)
    first = decoder.feed(b"x" * 60 + b"\r\n")
    assert first
    assert decoder.feed(b"y" * 60 + b"\r\n") == b""
    assert decoder.failure is DataFailure.TOO_BIG
    assert decoder.feed(b"z" * 5000 + b"\r\n.\r\nQUIT\r\n") == b""
    assert decoder.done and decoder.leftover == b"QUIT\r\n"


def test_a_line_over_the_limit_fails_in_one_chunk_or_many() -> None:
    decoder, _ = decode(b"a" * 999 + b"\r\n.\r\n", line=1000)
    assert decoder.failure is DataFailure.LINE_TOO_LONG
    decoder, _ = decode(b"a" * 998 + b"\r\n.\r\n", line=1000)
    assert decoder.failure is None
    # An unfinished line is never buffered past the limit, and the end is found after it.
    decoder = DataDecoder(None, 1000)
    for _ in range(100):
        assert decoder.feed(b"b" * 4096) == b""
    assert decoder.failure is DataFailure.LINE_TOO_LONG
    decoder.feed(b"\r\nmore\r\n.\r\n")
    assert decoder.done


def test_a_line_limit_of_zero_means_none() -> None:
    decoder, out = decode(b"a" * 50_000 + b"\r\n.\r\n", line=0)
    assert decoder.failure is None and len(out) == 50_002


lines = st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=30)


def stuffed(body_lines: list[bytes]) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in body_lines)


@settings(max_examples=200, deadline=None)
@given(lines, st.lists(st.integers(min_value=1, max_value=64), max_size=10))
def test_a_well_formed_body_passes_unchanged_however_it_is_cut(
    body_lines: list[bytes], cuts: list[int]
) -> None:
    body = stuffed(body_lines)
    stream = body + b".\r\nQUIT\r\n"
    decoder = DataDecoder(None, 1000)
    out = b""
    position = 0
    for cut in [*cuts, len(stream)]:
        if decoder.done:
            break
        out += decoder.feed(stream[position : position + cut])
        position += cut
    while not decoder.done:
        out += decoder.feed(stream[position:])
        position = len(stream)
    assert out == body.replace(b"\x00", b" ")
    assert decoder.leftover + stream[position:] == b"QUIT\r\n"


_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n|\x00")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=1, max_value=50), max_size=8))
def test_nothing_the_next_hop_gets_is_bare_or_ends_data_early(junk: bytes, cuts: list[int]) -> None:
    # Whatever a client sends, what goes on has only CRLF line ends, no NUL, and no end of DATA in it.
    stream = junk.replace(b"\r\n.\r\n", b"\r\n..\r\n")
    if stream.startswith(b".\r\n"):
        stream = b"." + stream
    stream += b"\r\n.\r\n"
    decoder = DataDecoder(None, 1000)
    out = b""
    position = 0
    for cut in [*cuts, len(stream)]:
        if decoder.done:
            break
        out += decoder.feed(stream[position : position + cut])
        position += cut
    assert decoder.done
    if decoder.failure is None:
        assert not _BARE.search(out)
        assert b"\r\n.\r\n" not in out and not out.startswith(b".\r\n")
        assert out == b"" or out.endswith(b"\r\n")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=40),
    st.integers(min_value=3, max_value=50),
)
def test_the_long_line_check_agrees_with_splitting(lengths: list[int], limit: int) -> None:
    lines = b"".join(b"x" * n + b"\r\n" for n in lengths)
    expected = max(lengths) + 2 > limit
    assert DataDecoder(None, limit)._has_long_line(lines) is expected


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\x00", b"\r\n", b"\r\n."]), max_size=60),
    st.booleans(),
)
def test_the_fast_path_takes_only_what_the_line_by_line_path_leaves_unchanged(
    parts: list[bytes], after_crlf: bool
) -> None:
    # The line-by-line path changes every line that is not clean (a bare CR or LF, a NUL, a "." line
    # after a bare LF): so the two agree on every input only if the fast path passes clean input alone.
    lines = b"".join(parts) + b"\n"
    if b"\r\n.\r\n" in lines or (after_crlf and lines.startswith(b".\r\n")):
        return  # an end of DATA: found before the lines are looked at
    fast, slow = DataDecoder(None, 1000), DataDecoder(None, 1000)
    fast._after_crlf = slow._after_crlf = after_crlf
    assert fast._lines(lines) == slow._slow_lines(lines)
    assert fast._after_crlf == slow._after_crlf
