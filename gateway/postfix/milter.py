"""The milter protocol, version 6, as Postfix and Sendmail speak it to a mail filter: a sans-IO codec.

Bytes in, typed messages out, replies as values (the style of h11, and of our SMTP core): the asyncio
edge (milterd.py) feeds what it reads to `receive_data`, takes messages from `next_event` until it says
`NEED_DATA`, and writes what `encode` makes of a reply. Nothing here reads a socket or a clock.

The wire, as the public descriptions of the protocol give it (Sendmail's libmilter, Postfix's milter8,
the "Milter 6" notes): every packet is a 4-octet big-endian length, then one command octet, then
length - 1 octets of data. Strings are NUL-terminated. The MTA drives; the filter answers only the
commands that expect an answer: never SMFIC_MACRO, SMFIC_ABORT or the two quits, and none of those whose
reply was negotiated away (SMFIP_NR_*).

Option negotiation (`negotiate`): the MTA offers actions and protocol steps, the filter takes a subset.
We take only the actions we use (change the envelope sender, delete and add recipients, and add them with
ESMTP parameters when offered) and switch off every step we have no use for, so the MTA does not send
them: HELO, DATA, unknown commands, the body, and the headers unless the end-of-message hook wants them
(milterd.MilterService). An MTA that cannot change the envelope sender or the recipients (Postfix before
2.6, a Sendmail built without them) is refused: the filter could not do its job there, and a filter that
silently does nothing is worse than one that is seen to fail.

Bounds: a packet's data is at most MAX_DATA octets, libmilter's MILTER_MAX_DATA_SIZE (65535), the most
every libmilter filter accepts unless it negotiated SMFIP_MDS_256K or _1M, which we do not. Postfix and
Sendmail send the body in chunks of MILTER_CHUNK_SIZE (65535 octets) for that reason, and we switch the
body off anyway. A longer length is refused before anything is buffered.

Garbage (an unknown command octet, a packet too short for its command, a length of zero or over the
bound, a string without its NUL, a version other than 6) is not an exception: it is the `ProtocolError`
event, after which the codec yields nothing more and the edge closes the connection; the MTA then applies
its milter_default_action.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Final

from ..core.replies import Reply

VERSION: Final = 6
MAX_DATA: Final = 65535  # libmilter's MILTER_MAX_DATA_SIZE: the octets after the command octet
_LENGTH = struct.Struct(">I")
_OPTNEG = struct.Struct(">III")


class Act(enum.IntFlag):
    """SMFIF_*: what a filter may do to the message at end of message."""

    ADDHDRS = 0x01
    CHGBODY = 0x02
    ADDRCPT = 0x04
    DELRCPT = 0x08
    CHGHDRS = 0x10
    QUARANTINE = 0x20
    CHGFROM = 0x40
    ADDRCPT_PAR = 0x80
    SETSYMLIST = 0x100


class Step(enum.IntFlag):
    """SMFIP_*: the protocol steps the MTA may leave out (NO*), or send without waiting for a reply (NR_*)."""

    NOCONNECT = 0x01
    NOHELO = 0x02
    NOMAIL = 0x04
    NORCPT = 0x08
    NOBODY = 0x10
    NOHDRS = 0x20
    NOEOH = 0x40
    NR_HDR = 0x80
    NOUNKNOWN = 0x100
    NODATA = 0x200
    SKIP = 0x400
    RCPT_REJ = 0x800
    NR_CONN = 0x1000
    NR_HELO = 0x2000
    NR_MAIL = 0x4000
    NR_RCPT = 0x8000
    NR_DATA = 0x10000
    NR_UNKN = 0x20000
    NR_EOH = 0x40000
    NR_BODY = 0x80000
    HDR_LEADSPC = 0x100000


# What we must be able to do: CHGFROM signs outbound mail, DELRCPT+ADDRCPT strip a valid tag inbound.
REQUIRED_ACTIONS: Final = Act.CHGFROM | Act.ADDRCPT | Act.DELRCPT
# What we use when offered: ADDRCPT_PAR keeps a stripped recipient's ESMTP parameters (ORCPT, NOTIFY).
OPTIONAL_ACTIONS: Final = Act.ADDRCPT_PAR
# Steps we never want, whether or not we collect headers.
_UNWANTED: Final = Step.NOHELO | Step.NODATA | Step.NOUNKNOWN | Step.NOBODY
# Steps we do not answer, when the MTA can skip the wait: we never refuse at connect or at MAIL, nor on a
# header (the end-of-message hook decides once it has them all).
_NO_REPLY: Final = Step.NR_CONN | Step.NR_MAIL | Step.NR_HDR | Step.NR_EOH


# ------------------------------------------------------------------------------------------ messages in


@dataclass(frozen=True)
class OptNeg:
    version: int
    actions: Act
    steps: Step


@dataclass(frozen=True)
class Macro:
    """Macros that go with the next command (`command` is its octet: "C", "M", "R"...)."""

    command: str
    values: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Connect:
    hostname: str
    family: str  # "4", "6", "L" (a unix socket), "U" (unknown: no port or address follow)
    port: int
    address: str


@dataclass(frozen=True)
class Helo:
    name: str


@dataclass(frozen=True)
class MailFrom:
    address: str  # as the client gave it, in angle brackets: "<a@b>", "<>"
    args: tuple[str, ...]  # ESMTP parameters, "SIZE=100", "BODY=8BITMIME"


@dataclass(frozen=True)
class RcptTo:
    address: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class Data:
    pass


@dataclass(frozen=True)
class Header:
    name: str
    value: str


@dataclass(frozen=True)
class EndOfHeaders:
    pass


@dataclass(frozen=True)
class Body:
    chunk: bytes


@dataclass(frozen=True)
class EndOfMessage:
    chunk: bytes = b""  # libmilter allows a last body chunk here; Postfix and Sendmail send none


@dataclass(frozen=True)
class Abort:
    """The transaction ends without a message; the connection, and its SMTP session, go on."""


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class QuitNewConnection:
    """The SMTP session ended; a new one (a new Connect) follows on the same connection."""


@dataclass(frozen=True)
class Unknown:
    command: str


@dataclass(frozen=True)
class ProtocolError:
    """Garbage: the connection must be closed. `reason` is for the log."""

    reason: str


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

Message = (
    OptNeg
    | Macro
    | Connect
    | Helo
    | MailFrom
    | RcptTo
    | Data
    | Header
    | EndOfHeaders
    | Body
    | EndOfMessage
    | Abort
    | Quit
    | QuitNewConnection
    | Unknown
)
Event = Message | ProtocolError


# ------------------------------------------------------------------------------------------ replies out


@dataclass(frozen=True)
class Continue:
    pass


@dataclass(frozen=True)
class Accept:
    """Accept the message (or recipient) and stop filtering it."""


@dataclass(frozen=True)
class Reject:
    """A permanent refusal with our own reply, sent as SMFIR_REPLYCODE."""

    reply: Reply

    def __post_init__(self) -> None:
        if not self.reply.permanent:
            raise ValueError(f"a reject needs a 5xx reply, not {self.reply.code}")


@dataclass(frozen=True)
class TempFail:
    reply: Reply

    def __post_init__(self) -> None:
        if not self.reply.transient:
            raise ValueError(f"a tempfail needs a 4xx reply, not {self.reply.code}")


@dataclass(frozen=True)
class ChangeFrom:
    """SMFIR_CHGFROM: a new envelope sender, with the MAIL FROM parameters to keep. End of message only."""

    address: str  # without angle brackets; "" is the null sender
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class AddRcpt:
    """SMFIR_ADDRCPT, or SMFIR_ADDRCPT_PAR when there are parameters. End of message only."""

    address: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class DelRcpt:
    address: str  # as the MTA gave it in RcptTo, angle brackets and all


@dataclass(frozen=True)
class Progress:
    """Keeps the MTA waiting at end of message (resets its timeout)."""


@dataclass(frozen=True)
class OptNegReply:
    version: int
    actions: Act
    steps: Step


Response = Continue | Accept | Reject | TempFail | ChangeFrom | AddRcpt | DelRcpt | Progress | OptNegReply


class EncodeError(ValueError):
    """A reply we cannot put on the wire (a NUL in an address, a CR or LF in a reply's text). Only our own
    bug gets here: the addresses come from the MTA and from policy.py."""


def _string(text: str) -> bytes:
    data = text.encode("utf-8", "surrogateescape")
    if b"\0" in data:
        raise EncodeError("a NUL inside a milter string")
    return data + b"\0"


def _packet(command: bytes, data: bytes = b"") -> bytes:
    if len(data) > MAX_DATA:
        raise EncodeError(f"a {command!r} reply of {len(data)} octets is over the {MAX_DATA} a packet holds")
    return _LENGTH.pack(len(data) + 1) + command + data


def _reply_code(reply: Reply) -> bytes:
    text = str(reply)
    if "\r" in text or "\n" in text:
        raise EncodeError("a reply's text holds a line break")
    # libmilter's smfi_setreply asks for "%" doubled: Sendmail formats the text, and Postfix undoes it.
    return _packet(b"y", _string(text.replace("%", "%%")))


def encode(response: Response) -> bytes:
    """The packet for one reply."""
    match response:
        case Continue():
            return _packet(b"c")
        case Accept():
            return _packet(b"a")
        case Reject(reply) | TempFail(reply):
            return _reply_code(reply)
        case ChangeFrom(address, args):
            tail = _string(" ".join(args)) if args else b""
            return _packet(b"e", _string(f"<{address}>") + tail)
        case AddRcpt(address, args):
            if args:
                return _packet(b"2", _string(f"<{address}>") + _string(" ".join(args)))
            return _packet(b"+", _string(f"<{address}>"))
        case DelRcpt(address):
            return _packet(b"-", _string(address))
        case Progress():
            return _packet(b"p")
        case OptNegReply(version, actions, steps):
            return _packet(b"O", _OPTNEG.pack(version, int(actions), int(steps)))
    raise EncodeError(f"not a milter reply: {response!r}")


# ------------------------------------------------------------------------------------------ negotiation


@dataclass(frozen=True)
class Negotiated:
    """What the connection agreed: the reply to send, and what it means for the rest of the connection."""

    reply: OptNegReply
    actions: Act
    steps: Step

    def expects_reply(self, message: Message) -> bool:
        """Whether the MTA waits for a reply to `message`."""
        match message:
            case Macro() | Abort() | Quit() | QuitNewConnection():
                return False
            case Connect():
                return not self.steps & Step.NR_CONN
            case Helo():
                return not self.steps & Step.NR_HELO
            case MailFrom():
                return not self.steps & Step.NR_MAIL
            case RcptTo():
                return not self.steps & Step.NR_RCPT
            case Data():
                return not self.steps & Step.NR_DATA
            case Header():
                return not self.steps & Step.NR_HDR
            case EndOfHeaders():
                return not self.steps & Step.NR_EOH
            case Body():
                return not self.steps & Step.NR_BODY
            case Unknown():
                return not self.steps & Step.NR_UNKN
        return True  # OptNeg, EndOfMessage


def negotiate(offer: OptNeg, headers: bool = False, body: bool = False) -> Negotiated | ProtocolError:
    """Our answer to the MTA's offer. `headers`, `body`: whether the end-of-message hook wants them (the
    ledger reads a bounded prefix of the body; chunks are never answered when the MTA can skip the wait)."""
    if offer.version != VERSION:
        # Postfix's milter_protocol and Sendmail 8.14+ default to 6; an older protocol lacks CHGFROM.
        return ProtocolError(
            f"the MTA speaks milter protocol {offer.version}, not {VERSION} (Postfix: milter_protocol = 6)"
        )
    missing = REQUIRED_ACTIONS & ~offer.actions
    if missing:
        names = ", ".join(f"SMFIF_{a.name}" for a in Act if a & missing)
        return ProtocolError(f"the MTA does not offer {names}; Postfix 2.6 or later, Sendmail 8.14 or later")
    actions = REQUIRED_ACTIONS | (OPTIONAL_ACTIONS & offer.actions)
    unwanted = _UNWANTED if headers else _UNWANTED | Step.NOHDRS | Step.NOEOH
    if body:
        unwanted &= ~Step.NOBODY
    # A NO* step is something the MTA offers to leave out: ask only for those offered.
    steps = (unwanted | _NO_REPLY | (Step.NR_BODY if body else Step(0))) & offer.steps
    reply = OptNegReply(VERSION, actions, steps)
    return Negotiated(reply, actions, steps)


# ------------------------------------------------------------------------------------------ decoding


@dataclass
class MilterDecoder:
    """Splits the MTA's byte stream into messages. After a ProtocolError it yields that error for ever."""

    max_data: int = MAX_DATA
    _buf: bytearray = field(default_factory=bytearray)
    _error: ProtocolError | None = None

    def receive_data(self, data: bytes) -> None:
        if self._error is None:
            self._buf += data

    def next_event(self) -> Event | _NeedData:
        if self._error is not None:
            return self._error
        buf = self._buf
        if len(buf) < 4:
            return NEED_DATA
        (length,) = _LENGTH.unpack_from(buf)
        if length == 0:
            return self._fail("a packet of length 0 (no command octet)")
        if length - 1 > self.max_data:
            return self._fail(f"a packet of {length} octets, over the {self.max_data + 1} allowed")
        if len(buf) < 4 + length:
            return NEED_DATA
        command = bytes(buf[4:5])
        data = bytes(buf[5 : 4 + length])
        del buf[: 4 + length]
        try:
            return _parse(command, data)
        except _Garbage as exc:
            return self._fail(str(exc))

    def _fail(self, reason: str) -> ProtocolError:
        self._error = ProtocolError(reason)
        self._buf.clear()
        return self._error


