"""The SMTP server's state machine, with no IO at all (h11 is the model: "no networking code at all").

Bytes from the client go in with `receive_data` (b"" for the end of the stream); `next_event` gives
what they mean, one event at a time: a command with its parsed parameters, a chunk of the message, the
end of the message, the end of the stream. Replies go in as values with `send`, which checks that the
reply fits the command it answers, moves the state on and returns the bytes to write. Every state
transition of the server is in this one file; the asyncio edge (smtpd.py) only carries bytes and asks the
relay.

What the client may do is decided here:
- Pipelining (RFC 2920): commands are parsed as they arrive. While RCPTs await their replies the next
  command is parsed too (`buffered_command` tells the edge that one is waiting, so it can pipeline RCPTs
  to the next hop); after any other command nothing more is parsed until its reply has been sent, since
  that reply decides what the next command means.
- STARTTLS (RFC 3207 §4.2, CVE-2011-0411): once its 220 is sent, whatever the client had pipelined
  after it is thrown away, and after the handshake the session starts over as if no EHLO had been said.
- Line limits: a command line longer than `command_line` octets (its CRLF included) is refused with 500
  and skipped as it arrives (never buffered whole); DATA lines are held to `data_line` (RFC 5321
  §4.5.3.1.6: 1000).
- Bare CR and LF (SMTP smuggling, CVE-2023-51764 and friends). We follow Postfix 3.9's defaults:
  `smtpd_forbid_bare_newline = normalize` - only <CR><LF>.<CR><LF> ends DATA, and a line that ends in a
  bare <LF> is taken as a line and sent on ending in <CR><LF> - and `cleanup_replace_stray_cr_lf = yes` -
  a <CR> that is not part of a <CR><LF> pair becomes a space. A NUL becomes a space too (we do not offer
  BINARYMIME, so no NUL may appear). A line that is only "." but does not end DATA (a bare <LF> before or
  after it) is a dot-stuffed empty line and is sent on as one, so no line the next hop reads as the end
  of DATA can be made out of anything but the client's own <CR><LF>.<CR><LF>. With `BareNewline.REJECT`
  (Postfix's `reject`) a message with a bare newline is refused instead. In a command line, a bare <LF>
  ends the line as <CR><LF> does; a <CR> or NUL anywhere else in it refuses the command (RFC 5321 §2.3.8:
  CR and LF appear only together), so nothing the next hop or a log reads can be split by one.
- BDAT (RFC 3030) is not offered, so it is an unknown command.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from ..core import replies
from ..core.addresses import Address, parse_path
from ..core.errors import AddressError
from ..core.replies import Reply

# ------------------------------------------------------------------------------------------------ DATA


class BareNewline(enum.Enum):
    NORMALIZE = "normalize"  # Postfix 3.9 default: a bare LF ends a line; only CRLF.CRLF ends DATA
    REJECT = "reject"  # refuse the message (554 5.5.0)


class DataFailure(enum.Enum):
    TOO_BIG = "too-big"
    LINE_TOO_LONG = "line-too-long"
    BARE_NEWLINE = "bare-newline"


DATA_FAILURE_REPLIES: dict[DataFailure, Reply] = {
    DataFailure.TOO_BIG: replies.MESSAGE_TOO_BIG,
    DataFailure.LINE_TOO_LONG: replies.LINE_TOO_LONG,
    DataFailure.BARE_NEWLINE: replies.BARE_NEWLINE,
}

_STRAY = re.compile(rb"[\r\x00]")
# bytes.translate tables: 1 where the octet is CR (LF), 0 elsewhere (DataDecoder._lines).
_CR_PLACES = bytes(int(octet == 0x0D) for octet in range(256))
_LF_PLACES = bytes(int(octet == 0x0A) for octet in range(256))


class DataDecoder:
    """The DATA stream, as read from the client, into the byte stream the next hop gets.

    The body stays dot-stuffed (what the client stuffed is what the next hop unstuffs), so a clean chunk
    passes through untouched and the per-byte work is done by `bytes.find`/`count` in C. Only chunks with
    a bare CR, bare LF or NUL take the line-by-line path. Only complete lines are emitted; the unfinished
    tail of a chunk waits for the next one (a tail longer than the line limit is dropped, not buffered).
    """

    __slots__ = (
        "_after_crlf",
        "_carry",
        "_line_limit",
        "_mode",
        "_size_limit",
        "_skipping",
        "done",
        "failure",
        "leftover",
        "size",
    )

    def __init__(self, size_limit: int | None, line_limit: int, mode: BareNewline = BareNewline.NORMALIZE):
        self._size_limit = size_limit or None
        # octets, the CRLF included (RFC 5321 §4.5.3.1.6: 1000); 0: none but the message size (a line
        # is only ever held whole while it is incomplete, so some bound is needed)
        self._line_limit = line_limit or size_limit or 1 << 26
        self._mode = mode
        self._carry = b""
        self._after_crlf = True  # the previous line ended in CRLF (DATA's own line did)
        self._skipping = False  # inside an over-long line, dropped as it goes
        self.done = False
        self.failure: DataFailure | None = None
        self.leftover = b""  # what the client sent after the final dot (pipelined commands)
        self.size = 0  # octets passed on (dot-stuffed, normalised)

    def _fail(self, failure: DataFailure) -> None:
        if self.failure is None:
            self.failure = failure

    def feed(self, chunk: bytes) -> bytes:
        """Take the next chunk from the client; return what the next hop gets now (maybe nothing)."""
        if self.done:
            raise RuntimeError("DATA already ended")
        data = self._carry + chunk if self._carry else chunk
        self._carry = b""
        if self._skipping:
            newline = data.find(b"\n")
            if newline < 0:
                # Keep a final CR: the LF that ends this line may come in the next chunk, and whether
                # the line ended in CRLF decides whether a "." after it ends DATA.
                self._carry = b"\r" if data.endswith(b"\r") else b""
                return b""
            self._after_crlf = newline > 0 and data[newline - 1] == 0x0D
            data = data[newline + 1 :]
            self._skipping = False
        last = data.rfind(b"\n")
        if last < 0:
            self._hold(data)
            return b""
        lines, tail = data[: last + 1], data[last + 1 :]
        end = self._find_end(lines)
        if end >= 0:
            self.done = True
            self.leftover = lines[end + 3 :] + tail
            lines = lines[:end]
        else:
            self._hold(tail)
        if not lines:
            return b""
        out = self._lines(lines)
        if self.failure is not None:
            return b""
        self.size += len(out)
        if self._size_limit is not None and self.size > self._size_limit:
            self._fail(DataFailure.TOO_BIG)
            return b""
        return out

    def _hold(self, tail: bytes) -> None:
        if len(tail) >= self._line_limit:
            self._fail(DataFailure.LINE_TOO_LONG)
            self._skipping = True
            self._carry = b"\r" if tail.endswith(b"\r") else b""
        else:
            self._carry = tail

    def _find_end(self, lines: bytes) -> int:
        """Where the line "." that ends DATA starts in `lines` (complete lines), or -1."""
        if self._after_crlf and lines.startswith(b".\r\n"):
            return 0
        found = lines.find(b"\r\n.\r\n")
        return found + 2 if found >= 0 else -1

    def _lines(self, lines: bytes) -> bytes:
        # `lines` starts at a line start and ends with LF. Every CR is followed by LF and every LF
        # preceded by CR exactly when the CRs' places, shifted on by one, are the LFs' places: two
        # table lookups per octet and a memcmp, about half the cost of counting CRLF, CR and LF (three
        # scans, CRLF's the slowest), which at 10 MiB was most of the gateway's CPU per message.
        if (
            lines[:1] != b"\n"
            and b"\x00" not in lines
            and _crlf_only(lines)
            and (self._after_crlf or not lines.startswith(b".\r\n"))
        ):
            # The fast path: only CRLF line ends, no NUL. Check line lengths only when a line could be long.
            if len(lines) >= self._line_limit and self._has_long_line(lines):
                self._fail(DataFailure.LINE_TOO_LONG)
                return b""
            self._after_crlf = True
            return lines
        return self._slow_lines(lines)

    def _has_long_line(self, lines: bytes) -> bool:
        """Whether a line (CRLF included) is over the limit: from each line end, the last newline within
        the next `limit` octets must exist. One C-speed rfind per `limit` octets, not one per line."""
        limit = self._line_limit
        rfind = lines.rfind
        end = len(lines)
        last = -1  # the newline before the first line (the chunk starts at a line start)
        while end - last - 1 > limit:
            newline = rfind(b"\n", last + 1, last + 1 + limit)
            if newline < 0:
                return True
            last = newline
        return False

    def _slow_lines(self, lines: bytes) -> bytes:
        out: list[bytes] = []
        start = 0
        after_crlf = self._after_crlf
        limit = self._line_limit
        while start < len(lines):
            newline = lines.index(b"\n", start)
            line = lines[start:newline]
            start = newline + 1
            ends_crlf = line.endswith(b"\r")
            if ends_crlf:
                line = line[:-1]
            elif self._mode is BareNewline.REJECT:
                self._fail(DataFailure.BARE_NEWLINE)
                return b""
            if len(line) + 2 > limit:
                self._fail(DataFailure.LINE_TOO_LONG)
                return b""
            if line == b".":
                # Not the end of DATA (that was found before): a dot-stuffed empty line, sent as one.
                line = b""
            elif b"\r" in line or b"\x00" in line:
                line = _STRAY.sub(b" ", line)
            out.append(line)
            after_crlf = ends_crlf
        self._after_crlf = after_crlf
        out.append(b"")
        return b"\r\n".join(out)


def _crlf_only(lines: bytes) -> bool:
    """Whether every CR in `lines` is followed by LF and every LF after its first octet preceded by CR:
    the CRs' places, shifted on by one, are the LFs' places. Compared a window at a time, so that no
    copy is large enough to be a fresh mmap (whose page faults cost more than the scan saves)."""
    end = len(lines) - 1
    for start in range(0, end, _WINDOW):
        stop = min(start + _WINDOW, end)
        if lines[start:stop].translate(_CR_PLACES) != lines[start + 1 : stop + 1].translate(_LF_PLACES):
            return False
    return True


_WINDOW = 32 * 1024


# ------------------------------------------------------------------------------------------------ commands

# RFC 5321 §4.1.2 esmtp-param: keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-");
# value = 1*(%d33-60 / %d62-126)
_PARAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*(?:=[!-<>-~]+)?\Z")
# The fast path for a path: "<" printable ASCII without space, quote, backslash or angle brackets ">".
_SIMPLE_PATH = re.compile(r"<([!#-;=?-\[\]-~]*)>(?: +(.*))?\Z", re.DOTALL)
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*\Z")  # RFC 3461 §4: xtext
_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})


@dataclass(frozen=True)
class MailCommand:
    path: str  # the reverse-path as the client wrote it, without the angle brackets ("" = null sender)
    sender: Address | None  # None: the null sender
    params: tuple[str, ...]  # each as the client wrote it (passed on unchanged)
    size: int | None = None
    eight_bit: bool = False  # BODY=8BITMIME
    smtputf8: bool = False
    dsn: bool = False  # RET or ENVID given


@dataclass(frozen=True)
class RcptCommand:
    path: str  # the forward-path as the client wrote it, without the angle brackets
    recipient: Address
    params: tuple[str, ...]
    dsn: bool = False  # NOTIFY or ORCPT given
    # RFC 5321 §4.5.1: "RCPT TO:<Postmaster>", with no domain, must be accepted. `recipient` is then
    # postmaster at our host name, for whatever looks at it; it is sent on as the client wrote it.
    bare_postmaster: bool = False


# XFORWARD (Postfix's XFORWARD_README): the attributes we pass on to a next hop that offers it.
XFORWARD_ATTRIBUTES = ("NAME", "ADDR", "PROTO", "HELO")
XFORWARD_OFFER = "XFORWARD " + " ".join(XFORWARD_ATTRIBUTES)
_XFORWARD_VALUE_MAX = 255  # octets, as Postfix's smtpd allows


def parse_xforward(arg: str) -> dict[str, str]:
    """XFORWARD's "NAME=value ..." → {NAME: value}, names upper-cased, values kept as xtext (they go on
    to the next hop as they came). Raises ValueError with the 501 text for anything else."""
    attributes: dict[str, str] = {}
    words = arg.split()
    if not words:
        raise ValueError("Syntax: XFORWARD attribute=value...")
    for word in words:
        name, equals, value = word.partition("=")
        name = name.upper()
        if not equals or name not in XFORWARD_ATTRIBUTES:
            raise ValueError(f"Bad XFORWARD attribute name: {word[:40]}")
        if not value or len(value) > _XFORWARD_VALUE_MAX or not _XTEXT.match(value):
            raise ValueError(f"Bad XFORWARD attribute value for {name}: not xtext of 1 to 255 octets")
        attributes[name] = value
    return attributes


class CommandError(Exception):
    """A MAIL or RCPT we cannot take; carries the reply (never shown to anyone but the client)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True)
