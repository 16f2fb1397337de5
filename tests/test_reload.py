"""gateway/ops/reload.py: SIGHUP and keyring-file reloads apply only files that load in full."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.core.keyring import Keyring
from gateway.ops import config as config_mod
from gateway.ops import keystore
from gateway.ops.config import Config
from gateway.ops.metrics import Metrics
from gateway.ops.reload import Outcome, Reloader, Trigger, restart_needed
from gateway.ops.sdnotify import Notifier

NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)

CONFIG = """
[gateway]
hostname = "mx.example.com"
keyring = "{keyring}"
local_domains = ["example.com"]

[batv]
lifetime_days = {lifetime}

[[listener]]
name = "mx"
role = "inbound"
listen = "127.0.0.1:0"
next_hop = "127.0.0.1:10025"
"""


class World:
    """A config file and a keyring file in a temp folder, and a Reloader whose apply() records calls."""

    def __init__(self, tmp_path: Path, notifier: Notifier | None = None) -> None:
        self.dir = tmp_path
        self.config_path = tmp_path / "gateway.toml"
        self.keyring_path = tmp_path / "keyring.toml"
        self.write_config(lifetime=7)
        self.kf = keystore.new_keyring(NOW)
        keystore.save(self.keyring_path, self.kf)
        self.applied: list[tuple[Config, Keyring]] = []
        self.metrics = Metrics(clock=lambda: NOW.timestamp())
        self.config = config_mod.load(self.config_path)
        self.reloader = Reloader(
            self.config,
            keystore.load(self.keyring_path),
            load_config=lambda: config_mod.load(self.config_path),
            apply=lambda c, k: self.applied.append((c, k)),
            metrics=self.metrics,
            notifier=notifier,
            poll_interval=0.01,
        )

    def write_config(self, lifetime: int, text: str | None = None) -> None:
        if text is None:
            text = CONFIG.format(keyring=self.dir / "keyring.toml", lifetime=lifetime)
        self.config_path.write_text(text)

    def rotate(self, base: keystore.KeyringFile | None = None) -> keystore.KeyringFile:
        kf, key = keystore.add_key(base if base is not None else keystore.load(self.keyring_path), NOW)
        kf = keystore.activate(kf, key.id, NOW)
        keystore.save(self.keyring_path, kf)
        return kf

    def gauge(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        assert value is not None
        return value


def test_sighup_applies_a_good_config(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w = World(tmp_path)
    w.write_config(lifetime=10)
    with caplog.at_level(logging.INFO, logger="gateway.reload"):
        result = w.reloader.reload()
    assert result.outcome is Outcome.APPLIED and result.trigger is Trigger.SIGNAL
    ((config, _),) = w.applied
    assert config.lifetime_days == 10 and w.reloader.config.lifetime_days == 10
    assert w.gauge("batv_last_reload_success") == 1
    assert w.gauge("batv_reloads_total", result="ok") == 1
    assert any(r.getMessage() == "reload applied" for r in caplog.records)


@pytest.mark.parametrize(
    "broken",
    [
        "[gateway\nhostname = 1",  # not TOML
        '[gateway]\nhostnme = "x"\n',  # a misspelt key
        '[batv]\nlifetime_days = "seven"\n',  # a wrong type
    ],
)
def test_sighup_with_a_broken_config_keeps_the_old_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, broken: str
) -> None:
    w = World(tmp_path)
    before = w.reloader.config
    w.write_config(0, text=broken)
    with caplog.at_level(logging.ERROR, logger="gateway.reload"):
        result = w.reloader.reload()
    assert result.outcome is Outcome.REFUSED
    assert result.error is not None and str(w.config_path) in result.error
    assert w.applied == []
    assert w.reloader.config is before
    assert w.gauge("batv_last_reload_success") == 0
    (record,) = [r for r in caplog.records if r.name == "gateway.reload"]
    assert "still running the previous config" in record.getMessage()
    # The next good file is applied, and the gauge recovers.
    w.write_config(lifetime=9)
    assert w.reloader.reload().outcome is Outcome.APPLIED
    assert w.gauge("batv_last_reload_success") == 1


def test_sighup_with_a_broken_keyring_keeps_the_old_one(tmp_path: Path) -> None:
    w = World(tmp_path)
    secret = w.kf.keyring.active.secret
    w.keyring_path.write_text("version = 1\n")
    result = w.reloader.reload()
    assert result.outcome is Outcome.REFUSED
    assert result.error is not None and str(w.keyring_path) in result.error
    assert w.reloader.keyring.keyring.active.secret == secret
    assert w.applied == []


def test_sighup_with_a_loose_keyring_mode_is_refused(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.rotate()
    os.chmod(w.keyring_path, 0o644)
    result = w.reloader.reload()
    assert result.outcome is Outcome.REFUSED
    assert result.error is not None and "chmod 600" in result.error


def test_unchanged_files_are_not_applied_again(tmp_path: Path) -> None:
    w = World(tmp_path)
    assert w.reloader.reload().outcome is Outcome.UNCHANGED
    assert w.applied == []
    assert w.reloader.poll_keyring() is None


def test_keyring_file_change_is_picked_up_by_polling(tmp_path: Path) -> None:
    w = World(tmp_path)
    assert w.reloader.poll_keyring() is None
    new = w.rotate()
    result = w.reloader.poll_keyring()
    assert result is not None and result.outcome is Outcome.APPLIED and result.trigger is Trigger.KEYRING_FILE
    ((config, keyring),) = w.applied
    assert config is w.config  # only the keyring changed
    assert keyring.active.id == new.keyring.active.id != w.kf.keyring.active.id
    assert w.gauge("batv_keyring_active_key_id") == new.keyring.active.id
    assert w.reloader.poll_keyring() is None  # reported once


def test_bad_keyring_file_change_is_refused_once_and_the_old_keyring_stays(tmp_path: Path) -> None:
    w = World(tmp_path)
    keystore.write_atomic(w.keyring_path, keystore.dump(w.kf).replace('state = "active"', 'state = "verify"'))
    result = w.reloader.poll_keyring()
    assert result is not None and result.outcome is Outcome.REFUSED
    assert result.error is not None and "no key is active" in result.error
    assert w.reloader.keyring == w.kf
    assert w.gauge("batv_last_reload_success") == 0
    assert w.reloader.poll_keyring() is None  # the same bad file is not reported on every poll
    w.rotate(base=w.kf)
    result = w.reloader.poll_keyring()
    assert result is not None and result.outcome is Outcome.APPLIED


def test_sighup_after_the_poller_saw_nothing_then_poller_stays_quiet(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.rotate()
    assert w.reloader.reload().outcome is Outcome.APPLIED
    assert w.reloader.poll_keyring() is None
    assert len(w.applied) == 1


def test_apply_may_refuse(tmp_path: Path) -> None:
    from gateway.core.errors import ConfigError

    w = World(tmp_path)

    def refuse(config: Config, keyring: Keyring) -> None:
        raise ConfigError("listener mx: cannot change role without a restart")

    w.reloader._apply = refuse
    w.write_config(lifetime=11)
    result = w.reloader.reload()
    assert result.outcome is Outcome.REFUSED and result.error is not None and "restart" in result.error
    assert w.reloader.config.lifetime_days == 7


def test_restart_needed_names_the_settings() -> None:
    base = config_mod.parse(
        {
            "gateway": {"local_domains": ["example.com"]},
            "listener": [{"name": "mx", "listen": "127.0.0.1:25", "next_hop": "127.0.0.1:10025"}],
        }
    )
    (mx,) = base.listeners
    moved = replace(
        base, listeners=(replace(mx, listen=config_mod.HostPort("127.0.0.1", 26)),), workers=base.workers + 1
    )
    assert restart_needed(base, moved) == ("listener mx listen", "workers")
    limited = replace(base, limits=replace(base.limits, max_sessions=1))
    assert restart_needed(base, limited) == ("limits",)
    assert restart_needed(base, replace(base, lifetime_days=3)) == ()


def test_sighup_notifies_systemd(tmp_path: Path) -> None:
    sock_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(sock_path)
        sock.settimeout(5)
        w = World(tmp_path, notifier=Notifier(socket_name=sock_path, monotonic_ns=lambda: 5_000_000))
        w.write_config(0, text="broken [")
        w.reloader.reload()
        assert sock.recv(512) == b"RELOADING=1\nMONOTONIC_USEC=5000"
        assert sock.recv(512).startswith(b"READY=1\nSTATUS=serving; keyring generation 1")


def test_signal_and_watch_in_an_event_loop(tmp_path: Path) -> None:
    w = World(tmp_path)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        w.reloader.install_signal_handler(loop)
        w.reloader.start_watching()
        try:
            # A keyring pushed by config management: no signal needed.
            new = w.rotate()
            while not w.applied:
                await asyncio.sleep(0.01)
            assert w.applied[-1][1].active.id == new.keyring.active.id
            # SIGHUP: the config is read again.
            w.write_config(lifetime=12)
            os.kill(os.getpid(), signal.SIGHUP)
            while w.reloader.config.lifetime_days != 12:
                await asyncio.sleep(0.01)
        finally:
            await w.reloader.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert len(w.applied) == 2
    # The handler is gone with close(): SIGHUP is back to its default for the rest of the test run.
    assert signal.getsignal(signal.SIGHUP) in (signal.SIG_DFL, signal.default_int_handler)


def test_log_lines_hold_no_secret(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import base64

    w = World(tmp_path)
    with caplog.at_level(logging.DEBUG):
        w.rotate()
        w.reloader.poll_keyring()
        keystore.write_atomic(w.keyring_path, keystore.dump(w.kf).replace("version = 1", "version = 2"))
        w.reloader.poll_keyring()
        w.reloader.reload()
    text = "\n".join(r.getMessage() + repr(getattr(r, "batv_fields", "")) for r in caplog.records)
    assert "reload applied" in text and "refused" in text
    for kf in (w.kf, w.reloader.keyring):
        for key in kf.keyring.keys:
            assert base64.b64encode(key.secret).decode() not in text
            assert key.secret.hex() not in text
            assert repr(key.secret) not in text


def test_a_keyring_file_put_back_as_it_was_clears_the_failed_reload(tmp_path: Path) -> None:
    """The loader reports a bad version once and a version equal to the running one not at all; the
    failed-reload gauge must still come back to 1 when the file is good again, or the alert never ends."""
    w = World(tmp_path)
    good = keystore.dump(w.kf)
    keystore.write_atomic(w.keyring_path, good.replace("version = 1", "version = 9"))
    result = w.reloader.poll_keyring()
    assert result is not None and result.outcome is Outcome.REFUSED
    assert w.reloader.poll_keyring() is None  # still bad: not reported again, the gauge stays 0
    assert w.gauge("batv_last_reload_success") == 0
    keystore.write_atomic(w.keyring_path, good)
    result = w.reloader.poll_keyring()
    assert result is not None and result.outcome is Outcome.UNCHANGED
    assert w.gauge("batv_last_reload_success") == 1
    assert w.applied == []
    assert w.reloader.poll_keyring() is None
