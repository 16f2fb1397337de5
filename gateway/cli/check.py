"""`batv-gateway check-config`: validate the config and the keyring without starting anything.

It runs the same strict loaders that `serve` and a reload run, so a file that passes here is a file that
`systemctl reload` will accept. It opens no socket and changes no file. Use it before a reload, in
`ExecStartPre=` or `ExecReload=` of the systemd unit, and in config management's validate step:

    batv-gateway check-config --config /etc/batv-gateway/gateway.toml && systemctl reload batv-gateway

Exit codes: 0 when everything loads, 2 with one line naming the file and the key when something does not.
What loads but is probably a mistake (no [gateway] hostname on a host without a fully qualified name) is a
warning on stderr, even with --quiet, and exit 0.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..ops import config as config_mod
from ..ops import keystore
from .keys import signing_began_line


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check-config",
        prog="batv-gateway check-config",
        help="validate the config and keyring without starting anything",
        usage="batv-gateway check-config --config FILE [--keyring PATH] [--quiet]",
        description="Load the config file and the keyring it names (or --keyring) with the same strict "
        "checks as serve and reload, and the TLS certificates of each listener. Exit 0 if all load; "
        "exit 2 with the error otherwise. What loads but is likely a mistake (no hostname on a host "
        "without a fully qualified name) is a warning on stderr, even with --quiet.",
    )
    parser.add_argument("--config", metavar="FILE", type=Path, required=True, help="the config file to check")
    parser.add_argument(
        "--keyring", metavar="PATH", type=Path, help="check this keyring instead of the config's"
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="print nothing when all is well")
    parser.set_defaults(handler=run)


def check(
    config_path: Path, keyring_path: Path | None = None
) -> tuple[config_mod.Config, keystore.KeyringFile]:
    """Load and check everything; raises GatewayError (ConfigError, KeyringError) naming file and key."""
    config = config_mod.load(config_path)
    config_mod.check_listeners(config)
    kf = keystore.load(keyring_path if keyring_path is not None else config.keyring_path)
    for listener in config.listeners:
        if listener.tls_cert is not None and listener.tls_key is not None:
            _check_tls(config_path, listener.name, listener.tls_cert, listener.tls_key)
    return config, kf


def _check_tls(config_path: Path, name: str, cert: Path, key: Path) -> None:
    where = f"{config_path}: listener {name}"
    # ssl's own errors do not say which of the two files is missing: look first.
    for setting, path in (("tls_cert", cert), ("tls_key", key)):
        if not path.is_file():
            raise ConfigError(f"{where}: {setting}: {path}: no such file")
        if not os.access(path, os.R_OK):
            raise ConfigError(
                f"{where}: {setting}: {path}: permission denied (the gateway's user must read it)"
            )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        # The reason only (for example KEY_VALUES_MISMATCH): never the content of the key file.
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        raise ConfigError(f"{where}: tls_cert {cert} and tls_key {key} do not load: {reason}") from None


def ledger_line(enabled: bool, has_secret: bool, path: Path) -> str:
    """What check-config says of the Message-ID ledger (serve says the same at start-up)."""
    if not enabled:
        return "ledger off ([ledger] enabled = false): bounces to untagged addresses are refused at RCPT"
    if not has_secret:
        return (
            "ledger off: the keyring has no ledger secret, so bounces to untagged addresses are refused at "
            "RCPT; run 'batv-gateway keys ledger-secret' to turn it on"
        )
    return f"ledger on: {path} (it must be writable by the gateway's user)"


def workers_line(workers: int, auto: bool) -> str:
    """What check-config says of [gateway] workers ("auto" counted on the host check-config runs on)."""
    if not auto:
        return f"workers: {workers}"
    return (
        f'workers: {workers} ("auto": one per CPU this process may run on; 1 if the [state] file '
        "they share cannot be made)"
    )


def run(args: argparse.Namespace) -> int:
    config, kf = check(args.config, args.keyring)
    for warning in config.warnings:
        print(f"batv-gateway: warning: {warning}", file=sys.stderr)
    if not args.quiet:
        active = kf.keyring.active
        keyring_path = args.keyring if args.keyring is not None else config.keyring_path
        listeners = ", ".join(
            f"{lc.name} ({lc.role.value} {lc.listen} -> {lc.next_hop})" for lc in config.listeners
        )
        print(f"{args.config}: ok; listeners: {listeners or 'none'}")
        print(
            f"{keyring_path}: ok; generation {kf.generation}, {len(kf.keyring.keys)} keys,"
            f" active key {active.id} (fingerprint {active.fingerprint})"
        )
        if config.policy.bounce_grace:
            print(f"{keyring_path}: {signing_began_line(kf.keyring.signing_began, config.lifetime_days)}")
        else:
            print(f"{keyring_path}: grace window off ([policy] bounce_grace = false)")
        print(ledger_line(config.ledger.enabled, kf.keyring.ledger_secret is not None, config.ledger_path))
        print(workers_line(config.workers, config.workers_auto))
        sys.stdout.flush()
    return 0