class _Garbage(Exception):
    pass


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _strings(data: bytes, what: str) -> list[str]:
    """NUL-terminated strings filling the data, each one terminated."""
    if not data.endswith(b"\0"):
        raise _Garbage(f"{what}: a string without its terminating NUL")
    return [_text(part) for part in data[:-1].split(b"\0")]


def _one(data: bytes, what: str) -> str:
    parts = _strings(data, what)
    if len(parts) != 1:
        raise _Garbage(f"{what}: one string expected, got {len(parts)}")
    return parts[0]


def _empty(data: bytes, what: str) -> None:
    if data:
        raise _Garbage(f"{what}: carries {len(data)} octets where none belong")


def _address_args(data: bytes, what: str) -> tuple[str, tuple[str, ...]]:
    parts = _strings(data, what)
    if not parts[0]:
        raise _Garbage(f"{what}: an empty address")
    return parts[0], tuple(parts[1:])


def _connect(data: bytes) -> Connect:
    nul = data.find(b"\0")
    if nul < 0 or nul + 1 >= len(data):
        raise _Garbage("connect: no host name and family")
    hostname = _text(data[:nul])
    family = chr(data[nul + 1])
    rest = data[nul + 2 :]
    if family == "U":
        _empty(rest, "connect (family U)")
        return Connect(hostname, family, 0, "")
    if family not in "46L":
        raise _Garbage(f"connect: unknown address family {family!r}")
    if len(rest) < 3:
        raise _Garbage("connect: no port and address")
    (port,) = struct.unpack_from(">H", rest)
    return Connect(hostname, family, port, _one(rest[2:], "connect"))


