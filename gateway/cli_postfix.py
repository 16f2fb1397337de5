"""`batv-gateway socketmap` and `batv-gateway policy`: the Postfix-native modes (deploy/postfix/README.md).

Both read the same config as `serve` and take its quick-start flags, so that
    batv-gateway socketmap --listen 127.0.0.1:10030 --keyring K --domain example.org
is enough to try the socketmap mode. SIGTERM/SIGINT stop them; SIGHUP reloads the config and keyring, and a
changed keyring file is picked up alone (reload.Reloader, as in serve).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import keystore
    from .config import Config
    from .relay import PolicyHolder

    Started = tuple[list[asyncio.Server], Callable[[], None]]
    Starter = Callable[[Config, PolicyHolder], Awaitable[Started]]

log = logging.getLogger("gateway.postfix")


def _common(parser: argparse.ArgumentParser, listen_default: str) -> None:
    parser.add_argument(
        "--config", metavar="FILE", type=Path, help="the TOML config (deploy/gateway.example.toml)"
    )
    parser.add_argument("--listen", metavar="HOST:PORT", help=f"where to listen (default {listen_default})")
    parser.add_argument("--keyring", metavar="PATH", help="the keyring file")
    parser.add_argument(
        "--domain",
        metavar="DOMAIN",
        action="append",
        default=[],
        help="a local and signed domain (repeatable)",
    )
    parser.add_argument("--srs-alias", metavar="DOMAIN", help="the SRS alias domain for forwarded mail")


def register(subparsers: Any) -> None:
    sm = subparsers.add_parser(
        "socketmap",
        help="serve Postfix socketmap (and tcp_table) lookups: forward and reverse rewriting",
        description="Serve Postfix socketmap_table(5) maps 'forward' (sender_canonical_maps) and "
        "'reverse' (recipient_canonical_maps), and optionally tcp_table(5) ports as postsrsd 1.x has.",
    )
    _common(sm, "127.0.0.1:10030")
    sm.add_argument("--tcp-forward", metavar="HOST:PORT", help="also serve 'forward' over tcp_table(5)")
    sm.add_argument("--tcp-reverse", metavar="HOST:PORT", help="also serve 'reverse' over tcp_table(5)")
    sm.set_defaults(handler=handle_socketmap, help_parser=sm)

    pd = subparsers.add_parser(
        "policy",
        help="serve Postfix policy delegation: refuse forged bounces at RCPT",
        description="A Postfix policy service for check_policy_service in smtpd_recipient_restrictions.",
    )
    _common(pd, "127.0.0.1:10031")
    pd.add_argument(
        "--observe", action="store_true", help="accept what would be refused; log it and PREPEND a header"
    )
    pd.set_defaults(handler=handle_policy, help_parser=pd)


def load_config(args: argparse.Namespace) -> Config:
    """The config file (or the embedded default) with the flags applied; flags win."""
    from dataclasses import replace

    from . import config as config_module
    from .config import HostPort

    base = config_module.load(args.config) if args.config is not None else config_module.default()
    config = config_module.with_flags(
        base, keyring=args.keyring, domains=tuple(args.domain), srs_alias=args.srs_alias
    )
    if args.command == "socketmap":
        sm = config.socketmap
        if args.listen:
            sm = replace(sm, listen=HostPort.parse(args.listen, "--listen"))
        if args.tcp_forward:
            sm = replace(sm, tcp_forward=HostPort.parse(args.tcp_forward, "--tcp-forward"))
        if args.tcp_reverse:
            sm = replace(sm, tcp_reverse=HostPort.parse(args.tcp_reverse, "--tcp-reverse"))
        config = replace(config, socketmap=sm)
    else:
        pd = config.policyd
        if args.listen:
            pd = replace(pd, listen=HostPort.parse(args.listen, "--listen"))
        if args.observe:
            pd = replace(pd, observe=True)
        config = replace(config, policyd=pd)
    return config


def handle_socketmap(args: argparse.Namespace) -> int:
    args.command = "socketmap"
    return _main(args, _start_socketmap)


def handle_policy(args: argparse.Namespace) -> int:
    args.command = "policy"
    return _main(args, _start_policy)


def _main(args: argparse.Namespace, start: Starter) -> int:
    from . import keystore, logs

    config = load_config(args)
    kf = keystore.load(config.keyring_path)
    try:
        fmt = logs.LogFormat(config.log.format)
    except ValueError:
        fmt = logs.LogFormat.LOGFMT
    logs.setup(fmt, config.log.level.upper())
    try:
        # The optional "fast" extra: uvloop's transports cut the per-lookup overhead. Imported by name so
        # that type checking does not need it installed.
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.run(_serve(args, config, kf, start))
    return int(uvloop.run(_serve(args, config, kf, start)))


async def _start_socketmap(config: Config, holder: PolicyHolder) -> Started:
    from .socketmap import FORWARD, REVERSE, MapService, start_socketmap, start_tcp_table

    sm = config.socketmap
    service = MapService(holder, max_request=sm.max_request)
    servers = [await start_socketmap(service, sm.listen.host, sm.listen.port)]
    _announce("socketmap", servers[-1], "maps forward, reverse")
    for name, where in ((FORWARD, sm.tcp_forward), (REVERSE, sm.tcp_reverse)):
        if where is not None:
            servers.append(await start_tcp_table(service, name, where.host, where.port))
            _announce("tcp_table", servers[-1], f"map {name}")
    return servers, service.close_connections


async def _start_policy(config: Config, holder: PolicyHolder) -> Started:
    from .guard import GuardSettings
    from .policyd import PolicyService, start_policyd

    limits = config.limits
    guard = GuardSettings(
        soft_error_limit=limits.soft_error_limit,
        hard_error_limit=limits.hard_error_limit,
        error_sleep_time=limits.error_sleep_time,
        guess_rate=limits.guess_rate,
        guess_burst=max(1, limits.guess_burst),
    )
    pd = config.policyd
    service = PolicyService(holder, observe=pd.observe, guard=guard)
    server = await start_policyd(service, pd.listen.host, pd.listen.port)
    _announce("policy", server, "observe mode" if pd.observe else "enforce mode")
    return [server], service.close_connections


def _announce(kind: str, server: asyncio.Server, what: str) -> None:
    from .logs import log_fields

    for sock in server.sockets:
        host, port = sock.getsockname()[:2]
        listen = f"{host}:{port}"
        log_fields(log, logging.INFO, f"{kind} listening", event="listening", listen=listen, serves=what)


async def _serve(args: argparse.Namespace, config: Config, kf: keystore.KeyringFile, start: Starter) -> int:
    from .policy import Policy
    from .relay import PolicyHolder
    from .reload import Reloader
    from .sdnotify import Notifier

    holder = PolicyHolder(Policy(config.policy, kf.keyring))
    servers, close_connections = await start(config, holder)
    notifier = Notifier()
    reloader = Reloader(
        config,
        kf,
        load_config=lambda: load_config(args),
        apply=lambda new, keyring: holder.replace(Policy(new.policy, keyring)),
        notifier=notifier,
    )
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    reloader.install_signal_handler(loop)
    reloader.start_watching()
    notifier.ready(status=f"serving {args.command}")
    try:
        await stopped.wait()
        notifier.stopping()
        log.info("shutting down")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await reloader.close()
        for server in servers:
            server.close()
        close_connections()
        for server in servers:
            await server.wait_closed()
    return 0
