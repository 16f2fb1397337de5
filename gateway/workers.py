"""`[gateway] workers = N`: N processes serving the same ports (SO_REUSEPORT), shared by serve and socketmap.

One Python process uses one CPU; the kernel spreads new connections over N processes that each hold their
own listening socket on the port (one shared socket lets whichever process wakes first take them all).
The main process binds and announces every port once, before the fork, so that port 0 in a config works.

The main process is the service (systemd's MAINPID): it passes SIGTERM and SIGHUP on to the workers,
waits until every worker is up before it says READY, and reaps them when it stops, so that none is left
behind. A signal that arrives before a process's event loop handles it (start-up takes a moment, and a
worker can be signalled as soon as it is forked) is remembered here and replayed once the loop is up:
without that, an early SIGHUP or SIGTERM would kill the main process by default and orphan its workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import select
import signal
import socket
import time
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_early_signals: list[int] = []


def _remember(signum: int, frame: object) -> None:
    _early_signals.append(signum)


def remember_signals() -> None:
    """Call first thing in a command that may fork: signals are queued until `replay_signals`."""
    for sig in SIGNALS:
        signal.signal(sig, _remember)


def replay_signals(stop: Callable[[], None], reload: Callable[[], None]) -> None:
    """Once the loop's own handlers are installed: handle what arrived before, in order."""
    while _early_signals:
        (reload if _early_signals.pop(0) == signal.SIGHUP else stop)()


def bind(host: str, port: int, shared: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1024, reuse_port=shared)
    sock.setblocking(False)
    return sock


def own_socket(sock: socket.socket) -> socket.socket:
    """A worker's own listening socket on the port the main process bound (see the module docstring).
    The inherited copy is closed in this process only; the main process keeps serving on it."""
    host, port = sock.getsockname()[:2]
    mine = socket.create_server((host, port), family=sock.family, backlog=1024, reuse_port=True)
    mine.setblocking(False)
    sock.close()
    return mine


def run(main: Coroutine[Any, Any, int]) -> int:
    """Run `main` on uvloop when the optional "fast" extra is installed (its transports cut the
    per-connection and per-read overhead: bench/README.md), else on stdlib asyncio."""
    try:
        # Imported by name so that type checking does not need it installed.
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.run(main)
    return int(uvloop.run(main))


@dataclass
class Workers:
    """The main process's view of its workers: pids and their ready pipes."""

    pids: list[int] = field(default_factory=list)
    _ready_fds: list[int] = field(default_factory=list)

    def pass_on(self, sig: signal.Signals) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Block until every worker has said it is up (or has died: its pipe closes unwritten).
        True when all of them are up. Called once, at start-up, before READY=1."""
        pending = list(self._ready_fds)
        ok = True
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            readable, _, _ = select.select(pending, [], [], left)
            for fd in readable:
                data = os.read(fd, 1)
                ok = ok and data == b"1"
                os.close(fd)
                pending.remove(fd)
        self._ready_fds.clear()
        return ok

    def reap(self, timeout: float = 30.0) -> None:
        """Stop every worker (SIGTERM: a drain; a second one, after the main process passed it on, is
        harmless) and wait for it to exit; after `timeout`, kill what is left. SIGTERM here too, so
        that a main process leaving by an error rather than a signal does not wait on busy workers."""
        for fd in self._ready_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._ready_fds.clear()
        self.pass_on(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for pid in self.pids:
            while True:
                with contextlib.suppress(ChildProcessError):
                    done, _ = os.waitpid(pid, os.WNOHANG)
                    if done == 0 and time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                    if done == 0:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                break


def fork(count: int, worker: Callable[[Callable[[], None]], int]) -> Workers:
    """Fork `count` workers. Each runs `worker(say_ready)` and exits with its result, never returning into
    the caller's code; `say_ready()` tells the main process it is serving (Workers.wait_ready)."""
    workers = Workers()
    for _ in range(count):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            for fd in workers._ready_fds:  # the earlier workers' pipes belong to the main process
                os.close(fd)
            _early_signals.clear()  # the main process's, not ours
            code = 1

            def say_ready(fd: int = write_fd) -> None:
                with contextlib.suppress(OSError):
                    os.write(fd, b"1")
                    os.close(fd)

            try:
                code = worker(say_ready)
            except BaseException:
                traceback.print_exc()
            finally:
                # os._exit skips atexit, and with it logging.shutdown(): log lines still held for the
                # end of an event-loop turn (logs.BatchingStreamHandler) must not die with the worker.
                with contextlib.suppress(Exception):
                    logging.shutdown()
                os._exit(code)
        os.close(write_fd)
        workers.pids.append(pid)
        workers._ready_fds.append(read_fd)
    return workers