def _macro(data: bytes) -> Macro:
    if not data:
        raise _Garbage("macro: no command octet")
    command = chr(data[0])
    rest = data[1:]
    if not rest:
        return Macro(command, ())
    parts = _strings(rest, "macro")
    if len(parts) % 2:
        raise _Garbage("macro: a name without a value")
    return Macro(command, tuple(zip(parts[::2], parts[1::2], strict=True)))


def _parse(command: bytes, data: bytes) -> Message:
    match command:
        case b"O":
            if len(data) < _OPTNEG.size:
                raise _Garbage(f"option negotiation: {len(data)} octets, {_OPTNEG.size} expected")
            # Octets past the three numbers are allowed (and ignored), as libmilter ignores them.
            version, actions, steps = _OPTNEG.unpack_from(data)
            return OptNeg(version, Act(actions), Step(steps))
        case b"D":
            return _macro(data)
        case b"C":
            return _connect(data)
        case b"H":
            return Helo(_one(data, "helo"))
        case b"M":
            return MailFrom(*_address_args(data, "mail"))
        case b"R":
            return RcptTo(*_address_args(data, "rcpt"))
        case b"T":
            _empty(data, "data")
            return Data()
        case b"L":
            parts = _strings(data, "header")
            if len(parts) != 2 or not parts[0]:
                raise _Garbage("header: a name and a value expected")
            return Header(parts[0], parts[1])
        case b"N":
            _empty(data, "end of headers")
            return EndOfHeaders()
        case b"B":
            return Body(data)
        case b"E":
            return EndOfMessage(data)
        case b"A":
            _empty(data, "abort")
            return Abort()
        case b"Q":
            _empty(data, "quit")
            return Quit()
        case b"K":
            _empty(data, "quit, new connection")
            return QuitNewConnection()
        case b"U":
            return Unknown(_one(data, "unknown"))
    raise _Garbage(f"unknown command octet {command!r}")
