"""`batv-gateway serve`: run the SMTP gateway from a config file, or from flags alone for a quick start.

Flags override the file (config.with_flags). SIGTERM/SIGINT shut down cleanly (serve.py); SIGHUP reloads
the config and the keyring (reload.py), and a changed keyring file is picked up without a signal.

`[gateway] workers = N` runs N worker processes on the same ports under a main process that only
supervises them (workers.supervise): it passes SIGTERM and SIGHUP on, says READY only when every worker
serves, and replaces a worker that dies. It binds the metrics endpoint, which every worker serves with the
sums of all the workers' counts (metrics.py). The failed-guess budget and the null-sender rate are the
[state] store's, made in each worker after the fork (serve.run): counted across every worker (and, on
Redis, every host). The session limits (`max_sessions`, `max_sessions_per_client`) are this host's: a table
in shared memory made here before the fork (sessiontable.py), in which each worker counts in its slot.
uvloop (a dependency) runs the loop; stdlib asyncio stands in where it cannot be imported.
"""

from __future__ import annotations

import argparse
import functools
import logging
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import GatewayError
from .main import add_quickstart_flags

if TYPE_CHECKING:
    from ..edge.smtpd import Gate
    from ..ops import keystore
    from ..ops.config import Config, MetricsConfig

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
            "up without a signal. At start-up a line per inbound listener says whether it enforces or "
            "observes; the last line after a clean stop is msg=stopped. Exit status: 0 after a clean stop, "
            "2 for a config or keyring that cannot be used, or an address already taken. Every config key: "
            "deploy/gateway.example.toml."
        ),
    )
    add_quickstart_flags(parser, "where to listen")
    parser.add_argument("--role", choices=ROLES, help="the listener's role")
    parser.add_argument("--next-hop", metavar="HOST:PORT", help="where mail goes on to")
    parser.add_argument(
        "--trusted",
        metavar="CIDR",
        action="append",
        default=[],
        help="a network allowed to relay (repeatable)",
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT|off",
        help="serve /metrics, /healthz and /readyz here instead of at [metrics] listen; 'off' for none "
        "(the embedded default has 127.0.0.1:9425)",
    )
    parser.set_defaults(handler=handle, help_parser=parser)


def load_config(args: argparse.Namespace) -> Config:
    from ..ops import config as config_module
    from ..ops.config import Role

    base = config_module.load(args.config) if args.config is not None else config_module.embedded_serve()
    config = config_module.with_flags(
        base,
        role=Role(args.role) if args.role else None,
        listen=args.listen,
        next_hop=args.next_hop,
        keyring=args.keyring,
        domains=tuple(args.domain),
        srs_alias=args.srs_alias,
        trusted=tuple(args.trusted),
    )
    if args.metrics is not None:
        config = replace(config, metrics=metrics_flag(args.metrics))
    # After the flags: `--domain` can give an inbound listener the domains its file lacks.
    config_module.check_listeners(config)
    return config


def metrics_flag(text: str) -> MetricsConfig:
    from ..core.errors import ConfigError
    from ..ops.config import HostPort, MetricsConfig

    if text == "off":
        return MetricsConfig(None)
    try:
        return MetricsConfig(HostPort.parse(text, "--metrics"))
    except ConfigError:
        example = "for example 127.0.0.1:9425"
        raise ConfigError(f"--metrics: {text!r} is not HOST:PORT or off ({example})") from None


def handle(args: argparse.Namespace) -> int:
    from ..core import logs
    from ..ops import keystore, workers
    from ..ops import operations as ops

    # Before anything slow: a SIGTERM or SIGHUP during start-up is handled once the loop is up, not
    # fatal to a main process whose workers would then be orphaned (workers.py).
    workers.remember_signals()
    config = load_config(args)
    if not config.listeners:
        raise GatewayError("no listener: add a [[listener]] to the config, or give --listen and --next-hop")
    if args.config is None and args.keyring is None and not config.keyring_path.exists():
        _create_development_keyring(config.keyring_path)
    kf = keystore.load(config.keyring_path)
    logs.setup_from(config.log)
    ops.announce(config)
    code = _run(args, config, kf)
    ops.log_stopped(log, code)
    return code


