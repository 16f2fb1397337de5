"""Postfix lookup rates: `batv-gateway socketmap` (socketmap and tcp_table) next to postsrsd 1.10's tcp_table.

    python3 bench/socketmap.py                 # about two and a half minutes
    python3 bench/socketmap.py --seconds 1 --rounds 1   # a quick look
    python3 bench/socketmap.py --no-placement  # without the pinned 1-connection table

Both servers run on 127.0.0.1, started here: our command with a throwaway keyring, and the Debian postsrsd
(`postsrsd -s SECRETFILE -d ALIAS -l 127.0.0.1 -f PORT -r PORT`, foreground) with its own secret file.

A client does what Postfix does: one lookup at a time per connection, waiting for each answer (Postfix's
dict clients never pipeline). "1 connection" is one such client; "N connections" is N client processes at
once (Postfix runs one connection per smtpd or cleanup process). The clients are the same code for every
server, so their own cost is the same on both sides of a ratio; on a machine with few CPUs they compete
with the servers, which is why only ratios measured in the same run mean anything.

The lookups are SRS forward rewrites of a foreign sender (the one operation postsrsd and we share), and
for information our prvs signing of a sender in a signed domain. Each measurement runs for `--seconds`;
rounds alternate the servers, and the figures are medians over rounds. Every answer is checked against the
one expected, so a fast wrong answer counts as a failure, not a lookup. Nothing is asserted about speed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALIAS = "fwd.example.net"
DOMAIN = "example.org"
NEW_KEYS = 200_000  # per client process: more than one measurement asks for, so no key comes back


def keys(pattern: str, client: str) -> list[str]:
    """The senders a client asks about. "repeated": 64 senders over and over, as Postfix asks about a
    site's usual senders (our answer cache serves them); "new": every lookup a sender not seen before in
    the whole run (`client` is unique per client and measurement), which defeats any cache and measures
    the full rewrite each time."""
    scheme, keyspace = pattern.split("/")
    count = 64 if keyspace == "repeated" else NEW_KEYS
    if keyspace == "repeated":
        client = "0"
    if scheme == "prvs":
        return [f"staff{client}x{n}@{DOMAIN}" for n in range(count)]
    return [f"user{client}x{n}@foreign{n % 7}.test" for n in range(count)]


# --- clients (one lookup at a time, as Postfix) ----------------------------------------------------------


def _netstring(payload: bytes) -> bytes:
    return b"%d:%b," % (len(payload), payload)


def socketmap_requests(map_name: str, addresses: list[str]) -> list[bytes]:
    return [_netstring(f"{map_name} {k}".encode()) for k in addresses]


def tcp_requests(addresses: list[str]) -> list[bytes]:
    return [f"get {k}\n".encode() for k in addresses]


def _read_netstring(sock: socket.socket, buf: bytearray) -> bytes:
    while True:
        colon = buf.find(b":")
        if colon > 0:
            end = colon + 1 + int(buf[:colon])
            if len(buf) > end:
                payload = bytes(buf[colon + 1 : end])
                del buf[: end + 1]
                return payload
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        buf += data


def _read_line(sock: socket.socket, buf: bytearray) -> bytes:
    while (nl := buf.find(b"\n")) < 0:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        buf += data
    line = bytes(buf[:nl])
    del buf[: nl + 1]
    return line


def client(
    port: int,
    kind: str,
    pattern: str,
    ok: bytes,
    seconds: float,
    name: str,
    out: mp.Queue,  # type: ignore[type-arg]
    cpus: set[int] | None = None,
) -> None:
    """Ask in a loop for `seconds`; put (lookups per second, wrong answers) on `out`. `cpus`: run only
    there (the placement table)."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    addresses = keys(pattern, name)
    if kind == "socketmap":
        requests, read = socketmap_requests("forward", addresses), _read_netstring
    else:
        requests, read = tcp_requests(addresses), _read_line
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    done = wrong = 0
    total = len(requests)
    batch = 64  # the clock is read once per batch; `total` is a multiple of it
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        # Index arithmetic, not requests[done:][:batch]: that slice copied up to NEW_KEYS references
        # every batch, a client cost only the "new" rows paid (postsrsd's "new" rate read ~40% low).
        first = done % total
        for i in range(first, first + batch):
            sock.sendall(requests[i])
            if not read(sock, buf).startswith(ok):
                wrong += 1
        done += batch
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start
    sock.close()
    out.put((done / elapsed, wrong))


_measurements = 0


