"""workers.py: `batv-gateway serve` with `[gateway] workers = 2` relays, reloads every worker on SIGHUP,
stops every one on SIGTERM, and replaces a worker that dies (socketmap's workers: tests/test_socketmap.py;
the workers' shared metrics: tests/test_metrics.py)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import signal
import smtplib
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.core import logs
from gateway.ops import keystore, workers
from gateway.ops.sdnotify import Notifier
from tests.postfix_instance import children, live_children
from tests.smtp_peers import LOCALHOST, SmtpSink, free_port
from tests.test_serve import ROOT, Serving, example_config, keyring_file  # noqa: F401  (a fixture)


def workers_config(folder: Path, count: int, next_hop: int, metrics: bool = False) -> Path:
    """The example config on port 0 with `count` workers, no guess limit (a test's own bounces are not
    guesses to slow down) and, with `metrics`, the endpoint on port 0 too."""
    path = example_config(folder, 0, 0, next_hop)
    text = path.read_text()
    for old, new in [
        ('workers = "auto"\n', f"workers = {count}\n"),
        ("guess_rate = 1.0 ", "guess_rate = 0.0 "),
    ]:
        assert old in text, f"the example config changed: {old!r} is gone; update this test"
        text = text.replace(old, new)
    if metrics:
        text = text.replace('[metrics]\nlisten = ""', f'[metrics]\nlisten = "{LOCALHOST}:0"')
    path.write_text(text)
    return path


class Supervised:
    """`serve` with several workers as a child process; its log goes to a file read while it runs, and
    TMPDIR is the test's own (the workers' shared metrics folder is made there)."""

    def __init__(
        self, folder: Path, config: Path, env: dict[str, str] | None = None, cpus: str | None = None
    ) -> None:
        self.tmp = folder / "tmp"
        self.tmp.mkdir()
        self.log_file = folder / "serve.log"
        # `cpus`: the CPUs serve may run on (taskset -c), which "auto" counts.
        pinned = ["taskset", "-c", cpus] if cpus is not None else []
        with self.log_file.open("wb") as log:
            self.process = subprocess.Popen(
                [*pinned, sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(self.tmp), **(env or {})},
            )

    def __enter__(self) -> Supervised:
        return self

    def wait_ready(self) -> Supervised:
        self.wait_for_log(r'msg="workers ready"')
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:  # a test that failed half-way: nothing of it may live on
            self.kill()

    def kill(self) -> None:
        left = live_children(self.process.pid)
        self.process.kill()
        self.process.wait()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @property
    def log(self) -> str:
        return self.log_file.read_text()

    def wait_for_log(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.log)
            if found is not None:
                return found
            assert self.process.poll() is None, f"serve exited: {self.log}"
            assert time.monotonic() < deadline, f"no {pattern!r} in: {self.log}"
            time.sleep(0.02)

    def port(self, listener: str) -> int:
        return int(self.wait_for_log(rf'msg="listener {listener} \(\w+\) on [^:]+:(\d+)"').group(1))

    @property
    def metrics_port(self) -> int:
        return int(self.wait_for_log(r'msg="metrics endpoint up" event=start metrics=[^:]+:(\d+)').group(1))

    def workers(self) -> list[int]:
        return sorted(live_children(self.process.pid))

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"serve did not stop: {self.log}") from None


def session(port: int) -> None:
    """One SMTP session that is answered: greeting, NOOP, QUIT (smtplib raises otherwise)."""
    with smtplib.SMTP(LOCALHOST, port, timeout=20) as client:
        assert client.noop()[0] == 250


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
        text = config.read_text().replace('workers = "auto"\n', "workers = 2\n")
        metrics_listen = f'[metrics]\nlisten = "{LOCALHOST}:{metrics}"'
        config.write_text(text.replace('[metrics]\nlisten = ""', metrics_listen))
        assert "workers = 2\n" in config.read_text() and f":{metrics}" in config.read_text()
        serving = Serving(config, outbound)
        try:
            serving.wait_ready()
            deadline = time.monotonic() + 10
            while len(live_children(serving.process.pid)) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            pair = live_children(serving.process.pid)
            assert len(pair) == 2, "two workers under a main process that serves no mail"
            # The main process binds the metrics endpoint once (the workers serve it), and /readyz says
            # 200 once a worker is up (the ports are bound before the fork: listening is not being ready).
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
    assert err.count("reload applied") >= 2, "both workers reloaded"
    assert err.count("shutting down") == 2, err
    for worker in pair:
        assert not Path(f"/proc/{worker}").exists()
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


class Sessions(threading.Thread):
    """SMTP sessions one after another until stopped, each recorded with when it began and how it ended."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.done: list[tuple[float, BaseException | None]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            began = time.monotonic()
            try:
                session(self.port)
                self.done.append((began, None))
            except (OSError, smtplib.SMTPException, AssertionError) as error:
                self.done.append((began, error))

    def __enter__(self) -> Sessions:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.join(30)


