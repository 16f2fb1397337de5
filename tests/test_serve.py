"""serve.py: listeners, a clean shutdown and the process itself (`batv-gateway serve` as a subprocess)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.core import prvs, replies
from gateway.ops import keystore
from tests.smtp_peers import (
    LOCALHOST,
    SMTP_SINK,
    FakeNextHop,
    RawClient,
    Script,
    SmtpSink,
    free_port,
    gateway_config,
    gateway_port,
    make_keyring,
    run,
    running_gateway,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "gateway.example.toml"
TODAY = int(time.time()) // 86400
SHUTTING_DOWN = f"{replies.SHUTTING_DOWN}\r\n".encode()


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------------------ in-process


def test_on_stop_an_idle_session_gets_421_and_nobody_new_is_accepted() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            port = gateway_port(gw)
            idle = await RawClient.connect(port)
            await idle.ehlo()
            await gw.stop(5)
            assert await idle.rest() == SHUTTING_DOWN
            await idle.close()
            with pytest.raises(OSError):
                await RawClient.connect(port)

    run(body())


def test_stop_during_data_lets_the_transaction_finish() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            await client.cmd("MAIL FROM:<>")
            await client.cmd(f"RCPT TO:<{prvs.sign('bob@example.com', make_keyring(), TODAY)}>")
            assert (await client.cmd("DATA"))[0] == 354
            client.send(b"Subject: half\r\n\r\nfirst half\r\n")
            await client.writer.drain()
            stopping = asyncio.create_task(gw.stop(5))
            await wait_for(lambda: gw.listeners[0].context.shutting_down)
            client.send(b"second half\r\n.\r\n")
            assert await client.reply() == (250, "2.0.0 Ok: queued as FAKE")
            # Then, the transaction done, the session is closed for the shutdown.
            assert await client.rest() == SHUTTING_DOWN
            await client.close()
            await stopping
            assert hop.messages[0].data == b"Subject: half\r\n\r\nfirst half\r\nsecond half\r\n"

    run(body())


def test_a_client_that_half_closes_after_pipelining_dot_and_quit_gets_its_transaction_completed() -> None:
    async def body() -> None:
        # A next hop slow with its verdict: the shutdown starts while the gateway waits for it.
        async with (
            FakeNextHop(Script(delays={"DOT": 0.3})) as hop,
            running_gateway(gateway_config(hop.port)) as gw,
        ):
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            await client.open_data("alice@example.org", "bob@example.com")
            client.send(b"Subject: last\r\n\r\nbye\r\n.\r\nQUIT\r\n")
            client.writer.write_eof()
            await wait_for(lambda: hop.commands.count("DATA") == 1)
            stopping = asyncio.create_task(gw.stop(5))
            assert await client.reply() == (250, "2.0.0 Ok: queued as FAKE")
            assert (await client.reply())[0] == 221
            assert await client.rest() == b""
            await client.close()
            await stopping
            assert hop.messages[0].data == b"Subject: last\r\n\r\nbye\r\n"

    run(body())


def test_past_the_deadline_a_transaction_is_cut_and_nothing_is_delivered() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            await client.open_data("alice@example.org", "bob@example.com")
            client.send(b"Subject: never finished\r\n")
            await client.writer.drain()
            await gw.stop(0.2)
            assert await client.rest() == b""  # cut in DATA: no reply could mean anything else
            await client.close()
            assert hop.messages == []

    run(body())


def test_reload_swaps_the_policy_for_new_transactions() -> None:
    async def body() -> None:
        from gateway.core.keyring import Key, Keyring

        async with FakeNextHop() as hop:
            cfg = gateway_config(hop.port)
            async with running_gateway(cfg) as gw:
                other = Keyring((Key(2, b"another-secret-of-enough-length-000000"),))
                tag = prvs.sign("bob@example.com", other, TODAY)
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                await client.cmd("MAIL FROM:<>")
                assert (await client.cmd(f"RCPT TO:<{tag}>"))[0] == 550
                gw.apply(cfg, other)
                await client.cmd("RSET")
                await client.cmd("MAIL FROM:<>")
                assert (await client.cmd(f"RCPT TO:<{tag}>"))[0] == 250
                await client.close()

    run(body())


def test_a_port_in_use_is_a_clear_error() -> None:
    async def body() -> None:
        from gateway.core.errors import ConfigError

        async with FakeNextHop() as hop:
            taken = gateway_config(hop.port, listener={"listen": f"{LOCALHOST}:{hop.port}"})
            with pytest.raises(ConfigError) as caught:
                async with running_gateway(taken):
                    pass
            # Which listener, which address, and the reason alone (not asyncio's "[Errno 98] ..." line).
            where = f"{LOCALHOST}:{hop.port}"
            assert str(caught.value) == f"listener mx: cannot listen on {where}: Address already in use"

    run(body())


# ------------------------------------------------------------------------------------------------ the process


def example_config(folder: Path, inbound: int, outbound: int, next_hop: int) -> Path:
    """deploy/gateway.example.toml with loopback ports, a test keyring and no metrics endpoint."""
    text = EXAMPLE.read_text()
    for old, new in [
        ('listen = "0.0.0.0:25"', f'listen = "{LOCALHOST}:{inbound}"'),
        ('next_hop = "127.0.0.1:10025"', f'next_hop = "{LOCALHOST}:{next_hop}"'),
        ('listen = "127.0.0.1:10587"', f'listen = "{LOCALHOST}:{outbound}"'),
        ('next_hop = "127.0.0.1:10026"', f'next_hop = "{LOCALHOST}:{next_hop}"'),
        ('keyring = "keys/keyring.toml"', f'keyring = "{folder}/keyring.toml"'),
        ('listen = "127.0.0.1:9425"', 'listen = ""'),
        ("shutdown_deadline = 30 ", "shutdown_deadline = 10 "),
        ('path = "/var/lib/batv-gateway/ledger.sqlite"', f'path = "{folder}/ledger.sqlite"'),
        ('path = "/var/lib/batv-gateway/state.sqlite"', f'path = "{folder}/state.sqlite"'),
    ]:
        assert old in text, f"the example config changed: {old!r} is gone; update this test"
        text = text.replace(old, new)
    path = folder / "gateway.toml"
    path.write_text(text)
    return path


class Serving:
    """`batv-gateway serve --config ...` as a child process, killed if a test fails half-way."""

    def __init__(self, config: Path, port: int) -> None:
        self.port = port
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def wait_ready(self, timeout: float = 15.0) -> None:
        import socket

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited: {self.process.communicate()[1].decode()}")
            with socket.socket() as sock:
                if sock.connect_ex((LOCALHOST, self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("serve did not start listening")

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, err = self.process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return self.process.returncode, err.decode()


needs_postfix = pytest.mark.skipif(
    SMTP_SINK is None or not Path("/usr/bin/swaks").exists(),
    reason="needs Postfix's smtp-sink and swaks (apt-get install postfix swaks, as .ci/run does)",
)


@pytest.fixture
def keyring_file(tmp_path: Path) -> keystore.KeyringFile:
    kf = keystore.new_keyring(datetime.now(UTC))
    keystore.save(tmp_path / "keyring.toml", kf)
    return kf


@contextlib.contextmanager
def serving_into_smtp_sink(folder: Path) -> Iterator[tuple[Serving, SmtpSink]]:
    """`serve` with the example config, relaying to a fresh smtp-sink and ready to accept mail.

    On the way out (unless the test failed) the process must exit 0 when stopped, and the sink is given
    time to write its first message: read it with `sink.messages()` after the `with`."""
    dumps = folder / "dumps"
    dumps.mkdir()
    inbound, outbound = free_port(), free_port()
    with SmtpSink(dumps) as sink:
        serving = Serving(example_config(folder, inbound, outbound, sink.port), inbound)
        try:
            serving.wait_ready()
            yield serving, sink
        finally:
            code, err = serving.stop()
        assert code == 0, err
        for _ in range(50):
            if sink.messages():
                break
            time.sleep(0.05)


@needs_postfix
def test_serve_with_the_example_config_relays_to_smtp_sink_and_refuses_a_forged_bounce(
    tmp_path: Path, keyring_file: keystore.KeyringFile
) -> None:
    with serving_into_smtp_sink(tmp_path) as (serving, sink):
        tag = prvs.sign("bob@example.com", keyring_file.keyring, TODAY)
        swaks = ["swaks", "--server", f"{LOCALHOST}:{serving.port}", "--from", "<>", "--timeout", "20"]
        good = subprocess.run(
            [*swaks, "--to", tag, "--header", "Subject: a genuine bounce", "--body", "returned"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert good.returncode == 0, good.stdout + good.stderr
        forged = subprocess.run(
            [*swaks, "--to", "bob@example.com", "--quit-after", "RCPT"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        # swaks exits 24 when the server refuses the recipient.
        assert forged.returncode == 24, forged.stdout
        assert (
            "<** 550 5.7.1 <bob@example.com>: bounce to an address we never signed (unsigned)"
            in forged.stdout
        )
    (message,) = sink.messages()
    assert b"X-Mail-Args: <>" in message
    assert b"X-Rcpt-Args: <bob@example.com>" in message
    assert b"Subject: a genuine bounce" in message


@needs_postfix
def test_sigterm_during_data_completes_the_transaction(
    tmp_path: Path, keyring_file: keystore.KeyringFile
) -> None:
    with serving_into_smtp_sink(tmp_path) as (serving, sink):

        async def body() -> None:
            client = await RawClient.connect(serving.port)
            await client.ehlo()
            await client.open_data("", prvs.sign("carol@example.org", keyring_file.keyring, TODAY))
            client.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
            await client.writer.drain()
            serving.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)  # the signal is handled; the listener is closed
            client.send(b"second half\r\n.\r\n")
            assert (await client.reply())[0] == 250
            assert await client.rest() == SHUTTING_DOWN
            await client.close()

        run(body())
    (message,) = sink.messages()
    assert b"X-Rcpt-Args: <carol@example.org>" in message
    assert message.rstrip().endswith(b"first half\nsecond half")  # smtp-sink dumps with LF


def test_serve_refuses_a_broken_config_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[gateway]\nhostname = "gw.test"\nkeyring = "x"\nlocal_domains = ["example.com"]\nbogus = 1\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=30,
    )
    assert result.returncode == 2
    assert "bogus" in result.stderr and str(bad) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_next_hop_down_at_start_does_not_hold_it_and_is_learnt_when_it_comes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gateway.ops.serve

    monkeypatch.setattr(gateway.ops.serve, "STARTUP_PROBE_WAIT", 0.2)

    async def body() -> None:
        slow = FakeNextHop(Script(delays={"GREETING": 30}))
        async with slow:
            # A next hop that accepts but never greets: start() goes on without it.
            async with running_gateway(gateway_config(slow.port)) as gw:
                client = await RawClient.connect(gateway_port(gw))
                _, ehlo = await client.ehlo()
                assert "DSN" not in ehlo.split("\n") and "8BITMIME" not in ehlo.split("\n")
                await client.close()
        port = free_port()
        async with running_gateway(gateway_config(port)) as gw:
            client = await RawClient.connect(gateway_port(gw))
            _, ehlo = await client.ehlo()  # down: the baseline only
            assert "DSN" not in ehlo.split("\n")
            hop = FakeNextHop()
            await hop.start(port)
            try:
                await client.cmd("EHLO again.test")  # asks the next hop again, in the background
                pool = gw.listeners[0].relay.pool
                await wait_for(lambda: pool.capabilities is not None)
                _, ehlo = await client.cmd("EHLO third.test")
                assert "DSN" in ehlo.split("\n") and "8BITMIME" in ehlo.split("\n")
                await client.close()
            finally:
                await hop.close()

    run(body())
