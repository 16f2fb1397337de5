"""The operations side of one running gateway: decision logs, metrics and health, sd_notify, live reload.

`serve.run` has four seams and this class fills them, so that `cli_serve` wires everything in a few lines:
- `observers`: the decision callbacks (one log line per decision; the counters);
- `on_reload(gateway)`: called once the listeners are up; starts the reloader (SIGHUP and the keyring-file
  watch) and returns the SIGHUP handler;
- `ready(gateway)`: every listener is bound: /readyz turns 200 and systemd gets READY=1;
- `stopping(gateway)`: the drain begins (see below).
`start()` (before `run`) opens the metrics endpoint, so a probe sees 503 rather than a refused connection
while the gateway starts. `stopping(gateway)`, when the drain begins, turns /readyz back to 503 and tells
systemd STOPPING=1; /readyz also reads 503 as soon as serve's stop() marks the listeners as shutting down.
`close()`, once `run` returns, stops the watcher and the endpoint.

In a worker of `[gateway] workers = N` (workers.supervise) the endpoint is the socket the main process
bound, shared by every worker, and the counts are the workers' shared ones (metrics.py): whichever worker
answers a scrape gives the sums, and its own /healthz and /readyz.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..core import logs
from ..core.errors import GatewayError
from ..core.keyring import Keyring
from ..core.logs import DecisionLog, log_fields
from . import keystore
from .config import Config, Role
from .metrics import SESSIONS_SAMPLE_INTERVAL, Metrics, MetricsServer
from .reload import DEFAULT_POLL_INTERVAL, Reloader
from .sdnotify import Notifier
from .serve import bind_failure

_log = logging.getLogger("gateway.ops")


class Operations:
    def __init__(
        self,
        config: Config,
        keyring: keystore.KeyringFile,
        *,
        load_config: Callable[[], Config],
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        shared_metrics: Path | None = None,
        metrics_socket: socket.socket | None = None,
    ) -> None:
        self.config = config
        self.keyring = keyring
        self.metrics = metrics if metrics is not None else Metrics(shared=shared_metrics)
        self.metrics.set_keyring(keyring.keyring, keyring.generation)
        self.notifier = notifier if notifier is not None else Notifier()
        self.decision_log = DecisionLog()
        self.reloader: Reloader | None = None
        self.metrics_server: MetricsServer | None = None
        self.gateway: Any = None
        self._load_config = load_config
        self._poll_interval = poll_interval
        self._ready = False
        # With [gateway] workers > 1 the main process binds the endpoint and the workers serve it.
        self._metrics_socket = metrics_socket
        self._sampler: asyncio.Task[None] | None = None

    @property
    def observers(self) -> Sequence[Callable[[Any], None]]:
        return (self.decision_log, self.metrics.on_decision)

    @property
    def is_ready(self) -> bool:
        """Every listener is up and the gateway is not draining (serve's stop() marks each listener)."""
        if not self._ready:
            return False
        listeners = getattr(self.gateway, "listeners", ())
        return not any(lst.context.shutting_down for lst in listeners)

    async def start(self) -> None:
        listen = self.config.metrics.listen
        if listen is not None:
            self.metrics_server = MetricsServer(self.metrics, ready=lambda: self.is_ready)
            try:
                await self.metrics_server.start(listen.host, listen.port, sock=self._metrics_socket)
            except OSError as error:
                raise _metrics_taken(listen, error) from None
            log_fields(
                _log,
                logging.INFO,
                "metrics endpoint up",
                event="start",
                metrics=f"{listen.host}:{self.metrics_server.port}",
            )

    def on_reload(self, gateway: Any) -> Callable[[], None]:
        """serve.run's reload seam: the gateway exists and listens; start the reloader."""
        self.gateway = gateway
        self._watch_sessions(gateway)
        for lst in gateway.listeners:
            # Next-hop errors by kind, transaction times, and the next hop's reply times.
            lst.relay.watch = self.metrics
            lst.relay.pool.on_reply = self.metrics.next_hop_reply
        self.reloader = Reloader(
            self.config,
            self.keyring,
            load_config=self._load_config,
            apply=self._applier(gateway),
            metrics=self.metrics,
            notifier=self.notifier,
            poll_interval=self._poll_interval,
        )
        self.reloader.start_watching()
        loop = asyncio.get_running_loop()
        if self.metrics.shared is not None:
            self._sampler = loop.create_task(_sample_sessions(self.metrics))
        reloader, metrics = self.reloader, self.metrics

        def on_sighup() -> None:
            # The reload runs as a loop callback, not inside the signal handler.
            loop.call_soon(_reload_safely, reloader, metrics)

        return on_sighup

    def _applier(self, gateway: Any) -> Callable[[Config, Keyring], None]:
        def apply(config: Config, keyring: Keyring) -> None:
            gateway.apply(config, keyring)
            if config.log != self.config.log:
                # The log format and level are reloadable too: the handler is replaced, not added.
                logs.setup_from(config.log)
            self.config = config

        return apply

    def ready(self, gateway: Any) -> None:
        self.gateway = gateway
        self._ready = True
        listeners = ", ".join(
            f"{lst.config.name} {lst.address[0]}:{lst.address[1]}" for lst in gateway.listeners
        )
        self.notifier.ready(status=f"serving: {listeners}")
        log_fields(_log, logging.INFO, "ready", event="start", listeners=listeners)

    def stopping(self, gateway: Any = None) -> None:
        """The drain begins: new clients should go elsewhere."""
        if self._ready:
            self._ready = False
            self.notifier.stopping()

    async def close(self) -> None:
        self.stopping()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        if self.reloader is not None:
            await self.reloader.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()

    def _watch_sessions(self, gateway: Any) -> None:
        """The open-sessions gauge reads the listeners' own session sets at scrape time: no counting twice."""
        roles: dict[str, list[Any]] = {}
        for lst in gateway.listeners:
            roles.setdefault(lst.config.role.value, []).append(lst)
        for role, listeners in roles.items():
            self.metrics.count_sessions(role, _session_counter(listeners))


def bind_metrics(config: Config) -> socket.socket | None:
    """`[gateway] workers = N`: the endpoint's one socket, bound by the main process before the fork and
    served by every worker (one socket, not one each: any worker can answer for all of them)."""
    from .workers import bind

    listen = config.metrics.listen
    if listen is None:
        return None
    try:
        return bind(listen.host, listen.port, shared=False)
    except OSError as error:
        raise _metrics_taken(listen, error) from None


def _metrics_taken(listen: object, error: OSError) -> GatewayError:
    # Most often another gateway (the quick start's serve) holds the port.
    return GatewayError(
        f"metrics endpoint: cannot listen on {listen}: {bind_failure(error)}"
        " (set [metrics] listen, or give --metrics HOST:PORT or --metrics off)"
    )


def announce(config: Config) -> None:
    """serve's start-up lines, once per command (not per worker): the config's warnings, and for each
    inbound listener whether it refuses forged bounces or only logs and counts them, so an operator
    never has to guess from the config which mode is running."""
    for warning in config.warnings:
        _log.warning("%s", warning)
    signed = sorted(config.policy.signed_domains)
    for listener in config.listeners:
        if listener.role is not Role.INBOUND:
            continue
        observed = signed if listener.observe else sorted(config.policy.observe_domains & set(signed))
        enforced = [domain for domain in signed if domain not in observed]
        if not signed:
            mode = "off"
            what = "checks no domain ([gateway] signed_domains is empty): untagged bounces are relayed"
        elif not enforced:
            mode = "observe"
            what = "observes: a bounce to an address we never signed is logged and counted, and accepted"
        elif observed:
            mode = "mixed"
            what = (
                f"enforces for {', '.join(enforced)} and observes for {', '.join(observed)}"
                " ([policy] observe_domains)"
            )
        else:
            mode = "enforce"
            what = "enforces: a bounce to an address we never signed is refused at RCPT with 550 5.7.1"
        log_fields(
            _log,
            logging.INFO,
            f"inbound listener {listener.name} {what}",
            event="start",
            listener=listener.name,
            mode=mode,
            enforce=",".join(enforced) or None,
            observe=",".join(observed) or None,
        )


def log_stopped(logger: logging.Logger, status: int) -> None:
    """The last line of `serve`, `socketmap` and `policy`, once every process of theirs is gone (and the
    socket files removed): what a supervisor or an operator waits for after SIGTERM."""
    log_fields(logger, logging.INFO, "stopped", event="stop", status=status)


def _session_counter(listeners: Sequence[Any]) -> Callable[[], float]:
    def count() -> float:
        return float(sum(len(lst.sessions) for lst in listeners))

    return count


async def _sample_sessions(metrics: Metrics) -> None:
    """Shared counts: the open sessions, into this worker's file every second (metrics.py)."""
    while True:
        await asyncio.sleep(SESSIONS_SAMPLE_INTERVAL)
        metrics.refresh()


def _reload_safely(reloader: Reloader, metrics: Metrics) -> None:
    try:
        reloader.reload()
    except Exception:
        _log.exception("reload failed")
        metrics.reload_done(False)