class Offer:
    """The ESMTP extensions offered in EHLO: ours, cut down to what the next hop can carry."""

    size: int | None  # our limit (0: none); None: do not advertise SIZE
    eight_bit: bool
    smtputf8: bool
    dsn: bool
    starttls: bool


def parse_mail(arg: str, offer: Offer | None, esmtp: bool) -> MailCommand:
    """MAIL's argument ("FROM:<path> params"), checked against what EHLO offered; raises CommandError."""
    if arg[:5].upper() != "FROM:":
        raise CommandError(replies.MAIL_SYNTAX)
    path, params = _split_path(arg[5:], esmtp)
    sender = _address(path, null_ok=True)
    size: int | None = None
    eight_bit = smtputf8 = dsn = False
    seen: set[str] = set()
    for param in params:
        keyword, _, value = param.partition("=")
        keyword = keyword.upper()
        if keyword in seen:
            raise CommandError(replies.duplicate_parameter("MAIL", keyword))
        seen.add(keyword)
        if keyword == "SIZE" and offer and offer.size is not None:
            if not value.isdigit():
                raise CommandError(replies.BAD_SIZE)
            size = int(value)
            # RFC 1870: refuse at MAIL what we (or the next hop, per the SIZE we offered) cannot take.
            if offer.size and size > offer.size:
                raise CommandError(replies.MESSAGE_TOO_BIG)
        elif keyword == "BODY" and offer and offer.eight_bit:
            if value.upper() not in ("7BIT", "8BITMIME"):
                raise CommandError(replies.BAD_BODY)
            eight_bit = value.upper() == "8BITMIME"
        elif keyword == "SMTPUTF8" and offer and offer.smtputf8:
            if value:
                raise CommandError(replies.BAD_SMTPUTF8)
            smtputf8 = True
        elif keyword == "RET" and offer and offer.dsn:
            if value.upper() not in ("FULL", "HDRS"):
                raise CommandError(replies.BAD_RET)
            dsn = True
        elif keyword == "ENVID" and offer and offer.dsn:
            if not value or len(value) > 100 or not _XTEXT.match(value):
                raise CommandError(replies.BAD_ENVID)
            dsn = True
        else:
            raise CommandError(replies.unknown_parameter("MAIL", keyword))
    if not smtputf8 and not path.isascii():
        raise CommandError(replies.NEEDS_SMTPUTF8)
    return MailCommand(path, sender, params, size, eight_bit, smtputf8, dsn)


