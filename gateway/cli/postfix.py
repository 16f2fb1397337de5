"""`batv-gateway socketmap` and `batv-gateway policy`: the Postfix-native modes (deploy/postfix/README.md).

Both read the same config as `serve` and take its quick-start flags, so that
    batv-gateway socketmap --listen 127.0.0.1:10030 --keyring K --domain example.org
is enough to try the socketmap mode. SIGTERM/SIGINT stop them; SIGHUP reloads the config and keyring, and a
changed keyring file is picked up alone (reload.Reloader, as in serve). As serve's, their last line after a
clean stop is `msg=stopped event=stop status=0`.

Both listen on HOST:PORT or on a socket file, `unix:/PATH` (unixsocket.py: its mode and group, a stale
file replaced, a live one refused, the file removed on shutdown); deploy/postfix/ uses the socket file.

`[gateway] workers = N` runs the socketmap in N processes on the same ports (SO_REUSEPORT; the ports are
bound and announced once, before the fork, so `--listen 127.0.0.1:0` works too), as Postfix runs many
cleanup processes that each hold a connection: one Python process uses one CPU. A socket file has no
SO_REUSEPORT: it is bound once and the workers accept on that one inherited socket. The main process
forwards SIGTERM and SIGHUP to the others. The policy service always runs in one process, so that its
per-client guess limits see every connection; `[policyd] metrics_listen` gives it a /metrics endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..ops import workers as workers_module
from .main import add_quickstart_flags

if TYPE_CHECKING:
    from ..edge.relay import PolicyHolder
    from ..ops import keystore
    from ..ops.config import Config, Listen
    from ..ops.metrics import Metrics
    from ..postfix.socketmap import MapService
    from ..postfix.unixsocket import UnixListener

    # The servers, and what closes their connections (and anything else the starter opened).
    Started = tuple[list[asyncio.Server], Callable[[], Awaitable[None]]]
    Starter = Callable[[Config, PolicyHolder, "Bound", Metrics], Awaitable[Started]]

log = logging.getLogger("gateway.postfix")


def register(subparsers: Any) -> None:
    sm = subparsers.add_parser(
        "socketmap",
        help="serve Postfix socketmap (and tcp_table) lookups: forward and reverse rewriting",
        description="Serve Postfix socketmap_table(5) maps 'forward' (sender_canonical_maps) and "
        "'reverse' (recipient_canonical_maps), and optionally tcp_table(5) ports as postsrsd 1.x has.",
    )
    add_quickstart_flags(sm, "where to listen: HOST:PORT or unix:/PATH (default 127.0.0.1:10030)")
    sm.add_argument("--tcp-forward", metavar="HOST:PORT", help="also serve 'forward' over tcp_table(5)")
    sm.add_argument("--tcp-reverse", metavar="HOST:PORT", help="also serve 'reverse' over tcp_table(5)")
    sm.set_defaults(handler=handle_socketmap, help_parser=sm)

    pd = subparsers.add_parser(
        "policy",
        help="serve Postfix policy delegation: refuse forged bounces at RCPT",
        description="A Postfix policy service for check_policy_service in smtpd_recipient_restrictions.",
    )
    add_quickstart_flags(pd, "where to listen: HOST:PORT or unix:/PATH (default 127.0.0.1:10031)")
    pd.add_argument(
        "--observe", action="store_true", help="accept what would be refused; log it and PREPEND a header"
    )
    pd.set_defaults(handler=handle_policy, help_parser=pd)


def load_config(args: argparse.Namespace) -> Config:
    """The config file (or the embedded default) with the flags applied; flags win."""
    from dataclasses import replace

    from ..ops import config as config_module
    from ..ops.config import HostPort, parse_listen

    base = config_module.load(args.config) if args.config is not None else config_module.default()
    config = config_module.with_flags(
        base, keyring=args.keyring, domains=tuple(args.domain), srs_alias=args.srs_alias
    )
    if args.command == "socketmap":
        sm = config.socketmap
        if args.listen:
            sm = replace(sm, listen=parse_listen(args.listen, "--listen"))
        if args.tcp_forward:
            sm = replace(sm, tcp_forward=HostPort.parse(args.tcp_forward, "--tcp-forward"))
        if args.tcp_reverse:
            sm = replace(sm, tcp_reverse=HostPort.parse(args.tcp_reverse, "--tcp-reverse"))
        config = replace(config, socketmap=sm)
    elif args.command == "milter":  # cli_milter.py
        if args.listen:
            milter = replace(config.milter, listen=parse_listen(args.listen, "--listen"))
            config = replace(config, milter=milter)
    else:
        pd = config.policyd
        if args.listen:
            pd = replace(pd, listen=parse_listen(args.listen, "--listen"))
        if args.observe:
            pd = replace(pd, observe=True)
        config = replace(config, policyd=pd)
    return config


Bound = list[tuple[str, socket.socket]]  # (what it serves, the listening socket)


def handle_socketmap(args: argparse.Namespace) -> int:
    args.command = "socketmap"
    return _main(args, _start_socketmap)


def handle_policy(args: argparse.Namespace) -> int:
    args.command = "policy"
    return _main(args, _start_policy)


def _bind(
    where: Listen, shared: bool, mode: int, group: str | None, files: list[UnixListener]
) -> socket.socket:
    from ..ops.config import UnixPath
    from ..postfix import unixsocket

    if isinstance(where, UnixPath):
        listener = unixsocket.listen(where.path, mode, group)
        files.append(listener)
        return listener.sock
    return workers_module.bind(where.host, where.port, shared)


def _bind_all(command: str, config: Config, shared: bool, files: list[UnixListener]) -> Bound:
    """Every listening socket of the command; the socket files bound are added to `files`, for the main
    process to remove on shutdown."""
    if command == "policy":
        pd = config.policyd
        what = "enforce mode" if not pd.observe else "observe mode"
        return [(what, _bind(pd.listen, shared, pd.socket_mode, pd.socket_group, files))]
    if command == "milter":
        mi = config.milter
        return [("milter", _bind(mi.listen, shared, mi.socket_mode, mi.socket_group, files))]
    sm = config.socketmap
    bound = [("maps forward, reverse", _bind(sm.listen, shared, sm.socket_mode, sm.socket_group, files))]
    for name, where in (("forward", sm.tcp_forward), ("reverse", sm.tcp_reverse)):
        if where is not None:
            bound.append((f"map {name}", _bind(where, shared, sm.socket_mode, sm.socket_group, files)))
    return bound


def _where(sock: socket.socket) -> str:
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def _own(sock: socket.socket) -> socket.socket:
    """A worker's listening socket: its own on a shared port, the inherited one on a socket file."""
    return sock if sock.family == socket.AF_UNIX else workers_module.own_socket(sock)