def _run(args: argparse.Namespace, config: Config, kf: keystore.KeyringFile) -> int:
    from ..ops import metrics, workers
    from ..ops import operations as ops
    from ..ops.serve import bind_failure
    from ..ops.state import workers_that_start

    config = workers_that_start(config)
    if config.workers == 1:
        return workers.run(_serve(args, config, kf))
    # Several processes on the same ports: reserved here, once, so that a port 0 listener is one port;
    # the main process only supervises them (workers.supervise).
    reserved: list[socket.socket] = []
    for lc in config.listeners:
        try:
            reserved.append(workers.reserve(lc.listen.host, lc.listen.port))
        except OSError as error:
            for sock in reserved:
                sock.close()
            # The line serve.Gateway.start gives with workers = 1.
            raise GatewayError(
                f"listener {lc.name}: cannot listen on {lc.listen}: {bind_failure(error)}"
            ) from None
    metrics_socket = ops.bind_metrics(config)
    from ..edge.sessiontable import ListenerLimits, SessionTable

    limits = [lc.limits for lc in config.listeners]
    table = SessionTable(
        config.workers, [ListenerLimits(lim.max_sessions, lim.max_sessions_per_client) for lim in limits]
    )
    # Shared counts cost each count a write to a file (a few microseconds): only when someone can read them.
    shared = metrics.shared_folder() if metrics_socket is not None else None

    def worker(say_ready: Callable[[], None]) -> int:
        own = [workers.own_socket(sock) for sock in reserved]
        serving = _serve(
            args,
            config,
            kf,
            sockets=own,
            gates=table.gates(workers.worker_slot()),
            say_ready=say_ready,
            shared_metrics=shared,
            metrics_socket=metrics_socket,
        )
        return workers.run(serving)

    from ..ops.sdnotify import Notifier

    try:
        return workers.supervise(
            config.workers,
            worker,
            notifier=Notifier(),
            on_exit=functools.partial(metrics.process_gone, shared) if shared else lambda pid: None,
            clear_slot=table.clear,
            # The workers drain within the same deadline.
            stop_timeout=config.limits.shutdown_deadline + 10.0,
        )
    finally:
        table.close()
        for sock in reserved:
            sock.close()
        if metrics_socket is not None:
            metrics_socket.close()
        if shared is not None:
            metrics.remove_shared_folder(shared)


async def _serve(
    args: argparse.Namespace,
    config: Config,
    kf: keystore.KeyringFile,
    *,
    sockets: Sequence[socket.socket] | None = None,
    gates: Sequence[Gate] | None = None,
    say_ready: Callable[[], None] | None = None,
    shared_metrics: Path | None = None,
    metrics_socket: socket.socket | None = None,
) -> int:
    """One process's gateway. `say_ready`: set in a worker, which tells the main process it serves
    instead of speaking to systemd, and serves the main process's `metrics_socket` with the workers'
    `shared_metrics`."""
    # Imported here: the other sub-commands do not need the SMTP stack loaded.
    from ..ops.operations import Operations
    from ..ops.sdnotify import Notifier
    from ..ops.serve import Gateway, run

    # The decision log and metrics, the reloader (SIGHUP and the keyring-file watch), sd_notify and the
    # /metrics, /healthz, /readyz endpoint: ops.py fills serve.run's seams.
    in_worker = say_ready is not None
    ops = Operations(
        config,
        kf,
        load_config=lambda: _as_running(load_config(args), config),
        notifier=Notifier(socket_name="") if in_worker else None,
        shared_metrics=shared_metrics,
        metrics_socket=metrics_socket,
    )

    def ready(gateway: Gateway) -> None:
        if gateway.stores is not None:
            # batv_state_store_up, batv_state_fallbacks_total and the /readyz detail.
            ops.metrics.watch_state(gateway.stores)
        ops.ready(gateway)
        if say_ready is not None:
            say_ready()

    await ops.start()
    try:
        return await run(
            config,
            kf.keyring,
            observers=ops.observers,
            on_reload=ops.on_reload,
            ready=ready,
            stopping=ops.stopping,
            sockets=sockets,
            gates=gates,
        )
    finally:
        await ops.close()


def _as_running(new: Config, running: Config) -> Config:
    """A reloaded config: "auto" workers then and now is no change to report, even where the running
    count fell back to 1 (state.workers_that_start)."""
    if new.workers_auto and running.workers_auto:
        return replace(new, workers=running.workers)
    return new


def _create_development_keyring(path: Path) -> None:
    """The embedded default's keyring: made once, in keys/, and said out loud (it is not for production)."""
    from datetime import UTC, datetime

    from ..ops import keystore

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with keystore.locked(path):
        if path.exists():
            return
        keystore.save(path, keystore.new_keyring(datetime.now(UTC), ledger=True))
    print(
        f"batv-gateway: created a development keyring at {path} (one active key); "
        "for production see keys/README.md",
        file=sys.stderr,
    )
