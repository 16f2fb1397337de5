"""The SMTP server edge: aiosmtpd's protocol, with our own command loop, parameters, limits and DATA stream.

aiosmtpd 1.4 gives us the connection, the STARTTLS switch and the timeout timer; what it does not fit, we
replace, in this subclass only:

- `__init__` does not call aiosmtpd's: that one runs `inspect.getmembers` and `dir()` over the protocol and
  the handler for every connection, and looks up the host name when none is given. Our dispatch table is
  built once per class, and the host name always comes from the config.
- MAIL and RCPT parameters: aiosmtpd upper-cases every value (ENVID and ORCPT are case-sensitive xtext)
  and refuses RET, ENVID, NOTIFY and ORCPT with 555. We check each parameter against what we advertised
  and pass its original text to the next hop unchanged (RFC 3461 §4, RFC 1870, RFC 6152, RFC 6531).
- DATA is read in chunks, not line by line, and streamed to the next hop as it arrives (`DataDecoder`),
  so memory does not grow with the message.
- Replies to pipelined commands (RFC 2920) are queued and sent in order once the client stops sending,
  so that RCPTs a client pipelines are pipelined to the next hop too.
- End of file from the client does not cancel the session: a client that pipelines "." and QUIT and then
  half-closes its side still gets its transaction completed and its replies.

Bare CR and LF (SMTP smuggling, CVE-2023-51764 and friends). We follow Postfix 3.9's defaults:
`smtpd_forbid_bare_newline = normalize` - only <CR><LF>.<CR><LF> ends DATA, and a line that ends in a
bare <LF> is taken as a line and sent on ending in <CR><LF> - and `cleanup_replace_stray_cr_lf = yes` - a
<CR> that is not part of a <CR><LF> pair becomes a space. A NUL becomes a space too (we do not offer
BINARYMIME, so no NUL may appear). A line that is only "." but does not end DATA (a bare <LF> before or
after it) is a dot-stuffed empty line and is sent on as one, so no line the next hop reads as the end of
DATA can be made out of anything but the client's own <CR><LF>.<CR><LF>. With `BareNewline.REJECT`
(Postfix's `reject`) a message with a bare newline is refused instead.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from aiosmtpd.smtp import SMTP, Session

from . import replies
from .deadlines import Deadline
from .guard import ErrorTally, GuardSettings, GuessLimiter, Penalty
from .nexthop import NextHopReply
from .replies import Reply
from .smtpcore import (
    XFORWARD_OFFER,
    BareNewline,
    CommandError,
    DataDecoder,
    MailCommand,
    Offer,
    RcptCommand,
    parse_mail,
    parse_rcpt,
    parse_xforward,
)

if TYPE_CHECKING:
    from .relay import RelaySession

log = logging.getLogger("gateway.smtpd")

ReplyLike = Reply | NextHopReply

_READ_LIMIT = 64 * 1024  # DATA is read in chunks of up to this much
VRFY_REPLY = replies.CANNOT_VRFY

# ------------------------------------------------------------------------------------------------ sessions


@dataclass(frozen=True)
class EdgeLimits:
    """The session limits the edge enforces (taken from the listener's config)."""

    message_size_limit: int = 10_240_000  # Postfix message_size_limit
    recipient_limit: int = 1000  # Postfix smtpd_recipient_limit
    line_length_limit: int = 1000  # RFC 5321 §4.5.3.1.6, CRLF included; DATA lines
    command_line_limit: int = 2048  # RFC 5321 512 + RFC 1870/3461/6531 parameters; Postfix line_length_limit
    command_timeout: float = 300.0  # RFC 5321 §4.5.3.2.7 server timeout: 5 minutes
    data_timeout: float = 300.0  # per chunk of DATA from the client
    max_sessions: int = 100
    max_sessions_per_client: int = 50
    bare_newline: BareNewline = BareNewline.NORMALIZE
    max_unknown_commands: int = 10  # like aiosmtpd's and Postfix's junk command limit


class SessionGate:
    """Counts open sessions, overall and per client IP, for one listener (or a whole process)."""

    def __init__(self, max_sessions: int, max_per_client: int) -> None:
        self.max_sessions = max_sessions
        self.max_per_client = max_per_client
        self.total = 0
        self._per_client: dict[str, int] = {}

    def admit(self, ip: str) -> Reply | None:
        """None if admitted (then `leave` must be called once), else the 421 to send."""
        if self.max_sessions and self.total >= self.max_sessions:
            return replies.TOO_MANY_SESSIONS
        count = self._per_client.get(ip, 0)
        if self.max_per_client and count >= self.max_per_client:
            return replies.TOO_MANY_FROM_CLIENT
        self.total += 1
        self._per_client[ip] = count + 1
        return None

    def leave(self, ip: str) -> None:
        self.total -= 1
        count = self._per_client.get(ip, 1) - 1
        if count:
            self._per_client[ip] = count
        else:
            self._per_client.pop(ip, None)


@dataclass
class EdgeContext:
    """What every session of one listener shares."""

    hostname: str
    limits: EdgeLimits
    guard: GuardSettings
    guesses: GuessLimiter
    gate: SessionGate
    # A RelaySession for a new client connection: (client ip, port, tls?) -> session
    new_relay: Callable[[str, int], RelaySession]
    offer: Callable[[], Offer]
    tls_context: ssl.SSLContext | None = None
    sessions: set[EdgeProtocol] | None = None  # live sessions, for shutdown
    shutting_down: bool = False
    # How the tarpit waits; tests inject a recorder so they never sleep.
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


def _wire(reply: ReplyLike) -> str:
    if isinstance(reply, NextHopReply):
        return reply.wire()
    return str(reply)


class _Outcome:
    """A reply to send, whether it counts as an error, and what the guard says about it."""

    __slots__ = ("close", "failed_guess", "reply")

    def __init__(self, reply: ReplyLike, failed_guess: bool = False, close: bool = False) -> None:
        self.reply = reply
        self.failed_guess = failed_guess
        self.close = close


Deferred = Callable[[], Awaitable[_Outcome]]  # called (and awaited) only when its turn comes


async def _ready(outcome: _Outcome) -> _Outcome:
    return outcome


class EdgeProtocol(SMTP):
    """One client connection. Built by `serve` per connection with the listener's shared context."""

    # Commands we answer, resolved once per class (aiosmtpd builds this per connection with dir()).
    _COMMANDS: ClassVar[dict[str, Callable[[EdgeProtocol, str | None], Awaitable[None]]]] = {}

    def __init__(self, context: EdgeContext) -> None:
        # Deliberately not SMTP.__init__ (see the module docstring); set what its kept methods use.
        loop = asyncio.get_running_loop()
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self,
            # The reader's limit is also its flow-control mark (it pauses the socket at twice the limit),
            # so a command-sized limit would make DATA arrive in 4 KiB sips. Command lines are held to
            # command_line_limit below instead.
            asyncio.StreamReader(loop=loop, limit=max(_READ_LIMIT, context.limits.command_line_limit)),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        self.ctx = context
        self.__ident__ = "ESMTP"
        self.hostname = context.hostname
        self.tls_context = context.tls_context
        self.require_starttls = False
        self.enable_SMTPUTF8 = True
        self.data_size_limit = context.limits.message_size_limit
        self._decode_data = False
        self._timeout_duration = context.limits.command_timeout
        # The idle timer: aiosmtpd made a TimerHandle per command (eight per message); one Deadline
        # moves instead. aiosmtpd's connection_lost calls _timeout_handle.cancel(), which ends it.
        self._idle = Deadline(loop, self._timeout_cb)
        self._timeout_handle = self._idle  # type: ignore[assignment]
        self._tls_handshake_okay = True
        self._tls_protocol: Any = None
        self._original_transport: asyncio.BaseTransport | None = None
        self.session: Session | None = None
        self.envelope: Any = None
        self.transport: asyncio.BaseTransport | None = None
        self._handler_coroutine: asyncio.Task[None] | None = None
        self._handle_hooks: dict[str, Any] = {}
        self._proxy_timeout = None
        self.event_handler = None
        # ours
        self.client_ip = ""
        self.client_port = 0
        self.helo: str | None = None
        self.esmtp = False
        self.relay: RelaySession | None = None
        self.offer: Offer | None = None
        self.mail: MailCommand | None = None
        self.rcpt_count = 0  # RCPT commands in this transaction
        # Recipients accepted, or whose answer is still owed: what recipient_limit counts (as Postfix's
        # smtpd_recipient_limit counts accepted ones, so refused guesses do not use it up).
        self.rcpt_taken = 0
        self.errors = ErrorTally(context.guard)
        self._pending: deque[Deferred] = deque()
        self._refusal: Reply | None = None
        self._admitted = False
        self._in_data = False
        self._closing = False

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        if first:
            peer = transport.get_extra_info("peername")
            if isinstance(peer, tuple):
                self.client_ip, self.client_port = str(peer[0]), int(peer[1])
            if self.ctx.shutting_down:
                self._refusal = replies.SHUTTING_DOWN
            else:
                self._refusal = self.ctx.gate.admit(self.client_ip)
            if self._refusal is None:
                self._admitted = True
                if self.ctx.sessions is not None:
                    self.ctx.sessions.add(self)
        super().connection_made(transport)
        if not first:
            # After STARTTLS (RFC 3207 §4.2): forget everything the client said before it.
            self.helo = None
            self.esmtp = False

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self.ctx.gate.leave(self.client_ip)
            if self.ctx.sessions is not None:
                self.ctx.sessions.discard(self)
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the session here; we let the reader drain what was pipelined before the
        # half-close (the final dot, QUIT) and see the end of the stream itself.
        if self.session is not None and self.session.ssl is not None:
            return False
        return asyncio.StreamReaderProtocol.eof_received(self)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """The client has `duration` seconds (default: the command timeout) to send what we wait for."""
        self._idle.set(duration or self._timeout_duration)

    def _stop_timer(self) -> None:
        """We no longer wait on the client (it waits on us: the next hop, a tarpit delay)."""
        self._idle.clear()

    def _timeout_cb(self) -> None:
        # RFC 5321 §4.5.3.2.7; Postfix says 421 4.4.2 before closing, and so do we.
        if self.transport is not None and not self.transport.is_closing():
            writer = self._writer
            writer.write(f"{replies.TIMEOUT}\r\n".encode())
            self.transport.close()

    async def push(self, status: str | bytes) -> None:
        data = status.encode("utf-8", "surrogateescape") if isinstance(status, str) else status
        writer = self._writer
        writer.write(data + b"\r\n")
        transport = writer.transport
        # drain() waits only while the client reads slower than we write, and raises once it is gone; a
        # reply the socket took whole needs neither, and skipping the coroutine saves it seven times a
        # message.
        if transport.get_write_buffer_size() or transport.is_closing():
            await writer.drain()

    # ------------------------------------------------------------------ the command loop

    def _buffered_line(self) -> bool:
        # aiosmtpd itself reaches into the reader's buffer (after STARTTLS); we only look at it, to
        # know whether the client has pipelined more commands.
        buffer: bytearray = self._reader._buffer  # type: ignore[attr-defined]
        return b"\n" in buffer

    async def _flush(self) -> None:
        """Send the replies owed, in order, applying each one's penalties."""
        while self._pending:
            deferred = self._pending.popleft()
            outcome = await deferred()
            await self._answer(outcome)

    async def _answer(self, outcome: _Outcome) -> None:
        reply = outcome.reply
        penalty = Penalty()
        if outcome.failed_guess:
            penalty = self.ctx.guesses.failed_guess(self.client_ip)
            if penalty.disconnect:
                # Over its guess budget: this guess is never answered (an answer is what it wants).
                log.info("client %s: too many failed tag checks, disconnecting", self.client_ip)
                await self.push(str(replies.TOO_MANY_ERRORS))
                self._closing = True
                return
        if reply.code >= 400 and reply.code != 421:
            penalty = penalty.then(self.errors.error())
        if penalty.delay:
            await self.ctx.sleep(penalty.delay)
        await self.push(_wire(reply))
        if penalty.disconnect or outcome.close:
            if penalty.disconnect:
                log.info("client %s: too many errors, disconnecting", self.client_ip)
                await self.push(str(replies.TOO_MANY_ERRORS))
            self._closing = True

    async def _reply(self, reply: ReplyLike, failed_guess: bool = False, close: bool = False) -> None:
        """Answer now: after whatever is owed to pipelined commands before it."""
        if self._pending:
            outcome = _Outcome(reply, failed_guess, close)
            self._pending.append(lambda: _ready(outcome))
            await self._flush()
        else:
            await self._answer(_Outcome(reply, failed_guess, close))

    async def _handle_client(self) -> None:
        try:
            await self._session()
        except asyncio.CancelledError:
            raise
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            # Never leak an internal error to the client: log it here, give a generic 451 there.
            log.exception("client %s: internal error", self.client_ip)
            try:
                await self.push(str(replies.LOCAL_ERROR))
            except Exception:  # noqa: S110 - the client may be gone; the error is logged above
                pass
        finally:
            self._pending.clear()
            if self.relay is not None:
                await self.relay.close()
            if self.transport is not None:
                self.transport.close()

    async def _session(self) -> None:
        if self._refusal is not None:
            await self.push(str(self._refusal))
            return
        self.relay = self.ctx.new_relay(self.client_ip, self.client_port)
        await self.push(f"220 {self.hostname} ESMTP")
        junk = 0
        while not self._closing and self.transport is not None:
            if not self._pending or not self._buffered_line():
                await self._flush()
                if self._closing:
                    break
                if self.ctx.shutting_down and self.mail is None and not self._buffered_line():
                    await self.push(str(replies.SHUTTING_DOWN))
                    break
            # The idle timer runs only while we wait for the client, never while it waits for us (the
            # next hop's verdict, a tarpit delay): those have their own, shorter, limits.
            self._reset_timeout()
            try:
                line = await self._reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as error:
                await self._skip_long_line(error.consumed)
                await self._reply(replies.LINE_TOO_LONG)
                continue
            except asyncio.IncompleteReadError:
                break  # the client closed its side
            finally:
                self._stop_timer()
            if len(line) > self.ctx.limits.command_line_limit:
                await self._reply(replies.LINE_TOO_LONG)
                continue
            line = line.rstrip(b"\r\n")
            verb, _, rest = line.partition(b" ")
            try:
                command = verb.decode("ascii").upper()
            except UnicodeDecodeError:
                command = ""
            handler = self._COMMANDS.get(command)
            if handler is None:
                junk += 1
                await self._reply(Reply(500, "5.5.2", "Error: command not recognized"))
                if junk >= self.ctx.limits.max_unknown_commands:
                    await self._reply(replies.TOO_MANY_ERRORS, close=True)
                continue
            arg = rest.strip().decode("utf-8", "surrogateescape") if rest.strip() else None
            await handler(self, arg)

    async def _skip_long_line(self, consumed: int) -> None:
        await self._reader.readexactly(consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as error:
                await self._reader.readexactly(error.consumed)

    # ------------------------------------------------------------------ commands

    async def _greet(self, verb: str, arg: str | None, esmtp: bool) -> bool:
        """HELO and EHLO alike: a name is required; the transaction and the client's name start afresh."""
        if not arg:
            await self._reply(Reply(501, "5.5.4", f"Syntax: {verb} hostname"))
            return False
        await self._reset_transaction()
        self.helo, self.esmtp = arg, esmtp
        if self.relay is not None:
            self.relay.greeted(arg, esmtp=esmtp, tls=self._tls_protocol is not None)
        return True

    async def smtp_HELO(self, arg: str | None) -> None:
        if await self._greet("HELO", arg, esmtp=False):
            await self._reply(Reply(250, "", self.hostname))

    async def smtp_EHLO(self, arg: str | None) -> None:
        if not await self._greet("EHLO", arg, esmtp=True):
            return
        offer = self.ctx.offer()
        if self._tls_protocol is not None:
            offer = Offer(offer.size, offer.eight_bit, offer.smtputf8, offer.dsn, starttls=False)
        self.offer = offer
        lines = [self.hostname, "PIPELINING"]
        if offer.size is not None:
            lines.append(f"SIZE {offer.size}")
        if offer.eight_bit:
            lines.append("8BITMIME")
        if offer.smtputf8:
            lines.append("SMTPUTF8")
        if offer.dsn:
            lines.append("DSN")
        if offer.starttls:
            lines.append("STARTTLS")
        if self.relay is not None and self.relay.offers_xforward:
            lines.append(XFORWARD_OFFER)
        lines.append("ENHANCEDSTATUSCODES")
        await self._reply(NextHopReply(250, tuple(lines)))

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self._reply(replies.OK)

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self._reply(Reply(501, "5.5.4", "Syntax: RSET"))
            return
        await self._reset_transaction()
        await self._reply(replies.OK)

    async def smtp_QUIT(self, arg: str | None) -> None:
        await self._reset_transaction()
        await self._reply(replies.BYE, close=True)

    async def smtp_VRFY(self, arg: str | None) -> None:
        # RFC 5321 §3.5.3: 252 when we do not verify; we never disclose anything here.
        await self._reply(VRFY_REPLY)

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self._reply(Reply(502, "5.5.1", "EXPN not implemented"))

    async def smtp_HELP(self, arg: str | None) -> None:
        await self._reply(Reply(214, "2.0.0", "See RFC 5321"))

    async def smtp_XFORWARD(self, arg: str | None) -> None:
        # Postfix's XFORWARD_README: between transactions only, and only from a client we offered it to.
        if self.relay is None or not self.relay.offers_xforward:
            await self._reply(Reply(550, "5.7.0", "Error: insufficient authorization"))
            return
        if self.mail is not None:
            await self._reply(Reply(503, "5.5.1", "Error: MAIL transaction in progress"))
            return
        try:
            attributes = parse_xforward(arg or "")
        except ValueError as error:
            await self._reply(Reply(501, "5.5.4", str(error)))
            return
        self.relay.xforward(attributes)
        await self._reply(replies.OK)

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if self.tls_context is None or self._tls_protocol is not None:
            await self._reply(Reply(502, "5.5.1", "STARTTLS not available"))
            return
        if arg:
            await self._reply(Reply(501, "5.5.4", "Syntax: STARTTLS"))
            return
        await self._flush()
        await self._reset_transaction()
        await SMTP.smtp_STARTTLS(self, "")

    # ---- MAIL

    async def smtp_MAIL(self, arg: str | None) -> None:
        if self.helo is None:
            await self._reply(Reply(503, "5.5.1", "Error: send HELO/EHLO first"))
            return
        if self.mail is not None:
            await self._reply(Reply(503, "5.5.1", "Error: nested MAIL command"))
            return
        if self.ctx.shutting_down:
            await self._reply(replies.SHUTTING_DOWN, close=True)
            return
        try:
            mail = self._parse_mail(arg)
        except CommandError as error:
            await self._reply(error.reply)
            return
        assert self.relay is not None
        reply = self.relay.mail(mail)
        if reply.positive:
            self.mail = mail
            self.rcpt_count = self.rcpt_taken = 0
        await self._reply(reply)

    def _parse_mail(self, arg: str | None) -> MailCommand:
        return parse_mail(arg or "", self.offer, self.esmtp)

    # ---- RCPT

    async def smtp_RCPT(self, arg: str | None) -> None:
        if self.mail is None:
            await self._reply(Reply(503, "5.5.1", "Error: need MAIL command"))
            return
        try:
            rcpt = self._parse_rcpt(arg, self.mail)
        except CommandError as error:
            await self._reply(error.reply)
            return
        if self.rcpt_taken >= self.ctx.limits.recipient_limit:
            await self._reply(replies.TOO_MANY_RECIPIENTS)
            return
        self.rcpt_count += 1
        self.rcpt_taken += 1
        assert self.relay is not None
        answer = await self.relay.rcpt(rcpt)
        self._pending.append(lambda: self._rcpt_outcome(answer))
        # The reply waits while the client is still pipelining; the loop flushes when it stops.

    async def _rcpt_outcome(self, answer: Callable[[], Awaitable[tuple[ReplyLike, bool]]]) -> _Outcome:
        reply, failed_guess = await answer()
        if reply.code >= 400:
            self.rcpt_taken -= 1
        return _Outcome(reply, failed_guess)

    def _parse_rcpt(self, arg: str | None, mail: MailCommand) -> RcptCommand:
        return parse_rcpt(arg or "", mail, self.offer, self.esmtp, self.hostname)

    # ---- DATA

    async def smtp_DATA(self, arg: str | None) -> None:
        if arg:
            await self._reply(Reply(501, "5.5.4", "Syntax: DATA"))
            return
        if self.mail is None:
            await self._reply(Reply(503, "5.5.1", "Error: need MAIL command"))
            return
        if self.rcpt_count == 0:
            await self._reply(Reply(503, "5.5.1", "Error: need RCPT command"))
            return
        assert self.relay is not None
        # DATA goes to the next hop behind the pipelined RCPTs; their replies are owed first.
        start = await self.relay.data_start()
        await self._flush()
        reply = await start()
        if reply.code != 354:
            self.mail = None
            await self._reply(reply)
            return
        await self.push(str(replies.START_DATA))
        await self._stream_data()

    async def _stream_data(self) -> None:
        limits = self.ctx.limits
        decoder = DataDecoder(limits.message_size_limit, limits.line_length_limit, limits.bare_newline)
        assert self.relay is not None
        relay = self.relay
        reader = self._reader
        self._in_data = True
        try:
            while not decoder.done:
                self._reset_timeout(limits.data_timeout)
                chunk = await reader.read(_READ_LIMIT)
                self._stop_timer()
                if not chunk:
                    # The client went away mid-DATA: nothing was accepted, nothing may be delivered.
                    relay.abort()
                    self._closing = True
                    return
                out = decoder.feed(chunk)
                if out and decoder.failure is None:
                    await relay.data_chunk(out)
            if decoder.leftover:
                # Commands the client pipelined after the final dot (QUIT): give them back to the reader.
                buffer: bytearray = reader._buffer  # type: ignore[attr-defined]
                buffer[:0] = decoder.leftover
        finally:
            self._in_data = False
        reply = await relay.data_end(decoder.failure)
        self.mail = None
        await self._reply(reply)

    async def _reset_transaction(self) -> None:
        self.mail = None
        self.rcpt_count = self.rcpt_taken = 0
        if self.relay is not None:
            await self._flush()
            self.relay.reset()

    # ------------------------------------------------------------------ shutdown

    def shutdown(self) -> None:
        """SIGTERM: an idle session is told 421 4.3.2 now; one in a transaction finishes it first."""
        if self.mail is None and not self._in_data and not self._pending and not self._buffered_line():
            if self.transport is not None and not self.transport.is_closing():
                self._writer.write(f"{replies.SHUTTING_DOWN}\r\n".encode())
                self.transport.close()

    def abort(self) -> None:
        """The shutdown deadline has passed: cut the connection (the client keeps its message)."""
        if self.transport is not None and not self.transport.is_closing():
            if not self._in_data:
                self._writer.write(f"{replies.SHUTTING_DOWN}\r\n".encode())
            self.transport.close()


EdgeProtocol._COMMANDS = {
    name[len("smtp_") :]: getattr(EdgeProtocol, name)
    for name in (
        "smtp_HELO",
        "smtp_EHLO",
        "smtp_NOOP",
        "smtp_RSET",
        "smtp_QUIT",
        "smtp_VRFY",
        "smtp_EXPN",
        "smtp_HELP",
        "smtp_XFORWARD",
        "smtp_STARTTLS",
        "smtp_MAIL",
        "smtp_RCPT",
        "smtp_DATA",
    )
}