def _main(args: argparse.Namespace, start: Starter) -> int:
    from ..core import logs
    from ..ops import keystore
    from ..ops import operations as ops

    workers_module.remember_signals()
    config = load_config(args)
    kf = keystore.load(config.keyring_path)
    logs.setup_from(config.log)
    count = config.workers if args.command == "socketmap" else 1
    files: list[UnixListener] = []
    try:
        bound = _bind_all(args.command, config, count > 1, files)
    except BaseException:
        for listener in files:
            listener.remove()
        raise
    for what, sock in bound:
        kind = "tcp_table" if what.startswith("map ") else args.command
        logs.log_fields(
            log, logging.INFO, f"{kind} listening", event="listening", listen=_where(sock), serves=what
        )

    def worker(say_ready: Callable[[], None]) -> int:
        own = [(what, _own(sock)) for what, sock in bound]
        return workers_module.run(_serve(args, config, kf, start, own, None, say_ready))

    children = workers_module.fork(count - 1, worker)
    try:
        code = workers_module.run(_serve(args, config, kf, start, bound, children, None))
    finally:
        for _, sock in bound:
            sock.close()
        children.reap()
        for listener in files:  # only here: a worker that exits leaves the main process's file alone
            listener.remove()
    ops.log_stopped(log, code)
    return code


def map_service(config: Config, holder: PolicyHolder) -> MapService:
    from ..postfix.socketmap import MapService

    sm = config.socketmap
    return MapService(holder, max_request=sm.max_request, cache_size=sm.cache_size)


async def _start_socketmap(config: Config, holder: PolicyHolder, bound: Bound, metrics: Metrics) -> Started:
    from ..postfix.socketmap import FORWARD, REVERSE, SocketmapProtocol, TcpTableProtocol

    service = map_service(config, holder)
    loop = asyncio.get_running_loop()
    servers = []
    for what, sock in bound:
        if what == f"map {FORWARD}":
            servers.append(await loop.create_server(lambda: TcpTableProtocol(service, FORWARD), sock=sock))
        elif what == f"map {REVERSE}":
            servers.append(await loop.create_server(lambda: TcpTableProtocol(service, REVERSE), sock=sock))
        else:
            servers.append(await loop.create_server(lambda: SocketmapProtocol(service), sock=sock))

    async def close() -> None:
        service.close_connections()

    return servers, close


