"""`[gateway] workers = N`: N processes serving the same ports (SO_REUSEPORT), shared by serve and socketmap.

One Python process uses one CPU; the kernel spreads new connections over N processes that each hold their
own listening socket on the port (one shared socket lets whichever process wakes first take them all).
The main process binds and announces every port once, before the fork, so that port 0 in a config works.

The main process is the service (systemd's MAINPID): it passes SIGTERM and SIGHUP on to the workers,
waits until every worker is up before it says READY, and reaps them when it stops, so that none is left
behind. A signal that arrives before a process's event loop handles it (start-up takes a moment, and a
worker can be signalled as soon as it is forked) is remembered here and replayed once the loop is up:
without that, an early SIGHUP or SIGTERM would kill the main process by default and orphan its workers.

Two shapes share this module:
- `fork` (socketmap): the main process forks N - 1 workers before its own event loop starts, then serves
  too. It cannot replace a worker that dies: a fork from inside a running event loop hands the child the
  parent's loop (its epoll set, its signal wake-up socket, uvloop's libuv state), and the child's first
  signal or closed socket would reach the parent's loop.
- `supervise` (serve): the main process serves no mail and runs no event loop. It forks N workers, each of
  which starts its own fresh loop, and then only waits: for SIGCHLD, SIGTERM, SIGHUP and the workers'
  ready pipes, in a plain select(). Nothing in it is running when it forks, so a dead worker is replaced at
  once by a child as clean as the first ones. Its ports are `reserve`d: bound, so that they are ours and
  port 0 is one port, but never listening, since a listening socket that nobody accepts on would take its
  share of the connections and leave them unanswered. A worker that keeps dying is not forked for ever: past
  `respawn_limit` deaths in `respawn_window` seconds the main process stops everything and exits 1, so that
  systemd (Restart=on-failure) starts the whole service again, and says so in one line.

Each supervised worker has a slot, 0 .. N - 1 (`worker_slot`), and a replacement takes the dead worker's:
the session limits (`max_sessions`, `max_sessions_per_client`) are counted per slot in a table in shared
memory (sessiontable.py), and `clear_slot(slot)` zeroes a dead worker's counts before its replacement
starts, so a worker killed with sessions open leaks none. Per-session limits (error counts, sizes,
timeouts) are exact, since a session lives in one worker. The failed-guess budget and the null-sender rate
are shared through the [state] store (state.py: SQLite on one host, Redis for a fleet), and the metrics
through metrics.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import logging
import os
import select
import signal
import socket
import time
import traceback
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.logs import log_fields
from .sdnotify import Notifier

_log = logging.getLogger("gateway.workers")

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_early_signals: list[int] = []
_worker_slot: int | None = None  # set in a supervised worker by the fork that made it


def worker_slot() -> int:
    """This supervised worker's slot (0 .. N - 1): its own, or the one of the dead worker it replaces."""
    if _worker_slot is None:
        raise RuntimeError("not a supervised worker")
    return _worker_slot


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


def ignore_from_now_on(loop: asyncio.AbstractEventLoop, signals: Iterable[int]) -> None:
    """Once a command is stopping: a further SIGTERM (an impatient stop, or timeout(1) signalling the
    process and then its group) must not take the default action before the cleanup is done. Removing the
    loop's handlers would restore that action at once, so each is replaced in place by one that ignores the
    signal; closing the loop restores the defaults, when nothing is left to clean up."""
    for sig in signals:
        loop.add_signal_handler(sig, _ignore)


