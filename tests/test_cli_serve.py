"""`batv-gateway serve` on its embedded default: the README's first command, on a fresh checkout."""

from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.cli import serve as cli_serve
from gateway.cli.main import build_parser
from gateway.core.errors import ConfigError
from gateway.ops import config, keystore
from gateway.ops.config import HostPort, Role
from gateway.ops.keystore import load

REPO = Path(__file__).resolve().parent.parent


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


def closed_port() -> socket.socket:
    """A port bound but not listening: a connection to it is refused for as long as the test holds it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def start_serve(cwd: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", *flags],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def field(line: str, name: str) -> str:
    found = re.search(rf' {name}=("(?:[^"\\]|\\.)*"|\S+)', line)
    assert found is not None, line
    return found.group(1).strip('"')


def test_serve_on_the_embedded_default_makes_a_keyring_and_refuses_a_forged_bounce(tmp_path: Path) -> None:
    """As a newcomer runs it, but on ports the kernel chooses: the quick start's own `batv-gateway serve`
    may hold 2525 and 9425 while the suite runs, and a next hop of its own may answer on 2526."""
    with closed_port() as next_hop:
        hop = f"127.0.0.1:{next_hop.getsockname()[1]}"
        proc = start_serve(tmp_path, "--listen", "127.0.0.1:0", "--next-hop", hop, "--metrics", "127.0.0.1:0")
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
            assert load(keyring).keyring.ledger_secret is not None
            assert "ledger on: keys/ledger.sqlite" in output
            assert (tmp_path / "keys" / "ledger.sqlite").stat().st_mode & 0o777 == 0o600
            # The embedded default enforces, and says so before it serves.
            (mode,) = [line for line in lines if "msg=\"inbound listener" in line]
            assert "inbound listener inbound enforces" in mode and "mode=enforce enforce=example.com" in mode
            port = int(field(lines[-1], "listeners").rsplit(":", 1)[1])
            up = next(line for line in lines if "metrics endpoint up" in line)
            metrics = int(field(up, "metrics").rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", metrics), timeout=10) as conn:
                conn.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                assert conn.recv(64).split()[1] == b"200"

            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("test.example")
                assert client.mail("<>")[0] == 250
                code, text = client.rcpt("prvs=0123abcdef=bob@example.com")
                assert code == 550
                assert b"5.7.1" in text and b"bad-hash" in text
                # The development keyring has a ledger secret: a bounce to an untagged address is sent on
                # and decided at the end of DATA; this next hop is down, so a 4xx, never a 250.
                code, _ = client.rcpt("bob@example.com")
                assert code // 100 == 4
                code, _ = client.rcpt("postmaster@example.com")
                assert code // 100 == 4  # exempt, but the next hop refuses connections: a 4xx, never a 250
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=40)
    assert proc.returncode == 0, err
    # A clean stop says so, last, in the style of the other lifecycle lines.
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"ts=\S+ level=info logger=gateway.serve msg=stopped event=stop status=0", last), err


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_the_metrics_flag_overrides_the_config() -> None:
    assert cli_serve.load_config(serve_args()).metrics.listen == HostPort("127.0.0.1", 9425)
    assert cli_serve.load_config(serve_args("--metrics", "off")).metrics.listen is None
    moved = cli_serve.load_config(serve_args("--metrics", "[::1]:0"))
    assert moved.metrics.listen == HostPort("::1", 0)
    with pytest.raises(ConfigError, match=r"^--metrics: 'nowhere' is not HOST:PORT or off \(for example"):
        cli_serve.load_config(serve_args("--metrics", "nowhere"))


def test_a_taken_metrics_port_is_one_line_naming_it(tmp_path: Path) -> None:
    """Two gateways side by side: the second says which address is taken and how to move, and stops."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        where = f"127.0.0.1:{taken.getsockname()[1]}"
        proc = start_serve(tmp_path, "--listen", "127.0.0.1:0", "--metrics", where)
        _, err = proc.communicate(timeout=40)
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    (error,) = [line for line in err.splitlines() if line.startswith("batv-gateway: error:")]
    assert error == (
        f"batv-gateway: error: metrics endpoint: cannot listen on {where}: Address already in use "
        "(set [metrics] listen, or give --metrics HOST:PORT or --metrics off)"
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_taken_listening_port_is_one_line_naming_it(tmp_path: Path, workers: int) -> None:
    """With workers > 1 the main process binds the ports itself (workers.py): the same line as with one."""
    keystore.save(tmp_path / "keyring.toml", keystore.new_keyring(datetime.now(UTC)))
    path = tmp_path / "gateway.toml"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        where = f"127.0.0.1:{taken.getsockname()[1]}"
        path.write_text(
            f'[gateway]\nhostname = "mx.test"\nkeyring = "{tmp_path / "keyring.toml"}"\n'
            f'local_domains = ["example.com"]\nworkers = {workers}\n'
            f'[[listener]]\nname = "mx"\nlisten = "{where}"\nnext_hop = "127.0.0.1:1"\n'
        )
        proc = start_serve(tmp_path, "--config", str(path), "--metrics", "off")
        _, err = proc.communicate(timeout=40)
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    (error,) = [line for line in err.splitlines() if line.startswith("batv-gateway: error:")]
    assert error == f"batv-gateway: error: listener mx: cannot listen on {where}: Address already in use"


def test_an_inbound_listener_without_a_local_domain_does_not_start(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[[listener]]\nname = "mx"\nlisten = "127.0.0.1:0"\nnext_hop = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match=r'listener "mx" \(inbound\) has no local domain'):
        cli_serve.load_config(serve_args("--config", str(path)))
    given = cli_serve.load_config(serve_args("--config", str(path), "--domain", "example.com"))
    assert given.policy.local_domains == {"example.com"}
    proc = start_serve(tmp_path, "--config", str(path))
    _, err = proc.communicate(timeout=40)
    assert proc.returncode == 2
    assert err == (
        f'batv-gateway: error: {path}: listener "mx" (inbound) has no local domain, so it would refuse every '
        'recipient with 554 5.7.1 Relay access denied; set [gateway] local_domains = ["example.com"] '
        "(or give --domain)\n"
    )


def test_start_up_warns_of_an_unqualified_hostname_and_says_it_observes(tmp_path: Path) -> None:
    """The process as systemd starts it, on a host whose name is "localhost" (injected: this machine's own
    name must not decide the test)."""
    keystore.save(tmp_path / "keyring.toml", keystore.new_keyring(datetime.now(UTC)))
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[gateway]\nkeyring = "{tmp_path / "keyring.toml"}"\nlocal_domains = ["example.com"]\n'
        '[[listener]]\nname = "mx"\nlisten = "127.0.0.1:0"\nnext_hop = "127.0.0.1:1"\nobserve = true\n'
    )
    script = (
        "import sys; import gateway.ops.config; gateway.ops.config.host_fqdn = lambda: 'localhost'; "
        "from gateway.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "serve", "--config", str(path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("msg=ready" in line for line in lines):
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=40)
    assert proc.returncode == 0, rest
    warning, mode = lines[0], lines[1]
    assert "level=warning" in warning and f"{path}: [gateway] hostname: not set" in warning
    assert 'EHLO as \\"localhost\\"' in warning
    assert 'msg="inbound listener mx observes:' in mode
    assert mode.rstrip().endswith("mode=observe observe=example.com")
    assert rest.strip().splitlines()[-1].endswith("msg=stopped event=stop status=0")


def test_a_reload_that_leaves_the_inbound_listener_no_domain_is_refused(tmp_path: Path) -> None:
    keystore.save(tmp_path / "keyring.toml", keystore.new_keyring(datetime.now(UTC)))
    path = tmp_path / "gateway.toml"
    text = (
        f'[gateway]\nhostname = "mx.test"\nkeyring = "{tmp_path / "keyring.toml"}"\n'
        'local_domains = ["example.com"]\n'
        '[[listener]]\nname = "mx"\nlisten = "127.0.0.1:0"\nnext_hop = "127.0.0.1:1"\n'
    )
    path.write_text(text)
    proc = start_serve(tmp_path, "--config", str(path))
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr or ()], daemon=True)
    reader.start()

    def line_with(text: str) -> str:
        while True:
            line = lines.get(timeout=20)
            if text in line:
                return line

    try:
        line_with("msg=ready")
        path.write_text(text.replace('local_domains = ["example.com"]', ""))
        proc.send_signal(signal.SIGHUP)
        refused = line_with("event=reload")
        assert "outcome=refused" in refused and 'listener \\"mx\\" (inbound) has no local domain' in refused
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)
        reader.join(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    assert proc.returncode == 0
