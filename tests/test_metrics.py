"""gateway/ops/metrics.py: counters by role/verdict/reason, keyring gauges, and the HTTP endpoint."""

from __future__ import annotations

import asyncio
import enum
import os
import signal
import smtplib
import stat
import subprocess
import sys
import textwrap
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from gateway.core import prvs
from gateway.core.keyring import Key, Keyring, KeyState
from gateway.core.replies import bounce_refused
from gateway.ops import keystore
from gateway.ops.metrics import REPLY_BUCKETS, Metrics, MetricsServer
from tests.smtp_peers import LOCALHOST, SmtpSink
from tests.test_serve import keyring_file  # noqa: F401  (a fixture)
from tests.test_workers import Supervised, workers_config


# Stand-ins with the values of config.Role, policy.Action and policy.Reason: metrics reads enum values only.
class Role(enum.Enum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


class Action(enum.Enum):
    RELAY = "relay"
    REJECT = "reject"


class Reason(enum.Enum):
    VALID_PRVS = "valid-prvs"
    VALID_SRS = "valid-srs"
    UNSIGNED = "unsigned"
    BAD_HASH = "bad-hash"
    EXPIRED = "expired"
    SRS0 = "srs0"
    SRS1 = "srs1"


CREATED = datetime(2024, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Event:
    role: object
    action: object
    reason: object
    would_reject: object = None


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def test_private_registries_do_not_collide() -> None:
    a, b = Metrics(), Metrics()
    a.on_decision(Event(Role.INBOUND, Action.REJECT, Reason.UNSIGNED))
    assert sample(a, "batv_decisions_total", role="inbound", verdict="reject", reason="unsigned") == 1
    assert sample(b, "batv_decisions_total", role="inbound", verdict="reject", reason="unsigned") is None


def test_decisions_would_rejects_and_srs() -> None:
    m = Metrics()
    m.on_decision(Event(Role.INBOUND, Action.REJECT, Reason.BAD_HASH))
    m.on_decision(Event(Role.INBOUND, Action.REJECT, Reason.BAD_HASH))
    m.on_decision(Event(Role.INBOUND, Action.RELAY, Reason.VALID_PRVS))
    observed = bounce_refused("bob@example.com", "unsigned")
    m.on_decision(Event(Role.INBOUND, Action.RELAY, Reason.UNSIGNED, would_reject=observed))
    m.on_decision(Event(Role.INBOUND, Action.RELAY, Reason.VALID_SRS))
    m.on_decision(Event(Role.OUTBOUND, Action.RELAY, Reason.SRS0))
    m.on_decision(Event(Role.OUTBOUND, Action.RELAY, Reason.SRS1))
    assert sample(m, "batv_decisions_total", role="inbound", verdict="reject", reason="bad-hash") == 2
    assert sample(m, "batv_decisions_total", role="inbound", verdict="relay", reason="valid-prvs") == 1
    assert sample(m, "batv_would_reject_total", role="inbound", reason="unsigned") == 1
    assert sample(m, "batv_srs_rewrites_total", direction="reverse") == 1
    assert sample(m, "batv_srs_rewrites_total", direction="forward") == 2


def test_sessions_next_hop_and_histograms() -> None:
    m = Metrics()
    sessions = [object(), object()]
    m.count_sessions(Role.INBOUND, lambda: float(len(sessions)))
    sessions.pop()
    m.next_hop_error("timeout")
    m.next_hop_reply("rcpt", 0.002)
    m.transaction_done(Role.OUTBOUND, 0.3)
    assert sample(m, "batv_open_sessions", role="inbound") == 1
    assert sample(m, "batv_next_hop_errors_total", kind="timeout") == 1
    assert sample(m, "batv_next_hop_reply_seconds_count", command="RCPT") == 1
    assert sample(m, "batv_next_hop_reply_seconds_bucket", command="RCPT", le="0.0025") == 1
    assert sample(m, "batv_transaction_seconds_count", role="outbound") == 1
    assert sample(m, "batv_transaction_seconds_bucket", role="outbound", le="0.25") == 0


def test_keyring_gauges_use_the_injected_clock() -> None:
    now = CREATED.timestamp() + 86400 * 3
    m = Metrics(clock=lambda: now)
    assert sample(m, "batv_keyring_active_key_id") is None
    keyring = Keyring(
        (
            Key(4, b"a" * 32, KeyState.VERIFY, CREATED, CREATED),
            Key(5, b"b" * 32, KeyState.ACTIVE, CREATED, CREATED),
            Key(6, b"c" * 32, KeyState.RETIRED, CREATED, CREATED),
        )
    )
    m.set_keyring(keyring, generation=12)
    assert sample(m, "batv_keyring_active_key_id") == 5
    assert sample(m, "batv_keyring_generation") == 12
    assert sample(m, "batv_keyring_active_key_age_seconds") == 86400 * 3
    assert sample(m, "batv_keyring_keys", state="verify") == 1
    assert sample(m, "batv_keyring_keys", state="retired") == 1
    # A keyring never shows a secret, not even in the metrics.
    assert b"aaaa" not in m.exposition() and b"YWFh" not in m.exposition()


def test_reload_gauges() -> None:
    m = Metrics(clock=lambda: 1700000000.0)
    assert sample(m, "batv_last_reload_success") == 1
    m.reload_done(False)
    assert sample(m, "batv_last_reload_success") == 0
    assert sample(m, "batv_reloads_total", result="refused") == 1
    assert sample(m, "batv_last_reload_timestamp_seconds") == 1700000000.0
    m.reload_done(True)
    assert sample(m, "batv_last_reload_success") == 1


async def http_get(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def test_endpoint_serves_metrics_health_and_readiness() -> None:
    asyncio.run(_endpoint())


async def _endpoint() -> None:
    m = Metrics()
    m.on_decision(Event(Role.INBOUND, Action.REJECT, Reason.EXPIRED))
    ready = [False]
    server = MetricsServer(m, ready=lambda: ready[0])
    await server.start("127.0.0.1", 0)
    try:
        status, body = await http_get(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200
        assert b'batv_decisions_total{reason="expired",role="inbound",verdict="reject"} 1.0' in body
        assert (await http_get(server.port, b"GET /healthz HTTP/1.0\r\n\r\n"))[0] == 200
        assert (await http_get(server.port, b"GET /readyz HTTP/1.0\r\n\r\n"))[0] == 503
        ready[0] = True
        assert (await http_get(server.port, b"GET /readyz HTTP/1.0\r\n\r\n"))[0] == 200
        assert (await http_get(server.port, b"GET /nope HTTP/1.0\r\n\r\n"))[0] == 404
        assert (await http_get(server.port, b"POST /metrics HTTP/1.0\r\n\r\n"))[0] == 405
        assert (await http_get(server.port, b"garbage\r\n\r\n"))[0] == 400
        assert await http_get(server.port, b"HEAD /metrics HTTP/1.0\r\n\r\n") == (200, b"")
        # An endless request head is cut off, not buffered.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000)
        await writer.drain()
        assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()
    finally:
        await server.close()


def test_close_ends_an_idle_connection() -> None:
    asyncio.run(_close())


async def _close() -> None:
    server = MetricsServer(Metrics())
    await server.start("127.0.0.1", 0)
    port = server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /metr")
    await writer.drain()
    await asyncio.sleep(0)
    await server.close()
    assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["MAIL", "RCPT", "DOT"]),
            st.one_of(st.sampled_from(REPLY_BUCKETS), st.floats(0, 1000, allow_nan=False)),
        ),
        max_size=30,
    )
)
def test_our_histogram_exposes_what_prometheus_clients_would(observations: list[tuple[str, float]]) -> None:
    # metrics._Histogram replaces prometheus_client's Histogram on the hot path; scrapes must not change.
    ours = Metrics()
    registry = CollectorRegistry()
    theirs = Histogram(
        "batv_next_hop_reply_seconds", "x", ["command"], buckets=REPLY_BUCKETS, registry=registry
    )
    for command, seconds in observations:  # bucket bounds themselves included: le is inclusive
        ours.next_hop_reply(command, seconds)
        theirs.labels(command).observe(seconds)

    def samples(reg: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in reg.collect()
            if family.name == "batv_next_hop_reply_seconds"
            for s in family.samples
            if not s.name.endswith("_created")
        }

    mine, reference = samples(ours.registry), samples(registry)
    assert mine.keys() == reference.keys()
    for key, value in reference.items():
        assert mine[key] == pytest.approx(value)


