"""A real redis-server for tests: a unix socket in a fresh temp folder, no persistence, stopped at teardown.

redis-server cannot pick a free TCP port itself (`--port 0` means no TCP at all), so the tests use a unix
socket, which also needs no port at all. `stop()` kills it the way an outage does (SIGKILL, no goodbye to
the clients) and `start()` brings a new one up on the same socket, empty, as after a restart without
persistence.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket = folder / "redis.sock"
        self.url = f"unix://{self.socket}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self._proc is None, "already running"
        self.socket.unlink(missing_ok=True)
        self._proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", "0",
                "--unixsocket", str(self.socket),
                "--unixsocketperm", "700",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.folder),
                "--loglevel", "warning",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not self._answers():
            if self._proc.poll() is not None:
                out = self._proc.stdout.read().decode() if self._proc.stdout else ""
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {out}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not answer PING within 20 s")
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(1)
                sock.connect(str(self.socket))
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGKILL: an outage, not a shutdown."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)
            if proc.stdout:
                proc.stdout.close()

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not running"
        return self._proc.pid

    def command(self, *args: str) -> str:
        """redis-cli-like: one command over a fresh connection, the reply as text (tests only)."""
        with redis.Redis(unix_socket_path=str(self.socket), decode_responses=True) as client:
            return str(client.execute_command(*args))


def running_redis() -> Iterator[RedisServer]:
    """The `redis_server` fixture's body (tests/conftest.py)."""
    # A short folder: a unix socket path is at most 107 octets, and pytest's tmp_path can be longer.
    folder = Path(tempfile.mkdtemp(prefix="redis-", dir="/tmp"))
    server = RedisServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
