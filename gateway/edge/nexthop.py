"""The asyncio SMTP client to the next hop: greeting, EHLO, pipelined commands, a streamed body, a pool.

Replies from the next hop are values (`NextHopReply`), whatever their code: the relay passes a 4xx or 5xx
on to its client as the next hop's own verdict. Only a next hop that cannot be talked to raises
`NextHopError`, with a `kind` (refused, timeout, broken, protocol) that maps straight to a 4xx reply.

Commands issued without awaiting their replies are held and leave together, in one write, when the first
of their replies is awaited; replies are read strictly in order (RFC 2920). So a caller that does not
await a reply before issuing the next command pipelines, and one that does, does not. The caller decides,
from `Capabilities.pipelining`, which of the two it may do. A small body leaves with its final dot.

A reply is only ever taken for a command already written: bytes that arrive while no reply is owed (a
`250` sent together with the `354`, more replies than commands, anything on an idle connection) are a
protocol error, never the answer to whatever we send next.

No smtplib and no aiosmtplib here: smtplib blocks the loop, and neither streams a body of unknown length
chunk by chunk while keeping the next hop's reply to each command.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import time
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any, cast

from ..core import replies
from ..core.errors import GatewayError
from ..core.replies import Reply
from .deadlines import Deadline

# The longest reply line we take from a next hop. RFC 5321 §4.5.3.1.5 says 512 octets; be lenient, but
# bounded, so a broken peer cannot make us buffer without limit.
_REPLY_LINE_LIMIT = 8192
_MAX_REPLY_LINES = 100
_END_OF_DATA = "end of data"  # what the reply to the final dot answers (the metrics call it DOT)


@dataclass(frozen=True)
class NextHopTimeouts:
    """Seconds. RFC 5321 §4.5.3.2 gives a client's minimum waits; ours sit below what OUR client will
    wait for the matching answer from us (5 minutes for a command, 2 for DATA's 354, 10 for the final
    reply), so that the client gets the next hop's verdict, or our 4xx, before it gives up on us."""

    connect: float = 30.0  # Postfix smtp_connect_timeout
    greeting: float = 270.0  # §4.5.3.2.1 "Initial 220 Message: 5 minutes"
    command: float = 270.0  # §4.5.3.2.2-3 MAIL and RCPT: 5 minutes
    data_init: float = 110.0  # §4.5.3.2.4 DATA initiation: 2 minutes
    data_block: float = 170.0  # §4.5.3.2.5 data block: 3 minutes
    data_term: float = 540.0  # §4.5.3.2.6 DATA termination: 10 minutes
    quit: float = 10.0  # nobody waits for a QUIT reply; do not linger on it

    def __post_init__(self) -> None:
        for name in ("connect", "greeting", "command", "data_init", "data_block", "data_term", "quit"):
            if getattr(self, name) <= 0:
                raise ValueError(f"next hop timeout {name} must be positive")


class NextHopErrorKind(enum.Enum):
    REFUSED = "refused"  # cannot connect, or the greeting is not 2xx
    TIMEOUT = "timeout"  # no (complete) reply in time
    BROKEN = "broken"  # the connection closed or reset under us
    PROTOCOL = "protocol"  # the peer does not speak SMTP as we understand it


_KIND_REPLIES: dict[NextHopErrorKind, Reply] = {
    NextHopErrorKind.REFUSED: replies.NEXT_HOP_DOWN,
    NextHopErrorKind.TIMEOUT: replies.NEXT_HOP_TIMEOUT,
    NextHopErrorKind.BROKEN: replies.NEXT_HOP_BROKEN,
    NextHopErrorKind.PROTOCOL: replies.NEXT_HOP_PROTOCOL,
}


class NextHopError(GatewayError):
    """The next hop could not be talked to. The transaction on it is lost (never half-committed)."""

    def __init__(self, kind: NextHopErrorKind, detail: str) -> None:
        super().__init__(f"next hop {kind.value}: {detail}")
        self.kind = kind
        self.detail = detail

    @property
    def reply(self) -> Reply:
        """What our client is told: always a 4xx, so that it keeps the message and tries again."""
        return _KIND_REPLIES[self.kind]