def measure(
    port: int,
    kind: str,
    pattern: str,
    ok: bytes,
    connections: int,
    seconds: float,
    cpus: set[int] | None = None,
) -> float:
    """Lookups per second over all connections."""
    global _measurements
    _measurements += 1
    out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    procs = [
        mp.Process(target=client, args=(port, kind, pattern, ok, seconds, f"{_measurements}c{no}", out, cpus))
        for no in range(connections)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join(10)
    wrong = sum(w for _, w in results)
    if wrong:
        raise SystemExit(f"PROBLEM: {wrong} wrong answers from port {port} ({kind}, {pattern})")
    return sum(rate for rate, _ in results)


# --- servers ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass
class Servers:
    work: Path
    ours: subprocess.Popen[str] | None = None
    postsrsd: subprocess.Popen[bytes] | None = None
    socketmap_port: int = 0
    tcp_forward_port: int = 0
    postsrsd_port: int = 0

    def start(self, workers: int) -> None:
        keyring = self.work / "keyring.toml"
        subprocess.run(
            [sys.executable, "-m", "gateway", "keys", "init", "--keyring", str(keyring)],
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        env = os.environ | {"PYTHONPATH": str(ROOT)}
        # [gateway] workers: postsrsd 1.x forks a process per connection, so it uses every CPU too.
        config = self.work / "gateway.toml"
        config.write_text(f"[gateway]\nworkers = {workers}\n")
        args = [
            sys.executable, "-m", "gateway", "socketmap", "--config", str(config),
            "--listen", "127.0.0.1:0", "--tcp-forward", "127.0.0.1:0",
            "--keyring", str(keyring), "--domain", DOMAIN, "--srs-alias", ALIAS,
        ]  # fmt: skip
        self.ours = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        ports: dict[str, int] = {}
        assert self.ours.stderr is not None
        while len(ports) < 2:
            line = self.ours.stderr.readline()
            if not line:
                raise SystemExit("PROBLEM: batv-gateway socketmap did not start")
            found = re.search(r"listen=127\.0\.0\.1:(\d+) serves=\"?([^\"\n]+)", line)
            if found:
                ports[found.group(2)] = int(found.group(1))
        self.socketmap_port = ports["maps forward, reverse"]
        self.tcp_forward_port = ports["map forward"]

        secret = self.work / "postsrsd.secret"
        secret.write_text(secrets.token_urlsafe(24) + "\n")
        secret.chmod(0o600)
        self.postsrsd_port = free_port()
        reverse_port = free_port()
        self.postsrsd = subprocess.Popen(
            ["postsrsd", f"-s{secret}", f"-d{ALIAS}", "-l127.0.0.1", f"-f{self.postsrsd_port}",
             f"-r{reverse_port}", "-4"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_port(self.postsrsd_port)

    def pin(self, cpus: set[int]) -> None:
        """Run both servers, every process and thread of them, only on `cpus` (postsrsd's per-connection
        children inherit it from their parent)."""
        assert self.ours is not None and self.postsrsd is not None
        for pid in _tree(self.ours.pid) + _tree(self.postsrsd.pid):
            for task in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(task), cpus)

    def stop(self) -> None:
        for proc in (self.ours, self.postsrsd):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.ours is not None and self.ours.stderr is not None:
            self.ours.stderr.close()


def _tree(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid] + [p for child in children for p in _tree(int(child))]


PLACEMENTS = (
    # (label, the servers' CPUs, the client's CPUs) on CPUs 0 and 1
    ("same CPU", {0}, {0}),
    ("separate CPUs", {0}, {1}),
)


def placement_table(servers: Servers, rounds: int, seconds: float) -> None:
    """One connection with the servers and the client held on fixed CPUs, for both servers alike.

    One connection is a ping-pong: its rate is mostly how fast each side is woken, and that depends on
    where the scheduler puts the two. When the other CPU is idle it wakes the server there, and on a
    virtual machine a wake-up across CPUs is a trip through the hypervisor. Pinning shows both cases."""
    everywhere = os.sched_getaffinity(0)
    cases = [
        ("postsrsd tcp_table", servers.postsrsd_port, "tcp", "srs/new", b"200 SRS0="),
        ("ours socketmap", servers.socketmap_port, "socketmap", "srs/new", b"OK SRS0="),
        ("postsrsd tcp_table", servers.postsrsd_port, "tcp", "srs/repeated", b"200 SRS0="),
        ("ours socketmap", servers.socketmap_port, "socketmap", "srs/repeated", b"OK SRS0="),
    ]
    results: dict[tuple[str, str, str], list[float]] = {}
    try:
        for r in range(rounds):
            order = cases[r % len(cases) :] + cases[: r % len(cases)]
            for where, server_cpus, client_cpus in PLACEMENTS:
                servers.pin(server_cpus)
                for label, port, kind, pattern, ok in order:
                    rate = measure(port, kind, pattern, ok, 1, seconds, client_cpus)
                    results.setdefault((where, label, pattern), []).append(rate)
    finally:
        servers.pin(everywhere)
    median = {k: statistics.median(v) for k, v in results.items()}
    print()
    print(f"1 connection, pinned (median of {rounds} rounds): servers on CPU 0, the client as named")
    print(f"{'server':20}{'senders':16}" + "".join(f"{where:>22}" for where, _, _ in PLACEMENTS))
    for label, _, _, pattern, _ in cases:
        cells = []
        for where, _, _ in PLACEMENTS:
            rate = median[(where, label, pattern)]
            base = median[(where, "postsrsd tcp_table", pattern)]
            cells.append(f"{rate:10.0f} ({rate / base:4.2f}x)")
        print(f"{label:20}{pattern:16}" + "".join(f"{c:>22}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=4, help="the 'several connections' case")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="our server's processes (default: CPUs)"
    )
    parser.add_argument(
        "--no-placement", action="store_true", help="skip the pinned 1-connection table (needs 2 CPUs)"
    )
    args = parser.parse_args(argv)
    if shutil.which("postsrsd") is None:
        raise SystemExit("postsrsd is not installed (apt-get install postsrsd)")

    work = Path(tempfile.mkdtemp(prefix="bench-socketmap-"))
    servers = Servers(work)
    try:
        servers.start(args.workers)
        # (label, port, protocol, keys, the start of a right answer)
        cases = [
            ("postsrsd tcp_table", servers.postsrsd_port, "tcp", "srs/repeated", b"200 SRS0="),
            ("ours socketmap", servers.socketmap_port, "socketmap", "srs/repeated", b"OK SRS0="),
            ("ours tcp_table", servers.tcp_forward_port, "tcp", "srs/repeated", b"200 SRS0="),
            ("postsrsd tcp_table", servers.postsrsd_port, "tcp", "srs/new", b"200 SRS0="),
            ("ours socketmap", servers.socketmap_port, "socketmap", "srs/new", b"OK SRS0="),
            ("ours tcp_table", servers.tcp_forward_port, "tcp", "srs/new", b"200 SRS0="),
            ("ours socketmap", servers.socketmap_port, "socketmap", "prvs/repeated", b"OK prvs="),
            ("ours socketmap", servers.socketmap_port, "socketmap", "prvs/new", b"OK prvs="),
        ]
        counts = (1, args.connections)
        results: dict[tuple[str, str, int], list[float]] = {}
        for r in range(args.rounds):
            order = cases[r % len(cases) :] + cases[: r % len(cases)]
            for n in counts:
                for label, port, kind, pattern, ok in order:
                    rate = measure(port, kind, pattern, ok, n, args.seconds)
                    results.setdefault((label, pattern, n), []).append(rate)
        median = {k: statistics.median(v) for k, v in results.items()}
        print(
            f"lookups/s, median of {args.rounds} rounds of {args.seconds:g} s; {os.cpu_count()} CPUs; "
            f"our server: {args.workers} worker(s), postsrsd: a process per connection"
        )
        print(f"{'server':20}{'senders':16}{'1 connection':>22}{f'{args.connections} connections':>22}")
        for label, _, _, pattern, _ in cases:
            cells = []
            for n in counts:
                rate = median[(label, pattern, n)]
                base = median.get(("postsrsd tcp_table", pattern.replace("prvs/", "srs/"), n), 0.0)
                cells.append(f"{rate:10.0f} ({rate / base:4.2f}x)" if base else f"{rate:10.0f}")
            print(f"{label:20}{pattern:16}{cells[0]:>22}{cells[1]:>22}")
        print(
            "(x) = the ratio to postsrsd 1.10's tcp_table SRS rate for the same kind of senders, in this run;"
        )
        print("      the target is at least 1.00x. prvs rows: postsrsd has no BATV; the ratio is to its SRS.")
        if not args.no_placement and {0, 1} <= os.sched_getaffinity(0):
            placement_table(servers, args.rounds, args.seconds)
    finally:
        servers.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