def parse_rcpt(arg: str, mail: MailCommand, offer: Offer | None, esmtp: bool, hostname: str) -> RcptCommand:
    """RCPT's argument ("TO:<path> params") within the transaction `mail` began; raises CommandError."""
    if arg[:3].upper() != "TO:":
        raise CommandError(replies.RCPT_SYNTAX)
    path, params = _split_path(arg[3:], esmtp)
    bare_postmaster = path.lower() == "postmaster"
    recipient = Address("postmaster", hostname) if bare_postmaster else _address(path, null_ok=False)
    assert recipient is not None
    dsn = False
    seen: set[str] = set()
    for param in params:
        keyword, _, value = param.partition("=")
        keyword = keyword.upper()
        if keyword in seen:
            raise CommandError(replies.duplicate_parameter("RCPT", keyword))
        seen.add(keyword)
        if keyword == "NOTIFY" and offer and offer.dsn:
            words = value.upper().split(",")
            if not (words == ["NEVER"] or (words and set(words) <= _NOTIFY_WORDS)):
                raise CommandError(replies.BAD_NOTIFY)
            dsn = True
        elif keyword == "ORCPT" and offer and offer.dsn:
            kind, semi, address = value.partition(";")
            if not semi or not kind or len(value) > 500 or not _XTEXT.match(address):
                raise CommandError(replies.BAD_ORCPT)
            dsn = True
        else:
            raise CommandError(replies.unknown_parameter("RCPT", keyword))
    if not mail.smtputf8 and not path.isascii():
        raise CommandError(replies.NEEDS_SMTPUTF8)
    return RcptCommand(path, recipient, params, dsn, bare_postmaster)


