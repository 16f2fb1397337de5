"""workers.py: `batv-gateway serve` with `[gateway] workers = 2` relays, reloads every worker on SIGHUP,
and stops every one on SIGTERM (socketmap's workers: tests/test_socketmap.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import smtplib
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from gateway import keystore, logs, workers
from tests.postfix_instance import live_children
from tests.smtp_peers import LOCALHOST, SmtpSink, free_port
from tests.test_serve import Serving, example_config, keyring_file  # noqa: F401  (a fixture)


def dumped(sink: SmtpSink) -> set[Path]:
    return {p for p in sink.folder.iterdir() if p.is_file()}


def key_ids(files: set[Path]) -> set[str]:
    """The key ids of the tagged envelope senders in these dumps (smtp-sink names them by queue id, not
    in arrival order)."""
    ids = set()
    for path in files:
        message = path.read_bytes()
        found = re.search(rb"X-Mail-Args: <([^>]*)>", message)
        assert found is not None, message[:300]
        ids.add(found.group(1).decode().split("=")[1][0])
    return ids


def send(port: int, count: int, subject: str) -> None:
    for _ in range(count):  # a new connection each: the kernel spreads them over the workers
        with smtplib.SMTP(LOCALHOST, port, timeout=20) as client:
            message = f"Subject: {subject}\r\n\r\nhi\r\n"
            client.sendmail("user@example.com", ["someone@elsewhere.test"], message)


def wait_for_messages(sink: SmtpSink, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(sink.messages()) < count:
        assert time.monotonic() < deadline, f"{len(sink.messages())} of {count} messages arrived"
        time.sleep(0.02)


def test_serve_with_two_workers_relays_reloads_each_on_sighup_and_stops_all(
    tmp_path: Path,
    keyring_file: keystore.KeyringFile,  # noqa: F811
) -> None:
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    inbound, outbound, metrics = free_port(), free_port(), free_port()
    with SmtpSink(dumps) as sink:
        config = example_config(tmp_path, inbound, outbound, sink.port)
        text = config.read_text().replace("workers = 1\n", "workers = 2\n")
        metrics_listen = f'[metrics]\nlisten = "{LOCALHOST}:{metrics}"'
        config.write_text(text.replace('[metrics]\nlisten = ""', metrics_listen))
        assert "workers = 2\n" in config.read_text() and f":{metrics}" in config.read_text()
        serving = Serving(config, outbound)
        try:
            serving.wait_ready()
            deadline = time.monotonic() + 10
            while len(live_children(serving.process.pid)) < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            (worker,) = live_children(serving.process.pid)
            # One process binds the metrics endpoint (a second would fail to start), and it answers
            # /readyz 200 once every worker is up (the ports are bound before the fork: listening is not
            # being ready).
            while True:
                try:
                    with urllib.request.urlopen(f"http://{LOCALHOST}:{metrics}/readyz", timeout=10) as reply:
                        assert reply.status == 200
                        break
                except OSError:
                    assert time.monotonic() < deadline, "never ready"
                    time.sleep(0.05)

            send(outbound, 6, "before")
            wait_for_messages(sink, 6)
            old_key = keyring_file.keyring.active.id
            assert key_ids(dumped(sink)) == {str(old_key)}

            now = datetime.now(UTC)
            added, key = keystore.add_key(keyring_file, now)
            keystore.save(tmp_path / "keyring.toml", keystore.activate(added, key.id, now))
            os.kill(serving.process.pid, signal.SIGHUP)
            deadline = time.monotonic() + 15
            while True:
                before = dumped(sink)
                send(outbound, 8, "after")
                wait_for_messages(sink, len(before) + 8)
                ids = key_ids(dumped(sink) - before)
                if ids == {str(key.id)}:
                    break
                assert time.monotonic() < deadline, f"not every worker reloaded: key ids {ids}"
                time.sleep(0.1)
        finally:
            code, err = serving.stop()
            print(err)  # shown by pytest when the test fails half-way
    assert code == 0, err
    assert err.count("reload applied") >= 2, "the main process and the worker reloaded"
    assert err.count("shutting down") == 2, err
    assert not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text().split()[2]
    assert live_children(serving.process.pid) == []


def test_signals_before_the_loop_are_replayed_in_order() -> None:
    handled: list[str] = []
    workers.remember_signals()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
        workers.replay_signals(lambda: handled.append("stop"), lambda: handled.append("reload"))
    finally:
        for sig in workers.SIGNALS:
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
    assert handled == ["reload", "stop"]
    workers.replay_signals(lambda: handled.append("again"), lambda: handled.append("again"))
    assert handled == ["reload", "stop"], "each signal is replayed once"


def test_a_worker_writes_the_log_lines_it_still_held_when_it_exits(tmp_path: Path) -> None:
    # A worker leaves by os._exit (no atexit): lines held for the end of a loop turn that never came
    # (the loop stopped first) must still reach the log.
    log_file = tmp_path / "worker.log"

    def worker(say_ready: Callable[[], None]) -> int:
        logs.setup(stream=log_file.open("w"))

        async def log_and_stop() -> None:
            logging.getLogger("gateway.test").info("the last line")
            asyncio.get_running_loop().stop()

        loop = asyncio.new_event_loop()
        loop.run_until_complete(log_and_stop())
        loop.close()
        return 0

    children = workers.fork(1, worker)
    (pid,) = children.pids
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert "the last line" in log_file.read_text()
