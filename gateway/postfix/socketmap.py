"""Postfix lookup-table servers: socketmap_table(5) and, for postsrsd 1.x set-ups, tcp_table(5).

Two named maps over the one policy (policy.py), so that Postfix rewrites addresses itself, with no SMTP
hop in the mail path:
- `forward`, for sender_canonical_maps: the envelope sender as the outbound role would send it on (prvs
  for our signed domains, SRS0/SRS1 for foreign senders, nothing for exempt or already tagged senders).
- `reverse`, for recipient_canonical_maps: a validly tagged recipient with its tag stripped or its SRS
  reversed. Anything else, forged tags included, is NOTFOUND: Postfix then keeps the address as it is.

What a canonical map cannot do: it sees one address at a time and never the other side of the envelope,
so recipient exemptions and "all recipients local" (policy.rewrite_exemption's recipient half) do not
apply here; the sender exemptions do. Postfix also looks up partial keys ("user", "@domain"); they are
NOTFOUND, as is any key that is not one whole address.

Replies (socketmap_table(5)): OK with the new address; NOTFOUND when the address stays as it is; TEMP when
the answer may change if Postfix asks again (no active key: the mail waits in the queue instead of leaving
unsigned); PERM for a request that is not the protocol at all. A stream that breaks the netstring framing
is answered PERM and closed, since nothing after it can be trusted to be framed. Every request is bounded
(`max_request`) before it is buffered, and a client that reads no replies is paused, not buffered for.

tcp_table has no map names, so each map gets its own listener, as postsrsd 1.x has a forward and a reverse
port; its codes are 200 (found), 500 (not found, and bad requests, as postsrsd answers them) and 400
(temporary).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from ..core import prvs, srs
from ..core.addresses import MAX_LOCAL, Address, parse_address, plain_lengths_ok
from ..core.errors import GatewayError
from ..policy.policy import Action, Policy, Reason

log = logging.getLogger("gateway.socketmap")

FORWARD = "forward"
REVERSE = "reverse"
MAPS = (FORWARD, REVERSE)

DEFAULT_MAX_REQUEST = 4096  # octets of one request: an RFC 5321 path is at most 256
DEFAULT_IDLE_TIMEOUT = 600.0  # Postfix reconnects when we close an idle connection; postsrsd uses 1800 s
DEFAULT_CACHE_SIZE = 65536  # replies kept; about two hundred bytes each
_CACHED_REQUEST_MAX = 320  # octets: a map name and an RFC 5321 path (at most 256 octets)


class Status(enum.Enum):
    """socketmap_table(5) reply codes."""

    OK = "OK"
    NOTFOUND = "NOTFOUND"
    TEMP = "TEMP"
    TIMEOUT = "TIMEOUT"
    PERM = "PERM"


@dataclass(frozen=True)
class Answer:
    status: Status
    data: str = ""  # the value for OK, a reason an operator can read otherwise

    def netstring(self) -> bytes:
        return netstring(f"{self.status.value} {self.data}".encode())

    def tcp_table(self) -> bytes:
        if self.status is Status.OK:
            return b"200 " + tcp_encode(self.data) + b"\n"
        if self.status in (Status.TEMP, Status.TIMEOUT):
            return b"400 " + tcp_encode(self.data) + b"\n"
        return b"500 " + tcp_encode(self.data or "not found") + b"\n"


NOT_FOUND = Answer(Status.NOTFOUND)


class ProtocolError(GatewayError, ValueError):
    """A request that is not the protocol; answered PERM (socketmap) or 500 (tcp_table)."""


class PolicySource(Protocol):
    """Where the current policy is read (relay.PolicyHolder): a reload swaps it between two lookups."""

    @property
    def policy(self) -> Policy: ...


# --- the pure part: codecs and the two maps -------------------------------------------------------------


def netstring(payload: bytes) -> bytes:
    return b"%d:%b," % (len(payload), payload)


class NetstringReader:
    """Splits a byte stream into netstrings ("5:hello,"), refusing any longer than `max_length`."""

    __slots__ = ("_buf", "_digits", "max_length")

    def __init__(self, max_length: int = DEFAULT_MAX_REQUEST) -> None:
        self.max_length = max_length
        self._digits = len(str(max_length))
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> bytes | None:
        """The next whole netstring's payload, None if more bytes are needed; raises ProtocolError."""
        buf = self._buf
        colon = buf.find(b":", 0, self._digits + 1)
        if colon < 0:
            if len(buf) > self._digits or (buf and not buf.isdigit()):
                raise ProtocolError(f"not a netstring length (a request is at most {self.max_length} octets)")
            return None
        prefix = bytes(buf[:colon])
        if not prefix.isdigit():
            raise ProtocolError("not a netstring length")
        length = int(prefix)
        if length > self.max_length:
            raise ProtocolError(f"request of {length} octets is over the limit of {self.max_length}")
        end = colon + 1 + length
        if len(buf) <= end:
            return None
        if buf[end] != 0x2C:  # ","
            raise ProtocolError("netstring not terminated by a comma")
        payload = bytes(buf[colon + 1 : end])
        del buf[: end + 1]
        return payload

    def whole(self, data: bytes) -> bytes | None:
        """The payload when nothing is buffered and `data` is exactly one whole netstring that `next` would
        take, else None (then `feed` it). Postfix writes one request and waits for its answer, so a read is
        almost always exactly one request: this takes it without copying it into the buffer."""
        if self._buf:
            return None
        prefix, colon, rest = data.partition(b":")
        if colon and rest[-1:] == b"," and len(prefix) <= self._digits and prefix.isdigit():
            length = int(prefix)
            if length <= self.max_length and length == len(rest) - 1:
                return rest[:-1]
        return None

    @property
    def buffered(self) -> int:
        return len(self._buf)