@dataclass(frozen=True)
class NextHopReply:
    """A reply as the next hop gave it: the code and each line's text (after the code and separator)."""

    code: int
    lines: tuple[str, ...]

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def from_next_hop(self) -> bool:
        """Its verdict, passed on: a refusal here is never counted as the client's error."""
        return True

    def wire(self) -> str:
        """The reply as our client gets it, multi-line kept, without the final CRLF."""
        head = [f"{self.code}-{line}" for line in self.lines[:-1]]
        head.append(f"{self.code} {self.lines[-1]}" if self.lines and self.lines[-1] else str(self.code))
        return "\r\n".join(head)

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True)
class Capabilities:
    """What the next hop said in its EHLO reply (RFC 5321 §4.1.1.1): keywords upper-cased."""

    extensions: frozenset[str] = frozenset()
    size: int | None = None  # None: no SIZE; 0: SIZE without a limit (RFC 1870)
    esmtp: bool = True  # False when the next hop refused EHLO and took HELO

    @classmethod
    def parse(cls, reply: NextHopReply) -> Capabilities:
        extensions: set[str] = set()
        size: int | None = None
        for line in reply.lines[1:]:  # the first line is the greeting domain
            words = line.split()
            if not words:
                continue
            keyword = words[0].upper()
            extensions.add(keyword)
            if keyword == "SIZE":
                size = int(words[1]) if len(words) > 1 and words[1].isdigit() else 0
        return cls(frozenset(extensions), size)

    def has(self, keyword: str) -> bool:
        return keyword in self.extensions

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions


# Before the next hop has been reached once, assume the least: plain SMTP, 7-bit, no DSN.
BASELINE = Capabilities(frozenset(), None, esmtp=True)


def _broken(detail: str) -> NextHopError:
    return NextHopError(NextHopErrorKind.BROKEN, detail)


class _Waiter:
    """A reply owed: its future, how long the next hop has for it, and what it answers."""

    __slots__ = ("future", "sent", "timeout", "what")  # several per message: a plain slotted class

    def __init__(self, future: asyncio.Future[NextHopReply], timeout: float, what: str) -> None:
        self.future = future
        self.timeout = timeout
        self.what = what
        self.sent = time.monotonic()  # for the reply-time metric


class PendingReply:
    """The reply to a command already written; awaiting it sends what is held and waits for the reply,
    which arrives in order (RFC 2920) whoever awaits it."""

    __slots__ = ("_conn", "_waiter")

    def __init__(self, conn: NextHopConnection, waiter: _Waiter) -> None:
        self._conn = conn
        self._waiter = waiter

    def __await__(self) -> Generator[Any, None, NextHopReply]:
        return self._conn._reply_for(self._waiter)


