"""A fleet: two `batv-gateway serve` (two MX hosts), each with `workers = 2`, sharing one redis-server
([state] backend = "redis"). The failed-guess budget is counted across every host and worker; while Redis
is away mail still passes and the budgets fall back to each process's own; when it is back the shared
budget is used again without a restart; the metrics and /readyz say which. The null-sender rate limit
and the edge's waiting on the budget are tested in-process, at the end."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import math
import os
import re
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from gateway.core import prvs, replies
from gateway.ops import keystore
from gateway.ops.config import Role, StateBackend
from gateway.ops.state import make_stores
from gateway.policy.guard import Penalty
from gateway.policy.guessbudget import BudgetRule
from tests.redis_server import RedisServer
from tests.smtp_peers import (
    FakeNextHop,
    RawClient,
    SmtpSink,
    gateway_config,
    gateway_port,
    make_keyring,
    run,
    running_gateway,
)
from tests.test_serve import keyring_file  # noqa: F401  (a fixture)
from tests.test_workers import Supervised, workers_config

GUESS_RATE = 0.01  # an answered guess every 100 s after the burst: none in the time a test takes
GUESS_BURST = 5
MAX_GUESS_DELAY = 30.0  # guard.GuardSettings.max_guess_delay: a guess held longer is disconnected instead
TOO_MANY_ERRORS = f"{replies.TOO_MANY_ERRORS}\r\n".encode()


def answered_at_most(elapsed: float) -> int:
    """What GCRA lets through in `elapsed` seconds: the burst, and a guess per 1/rate seconds, including
    those that may be held up to MAX_GUESS_DELAY (guessbudget.schedule)."""
    return GUESS_BURST + math.floor(GUESS_RATE * (elapsed + MAX_GUESS_DELAY))


def fleet_config(folder: Path, keyring: Path, next_hop: int, redis_url: str | None) -> Path:
    """The example config with 2 workers, the metrics endpoint on port 0, a tiny guess rate, error limits
    out of the way (only the guess budget acts) and [state] on the test's Redis (None: as shipped, SQLite)."""
    folder.mkdir()
    shutil.copy(keyring, folder / "keyring.toml")  # an MX group: every host has the same keys
    path = workers_config(folder, 2, next_hop, metrics=True)
    text = path.read_text()
    changes = [
        ("guess_rate = 0.0 ", f"guess_rate = {GUESS_RATE} "),
        ("guess_burst = 5 ", f"guess_burst = {GUESS_BURST} "),
        ("soft_error_limit = 10 ", "soft_error_limit = 100 "),
        ("hard_error_limit = 20 ", "hard_error_limit = 200 "),
        ("retry_after = 5 ", "retry_after = 0.2 "),
    ]
    if redis_url is not None:
        changes += [
            ('backend = "sqlite"\npath = "', 'backend = "redis"\n# path = "'),
            ('url = ""', f'url = "{redis_url}"'),
        ]
    for old, new in changes:
        assert old in text, f"the example config changed: {old!r} is gone; update this test"
        text = text.replace(old, new)
    path.write_text(text)
    return path