def parse_request(payload: bytes) -> tuple[str, str]:
    """A socketmap request "name<space>key" → (name, key)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("request is not UTF-8") from None
    name, space, key = text.partition(" ")
    if not space or not name or not key:
        raise ProtocolError("a request is 'name key'")
    return name, key


def tcp_encode(text: str) -> bytes:
    """tcp_table(5) encoding: %XX for octets up to space, from DEL upwards, and '%'."""
    out = bytearray()
    for octet in text.encode("utf-8"):
        if octet <= 0x20 or octet >= 0x7F or octet == 0x25:
            out += b"%%%02X" % octet
        else:
            out.append(octet)
    return bytes(out)


def tcp_decode(data: bytes) -> str:
    raw = bytearray()
    i = 0
    while (pct := data.find(b"%", i)) >= 0:
        raw += data[i:pct]
        pair = data[pct + 1 : pct + 3]
        if len(pair) != 2 or not all(c in b"0123456789abcdefABCDEF" for c in pair):
            raise ProtocolError("bad %XX escape in the key")
        raw.append(int(pair, 16))
        i = pct + 3
    raw += data[i:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("key is not UTF-8") from None


def parse_tcp_request(line: bytes) -> str:
    """A tcp_table request line (without its newline) → the key."""
    if not line.startswith(b"get "):
        raise ProtocolError("only 'get KEY' is served")
    key = tcp_decode(line[4:])
    if not key:
        raise ProtocolError("empty key")
    return key


def _address_key(key: str) -> Address | None:
    """The address a key stands for; None for Postfix's partial keys ("user", "@domain") and for keys
    that are no address at all: those are not in our tables."""
    at = key.rfind("@")
    if at <= 0 or at == len(key) - 1:
        return None
    try:
        return parse_address(key)
    except GatewayError:
        return None


def forward(policy: Policy, key: str, today: int) -> Answer:
    """sender_canonical_maps: the envelope sender as the outbound role sends it on."""
    sender = _address_key(key)
    if sender is None:
        return NOT_FOUND
    exemption = policy.rewrite_exemption(sender, None)
    try:
        verdict = policy.outbound_sender(sender, today, exemption)
    except GatewayError as exc:
        # An address the tag would push over the RFC 5321 length: it goes out as it is.
        log.warning("forward: not rewritten: %s", exc)
        return NOT_FOUND
    if verdict.action is not Action.RELAY:
        return Answer(Status.TEMP, verdict.reply.text if verdict.reply else verdict.reason.value)
    if verdict.reason not in _REWRITTEN:  # every other verdict relays the sender as it is
        return NOT_FOUND
    return Answer(Status.OK, verdict.address)


def reverse(policy: Policy, key: str, today: int) -> Answer:
    """recipient_canonical_maps: a valid tag stripped, a valid SRS address reversed; else NOTFOUND."""
    rcpt = _address_key(key)
    if rcpt is None:
        return NOT_FOUND
    original = policy.reverse_recipient(rcpt, today)
    return NOT_FOUND if original is None else Answer(Status.OK, original)


_REWRITTEN = frozenset({Reason.PRVS, Reason.SRS0, Reason.SRS1})

_LOOKUPS: dict[str, Callable[[Policy, str, int], Answer]] = {FORWARD: forward, REVERSE: reverse}


def lookup(policy: Policy, name: str, key: str, today: int) -> Answer:
    table = _LOOKUPS.get(name)
    if table is None:
        return Answer(Status.PERM, f"no map named {name[:40]!r}: this server has {' and '.join(MAPS)}")
    return table(policy, key, today)


# A sender that addresses.parse_path takes on its fast path, with a local part that does not start like a
# prvs or SRS tag (those take the general path, which tells a tag from a look-alike): what prvs.sign
# takes on its fast path, as bytes.
_PLAIN_SENDER = re.compile(prvs.PLAIN_SIGNABLE.encode())
_SHORT_KEY = 64  # octets: a plain address this short is within every RFC 5321 limit
_ROUTES_MAX = 4096  # domains whose route is kept; a flood of new domains only costs a policy call each


class FastForward:
    """The forward map for the common sender, answered from bytes to bytes without the general parser.

    The common sender is a plain ASCII address (`addresses.parse_path`'s fast path) that carries no tag.
    What happens to it is decided by the policy, never here: `Policy.rewrite_exemption` for the sender
    and `Policy.outbound_route` for its domain (kept per domain); the tag is made by
    `prvs.PlainSigner` or `srs.PlainForwarder`, which write what prvs.sign and srs.forward_address write.
    Anything else, and any case those decline, is None: the caller then takes `forward`, which answers
    every key. The two agree byte for byte (tests/test_socketmap.py checks it with hypothesis).
    One instance serves one policy on one day.
    """

    def __init__(self, policy: Policy, today: int) -> None:
        self.policy = policy
        self._routes: dict[bytes, Reason] = {}
        self._exempting = policy.exempts_senders
        s = policy.settings
        self._sign: prvs.PlainSigner | None = None
        self._srs0: srs.PlainForwarder | None = None
        try:
            self._sign = prvs.PlainSigner(policy.keyring, today, s.lifetime_days)
        except GatewayError:
            pass  # no active key or an impossible lifetime: the general path says what happens
        if s.srs_alias is not None:
            try:
                self._srs0 = srs.PlainForwarder(
                    s.srs_alias, policy.keyring.srs_secrets(), today, s.srs_options
                )
            except GatewayError:
                pass

    def __call__(self, key: bytes) -> bytes | None:
        """The rewritten sender for an OK answer, or None: take the general path."""
        m = _PLAIN_SENDER.fullmatch(key)
        if m is None:
            return None
        local, domain = m.group(1, 2)
        if len(key) > _SHORT_KEY and (
            len(local) > MAX_LOCAL or not plain_lengths_ok(local.decode(), domain.decode())
        ):
            return None  # over a limit addresses.parse_path checks: the general path says which
        lowered = domain.lower()
        route = self._routes.get(lowered)
        if route is None:
            if len(self._routes) >= _ROUTES_MAX:
                self._routes.clear()
            route = self._routes[lowered] = self.policy.outbound_route(lowered.decode())
        if self._exempting:
            if self.policy.rewrite_exemption(Address(local.decode(), domain.decode()), None) is not None:
                return None
        if route is Reason.SRS0 and self._srs0 is not None:
            return self._srs0(local, domain)
        if route is Reason.PRVS and self._sign is not None:
            return self._sign(local, domain)
        return None


# --- the asyncio edge -------------------------------------------------------------------------------


class _Replies:
    """Wire replies by request, bounded. Two generations instead of an LRU list: when the young one is full
    it becomes the old one and the old one is dropped, so keeping the cache bounded costs O(1); a hit in
    the old generation moves the reply back to the young one. (Deleting a dict's first key one at a time
    would not: finding the first key then walks past every deleted slot.)"""

    __slots__ = ("_old", "_size", "_young")

    def __init__(self, size: int) -> None:
        self._size = size
        self._young: dict[bytes, bytes] = {}
        self._old: dict[bytes, bytes] = {}

    def get(self, request: bytes) -> bytes | None:
        reply = self._young.get(request)
        if reply is None:
            reply = self._old.get(request)
            if reply is not None:
                self.put(request, reply)
        return reply

    def put(self, request: bytes, reply: bytes) -> None:
        # Requests longer than any map name and RFC 5321 path are answered but not kept: the cache stays
        # a few MB at most.
        if self._size > 0 and len(request) <= _CACHED_REQUEST_MAX:
            if len(self._young) * 2 >= self._size:
                self._old, self._young = self._young, {}
            self._young[request] = reply

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def __contains__(self, request: bytes) -> bool:
        return request in self._young or request in self._old


class _Day:
    """What one policy on one day answers with: the fast path and the replies made so far."""

    __slots__ = ("fast", "policy", "socketmap", "tcp", "today")

    def __init__(self, policy: Policy, today: int, cache_size: int) -> None:
        self.policy = policy
        self.today = today
        self.fast = FastForward(policy, today)
        self.socketmap = _Replies(cache_size)
        self.tcp = {name: _Replies(cache_size) for name in MAPS}


class MapService:
    """What every connection shares: the policy source, the clock, the limits and a reply cache.

    An answer depends only on the policy (config and keyring), the day and the key, and Postfix asks about
    the same few senders over and over (once per message, from every cleanup process), so replies are
    kept, by the request as it came over the wire, until the policy is swapped by a reload or the day
    changes. TEMP answers and replies to requests that are not the protocol are never kept.
    """

    def __init__(
        self,
        source: PolicySource,
        *,
        max_request: int = DEFAULT_MAX_REQUEST,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        clock: Callable[[], float] = time.time,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.source = source
        self.max_request = max_request
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.connections: set[asyncio.Transport] = set()
        self.cache_size = cache_size
        self._day: _Day | None = None

    def close_connections(self) -> None:
        """On shutdown: a lookup is answered at once, so nothing is in flight to wait for."""
        for transport in list(self.connections):
            transport.close()

    def current(self) -> _Day:
        policy, today = self.source.policy, int(self.clock()) // 86400
        day = self._day
        if day is None or day.policy is not policy or day.today != today:
            day = self._day = _Day(policy, today, self.cache_size)
        return day

    def _lookup(self, day: _Day, name: str, key: str) -> Answer:
        try:
            return lookup(day.policy, name, key, day.today)
        except Exception:
            # A bug must cost one lookup (Postfix defers that mail and asks again), never the server.
            log.exception("lookup failed")
            return _INTERNAL_ERROR

    def socketmap_reply(self, payload: bytes) -> bytes:
        """The netstring answering one socketmap request ("name key")."""
        day = self.current()
        reply = day.socketmap.get(payload)
        if reply is not None:
            return reply
        try:
            value = day.fast(payload[8:]) if payload.startswith(b"forward ") else None
        except Exception:
            # A bug in the fast path must not cost even the lookup: the general path answers it.
            log.exception("fast forward lookup failed")
            value = None
        if value is not None:
            reply = b"%d:OK %b," % (len(value) + 3, value)
            day.socketmap.put(payload, reply)
            return reply
        try:
            name, key = parse_request(payload)
        except ProtocolError as exc:
            # Framed, so the stream is still in step: answer and go on.
            return Answer(Status.PERM, str(exc)).netstring()
        found = self._lookup(day, name, key)
        reply = found.netstring()
        if found.status is not Status.TEMP:
            day.socketmap.put(payload, reply)
        return reply

    def tcp_reply(self, map_name: str, line: bytes) -> bytes:
        """The line answering one tcp_table request line (without its line end) for `map_name`."""
        day = self.current()
        replies = day.tcp[map_name]
        reply = replies.get(line)
        if reply is not None:
            return reply
        # Without a "%" in the line the key is the line as it is (tcp_decode), and a value in printable
        # ASCII without "%" is written as it is (tcp_encode): the fast path writes no "%" and no space,
        # and only a non-ASCII alias domain could make it write anything but ASCII.
        try:
            fast = map_name == FORWARD and line.startswith(b"get ") and b"%" not in line
            value = day.fast(line[4:]) if fast else None
        except Exception:
            log.exception("fast forward lookup failed")
            value = None
        if value is not None and value.isascii():
            reply = b"200 " + value + b"\n"
            replies.put(line, reply)
            return reply
        try:
            key = parse_tcp_request(line)
        except ProtocolError as exc:
            return Answer(Status.PERM, str(exc)).tcp_table()
        found = self._lookup(day, map_name, key)
        reply = found.tcp_table()
        if found.status is not Status.TEMP:
            replies.put(line, reply)
        return reply


_INTERNAL_ERROR = Answer(Status.TEMP, "internal error, see the gateway's log")


class _Connection(asyncio.Protocol):
    """Shared by both protocols: idle timeout, and no reading while the client does not read."""

    def __init__(self, service: MapService) -> None:
        self.service = service
        self.transport: asyncio.Transport | None = None
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not a subclass of asyncio.Transport, so no isinstance check).
        self.transport = cast(asyncio.Transport, transport)
        self.service.connections.add(self.transport)
        self._last = time.monotonic()
        if self.service.idle_timeout > 0:
            self._timer = asyncio.get_running_loop().call_later(self.service.idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        # One timer per connection, re-armed lazily: cheaper than resetting a timer on every request.
        idle = time.monotonic() - self._last
        if idle >= self.service.idle_timeout:
            if self.transport is not None:
                self.transport.close()
            return
        self._timer = asyncio.get_running_loop().call_later(
            self.service.idle_timeout - idle, self._check_idle
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.service.connections.discard(self.transport)
        self.transport = None

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def _refuse(self, replies: list[bytes], last: bytes, why: ProtocolError) -> None:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        log.warning("protocol error from %s: %s; connection closed", peer, why)
        if self.transport is not None:
            self.transport.write(b"".join([*replies, last]))
            self.transport.close()


class SocketmapProtocol(_Connection):
    def __init__(self, service: MapService) -> None:
        super().__init__(service)
        self._reader = NetstringReader(service.max_request)

    def data_received(self, data: bytes) -> None:
        self._last = time.monotonic()
        reader = self._reader
        service = self.service
        payload = reader.whole(data)
        if payload is not None:  # one request, as Postfix sends it
            if self.transport is not None:
                self.transport.write(service.socketmap_reply(payload))
            return
        reader.feed(data)
        replies = []
        try:
            while (payload := reader.next()) is not None:
                replies.append(service.socketmap_reply(payload))
        except ProtocolError as exc:
            self._refuse(replies, Answer(Status.PERM, str(exc)).netstring(), exc)
            return
        if replies and self.transport is not None:
            self.transport.write(b"".join(replies))


class TcpTableProtocol(_Connection):
    def __init__(self, service: MapService, map_name: str) -> None:
        super().__init__(service)
        self.map_name = map_name
        # A key may be %XX-encoded throughout: three octets for each of its octets.
        self._max_line = 3 * service.max_request + 8
        self._buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self._last = time.monotonic()
        buf = self._buf
        if not buf and data.find(b"\n") == len(data) - 1:  # one whole line, as Postfix sends it
            if self.transport is not None:
                self.transport.write(self.service.tcp_reply(self.map_name, data[:-1].rstrip(b"\r")))
            return
        buf += data
        replies = []
        start = 0
        while (nl := buf.find(b"\n", start)) >= 0:
            replies.append(self.service.tcp_reply(self.map_name, bytes(buf[start:nl]).rstrip(b"\r")))
            start = nl + 1
        del buf[:start]
        if len(buf) > self._max_line:
            error = ProtocolError(f"request line over {self._max_line} octets")
            self._refuse(replies, Answer(Status.PERM, str(error)).tcp_table(), error)
            return
        if replies and self.transport is not None:
            self.transport.write(b"".join(replies))


async def start_socketmap(service: MapService, host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: SocketmapProtocol(service), host, port)


async def start_tcp_table(service: MapService, map_name: str, host: str, port: int) -> asyncio.Server:
    if map_name not in MAPS:
        raise ValueError(f"no map named {map_name!r}")
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: TcpTableProtocol(service, map_name), host, port)