def _split_path(text: str, esmtp: bool) -> tuple[str, tuple[str, ...]]:
    """The path inside <...> and the parameters after it (each as written)."""
    text = text.lstrip(" ")  # "MAIL FROM: <a@b>" is common enough to accept (Postfix does)
    match = _SIMPLE_PATH.match(text)
    if match is not None:
        path, rest = match.group(1), match.group(2)
    else:
        # The unusual: quoted local parts, source routes, the null path with parameters.
        if not text.startswith("<"):
            raise CommandError(replies.PATH_SYNTAX)
        end = _closing_bracket(text)
        if end < 0:
            raise CommandError(replies.MALFORMED_PATH)
        path, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(" "):
            raise CommandError(replies.MALFORMED_PATH)
        rest = rest.strip(" ")
    params: tuple[str, ...] = ()
    if rest:
        if not esmtp:
            raise CommandError(replies.PARAMETERS_NEED_EHLO)
        params = tuple(rest.split())
        for param in params:
            if not _PARAM.match(param):
                raise CommandError(replies.PARAMETER_SYNTAX)
    return path, params


def _closing_bracket(text: str) -> int:
    """Where the ">" that closes the path opened at text[0] is: outside quotes, not escaped; or -1."""
    quoted = escaped = False
    for index in range(1, len(text)):
        char = text[index]
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
    return -1