def test_a_worker_killed_is_replaced_within_a_second_and_sessions_are_answered_throughout(
    tmp_path: Path,
    keyring_file: keystore.KeyringFile,  # noqa: F811
) -> None:
    with Supervised(tmp_path, workers_config(tmp_path, 2, next_hop=free_port())) as serving:
        serving.wait_ready()
        port = serving.port("mx")
        first = serving.workers()
        assert len(first) == 2, serving.log
        assert list(serving.tmp.iterdir()) == [], "no metrics endpoint, no shared counts (metrics.py)"
        victim = first[0]
        with Sessions(port) as sessions:
            while len(sessions.done) < 4:
                time.sleep(0.01)
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            new: list[int] = []
            while not new:
                assert time.monotonic() < killed + 1.0, f"no new worker within a second: {serving.log}"
                new = [pid for pid in serving.workers() if pid not in first]
                time.sleep(0.005)
            (replacement,) = new
            # The dead worker is gone (reaped) once it has been replaced: its listening socket was closed
            # when it exited, so no session begun from now on can be handed to it.
            assert victim not in children(serving.process.pid)
            gone = time.monotonic()
            serving.wait_for_log(rf'msg="worker ready" event=start pid={replacement}\b')
            answered = len(sessions.done)
            while len(sessions.done) < answered + 10:  # over both workers, the new one included
                time.sleep(0.01)
        after = [error for began, error in sessions.done if began > gone]
        assert len(after) >= 10 and not any(after), after
        # Only a session the killed worker held may have been cut (a client then tries again).
        assert sum(error is not None for _, error in sessions.done) <= 1, sessions.done
        assert serving.workers() == sorted([first[1], replacement])
        line = f'msg="worker died" pid={victim} status=SIGKILL replaced_by={replacement}'
        assert line in serving.log, serving.log

        code = serving.stop()
        log = serving.log
    assert code == 0, log
    # On SIGTERM nothing is replaced: one death in the whole log, and nobody left behind.
    assert log.count('msg="worker died"') == 1, log
    assert log.count("shutting down") == 2, log
    assert live_children(serving.process.pid) == []


def broken(say_ready: Callable[[], None]) -> int:
    return 3  # as a worker whose config or library fails right after the fork


def test_a_worker_that_keeps_dying_is_not_forked_for_ever(log_stream: io.StringIO) -> None:
    gone: list[int] = []
    sigchld = signal.getsignal(signal.SIGCHLD)
    code = workers.supervise(
        1, broken, notifier=Notifier(socket_name=""), on_exit=gone.append, respawn_limit=2
    )
    assert code == 1
    assert len(gone) == 3 and len(set(gone)) == 3, "the first worker and two replacements, then stop"
    lines = log_stream.getvalue().splitlines()
    assert sum('msg="worker died"' in line for line in lines) == 2, lines
    assert 'level=error logger=gateway.workers msg="workers keep dying: stopping the service"' in lines[-1]
    assert f"pid={gone[-1]} status=\"exit 3\" deaths=3 window=60s" in lines[-1]
    assert signal.getsignal(signal.SIGCHLD) == sigchld, "the supervisor's handlers are put back"
    assert live_children(os.getpid()) == []


