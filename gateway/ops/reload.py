"""Live reload: SIGHUP re-reads the config and the keyring; a change to the keyring file is picked up alone.

The rule is the one `postfix reload` follows: a new config or keyring is checked in full before anything
changes. A file that does not load is refused and logged, and the gateway goes on with what it runs now.
Nothing here touches a session: the server's `apply` callback swaps the policy and keyring that *new*
decisions read, and a transaction in flight finishes with what it started with, or picks up the new one at
its next command; no connection is closed by a reload.

Two triggers:
- SIGHUP (`systemctl reload`, `kill -HUP`): the config (through the server's own `load_config`, which also
  re-applies command-line flags) and the keyring, read afresh. systemd is told RELOADING=1, then READY=1.
- A keyring file change, seen by polling `keystore.KeyringLoader` (a stat per poll; the content is read
  only when the stat changes). Config management that pushes a new keyring, or a Kubernetes Secret update,
  takes effect within one poll interval, without a signal.

A reload changes the policy, the keyring and the log settings. What a listener was built with (its socket,
TLS, next hop, role options, limits) and the other sockets stay until a restart; a reload that changes them
applies the rest and logs which settings need the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import GatewayError
from ..core.keyring import Keyring
from ..core.logs import log_fields
from . import keystore
from .config import Config
from .metrics import Metrics
from .sdnotify import Notifier

DEFAULT_POLL_INTERVAL = 5.0

_log = logging.getLogger("gateway.reload")


class Trigger(enum.Enum):
    SIGNAL = "sighup"
    KEYRING_FILE = "keyring-file"


class Outcome(enum.Enum):
    APPLIED = "applied"
    UNCHANGED = "unchanged"
    REFUSED = "refused"


@dataclass(frozen=True)
class ReloadResult:
    trigger: Trigger
    outcome: Outcome
    error: str | None = None  # why it was refused (names the file and key; never a secret)
    restart_needed: tuple[str, ...] = ()  # settings that changed but only take effect on restart


def restart_needed(old: Config, new: Config) -> tuple[str, ...]:
    """The settings that differ between `old` and `new` and that a running server cannot change.

    A running gateway swaps its policy, its keyring and its log settings; everything a listener was built
    with (its socket, TLS, next hop, role options and limits) stays until a restart.
    """
    changed: list[str] = []
    old_listeners = {lc.name: lc for lc in old.listeners}
    new_listeners = {lc.name: lc for lc in new.listeners}
    for name in sorted(old_listeners.keys() ^ new_listeners.keys()):
        changed.append(f"listener {name} (added or removed)")
    for name in sorted(old_listeners.keys() & new_listeners.keys()):
        before, after = old_listeners[name], new_listeners[name]
        for attr in ("role", "listen", "next_hop", "observe", "trusted", "tls_cert", "tls_key", "limits"):
            if getattr(before, attr) != getattr(after, attr):
                changed.append(f"listener {name} {attr}")
    for attr in ("hostname", "limits", "metrics", "workers", "socketmap", "policyd"):
        if getattr(old, attr) != getattr(new, attr):
            changed.append(attr)
    return tuple(changed)


Apply = Callable[[Config, Keyring], None]


class Reloader:
    """Owns the config and keyring in force, and replaces them only with ones that loaded in full.

    `load_config()` returns the new config or raises GatewayError (serve passes a function that loads the
    file and re-applies its flags). `apply(config, keyring)` makes the server use them; it may raise
    GatewayError to refuse a combination it cannot run, and the old config then stays.
    """

    def __init__(
        self,
        config: Config,
        keyring: keystore.KeyringFile,
        *,
        load_config: Callable[[], Config],
        apply: Apply,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        load_keyring: Callable[[Path], keystore.KeyringFile] = keystore.load,
        loader_factory: Callable[[Path], keystore.KeyringLoader] = keystore.KeyringLoader,
    ) -> None:
        self.config = config
        self.keyring = keyring
        self._load_config = load_config
        self._apply = apply
        self._metrics = metrics
        self._notifier = notifier if notifier is not None else Notifier(socket_name="")
        self._poll_interval = poll_interval
        self._load_keyring = load_keyring
        self._loader_factory = loader_factory
        self._loader = self._new_loader(config.keyring_path)
        self._watch_task: asyncio.Task[None] | None = None
        self._file_refused = False  # the keyring file's last version seen by the poll was refused
        self._signal_loop: asyncio.AbstractEventLoop | None = None
        if metrics is not None:
            metrics.set_keyring(keyring.keyring, keyring.generation)

    def _new_loader(self, path: Path) -> keystore.KeyringLoader:
        loader = self._loader_factory(path)
        # Prime it with the file as it is now, so that the first poll reports only later changes.
        loader.poll()
        return loader

    # --- the two triggers ---------------------------------------------------------------------------

    def reload(self) -> ReloadResult:
        """SIGHUP: the config and the keyring, both read afresh and checked before either is used."""
        self._notifier.reloading()
        try:
            try:
                config = self._load_config()
                keyring = self._load_keyring(config.keyring_path)
            except GatewayError as exc:
                return self._refused(Trigger.SIGNAL, str(exc))
            moved = config.keyring_path != self.config.keyring_path
            result = self._install(Trigger.SIGNAL, config, keyring)
            if moved and result.outcome is Outcome.APPLIED:
                self._loader = self._new_loader(config.keyring_path)
            return result
        finally:
            # READY=1 ends systemd's reload whatever the outcome: a refused reload leaves a running
            # gateway, and `systemctl reload` reports the failure through the log and the metric.
            self._notifier.ready(status=self._status())

    def poll_keyring(self) -> ReloadResult | None:
        """One look at the keyring file; None when it has not changed since the last look."""
        found = self._loader.poll()
        if found.error is not None:
            self._file_refused = True
            return self._refused(Trigger.KEYRING_FILE, str(found.error))
        if self._file_refused and not found.changed:
            # The loader reports a bad version once; whether the file is still bad, or was put back as
            # the keyring in force (which is no change to report), only a fresh load can tell.
            return self._recovered()
        # Unchanged, or already installed by a SIGHUP that read the file first.
        if not found.changed or found.keyring is None or found.keyring == self.keyring:
            return None
        return self._install(Trigger.KEYRING_FILE, self.config, found.keyring)

    def _recovered(self) -> ReloadResult | None:
        try:
            kf = self._load_keyring(self.config.keyring_path)
        except GatewayError:
            return None  # still the bad version: already reported
        self._file_refused = False
        if kf != self.keyring:
            return self._install(Trigger.KEYRING_FILE, self.config, kf)
        return self._unchanged(Trigger.KEYRING_FILE)

    # --- wiring into the event loop -----------------------------------------------------------------

    def install_signal_handler(self, loop: asyncio.AbstractEventLoop) -> None:
        # The reload runs as a loop callback, not inside the signal handler: it may log and take locks.
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.call_soon(self._reload_logged))
        self._signal_loop = loop

    def start_watching(self) -> None:
        """Poll the keyring file every `poll_interval` seconds, until `close()`."""
        if self._watch_task is None and self._poll_interval > 0:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch(), name="keyring-watch")

    async def close(self) -> None:
        if self._signal_loop is not None:
            self._signal_loop.remove_signal_handler(signal.SIGHUP)
            self._signal_loop = None
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                self.poll_keyring()
            except Exception:
                # A bug in one poll must not end the watching for good.
                _log.exception("keyring poll failed")

    def _reload_logged(self) -> None:
        try:
            self.reload()
        except Exception:
            _log.exception("reload failed")
            if self._metrics is not None:
                self._metrics.reload_done(False)

    # --- the one place the running config changes ---------------------------------------------------

    def _install(self, trigger: Trigger, config: Config, kf: keystore.KeyringFile) -> ReloadResult:
        if config == self.config and kf == self.keyring:
            return self._unchanged(trigger)
        try:
            self._apply(config, kf.keyring)
        except GatewayError as exc:
            return self._refused(trigger, str(exc))
        pending = restart_needed(self.config, config)
        old_generation = self.keyring.generation
        self.config, self.keyring = config, kf
        self._file_refused = False
        if self._metrics is not None:
            self._metrics.set_keyring(kf.keyring, kf.generation)
            self._metrics.reload_done(True)
        log_fields(
            _log,
            logging.INFO,
            "reload applied",
            event="reload",
            trigger=trigger,
            outcome=Outcome.APPLIED,
            keyring_generation=kf.generation,
            previous_generation=old_generation,
            active_key=kf.keyring.active.id if kf.keyring.has_active else None,
        )
        if pending:
            log_fields(
                _log,
                logging.WARNING,
                "reload: these settings changed and take effect only after a restart",
                event="reload",
                restart_needed=", ".join(pending),
            )
        return ReloadResult(trigger, Outcome.APPLIED, restart_needed=pending)

    def _unchanged(self, trigger: Trigger) -> ReloadResult:
        # Everything loaded and equals what runs: a successful reload as far as the alert is concerned.
        if self._metrics is not None:
            self._metrics.reload_done(True)
        log_fields(_log, logging.INFO, "reload: nothing changed", event="reload", trigger=trigger)
        return ReloadResult(trigger, Outcome.UNCHANGED)

    def _refused(self, trigger: Trigger, error: str) -> ReloadResult:
        if self._metrics is not None:
            self._metrics.reload_done(False)
        log_fields(
            _log,
            logging.ERROR,
            "reload refused; still running the previous config and keyring",
            event="reload",
            trigger=trigger,
            outcome=Outcome.REFUSED,
            error=error,
        )
        return ReloadResult(trigger, Outcome.REFUSED, error=error)

    def _status(self) -> str:
        kr = self.keyring.keyring
        active = f"key {kr.active.id}" if kr.has_active else "no active key"
        return f"serving; keyring generation {self.keyring.generation}, {active}"
