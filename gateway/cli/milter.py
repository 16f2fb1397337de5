"""`batv-gateway milter`: the milter front end (milterd.py), for Postfix's smtpd_milters and
non_smtpd_milters or Sendmail's INPUT_MAIL_FILTER (deploy/postfix/milter-main.cf).

It reads the same config as `serve`, `socketmap` and `policy` and takes their quick-start flags:
    batv-gateway milter --listen unix:/var/spool/postfix/batv/milter --keyring K --domain example.org
Signals, reloads and the socket file's life are the Postfix-native modes' (cli_postfix.py): SIGTERM and
SIGINT stop it, SIGHUP reloads the config's policy and the keyring, and a changed keyring file is picked
up alone. The `[milter]` rules that tell outbound from inbound are read at start.

One process: each MTA connection is one SMTP session, and its state (the client, the macros, the
transaction) lives in that connection, so nothing is shared, but `[gateway] workers` is not used here.

The Message-ID ledger (milterledger.py) runs at end of message when `[ledger] enabled` and the keyring
has a ledger secret: its store is opened as serve's is (state.open_ledger) and closed at shutdown.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from .main import add_quickstart_flags

if TYPE_CHECKING:
    from ..edge.relay import PolicyHolder
    from ..ops.config import Config
    from ..ops.metrics import Metrics
    from .postfix import Bound, Started


def register(subparsers: Any) -> None:
    mi = subparsers.add_parser(
        "milter",
        help="serve the milter protocol to Postfix or Sendmail: the whole gateway inside the MTA",
        description="A milter (protocol 6): forged bounces refused at RCPT, valid tags stripped, and the "
        "envelope sender of outbound mail signed at end of message (SMFIR_CHGFROM).",
    )
    add_quickstart_flags(mi, "where to listen: HOST:PORT or unix:/PATH (default 127.0.0.1:10032)")
    mi.set_defaults(handler=handle_milter, help_parser=mi)


def handle_milter(args: argparse.Namespace) -> int:
    from . import postfix as cli_postfix

    args.command = "milter"
    return cli_postfix._main(args, _start_milter)


async def _start_milter(config: Config, holder: PolicyHolder, bound: Bound, metrics: Metrics) -> Started:
    import asyncio

    from ..ops.state import open_ledger
    from ..postfix.milterd import MilterService, MilterSettings
    from ..postfix.milterledger import LedgerHook

    mc = config.milter
    settings = MilterSettings(frozenset(mc.outbound_daemons), mc.trusted, mc.authenticated_outbound)
    # The ledger is on when [ledger] enabled and the keyring has its secret at start (as for serve).
    opened = await open_ledger(config, holder.policy.ledger_keys is not None)
    hook = None
    if opened is not None:
        hook = LedgerHook(holder, opened.store, config.ledger.days, config.ledger.max_replies)
    service = MilterService(holder, settings, hook=hook)
    servers = [await asyncio.start_server(service.handle, sock=sock) for _, sock in bound]

    async def close() -> None:
        await service.close_connections()
        if hook is not None:
            await hook.records_written()
        if opened is not None:
            await opened.close()

    return servers, close