def _address(path: str, null_ok: bool) -> Address | None:
    try:
        address = parse_path(f"<{path}>")
    except AddressError as error:
        raise CommandError(replies.malformed_address(error.status_hint)) from None
    if address is None and not null_ok:
        raise CommandError(replies.NULL_RECIPIENT)
    return address


# ------------------------------------------------------------------------------------------------ events


class Event:
    """What the client's bytes mean, one at a time (`ServerConnection.next_event`)."""

    __slots__ = ()


class NeedData(Event):
    """Nothing more until more bytes arrive."""

    __slots__ = ()


class Paused(Event):
    """Nothing more until the command in hand is answered (its reply decides what comes next)."""

    __slots__ = ()


NEED_DATA = NeedData()
PAUSED = Paused()


@dataclass(frozen=True, slots=True)
class Helo(Event):
    name: str


@dataclass(frozen=True, slots=True)
class Ehlo(Event):
    name: str  # answered with `Offer` (the core writes the reply)


@dataclass(frozen=True, slots=True)
class Mail(Event):
    command: MailCommand


@dataclass(frozen=True, slots=True)
class Rcpt(Event):
    command: RcptCommand


@dataclass(frozen=True, slots=True)
class Data(Event):
    """DATA, in sequence: a 354 starts the message."""


@dataclass(frozen=True, slots=True)
class Rset(Event):
    pass


@dataclass(frozen=True, slots=True)
class Noop(Event):
    pass


@dataclass(frozen=True, slots=True)
class Quit(Event):
    pass


@dataclass(frozen=True, slots=True)
class Vrfy(Event):
    arg: str


@dataclass(frozen=True, slots=True)
class Expn(Event):
    arg: str


@dataclass(frozen=True, slots=True)
class Help(Event):
    arg: str


@dataclass(frozen=True, slots=True)
class XForward(Event):
    attributes: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class StartTls(Event):
    """STARTTLS, allowed here: a 220 makes the core discard what was pipelined after it."""


@dataclass(frozen=True, slots=True)
class Refused(Event):
    """A command the core itself refuses (syntax, sequence, a line too long, an unknown verb): send
    `reply`. `close`: the reply ends the session (the core says 421 after too many unknown commands)."""

    reply: Reply
    close: bool = False


@dataclass(frozen=True, slots=True)
class DataChunk(Event):
    data: bytes  # the next part of the message as the next hop gets it (dot-stuffed, CRLF lines)


