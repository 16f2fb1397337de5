"""Interop evidence against the real thing: a live postsrsd, and Exim's own prvs rules.

postsrsd (Debian postsrsd 1.10) runs on 127.0.0.1 ports chosen free, with its own secret file and alias
domain, started and stopped by each test. We speak its Postfix tcp_table(5) protocol to it, and show:
- an SRS address the gateway writes (Policy.outbound_sender, the same secret and alias) is reversed by
  postsrsd to the original sender, and the gateway's inbound policy reverses what postsrsd writes;
- for the same day, both write the same bytes (SRS0 and SRS1, for two separators).

Exim is not installed here, so its rules come in as an independent oracle: `exim_prvscheck` below is
written from tests/vectors/README.md (Exim 4.96 src/expand.c, EITEM_PRVSCHECK) and shares no code with
gateway/core/prvs.py. The oracle is first held against every `check` case Exim itself produced, so it cannot
drift from Exim silently; then every tag the gateway writes must pass it on each day of its life, and
every tag Exim wrote must be accepted by the inbound policy on the day Exim wrote it.

Empirically (postsrsd 1.10 on Debian 12, run as root): it reads the secret file before it binds and before
it drops privileges, so `-u nobody` works with a root-only 0600 secret file; it strips the line's newline
from the secret; it answers "500 Already rewritten" for an address already in its own domain.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.core import srs
from gateway.core.addresses import parse_address
from gateway.core.keyring import Key, Keyring, KeyState
from gateway.policy.policy import Action, Policy, PolicySettings, Reason
from tests.postfix_instance import POSTSRSD, become_subreaper, children, free_port, reap, wait_for_port

VECTORS = Path(__file__).parent / "vectors"
ALIAS = "fwd.gateway.test"
SIGNED = "example.com"
T = TypeVar("T")


# ------------------------------------------------------------------------------------------- postsrsd


@dataclass
class Postsrsd:
    """A running postsrsd and a tcp_table(5) client for its forward and reverse ports."""

    forward_port: int
    reverse_port: int

    def _get(self, port: int, key: str) -> tuple[int, str]:
        # tcp_table(5): "get SPACE key NEWLINE"; the key and the reply's text are URL-encoded (%XX).
        with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
            sock.sendall(f"get {urllib.parse.quote(key, safe='@=+-._')}\n".encode())
            reply = sock.makefile("rb").readline().decode().rstrip("\n")
        code, _, text = reply.partition(" ")
        return int(code), urllib.parse.unquote(text)

    def forward(self, sender: str) -> str:
        code, text = self._get(self.forward_port, sender)
        assert code == 200, f"postsrsd forward {sender!r}: {code} {text}"
        return text

    def reverse(self, address: str) -> tuple[int, str]:
        return self._get(self.reverse_port, address)


@contextlib.contextmanager
def running_postsrsd(folder: Path, secret: bytes, separator: str = "=") -> Iterator[Postsrsd]:
    secret_file = folder / "postsrsd.secret"
    secret_file.write_bytes(secret + b"\n")
    secret_file.chmod(0o600)
    for attempt in range(3):
        fwd, rev = free_port(), free_port()
        argv = [POSTSRSD, f"-s{secret_file}", f"-d{ALIAS}", f"-a{separator}", "-l127.0.0.1", "-4"]
        argv += [f"-f{fwd}", f"-r{rev}"]
        if os.geteuid() == 0:
            argv.append("-unobody")  # it binds and reads the secret first, then drops to nobody
        become_subreaper()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_port(fwd, timeout=5.0)
            wait_for_port(rev, timeout=5.0)
            break
        except TimeoutError:
            _stop(proc)
            if attempt == 2:
                raise
    try:
        yield Postsrsd(fwd, rev)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop postsrsd and leave no zombie: it forks a child per connection and reaps them only lazily, so
    its last children outlive it. As a child subreaper the test adopts them and reaps exactly those."""
    adopted = list(children(proc.pid))
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()
    deadline = time.monotonic() + 5.0
    while (left := [p for p in adopted if Path(f"/proc/{p}").exists()]) and time.monotonic() < deadline:
        reap(left)
        time.sleep(0.01)
    assert not left, f"postsrsd children {left} outlived it"


