"""Messages per second through Postfix with `batv-gateway milter`, against the same Postfix without it.

    python3 bench/milter.py                       # 3 rounds of 2000 messages each way, a minute or two
    python3 bench/milter.py --messages 200 --rounds 1   # a quick look
    python3 bench/milter.py --smoke --json FILE   # what tests/test_milterd.py runs: tiny, checked

One private Postfix instance (tests/postfix_instance.py, run as root) with two smtpd ports that differ in
one setting: `smtpd_milters = unix:batv/milter` (our milter, outbound rules: the loopback client is
trusted, so every message is signed with SMFIR_CHGFROM at end of message) or `smtpd_milters =` (none).
Both relay to one smtp-sink. The load is Postfix's smtp-source, N sessions at once; the figure is the
messages Postfix accepted per second (smtp-source's wall time), which is where a milter sits: inside
smtpd's session, before the client hears 250. Between measurements the queue is drained into the sink, so
one measurement's deliveries do not slow the next. Rounds alternate the two ports; the figures are medians
and only their ratio, measured in the same run on the same machine, means anything. At the end every
message must have reached the sink, and exactly the milter's ones with a prvs sender: a fast wrong answer
is a failure, not a result. Nothing is asserted about speed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):  # the checkout's gateway, and the private-Postfix helpers
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from postfix_instance import (  # noqa: E402
    PostfixInstance,
    SmtpSink,
    free_port,
    private_root,
    wait_for_port,
)

from gateway.ops import keystore  # noqa: E402

SENDER = "user@example.org"
RECIPIENT = "friend@remote.test"
SMTP_SOURCE = "/usr/sbin/smtp-source"
DEADLINE = 600.0  # seconds for the whole run: the bench always ends


def start_milter(root: Path, tcp: bool = False) -> tuple[subprocess.Popen[str], str]:
    """The milter on a socket file in the instance's queue directory, as deploy/postfix/milter-main.cf has
    it (over TCP, Postfix's small writes meet Nagle and delayed ACKs, which a socket file does not have)."""
    keyring = root / "keyring.toml"
    keystore.save(keyring, keystore.new_keyring(datetime.now(UTC)))
    folder = root / "pf" / "spool" / "batv"
    folder.mkdir(parents=True)
    shutil.chown(folder, group="postfix")
    folder.chmod(0o750)
    config = root / "milter.toml"
    config.write_text(
        f'[gateway]\nkeyring = "{keyring}"\nlocal_domains = ["example.org"]\n'
        + (
            '[milter]\nlisten = "127.0.0.1:0"\n'
            if tcp
            else f'[milter]\nlisten = "unix:{folder / "milter"}"\nsocket_group = "postfix"\n'
        )
    )
    # Its log goes to a file: a decision line per message would fill a pipe nobody reads, and stall it.
    log = root / "milter.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "milter", "--config", str(config)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=out, text=True,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"listen=(\S+) serves=milter", log.read_text())
        if found:
            where = found.group(1)
            return proc, f"inet:{where}" if tcp else "unix:batv/milter"
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"batv-gateway milter did not start: {log.read_text()}")


def drain(pf: PostfixInstance, sink: SmtpSink, expected: int, limit: float) -> None:
    """Wait until the sink holds `expected` messages (the queue is empty of this run's mail)."""
    deadline = time.monotonic() + limit
    while len(sink.messages()) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the sink holds {len(sink.messages())} of {expected}; {pf.log_tail()}")
        time.sleep(0.1)


def source(port: int, messages: int, sessions: int, size: int) -> float:
    """Seconds smtp-source took to have `messages` accepted."""
    began = time.monotonic()
    done = subprocess.run(
        [SMTP_SOURCE, "-m", str(messages), "-s", str(sessions), "-l", str(size),
         "-f", SENDER, "-t", RECIPIENT, "-M", "client.test", f"127.0.0.1:{port}"],
        check=False, capture_output=True, text=True, timeout=DEADLINE,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {done.stdout}{done.stderr}")
    return time.monotonic() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--size", type=int, default=2048, help="octets per message")
    parser.add_argument("--smoke", action="store_true", help="20 messages, 1 round")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--tcp", action="store_true", help="the milter on 127.0.0.1 instead of a socket file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.messages, args.rounds, args.sessions = 20, 1, 2
    rates: dict[str, list[float]] = {"with milter": [], "without": []}
    problems: list[str] = []
    with private_root() as root:
        milter, milter_socket = start_milter(root, args.tcp)
        try:
            with SmtpSink(root / "sink") as sink:
                with_port, without_port = free_port(), free_port()
                pf = PostfixInstance(
                    root / "pf",
                    hostname="mx.example.org",
                    relayhost=f"[127.0.0.1]:{sink.port}",
                    main={"milter_protocol": "6", "milter_default_action": "tempfail", "smtpd_milters": ""},
                    master=[
                        f"127.0.0.1:{with_port} inet n - n - - smtpd "
                        f"-o smtpd_milters={milter_socket}",
                        f"127.0.0.1:{without_port} inet n - n - - smtpd -o smtpd_milters=",
                    ],
                )
                with pf:
                    wait_for_port(with_port)
                    wait_for_port(without_port)
                    sent = 0
                    for _ in range(args.rounds):
                        for name, port in (("with milter", with_port), ("without", without_port)):
                            seconds = source(port, args.messages, args.sessions, args.size)
                            sent += args.messages
                            rates[name].append(args.messages / seconds)
                            drain(pf, sink, sent, DEADLINE)
                    got = sink.messages()
                signed = sum(1 for m in got if m.mail_from.startswith("prvs="))
                if len(got) != sent:
                    problems.append(f"the sink received {len(got)} of {sent}")
                if signed != args.messages * args.rounds:
                    problems.append(f"{signed} prvs senders, {args.messages * args.rounds} expected")
        finally:
            milter.terminate()
            milter.wait(timeout=20)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    ratio = medians["with milter"] / medians["without"]
    print(f"{args.messages} messages x {args.rounds} rounds, {args.sessions} sessions, {args.size} octets")
    for name, value in medians.items():
        print(f"  {name:<12} {value:8.1f} msgs/s accepted (median)")
    print(f"  ratio        {ratio:8.2f} (with the milter / without)")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if args.json is not None:
        args.json.write_text(json.dumps({"medians": medians, "ratio": ratio, "problems": problems}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