@dataclass(frozen=True, slots=True)
class EndOfData(Event):
    failure: DataFailure | None  # None: the message is whole; else DATA_FAILURE_REPLIES[failure]


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The client ended its side (mid-DATA: the message is incomplete), or the session is over."""


class _Connect(Event):
    """The greeting, owed before anything else."""

    __slots__ = ()


# ------------------------------------------------------------------------------------------------ replies


class WireReply(Protocol):
    """A reply from elsewhere (the next hop's, multi-line kept)."""

    @property
    def code(self) -> int: ...

    def wire(self) -> str: ...


AnyReply = Reply | WireReply | Offer


class State(enum.Enum):
    CONNECTED = "connected"  # the greeting is owed
    COMMAND = "command"  # reading commands (HELO or not, in a transaction or not)
    DATA = "data"  # reading the message
    TLS = "tls"  # 220 to STARTTLS sent; the handshake is the edge's
    CLOSED = "closed"


class ProtocolError(Exception):
    """The edge sent a reply the state does not allow: a bug in the edge, never the client's doing."""


@dataclass(frozen=True)
class Limits:
    command_line: int = 2048  # octets, CRLF included: RFC 5321 512 + RFC 1870/3461/6531 parameters
    data_line: int = 1000  # RFC 5321 §4.5.3.1.6, CRLF included
    message_size: int | None = 10_240_000  # Postfix message_size_limit
    recipients: int = 1000  # Postfix smtpd_recipient_limit (accepted or owed)
    unknown_commands: int = 10  # like aiosmtpd's and Postfix's junk command limit
    bare_newline: BareNewline = BareNewline.NORMALIZE


_NO_ARG_VERBS = frozenset({"RSET", "DATA"})


class ServerConnection:
    """One client connection's SMTP state: `receive_data`, `next_event`, `send`."""

    def __init__(
        self,
        hostname: str,
        limits: Limits = Limits(),
        tls_available: bool = False,
        xforward: bool = False,
    ) -> None:
        self.hostname = hostname
        self.limits = limits
        self.tls_available = tls_available
        self.xforward = xforward  # the client may send XFORWARD (and EHLO offers it)
        self.state = State.CONNECTED
        self.tls_active = False
        self.helo: str | None = None
        self.esmtp = False
        self.offer: Offer | None = None
        self.mail: MailCommand | None = None
        self.rcpt_count = 0  # RCPT commands in this transaction that were passed on
        # Recipients accepted, or whose answer is still owed: what `recipients` counts (as Postfix's
        # smtpd_recipient_limit counts accepted ones, so refused guesses do not use it up).
        self.rcpt_taken = 0
        self._buffer = bytearray()
        self._eof = False
        self._skipping = False  # inside an over-long command line, dropped as it arrives
        self._unknown = 0
        self._owed: deque[Event] = deque([_Connect()])  # commands awaiting their reply, in order
        self._deciding = 1  # of those, the ones whose reply decides what comes next (all but RCPT)
        self._queued: deque[Event] = deque()  # events found but not yet given out
        self._decoder: DataDecoder | None = None
        self._chunks: deque[bytes] = deque()  # DATA as received, not yet decoded

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; b"" is the end of its stream."""
        if not data:
            self._eof = True
        elif self.state is State.DATA:
            self._chunks.append(data)
        elif self.state is State.COMMAND:
            self._buffer += data
        # CONNECTED: nothing is read before the greeting. TLS: what comes in the clear after STARTTLS
        # is an injection (CVE-2011-0411). CLOSED: nobody listens. All three: dropped.

    @property
    def buffered_command(self) -> bool:
        """A whole command line is waiting: the client is pipelining (RFC 2920)."""
        return self.state is State.COMMAND and b"\n" in self._buffer

    @property
    def buffered_octets(self) -> int:
        """What the client sent that is not handled yet (the edge stops reading past a limit)."""
        return len(self._buffer) + sum(len(chunk) for chunk in self._chunks)

    @property
    def in_data(self) -> bool:
        """The client is sending its message (the edge's DATA timeout applies)."""
        return self.state is State.DATA

    @property
    def owed(self) -> int:
        """Replies the edge still owes."""
        return len(self._owed)

    def next_event(self) -> Event:
        if self._queued:
            return self._queued.popleft()
        state = self.state
        if state is State.COMMAND:
            if self._deciding:
                return PAUSED
            return self._next_command()
        if state is State.DATA:
            return self._next_data()
        if state is State.CLOSED:
            return ConnectionClosed()
        return PAUSED  # CONNECTED (greeting owed), TLS (handshake in hand)

    def _next_command(self) -> Event:
        buffer = self._buffer
        newline = buffer.find(b"\n")
        if self._skipping:
            if newline < 0:
                buffer.clear()
                return ConnectionClosed() if self._eof else NEED_DATA
            del buffer[: newline + 1]
            self._skipping = False
            return self._owe(Refused(replies.LINE_TOO_LONG))
        if newline < 0:
            if len(buffer) >= self.limits.command_line:
                # Whatever ends this line, it is over the limit: drop it as it comes.
                self._skipping = True
                buffer.clear()
            return ConnectionClosed() if self._eof else NEED_DATA
        line = bytes(buffer[: newline + 1])
        del buffer[: newline + 1]
        if len(line) > self.limits.command_line:
            return self._owe(Refused(replies.LINE_TOO_LONG))
        event = self._owe(self._command(line))
        if self._unknown >= self.limits.unknown_commands:
            self._queued.append(self._owe(Refused(replies.TOO_MANY_ERRORS, close=True)))
        return event

    def _owe(self, event: Event) -> Event:
        self._owed.append(event)
        if not isinstance(event, Rcpt):
            self._deciding += 1
        return event

    def _command(self, line: bytes) -> Event:
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if b"\r" in line or b"\x00" in line:
            return Refused(replies.BARE_CR_OR_NUL)
        verb_bytes, _, rest = line.partition(b" ")
        verb = verb_bytes.decode("ascii", "replace").upper()
        stripped = rest.strip()
        arg = stripped.decode("utf-8", "surrogateescape") if stripped else ""
        if verb in _NO_ARG_VERBS and arg:
            return Refused(replies.no_argument(verb))
        if verb == "HELO" or verb == "EHLO":
            if not arg:
                return Refused(replies.helo_syntax(verb))
            return Helo(arg) if verb == "HELO" else Ehlo(arg)
        if verb == "MAIL":
            if self.helo is None:
                return Refused(replies.HELO_FIRST)
            if self.mail is not None:
                return Refused(replies.NESTED_MAIL)
            try:
                return Mail(parse_mail(arg, self.offer, self.esmtp))
            except CommandError as error:
                return Refused(error.reply)
        if verb == "RCPT":
            if self.mail is None:
                return Refused(replies.NEED_MAIL)
            try:
                rcpt = parse_rcpt(arg, self.mail, self.offer, self.esmtp, self.hostname)
            except CommandError as error:
                return Refused(error.reply)
            if self.rcpt_taken >= self.limits.recipients:
                return Refused(replies.TOO_MANY_RECIPIENTS)
            self.rcpt_count += 1
            self.rcpt_taken += 1
            return Rcpt(rcpt)
        if verb == "DATA":
            if self.mail is None:
                return Refused(replies.NEED_MAIL)
            if self.rcpt_count == 0:
                return Refused(replies.NEED_RCPT)
            return Data()
        if verb == "RSET":
            return Rset()
        if verb == "NOOP":
            return Noop()
        if verb == "QUIT":
            return Quit()
        if verb == "VRFY":
            return Vrfy(arg)
        if verb == "EXPN":
            return Expn(arg)
        if verb == "HELP":
            return Help(arg)
        if verb == "XFORWARD":
            # Postfix's XFORWARD_README: between transactions only, and only from a client we trust.
            if not self.xforward:
                return Refused(replies.XFORWARD_NOT_AUTHORIZED)
            if self.mail is not None:
                return Refused(replies.MAIL_IN_PROGRESS)
            try:
                return XForward(parse_xforward(arg))
            except ValueError as error:
                return Refused(replies.bad_xforward(str(error)))
        if verb == "STARTTLS":
            if not self.tls_available or self.tls_active:
                return Refused(replies.STARTTLS_NOT_AVAILABLE)
            if arg:
                return Refused(replies.no_argument(verb))
            return StartTls()
        self._unknown += 1
        return Refused(replies.UNKNOWN_COMMAND)

    def _next_data(self) -> Event:
        decoder = self._decoder
        assert decoder is not None
        while self._chunks:
            out = decoder.feed(self._chunks.popleft())
            if decoder.done:
                self._end_data(decoder)
                end = self._owe(EndOfData(decoder.failure))
                if out and decoder.failure is None:
                    self._queued.append(end)
                    return DataChunk(out)
                return end
            if out and decoder.failure is None:
                return DataChunk(out)
        if self._eof:
            # The client went away mid-DATA: nothing was accepted, nothing may be delivered.
            self.state = State.CLOSED
            return ConnectionClosed()
        return NEED_DATA

    def _end_data(self, decoder: DataDecoder) -> None:
        # Commands the client pipelined after the final dot (QUIT) are read as commands.
        self.state = State.COMMAND
        self._buffer = bytearray(decoder.leftover)
        for chunk in self._chunks:
            self._buffer += chunk
        self._chunks.clear()
        self._decoder = None

    # ------------------------------------------------------------------ output

    def send(self, reply: AnyReply) -> bytes:
        """The reply to the oldest command still owed one; returns the bytes to write. A 421 may be
        sent at any time: it ends the session (timeout, shutdown, too many errors)."""
        if self.state is State.CLOSED:
            raise ProtocolError("the session is over")
        if isinstance(reply, Offer):
            code = 250
        else:
            code = reply.code
        if code == 421:
            self.state = State.CLOSED
            self._owed.clear()
            self._deciding = 0
            self._queued.clear()
            return _wire(reply, self)
        if not self._owed:
            raise ProtocolError(f"a {code} reply to no command")
        event = self._owed[0]
        if not _fits(event, reply, code):
            raise ProtocolError(f"{code} is no reply to {type(event).__name__}")
        self._owed.popleft()
        if not isinstance(event, Rcpt):
            self._deciding -= 1
        wire = _wire(reply, self)
        self._advance(event, reply, code)
        return wire

    def _advance(self, event: Event, reply: AnyReply, code: int) -> None:
        positive = code < 400
        if isinstance(event, _Connect):
            self.state = State.COMMAND if positive else State.CLOSED
        elif isinstance(event, Rcpt):
            if not positive:
                self.rcpt_taken -= 1
        elif isinstance(event, Mail):
            if positive:
                self.mail = event.command
                self.rcpt_count = self.rcpt_taken = 0
        elif isinstance(event, Helo | Ehlo):
            self._reset_transaction()
            if positive:
                self.helo, self.esmtp = event.name, isinstance(event, Ehlo)
                self.offer = reply if isinstance(reply, Offer) else None
        elif isinstance(event, Data):
            if code == 354:
                self.state = State.DATA
                limits = self.limits
                self._decoder = DataDecoder(limits.message_size, limits.data_line, limits.bare_newline)
                if self._buffer:
                    self._chunks.append(bytes(self._buffer))
                    self._buffer.clear()
            else:
                self._reset_transaction()
        elif isinstance(event, EndOfData | Rset):
            self._reset_transaction()
        elif isinstance(event, Quit):
            self._reset_transaction()
            self.state = State.CLOSED
        elif isinstance(event, StartTls):
            if positive:
                # RFC 3207 §4.2: nothing the client sent before the handshake counts after it.
                self._reset_transaction()
                self._buffer.clear()
                self._queued.clear()
                self.state = State.TLS
        elif isinstance(event, Refused) and event.close:
            self.state = State.CLOSED

    def _reset_transaction(self) -> None:
        self.mail = None
        self.rcpt_count = self.rcpt_taken = 0

    def tls_started(self) -> None:
        """The handshake after STARTTLS is done: the session starts over, without its EHLO."""
        if self.state is not State.TLS:
            raise ProtocolError("no STARTTLS in hand")
        self.state = State.COMMAND
        self.tls_active = True
        self.helo = None
        self.esmtp = False
        self.offer = None

    def ehlo_lines(self, offer: Offer) -> list[str]:
        """What EHLO says for `offer` (STARTTLS only until TLS is on; XFORWARD only to trusted clients)."""
        lines = [self.hostname, "PIPELINING"]
        if offer.size is not None:
            lines.append(f"SIZE {offer.size}")
        if offer.eight_bit:
            lines.append("8BITMIME")
        if offer.smtputf8:
            lines.append("SMTPUTF8")
        if offer.dsn:
            lines.append("DSN")
        if offer.starttls and self.tls_available and not self.tls_active:
            lines.append("STARTTLS")
        if self.xforward:
            lines.append(XFORWARD_OFFER)
        lines.append("ENHANCEDSTATUSCODES")
        return lines


def _fits(event: Event, reply: AnyReply, code: int) -> bool:
    """Whether `reply` can answer `event` (421 is checked before: it fits anything)."""
    if code < 200 or code > 599:
        return False
    if isinstance(event, Refused):
        return reply == event.reply  # the core's refusals are sent as they are
    if isinstance(reply, Offer):
        return isinstance(event, Ehlo)
    if isinstance(event, Ehlo):
        return code >= 400  # a positive EHLO reply is the Offer (the core writes it)
    if isinstance(event, _Connect):
        return code in (220, 554)
    if code >= 400:
        return not isinstance(event, Quit)
    if isinstance(event, StartTls):
        return code == 220
    if isinstance(event, Quit):
        return code == 221
    if isinstance(event, Data):
        return code == 354
    if isinstance(event, Vrfy):
        return code in (250, 251, 252)
    if isinstance(event, Help):
        return code in (211, 214)
    return 200 <= code < 300 and code not in (220, 221)


def _wire(reply: AnyReply, core: ServerConnection) -> bytes:
    if isinstance(reply, Offer):
        lines = core.ehlo_lines(reply)
        text = "\r\n".join([f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"])
    elif isinstance(reply, Reply):
        text = str(reply)
    else:
        text = reply.wire()
    return text.encode("utf-8", "surrogateescape") + b"\r\n"


__all__ = [
    "DATA_FAILURE_REPLIES",
    "NEED_DATA",
    "PAUSED",
    "BareNewline",
    "CommandError",
    "ConnectionClosed",
    "Data",
    "DataChunk",
    "DataDecoder",
    "DataFailure",
    "Ehlo",
    "EndOfData",
    "Event",
    "Expn",
    "Helo",
    "Help",
    "Limits",
    "Mail",
    "MailCommand",
    "NeedData",
    "Noop",
    "Offer",
    "Paused",
    "ProtocolError",
    "Quit",
    "Rcpt",
    "RcptCommand",
    "Refused",
    "Rset",
    "ServerConnection",
    "StartTls",
    "State",
    "Vrfy",
    "XForward",
    "parse_mail",
    "parse_rcpt",
    "parse_xforward",
]