async def _start_policy(config: Config, holder: PolicyHolder, bound: Bound, metrics: Metrics) -> Started:
    from ..core import logs
    from ..core.logs import DecisionLog
    from ..ops.metrics import MetricsServer
    from ..ops.state import budget_rules, budgets_shared, make_stores
    from ..policy.guard import GuardSettings
    from ..policy.guessbudget import LocalBudget
    from ..postfix.policyd import PolicyCounters, PolicyEvent, PolicyService

    limits = config.limits
    guard = GuardSettings(
        soft_error_limit=limits.soft_error_limit,
        hard_error_limit=limits.hard_error_limit,
        error_sleep_time=limits.error_sleep_time,
        guess_rate=limits.guess_rate,
        guess_burst=max(1, limits.guess_burst),
    )
    decision_log = DecisionLog()

    def on_decision(event: PolicyEvent) -> None:
        decision_log(event)
        metrics.on_decision(event)

    # On Redis, the failed-guess budget the fleet's `serve` processes charge too; on SQLite the policy
    # service is one process, and its own budget counts all it answers (state.budgets_shared).
    stores = await make_stores(config) if budgets_shared(config, 1) else None
    service = PolicyService(
        holder,
        observe=config.policyd.observe,
        guard=guard,
        guesses=stores.guess_budget if stores is not None else LocalBudget(budget_rules(config)[0]),
        on_decision=on_decision,
        counters=PolicyCounters(metrics.registry),
    )
    servers = [await asyncio.start_server(service.handle, sock=sock) for _, sock in bound]
    endpoint: MetricsServer | None = None
    where = config.policyd.metrics_listen
    if where is not None:
        endpoint = MetricsServer(metrics)
        await endpoint.start(where.host, where.port)
        logs.log_fields(
            log, logging.INFO, "metrics endpoint up", event="metrics", metrics=f"{where.host}:{endpoint.port}"
        )

    async def close() -> None:
        service.close_connections()
        if endpoint is not None:
            await endpoint.close()
        if stores is not None:
            await stores.close()

    return servers, close


async def _serve(
    args: argparse.Namespace,
    config: Config,
    kf: keystore.KeyringFile,
    start: Starter,
    bound: Bound,
    children: workers_module.Workers | None,
    say_ready: Callable[[], None] | None,
) -> int:
    """One process's server. `children`: the workers to pass signals on to (None in a worker itself);
    `say_ready`: a worker's way to tell the main process it serves."""
    from ..edge.relay import PolicyHolder
    from ..ops.metrics import Metrics
    from ..ops.reload import Reloader
    from ..ops.sdnotify import Notifier
    from ..policy.policy import Policy

    holder = PolicyHolder(Policy(config.policy, kf.keyring))
    metrics = Metrics()
    metrics.set_keyring(kf.keyring, kf.generation)
    servers, close = await start(config, holder, bound, metrics)
    # Only the main process speaks to systemd: it is the service's MAINPID.
    notifier = Notifier() if children is not None else Notifier(socket_name="")
    reloader = Reloader(
        config,
        kf,
        load_config=lambda: load_config(args),
        apply=lambda new, keyring: holder.replace(Policy(new.policy, keyring)),
        metrics=metrics,
        notifier=notifier,
    )
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()

    def pass_on(sig: signal.Signals) -> None:
        if children is not None:
            children.pass_on(sig)

    def on_stop() -> None:
        pass_on(signal.SIGTERM)
        stopped.set()

    def on_hup() -> None:
        pass_on(signal.SIGHUP)
        loop.call_soon(_reload, reloader)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    workers_module.replay_signals(on_stop, on_hup)
    reloader.start_watching()
    if say_ready is not None:
        say_ready()
    if children is not None:
        children.wait_ready()
    notifier.ready(status=f"serving {args.command}")
    try:
        await stopped.wait()
        notifier.stopping()
        log.info("shutting down")
    finally:
        # Not before the socket files are removed below.
        workers_module.ignore_from_now_on(loop, workers_module.SIGNALS)
        await reloader.close()
        for server in servers:
            server.close()
        await close()
        for server in servers:
            await server.wait_closed()
    return 0


def _reload(reloader: Any) -> None:
    try:
        reloader.reload()  # logs its own outcome, refused or applied
    except Exception:
        log.exception("reload failed")
