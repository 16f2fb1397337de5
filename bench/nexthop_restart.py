"""A bounded soak: the next hop is killed every 2-3 s and started again 1 s later, while clients send.

    python3 bench/nexthop_restart.py                      # smtp-sink as the next hop, 20 s
    python3 bench/nexthop_restart.py --next-hop postfix   # a private Postfix (as root); its master killed
    python3 bench/nexthop_restart.py --seconds 10 --clients 8

Loopback only: the gateway runs in this process (inbound role, on port 0), the clients are ours, one
message per session. Prints the share of messages answered 2xx and, for each restart, how long until the
first 2xx after it. The share alone says little: a refusal while the next hop is down takes a millisecond,
a delivery several, so a closed-loop client makes many more attempts while it is down; the time to the
first 2xx after each restart is the number that shows whether recovery is immediate.

With Postfix, `kill -9` of master leaves the smtpd that serves a pooled connection of ours running, and it
keeps the old listening socket: the new master's socket and that one share the port, and the connections
the kernel puts in the old one's queue get no greeting until that smtpd exits (`ss -ltnp` shows both);
transactions on the pooled connection itself stall while that smtpd waits for the dead master's services.
Recovery is then slow whatever the gateway does short of its timeouts. A master killed alone is what this
script does by hand; under systemd (KillMode=control-group) or as a container's main process, its
children die with it and the next hop looks like smtp-sink's case.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.smtp_peers import (  # noqa: E402 - after the sys.path line above
    LOCALHOST,
    SMTP_SINK,
    RawClient,
    _wait_port,
    free_port,
    gateway_config,
    gateway_port,
    running_gateway,
)


class SinkHop:
    """smtp-sink, killed with SIGKILL and started again on the same port."""

    def __init__(self) -> None:
        assert SMTP_SINK is not None, "smtp-sink is not installed (apt-get install postfix)"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        argv = [SMTP_SINK, "-c", *user, f"{LOCALHOST}:{self.port}", "64"]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.process)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


class PostfixHop:
    """A private Postfix instance (tests/postfix_instance.py) that discards what it queues; `kill` sends
    SIGKILL to its master only, as a crash would."""

    def __init__(self) -> None:
        from tests.postfix_instance import PostfixInstance

        root = Path(tempfile.mkdtemp(prefix="batv-restart-"))
        root.chmod(0o711)
        self.instance = PostfixInstance(root / "pf", main={"default_transport": "discard"})
        self.instance.start()
        self.port = self.instance.smtp_port

    def _master(self) -> int:
        return int((self.instance.queue_dir / "pid" / "master.pid").read_text().split()[0])

    def start(self) -> None:
        from tests.postfix_instance import POSTFIX

        for _ in range(50):
            done = self.instance.run(POSTFIX, "-c", str(self.instance.config_dir), "start", check=False)
            if done.returncode == 0:
                self.instance._master_pid = self._master()
                return
            time.sleep(0.1)
        raise RuntimeError("postfix did not start again")

    def kill(self) -> None:
        os.kill(self._master(), signal.SIGKILL)

    def stop(self) -> None:
        from tests.postfix_instance import PostfixError

        self.instance._master_pid = self._master()
        try:
            self.instance.stop()
        except PostfixError as error:  # smtpd processes orphaned by a kill: stop() has killed them now
            print(f"  (at the end: {error})")


async def soak(hop: Any, seconds: float, clients: int) -> None:
    counts: collections.Counter[str] = collections.Counter()
    outcomes: list[tuple[float, bool]] = []
    restarts: list[float] = []
    begin = time.monotonic()
    end = begin + seconds

    async def restarter() -> None:
        while time.monotonic() < end - 3:
            await asyncio.sleep(random.uniform(2, 3))
            await asyncio.to_thread(hop.kill)
            await asyncio.sleep(1)
            await asyncio.to_thread(hop.start)
            restarts.append(time.monotonic())

    async def client(port: int) -> None:
        while time.monotonic() < end:
            try:
                smtp = await RawClient.connect(port)
                try:
                    await smtp.ehlo()
                    await smtp.cmd("MAIL FROM:<alice@example.org>")
                    code, _ = await smtp.cmd("RCPT TO:<bob@example.com>")
                    if code == 250:
                        code, _ = await smtp.cmd("DATA")
                    if code == 354:
                        code, _ = await smtp.cmd("Subject: soak\r\n\r\nhello\r\n.")
                finally:
                    await smtp.close()
            except (OSError, TimeoutError):
                code = 0
            counts["2xx" if 200 <= code < 300 else str(code or "no answer")] += 1
            outcomes.append((time.monotonic(), 200 <= code < 300))

    async with running_gateway(gateway_config(hop.port)) as gw:
        port = gateway_port(gw)
        await asyncio.gather(restarter(), *(client(port) for _ in range(clients)))
    total, good = sum(counts.values()), counts["2xx"]
    print(f"{total} messages in {seconds:g} s, 2xx: {good} ({100 * good / max(total, 1):.1f}%)")
    print("  answers:", dict(counts))
    for at in restarts:
        first = min((t - at for t, ok in outcomes if ok and t >= at), default=None)
        after = "none before the end" if first is None else f"{first * 1000:.1f} ms"
        print(f"  restart at +{at - begin:.1f} s: first 2xx after it: {after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--next-hop", choices=("sink", "postfix"), default="sink")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    hop: Any = SinkHop() if args.next_hop == "sink" else PostfixHop()
    if args.next_hop == "sink":
        hop.start()
    try:
        asyncio.run(soak(hop, args.seconds, args.clients))
    finally:
        if args.next_hop == "sink":
            hop.kill()
        else:
            hop.stop()


if __name__ == "__main__":
    main()