def test_with_more_workers_than_the_respawn_limit_that_many_deaths_are_replaced(
    log_stream: io.StringIO,
) -> None:
    # Six workers killed at once (an admin's kill, the OOM killer on a busy night) is not a crash loop.
    assert workers.supervise(6, broken, notifier=Notifier(socket_name="")) == 1
    text = log_stream.getvalue()
    assert text.count('msg="worker died"') == 6, text
    assert "deaths=7 window=60s" in text
    assert live_children(os.getpid()) == []


def test_a_replacement_takes_the_dead_workers_slot_once_it_is_cleared(
    tmp_path: Path, log_stream: io.StringIO
) -> None:
    """The slot is where a worker counts its sessions (sessiontable.py): the supervisor clears a dead
    worker's slot, and hands that slot, and only that one, to its replacement."""
    said = tmp_path / "slots"

    def dies_at_once(say_ready: Callable[[], None]) -> int:
        fd = os.open(said, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{os.getpid()} {workers.worker_slot()}\n".encode())
        os.close(fd)
        return 3

    gone: list[int] = []
    cleared: list[int] = []
    code = workers.supervise(
        2,
        dies_at_once,
        notifier=Notifier(socket_name=""),
        on_exit=gone.append,
        clear_slot=cleared.append,
        respawn_limit=4,
    )
    assert code == 1
    slots = dict(tuple(map(int, line.split())) for line in said.read_text().splitlines())
    assert sorted(slots) == sorted(gone) and len(gone) >= 5, (slots, gone)
    # Each death cleared the dead worker's own slot, right after it was reaped.
    assert cleared == [slots[pid] for pid in gone]
    assert set(slots.values()) == {0, 1}
    # Every replacement (named in its predecessor's "worker died" line) is in the dead worker's slot.
    died = r'msg="worker died" pid=(\d+) status="exit 3" replaced_by=(\d+)'
    replaced = re.findall(died, log_stream.getvalue())
    assert len(replaced) == 4, log_stream.getvalue()
    assert all(slots[int(dead)] == slots[int(new)] for dead, new in replaced), (replaced, slots)
    assert live_children(os.getpid()) == []
    with pytest.raises(RuntimeError, match="not a supervised worker"):
        workers.worker_slot()


def bounce_reply(port: int) -> int:
    """The reply to RCPT of a bounce to an address we never signed (550 enforced, 250 observed)."""
    with smtplib.SMTP(LOCALHOST, port, timeout=20) as client:
        client.ehlo()
        assert client.mail("")[0] == 250
        return int(client.rcpt("nobody@example.com")[0])


def test_a_replacement_worker_serves_the_config_as_reloaded_not_as_started(
    tmp_path: Path,
    keyring_file: keystore.KeyringFile,  # noqa: F811
) -> None:
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    with SmtpSink(dumps) as sink:
        config = workers_config(tmp_path, 2, sink.port)
        with Supervised(tmp_path, config) as serving:
            serving.wait_ready()
            port = serving.port("mx")
            assert {bounce_reply(port) for _ in range(6)} == {550}
            text = config.read_text()
            assert "observe_domains = []" in text
            config.write_text(text.replace("observe_domains = []", 'observe_domains = ["example.com"]'))
            os.kill(serving.process.pid, signal.SIGHUP)
            serving.wait_for_log(r'msg="reload applied"(.|\n)*msg="reload applied"')

            victim = serving.workers()[0]
            os.kill(victim, signal.SIGKILL)
            died = serving.wait_for_log(rf'msg="worker died" pid={victim} .* replaced_by=(\d+)')
            replacement = int(died[1])
            serving.wait_for_log(rf'msg="worker ready" event=start pid={replacement}\b')
            # The replacement reloads as soon as its loop runs: the third "reload applied" is its own.
            serving.wait_for_log(r'(msg="reload applied"(.|\n)*){3}')
            assert replacement in serving.workers()
            assert {bounce_reply(port) for _ in range(12)} == {250}, "every worker observes now"
            assert serving.stop() == 0, serving.log


def test_a_sigterm_while_the_workers_start_stops_them_all(
    tmp_path: Path,
    keyring_file: keystore.KeyringFile,  # noqa: F811
) -> None:
    serving = Supervised(tmp_path, workers_config(tmp_path, 2, next_hop=free_port()))
    with serving:  # no wait for ready: the signal comes while the workers start
        serving.wait_for_log(r"msg=\"inbound listener mx enforces")  # signals are remembered from here
        code = serving.stop()
    assert code == 0, serving.log
    assert 'msg=stopped event=stop status=0' in serving.log
    assert 'msg="worker died"' not in serving.log
    assert live_children(serving.process.pid) == []


EARLY_SIGTERM = """
import os, signal, sys, time
from gateway.core import logs
from gateway.ops import workers
from gateway.ops.sdnotify import Notifier

logs.setup()
workers.remember_signals()
os.kill(os.getpid(), signal.SIGTERM)  # before supervise: remembered, not handled yet
main = os.getpid()

def worker(say_ready):
    say_ready()
    # Its own remembered signals; and should the test kill the main process, no worker outlives it.
    while signal.SIGTERM not in workers._early_signals and os.getppid() == main:
        time.sleep(0.01)
    return 0

sys.exit(workers.supervise(2, worker, notifier=Notifier(socket_name="")))
"""


def test_a_sigterm_remembered_before_the_supervisor_runs_stops_it() -> None:
    done = subprocess.run(
        [sys.executable, "-c", EARLY_SIGTERM],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "worker died" not in done.stderr


def notified(sock: socket.socket) -> tuple[int, str]:
    """One sd_notify datagram: the sender's pid (SO_PASSCRED) and the message."""
    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    pids = [
        struct.unpack("3i", payload)[0]
        for level, kind, payload in ancillary
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
    ]
    assert len(pids) == 1, ancillary
    return pids[0], data.decode()


def test_the_main_process_alone_speaks_to_systemd_ready_reloading_stopping(
    tmp_path: Path,
    keyring_file: keystore.KeyringFile,  # noqa: F811
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(15)
        config = workers_config(tmp_path, 2, next_hop=free_port())
        with Supervised(tmp_path, config, env={"NOTIFY_SOCKET": str(tmp_path / "notify")}) as serving:
            main = serving.process.pid
            # READY once both workers serve (workers' own notifiers are off: systemd would refuse them).
            assert notified(sock) == (main, "READY=1\nSTATUS=serving: 2 workers")
            assert len(serving.workers()) == 2
            # Type=notify-reload: SIGHUP is answered RELOADING=1, then READY=1.
            os.kill(main, signal.SIGHUP)
            pid, message = notified(sock)
            assert pid == main and message.startswith("RELOADING=1\nMONOTONIC_USEC="), message
            assert notified(sock) == (main, "READY=1\nSTATUS=serving: 2 workers")
            serving.wait_for_log(r'msg="reload: nothing changed"(.|\n)*msg="reload: nothing changed"')
            assert serving.stop() == 0, serving.log
            assert notified(sock) == (main, "STOPPING=1")
            sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                notified(sock)  # and nothing else, from anyone


def test_a_sigterm_once_stopping_is_ignored_until_the_loop_is_closed() -> None:
    """serve and the Postfix commands call ignore_from_now_on as they stop: a second SIGTERM must not take
    the default action before they have cleaned up (removing the loop's handlers would restore it)."""
    script = textwrap.dedent(
        """
        import asyncio, os, signal, sys
        from gateway.ops import workers

        async def main() -> None:
            loop = asyncio.get_running_loop()
            stopped = []
            loop.add_signal_handler(signal.SIGTERM, lambda: stopped.append(1))
            workers.ignore_from_now_on(loop, [signal.SIGTERM])
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.1)
            print("alive, stop handler called:", bool(stopped), flush=True)

        asyncio.run(main())
        print("after the loop:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
    )
    assert (run.returncode, run.stdout) == (0, "alive, stop handler called: False\nafter the loop: True\n")


PER_CLIENT = 3


def greeted(port: int) -> tuple[socket.socket, bytes]:
    """A connection and the first line the gateway sent on it (a 220, or the 421 that refuses it)."""
    sock = socket.create_connection((LOCALHOST, port), timeout=20)
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = sock.recv(512)
        if not chunk:
            break
        line += chunk
    return sock, line


def admitted(port: int, tries: int) -> tuple[list[socket.socket], int]:
    """`tries` connections: the admitted ones, held open, and how many were refused (a refusal must be the
    per-client 421)."""
    held, refused = [], 0
    for _ in range(tries):
        sock, line = greeted(port)
        if line.startswith(b"220 "):
            held.append(sock)
            continue
        assert line.startswith(b"421 4.7.0 Too many connections from your address"), line
        refused += 1
        sock.close()
    return held, refused


def server_side(sock: socket.socket, workers_now: list[int]) -> int:
    """The worker that holds the other end of this client connection (its socket's inode in /proc)."""
    client_port = sock.getsockname()[1]
    server_port = sock.getpeername()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        ours = int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port
        if ours and state == "01":  # ESTABLISHED: not an earlier connection's TIME_WAIT on the same ports
            inode = fields[9]
    assert inode is not None, (client_port, server_port)
    for pid in workers_now:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
    raise AssertionError(f"no worker holds socket {inode}")


def test_a_clients_session_limit_holds_across_the_workers_and_a_killed_workers_share_is_freed(
    tmp_path: Path,
    keyring_file: keystore.KeyringFile,  # noqa: F811
) -> None:
    """sessiontable.py. The kernel spreads the client's connections over both workers (each worker counting
    alone would admit up to twice the limit: all ten landing on one worker is a 1 in 512 chance)."""
    config = workers_config(tmp_path, 2, next_hop=free_port())
    text = config.read_text()
    assert "max_sessions_per_client = 50 " in text, "the example config changed; update this test"
    limit = f"max_sessions_per_client = {PER_CLIENT} "
    config.write_text(text.replace("max_sessions_per_client = 50 ", limit))
    with Supervised(tmp_path, config) as serving:
        serving.wait_ready()
        port = serving.port("mx")
        held, refused = admitted(port, PER_CLIENT + 7)
        assert (len(held), refused) == (PER_CLIENT, 7), serving.log
        # Closing one admits one more (once its worker has seen the close), and only one.
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:
            more, _ = admitted(port, 1)
            if more:
                break
            assert time.monotonic() < deadline, "a closed session's place was never given back"
            time.sleep(0.02)
        held += more
        assert admitted(port, 3) == ([], 3)

        # A worker killed with sessions open cleans nothing up: the main process clears its share.
        owners = {sock: server_side(sock, serving.workers()) for sock in held}
        first = serving.workers()
        victim = max(first, key=lambda pid: list(owners.values()).count(pid))
        survivors = [sock for sock, pid in owners.items() if pid != victim]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        new: list[int] = []
        while not new:
            assert time.monotonic() < deadline, serving.log
            new = [pid for pid in serving.workers() if pid not in first]
            time.sleep(0.01)
        serving.wait_for_log(rf'msg="worker ready" event=start pid={new[0]}\b')
        for sock in held:
            if sock not in survivors:
                sock.close()
        again, refused = admitted(port, PER_CLIENT + 2)
        assert (len(again), refused) == (PER_CLIENT - len(survivors), 2 + len(survivors)), serving.log
        for sock in survivors + again:
            sock.close()
        assert serving.stop() == 0, serving.log


def default_workers_config(folder: Path, next_hop: int) -> Path:
    """The example config as workers_config makes it, with no `workers` line: the default."""
    path = workers_config(folder, 1, next_hop)
    text = path.read_text()
    assert "workers = 1\n" in text
    path.write_text(text.replace("workers = 1\n", ""))
    return path


@pytest.mark.parametrize(("cpus", "processes"), [("0", 1), ("0,1", 2)])
def test_without_a_workers_setting_serve_runs_one_process_per_cpu(
    tmp_path: Path,
    keyring_file: keystore.KeyringFile,  # noqa: F811
    cpus: str,
    processes: int,
) -> None:
    """`workers = "auto"` is the default (issue 14): one worker per CPU serve may run on; on one CPU, one
    process that serves itself, as `workers = 1`."""
    with Supervised(tmp_path, default_workers_config(tmp_path, free_port()), cpus=cpus) as serving:
        if processes == 1:
            serving.wait_for_log(r"msg=ready event=start")
            assert serving.workers() == [], "one process, no main process apart"
        else:
            serving.wait_ready()
            assert f'msg="workers ready" event=start workers={processes}' in serving.log
            assert len(serving.workers()) == processes
        session(serving.port("mx"))
        assert serving.stop() == 0, serving.log
    assert "level=warning" not in serving.log and "Traceback" not in serving.log, serving.log


def unmakeable_state(folder: Path, workers: str) -> Path:
    """A config that one process runs: the ledger off and the [state] file where it cannot be made (as
    beside a keyring in a read-only /etc)."""
    path = default_workers_config(folder, free_port())
    text = path.read_text()
    state = f'path = "{folder}/state.sqlite"'
    for old, new in [
        ("enabled = true ", "enabled = false "),
        (state, f'path = "{folder}/missing/state.sqlite"'),
        ("[gateway]\n", f"[gateway]\n{workers}"),
    ]:
        assert old in text, f"the example config changed: {old!r} is gone; update this test"
        text = text.replace(old, new, 1)
    path.write_text(text)
    return path


def test_auto_workers_without_a_state_file_fall_back_to_one_process_with_one_warning(
    tmp_path: Path,
    keyring_file: keystore.KeyringFile,  # noqa: F811
) -> None:
    with Supervised(tmp_path, unmakeable_state(tmp_path, ""), cpus="0,1") as serving:
        serving.wait_for_log(r"msg=ready event=start")
        assert serving.workers() == [], "one process"
        session(serving.port("mx"))
        os.kill(serving.process.pid, signal.SIGHUP)
        # The files are as they were: a reload says so, not that "workers" changed (2 wanted, 1 running).
        serving.wait_for_log(r'msg="reload: nothing changed"')
        assert serving.stop() == 0, serving.log
    warnings = [line for line in serving.log.splitlines() if "level=warning" in line]
    missing = tmp_path / "missing" / "state.sqlite"
    (warning,) = warnings
    assert '[gateway] workers = \\"auto\\" would run 2 workers' in warning, warning
    assert f"{missing}" in warning and "serving with 1 worker" in warning and "[state] path" in warning
    assert "Traceback" not in serving.log


def test_a_number_of_workers_without_a_state_file_stops_start_up_with_one_line(tmp_path: Path) -> None:
    keystore.save(tmp_path / "keyring.toml", keystore.new_keyring(datetime.now(UTC)))
    config = unmakeable_state(tmp_path, "workers = 2\n")
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 2, run.stderr
    (error,) = [line for line in run.stderr.splitlines() if "error" in line]
    missing = tmp_path / "missing" / "state.sqlite"
    assert error.startswith(f"batv-gateway: error: {config}: [state] path: cannot make {missing} "), error
    assert "[gateway] workers = 2" in error and "or set [gateway] workers = 1" in error, error
    assert "Traceback" not in run.stderr and "worker died" not in run.stderr, run.stderr
