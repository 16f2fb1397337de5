"""gateway/ops/operations.py with a real gateway: metrics scraped while bounces pass, SIGHUP, a keyring
change, logs.

Each test runs `serve.run` (the code `batv-gateway serve` runs) on 127.0.0.1 port 0 in front of a fake next
hop, with the metrics endpoint on another port 0, and stops it with SIGTERM, which the running gateway
handles itself.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import signal
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.core import prvs
from gateway.ops import config as config_mod
from gateway.ops import keystore, serve
from gateway.ops.operations import Operations
from tests.smtp_peers import FakeNextHop, RawClient

NOW = datetime.now(UTC)

# workers = 1: serve.run here runs in the test's own process, one process with its own budgets and no
# [state] file; and the `serve` command's one process speaks to systemd itself, naming its listeners in
# STATUS (several workers' main process says "serving: N workers": tests/test_workers.py).
CONFIG = """
[gateway]
hostname = "mx.test"
keyring = "{keyring}"
local_domains = ["example.com"]
workers = 1

[policy]
observe_domains = {observe}

[[listener]]
name = "mx"
role = "inbound"
listen = "127.0.0.1:0"
next_hop = "127.0.0.1:{next_hop}"

[limits]
shutdown_deadline = 10
guess_rate = 0

[metrics]
listen = "127.0.0.1:0"
"""


def today() -> int:
    return int(time.time()) // 86400


class Running:
    def __init__(self, tmp_path: Path, hop: FakeNextHop) -> None:
        self.dir = tmp_path
        self.hop = hop
        self.config_path = tmp_path / "gateway.toml"
        self.keyring_path = tmp_path / "keyring.toml"
        self.kf = keystore.new_keyring(NOW)
        keystore.save(self.keyring_path, self.kf)
        self.write_config()
        self.ops: Operations | None = None
        self.gateway: serve.Gateway | None = None
        self.task: asyncio.Task[int] | None = None

    def write_config(self, observe: str = "[]", text: str | None = None) -> None:
        self.config_path.write_text(
            text
            if text is not None
            else CONFIG.format(keyring=self.keyring_path, observe=observe, next_hop=self.hop.port)
        )

    @property
    def smtp_port(self) -> int:
        assert self.gateway is not None
        return self.gateway.listeners[0].address[1]

    async def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        assert self.ops is not None and self.ops.metrics_server is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", self.ops.metrics_server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        await writer.drain()
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
        return samples

    async def value(self, name: str, **labels: str) -> float:
        return (await self.scrape()).get((name, tuple(sorted(labels.items()))), 0.0)

    async def wait_for(self, condition: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not await condition():
                await asyncio.sleep(0.02)


@asynccontextmanager
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    async with FakeNextHop() as hop:
        r = Running(tmp_path, hop)
        config = config_mod.load(r.config_path)
        ops = Operations(
            config,
            keystore.load(r.keyring_path),
            load_config=lambda: config_mod.load(r.config_path),
            poll_interval=0.05,
        )
        r.ops = ops
        await ops.start()
        up = asyncio.Event()

        def ready(gateway: serve.Gateway) -> None:
            r.gateway = gateway
            ops.ready(gateway)
            up.set()

        task = asyncio.create_task(
            serve.run(
                config,
                r.kf.keyring,
                observers=ops.observers,
                on_reload=ops.on_reload,
                ready=ready,
                stopping=ops.stopping,
            )
        )
        r.task = task
        try:
            async with asyncio.timeout(10):
                await up.wait()
            yield r
        finally:
            await stop(task, up)
            await ops.close()


async def stop(task: asyncio.Task[int], up: asyncio.Event) -> None:
    """SIGTERM, as systemd and Kubernetes send it; serve.run's own handler drains and returns. Only once
    run() is up (its handler installed): before that, a SIGTERM would end the test process itself."""
    if task.done():
        assert task.result() == 0
        return
    if not up.is_set():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise AssertionError("the gateway did not come up")
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(task, 20) == 0


async def bounce(port: int, rcpt: str, body: bool = True) -> list[int]:
    """A null-sender message to `rcpt`: the codes of RCPT and, if it was accepted, DATA and the dot."""
    client = await RawClient.connect(port)
    try:
        assert (await client.ehlo())[0] == 250
        assert (await client.cmd("MAIL FROM:<>"))[0] == 250
        codes = [(await client.cmd(f"RCPT TO:<{rcpt}>"))[0]]
        if codes[0] == 250 and body:
            codes.append((await client.cmd("DATA"))[0])
            codes.append((await client.cmd("Subject: bounce\r\n\r\nDelivery failed.\r\n."))[0])
        await client.cmd("QUIT")
        return codes
    finally:
        await client.close()


def test_metrics_move_as_forged_and_genuine_bounces_pass(tmp_path: Path, log_stream: io.StringIO) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as r:
            genuine = prvs.sign("bob@example.com", r.kf.keyring, today())
            forged = "prvs=0" + "999" + "abcdef=bob@example.com"
            assert await bounce(r.smtp_port, genuine) == [250, 354, 250]
            assert await bounce(r.smtp_port, forged) == [550]
            assert await bounce(r.smtp_port, "bob@example.com") == [550]
            assert await bounce(r.smtp_port, genuine) == [250, 354, 250]
            m = await r.scrape()
            key = lambda **labels: tuple(sorted(labels.items()))  # noqa: E731
            assert m[("batv_decisions_total", key(role="inbound", verdict="relay", reason="valid-prvs"))] == 2
            assert m[("batv_decisions_total", key(role="inbound", verdict="reject", reason="bad-hash"))] == 1
            assert m[("batv_decisions_total", key(role="inbound", verdict="reject", reason="unsigned"))] == 1
            assert m[("batv_keyring_active_key_id", ())] == r.kf.keyring.active.id
            assert m[("batv_keyring_generation", ())] == r.kf.generation
            assert m[("batv_last_reload_success", ())] == 1
            assert len(r.hop.messages) == 2
            # Two transactions reached the next hop: their times, and each command's reply time.
            assert m[("batv_transaction_seconds_count", key(role="inbound"))] == 2
            assert m[("batv_next_hop_reply_seconds_count", key(command="DOT"))] == 2
            assert m[("batv_next_hop_reply_seconds_count", key(command="RCPT"))] == 2
            # The next hop goes away: the client gets a 4xx and the error is counted by kind.
            await r.hop.close()
            assert await bounce(r.smtp_port, genuine, body=False) == [451]
            assert await r.value("batv_next_hop_errors_total", kind="refused") == 1
            # A session counts while it is open.
            client = await RawClient.connect(r.smtp_port)
            await client.ehlo()
            assert await r.value("batv_open_sessions", role="inbound") == 1
            await client.cmd("QUIT")
            await client.close()
            await r.wait_for(lambda: _is(r.value("batv_open_sessions", role="inbound"), 0))

    asyncio.run(scenario())
    lines = log_stream.getvalue().splitlines()
    decisions = [line for line in lines if "event=decision" in line]
    assert len(decisions) == 5
    assert any("verdict=reject reason=bad-hash" in line and "sender=<>" in line for line in decisions)
    assert any(
        "verdict=relay reason=valid-prvs key_id=0" in line and 'next_hop="250' in line for line in decisions
    )


async def _is(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


def secret_forms(secret: bytes) -> list[str]:
    return [
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
        secret.hex(),
        secret.hex().upper(),
        repr(secret)[2:-1],
        secret.decode("latin-1"),
    ]


def test_log_lines_hold_no_secret(tmp_path: Path, log_stream: io.StringIO) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as r:
            genuine = prvs.sign("carol@example.com", r.kf.keyring, today())
            await bounce(r.smtp_port, genuine)
            await bounce(r.smtp_port, "prvs=0123abcdef=carol@example.com")
            # A reload, a refused one, and a keyring change: all log.
            r.write_config(text="broken [")
            os.kill(os.getpid(), signal.SIGHUP)
            await r.wait_for(lambda: _is(r.value("batv_last_reload_success"), 0))
            kf, _ = keystore.add_key(r.kf, NOW)
            keystore.save(r.keyring_path, kf)
            await r.wait_for(lambda: _is(r.value("batv_keyring_generation"), kf.generation))
            r.kf = kf

    asyncio.run(scenario())
    text = log_stream.getvalue()
    assert "event=decision" in text and "outcome=refused" in text and "reload applied" in text
    for key in keystore.load(tmp_path / "keyring.toml").keyring.keys:
        for form in secret_forms(key.secret):
            assert form not in text


def test_sighup_with_a_broken_config_keeps_the_old_one_and_sessions_in_flight_finish(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as r:
            genuine = prvs.sign("dave@example.com", r.kf.keyring, today())
            # A transaction in flight: the client is in the middle of its message.
            client = await RawClient.connect(r.smtp_port)
            await client.ehlo()
            await client.open_data("", genuine)
            client.send("Subject: in flight\r\n\r\nfirst half")
            await client.writer.drain()

            r.write_config(text='[gateway]\nhostnme = "typo"\n')
            os.kill(os.getpid(), signal.SIGHUP)
            await r.wait_for(lambda: _is(r.value("batv_last_reload_success"), 0))
            assert await r.value("batv_reloads_total", result="refused") == 1

            # The session was not dropped: it finishes its message and gets the next hop's 250.
            assert (await client.cmd("second half\r\n."))[0] == 250
            assert (await client.cmd("QUIT"))[0] == 221
            await client.close()
            assert len(r.hop.messages) == 1 and b"second half" in r.hop.messages[0].data
            # The old config still rules: a forged bounce is refused.
            assert await bounce(r.smtp_port, "prvs=0123abcdef=dave@example.com") == [550]

            # A good config is applied on the next SIGHUP, without a restart: observe mode for the domain.
            r.write_config(observe='["example.com"]')
            os.kill(os.getpid(), signal.SIGHUP)
            await r.wait_for(lambda: _is(r.value("batv_last_reload_success"), 1))
            assert await bounce(r.smtp_port, "prvs=0123abcdef=dave@example.com", body=False) == [250]
            assert await r.value("batv_would_reject_total", role="inbound", reason="bad-hash") == 1

    asyncio.run(scenario())


def test_a_keyring_file_change_is_picked_up_without_a_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as r:
            # A new key, pushed to this host as `verify` (phase 1 of a fleet rotation), signs elsewhere.
            kf, new_key = keystore.add_key(r.kf, NOW)
            elsewhere = keystore.activate(kf, new_key.id, NOW).keyring
            tag = prvs.sign("erin@example.com", elsewhere, today())
            assert await bounce(r.smtp_port, tag, body=False) == [550]  # unknown-key here, for now
            keystore.save(r.keyring_path, kf)
            await r.wait_for(lambda: _is(r.value("batv_keyring_generation"), kf.generation))
            assert await bounce(r.smtp_port, tag) == [250, 354, 250]
            m = await r.scrape()
            assert (
                m[
                    (
                        "batv_decisions_total",
                        (("reason", "unknown-key"), ("role", "inbound"), ("verdict", "reject")),
                    )
                ]
                == 1
            )
            assert m[("batv_keyring_keys", (("state", "verify"),))] == 1

    asyncio.run(scenario())


def test_readiness_follows_the_lifecycle(tmp_path: Path) -> None:
    async def get(port: int, path: str) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
        match = re.match(rb"HTTP/1.1 (\d+)", data)
        assert match is not None
        return int(match.group(1))

    async def scenario() -> None:
        async with running(tmp_path) as r:
            assert r.ops is not None and r.ops.metrics_server is not None and r.task is not None
            port = r.ops.metrics_server.port
            assert await get(port, "/readyz") == 200
            assert await get(port, "/healthz") == 200
            genuine = prvs.sign("frank@example.com", r.kf.keyring, today())
            client = await RawClient.connect(r.smtp_port)
            await client.ehlo()
            await client.cmd("MAIL FROM:<>")
            assert (await client.cmd(f"RCPT TO:<{genuine}>"))[0] == 250
            assert (await client.cmd("DATA"))[0] == 354
            # SIGTERM: the drain starts; the load balancer must stop sending new clients at once.
            os.kill(os.getpid(), signal.SIGTERM)
            await r.wait_for(lambda: _is(_status(get(port, "/readyz")), 503))
            assert await get(port, "/healthz") == 200
            # The transaction in flight still finishes during the drain.
            assert (await client.cmd("Subject: drain\r\n\r\nstill delivered\r\n."))[0] == 250
            await client.close()
            assert await asyncio.wait_for(r.task, 20) == 0
            assert len(r.hop.messages) == 1

    asyncio.run(scenario())


async def _status(value: Awaitable[int]) -> float:
    return float(await value)


def test_batv_gateway_serve_speaks_sd_notify_and_serves_metrics(tmp_path: Path) -> None:
    """The real command, as systemd runs it: READY=1, RELOADING=1/READY=1 on SIGHUP, STOPPING=1 on SIGTERM."""
    import json
    import select
    import socket
    import subprocess
    import sys

    keystore.save(tmp_path / "keyring.toml", keystore.new_keyring(NOW))
    config = tmp_path / "gateway.toml"
    config.write_text(
        CONFIG.format(keyring=tmp_path / "keyring.toml", observe="[]", next_hop=1)
        + '\n[log]\nformat = "json"\n'
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(20)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # Unbuffered: select() below must see every line that has not been read yet.
        bufsize=0,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stderr is not None

    def message() -> dict[str, str]:
        data = notify.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def log_line(event_field: str, value: str) -> dict[str, object]:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stderr], [], [], deadline - time.monotonic())
            if not ready:
                break
            raw = proc.stderr.readline()
            if not raw:
                break
            record = json.loads(raw)
            if record.get(event_field) == value:
                return dict(record)
        raise AssertionError(f"no log line with {event_field}={value}")

    def http_status(port: int, path: str) -> int:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            head = conn.recv(64)
        return int(head.split()[1])

    try:
        metrics = log_line("msg", "metrics endpoint up")
        port = int(str(metrics["metrics"]).rsplit(":", 1)[1])
        ready = message()
        assert ready["READY"] == "1" and ready["STATUS"].startswith("serving: mx 127.0.0.1:")
        assert http_status(port, "/readyz") == 200
        proc.send_signal(signal.SIGHUP)
        reloading = message()
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert message()["READY"] == "1"
        assert log_line("msg", "reload: nothing changed")["trigger"] == "sighup"
        # The log format is reloadable: the next lines come as logfmt.
        config.write_text(config.read_text().replace('format = "json"', 'format = "logfmt"'))
        proc.send_signal(signal.SIGHUP)
        assert message()["RELOADING"] == "1" and message()["READY"] == "1"
        assert select.select([proc.stderr], [], [], 20)[0]
        line = proc.stderr.readline().decode()
        assert 'msg="reload applied"' in line and "event=reload" in line and "trigger=sighup" in line
        proc.send_signal(signal.SIGTERM)
        assert message() == {"STOPPING": "1"}
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        notify.close()


def test_outbound_counters_and_srs_forward(tmp_path: Path, log_stream: io.StringIO) -> None:
    async def scenario() -> None:
        async with FakeNextHop() as hop:
            keystore.save(tmp_path / "keyring.toml", keystore.new_keyring(NOW))
            text = (
                CONFIG.format(keyring=tmp_path / "keyring.toml", observe="[]", next_hop=hop.port)
                .replace('role = "inbound"', 'role = "outbound"')
                .replace("[policy]", '[srs]\nalias = "fwd.example.com"\n\n[policy]')
            )
            config = config_mod.parse(tomllib.loads(text), "test")
            kf = keystore.load(tmp_path / "keyring.toml")
            ops = Operations(config, kf, load_config=lambda: config, poll_interval=0)
            await ops.start()
            up = asyncio.Event()
            task = asyncio.create_task(
                serve.run(
                    config,
                    kf.keyring,
                    observers=ops.observers,
                    on_reload=ops.on_reload,
                    ready=lambda g: up.set(),
                )
            )
            try:
                await asyncio.wait_for(up.wait(), 10)
                port = ops.gateway.listeners[0].address[1]
                for sender in ("alice@example.com", "someone@forwarded.example"):
                    client = await RawClient.connect(port)
                    await client.ehlo()
                    await client.open_data(sender, "bob@remote.example")
                    assert (await client.cmd("Subject: out\r\n\r\nhello\r\n."))[0] == 250
                    await client.cmd("QUIT")
                    await client.close()
                senders = [m.mail for m in hop.messages]
                assert senders[0].startswith(b"MAIL FROM:<prvs=") and senders[1].startswith(
                    b"MAIL FROM:<SRS0="
                )
                registry = ops.metrics.registry
                decisions = "batv_decisions_total"
                assert (
                    registry.get_sample_value(
                        decisions, {"role": "outbound", "verdict": "relay", "reason": "prvs"}
                    )
                    == 1
                )
                assert (
                    registry.get_sample_value(
                        decisions, {"role": "outbound", "verdict": "relay", "reason": "srs0"}
                    )
                    == 1
                )
                assert registry.get_sample_value("batv_srs_rewrites_total", {"direction": "forward"}) == 1
                assert registry.get_sample_value("batv_transaction_seconds_count", {"role": "outbound"}) == 2
            finally:
                await stop(task, up)
                await ops.close()

    asyncio.run(scenario())
    decisions = [line for line in log_stream.getvalue().splitlines() if "event=decision" in line]
    assert len(decisions) == 2 and all("role=outbound" in line for line in decisions)
    assert "sender=someone@forwarded.example" in decisions[1] and "reason=srs0" in decisions[1]


def announced(log_stream: io.StringIO, data: dict[str, object]) -> list[str]:
    from gateway.ops.operations import announce

    announce(config_mod.parse(data, "gateway.toml", fqdn=lambda: "mx.test"))
    return log_stream.getvalue().splitlines()


LISTENERS = [
    {"name": "mx", "listen": "127.0.0.1:0", "next_hop": "127.0.0.1:1"},
    {"name": "relay", "role": "outbound", "listen": "127.0.0.1:0", "next_hop": "127.0.0.1:1"},
]
DOMAINS = {"local_domains": ["example.com", "example.org"]}


def test_start_up_says_an_inbound_listener_enforces(log_stream: io.StringIO) -> None:
    (line,) = announced(log_stream, {"gateway": DOMAINS, "listener": LISTENERS})  # none for the outbound one
    assert line.endswith(
        'level=info logger=gateway.ops msg="inbound listener mx enforces: a bounce to an address we never '
        'signed is refused at RCPT with 550 5.7.1" event=start listener=mx mode=enforce '
        "enforce=example.com,example.org"
    )


def test_start_up_says_an_observing_listener_observes(log_stream: io.StringIO) -> None:
    listeners = [{**LISTENERS[0], "observe": True}]
    (line,) = announced(log_stream, {"gateway": DOMAINS, "listener": listeners})
    assert 'msg="inbound listener mx observes: a bounce to an address we never signed is logged' in line
    assert line.endswith("listener=mx mode=observe observe=example.com,example.org")


def test_start_up_names_the_domains_observed_one_by_one(log_stream: io.StringIO) -> None:
    data = {"gateway": DOMAINS, "policy": {"observe_domains": ["example.org"]}, "listener": LISTENERS[:1]}
    (line,) = announced(log_stream, data)
    assert (
        'msg="inbound listener mx enforces for example.com and observes for example.org '
        '([policy] observe_domains)" event=start listener=mx mode=mixed enforce=example.com '
        "observe=example.org"
    ) in line


def test_start_up_says_when_an_inbound_listener_has_nothing_to_check(log_stream: io.StringIO) -> None:
    (line,) = announced(log_stream, {"gateway": {**DOMAINS, "signed_domains": []}, "listener": LISTENERS})
    assert "inbound listener mx checks no domain ([gateway] signed_domains is empty)" in line
    assert line.endswith("listener=mx mode=off")


def test_start_up_warns_of_what_the_config_warns_of(log_stream: io.StringIO) -> None:
    from gateway.ops.operations import announce

    cfg = config_mod.parse({"gateway": DOMAINS}, "gateway.toml", fqdn=lambda: "localhost")
    announce(cfg)
    (line,) = log_stream.getvalue().splitlines()
    assert "level=warning" in line and "[gateway] hostname: not set" in line and '\\"localhost\\"' in line


def test_a_taken_metrics_port_names_the_address(tmp_path: Path) -> None:
    import socket

    from gateway.core.errors import GatewayError

    async def body() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            cfg = config_mod.parse({"metrics": {"listen": f"127.0.0.1:{port}"}}, fqdn=lambda: "mx.test")
            kf = keystore.new_keyring(NOW)
            ops = Operations(cfg, kf, load_config=lambda: cfg)
            try:
                await ops.start()
            except GatewayError as error:
                assert str(error) == (
                    f"metrics endpoint: cannot listen on 127.0.0.1:{port}: Address already in use "
                    "(set [metrics] listen, or give --metrics HOST:PORT or --metrics off)"
                )
            else:
                raise AssertionError("the endpoint started on a taken port")
            finally:
                await ops.close()

    asyncio.run(body())
