"""`batv-gateway serve`: run the SMTP gateway from a config file, or from flags alone for a quick start.

Flags override the file (config.with_flags). SIGTERM/SIGINT shut down cleanly (serve.py); SIGHUP reloads
the config and the keyring (reload.py), and a changed keyring file is picked up without a signal.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import GatewayError

if TYPE_CHECKING:
    from . import keystore
    from .config import Config

log = logging.getLogger("gateway.serve")
ROLES = ("inbound", "outbound")  # config.Role's values; config is imported only when serve runs


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the SMTP gateway",
        description=(
            "Run the SMTP gateway: every listener of the config, or one listener built from the flags. "
            "With no --config, the embedded default runs: an inbound listener on 127.0.0.1:2525 and an "
            "outbound one on 127.0.0.1:2587, both relaying to 127.0.0.1:2526, for example.com, with a "
            "development keyring at keys/keyring.toml that is created if missing. Flags override the file."
        ),
        epilog=(
            "signals: SIGTERM or SIGINT stop accepting, let transactions in flight finish within "
            "shutdown_deadline and close idle sessions with 421 4.3.2; SIGHUP reloads the config and the "
            "keyring (a bad file is refused and the running one stays); a changed keyring file is picked "
            "up without a signal. Exit status: 0 after a clean stop, 2 for a config or keyring that cannot "
            "be used. Every config key: deploy/gateway.example.toml."
        ),
    )
    parser.add_argument(
        "--config", metavar="FILE", type=Path, help="the TOML config (deploy/gateway.example.toml)"
    )
    parser.add_argument("--role", choices=ROLES, help="the listener's role")
    parser.add_argument("--listen", metavar="HOST:PORT", help="where to listen")
    parser.add_argument("--next-hop", metavar="HOST:PORT", help="where mail goes on to")
    parser.add_argument("--keyring", metavar="PATH", help="the keyring file")
    parser.add_argument(
        "--domain",
        metavar="DOMAIN",
        action="append",
        default=[],
        help="a local and signed domain (repeatable)",
    )
    parser.add_argument("--srs-alias", metavar="DOMAIN", help="the SRS alias domain for forwarded mail")
    parser.add_argument(
        "--trusted",
        metavar="CIDR",
        action="append",
        default=[],
        help="a network allowed to relay (repeatable)",
    )
    parser.set_defaults(handler=handle, help_parser=parser)


def load_config(args: argparse.Namespace) -> Config:
    from . import config as config_module
    from .config import Role

    base = config_module.load(args.config) if args.config is not None else config_module.embedded_serve()
    return config_module.with_flags(
        base,
        role=Role(args.role) if args.role else None,
        listen=args.listen,
        next_hop=args.next_hop,
        keyring=args.keyring,
        domains=tuple(args.domain),
        srs_alias=args.srs_alias,
        trusted=tuple(args.trusted),
    )


def handle(args: argparse.Namespace) -> int:
    from . import keystore, logs

    config = load_config(args)
    if not config.listeners:
        raise GatewayError("no listener: add a [[listener]] to the config, or give --listen and --next-hop")
    if args.config is None and args.keyring is None and not config.keyring_path.exists():
        _create_development_keyring(config.keyring_path)
    kf = keystore.load(config.keyring_path)
    try:
        fmt = logs.LogFormat(config.log.format)
    except ValueError:
        fmt = logs.LogFormat.LOGFMT
    logs.setup(fmt, config.log.level.upper())
    return asyncio.run(_serve(args, config, kf))


async def _serve(args: argparse.Namespace, config: Config, kf: keystore.KeyringFile) -> int:
    # Imported here: the other sub-commands do not need the SMTP stack loaded.
    from .ops import Operations
    from .serve import run

    # The decision log and metrics, the reloader (SIGHUP and the keyring-file watch), sd_notify and the
    # /metrics, /healthz, /readyz endpoint: ops.py fills serve.run's seams.
    ops = Operations(config, kf, load_config=lambda: load_config(args))
    await ops.start()
    try:
        return await run(
            config,
            kf.keyring,
            observers=ops.observers,
            on_reload=ops.on_reload,
            ready=ops.ready,
            stopping=ops.stopping,
        )
    finally:
        await ops.close()


def _create_development_keyring(path: Path) -> None:
    """The embedded default's keyring: made once, in keys/, and said out loud (it is not for production)."""
    from datetime import UTC, datetime

    from . import keystore

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with keystore.locked(path):
        if path.exists():
            return
        keystore.save(path, keystore.new_keyring(datetime.now(UTC)))
    print(
        f"batv-gateway: created a development keyring at {path} (one active key); "
        "for production see keys/README.md",
        file=sys.stderr,
    )
