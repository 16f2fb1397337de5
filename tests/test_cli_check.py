"""gateway/cli/check.py: `batv-gateway check-config` validates without starting anything."""

from __future__ import annotations

import base64
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli.main import main
from gateway.ops import config as config_mod
from gateway.ops import keystore
from tests.smtp_peers import make_cert

NOW = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)
REPO = Path(__file__).resolve().parent.parent


def write_config(folder: Path, extra_listener: str = "", lifetime: str = "7") -> Path:
    path = folder / "gateway.toml"
    path.write_text(
        f"""
[gateway]
hostname = "mx.example.com"
keyring = "{folder / "keyring.toml"}"
local_domains = ["example.com"]

[batv]
lifetime_days = {lifetime}

[[listener]]
name = "mx"
role = "inbound"
listen = "127.0.0.1:2525"
next_hop = "127.0.0.1:10025"
{extra_listener}
"""
    )
    return path


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, keystore.KeyringFile]:
    kf = keystore.new_keyring(NOW)
    keystore.save(tmp_path / "keyring.toml", kf)
    return write_config(tmp_path), kf


def test_good_config_and_keyring(
    setup: tuple[Path, keystore.KeyringFile], capsys: pytest.CaptureFixture[str]
) -> None:
    config, kf = setup
    assert main(["check-config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"{config}: ok" in out and "mx (inbound 127.0.0.1:2525 -> 127.0.0.1:10025)" in out
    assert f"active key 0 (fingerprint {kf.keyring.active.fingerprint})" in out
    secret = kf.keyring.active.secret
    assert base64.b64encode(secret).decode() not in out and secret.hex() not in out
    assert "ledger off: the keyring has no ledger secret" in out  # a keyring new_keyring made without one


def test_the_ledger_line_says_where_it_is_and_never_the_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kf = keystore.new_keyring(NOW, ledger=True)
    keystore.save(tmp_path / "keyring.toml", kf)
    config = write_config(tmp_path)
    assert main(["check-config", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"ledger on: {tmp_path / 'ledger.sqlite'}" in out
    assert kf.keyring.ledger_secret is not None
    assert base64.b64encode(kf.keyring.ledger_secret).decode() not in out
    config.write_text(config.read_text() + "\n[ledger]\nenabled = false\n")
    assert main(["check-config", "--config", str(config)]) == 0
    assert "ledger off ([ledger] enabled = false)" in capsys.readouterr().out


def test_the_workers_line_says_how_many_and_whether_auto_chose(
    setup: tuple[Path, keystore.KeyringFile], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = setup
    assert main(["check-config", "--config", str(config)]) == 0
    count = min(config_mod.MAX_WORKERS, config_mod.cpus())
    auto = f'workers: {count} ("auto": one per CPU this process may run on; 1 if the [state] file'
    assert auto in capsys.readouterr().out  # no workers line in the config: the default
    config.write_text(config.read_text().replace("[gateway]\n", "[gateway]\nworkers = 3\n"))
    assert main(["check-config", "--config", str(config)]) == 0
    assert "\nworkers: 3\n" in capsys.readouterr().out


def test_quiet(setup: tuple[Path, keystore.KeyringFile], capsys: pytest.CaptureFixture[str]) -> None:
    config, _ = setup
    assert main(["check-config", "--config", str(config), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


def test_broken_config_names_file_and_key(
    setup: tuple[Path, keystore.KeyringFile], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = setup
    write_config(config.parent, lifetime='"seven"')
    assert main(["check-config", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "lifetime_days" in err
    assert len(err.strip().splitlines()) == 1


def test_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_loose_keyring_is_refused(
    setup: tuple[Path, keystore.KeyringFile], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = setup
    os.chmod(config.parent / "keyring.toml", 0o644)
    assert main(["check-config", "--config", str(config)]) == 2
    assert "chmod 600" in capsys.readouterr().err


def test_keyring_option_overrides(
    setup: tuple[Path, keystore.KeyringFile], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = setup
    other = config.parent / "other.toml"
    assert main(["check-config", "--config", str(config), "--keyring", str(other)]) == 2
    assert str(other) in capsys.readouterr().err


def test_config_option_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config"]) == 2
    assert "--config" in capsys.readouterr().err


def test_tls_certificates_are_loaded(
    setup: tuple[Path, keystore.KeyringFile], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = setup
    (config.parent / "a").mkdir()
    (config.parent / "b").mkdir()
    cert, key = make_cert(config.parent / "a")
    write_config(config.parent, f'tls_cert = "{cert}"\ntls_key = "{key}"')
    assert main(["check-config", "--config", str(config), "-q"]) == 0
    # A key that does not belong to the certificate.
    _, other_key = make_cert(config.parent / "b")
    write_config(config.parent, f'tls_cert = "{cert}"\ntls_key = "{other_key}"')
    assert main(["check-config", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "listener mx" in err and "do not load" in err
    assert "PRIVATE KEY" not in err
    write_config(config.parent, f'tls_cert = "{cert}"\ntls_key = "{config.parent / "gone.key"}"')
    assert main(["check-config", "--config", str(config)]) == 2
    assert "gone.key: no such file" in capsys.readouterr().err


def test_as_a_subprocess(setup: tuple[Path, keystore.KeyringFile]) -> None:
    config, _ = setup

    def check_config() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "check-config", "--config", str(config)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
            check=False,
        )

    ok = check_config()
    assert ok.returncode == 0 and ": ok" in ok.stdout, ok.stderr
    write_config(config.parent, lifetime="0")
    bad = check_config()
    assert bad.returncode == 2 and "lifetime_days" in bad.stderr


def test_an_inbound_listener_without_a_local_domain_fails_the_check(
    setup: tuple[Path, keystore.KeyringFile], capsys: pytest.CaptureFixture[str]
) -> None:
    """It would load, and then refuse every recipient with 554 Relay access denied."""
    config, _ = setup
    config.write_text(config.read_text().replace('local_domains = ["example.com"]', ""))
    assert main(["check-config", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'batv-gateway: error: {config}: listener "mx" (inbound) has no local domain')
    assert "[gateway] local_domains" in err and len(err.strip().splitlines()) == 1


def test_a_host_without_a_qualified_name_is_a_warning_naming_hostname(
    setup: tuple[Path, keystore.KeyringFile],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config, _ = setup
    monkeypatch.setattr(config_mod, "host_fqdn", lambda: "localhost")
    assert main(["check-config", "--config", str(config), "-q"]) == 0
    assert capsys.readouterr() == ("", "")  # hostname is set in the file: the host is not asked
    config.write_text(config.read_text().replace('hostname = "mx.example.com"', ""))
    assert main(["check-config", "--config", str(config), "-q"]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"batv-gateway: warning: {config}: [gateway] hostname: not set")
    assert 'as "localhost"' in err and len(err.strip().splitlines()) == 1


def test_the_grace_window_is_reported_for_the_keyring(
    setup: tuple[Path, keystore.KeyringFile], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = setup
    keyring = config.parent / "keyring.toml"
    assert main(["check-config", "--config", str(config)]) == 0
    assert f"{keyring}: no signing start recorded (a keyring from before it was)" in capsys.readouterr().out
    started = keystore.new_keyring(dt.datetime(2024, 1, 1, 12, tzinfo=dt.UTC), record_start=True)
    keystore.save(keyring, started)
    assert main(["check-config", "--config", str(config)]) == 0
    assert (
        f"{keyring}: signing began 2024-01-01T12:00:00Z: bounces to untagged addresses are accepted until"
        " 2024-01-08T00:00:00Z" in capsys.readouterr().out
    )
    config.write_text(config.read_text().replace("[batv]", "[policy]\nbounce_grace = false\n\n[batv]"))
    assert main(["check-config", "--config", str(config)]) == 0
    assert f"{keyring}: grace window off ([policy] bounce_grace = false)" in capsys.readouterr().out
