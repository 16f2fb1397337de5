"""Real generators of null-sender answers, run on a message we "sent", for the ledger's tests.

Each returns the answer it made and the envelope it would be sent with. All three are Debian packages
(.ci/run installs them): `vacation` (the classic BSD program), `dovecot-sieve` (Pigeonhole's
`sieve-test`, with a vacation script) and `postfix` (its bounce daemon's RFC 3464 DSN).

What each does with the envelope (seen here, asserted in tests/test_messageids.py):
- vacation pipes its reply to /usr/sbin/sendmail as `-f <> -- <recipient>` (with -z; without it the
  sender is the user's login), and the recipient is the Return-Path (or the "From " line), never a header
  address. It writes no In-Reply-To or References: its reply refers to nothing.
- Pigeonhole's vacation (RFC 5230) sends from <> to the envelope sender, with In-Reply-To and References
  set to the original Message-ID; `sieve_vacation_to_header_ignore_envelope` only changes its To: header.
  sieve-test -e does not call sendmail_path: it prints the message it would send on stdout, followed by
  "RECIPIENT: <address>", and logs "sending message from <sender>" on stderr.
- Postfix bounces from <> to the envelope sender, the original headers (with the Message-ID) returned
  in a text/rfc822-headers part (message/rfc822 with RET=FULL).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.postfix_instance import PostfixInstance
from tests.smtp_peers import FakeNextHop, Received, Script

VACATION = "/usr/bin/vacation"
SIEVE_TEST = "/usr/bin/sieve-test"
SENDMAIL = "/usr/sbin/sendmail"
NOBODY = 65534  # sieve-test refuses to run mail access as root; it drops to this uid


@dataclass(frozen=True)
class Generated:
    sender: str  # the envelope sender the generator used ("" for <>)
    recipients: tuple[str, ...]
    message: bytes  # as the generator wrote it (line ends as it wrote them), not dot-stuffed


def wire(message: bytes) -> bytes:
    """A message as the SMTP edge streams it: CRLF lines, dot-stuffed (RFC 5321 §4.5.2)."""
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


# vacation does not wait for the sendmail it started: the orphan would end as a zombie child of the test
# process (a subreaper once a Postfix test ran) and the capture might be unfinished. This wrapper takes
# the orphans (PR_SET_CHILD_SUBREAPER) and waits for all of them.
_REAPER = (
    "import ctypes, os, subprocess, sys; "
    "ctypes.CDLL(None).prctl(36, 1, 0, 0, 0); "
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "while True:\n"
    "    try: os.wait()\n"
    "    except ChildProcessError: break\n"
    "sys.exit(code)"
)


def classic_vacation(original: bytes, login: str = "root", alias: str = "alice@example.org") -> Generated:
    """Debian's vacation, its /usr/sbin/sendmail replaced by a capture script in a private mount namespace.

    The program has the sendmail path compiled in, so `unshare -m` and a bind mount are the only way to
    catch what it sends without a mail system.
    """
    with tempfile.TemporaryDirectory(prefix="ledger-vacation-") as folder:
        here = Path(folder)
        capture = here / "sendmail"
        capture.write_text(
            f'#!/bin/sh\nprintf "%s\\n" "$@" > {here}/argv\ncat > {here}/message\n', encoding="ascii"
        )
        capture.chmod(0o755)
        (here / "vacation.msg").write_text(
            f"From: Alice <{alias}>\nSubject: away: $SUBJECT\nPrecedence: bulk\n\nI am away.\n",
            encoding="ascii",
        )
        script = (
            f"mount --bind {capture} {SENDMAIL} && exec {sys.executable} -c '{_REAPER}' "
            f"{VACATION} -z -r 0 -f {here}/vacation.db -m {here}/vacation.msg -a {alias} {login}"
        )
        proc = subprocess.run(
            ["/usr/bin/unshare", "-m", "/bin/sh", "-c", script],
            input=original,
            capture_output=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0 or not (here / "message").exists():
            raise RuntimeError(f"vacation made no reply (exit {proc.returncode}): {proc.stderr!r}")
        argv = (here / "argv").read_text(encoding="ascii").splitlines()
        # argv: -f <sender> -- <recipient>...
        sender = argv[argv.index("-f") + 1] if "-f" in argv else ""
        recipients = tuple(argv[argv.index("--") + 1 :]) if "--" in argv else ()
        return Generated(sender.strip("<>"), recipients, (here / "message").read_bytes())


def sieve_vacation(original: bytes, envelope_sender: str, recipient: str = "alice@example.org") -> Generated:
    """Pigeonhole's vacation action, run by sieve-test -e on an empty config (no dovecot running)."""
    folder = Path(tempfile.mkdtemp(prefix="ledger-sieve-"))
    try:
        folder.chmod(0o777)  # sieve-test writes its compiled script and mail as `nobody`
        (folder / "vacation.sieve").write_text(
            'require ["vacation"];\nvacation :days 1 :subject "Away" "I am away.";\n', encoding="ascii"
        )
        (folder / "message.eml").write_bytes(original)
        (folder / "empty.conf").write_text("\n", encoding="ascii")
        argv = [
            SIEVE_TEST,
            "-c", str(folder / "empty.conf"),
            "-e",
            "-l", f"maildir:{folder}/mail",
            "-o", f"mail_uid={NOBODY}",
            "-o", f"mail_gid={NOBODY}",
            "-o", f"mail_home={folder}",
            "-f", envelope_sender,
            "-r", recipient,
            str(folder / "vacation.sieve"),
            str(folder / "message.eml"),
        ]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, timeout=30, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"sieve-test failed (exit {proc.returncode}): {proc.stderr!r}")
        out = proc.stdout
        cut = out.find(b"\nRECIPIENT: ")
        sent = re.search(rb"sending message from <([^>]*)>", proc.stderr)
        if cut < 0 or sent is None:
            raise RuntimeError(f"sieve-test sent no vacation reply: {proc.stdout!r} {proc.stderr!r}")
        rcpt = out[cut + len(b"\nRECIPIENT: ") :].split(b"\n", 1)[0].decode()
        return Generated(sent.group(1).decode(), (rcpt,), out[:cut].rstrip(b"\n") + b"\n")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def postfix_bounce(root: Path, original: bytes, sender: str, recipient: str) -> Generated:
    """Postfix's own DSN: a private instance relays `original` to a next hop that refuses `recipient`
    with 550, and delivers the bounce for `sender` to a recording next hop."""
    sender_domain = sender.rpartition("@")[2]
    recipient_domain = recipient.rpartition("@")[2]
    refusing = Script(rcpt_replies={recipient.lower(): f"550 5.1.1 <{recipient}>: User unknown"})
    async with FakeNextHop(refusing) as remote, FakeNextHop() as mailbox:
        pf = PostfixInstance(root / "postfix", hostname="mta.remote.test")
        pf.main["transport_maps"] = (
            f"inline:{{ {recipient_domain}=smtp:[127.0.0.1]:{remote.port}, "
            f"{sender_domain}=smtp:[127.0.0.1]:{mailbox.port} }}"
        )
        await asyncio.to_thread(pf.start)
        try:
            await asyncio.to_thread(_submit, pf.smtp_port, sender, recipient, original)
            dsn = await _wait_for_one(pf, mailbox)
        finally:
            await asyncio.to_thread(pf.stop)
    mail_from = dsn.mail.split(b"<", 1)[1].split(b">", 1)[0].decode()
    rcpts = tuple(line.split(b"<", 1)[1].split(b">", 1)[0].decode() for line in dsn.rcpts)
    return Generated(mail_from, rcpts, _unstuff(dsn.data))


def _submit(port: int, sender: str, recipient: str, message: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.com", timeout=30) as client:
        client.sendmail(sender, [recipient], message)


async def _wait_for_one(pf: PostfixInstance, hop: FakeNextHop, timeout: float = 60.0) -> Received:
    deadline = time.monotonic() + timeout
    while not hop.messages:
        if time.monotonic() > deadline:
            raise AssertionError(f"no DSN after {timeout}s:\n{pf.log_tail(40)}")
        await asyncio.to_thread(pf.run, "/usr/sbin/postqueue", "-c", str(pf.config_dir), "-f", check=False)
        await asyncio.sleep(0.25)
    return hop.messages[0]


def _unstuff(data: bytes) -> bytes:
    return b"".join(line[1:] if line.startswith(b".") else line for line in data.splitlines(keepends=True))


def available() -> dict[str, bool]:
    """Which generators are installed (the tests require all of them: .ci/run installs them)."""
    return {
        "vacation": os.access(VACATION, os.X_OK),
        "sieve-test": os.access(SIEVE_TEST, os.X_OK),
        "postfix": os.access("/usr/sbin/postfix", os.X_OK),
    }