def same_day(body: Callable[[int], T]) -> T:
    """Run body(today) so that postsrsd's clock and ours agree on the day: retried once across midnight."""
    for _ in range(2):
        today = int(time.time()) // 86400
        result = body(today)
        if int(time.time()) // 86400 == today:
            return result
    raise AssertionError("the UTC day changed twice during one test")


@pytest.fixture(params=["=", "+"], ids=["sep=", "sep+"])
def separator(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def secret() -> bytes:
    # postsrsd reads one text line; the keyring wants at least 32 bytes.
    return secrets.token_hex(24).encode()


@pytest.fixture
def postsrsd(tmp_path: Path, secret: bytes, separator: str) -> Iterator[Postsrsd]:
    with running_postsrsd(tmp_path, secret, separator) as daemon:
        yield daemon


def gateway_policy(secret: bytes, separator: str = "=") -> Policy:
    settings = PolicySettings(
        local_domains=frozenset({SIGNED}),
        signed_domains=frozenset({SIGNED}),
        srs_alias=ALIAS,
        srs_options=srs.SrsOptions(separator=separator),
    )
    return Policy(settings, Keyring((Key(1, secret, KeyState.ACTIVE),)))


FOREIGN_SENDERS = [
    "user@example.net",
    "First.Last@Mixed.Example.ORG",
    "list-bounces+alice=example.org@lists.example.net",
    "o'brien@example.co.uk",
]
# Already SRS elsewhere (another forwarder's addresses): the gateway and postsrsd both wrap them in SRS1.
SRS_SENDERS = [
    "SRS0=AbCd=IL=example.org=bob@forwarder.example",
    "SRS0+xYz1=ZZ=orig.example=carol@hop1.example",
    "SRS1=WxYz=orig.example==AbCd=IL=example.org=dave@hop2.example",
]


def test_postsrsd_reverses_what_the_gateway_writes(postsrsd: Postsrsd, secret: bytes, separator: str) -> None:
    policy = gateway_policy(secret, separator)

    def body(today: int) -> None:
        for sender in FOREIGN_SENDERS + SRS_SENDERS:
            verdict = policy.outbound_sender(parse_address(sender), today)
            assert verdict.action is Action.RELAY
            assert verdict.reason is (Reason.SRS0 if sender in FOREIGN_SENDERS else Reason.SRS1)
            assert verdict.address.endswith("@" + ALIAS)
            code, original = postsrsd.reverse(verdict.address)
            if sender in FOREIGN_SENDERS:
                assert (code, original) == (200, sender), verdict.address
            else:
                # SRS1 reverses to the SRS0 address at the first forwarder (Guarded SRS).
                assert code == 200, (verdict.address, original)
                assert original == str(srs.reverse(verdict.address, [secret], today).address)
                assert original.upper().startswith("SRS0")
            # Tampering with the hash makes postsrsd refuse it: the check above is not vacuous.
            forged = _flip_hash(verdict.address)
            code, text = postsrsd.reverse(forged)
            assert code == 500 and "Hash invalid" in text, (forged, text)

    same_day(body)


def test_gateway_reverses_what_postsrsd_writes(postsrsd: Postsrsd, secret: bytes, separator: str) -> None:
    policy = gateway_policy(secret, separator)

    def body(today: int) -> None:
        for sender in FOREIGN_SENDERS + SRS_SENDERS:
            written = postsrsd.forward(sender)
            assert written.endswith("@" + ALIAS)
            # A bounce (null sender) to postsrsd's address is accepted inbound and sent to the original.
            verdict = policy.inbound_rcpt(None, parse_address(written), today)
            assert (verdict.action, verdict.reason) == (Action.RELAY, Reason.VALID_SRS), written
            if sender in FOREIGN_SENDERS:
                assert verdict.address == sender
            else:
                assert verdict.address.upper().startswith("SRS0")
                assert verdict.address == postsrsd.reverse(written)[1]
            # And a forged one is refused at RCPT, as a forgery.
            refused = policy.inbound_rcpt(None, parse_address(_flip_hash(written)), today)
            assert (refused.action, refused.reason) == (Action.REJECT, Reason.BAD_HASH)
            assert refused.reply is not None and refused.reply.code == 550

    same_day(body)


def test_forward_is_byte_for_byte_the_same(postsrsd: Postsrsd, secret: bytes, separator: str) -> None:
    policy = gateway_policy(secret, separator)

    def body(today: int) -> list[tuple[str, str, str]]:
        rows = []
        for sender in FOREIGN_SENDERS + SRS_SENDERS:
            ours = policy.outbound_sender(parse_address(sender), today).address
            rows.append((sender, ours, postsrsd.forward(sender)))
        return rows

    rows = same_day(body)
    for sender, ours, theirs in rows:
        assert ours == theirs, f"{sender}: gateway {ours!r}, postsrsd {theirs!r}"
    print("\n".join(f"{s} -> {o}" for s, o, _ in rows))


def test_a_different_secret_does_not_interoperate(tmp_path: Path, secret: bytes) -> None:
    """The control: postsrsd with another secret refuses our addresses and we refuse its."""
    policy = gateway_policy(secret)
    with running_postsrsd(tmp_path, secrets.token_hex(24).encode()) as other:

        def body(today: int) -> None:
            ours = policy.outbound_sender(parse_address("user@example.net"), today).address
            code, text = other.reverse(ours)
            assert code == 500 and "Hash invalid" in text
            theirs = other.forward("user@example.net")
            verdict = policy.inbound_rcpt(None, parse_address(theirs), today)
            assert (verdict.action, verdict.reason) == (Action.REJECT, Reason.BAD_HASH)

        same_day(body)


def _flip_hash(address: str) -> str:
    """The same SRS address with the first character of its hash changed (case-insensitively different)."""
    head, hash_, rest = address[:5], address[5:].split("=", 1)[0], address[5:].split("=", 1)[1]
    first = "A" if hash_[0].upper() != "A" else "B"
    return f"{head}{first}{hash_[1:]}={rest}"


# ------------------------------------------------------------------------------------------- Exim prvs

# Exim 4.96 expand.c: prvscheck's pattern, compiled caseless; anything else is "not prvs".
_EXIM_PRVS = re.compile(r"^prvs=([0-9])([0-9]{3})([A-F0-9]{6})=(.+)@(.+)$", re.IGNORECASE | re.DOTALL)


def exim_prvscheck(address: str, secret_for: Callable[[int], bytes], today: int) -> str:
    """Exim's ${prvscheck}, re-implemented from tests/vectors/README.md: 'valid', 'hash_mismatch',
    'expired' or 'not_prvs'. Independent of gateway/core/prvs.py on purpose."""
    match = _EXIM_PRVS.match(address)
    if match is None:
        return "not_prvs"
    key_num, ddd, given, local, domain = match.groups()
    secret = secret_for(int(key_num))
    source = f"{key_num}{ddd}{local}@{domain}".encode()
    expected = hmac.new(secret, source, hashlib.sha1).digest()[:3].hex()
    # Exim compares the received hex with its lowercase hash case-sensitively.
    if given != expected:
        return "hash_mismatch"
    inday, now = int(ddd), today % 1000
    if inday < 7 and now >= 993:  # Exim's wrap: near day 999 the tags from 000-006 count as fresh
        now = 0
    return "valid" if inday >= now else "expired"


def _load(name: str) -> list[dict[str, Any]]:
    with (VECTORS / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


PRVS_VECTORS = _load("prvs-exim.jsonl")


def _vector_secret(case: dict[str, Any]) -> Callable[[int], bytes]:
    if "secrets_by_key" in case:
        by_key = {int(k): v.encode() for k, v in case["secrets_by_key"].items()}
        return lambda key_num: by_key.get(key_num, b"")
    return lambda key_num: str(case["secret"]).encode()


def test_the_exim_oracle_agrees_with_exim_on_every_recorded_check() -> None:
    checks = [c for c in PRVS_VECTORS if c["op"] == "check"]
    assert len(checks) == 64
    verdicts = {c["verdict"] for c in checks}
    assert verdicts == {"valid", "hash_mismatch", "expired", "not_prvs"}  # each branch is exercised
    for case in checks:
        got = exim_prvscheck(case["input"], _vector_secret(case), case["day_number"])
        assert got == case["verdict"], case["id"]


SIGN_DAYS = [19723, 20454, 20_990, 20_992, 20_993, 20_996, 20_999, 21_000]  # 2024-01-01, and the wrap


@pytest.mark.parametrize("sign_day", SIGN_DAYS)
def test_tags_the_gateway_writes_pass_exims_check_for_their_whole_life(sign_day: int) -> None:
    secret = secrets.token_bytes(32)
    for key_id in (0, 7):
        policy = Policy(
            PolicySettings(local_domains=frozenset({SIGNED}), signed_domains=frozenset({SIGNED})),
            Keyring((Key(key_id, secret, KeyState.ACTIVE),)),
        )
        for sender in ("user@example.com", "First.Last+tag@example.com", "x@EXAMPLE.COM"):
            verdict = policy.outbound_sender(parse_address(sender), sign_day)
            assert verdict.reason is Reason.PRVS
            tag = verdict.address
            assert tag.startswith(f"prvs={key_id}")
            for age in range(8):  # the day it was written and the 7 days of its lifetime
                assert exim_prvscheck(tag, lambda _k: secret, sign_day + age) == "valid", (tag, age)
            # The oracle can say no: a changed hash and another secret fail.
            changed = tag[:6] + ("0" if tag[6] != "0" else "1") + tag[7:]
            assert exim_prvscheck(changed, lambda _k: secret, sign_day) == "hash_mismatch"
            assert exim_prvscheck(tag, lambda _k: b"another secret", sign_day) == "hash_mismatch"


def _exim_signed() -> list[dict[str, Any]]:
    return [c for c in PRVS_VECTORS if c["op"] == "sign" and c["output"] is not None]


@pytest.mark.parametrize("case", _exim_signed(), ids=lambda c: c["id"])
def test_tags_exim_wrote_are_accepted_inbound(case: dict[str, Any]) -> None:
    key_id = int(case["key_num"] or "0")
    domain = case["input"].rpartition("@")[2]
    policy = Policy(
        PolicySettings(local_domains=frozenset({domain}), signed_domains=frozenset({domain})),
        Keyring((Key(key_id, case["secret"].encode(), KeyState.ACTIVE),)),
    )
    day = case["day_number"]  # the clock pinned to the day Exim wrote it
    verdict = policy.inbound_rcpt(None, parse_address(case["output"]), day)
    assert (verdict.action, verdict.reason) == (Action.RELAY, Reason.VALID_PRVS), verdict
    assert verdict.address == case["input"]
    assert verdict.key_id == key_id
    # The same bounce to the bare address is refused: acceptance above came from Exim's tag.
    bare = policy.inbound_rcpt(None, parse_address(case["input"]), day)
    assert (bare.action, bare.reason) == (Action.REJECT, Reason.UNSIGNED)
    assert bare.reply is not None and bare.reply.code == 550


@pytest.mark.parametrize(
    "case",
    [c for c in PRVS_VECTORS if c["op"] == "check" and c["verdict"] in ("valid", "hash_mismatch", "expired")],
    ids=lambda c: c["id"],
)
def test_exims_check_verdicts_hold_inbound(case: dict[str, Any]) -> None:
    """Exim's recorded check cases, each at its day: valid ones relay, forged and expired ones get 550."""
    domain = case["decoded_address"].rpartition("@")[2]
    secret_for = _vector_secret(case)
    keyring = Keyring(tuple(Key(k, secret_for(k), KeyState.VERIFY) for k in range(10) if secret_for(k)))
    policy = Policy(
        PolicySettings(local_domains=frozenset({domain}), signed_domains=frozenset({domain})), keyring
    )
    verdict = policy.inbound_rcpt(None, parse_address(case["input"]), case["day_number"])
    if case["verdict"] == "valid":
        assert (verdict.action, verdict.address) == (Action.RELAY, case["decoded_address"])
    else:
        expected = Reason.BAD_HASH if case["verdict"] == "hash_mismatch" else Reason.EXPIRED
        assert (verdict.action, verdict.reason) == (Action.REJECT, expected), case["id"]
        assert verdict.reply is not None and verdict.reply.code == 550