# ------------------------------------------------------------------------------ several workers, one endpoint


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(value for (sample_name, _), value in samples.items() if sample_name == name)


def decisions_in(counts: Path) -> float:
    """What one worker counted: its own file in the shared folder."""
    if not counts.exists():
        return 0.0
    return sum(
        s.value
        for family in MultiProcessCollector.merge([str(counts)])
        for s in family.samples
        if s.name == "batv_decisions_total"
    )


def test_with_two_workers_the_endpoint_counts_the_decisions_of_every_worker(
    tmp_path: Path,
    keyring_file: keystore.KeyringFile,  # noqa: F811
) -> None:
    connections = 16  # the kernel spreads them over the workers: each gets some (checked below)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    with (
        SmtpSink(dumps) as sink,
        Supervised(tmp_path, workers_config(tmp_path, 2, sink.port, metrics=True)) as serving,
    ):
        serving.wait_ready()
        port, metrics = serving.port("mx"), serving.metrics_port
        (folder,) = serving.tmp.glob("batv-metrics-*")
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, "the counts are private to the service"
        genuine = prvs.sign("bob@example.com", keyring_file.keyring, int(time.time()) // 86400)
        for _ in range(connections):
            with smtplib.SMTP(LOCALHOST, port, timeout=20) as client:
                message = "Subject: bounce\r\n\r\nhi\r\n"
                refused = client.sendmail("", ["nobody@example.com", genuine], message)
            assert list(refused) == ["nobody@example.com"] and refused["nobody@example.com"][0] == 550

        pids = serving.workers()
        per_worker = [decisions_in(folder / f"counter_{pid}.db") for pid in pids]
        assert len(per_worker) == 2 and all(per_worker), f"both workers decided: {per_worker}"
        samples = scrape(metrics)
        assert total(samples, "batv_decisions_total") == 2 * connections == sum(per_worker)
        inbound = (("reason", "unsigned"), ("role", "inbound"), ("verdict", "reject"))
        assert samples["batv_decisions_total", inbound] == connections
        inbound = (("reason", "valid-prvs"), ("role", "inbound"), ("verdict", "relay"))
        assert samples["batv_decisions_total", inbound] == connections
        assert samples["batv_transaction_seconds_count", (("role", "inbound"),)] == connections

        # Sessions held open on either worker add up (each worker samples its own every second).
        held = [smtplib.SMTP(LOCALHOST, port, timeout=20) for _ in range(4)]
        try:
            open_sessions = ("batv_open_sessions", (("role", "inbound"),))
            deadline = time.monotonic() + 10
            while scrape(metrics).get(open_sessions) != 4:
                assert time.monotonic() < deadline, scrape(metrics).get(open_sessions)
                time.sleep(0.1)
        finally:
            for client in held:
                client.quit()

        # A dead worker's decisions happened: they stay in the sum.
        os.kill(pids[0], signal.SIGKILL)
        serving.wait_for_log(rf'msg="worker died" pid={pids[0]} ')
        assert total(scrape(metrics), "batv_decisions_total") == 2 * connections
        code = serving.stop()
    assert code == 0, serving.log
    assert not folder.exists(), "the main process removes the shared counts when it stops"


def test_a_starting_workers_empty_file_neither_stops_a_worker_nor_fails_a_scrape() -> None:
    """prometheus-client creates a worker's file empty and sizes it a moment later: a worker that registered
    its collector (or a scrape) in between died with struct.error. Such a file holds nothing yet."""
    script = textwrap.dedent(
        """
        from prometheus_client.exposition import generate_latest
        from gateway.ops import metrics

        folder = metrics.shared_folder()
        (folder / "counter_424242.db").touch()  # a worker between its file's creation and its sizing
        try:
            m = metrics.Metrics(shared=folder)
            m.decisions.labels("inbound", "reject", "unsigned").inc()
            text = generate_latest(m.registry).decode()
            line = 'batv_decisions_total{reason="unsigned",role="inbound",verdict="reject"} 1.0'
            print("counted" if line in text else text)
        finally:
            metrics.remove_shared_folder(folder)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (run.returncode, run.stdout.strip()) == (0, "counted"), run.stderr