def _ignore() -> None:
    pass


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
    """Run `main` on uvloop (a dependency) when it can be imported (its transports cut the
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
        # The earlier workers' pipes belong to the main process.
        pid, read_fd = _spawn(worker, close_in_child=workers._ready_fds)
        workers.pids.append(pid)
        workers._ready_fds.append(read_fd)
    return workers


def _spawn(
    worker: Callable[[Callable[[], None]], int], close_in_child: Sequence[int], slot: int | None = None
) -> tuple[int, int]:
    """Fork one worker (in `slot`, when supervised): its pid, and the read end of its ready pipe."""
    read_fd, write_fd = os.pipe()
    # Blocked across the fork: a signal for the new worker must not run the main process's handler in it
    # (the supervisor's would write into the supervisor's wake-up pipe); it waits, and is remembered below.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {*SIGNALS, signal.SIGCHLD})
    pid = os.fork()
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(write_fd)
        return pid, read_fd
    code = 1
    global _worker_slot
    _worker_slot = slot
    try:
        os.close(read_fd)
        for fd in close_in_child:
            with contextlib.suppress(OSError):
                os.close(fd)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _early_signals.clear()  # the main process's, not ours
        remember_signals()
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

        def say_ready(fd: int = write_fd) -> None:
            with contextlib.suppress(OSError):
                os.write(fd, b"1")
                os.close(fd)

        code = worker(say_ready)
    except BaseException:
        traceback.print_exc()
    finally:
        # os._exit skips atexit, and with it logging.shutdown(): log lines still held for the
        # end of an event-loop turn (logs.BatchingStreamHandler) must not die with the worker.
        with contextlib.suppress(Exception):
            logging.shutdown()
        os._exit(code)


# Workers that die more often than this (or than there are workers, if more) are broken (a bad file, a
# missing library), not unlucky; the floor lets one event that kills several at once (an admin's kill) pass.
RESPAWN_LIMIT = 5
RESPAWN_WINDOW = 60.0


def reserve(host: str, port: int) -> socket.socket:
    """A port for `supervise`: bound with SO_REUSEPORT but not listening (see the module docstring).
    Each worker listens on it with its own socket (`own_socket`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:  # as socket.create_server does, and so own_socket
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def describe(status: int) -> str:
    """A wait status as an operator reads it: "SIGKILL", "exit 3"."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


class _Supervisor:
    def __init__(
        self,
        count: int,
        worker: Callable[[Callable[[], None]], int],
        notifier: Notifier,
        on_exit: Callable[[int], None],
        clear_slot: Callable[[int], None],
        respawn_limit: int,
        respawn_window: float,
        stop_timeout: float,
        wake_fd: int,
    ) -> None:
        self.count = count
        self.worker = worker
        self.notifier = notifier
        self.on_exit = on_exit
        self.clear_slot = clear_slot
        self.respawn_limit = respawn_limit
        self.respawn_window = respawn_window
        self.stop_timeout = stop_timeout
        self.wake_fd = wake_fd
        self.pids: list[int] = []
        self.slots: dict[int, int] = {}  # pid -> its slot
        self.ready: set[int] = set()
        self.ready_fds: dict[int, int] = {}  # read end of a ready pipe -> the worker's pid
        self.deaths: collections.deque[float] = collections.deque()
        self.announced = False
        self.stopping = False
        self.kill_at: float | None = None
        self.code = 0

    def spawn(self, slot: int) -> int:
        pid, read_fd = _spawn(self.worker, close_in_child=[self.wake_fd, *self.ready_fds], slot=slot)
        self.pids.append(pid)
        self.slots[pid] = slot
        self.ready_fds[read_fd] = pid
        return pid

    def pass_on(self, sig: signal.Signals) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def stop(self, code: int = 0) -> None:
        """No replacement from now on: every worker drains (SIGTERM), and after `stop_timeout` is killed."""
        self.code = self.code or code
        if self.stopping:
            return
        self.stopping = True
        self.notifier.stopping()
        self.pass_on(signal.SIGTERM)
        self.kill_at = time.monotonic() + self.stop_timeout

    def reload(self) -> None:
        """SIGHUP: every worker reloads on its own. systemd's Type=notify-reload waits for RELOADING=1 and
        then READY=1 from the main process: both at once, as the workers do not report back (a refused
        reload is in each worker's log and in batv_last_reload_success)."""
        self.pass_on(signal.SIGHUP)
        if self.announced:
            self.notifier.reloading()
            self.notifier.ready(status=f"serving: {self.count} workers")

    def on_ready(self, fd: int) -> None:
        pid = self.ready_fds.pop(fd)
        try:
            said = os.read(fd, 1)
        except OSError:
            said = b""
        os.close(fd)
        if said != b"1" or pid not in self.pids:
            return  # it died before it served: reap() sees to it
        self.ready.add(pid)
        if not self.announced and len(self.ready) == self.count:
            self.announced = True
            self.notifier.ready(status=f"serving: {self.count} workers")
            log_fields(_log, logging.INFO, "workers ready", event="start", workers=self.count)
        elif self.announced:
            log_fields(_log, logging.INFO, "worker ready", event="start", pid=pid)

    def reap(self) -> None:
        for pid in list(self.pids):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: gone all the same
                done, status = pid, 0
            if done == 0:
                continue
            self.pids.remove(pid)
            self.ready.discard(pid)
            for fd, owner in list(self.ready_fds.items()):
                if owner == pid:
                    os.close(fd)
                    del self.ready_fds[fd]
            self.on_exit(pid)
            # Dead and reaped: nothing writes its slot any more, and the replacement has not begun to.
            slot = self.slots.pop(pid)
            self.clear_slot(slot)
            if self.stopping:
                continue
            now = time.monotonic()
            self.deaths.append(now)
            while self.deaths and self.deaths[0] < now - self.respawn_window:
                self.deaths.popleft()
            if len(self.deaths) > self.respawn_limit:
                log_fields(
                    _log,
                    logging.ERROR,
                    "workers keep dying: stopping the service",
                    event="stop",
                    pid=pid,
                    status=describe(status),
                    deaths=len(self.deaths),
                    window=f"{self.respawn_window:g}s",
                )
                self.stop(1)
                continue
            new = self.spawn(slot)
            # The replacement starts from the config and keyring the main process read at start-up;
            # a reload (remembered by the child and replayed once its loop is up) brings it to the files
            # as they are now, where SIGHUP and the keyring watch brought the others.
            os.kill(new, signal.SIGHUP)
            log_fields(
                _log, logging.WARNING, "worker died", pid=pid, status=describe(status), replaced_by=new
            )

    def kill_the_rest(self) -> None:
        """Past the drain deadline: what has not stopped is killed (and reaped at once)."""
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.reap()

    def run(self, pending: list[int]) -> int:
        for slot in range(self.count):
            self.spawn(slot)
        while self.pids or not self.stopping:
            # A second's timeout: a lost wake-up costs at most that long (waitpid finds the dead anyway).
            timeout = 0.0 if pending else 1.0  # signals remembered before the wake-up pipe was set
            if self.kill_at is not None:
                timeout = max(0.0, min(timeout, self.kill_at - time.monotonic()))
            readable, _, _ = select.select([self.wake_fd, *self.ready_fds], [], [], timeout)
            if self.wake_fd in readable:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self.wake_fd, 512):
                        pass
            arrived = []
            while pending:  # one pop at a time: a signal handled between two steps stays for the next turn
                arrived.append(pending.pop(0))
            # A stop first: systemd signals the main process and its workers at once, and a worker that
            # drained and exited must not look like one that died.
            if signal.SIGTERM in arrived or signal.SIGINT in arrived:
                self.stop()
            if signal.SIGHUP in arrived and not self.stopping:
                self.reload()
            for fd in readable:
                if fd in self.ready_fds:
                    self.on_ready(fd)
            self.reap()
            if self.kill_at is not None and self.pids and time.monotonic() >= self.kill_at:
                self.kill_the_rest()
        return self.code


def supervise(
    count: int,
    worker: Callable[[Callable[[], None]], int],
    *,
    notifier: Notifier,
    on_exit: Callable[[int], None] = lambda pid: None,
    clear_slot: Callable[[int], None] = lambda slot: None,
    respawn_limit: int | None = None,
    respawn_window: float = RESPAWN_WINDOW,
    stop_timeout: float = 30.0,
) -> int:
    """Run `count` workers (each `worker(say_ready)`, as `fork`) until SIGTERM or SIGINT, replacing any
    that dies (the replacement is sent SIGHUP: a reload, and takes the dead worker's slot, `worker_slot`);
    `on_exit(pid)` is told of each worker gone, and `clear_slot(slot)` of its slot, before a replacement.
    `notifier` (sdnotify.Notifier) hears READY once every worker is up and STOPPING with the first
    SIGTERM. 0 after a clean stop, 1 past `respawn_limit` deaths (max(RESPAWN_LIMIT, count) by default) in
    `respawn_window` seconds (see the module docstring)."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    pending: list[int] = []

    def handler(signum: int, frame: object) -> None:
        pending.append(signum)

    watched = (*SIGNALS, signal.SIGCHLD)
    previous = {sig: signal.signal(sig, handler) for sig in watched}
    # What came before these handlers (remember_signals), ahead of what comes after.
    pending[:0] = _early_signals
    _early_signals.clear()
    previous_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    if respawn_limit is None:
        respawn_limit = max(RESPAWN_LIMIT, count)
    supervisor = _Supervisor(
        count, worker, notifier, on_exit, clear_slot, respawn_limit, respawn_window, stop_timeout, wake_r
    )
    try:
        return supervisor.run(pending)
    finally:
        supervisor.stop()
        supervisor.kill_the_rest()
        signal.set_wakeup_fd(previous_wakeup)
        for sig, action in previous.items():
            signal.signal(sig, action)
        os.close(wake_r)
        os.close(wake_w)
