"""`serve`: listeners from the config, run until SIGTERM, a clean shutdown, and the reload seam.

Shutdown (SIGTERM, SIGINT), as Postfix's `postfix stop` would like it and a mail client expects:
1. stop accepting: the listening sockets close at once, so a load balancer or the MX's peers go elsewhere;
2. every idle session is told `421 4.3.2` and closed; a session in a transaction finishes it (its DATA, its
   pipelined QUIT), and is then told 421 at its next command;
3. at `shutdown_deadline` whatever is left is cut. A client cut before our reply to its final dot keeps
   the message and tries again (RFC 5321 §4.1.1.4 and §6.1: no 250, no responsibility taken).

SIGHUP calls `on_reload` (the reloader fills it: config and keyring read afresh, then `apply`), which swaps
the policy that new decisions read; nothing in flight is disturbed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import ConfigError
from ..core.keyring import Keyring
from ..edge.nexthop import NextHopPool, NextHopTimeouts
from ..edge.relay import (
    DecisionObserver,
    InboundRules,
    LedgerSettings,
    OutboundRules,
    PolicyHolder,
    Relay,
    RoleRules,
)
from ..edge.smtpd import EdgeContext, EdgeLimits, EdgeProtocol, Gate, SessionGate
from ..policy.guard import GuardSettings
from ..policy.guessbudget import LocalBudget, RateBudget
from ..policy.policy import Policy
from .config import Config, Limits, ListenerConfig, Role
from .state import budget_rules

if TYPE_CHECKING:
    from .state import LedgerOpened, Stores

log = logging.getLogger("gateway.serve")
STARTUP_PROBE_WAIT = 3.0  # seconds start() waits for the next hops' EHLO before it listens anyway

# Role -> the rules of that role. The outbound role (issue 6) registers itself here; the engine is shared.
RulesFactory = Callable[[ListenerConfig, PolicyHolder, LedgerSettings], RoleRules]
ROLE_RULES: dict[Role, RulesFactory] = {
    Role.INBOUND: lambda listener, holder, ledger: InboundRules(
        holder, observe=listener.observe, ledger=ledger
    ),
    Role.OUTBOUND: lambda listener, holder, ledger: OutboundRules(holder, listener.trusted, ledger=ledger),
}


def edge_limits(limits: Limits) -> EdgeLimits:
    return EdgeLimits(
        message_size_limit=limits.message_size_limit,
        recipient_limit=limits.recipient_limit,
        line_length_limit=limits.line_length_limit,
        command_line_limit=limits.command_line_limit,
        command_timeout=limits.command_timeout,
        data_timeout=limits.data_timeout,
        max_sessions=limits.max_sessions,
        max_sessions_per_client=limits.max_sessions_per_client,
    )


def guard_settings(limits: Limits) -> GuardSettings:
    return GuardSettings(
        soft_error_limit=limits.soft_error_limit,
        hard_error_limit=limits.hard_error_limit,
        error_sleep_time=limits.error_sleep_time,
        guess_rate=limits.guess_rate,
        guess_burst=max(1, limits.guess_burst),
    )


def next_hop_timeouts(limits: Limits) -> NextHopTimeouts:
    command = limits.next_hop_command_timeout
    return NextHopTimeouts(
        connect=limits.next_hop_connect_timeout,
        greeting=command,
        command=command,
        # RFC 5321 §4.5.3.2.4: our client waits 2 minutes for 354; answer before that.
        data_init=min(command, 110.0),
        data_block=limits.next_hop_data_block_timeout,
        data_term=limits.next_hop_data_done_timeout,
    )


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context for STARTTLS (RFC 3207). Opportunistic: clients are not asked for certificates."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"tls_cert {cert} / tls_key {key}: cannot load: {error}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclass
class Listener:
    config: ListenerConfig
    relay: Relay
    context: EdgeContext
    server: asyncio.Server | None = None
    sessions: set[EdgeProtocol] = field(default_factory=set)

    @property
    def address(self) -> tuple[str, int]:
        """Where it actually listens (port 0 in the config: the port the kernel chose)."""
        assert self.server is not None
        sockname = self.server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])


class Gateway:
    """Every listener of one process, the policy they share, and their lifecycle."""

    def __init__(
        self,
        config: Config,
        keyring: Keyring,
        observers: Sequence[DecisionObserver] = (),
        guess_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        stores: Stores | None = None,
        gates: Sequence[Gate] | None = None,
    ) -> None:
        self.config = config
        self.holder = PolicyHolder(Policy(config.policy, keyring))
        # Both roles share one ledger; its store is opened by start() (the ledger is off until then).
        self.ledger = LedgerSettings(days=config.ledger.days, max_replies=config.ledger.max_replies)
        self.observers = tuple(observers)
        self._sleep = sleep
        self._clock = guess_clock
        # The [state] stores (`run` makes them): the guess budget and the null-sender rate are counted
        # across every worker and host. Without them (a Gateway made alone: the demo, tests), the
        # process's own, across all its sessions and ports.
        self.stores = stores
        self._ledger_opened: LedgerOpened | None = None
        # Several workers: each listener's session limits counted across them (sessiontable.py).
        self._gates = gates
        self.guesses: RateBudget
        self.null_senders: RateBudget
        if stores is not None:
            self.guesses, self.null_senders = stores.guess_budget, stores.null_sender_rate
        else:
            guess, null_sender = budget_rules(config)
            self.guesses, self.null_senders = LocalBudget(guess), LocalBudget(null_sender)
        self.listeners: list[Listener] = [self._listener(lc, i) for i, lc in enumerate(config.listeners)]
        self._stopping = False

    def _listener(self, lc: ListenerConfig, index: int) -> Listener:
        factory = ROLE_RULES.get(lc.role)
        if factory is None:
            raise ConfigError(f"listener {lc.name}: role {lc.role.value} is not available in this version")
        limits = lc.limits
        pool = NextHopPool(
            lc.next_hop.host,
            lc.next_hop.port,
            self.config.hostname,
            next_hop_timeouts(limits),
            max_idle=limits.next_hop_pool_size,
        )
        rules = factory(lc, self.holder, self.ledger)
        relay = Relay(lc.name, rules, pool, limits.message_size_limit, self.observers)
        tls = tls_context(lc.tls_cert, lc.tls_key) if lc.tls_cert and lc.tls_key else None
        sessions: set[EdgeProtocol] = set()
        context = EdgeContext(
            hostname=self.config.hostname,
            limits=edge_limits(limits),
            guard=guard_settings(limits),
            guesses=self.guesses,
            gate=(
                SessionGate(limits.max_sessions, limits.max_sessions_per_client)
                if self._gates is None
                else self._gates[index]
            ),
            new_relay=relay.session,
            offer=lambda: relay.offer(tls is not None),
            tls_context=tls,
            sessions=sessions,
            # Bounces come in from the internet; the outbound role's own MTAs send theirs unlimited.
            null_senders=self.null_senders if lc.role is Role.INBOUND else None,
            sleep=self._sleep,
            clock=self._clock,
        )
        return Listener(lc, relay, context, sessions=sessions)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, sockets: Sequence[socket.socket] | None = None) -> None:
        """Listen on each listener's address, or on `sockets` (bound already, one per listener in order:
        the workers' shared ports, workers.py)."""
        loop = asyncio.get_running_loop()
        # Learn what each next hop can carry before the first EHLO, but do not hold the start for a next
        # hop that is down or slow: until it answers, EHLO offers only what any SMTP server can carry,
        # and the probe goes on in the background.
        probes = [lst.relay.pool.probe_soon() for lst in self.listeners]
        await self._open_ledger()
        if probes:
            await asyncio.wait(probes, timeout=STARTUP_PROBE_WAIT)
        where = "cannot listen"
        try:
            for index, lst in enumerate(self.listeners):
                where = f"listener {lst.config.name}: cannot listen on {lst.config.listen}"
                context = lst.context
                factory = functools.partial(EdgeProtocol, context)
                if sockets is not None:
                    lst.server = await loop.create_server(factory, sock=sockets[index])
                else:
                    lst.server = await loop.create_server(
                        factory, lst.config.listen.host, lst.config.listen.port, reuse_address=True
                    )
                host, port = lst.address
                log.info("listener %s (%s) on %s:%d", lst.config.name, lst.config.role.value, host, port)
        except OSError as error:
            await self.stop(0)
            raise ConfigError(f"{where}: {bind_failure(error)}") from None

    async def _open_ledger(self) -> None:
        """The ledger's store, when the config and the keyring turn it on; one line says which."""
        from .state import open_ledger

        if not self.listeners:
            return
        self._ledger_opened = await open_ledger(
            self.config, self.holder.policy.ledger_keys is not None, self.stores
        )
        if self._ledger_opened is not None:
            self.ledger.store = self._ledger_opened.store

    async def stop(self, deadline: float | None = None) -> None:
        """Stop accepting, let transactions in flight finish within `deadline` seconds, then cut."""
        if self._stopping:
            return
        self._stopping = True
        if deadline is None:
            deadline = self.config.limits.shutdown_deadline
        for lst in self.listeners:
            lst.context.shutting_down = True
            if lst.server is not None:
                lst.server.close()
        for lst in self.listeners:
            for session in list(lst.sessions):
                session.shutdown()
        end = time.monotonic() + deadline
        while any(lst.sessions for lst in self.listeners) and time.monotonic() < end:
            await asyncio.sleep(0.02)
        for lst in self.listeners:
            for session in list(lst.sessions):
                session.abort()
        # Let the cut sessions run their cleanup (next-hop transactions dropped without the dot).
        for _ in range(50):
            if not any(lst.sessions for lst in self.listeners):
                break
            await asyncio.sleep(0.01)
        for lst in self.listeners:
            if lst.server is not None:
                await lst.server.wait_closed()
            await lst.relay.pool.close()
        for lst in self.listeners:
            await lst.relay.records_written()
        self.ledger.store = None
        # Closes only what open_ledger made: the [state] stores are closed by whoever made them (run).
        opened, self._ledger_opened = self._ledger_opened, None
        if opened is not None:
            await opened.close()

    # ------------------------------------------------------------------ reload

    def apply(self, config: Config, keyring: Keyring) -> None:
        """The reloader's `apply`: new decisions use the new policy and keys. Listener addresses, TLS
        files and limits are bound at start; the reloader reports those as needing a restart."""
        self.holder.replace(Policy(config.policy, keyring))
        self.config = config