class NextHopConnection(asyncio.Protocol):
    """One SMTP connection to the next hop. Use `NextHopPool` (or `connect`) to get one.

    It is its own asyncio Protocol: replies are parsed as their bytes arrive (`data_received`), and each
    complete one is handed to the oldest waiter owed a reply. No reader task, no stream, no lock: the
    replies come in the order of the commands, and so do the waiters."""

    def __init__(self, timeouts: NextHopTimeouts, peer: str) -> None:
        self.timeouts = timeouts
        self.peer = peer
        self.capabilities = BASELINE
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        # The greeting is owed from the start: it may arrive before `connect` gets to wait for it.
        self._greeting = _Waiter(self._loop.create_future(), timeouts.greeting, "greeting")
        self._waiting: collections.deque[_Waiter] = collections.deque((self._greeting,))
        # Replies owed for what has been written (the greeting included); the rest of _waiting is held.
        self._owed = 1
        self._out: list[bytes] = []  # written at the next wait for a reply (see send)
        self._out_size = 0
        self.in_body = False  # between the first piece of a message and its final dot
        # Received and not part of a complete reply: the start of one while a reply is owed; while none
        # is, bytes no command asked for (see _unasked).
        self._unread = b""
        self._code = 0  # of the reply being received, and its lines so far
        self._lines: list[str] = []
        self._failure: NextHopError | None = None
        self._closed = False  # the next hop ended the stream, or the connection is gone
        self._lost_reason: Exception | None = None
        self._writing_paused = False
        self._drained: asyncio.Future[None] | None = None  # the body waits on it while writing is paused
        self.transactions = 0  # completed on this connection; for pool policy and tests
        self.on_reply: Callable[[str, float], None] | None = None  # (command, seconds): the metrics
        self.idle_since = time.monotonic()
        # Armed while a reply is owed, with the oldest owed reply's timeout. Past it the connection is cut:
        # a late reply would be out of step, so nothing more can be read from it anyway.
        self._reply_deadline = Deadline(self._loop, self._expire)

    # ------------------------------------------------------------------ setup

    @classmethod
    async def connect(
        cls, host: str, port: int, helo_name: str, timeouts: NextHopTimeouts
    ) -> NextHopConnection:
        peer = f"[{host}]:{port}"
        conn = cls(timeouts, peer)
        try:
            async with asyncio.timeout(timeouts.connect):
                await conn._loop.create_connection(lambda: conn, host, port)
        except TimeoutError:
            raise NextHopError(NextHopErrorKind.TIMEOUT, f"connect to {peer} timed out") from None
        except OSError as error:
            raise NextHopError(NextHopErrorKind.REFUSED, f"connect to {peer}: {error.strerror}") from None
        try:
            # The greeting and EHLO together within `greeting`: the client waiting on our answer to its
            # RCPT must not wait for a connect, a slow greeting AND a slow EHLO in a row.
            async with asyncio.timeout(timeouts.greeting):
                await conn._greet(helo_name)
        except TimeoutError:
            conn.abort()
            raise NextHopError(
                NextHopErrorKind.TIMEOUT, f"{peer}: no greeting and EHLO reply in time"
            ) from None
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _greet(self, helo_name: str) -> None:
        greeting = await PendingReply(self, self._greeting)
        if greeting.code != 220:
            raise NextHopError(NextHopErrorKind.REFUSED, f"{self.peer} greeted with {greeting}")
        ehlo = await self.command(f"EHLO {helo_name}", self.timeouts.command)
        if ehlo.code == 250:
            self.capabilities = Capabilities.parse(ehlo)
            return
        # RFC 5321 §3.2: a server that does not know EHLO gets HELO, and then no extensions.
        helo = await self.command(f"HELO {helo_name}", self.timeouts.command)
        if helo.code != 250:
            raise NextHopError(NextHopErrorKind.REFUSED, f"{self.peer} refused HELO: {helo}")
        self.capabilities = Capabilities(frozenset(), None, esmtp=False)

    # ------------------------------------------------------------------ the protocol (asyncio calls these)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not derive from asyncio's classes.
        self._transport = transport = cast(asyncio.Transport, transport)
        # pause_writing past this much unsent: a body is held back only when the next hop is slower than
        # our client, and memory stays bounded.
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        self._reply_deadline.set(self._greeting.timeout)

    def data_received(self, data: bytes) -> None:
        if self._failure is not None:
            return
        if self._unread:
            data = self._unread + data
        start = 0
        while self._owed:
            end = data.find(b"\n", start) + 1
            if not end:
                break
            if end - start > _REPLY_LINE_LIMIT + 1:
                self._fail(self._too_long())
                return
            if not self._reply_line(data[start:end], end < len(data)):
                return
            start = end
        rest = data[start:] if start else data
        if self._owed and len(rest) > _REPLY_LINE_LIMIT:
            self._fail(self._too_long())
            return
        # Bytes nobody asked for are never read as a reply, so their start is all that needs keeping.
        self._unread = rest if self._owed else rest[:_REPLY_LINE_LIMIT]

    def eof_received(self) -> bool:
        self._lost(None)
        return False  # close: the next hop can send no more replies

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)
        self._reply_deadline.cancel()
        self._wake_body()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_body()

    def _wake_body(self) -> None:
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _lost(self, exc: Exception | None) -> None:
        """The stream ended: every reply owed fails, TIMEOUT if its deadline cut the connection."""
        self._closed = True
        if exc is not None:
            self._lost_reason = exc
        if self._failure is None and self._owed:
            what = self._waiting[0].what
            if exc is not None:
                self._fail(_broken(f"awaiting reply to {what}: {exc}"))
            else:
                self._fail(_broken(f"connection closed awaiting reply to {what}"))

    def _too_long(self) -> NextHopError:
        return NextHopError(NextHopErrorKind.PROTOCOL, f"reply line to {self._waiting[0].what} too long")

    def _reply_line(self, raw: bytes, more: bool) -> bool:
        """One line of the reply owed first; False if the connection failed on it. `more`: bytes follow."""
        head = self._waiting[0]
        if len(raw) < 4 or not raw[:3].isdigit() or raw[3:4] not in (b" ", b"-", b"\r", b"\n"):
            self._fail(NextHopError(NextHopErrorKind.PROTOCOL, f"garbled reply to {head.what}: {raw[:80]!r}"))
            return False
        code = int(raw[:3])
        lines = self._lines
        if lines and code != self._code:
            self._fail(NextHopError(NextHopErrorKind.PROTOCOL, f"mixed codes in reply to {head.what}"))
            return False
        self._code = code
        lines.append(raw[4:].rstrip(b"\r\n").decode("utf-8", "replace"))
        if raw[3:4] == b"-":
            if len(lines) > _MAX_REPLY_LINES:
                self._fail(NextHopError(NextHopErrorKind.PROTOCOL, f"reply to {head.what} too long"))
                return False
            return True
        self._lines = []
        if not 200 <= code <= 599:
            detail = f"reply code {code} to {head.what} out of range"
            self._fail(NextHopError(NextHopErrorKind.PROTOCOL, detail))
            return False
        if more and self._owed == 1 and head.what != _END_OF_DATA:
            # More than the commands written asked for (say "354" and "250" in one write): this reply and
            # the next are out of step with ours; none of them can be trusted. (After the final dot, in
            # step until then, the reply is the verdict: the extra bytes only keep the connection from
            # being used again; see `usable`.)
            self._out_of_step(f"reply received before its command was sent (after {head.what})")
            return False
        self._waiting.popleft()
        self._owed -= 1
        if self._owed:
            self._reply_deadline.set(self._waiting[0].timeout)
        else:
            self._reply_deadline.clear()
        if not head.future.done():  # cancelled: its waiter went away, and abort() follows
            head.future.set_result(NextHopReply(code, tuple(lines)))
        if self.on_reply is not None:
            self.on_reply(head.what, time.monotonic() - head.sent)
        return True

    def _expire(self) -> None:
        if self._failure is None and self._owed:
            head = self._waiting[0]
            detail = f"no reply to {head.what} in {head.timeout:g}s"
            self._fail(NextHopError(NextHopErrorKind.TIMEOUT, detail))

    def _fail(self, error: NextHopError) -> None:
        """The connection is done for: every reply owed or held fails with `error`, nothing more is sent."""
        self._failure = error
        self._out.clear()  # held data (a body without its dot above all) must never go out now
        self._fail_waiters(error)
        self._reply_deadline.cancel()
        self._wake_body()
        if self._transport is not None:
            self._transport.abort()

    # ------------------------------------------------------------------ state

    @property
    def alive(self) -> bool:
        """No error seen, not closed by either side (replies may still be owed)."""
        transport = self._transport
        open_ = transport is not None and not transport.is_closing()
        return self._failure is None and not self._closed and open_

    @property
    def usable(self) -> bool:
        """Alive, and in step: no reply owed and nothing unasked-for received, so the next command's
        reply is the next one read. (A next hop that said 421 as it went away leaves that line here.)"""
        return self.alive and not self._waiting and not self.in_body and not self._unasked()

    def _unasked(self) -> bool:
        """Bytes received that no written command asked for."""
        return self._owed == 0 and bool(self._unread)

    def abort(self) -> None:
        """Drop the connection at once. Mid-DATA this is how a transaction is abandoned: without the
        final dot the next hop must not deliver (RFC 5321 §4.1.1.4)."""
        self._fail(self._failure or _broken("connection closed by us"))

    async def quit(self) -> None:
        """Polite close; errors are of no interest any more."""
        if self.usable:
            try:
                await self.command("QUIT", self.timeouts.quit)
            except NextHopError:
                pass
        self.abort()

    # ------------------------------------------------------------------ commands

    def send(self, line: str, timeout: float) -> PendingReply:
        """Issue one command; the returned object, awaited, sends what is held and gives the reply.
        Raises NextHopError at once if the connection already failed."""
        if self._failure is not None:
            raise self._failure
        if "\r" in line or "\n" in line:
            # Never let a CR or LF from a client reach the next hop inside a command (smuggling).
            raise ValueError("command line contains CR or LF")
        # Held until someone waits for a reply: pipelined commands then leave in one segment.
        self._out.append(line.encode("utf-8", "surrogateescape") + b"\r\n")
        waiter = _Waiter(self._loop.create_future(), timeout, line.split(" ", 1)[0])
        self._waiting.append(waiter)
        return PendingReply(self, waiter)

    async def command(self, line: str, timeout: float) -> NextHopReply:
        return await self.send(line, timeout)

    def _out_of_step(self, detail: str) -> NextHopError:
        error = NextHopError(NextHopErrorKind.PROTOCOL, f"{self.peer}: {detail}")
        self._fail(error)
        return error

    def _push_out(self) -> None:
        """Write what is held (commands, and the end of a body): one write, so usually one segment."""
        if self._out:
            if self._unasked():
                # Whatever it is, it would be read as the reply to what we are about to send.
                raise self._out_of_step("reply received before its command was sent")
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out.clear()
            self._out_size = 0
            transport = self._transport
            if transport is None or transport.is_closing():
                # The next hop closed (or we aborted). stdlib asyncio drops a write to a closed transport,
                # uvloop raises RuntimeError. Either way it is BROKEN, which the relay answers with 451 (or
                # replays a stale pooled connection on a fresh one).
                error = _broken("the connection closed")
                self._fail(error)
                raise error
            transport.write(data)
            if not self._owed and len(self._waiting):
                self._reply_deadline.set(self._waiting[0].timeout)
            self._owed = len(self._waiting)

    def _reply_for(self, waiter: _Waiter) -> Generator[Any, None, NextHopReply]:
        # A generator, not a coroutine: awaiting a reply is done several times per message, and the
        # future's own __await__ is all the waiting there is.
        future = waiter.future
        if not future.done():
            self._push_out()
            try:
                return (yield from future)
            except asyncio.CancelledError:
                # Our client went away mid-wait: the reply, when it comes, is nobody's, and the replies
                # after it would be out of step. Never reuse this connection.
                self.abort()
                if future.cancelled():
                    # Awaiting the reply again gives the connection's failure, as for every other waiter.
                    waiter.future = self._failed_future()
                raise
        return future.result()

    def _failed_future(self) -> asyncio.Future[NextHopReply]:
        future: asyncio.Future[NextHopReply] = self._loop.create_future()
        assert self._failure is not None
        future.set_exception(self._failure)
        future.exception()
        return future

    def _fail_waiters(self, error: NextHopError) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(error)
                # Mark retrieved: a pipelined reply nobody awaits any more must not warn at GC.
                waiter.future.exception()
        self._owed = 0
        self._lines = []

    # ------------------------------------------------------------------ the body

    async def send_data(self, chunk: bytes | bytearray | memoryview) -> None:
        """Write a piece of the (already dot-stuffed, CRLF-clean) body. Waits only when the next hop is
        slower than our client, so memory stays bounded by the transport's high-water mark."""
        if self._failure is not None:
            raise self._failure
        # A small message goes out with its final dot in one write; a big one in pieces of 64 KiB or more.
        self.in_body = True
        self._out.append(bytes(chunk))
        self._out_size += len(chunk)
        if self._out_size < _COALESCE:
            return
        self._push_out()
        if self._writing_paused and not self._closed:
            drained = self._drained = self._loop.create_future()
            try:
                async with asyncio.timeout(self.timeouts.data_block):
                    await drained
            except TimeoutError:
                error = NextHopError(NextHopErrorKind.TIMEOUT, "data block not taken in time")
                self._fail(error)
                raise error from None
            finally:
                self._drained = None
        if self._failure is not None:
            raise self._failure
        if self._closed:
            error = _broken(f"writing data: {self._lost_reason or 'the connection closed'}")
            self._fail(error)
            raise error

    def end_data(self) -> PendingReply:
        """The final dot: after this the next hop's reply is its verdict on the message."""
        if self._failure is not None:
            raise self._failure
        self._out.append(b".\r\n")
        self.in_body = False
        waiter = _Waiter(self._loop.create_future(), self.timeouts.data_term, _END_OF_DATA)
        self._waiting.append(waiter)
        return PendingReply(self, waiter)


