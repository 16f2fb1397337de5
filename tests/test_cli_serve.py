"""`batv-gateway serve` on its embedded default: the README's first command, on a fresh checkout."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from gateway import config
from gateway.config import Role
from gateway.keystore import load


def test_the_embedded_default_listens_on_loopback_only() -> None:
    cfg = config.embedded_serve()
    assert [(lc.role, str(lc.listen)) for lc in cfg.listeners] == [
        (Role.INBOUND, "127.0.0.1:2525"),
        (Role.OUTBOUND, "127.0.0.1:2587"),
    ]
    assert all(lc.next_hop.host == "127.0.0.1" for lc in cfg.listeners)
    assert cfg.metrics.listen is not None and cfg.metrics.listen.host == "127.0.0.1"
    assert cfg.policy.signed_domains == {"example.com"}
    assert cfg.keyring_path == Path("keys/keyring.toml")


def test_serve_with_no_arguments_makes_a_keyring_and_refuses_a_forged_bounce(tmp_path: Path) -> None:
    """On the real default ports, as a newcomer would run it (a fresh CI machine has them free)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        lines = []
        assert proc.stderr is not None
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "msg=ready" in line:
                break
        output = "".join(lines)
        assert "msg=ready" in output, output
        assert "created a development keyring at keys/keyring.toml" in output
        keyring = tmp_path / "keys" / "keyring.toml"
        assert keyring.stat().st_mode & 0o777 == 0o600
        assert load(keyring).keyring.has_active

        with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as client:
            client.ehlo("test.example")
            assert client.mail("<>")[0] == 250
            code, text = client.rcpt("bob@example.com")
            assert code == 550
            assert b"5.7.1" in text and b"unsigned" in text
            code, _ = client.rcpt("postmaster@example.com")
            assert code // 100 == 4  # exempt, but no next hop runs on 2526: a 4xx, never a 250
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=40)
    assert proc.returncode == 0, err
