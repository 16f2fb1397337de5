"""The SMTP server edge: an asyncio Protocol that carries bytes between a client and the state machine.

What the client's bytes mean, and what may be answered when, is smtpcore.py's (no IO there). This module
only moves bytes: `data_received` feeds the core and handles the events it gives, one after another, in
the callback itself; only a command that waits on something (the relay's next hop, a tarpit delay) runs
as a task, and no more events are taken until it is answered. There is no reader coroutine per session.

- Replies to pipelined RCPTs (RFC 2920) are held while the client is still sending commands and sent in
  order once it stops, so that RCPTs a client pipelines are pipelined to the next hop too.
- End of file from the client does not cancel the session: a client that pipelines "." and QUIT and then
  half-closes its side still gets its transaction completed and its replies.
- STARTTLS uses the loop's own `start_tls`; reading is paused before the 220 is written, so the client's
  TLS hello is never read as plaintext, and the core discards whatever plaintext was pipelined.
- One idle timer per session (deadlines.Deadline), running only while we wait on the client.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from ..core import replies
from ..core.replies import Reply
from ..policy.guard import NO_PENALTY, ErrorTally, GuardSettings, Penalty
from ..policy.guessbudget import RateBudget
from .deadlines import Deadline
from .nexthop import NextHopReply
from .smtpcore import (
    NEED_DATA,
    PAUSED,
    BareNewline,
    ConnectionClosed,
    Data,
    DataChunk,
    Ehlo,
    EndOfData,
    Event,
    Expn,
    Helo,
    Help,
    Limits,
    Mail,
    Noop,
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

if TYPE_CHECKING:
    from .relay import RelaySession
    from .smtpcore import Offer

log = logging.getLogger("gateway.smtpd")

ReplyLike = Reply | NextHopReply
# What the client may have sent that we have not handled yet, while a command is in hand, before we stop
# reading (as asyncio's StreamReader pauses at twice its limit): not paused on every command, which would
# cost two epoll_ctl calls each.
_BUFFER_LIMIT = 128 * 1024
_FIXED_REPLIES: dict[type[Event], Reply] = {
    Noop: replies.OK,
    Vrfy: replies.CANNOT_VRFY,  # RFC 5321 §3.5.3: 252 when we do not verify; we never disclose anything
    Expn: replies.EXPN_NOT_IMPLEMENTED,
    Help: replies.HELP,
}
RcptAnswer = Callable[[], Awaitable[tuple[ReplyLike, bool]]]  # the relay's: awaited when its turn comes

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
    max_unknown_commands: int = 10  # like Postfix's junk command limit

    def core(self) -> Limits:
        """What the SMTP state machine enforces itself."""
        return Limits(
            command_line=self.command_line_limit,
            data_line=self.line_length_limit,
            message_size=self.message_size_limit,
            recipients=self.recipient_limit,
            unknown_commands=self.max_unknown_commands,
            bare_newline=self.bare_newline,
        )


class Gate(Protocol):
    """Admits a client's session or names the 421 that refuses it: a SessionGate, or with several workers
    a sessiontable.SharedGate, which counts across them."""

    def admit(self, ip: str) -> Reply | None: ...

    def leave(self, ip: str) -> None: ...


class SessionGate:
    """Counts open sessions, overall and per client IP, for one listener of one process."""

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
    # The failed-guess budget: every session of the process charges it, and with a [state] store every
    # worker and host too (guessbudget.py). Charged at the reply to a failed tag check, not before.
    guesses: RateBudget
    gate: Gate
    # A RelaySession for a new client connection: (client ip, port) -> session
    new_relay: Callable[[str, int], RelaySession]
    offer: Callable[[], Offer]
    tls_context: ssl.SSLContext | None = None
    sessions: set[EdgeProtocol] | None = None  # live sessions, for shutdown
    shutting_down: bool = False
    # [state] null_sender_rate per client network, on an inbound listener (None: not limited here).
    null_senders: RateBudget | None = None
    # How the tarpit waits; tests inject a recorder so they never sleep.
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    # The budgets' clock: wall-clock seconds, which every host of a fleet can compare.
    clock: Callable[[], float] = time.time
    core_limits: Limits = field(init=False)
    # Made once per listener rather than once per session: a 1 KiB message is a session of its own.
    greeting: Reply = field(init=False)
    helo_reply: Reply = field(init=False)

    def __post_init__(self) -> None:
        self.core_limits = self.limits.core()
        self.greeting = replies.greeting(self.hostname)
        self.helo_reply = replies.helo_ok(self.hostname)


class EdgeProtocol(asyncio.Protocol):
    """One client connection. Built by `serve` per connection with the listener's shared context."""

    def __init__(self, context: EdgeContext) -> None:
        self.ctx = context
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.core = ServerConnection(context.hostname, context.core_limits, context.tls_context is not None)
        self.relay: RelaySession | None = None
        self.client_ip = ""
        self.client_port = 0
        self.errors = ErrorTally(context.guard)
        # The idle timer: one Deadline moved on every command, not a timer made and cancelled each time.
        self._idle = Deadline(self.loop, self._timeout)
        self._pending: deque[RcptAnswer] = deque()  # RCPT replies owed, in order
        self._task: asyncio.Task[None] | None = None  # the command in hand, if it waits on something
        self._admitted = False
        self._closing = False
        self._reading_paused = False
        self._writing_paused = False
        self._under_tls: list[bytes] = []

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client_ip, self.client_port = str(peer[0]), int(peer[1])
        ctx = self.ctx
        refusal = replies.SHUTTING_DOWN if ctx.shutting_down else ctx.gate.admit(self.client_ip)
        if refusal is not None:
            self._write(self.core.send(refusal))
            self._close()
            return
        self._admitted = True
        if ctx.sessions is not None:
            ctx.sessions.add(self)
        self.relay = relay = ctx.new_relay(self.client_ip, self.client_port)
        self.core.xforward = relay.offers_xforward
        self._write(self.core.send(ctx.greeting))
        self._idle.set(ctx.limits.command_timeout)

    def data_received(self, data: bytes) -> None:
        core = self.core
        if core.state is State.TLS:
            # Only the TLS layer can give us bytes now (reading was paused before the 220): the client's
            # first commands under TLS, which can come before start_tls has returned the new transport.
            self._under_tls.append(data)
            return
        core.receive_data(data)
        if self._task is None:
            self._pump()
        elif core.buffered_octets > _BUFFER_LIMIT:
            self._pause_reading()

    def eof_received(self) -> bool:
        # The client half-closed: what it pipelined before (the final dot, QUIT) is still answered, so
        # the transport stays open for our replies (a TLS transport cannot stay half-open).
        self.core.receive_data(b"")
        if self._task is None:
            self._pump()
        return self.transport is not None and self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, error: Exception | None) -> None:
        self._closing = True
        self._idle.cancel()
        if self._admitted:
            self._admitted = False
            self.ctx.gate.leave(self.client_ip)
            if self.ctx.sessions is not None:
                self.ctx.sessions.discard(self)
        if self._task is not None:
            self._task.cancel()
        self._pending.clear()
        if self.relay is not None:
            self.relay.close()

    def pause_writing(self) -> None:
        # The client does not read its replies: stop taking its commands until it does.
        self._writing_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._task is None:
            self._pump()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self._closing:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and not self._writing_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _close(self) -> None:
        self._closing = True
        self._idle.cancel()
        if self.transport is not None:
            self.transport.close()

    def _timeout(self) -> None:
        # RFC 5321 §4.5.3.2.7; Postfix says 421 4.4.2 before closing, and so do we.
        if self.core.state is not State.CLOSED:
            self._write(self.core.send(replies.TIMEOUT))
        self._close()

    # ------------------------------------------------------------------ events

    def _pump(self) -> None:
        """Handle what the client has sent, as far as we can without waiting on anything."""
        core = self.core
        try:
            while self._task is None and not self._closing and not self._writing_paused:
                event = core.next_event()
                if event is NEED_DATA:
                    if self._pending:
                        # The client has stopped sending: the RCPT replies owed go out now.
                        self._start(self._flush())
                        return
                    if self.ctx.shutting_down and core.mail is None and not core.in_data:
                        self._write(core.send(replies.SHUTTING_DOWN))
                        self._close()
                        return
                    # The idle timer runs only while we wait for the client, never while it waits for
                    # us (the next hop's verdict, a tarpit delay): those have their own limits.
                    self._idle.set(
                        self.ctx.limits.data_timeout if core.in_data else self.ctx.limits.command_timeout
                    )
                    self._resume_reading()
                    return
                if event is PAUSED:
                    return  # a reply is owed by whatever holds it (the TLS handshake)
                self._idle.clear()
                if not self._handle_now(event):
                    self._start(self._handle_later(event))
                    return
        except ConnectionError:
            self._close()
        except Exception:
            self._internal_error()

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        self._task = self.loop.create_task(self._run(work))

    async def _run(self, work: Coroutine[Any, Any, None]) -> None:
        me = asyncio.current_task()
        core = self.core
        try:
            await work
            # Go on with what the client has already sent in this task, rather than one task each: a
            # message's chunks and its end, RCPTs and their replies, come in one burst.
            while self._task is me and not self._closing and not self._writing_paused:
                event = core.next_event()
                if event is NEED_DATA and self._pending:
                    await self._flush()
                    continue
                if event is NEED_DATA or event is PAUSED:
                    break
                self._idle.clear()
                if not self._handle_now(event):
                    await self._handle_later(event)
        except ConnectionError:
            self._close()
        except Exception:
            self._internal_error()
        finally:
            if self._task is me:
                self._task = None
        if self._task is None and not self._closing:
            self._pump()

    def _internal_error(self) -> None:
        # Never leak an internal error to the client: log it here, give a generic 451 there. Written
        # around the core, whose state is not to be trusted after this; the session ends here.
        log.exception("client %s: internal error", self.client_ip)
        self._write(f"{replies.LOCAL_ERROR}\r\n".encode())
        self._close()

    def _handle_now(self, event: Event) -> bool:
        """Handle `event` if that needs no waiting; False if it must run as a task."""
        kind = type(event)
        if kind is Rcpt or kind is DataChunk or kind is EndOfData or kind is Data:
            return False  # RCPT, DATA and the message: the relay waits on the next hop
        if self._pending:
            return False  # the RCPT replies owed come first
        relay = self.relay
        assert relay is not None
        reply: ReplyLike | Offer
        if isinstance(event, Refused):
            reply = event.reply
        elif isinstance(event, Mail):
            if self.ctx.shutting_down:
                reply = replies.SHUTTING_DOWN
            elif self._rate_limited(event):
                return False  # the null-sender rate is a store call
            else:
                reply = relay.mail(event.command)
        elif isinstance(event, Helo | Ehlo):
            esmtp = isinstance(event, Ehlo)
            relay.reset()
            relay.greeted(event.name, esmtp=esmtp, tls=self.core.tls_active)
            reply = self.ctx.offer() if esmtp else self.ctx.helo_reply
        elif isinstance(event, Rset | Quit):
            relay.reset()
            reply = replies.OK if isinstance(event, Rset) else replies.BYE
        elif isinstance(event, XForward):
            relay.xforward(dict(event.attributes))
            reply = replies.OK
        elif type(event) in _FIXED_REPLIES:
            reply = _FIXED_REPLIES[type(event)]
        elif isinstance(event, StartTls):
            self._start_tls()
            return True
        elif isinstance(event, ConnectionClosed):
            self._close()
            return True
        else:
            return False
        self._answer_soon(reply)
        return True

    async def _handle_later(self, event: Event) -> None:
        relay = self.relay
        assert relay is not None
        if isinstance(event, Rcpt):
            self._pending.append(await relay.rcpt(event.command))
            # The reply waits while the client is still pipelining; the pump flushes when it stops.
        elif isinstance(event, DataChunk):
            await relay.data_chunk(event.data)
        elif isinstance(event, Data):
            # DATA goes to the next hop behind the pipelined RCPTs; their replies are owed first.
            start = await relay.data_start()
            await self._flush()
            reply = await start()
            await self._answer(replies.START_DATA if reply.code == 354 else reply)
        elif isinstance(event, EndOfData):
            await self._answer(await relay.data_end(event.failure))
        elif isinstance(event, Mail) and self._rate_limited(event):
            await self._flush()
            await self._answer(await self._null_sender_mail(event))
        else:
            await self._flush()
            if not self._closing and not self._handle_now(event):
                raise AssertionError(f"no handler for {event!r}")

    def _rate_limited(self, event: Mail) -> bool:
        budget = self.ctx.null_senders
        return event.command.sender is None and budget is not None and budget.rule.enabled

    async def _null_sender_mail(self, event: Mail) -> ReplyLike:
        """MAIL FROM:<> under [state] null_sender_rate: the relay's answer, or 450 over the rate."""
        assert self.ctx.null_senders is not None and self.relay is not None
        if self.ctx.shutting_down:
            return replies.SHUTTING_DOWN
        penalty = await self.ctx.null_senders.charge(self.client_ip, self.ctx.clock())
        if penalty.disconnect or penalty.delay:
            log.info("client %s: null-sender rate of its network exceeded", self.client_ip)
            return replies.NULL_SENDER_RATE
        return self.relay.mail(event.command)

    # ------------------------------------------------------------------ replies

    async def _flush(self) -> None:
        """Send the RCPT replies owed, in order, applying each one's penalties."""
        while self._pending and not self._closing:
            answer = self._pending.popleft()
            reply, failed_guess = await answer()
            await self._answer(reply, failed_guess)
        self._pending.clear()

    def _judge(self, reply: ReplyLike | Offer, guess: Penalty | None = None) -> tuple[Penalty, bool]:
        """The guard's penalty for this reply, and whether it is never to be sent (a guess too many).
        `guess`: what the guess budget said, when the reply answers a failed tag check."""
        penalty = NO_PENALTY
        if guess is not None:
            penalty = guess
            if penalty.disconnect:
                return penalty, True
        if isinstance(reply, Reply | NextHopReply):
            counted = self.errors.reply(reply)
            if counted is not NO_PENALTY:  # most replies: no new Penalty to add up
                penalty = penalty.then(counted)
        return penalty, False

    def _deliver(self, reply: ReplyLike | Offer, penalty: Penalty, withheld: bool) -> None:
        core = self.core
        if withheld:
            # Over its guess budget: this guess is never answered (an answer is what it wants).
            log.info("client %s: too many failed tag checks, disconnecting", self.client_ip)
            self._write(core.send(replies.TOO_MANY_ERRORS))
            self._close()
            return
        self._write(core.send(reply))
        if penalty.disconnect:
            log.info("client %s: too many errors, disconnecting", self.client_ip)
            if core.state is not State.CLOSED:
                self._write(core.send(replies.TOO_MANY_ERRORS))
            self._close()
        elif core.state is State.CLOSED:
            self._close()  # QUIT, or a 421

    async def _answer(self, reply: ReplyLike | Offer, failed_guess: bool = False) -> None:
        if self._closing:
            return
        guess = None
        if failed_guess:
            # A store call (SQLite or Redis, or the local budget while the store is away). It runs in
            # this session's one task, so the replies behind it wait their turn, in order.
            guess = await self.ctx.guesses.charge(self.client_ip, self.ctx.clock())
            if self._closing:
                return
        penalty, withheld = self._judge(reply, guess)
        if penalty.delay and not withheld:
            await self.ctx.sleep(penalty.delay)
            if self._closing:
                return
        self._deliver(reply, penalty, withheld)

    def _answer_soon(self, reply: ReplyLike | Offer) -> None:
        """Answer now, or after the tarpit's delay (a task, so nothing more is read meanwhile)."""
        penalty, withheld = self._judge(reply)
        if penalty.delay and not withheld:
            self._start(self._deliver_later(reply, penalty))
        else:
            self._deliver(reply, penalty, withheld)

    async def _deliver_later(self, reply: ReplyLike | Offer, penalty: Penalty) -> None:
        await self.ctx.sleep(penalty.delay)
        if not self._closing:
            self._deliver(reply, penalty, False)

    # ------------------------------------------------------------------ STARTTLS

    def _start_tls(self) -> None:
        assert self.relay is not None and self.ctx.tls_context is not None
        self.relay.reset()
        # Stop reading before the 220 goes out: the client's TLS hello must reach the TLS layer, not us.
        self._pause_reading()
        self._write(self.core.send(replies.READY_FOR_TLS))
        self._start(self._handshake(self.ctx.tls_context))

    async def _handshake(self, context: ssl.SSLContext) -> None:
        assert self.transport is not None
        try:
            transport = await self.loop.start_tls(self.transport, self, context, server_side=True)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as error:
            log.info("client %s: TLS handshake failed: %s", self.client_ip, error)
            self._close()
            return
        if transport is None:  # the connection went away during the handshake
            self._close()
            return
        self.transport = transport
        self._reading_paused = False  # start_tls resumes reading on the new transport
        self.core.tls_started()
        for data in self._under_tls:
            self.core.receive_data(data)
        self._under_tls.clear()

    # ------------------------------------------------------------------ shutdown

    def shutdown(self) -> None:
        """SIGTERM: an idle session is told 421 4.3.2 now; one in a transaction finishes it first."""
        core = self.core
        if (
            self._task is None
            and not self._pending
            and core.mail is None
            and not core.in_data
            and not core.buffered_command
            and core.state is State.COMMAND
        ):
            self._write(core.send(replies.SHUTTING_DOWN))
            self._close()

    def abort(self) -> None:
        """The shutdown deadline has passed: cut the connection (the client keeps its message)."""
        if self.transport is not None and not self.transport.is_closing():
            if not self.core.in_data and self.core.state is not State.CLOSED:
                self._write(self.core.send(replies.SHUTTING_DOWN))
            self._close()
