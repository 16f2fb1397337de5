"""A private, real Postfix instance (and smtp-sink) for tests, run as root on this machine.

Each `PostfixInstance` has its own config_directory, queue_directory and data_directory under one fresh
folder, listens only on 127.0.0.1 ports chosen free at run time, and is started and stopped by the test. It
never touches /etc/postfix, so it coexists with the Debian default instance (which ships without a main.cf
here and stays stopped) and with other tests' instances.

What a private instance needs, found by trying it on Debian 12 with Postfix 3.7 (no systemd):
- `postfix -c DIR start` as root needs no `alternate_config_directories` in a default main.cf: that check
  only guards set-gid programs (postdrop), so mail is submitted over SMTP and never through sendmail(1).
- `postfix start` creates the queue sub-folders itself, but `data_directory` must already exist and be owned
  by `mail_owner`, or master cannot take its lock ("open lock file .../master.lock: Permission denied").
- The postfix user must be able to search every folder above `data_directory`. pytest's own temp folders
  are 0700 (and another pytest run re-tightens them at start), so the instance lives in its own 0711
  folder from `tempfile.mkdtemp`; the fixture copies the mail log into the test's tmp_path at teardown.
- Debian's master.cf chroots most services; a chroot needs copies of /etc files, so ours runs none chrooted.
- There is no syslog in a container: `maillog_file` with the `postlog` service writes the log to a file,
  and `maillog_file_prefixes` must allow its folder.
- `postfix stop` only signals master and returns at once, so `stop()` waits for every process whose
  working folder is inside the instance (all Postfix daemons chdir to the queue) to be gone.
- master exits without waiting for its children, and the daemonised master's parent is gone, so they are
  all orphans. In a container whose PID 1 is no init nothing reaps them and they stay zombies; so the test
  process makes itself their child subreaper (prctl(2)) and reaps exactly the pids it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
POSTMAP = "/usr/sbin/postmap"
SMTP_SINK = "/usr/sbin/smtp-sink"
POSTSRSD = "/usr/sbin/postsrsd"
SWAKS = "/usr/bin/swaks"

REPO = Path(__file__).resolve().parent.parent
DEPLOY_POSTFIX = REPO / "deploy" / "postfix"

# The services a relay-only instance uses, none chrooted (see the module docstring). The smtpd listener
# is added in front of these with its loopback port.
BASE_MASTER_CF = """\
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphans of our descendants (the daemonised master and its children) become our children, so that
    `stop()` can reap them (see the module docstring). Linux only; harmless to call twice."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def reap(pids: Sequence[int]) -> None:
    """Collect the exit status of those pids that are our (adopted) children and have exited."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def children(pid: int) -> dict[int, str]:
    """Every child of pid, with its state letter from /proc (R, S, ..., Z for exited but unreaped)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # After the last ")": the command name may itself hold spaces and parentheses.
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if ppid == str(pid):
                found[int(entry)] = state
    return found


def live_children(pid: int) -> list[int]:
    """The children of pid that have not exited (a zombie has, and only waits to be reaped)."""
    return [child for child, state in children(pid).items() if state != "Z"]


def zombie_children() -> list[int]:
    """Our exited but unreaped children: stop() must leave none (see the module docstring)."""
    return [child for child, state in children(os.getpid()).items() if state == "Z"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for programs that cannot be told to bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


def parse_main_cf(text: str) -> dict[str, str]:
    """main.cf lines → {parameter: value}, as Postfix reads them: '#' lines are comments, a line that starts
    with white space continues the previous one, and a later setting of a parameter wins."""
    params: dict[str, str] = {}
    logical: list[str] = []
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0].isspace() and logical:
            logical[-1] += " " + raw.strip()
        else:
            logical.append(raw.strip())
    for line in logical:
        name, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"not a main.cf setting: {line!r}")
        params[name.strip()] = value.strip()
    return params


def load_snippet(path: Path, replace: Mapping[str, str] | None = None) -> str:
    """A deploy snippet's text, with documented addresses swapped for the ones a test really uses.

    Tests load the files shipped in deploy/postfix/ (never a copy); only a listening address such as
    "127.0.0.1:10030" changes, because tests must not take fixed ports.
    """
    text = path.read_text()
    for old, new in (replace or {}).items():
        if old not in text:
            raise ValueError(f"{path.name} does not contain {old!r}: the snippet and the test disagree")
        text = text.replace(old, new)
    return text


class PostfixError(RuntimeError):
    pass