def bind_failure(error: OSError) -> str:
    """"Address already in use", not asyncio's "[Errno 98] error while attempting to bind on ..." line."""
    return os.strerror(error.errno) if error.errno else str(error)


def install_signals(
    loop: asyncio.AbstractEventLoop,
    stop: Callable[[], None],
    on_reload: Callable[[], None] | None,
) -> Iterable[signal.Signals]:
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
        installed.append(sig)
    if on_reload is not None:
        loop.add_signal_handler(signal.SIGHUP, on_reload)
        installed.append(signal.SIGHUP)
    return installed


async def run(
    config: Config,
    keyring: Keyring,
    *,
    observers: Sequence[DecisionObserver] = (),
    on_reload: Callable[[Gateway], Callable[[], None]] | None = None,
    ready: Callable[[Gateway], None] | None = None,
    stopping: Callable[[Gateway], None] | None = None,
    sockets: Sequence[socket.socket] | None = None,
    gates: Sequence[Gate] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT. `on_reload(gateway)` builds the SIGHUP handler (the reload seam);
    `ready(gateway)` is called once every listener is up (sd_notify READY=1, tests); `stopping(gateway)`
    when the drain begins (sd_notify STOPPING=1). `sockets`: listening sockets bound already (a worker's:
    workers.py) and `gates`, one per listener in order, counting sessions across them (sessiontable.py).
    The [state] stores, when the budgets need them (state.budgets_shared), are made here, in
    the process and loop that use them (a Redis client belongs to its loop; a worker makes its own after
    the fork), and closed once the gateway has stopped."""
    from . import workers
    from .state import budgets_shared, make_stores

    stores = await make_stores(config) if budgets_shared(config, config.workers) else None
    try:
        gateway = Gateway(config, keyring, observers, stores=stores, gates=gates)
        await gateway.start(sockets)
    except BaseException:
        if stores is not None:
            await stores.close()
        raise
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    reload = on_reload(gateway) if on_reload is not None else None

    def stop() -> None:
        stopped.set()

    def hup() -> None:
        if reload is not None:
            reload()

    installed = install_signals(loop, stop, hup if reload is not None else None)
    # Signals that came before the loop handled them (a command that forks remembers them).
    workers.replay_signals(stop, hup)
    try:
        if ready is not None:
            ready(gateway)
        await stopped.wait()
        if stopping is not None:
            stopping(gateway)
        log.info("shutting down: %g s for transactions in flight", config.limits.shutdown_deadline)
        await gateway.stop()
    finally:
        # Not before the stop is logged and the process exits 0.
        workers.ignore_from_now_on(loop, installed)
        if stores is not None:
            await stores.close()
    return 0