_WRITE_HIGH_WATER = 256 * 1024
_COALESCE = 64 * 1024


@dataclass
class NextHopPool:
    """Idle next-hop connections kept for reuse. A connection goes back only in a clean state: after a
    transaction the next hop completed (RFC 5321 §4.1.1.4 clears it) or after a successful RSET."""

    host: str
    port: int
    helo_name: str
    timeouts: NextHopTimeouts = field(default_factory=NextHopTimeouts)
    max_idle: int = 32
    # Postfix's smtp_connection_cache_time_limit is 2s; a little longer is fine on a LAN hop, and
    # shorter than any sane next hop's idle timeout.
    idle_time: float = 5.0
    # Called with each fresh connection's capabilities (the edge advertises only what the hop can carry).
    on_capabilities: Callable[[Capabilities], None] | None = None
    # Given to every connection handed out: (command, seconds) for each reply (the metrics).
    on_reply: Callable[[str, float], None] | None = None
    capabilities: Capabilities | None = None  # as of the last fresh connection
    _idle: collections.deque[NextHopConnection] = field(default_factory=collections.deque)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _probe: asyncio.Task[Capabilities | None] | None = None
    _closed: bool = False

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        # Kept referenced until done (the loop holds tasks weakly) and awaited by close().
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def reset_later(self, conn: NextHopConnection) -> None:
        """reset_and_release() without making the caller wait for the RSET round trip."""
        self._background(self.reset_and_release(conn))

    async def acquire(self) -> tuple[NextHopConnection, bool]:
        """A connection in a clean state, and whether it was reused (a reused one may have been closed
        by the next hop a moment ago; the caller may retry once on a fresh one if its first reply fails)."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the least likely to be stale
            if conn.usable and now - conn.idle_since < self.idle_time:
                conn.on_reply = self.on_reply
                return conn, True
            conn.abort()
        conn = await NextHopConnection.connect(self.host, self.port, self.helo_name, self.timeouts)
        self._learn(conn.capabilities)
        conn.on_reply = self.on_reply
        return conn, False

    async def fresh(self) -> NextHopConnection:
        """A new connection, never an idle one (to replay on after a stale one failed)."""
        conn = await NextHopConnection.connect(self.host, self.port, self.helo_name, self.timeouts)
        self._learn(conn.capabilities)
        conn.on_reply = self.on_reply
        return conn

    def release(self, conn: NextHopConnection) -> None:
        """Give back a connection whose transaction ended cleanly (and nothing is pending on it)."""
        if self._closed or not conn.usable or len(self._idle) >= self.max_idle:
            self._background(conn.quit())
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def retire(self, conn: NextHopConnection) -> None:
        """Close, never pool, a connection whose next hop answered a transaction with a 4xx: the process
        behind it is in trouble (its queue, a restart that left it behind), and a new connection may
        well reach one that is not."""
        self._background(conn.quit())

    async def reset_and_release(self, conn: NextHopConnection) -> None:
        """After an abandoned transaction: RSET (RFC 5321 §4.1.1.5); keep the connection if it says 250.
        Replies still owed (a pipelined RCPT nobody waited for) are read, in order, before RSET's own."""
        if not conn.alive or conn.in_body:  # mid-message, RSET would be read as text: drop it instead
            conn.abort()
            return
        try:
            reply = await conn.command("RSET", self.timeouts.command)
        except NextHopError:
            return
        if reply.code == 250:
            self.release(conn)
        else:
            conn.abort()

    def probe_soon(self) -> asyncio.Task[Capabilities | None]:
        """probe() in the background, one at a time (the edge asks while the next hop is unknown)."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self.probe())
        return self._probe

    async def probe(self) -> Capabilities | None:
        """Connect once to learn the next hop's capabilities; None if it cannot be reached now."""
        try:
            conn, _ = await self.acquire()
        except NextHopError:
            return None
        self.release(conn)
        return self.capabilities

    def _learn(self, capabilities: Capabilities) -> None:
        self.capabilities = capabilities
        if self.on_capabilities is not None:
            self.on_capabilities(capabilities)

    async def close(self) -> None:
        self._closed = True
        if self._probe is not None and not self._probe.done():
            # A probe may sit in a connect timeout; it is of no use any more.
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        idle, self._idle = list(self._idle), collections.deque()
        await asyncio.gather(*(conn.quit() for conn in idle), return_exceptions=True)

    def prune(self) -> None:
        """Drop idle connections past their time (call now and then; acquire() also checks)."""
        now = time.monotonic()
        keep: collections.deque[NextHopConnection] = collections.deque()
        for conn in self._idle:
            if conn.usable and now - conn.idle_since < self.idle_time:
                keep.append(conn)
            else:
                conn.abort()
        self._idle = keep