@dataclass
class PostfixInstance:
    """One private Postfix instance. Configure, then `start()`; `stop()` (or the context manager) always
    leaves no process behind.

    main: extra main.cf settings (they override the defaults); master: extra master.cf lines (appended).
    """

    root: Path
    hostname: str = "mx.test"
    mynetworks: str = "127.0.0.0/8"
    relayhost: str = ""
    mydestination: str = ""
    main: dict[str, str] = field(default_factory=dict)
    master: list[str] = field(default_factory=list)
    smtp_port: int = 0  # 0: chosen free at start()
    _master_pid: int | None = field(default=None, init=False, repr=False)
    stopped_pids: list[int] = field(default_factory=list, init=False, repr=False)  # what stop() waited for

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "spool"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "maillog"

    @property
    def running(self) -> bool:
        return self._master_pid is not None

    # --- configuration ------------------------------------------------------------------------------
    def defaults(self) -> dict[str, str]:
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "myhostname": self.hostname,
            "myorigin": "$myhostname",
            "mydestination": self.mydestination,
            "mynetworks": self.mynetworks,
            "relayhost": self.relayhost,
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": str(self.root),
            # No local delivery: no aliases to open (there is no /etc/aliases.db here).
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            # Tests wait on the queue: retry quickly, never delay a client because the queue is busy.
            "in_flow_delay": "0",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtpd_banner": "$myhostname ESMTP",
        }

    def add_main(self, text: str) -> None:
        """Merge main.cf text (a deploy snippet, say) into the settings; later settings win."""
        self.main.update(parse_main_cf(text))

    def add_master(self, text: str) -> None:
        self.master.extend(text.rstrip("\n").splitlines())

    def write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        params = self.defaults() | self.main
        (self.config_dir / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in params.items()))
        smtpd = f"127.0.0.1:{self.smtp_port} inet n - n - - smtpd\n"
        extra = "".join(line + "\n" for line in self.master)
        (self.config_dir / "master.cf").write_text(smtpd + BASE_MASTER_CF + extra)
        # Postfix re-reads a main.cf changed in the last two seconds, 300 ms at a time, until it is that old
        # (it may be half written); backdating ours saves each command those two seconds.
        past = time.time() - 10
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))

    def _prepare(self) -> None:
        if os.geteuid() != 0:
            raise PostfixError("a private Postfix instance runs as root (postfix start, chown to postfix)")
        # The postfix user must search down to data_directory (see the module docstring).
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)
        self.queue_dir.mkdir(exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        shutil.chown(self.data_dir, user="postfix")
        self.data_dir.chmod(0o700)

    # --- commands -----------------------------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise PostfixError(
                f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}\n{self.log_tail()}"
            )
        return proc

    def postconf(self, *args: str) -> str:
        return self.run(POSTCONF, "-c", str(self.config_dir), *args).stdout

    def configure(self) -> PostfixInstance:
        """Write the folders and config without starting: enough for postmap, postconf, postfix check."""
        self._prepare()
        self.write_config()
        return self

    def check(self) -> str:
        """`postfix check`: raises on an error, returns its warnings (stderr), which should be empty."""
        self.configure()
        return self.run(POSTFIX, "-c", str(self.config_dir), "check").stderr

    def postmap_query(self, key: str, table: str) -> str | None:
        """`postmap -q KEY TABLE` with this instance's config: the value, or None when not found (exit 1).
        A lookup error (exit 2 and above, a TEMP or PERM answer say) raises PostfixError."""
        proc = self.run(POSTMAP, "-c", str(self.config_dir), "-q", key, table, check=False)
        if proc.returncode == 0:
            return proc.stdout.rstrip("\n")
        if proc.returncode == 1 and not proc.stderr.strip():
            return None
        raise PostfixError(f"postmap -q {key} {table} exited {proc.returncode}: {proc.stderr.strip()}")

    # --- life cycle ---------------------------------------------------------------------------------
    def start(self, attempts: int = 3) -> None:
        if self.running:
            raise PostfixError("this instance is already running")
        self._prepare()
        become_subreaper()
        choose_port = self.smtp_port == 0
        for attempt in range(attempts):
            if choose_port:
                self.smtp_port = free_port()
            self.write_config()
            proc = self.run(POSTFIX, "-c", str(self.config_dir), "start", check=False)
            if proc.returncode == 0:
                break
            self._reap()  # a failed start may leave a half-started master behind
            if choose_port and attempt + 1 < attempts and "in use" in self.log_tail():
                continue  # another test took the port between free_port() and master's bind
            raise PostfixError(f"postfix start failed: {proc.stderr.strip()}\n{self.log_tail()}")
        # `master -w` (what `postfix start` runs) returns once master is up; wait for the smtpd banner too.
        self._master_pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        self.wait_ready()

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=2.0) as s:
                    banner = s.makefile("rb").readline()
                    s.sendall(b"QUIT\r\n")
                if banner.startswith(b"220"):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise PostfixError(f"smtpd on port {self.smtp_port} not ready after {timeout}s")
            time.sleep(0.02)

    def reload(self) -> None:
        self.write_config()
        self.run(POSTFIX, "-c", str(self.config_dir), "reload")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop master and wait until no process of this instance is left (SIGKILL after `timeout`)."""
        seen = self.processes()
        if self.running:
            self.run(POSTFIX, "-c", str(self.config_dir), "stop", check=False)
        left = self._reap(timeout, seen)
        self._master_pid = None
        if left:
            raise PostfixError(f"Postfix processes {left} outlived stop and were killed")

    def processes(self) -> list[int]:
        """Live processes whose working folder is inside this instance (every Postfix daemon chdirs to
        its queue_directory; zombies have no working folder and are gone for our purposes)."""
        found = []
        root = str(self.root.resolve())
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cwd == root or cwd.startswith(root + "/"):
                found.append(int(entry))
        return found

    def _reap(self, timeout: float = 10.0, seen_before: Sequence[int] = ()) -> list[int]:
        seen = set(seen_before) | set(self.processes())
        if self._master_pid is not None:
            seen.add(self._master_pid)
        deadline = time.monotonic() + timeout
        while (pids := self.processes()) and time.monotonic() < deadline:
            seen.update(pids)
            reap(sorted(seen))
            time.sleep(0.02)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01 if pids else 0)
        reap(sorted(seen))
        self.stopped_pids = sorted(seen)
        return pids

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- observing ----------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            if time.monotonic() > deadline:
                raise TimeoutError(f"no log line matches {pattern!r} after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def queue_ids(self) -> list[str]:
        """Queue ids of messages still in the queue (any state)."""
        out = self.run("/usr/sbin/postqueue", "-c", str(self.config_dir), "-j", check=False).stdout
        return re.findall(r'"queue_id": "([0-9A-F]+)"', out)


@dataclass(frozen=True)
class SinkMessage:
    """One transaction as smtp-sink dumped it: the envelope it received, then the message."""

    mail_from: str
    rcpts: tuple[str, ...]
    data: str
    path: Path


@dataclass
class SmtpSink:
    """Postfix's smtp-sink on a loopback port, dumping each transaction to a file.

    reject_hard / reject_soft: SMTP commands it refuses with 5xx / 4xx (smtp-sink -f / -r), e.g. ("RCPT",).
    """

    root: Path
    reject_hard: Sequence[str] = ()
    reject_soft: Sequence[str] = ()
    extra_args: Sequence[str] = ()
    port: int = 0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def dump_dir(self) -> Path:
        return self.root / "sink"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.dump_dir.mkdir(exist_ok=True)
        # smtp-sink drops to -u USER after binding (root is refused): that user writes the dumps.
        shutil.chown(self.dump_dir, user="postfix")
        self.root.chmod(self.root.stat().st_mode | 0o011)
        if self.port == 0:
            self.port = free_port()
        argv = [SMTP_SINK, "-u", "postfix", "-d", f"{self.dump_dir}/%H%M%S."]
        if self.reject_hard:
            argv += ["-f", ",".join(self.reject_hard)]
        if self.reject_soft:
            argv += ["-r", ",".join(self.reject_soft)]
        argv += [*self.extra_args, f"127.0.0.1:{self.port}", "100"]
        self._proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            raise

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        self._proc = None

    def __enter__(self) -> SmtpSink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _open_files(self) -> set[str]:
        # smtp-sink keeps a dump open for as long as its transaction lasts: an open dump is incomplete.
        if self._proc is None:
            return set()
        fd_dir = Path(f"/proc/{self._proc.pid}/fd")
        names = set()
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                names.add(os.readlink(fd))
        return names

    def messages(self) -> list[SinkMessage]:
        """The transactions smtp-sink has finished, oldest first."""
        busy = self._open_files()
        found = []
        for path in sorted(self.dump_dir.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name)):
            if str(path) in busy:
                continue
            text = path.read_text(errors="replace")
            mail = re.search(r"^X-Mail-Args: <([^>]*)>", text, re.M)
            rcpts = tuple(re.findall(r"^X-Rcpt-Args: <([^>]*)>", text, re.M))
            if mail is None:
                continue
            found.append(SinkMessage(mail.group(1), rcpts, text, path))
        return found

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[SinkMessage]:
        deadline = time.monotonic() + timeout
        while len(found := self.messages()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"smtp-sink holds {len(found)} of {count} messages after {timeout}s")
            time.sleep(0.05)
        return found


class ServerThread:
    """An asyncio server run in a thread of its own, so that a test can call blocking programs (postmap,
    swaks, smtplib) against it. `start` is a coroutine function returning the started asyncio.Server;
    `on_stop` (optional) runs in the loop before the server closes, to close open connections."""

    def __init__(
        self,
        start: Callable[[], Awaitable[asyncio.Server]],
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self._start = start
        self._on_stop = on_stop
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-server", daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def call(self, fn: Callable[[], T]) -> T:
        """Run fn in the server's loop (to read its state safely)."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            if self._on_stop is not None:
                self._on_stop()
            await self._server.wait_closed()
            # Let the closed connections' handlers finish before the loop stops.
            for _ in range(3):
                await asyncio.sleep(0)
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if pending:
                await asyncio.wait(pending, timeout=5)

        try:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


def new_root(prefix: str = "batv-postfix-") -> Path:
    """A fresh 0711 folder for an instance (see the module docstring for why not pytest's tmp_path)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o711)
    return root


@contextlib.contextmanager
def private_root(keep_log_in: Path | None = None) -> Iterator[Path]:
    """A fresh instance folder, removed afterwards; the mail log (if any) is copied to `keep_log_in`."""
    root = new_root()
    try:
        yield root
    finally:
        log = root / "maillog"
        if keep_log_in is not None and log.exists():
            keep_log_in.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, keep_log_in / "maillog")
        shutil.rmtree(root, ignore_errors=True)
