"""Message-IDs and the addresses around them, read from a message as the SMTP edge streams it. Pure.

Two feeders, for the Message-ID ledger (`ledger.py`, docs/ledger.md):

- `OutboundHeaders`, on the outbound role: reads the header block of each message we relay and yields its
  Message-ID and the addresses a wanted answer may be sent to (From, Reply-To, Disposition-Notification-To).
  It stops at the end of the header block; the body is never held.
- `InboundReferences`, on the inbound role, for a null-sender message to an untagged address: reads a bounded
  prefix of the message (its header block and the first parts of a multipart/report) and yields the
  Message-IDs it refers to: In-Reply-To and References (RFC 3834 §3.1.5), an MDN's Original-Message-ID
  (RFC 8098 §3.2.5) and the Message-ID in the returned headers of a DSN (RFC 3464 §2, text/rfc822-headers
  or message/rfc822; RFC 6533's message/global-headers and message/global too).

Both take the DATA stream as the edge streams it (`smtpd.DataDecoder.feed`'s output: CRLF lines, still
dot-stuffed, in chunks split anywhere), and undo the dot-stuffing themselves. A line that is a lone dot
ends the stream, so the raw wire stream works too. Neither ever raises on what a client sends: garbage
yields no Message-ID and no reference.

The normal form of a Message-ID (`normalise_message_id`) is `<id-left@id-right>` with the folding white
space and comments gone, id-left kept as it is and id-right lowercased. RFC 5322 §3.6.4 says nothing of
case, but id-right is by convention a domain name (case-insensitive) and id-left a unique string that
generators make (case kept: `<A1@x>` and `<a1@x>` can be two messages). An id without "@" is kept whole,
case and all: the outbound and inbound sides use the same function, so leniency costs nothing but a match.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from email import policy as email_policy
from email.message import Message
from email.parser import BytesHeaderParser, BytesParser

HEADER_LIMIT = 64 * 1024  # octets of header block the outbound side reads; beyond it: no record
SCAN_LIMIT = 256 * 1024  # octets of message the inbound side reads (header block and report parts)
MAX_REFERENCES = 32  # references kept from one message, the nearest first
MAX_ADDRESSES = 16  # addresses kept from one header block
ADDRESS_FIELD_LIMIT = 2048  # characters of one unfolded From/Reply-To/DNT value; a longer one gives none
# The stdlib's address parser costs tens of µs per character on hostile input (measured: docs/ledger.md),
# so only this much of a header block goes to it; the common shapes never do.
STDLIB_PARSE_LIMIT = 1024
MAX_PARTS = 16  # MIME parts looked into, depth first, on the inbound side
_MESSAGE_ID_LIMIT = 998  # RFC 5322 §2.1.1: a line's limit; a longer "id" is not one

_MSGID = re.compile(r"<\s*([^<>\s]+(?:\s+[^<>\s]+)*)\s*>")
_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")
_NOT_IN_ADDRESS = re.compile("[\r\n\0]")


def normalise_message_id(text: str) -> str | None:
    """The first msg-id in a header value, in normal form (see the module's doc), or None."""
    found = message_ids_in(text, limit=1)
    return found[0] if found else None


def message_ids_in(text: str, limit: int = MAX_REFERENCES) -> tuple[str, ...]:
    """Every msg-id in a header value (In-Reply-To, References), normalised, in order, without repeats."""
    if "(" in text:
        # Comments may stand between ids (RFC 5322 §3.6.4 CFWS); one holding "<...>" must not count.
        for _ in range(4):  # nested comments, a bounded number of levels
            text, n = _COMMENT.subn(" ", text)
            if not n:
                break
    seen: list[str] = []
    for match in _MSGID.finditer(text):
        # Folding white space inside an id (a generator that folded a long id) is not part of it.
        inner = "".join(match.group(1).split())
        if len(inner) > _MESSAGE_ID_LIMIT:
            continue
        left, at, right = inner.rpartition("@")
        normal = f"<{left}@{right.lower()}>" if at and left and right else f"<{inner}>"
        if normal not in seen:
            seen.append(normal)
            if len(seen) >= limit:
                break
    return tuple(seen)


def normalise_address(addr_spec: str) -> str | None:
    """An address as the ledger compares it: lowercased whole, or None when it is not local@domain.

    RFC 5321 lets a local part be case-sensitive, but the MTAs behind us fold it, and a responder that
    changed its case would be refused for nothing: the address is in our domain either way.
    """
    addr = addr_spec.strip()
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain or len(addr) > 320 or _NOT_IN_ADDRESS.search(addr):
        return None
    return addr.lower()


class _Lines:
    """CRLF lines out of chunks split anywhere, dot-stuffing undone, a lone dot ending them. Bounded.

    `limit` bounds what is taken (and so the unfinished last line that is held): past it, `over` is set
    and everything after is dropped.
    """

    __slots__ = ("_carry", "blank", "ended", "limit", "over", "stop_at_blank", "taken")

    def __init__(self, limit: int, stop_at_blank: bool = False) -> None:
        self.limit = limit
        self.stop_at_blank = stop_at_blank  # the header block is all that is wanted
        self.blank = False  # the empty line that ends the header block was seen
        self.taken = 0
        self._carry = b""
        self.ended = False  # a lone dot was seen: the message is over
        self.over = False

    def feed(self, chunk: bytes) -> list[bytes]:
        if self.ended or self.over or self.blank or not chunk:
            return []
        data = self._carry + chunk  # the carry is the start of a line, so data[0] starts one too
        if self.stop_at_blank:
            end = _blank_line_end(data)
            if end >= 0:
                data = data[:end]  # nothing after the header block is looked at
        room = self.limit - self.taken
        last = data.rfind(b"\n")
        if last < 0:
            self._carry = data
            if len(data) > room:
                self._carry = b""
                self.over = True
            return []
        self._carry = data[last + 1 :]
        # Past `room` octets nothing can be taken: split not much more than that, but enough that the
        # line crossing the bound is seen and sets `over`. Undoing the dot-stuffing takes at most one
        # octet in three ("..\n" is the shortest such line), so twice `room`, plus one, is enough.
        return self._take(data[: min(last + 1, 2 * room + 2)].splitlines(keepends=True))

    @property
    def started(self) -> bool:
        """Something was fed: a line taken, or the start of one held."""
        return bool(self.taken or self._carry)

    def finish(self) -> list[bytes]:
        """The unfinished last line, if any (a stream that ended without CRLF)."""
        if self.ended or self.over or self.blank or not self._carry:
            return []
        tail, self._carry = self._carry, b""
        return self._take([tail])

    def _take(self, lines: list[bytes]) -> list[bytes]:
        out: list[bytes] = []
        for line in lines:
            if line[:1] == b".":
                if line in (b".\r\n", b".\n", b"."):
                    self.ended = True
                    self._carry = b""
                    break
                line = line[1:]  # RFC 5321 §4.5.2: the client doubled a leading dot
            if self.taken + len(line) > self.limit:
                self.over = True
                self._carry = b""
                break
            self.taken += len(line)
            out.append(line)
            if self.stop_at_blank and line in (b"\r\n", b"\n"):
                self.blank = True  # RFC 5322 §2.1: the empty line ends the header block
                self._carry = b""
                break
        return out


def _blank_line_end(data: bytes) -> int:
    """Where the first empty line (CRLF or LF) of `data` ends, or -1; `data` starts at a line start."""
    if data[:2] == b"\r\n":
        return 2
    if data[:1] == b"\n":
        return 1
    crlf = data.find(b"\n\r\n")
    # A bare-LF blank line is looked for only before the CRLF one (a CRLF stream has none: no full scan).
    lf = data.find(b"\n\n", 0, crlf + 2 if crlf >= 0 else len(data))
    if lf >= 0:
        return lf + 2
    return crlf + 3 if crlf >= 0 else -1


class HeaderStatus(enum.Enum):
    OK = "ok"
    NO_MESSAGE_ID = "no-message-id"  # not ledgered (counted)
    HEADERS_TOO_BIG = "headers-too-big"  # a header block over HEADER_LIMIT: not ledgered (counted)


@dataclass(frozen=True)
class SentHeaders:
    """What the outbound side ledgers from one message's header block."""

    status: HeaderStatus
    message_id: str | None  # normalised
    from_: tuple[str, ...]  # normalised addresses (normalise_address), at most MAX_ADDRESSES in all
    reply_to: tuple[str, ...]
    notify_to: tuple[str, ...]  # Disposition-Notification-To (RFC 8098 §2.1)

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address an answer may be sent to, without repeats."""
        return tuple(dict.fromkeys(self.from_ + self.reply_to + self.notify_to))


class OutboundHeaders:
    """Feed the DATA stream; `done` once the header block is read; then `result()`. Holds ≤ `limit` octets."""

    __slots__ = ("_block", "_lines", "done")

    def __init__(self, limit: int = HEADER_LIMIT) -> None:
        self._lines = _Lines(limit, stop_at_blank=True)
        self._block: list[bytes] = []
        self.done = False

    def feed(self, chunk: bytes) -> None:
        if self.done:
            return
        if not self._lines.started and self._whole_block(chunk):
            return
        self._block.extend(self._lines.feed(chunk))
        if self._lines.ended or self._lines.over or self._lines.blank:
            self.done = True

    def _whole_block(self, chunk: bytes) -> bool:
        """The common case, the whole header block in the first chunk: taken with a few scans, not line
        by line. Only when `_Lines` would take the same octets: no line to un-dot-stuff, no bare CR (which
        `splitlines` would end a line at), within the limit. False: nothing taken, `_Lines` reads it."""
        end = _blank_line_end(chunk)
        if (
            end < 0
            or end > self._lines.limit
            or chunk[:1] == b"."
            or chunk.find(b"\n.", 0, end) >= 0
            or chunk.count(b"\r", 0, end) != chunk.count(b"\r\n", 0, end)
        ):
            return False
        self._block.append(chunk[:end])
        self._lines.taken = end
        self._lines.blank = True
        self.done = True
        return True

    def result(self) -> SentHeaders:
        """What the header block says (also when the stream ended inside it: a message with no body)."""
        if not self.done:
            self._block.extend(self._lines.finish())
            self.done = True
        if self._lines.over:
            return SentHeaders(HeaderStatus.HEADERS_TOO_BIG, None, (), (), ())
        fields = header_fields(b"".join(self._block), _SENT_FIELDS)
        message_id = next(filter(None, map(normalise_message_id, fields["message-id"])), None)
        budget = _Budget()
        from_ = _addresses(fields["from"], budget)
        reply_to = _addresses(fields["reply-to"], budget)
        notify_to = _addresses(fields["disposition-notification-to"], budget)
        status = HeaderStatus.OK if message_id else HeaderStatus.NO_MESSAGE_ID
        return SentHeaders(status, message_id, from_, reply_to, notify_to)


def _parse_headers(block: bytes) -> Message | None:
    try:
        return BytesHeaderParser(policy=email_policy.compat32).parsebytes(block + b"\r\n")
    except Exception:  # garbage from a client yields nothing; it never raises
        return None


def _raw_values(msg: Message, name: str) -> list[str]:
    try:
        return [str(value) for value in msg.get_all(name, [])]
    except Exception:
        return []


_SENT_FIELDS = ("message-id", "from", "reply-to", "disposition-notification-to")


def header_fields(block: bytes, names: Iterable[str]) -> dict[str, list[str]]:
    """The values of the named fields (lower-case names) in a header block, unfolded (RFC 5322 §2.2.3).

    Not the stdlib's parser: on the outbound path it runs for every message. One regular expression finds
    the wanted fields' lines and their continuations, so the other lines (Received, DKIM-Signature, ...)
    cost a scan in C rather than a split and a lookup each. Octets that are not UTF-8 stay as surrogates.
    """
    wanted: dict[str, list[str]] = {name: [] for name in names}
    for match in _field_pattern(tuple(wanted)).finditer(block.decode("utf-8", "surrogateescape")):
        values = wanted[match.group(1).lower()]
        if len(values) >= MAX_ADDRESSES:
            continue
        value = match.group(2)
        if "\n" in value:  # folded: each line's CR dropped, the lines joined
            value = "".join(line.removesuffix("\r") for line in value.split("\n"))
        else:
            value = value.removesuffix("\r")
        values.append(value)
    return wanted


@functools.lru_cache(maxsize=8)
def _field_pattern(names: tuple[str, ...]) -> re.Pattern[str]:
    # A line that starts with a wanted name, and the continuation lines (starting with WSP) after it.
    # ASCII case folding: str.lower() of a name, as the lookup above does, never maps a non-ASCII letter
    # onto these names' letters, and re.IGNORECASE without re.ASCII would (U+017F folds to "s").
    alternatives = "|".join(re.escape(name) for name in names)
    return re.compile(
        rf"^({alternatives})[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)", re.IGNORECASE | re.ASCII | re.MULTILINE
    )


# A list of addresses in the common shapes, `Name <local@domain>`, `"Last, First" <local@domain>` or
# `local@domain`: no comments, groups, escapes or route addresses. Anything else goes to the stdlib's
# parser. Atoms never hold white space or quotes and the space between words is required: no two ways to
# match, so no backtracking blow-up on a long hostile display name.
_ATOMS = r'[^\x00-\x20"(),:;<>@\[\\\]\x7f]+'
_WORD = rf'(?:{_ATOMS}|"[^"\\\r\n]*")'
_ITEM = rf"[ \t]*(?:(?:{_WORD}(?:[ \t]+{_WORD})*[ \t]*)?<({_ATOMS}@{_ATOMS})>|({_ATOMS}@{_ATOMS}))[ \t]*"
_SIMPLE_ITEM = re.compile(_ITEM)
_SIMPLE_LIST = re.compile(rf"{_ITEM}(?:,{_ITEM})*")


def _simple_addresses(value: str) -> list[str] | None:
    """The addr-specs of a list in the common shapes, or None when it is not one."""
    if not _SIMPLE_LIST.fullmatch(value):
        return None
    specs, pos = [], 0
    while pos < len(value):
        item = _SIMPLE_ITEM.match(value, pos)
        if item is None:  # cannot happen after the fullmatch; the stdlib decides then
            return None
        specs.append(item.group(1) or item.group(2))
        pos = item.end() + 1  # past the comma
    return specs


class _Budget:
    __slots__ = ("addresses", "stdlib")

    def __init__(self) -> None:
        self.addresses = MAX_ADDRESSES
        self.stdlib = STDLIB_PARSE_LIMIT


def _addresses(values: list[str], budget: _Budget) -> tuple[str, ...]:
    """The addr-specs of an address field; the stdlib's RFC 5322 parser for all but the simplest shapes
    (groups, comments, quoted and encoded display names), within its budget. A value it cannot parse,
    or one over the limits, gives no address."""
    found: list[str] = []
    for value in values:
        if len(value) > ADDRESS_FIELD_LIMIT:
            continue
        simple = _simple_addresses(value)
        if simple is not None:
            specs = simple
        elif len(value) <= budget.stdlib:
            budget.stdlib -= len(value)
            try:
                # Parsed as an address-list (the To: grammar): Disposition-Notification-To is not in the
                # stdlib's registry, and From (a mailbox-list) is a subset of it.
                header = email_policy.default.header_factory("To", value.replace("\r", " "))
                specs = [address.addr_spec for address in header.addresses]
            except Exception:  # a value it cannot parse gives no address
                specs = []
        else:
            specs = []
        for spec in specs:
            normal = normalise_address(spec)
            if normal and normal not in found and budget.addresses > 0:
                found.append(normal)
                budget.addresses -= 1
    return tuple(found)


class ReferenceSource(enum.Enum):
    IN_REPLY_TO = "in-reply-to"
    REFERENCES = "references"
    MDN_ORIGINAL = "mdn-original-message-id"
    DSN_RETURNED = "dsn-returned-headers"


class MessageKind(enum.Enum):
    """For the log line: what the null-sender message says it is."""

    DSN = "dsn"
    MDN = "mdn"
    AUTO_REPLY = "auto-reply"  # Auto-Submitted other than "no" (RFC 3834 §5)
    OTHER = "other"


@dataclass(frozen=True)
class Reference:
    message_id: str  # normalised
    source: ReferenceSource


@dataclass(frozen=True)
class FoundReferences:
    references: tuple[Reference, ...]  # the nearest first, without repeated ids, at most MAX_REFERENCES
    kind: MessageKind
    exceeded: bool  # the scan stopped at its bound before the message ended

    @property
    def message_ids(self) -> tuple[str, ...]:
        return tuple(reference.message_id for reference in self.references)


_DSN_PARTS = frozenset({"text/rfc822-headers", "message/rfc822", "message/global-headers", "message/global"})
_MDN_PARTS = frozenset({"message/disposition-notification", "message/global-disposition-notification"})


class InboundReferences:
    """Feed the DATA stream; then `result()`. Holds at most `limit` octets (the prefix it reads)."""

    __slots__ = ("_lines", "_prefix")

    def __init__(self, limit: int = SCAN_LIMIT) -> None:
        self._lines = _Lines(limit)
        self._prefix: list[bytes] = []

    @property
    def held(self) -> int:
        """Octets held for `result()`. Parsing a full 256 KiB prefix takes milliseconds (docs/ledger.md):
        an edge may run `result()` in a thread when this is large."""
        return self._lines.taken

    @property
    def full(self) -> bool:
        """The bound is reached (or the message ended): feeding more changes nothing."""
        return self._lines.over or self._lines.ended

    def feed(self, chunk: bytes) -> None:
        self._prefix.extend(self._lines.feed(chunk))

    def result(self) -> FoundReferences:
        self._prefix.extend(self._lines.finish())
        exceeded = self._lines.over
        try:
            return _scan(b"".join(self._prefix), exceeded)
        except Exception:  # garbage yields nothing; the decision then says "no reference"
            return FoundReferences((), MessageKind.OTHER, exceeded)


def _scan(prefix: bytes, exceeded: bool) -> FoundReferences:
    msg = BytesParser(policy=email_policy.compat32).parsebytes(prefix)
    found: list[Reference] = []

    def add(ids: Iterable[str], source: ReferenceSource) -> None:
        for message_id in ids:
            if len(found) < MAX_REFERENCES and all(r.message_id != message_id for r in found):
                found.append(Reference(message_id, source))

    for value in _raw_values(msg, "In-Reply-To"):
        add(message_ids_in(value), ReferenceSource.IN_REPLY_TO)
    for value in _raw_values(msg, "References"):
        # The parent is the last id (RFC 5322 §3.6.4): nearest first, so a long thread keeps it.
        add(reversed(message_ids_in(value, limit=4 * MAX_REFERENCES)), ReferenceSource.REFERENCES)

    kind = _kind(msg)
    for part in _parts(msg):
        ctype = part.get_content_type()
        if ctype in _MDN_PARTS:
            fields = _part_headers(part)
            if fields is not None:
                for value in _raw_values(fields, "Original-Message-ID"):
                    add(message_ids_in(value, limit=1), ReferenceSource.MDN_ORIGINAL)
        elif ctype in _DSN_PARTS:
            returned = _part_headers(part)
            if returned is not None:
                for value in _raw_values(returned, "Message-ID"):
                    add(message_ids_in(value, limit=1), ReferenceSource.DSN_RETURNED)
    return FoundReferences(tuple(found), kind, exceeded)


def _kind(msg: Message) -> MessageKind:
    ctype = msg.get_content_type()
    report = str(msg.get_param("report-type", "", header="content-type") or "").lower()
    if ctype == "multipart/report" and report == "delivery-status":
        return MessageKind.DSN
    if ctype == "multipart/report" and report == "disposition-notification":
        return MessageKind.MDN
    auto = _raw_values(msg, "Auto-Submitted")
    if auto and auto[0].split(";")[0].strip().lower() not in ("", "no"):
        return MessageKind.AUTO_REPLY
    return MessageKind.OTHER


def _parts(msg: Message) -> list[Message]:
    """The MIME parts below the top, depth first, at most MAX_PARTS, not into returned messages' bodies."""
    out: list[Message] = []
    stack = [msg]
    while stack and len(out) < MAX_PARTS:
        node = stack.pop()
        if node is not msg:
            out.append(node)
        if node.is_multipart() and node.get_content_type().startswith("multipart/"):
            payload = node.get_payload()
            if isinstance(payload, list):
                stack.extend(reversed([p for p in payload if isinstance(p, Message)]))
    return out


def _part_headers(part: Message) -> Message | None:
    """The header fields a report part carries: message/rfc822 is parsed already; the text kinds
    (text/rfc822-headers, message/disposition-notification) are a header block as the part's body."""
    payload = part.get_payload()
    if isinstance(payload, list):
        first = payload[0] if payload else None
        return first if isinstance(first, Message) else None
    if not isinstance(payload, str):
        return None
    body = payload
    encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if encoding in ("base64", "quoted-printable"):
        decoded = part.get_payload(decode=True)
        if not isinstance(decoded, bytes):
            return None
        return _parse_headers(decoded.lstrip(b"\r\n"))
    return _parse_headers(body.lstrip("\r\n").encode("utf-8", "surrogateescape"))