@dataclass
class Fleet:
    hosts: list[Supervised]
    ports: list[int]
    keyring: Any
    sink: SmtpSink
    redis: RedisServer | None

    def forged(self, count: int, start: int = 0) -> list[str]:
        """Forged tags for a real recipient (a wrong hash under the active key id): failed guesses."""
        good = prvs.sign("alice@example.com", self.keyring, int(time.time()) // 86400)
        head, code, local = good.split("=", 2)
        tags = (f"{head}={code[:4]}{n:06x}={local}" for n in range(start, start + count + 1))
        return [tag for tag in tags if tag != good][:count]

    def valid(self) -> str:
        return prvs.sign("alice@example.com", self.keyring, int(time.time()) // 86400)


@pytest.fixture
def fleet(tmp_path: Path, keyring_file: keystore.KeyringFile, redis_server: RedisServer) -> Iterator[Fleet]:  # noqa: F811
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    with SmtpSink(dumps) as sink:
        configs = [
            fleet_config(tmp_path / name, tmp_path / "keyring.toml", sink.port, redis_server.url)
            for name in ("mx1", "mx2")
        ]
        with Supervised(tmp_path / "mx1", configs[0]) as one, Supervised(tmp_path / "mx2", configs[1]) as two:
            hosts = [one.wait_ready(), two.wait_ready()]
            yield Fleet(hosts, [h.port("mx") for h in hosts], keyring_file.keyring, sink, redis_server)
            for host in hosts:
                assert host.stop() == 0, host.log
                assert "Traceback" not in host.log, host.log


async def guess(port: int, tag: str) -> tuple[int, bytes]:
    """One failed guess on a connection of its own: the reply code to its RCPT, and what came after."""
    client = await RawClient.connect(port)
    try:
        await client.ehlo()
        assert (await client.cmd("MAIL FROM:<>"))[0] == 250
        code, _ = await client.cmd(f"RCPT TO:<{tag}>")
        if code == 421:
            return code, await client.rest()
        await client.cmd("QUIT")
        return code, b""
    finally:
        await client.close()


async def spread(ports: list[int], tags: list[str]) -> tuple[list[int], float]:
    """The guesses spread over the hosts, one connection each (the kernel spreads the connections of a
    port over its workers); the codes, and the seconds from the first to the last answer."""
    started = time.monotonic()
    codes = []
    for n, tag in enumerate(tags):
        code, after = await guess(ports[n % len(ports)], tag)
        if code == 421:
            assert after == b"", "421 closes the session"
        codes.append(code)
    return codes, time.monotonic() - started


async def mail_passes(port: int, sender: str, recipient: str) -> None:
    client = await RawClient.connect(port)
    try:
        await client.ehlo()
        assert (await client.cmd(f"MAIL FROM:<{sender}>"))[0] == 250
        assert (await client.cmd(f"RCPT TO:<{recipient}>"))[0] == 250
        assert (await client.cmd("DATA"))[0] == 354
        assert (await client.cmd("Subject: fleet\r\n\r\nhello\r\n."))[0] == 250
        await client.cmd("QUIT")
    finally:
        await client.close()


def fetch(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def sample(port: int, name: str, **labels: str) -> float:
    """One sample of a host's /metrics (the sum over its workers)."""
    for family in text_string_to_metric_families(fetch(port, "/metrics")[1]):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no {name} {labels} in /metrics")


def test_a_forger_spread_over_two_hosts_and_their_workers_gets_one_budget(fleet: Fleet) -> None:
    codes, elapsed = run(spread(fleet.ports, fleet.forged(40)))
    answered = codes.count(550)
    # Without the shared budget each of the 4 processes answers its own burst of 5.
    assert GUESS_BURST <= answered <= answered_at_most(elapsed), codes
    # The rest are never answered: 421 4.7.0 and the connection closed, at once (the wait it would need,
    # 100 s a guess, is past max_guess_delay; guessbudget.schedule); no hold, no other reply.
    assert codes.count(421) == len(codes) - answered, codes
    for host in fleet.hosts:
        assert "too many failed tag checks, disconnecting" in host.log
        assert "state store unavailable" not in host.log


def test_redis_away_mail_still_passes_budgets_go_local_and_come_back(fleet: Fleet) -> None:
    metrics = [host.metrics_port for host in fleet.hosts]
    workers = [host.workers() for host in fleet.hosts]
    for port in metrics:
        assert sample(port, "batv_state_store_up", backend="redis") == 1
        assert fetch(port, "/readyz") == (200, "ready\nstate store redis: available\n")

    assert fleet.redis is not None
    fleet.redis.stop()
    for port in fleet.ports:
        run(mail_passes(port, "", fleet.valid()))  # a valid tagged bounce needs only the keyring
        run(mail_passes(port, "someone@remote.example", "bob@example.com"))
    # Each process answers from its own budget: no 5xx for the outage, 550 for a failed guess as before.
    codes, _ = run(spread(fleet.ports, fleet.forged(12, start=100)))
    assert set(codes) <= {550, 421} and codes.count(550) >= GUESS_BURST, codes
    for host, port in zip(fleet.hosts, metrics, strict=True):
        lines = re.findall(r".*msg=\"state store unavailable\".*", host.log)
        # One line per process that fell back (2 workers), not one per charge.
        assert 1 <= len(lines) <= 2, host.log
        assert all("backend=redis check=guess-budget fallback=local" in line for line in lines), lines
        assert sample(port, "batv_state_store_up", backend="redis") == 0
        assert sample(port, "batv_state_fallbacks_total", check="guess-budget") >= 1
        # Still ready: tag verdicts need no store.
        detail = "state store redis: unavailable (the budgets answer locally)"
        assert fetch(port, "/readyz") == (200, f"ready\n{detail}\n")
    assert [host.workers() for host in fleet.hosts] == workers, "no worker died"

    fleet.redis.start()  # on the same socket, empty
    time.sleep(0.3)  # past retry_after: each process asks the store again at its next charge
    before = [sample(port, "batv_state_fallbacks_total", check="guess-budget") for port in metrics]
    codes, elapsed = run(spread(fleet.ports, fleet.forged(20, start=200)))
    # The shared budget again: one burst for the whole fleet (Redis came back empty).
    assert GUESS_BURST <= codes.count(550) <= answered_at_most(elapsed), codes
    assert [sample(port, "batv_state_fallbacks_total", check="guess-budget") for port in metrics] == before
    for host, port in zip(fleet.hosts, metrics, strict=True):
        assert sample(port, "batv_state_store_up", backend="redis") == 1
        assert fetch(port, "/readyz") == (200, "ready\nstate store redis: available\n")
        assert 'msg="state store available"' in host.log
    assert [host.workers() for host in fleet.hosts] == workers


def test_the_workers_of_one_host_share_one_budget_on_sqlite(
    tmp_path: Path,
    keyring_file: keystore.KeyringFile,  # noqa: F811
) -> None:
    """[state] as shipped (sqlite, state.sqlite beside the keyring): `workers = 2` charge one budget."""
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    with SmtpSink(dumps) as sink:
        config = fleet_config(tmp_path / "mx", tmp_path / "keyring.toml", sink.port, redis_url=None)
        with Supervised(tmp_path / "mx", config) as host:
            host.wait_ready()
            fleet = Fleet([host], [host.port("mx")], keyring_file.keyring, sink, None)
            codes, elapsed = run(spread(fleet.ports, fleet.forged(20)))
            assert GUESS_BURST <= codes.count(550) <= answered_at_most(elapsed), codes
            assert codes.count(421) == len(codes) - codes.count(550), codes
            assert host.stop() == 0, host.log
        assert (tmp_path / "mx" / "state.sqlite").exists()


# ------------------------------------------------------------------------------------------------ in-process


NULL_SENDER = {"null_sender_rate": 0.01, "null_sender_burst": 2}


async def null_sender_mail(port: int) -> tuple[int, str]:
    client = await RawClient.connect(port)
    try:
        await client.ehlo()
        answer = await client.cmd("MAIL FROM:<>")
        await client.cmd("QUIT")
        return answer
    finally:
        await client.close()


def test_null_sender_mail_over_the_networks_rate_gets_450_and_falls_back_while_redis_is_away(
    redis_server: RedisServer, log_stream: io.StringIO
) -> None:
    async def scenario() -> None:
        async with FakeNextHop() as hop:
            base = gateway_config(hop.port)
            state = dataclasses.replace(
                base.state,
                backend=StateBackend.REDIS,
                url=redis_server.url,
                retry_after=60.0,
                **NULL_SENDER,
            )
            cfg = dataclasses.replace(base, state=state)
            stores = await make_stores(cfg)
            try:
                async with running_gateway(cfg, stores=stores) as gw:
                    port = gateway_port(gw)
                    codes = [(await null_sender_mail(port))[0] for _ in range(3)]
                    assert codes == [250, 250, 450]
                    assert await null_sender_mail(port) == (450, str(replies.NULL_SENDER_RATE)[4:])
                    # Not a bounce: never limited.
                    client = await RawClient.connect(port)
                    await client.ehlo()
                    assert (await client.cmd("MAIL FROM:<someone@remote.example>"))[0] == 250
                    await client.close()
                    redis_server.stop()
                    # The process's own budget: fresh, so its burst again; then 450, never a 5xx.
                    codes = [(await null_sender_mail(port))[0] for _ in range(3)]
                    assert codes == [250, 250, 450]
            finally:
                await stores.close()

    run(scenario())
    lines = [line for line in log_stream.getvalue().splitlines() if "state store unavailable" in line]
    assert len(lines) == 1 and "check=null-sender-rate" in lines[0], lines


class SlowBudget:
    """A budget that answers after the loop has turned a few times, as a store does."""

    def __init__(self) -> None:
        self.rule = BudgetRule("guess-budget", 1.0, 100)
        self.charged: list[str] = []

    async def charge(self, client_ip: str, now: float) -> Penalty:
        for _ in range(5):
            await asyncio.sleep(0)
        self.charged.append(client_ip)
        return Penalty()

    async def close(self) -> None:
        return None


def test_pipelined_replies_keep_their_order_while_a_failed_guess_waits_for_the_budget() -> None:
    async def body() -> None:
        async with FakeNextHop() as hop, running_gateway(gateway_config(hop.port)) as gw:
            budget = SlowBudget()
            for listener in gw.listeners:
                listener.context.guesses = budget
            keyring = make_keyring()
            today = int(time.time()) // 86400
            good = prvs.sign("bob@example.com", keyring, today)
            head, code, local = good.split("=", 2)
            forged = f"{head}={code[:4]}{(int(code[4:], 16) + 1) % 0x1000000:06x}={local}"
            client = await RawClient.connect(gateway_port(gw))
            await client.ehlo()
            client.send(f"MAIL FROM:<>\r\nRCPT TO:<{forged}>\r\nRCPT TO:<{good}>\r\nRCPT TO:<{forged}>")
            client.send("NOOP")
            answers = [await client.reply() for _ in range(5)]
            await client.close()
            assert [c for c, _ in answers] == [250, 550, 250, 550, 250], answers
            assert forged in answers[1][1] and forged in answers[3][1]
            assert budget.charged == ["127.0.0.1", "127.0.0.1"]

    run(body())


def test_an_outbound_listener_leaves_null_sender_mail_unlimited() -> None:
    """Our own MTAs' DSNs go out through the outbound role: only bounces from the internet are limited."""

    async def scenario() -> None:
        async with FakeNextHop() as hop:
            base = gateway_config(hop.port, listener={"role": "outbound", "trusted": ["127.0.0.0/8"]})
            cfg = dataclasses.replace(base, state=dataclasses.replace(base.state, **NULL_SENDER))
            async with running_gateway(cfg) as gw:
                port = gateway_port(gw)
                assert [(await null_sender_mail(port))[0] for _ in range(4)] == [250] * 4
            inbound = dataclasses.replace(
                cfg, listeners=(dataclasses.replace(cfg.listeners[0], role=Role.INBOUND),)
            )
            async with running_gateway(inbound) as gw:
                port = gateway_port(gw)
                assert [(await null_sender_mail(port))[0] for _ in range(4)] == [250, 250, 450, 450]

    run(scenario())


def test_an_mdn_to_a_message_host_a_sent_passes_host_b(tmp_path: Path, redis_server: RedisServer) -> None:
    """The ledger on Redis is the fleet's: host A's outbound role records a message, and a read receipt
    (RFC 8098, MAIL FROM:<>) to its untagged header From passes host B's inbound role; one to a Message-ID
    nobody sent is refused at the end of DATA. Redis away: the deferred decision is 451 4.3.0, never a 5xx,
    while a valid tag still passes; Redis back: the same receipt passes again, no restart."""
    keyring = tmp_path / "keyring.toml"
    kf = keystore.new_keyring(datetime.now(UTC), ledger=True)
    keystore.save(keyring, kf)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    message_id = "<fleet-1@example.com>"

    def mdn(refers_to: str) -> str:
        return (
            "From: Carol <carol@example.net>\r\nTo: alice@example.com\r\nSubject: Read: hello\r\n"
            "MIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=disposition-notification; boundary="B"\r\n\r\n'
            "--B\r\nContent-Type: text/plain\r\n\r\nYour message was displayed.\r\n"
            "--B\r\nContent-Type: message/disposition-notification\r\n\r\n"
            f"Final-Recipient: rfc822; carol@example.net\r\nOriginal-Message-ID: {refers_to}\r\n"
            "Disposition: manual-action/MDN-sent-manually; displayed\r\n\r\n--B--\r\n."
        )

    async def body(a_outbound: int, b_inbound: int, redis: Any) -> None:
        client = await RawClient.connect(a_outbound)
        await client.ehlo()
        await client.open_data("alice@example.com", "carol@example.net")
        sent = (
            f"From: Alice <alice@example.com>\r\nDisposition-Notification-To: alice@example.com\r\n"
            f"Message-ID: {message_id}\r\nSubject: hello\r\n\r\nhi\r\n."
        )
        assert (await client.cmd(sent))[0] == 250
        await client.close()
        deadline = time.monotonic() + 10
        while not [k async for k in redis.scan_iter(match="batv:ledger:*")]:  # written in groups, soon after
            assert time.monotonic() < deadline, "host A never recorded the message"
            await asyncio.sleep(0.02)
        async def receipt(refers_to: str) -> tuple[int, str]:
            client = await RawClient.connect(b_inbound)
            try:
                await client.ehlo()
                await client.open_data("", "alice@example.com")  # 250 at RCPT: deferred to the end of DATA
                return await client.cmd(mdn(refers_to))
            finally:
                await client.close()

        assert (await receipt(message_id))[0] == 250
        assert (await receipt("<never-sent@example.com>"))[0] == 550
        # Away: stopped, not killed, so that what it holds is there when it answers again.
        os.kill(redis_server.pid, signal.SIGSTOP)
        try:
            unavailable = "4.3.0 <alice@example.com>: message ledger unavailable, try again later"
            assert await receipt(message_id) == (451, unavailable)
            tag = prvs.sign("alice@example.com", kf.keyring, int(time.time()) // 86400)
            await mail_passes(b_inbound, "", tag)
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while (code := (await receipt(message_id))[0]) != 250:
            assert code == 451 and time.monotonic() < deadline, code
            await asyncio.sleep(0.1)

    with SmtpSink(dumps) as sink:
        configs = []
        for name in ("mx1", "mx2"):
            path = fleet_config(tmp_path / name, keyring, sink.port, redis_server.url)
            configs.append(path)
        with Supervised(tmp_path / "mx1", configs[0]) as a, Supervised(tmp_path / "mx2", configs[1]) as b:
            a.wait_ready(), b.wait_ready()
            redis = aioredis.Redis.from_url(redis_server.url)

            async def go() -> None:
                try:
                    await body(a.port("relay"), b.port("mx"), redis)
                finally:
                    await redis.aclose()

            run(go())
            for host in (a, b):
                assert host.stop() == 0, host.log
                assert "Traceback" not in host.log, host.log
            assert 'msg="ledger on: redis ([state])' in b.log
