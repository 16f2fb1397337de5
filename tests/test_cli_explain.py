"""`batv-gateway explain`: every case an operator asks "why was this refused?" about, through main(argv),
with a real keyring file; one run through `python -m gateway explain` in a subprocess. No output may carry
a secret (raw, hex or base64) or the hash a forged tag should have had."""

from __future__ import annotations

import base64
import hmac
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.cli.main import main
from gateway.core import srs
from gateway.core.keyring import Key, Keyring, KeyState
from gateway.ops import keystore

REPO = Path(__file__).resolve().parent.parent
VECTORS = REPO / "tests" / "vectors"


def exim_vector(case_id: str) -> dict[str, Any]:
    with open(VECTORS / "prvs-exim.jsonl", encoding="utf-8") as handle:
        return next(row for row in map(json.loads, handle) if row["id"] == case_id)


# A tag Exim 4.96 made (${prvs} with key 1 and a 64-byte secret) on 2024-03-15: our keyring holds that
# secret as its active key 1, so Exim's tag is one "signed by our keyring".
EXIM = exim_vector("prvs-exim-0128")
EXIM_TAG = EXIM["input"]  # prvs=1804cd13a5=user@example.com
NOW = EXIM["utc_time"]  # 2024-03-15T08:30:00Z, day 19797
TODAY = EXIM["day_number"]
ACTIVE = EXIM["secret"].encode()
VERIFY = bytes(range(32, 64))
RETIRED = bytes(range(100, 140))
SECRETS = (ACTIVE, VERIFY, RETIRED)


def exim_style(key_id: int, secret: bytes, expiry_day: int, address: str) -> str:
    """A prvs tag as Exim's ${prvs} makes it, computed here without gateway.core.prvs."""
    stamp = f"{key_id}{expiry_day % 1000:03d}"
    digest = hmac.digest(secret, f"{stamp}{address}".encode(), "sha1")[:3].hex()
    return f"prvs={stamp}{digest}={address}"


def forge(tag: str) -> str:
    """The tag with the last digit of its hash changed."""
    last = tag[14]
    return tag[:14] + ("0" if last != "0" else "1") + tag[15:]


class Explain:
    """main(["explain", ...]) against a keyring with keys 1 (active), 2 (verify) and 3 (retired)."""

    def __init__(self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, folder: Path):
        self.capsys, self.monkeypatch, self.folder = capsys, monkeypatch, folder
        self.keyring = folder / "keyring.toml"
        when = datetime(2024, 1, 1, tzinfo=UTC)
        keys = (
            Key(1, ACTIVE, KeyState.ACTIVE, when, when),
            Key(2, VERIFY, KeyState.VERIFY, when, when, signed_until=when),
            Key(3, RETIRED, KeyState.RETIRED, when, when, signed_until=when),
        )
        keystore.save(self.keyring, keystore.KeyringFile(Keyring(keys), 1, when))
        self.outputs: list[str] = []

    def __call__(self, *argv: str, now: str = NOW, stdin: bytes | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            self.monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        flags = ["--keyring", str(self.keyring), "--domain", "example.com", "--srs-alias", "fwd.example.com"]
        code = main(["explain", *flags, "--now", now, *argv])
        out, err = self.capsys.readouterr()
        self.outputs.append(out + err)
        return code, out, err

    def lines(self, *argv: str, now: str = NOW) -> tuple[int, dict[str, str], list[str]]:
        """The exit code, the facts ("label: words" lines) and the verdict lines ("  verdict: ...")."""
        code, out, err = self(*argv, now=now)
        assert err == ""
        facts = dict(
            line.split(": ", 1) for line in out.splitlines() if not line.startswith(" ") and ": " in line
        )
        verdicts = [
            line.strip().removeprefix("verdict: ") for line in out.splitlines() if "  verdict: " in line
        ]
        return code, facts, verdicts

    def message(self, text: str, name: str = "message.eml") -> Path:
        path = self.folder / name
        path.write_bytes(text.replace("\n", "\r\n").encode())
        return path


@pytest.fixture
def explain(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Explain]:
    runner = Explain(capsys, monkeypatch, tmp_path)
    yield runner
    # Whatever a test asked, nothing it printed carries a secret in any spelling.
    for output in runner.outputs:
        for secret in SECRETS:
            for spelling in (
                secret.decode("latin-1"),
                secret.hex(),
                base64.b64encode(secret).decode(),
                base64.urlsafe_b64encode(secret).decode(),
            ):
                assert spelling not in output


# ---------------------------------------------------------------- prvs


def test_a_valid_exim_tag_signed_by_our_keyring(explain: Explain) -> None:
    code, facts, verdicts = explain.lines(EXIM_TAG)
    assert code == 0
    assert facts["tag"] == "prvs (valid): valid tag"
    assert facts["key"] == "1: active (signs and verifies)"
    assert facts["day stamp"] == "804: valid until 2024-03-22 (day 19804); 7 day(s) left"
    assert facts["signed"] == "2024-03-15 (day 19797), today, if made with our 7-day lifetime"
    assert facts["hash"] == "matches"
    assert facts["original address"] == "user@example.com"
    assert verdicts == [
        "relay to user@example.com (the next hop answers the RCPT)",
        "relay to user@example.com (the next hop answers the RCPT)",
        f"relay with <{EXIM_TAG}> left as it is",
    ]


def test_a_tag_three_days_old_says_so(explain: Explain) -> None:
    code, facts, _ = explain.lines(EXIM_TAG, now="2024-03-18T23:59:59Z")
    assert code == 0
    assert facts["day stamp"] == "804: valid until 2024-03-22 (day 19804); 4 day(s) left"
    assert facts["signed"] == "2024-03-15 (day 19797), 3 day(s) ago, if made with our 7-day lifetime"


def test_a_forged_hash_is_refused_and_the_right_hash_is_not_shown(explain: Explain) -> None:
    forged = forge(EXIM_TAG)
    code, out, _ = explain(forged)
    assert code == 1
    assert f"verdict: reject (550 5.7.1 <{forged}>: bounce to an address we never signed (bad-hash))" in out
    assert "hash: does not match\n" in out
    assert "the tag's hash does not match its key" in out
    assert "cd13a5" not in out  # the hash it should have had


def test_an_expired_tag(explain: Explain) -> None:
    code, facts, verdicts = explain.lines(EXIM_TAG, now="2024-03-30T10:00:00Z")  # day 19812
    assert code == 1
    assert facts["tag"].startswith("prvs (expired): tag expired 8 day(s) ago")
    assert facts["day stamp"] == "804: valid until 2024-03-22 (day 19804); expired 8 day(s) ago"
    assert facts["signed"] == "2024-03-15 (day 19797), 15 day(s) ago, if made with our 7-day lifetime"
    assert facts["hash"].startswith("matches")
    assert verdicts[0] == f"reject (550 5.7.1 <{EXIM_TAG}>: bounce to an address we never signed (expired))"
    # A reply with an expired tag is still mail: invalid_tag_with_sender = "accept" by default.
    assert verdicts[1] == "relay to user@example.com (the next hop answers the RCPT)"


def test_an_unknown_key(explain: Explain) -> None:
    tag = exim_style(7, VERIFY, TODAY + 7, "user@example.com")
    code, facts, verdicts = explain.lines(tag)
    assert code == 1
    assert facts["key"] == "7: unknown (not in this keyring)"
    assert facts["hash"] == "not checked: there is no key to check it with"
    assert verdicts[0] == f"reject (550 5.7.1 <{tag}>: bounce to an address we never signed (unknown-key))"


def test_a_retired_key(explain: Explain) -> None:
    tag = exim_style(3, RETIRED, TODAY + 5, "user@example.com")
    code, facts, verdicts = explain.lines(tag)
    assert code == 1
    assert facts["key"].startswith("3: retired")
    assert verdicts[0].endswith("bounce to an address we never signed (unknown-key))")


def test_a_key_in_verify_state_still_checks_its_tags(explain: Explain) -> None:
    tag = exim_style(2, VERIFY, TODAY + 5, "user@example.com")
    code, facts, _ = explain.lines(tag)
    assert code == 0
    assert facts["key"] == "2: verify (verifies, no longer signs)"
    assert facts["hash"] == "matches"


def test_unsigned(explain: Explain) -> None:
    code, facts, verdicts = explain.lines("bob@example.com")
    assert code == 1  # the bounce would be refused
    assert facts["tag"] == "none (unsigned)"
    assert facts["domain"] == "example.com: ours (local, signed)"
    assert (
        verdicts[0] == "reject (550 5.7.1 <bob@example.com>: bounce to an address we never signed (unsigned))"
    )
    assert verdicts[1] == "relay to bob@example.com (the next hop answers the RCPT)"
    # Outbound, as a sender, it gets a tag made with the active key, expiring in 7 days (stamp 804).
    assert verdicts[2].startswith("relay as <prvs=1804") and verdicts[2].endswith("=bob@example.com>")


def test_sender_narrows_the_inbound_verdict_to_that_sender(explain: Explain) -> None:
    code, out, _ = explain("--sender", "alice@example.net", "bob@example.com")
    assert code == 0
    assert "inbound, sender <alice@example.net>:" in out
    assert "inbound, null sender" not in out
    code, out, _ = explain("--sender", "<>", "bob@example.com")
    assert code == 1
    assert "inbound, null sender (a bounce):" in out and "any other sender" not in out


# ---------------------------------------------------------------- SRS


def test_srs0_valid_and_expired(explain: Explain) -> None:
    address = srs.forward("carol@example.org", "fwd.example.com", [ACTIVE], TODAY - 3)
    code, facts, verdicts = explain.lines(address)
    assert code == 0
    assert facts["tag"] == "SRS0 (valid): valid SRS0, 3 day(s) old"
    assert facts["timestamp"] == f"{srs.timestamp(TODAY - 3)}: 3 day(s) ago; 18 day(s) left"
    assert facts["hash"] == "matches one of our keys"
    assert facts["decoded address"] == "carol@example.org"
    assert verdicts[0] == "relay to carol@example.org (the next hop answers the RCPT)"

    code, facts, verdicts = explain.lines(address, now="2024-04-15T00:00:00Z")  # 34 days later
    assert code == 1
    assert facts["tag"].startswith("SRS0 (expired)")
    assert facts["timestamp"].endswith("34 day(s) ago; past the max_age of 21 days")
    assert facts["claims to stand for"].startswith("carol@example.org (not decoded")
    assert "decoded address" not in facts
    assert verdicts[0] == f"reject (550 5.7.1 <{address}>: bounce to an address we never signed (expired))"


def test_srs0_forged(explain: Explain) -> None:
    address = srs.forward("carol@example.org", "fwd.example.com", [ACTIVE], TODAY)
    forged = "SRS0=AAAA=" + address.split("=", 2)[2]
    code, facts, verdicts = explain.lines(forged)
    assert code == 1
    assert facts["hash"] == "does not match any of our keys"
    assert verdicts[0].endswith("bounce to an address we never signed (bad-hash))")


# ---------------------------------------------------------------- before and around the policy


def test_foreign_domain(explain: Explain) -> None:
    code, facts, verdicts = explain.lines("bob@example.net")
    assert code == 1
    assert facts["domain"] == "example.net: not one of ours"
    assert verdicts[:2] == ["reject (554 5.7.1 <bob@example.net>: Relay access denied)"] * 2
    # Outbound, a foreign sender is forwarded mail: SRS0 in our alias domain.
    assert verdicts[2].startswith("relay as <SRS0=") and verdicts[2].endswith("@fwd.example.com>")


def test_postmaster_is_exempt(explain: Explain) -> None:
    code, out, _ = explain("postmaster@example.com")
    assert code == 0
    assert "verdict: relay to postmaster@example.com" in out
    assert "the recipient is exempt" in out


def test_a_malformed_address_gets_the_smtp_edges_reply_and_why(explain: Explain) -> None:
    code, out, _ = explain("bob@@example.com")
    assert code == 1
    assert out.count("verdict: reject (553 5.1.3 Malformed address)") == 2
    assert "'@' is not allowed in an unquoted local part" in out


def test_the_null_address(explain: Explain) -> None:
    code, out, _ = explain("<>")
    assert code == 1
    assert "verdict: reject (501 5.1.3 The null address is not a recipient)" in out
    assert "verdict: relay with <> left as it is" in out


def test_observe_mode_passes_and_says_what_enforce_mode_would_reply(explain: Explain) -> None:
    config = explain.folder / "gateway.toml"
    config.write_text(
        '[gateway]\nlocal_domains = ["example.com"]\n'
        '[[listener]]\nname = "mx"\nrole = "inbound"\nlisten = "127.0.0.1:2525"\n'
        'next_hop = "127.0.0.1:2526"\nobserve = true\n'
    )
    code, out, _ = explain("--config", str(config), "bob@example.com")
    assert code == 0
    assert "inbound: as the listener 'mx' answers, in observe mode" in out
    assert (
        "verdict: relay to bob@example.com in observe mode; enforce mode would reply "
        "550 5.7.1 <bob@example.com>: bounce to an address we never signed (unsigned)"
    ) in out


def test_an_untagged_bounce_with_the_ledger_on_is_decided_at_the_end_of_data(explain: Explain) -> None:
    kf = keystore.load(explain.keyring)
    keyring = replace(kf.keyring, ledger_secret=b"L" * 32)
    keystore.save(explain.keyring, replace(kf, keyring=keyring))
    code, out, _ = explain("--sender", "<>", "bob@example.com")
    assert code == 0  # accepted at RCPT; explain cannot see the ledger's end-of-DATA decision
    assert (
        "  verdict: accept the RCPT and relay to bob@example.com; the message is decided at the end of DATA "
        "by the Message-ID ledger, which explain cannot see: it passes only if it refers to a message we "
        "sent from this address, else 550 5.7.1"
    ) in out.splitlines()
    assert "never signed" not in out
    bounce = explain.message(BOUNCE)
    code, out, _ = explain(str(bounce))
    assert code == 0 and "decided at the end of DATA by the Message-ID ledger" in out
    # [ledger] enabled = false: refused at RCPT as before.
    config = explain.folder / "gateway.toml"
    config.write_text(
        '[gateway]\nlocal_domains = ["example.com"]\n'
        '[[listener]]\nname = "mx"\nrole = "inbound"\nlisten = "127.0.0.1:2525"\n'
        'next_hop = "127.0.0.1:2526"\n[ledger]\nenabled = false\n'
    )
    code, out, _ = explain("--config", str(config), "--sender", "<>", "bob@example.com")
    assert code == 1
    assert "bounce to an address we never signed (unsigned)" in out


def test_json(explain: Explain) -> None:
    code, out, _ = explain("--json", "bob@example.com")
    assert code == 1
    answer = json.loads(out)
    assert (answer["input"], answer["passes"]) == ("bob@example.com", False)
    assert answer["facts"]["tag"] == "none (unsigned)"
    assert [(v["role"], v["action"], v["reason"], v["passes"]) for v in answer["verdicts"]] == [
        ("inbound, null sender (a bounce)", "reject", "unsigned", False),
        ("inbound, any other sender", "relay", "not-bounce", True),
        ("outbound, as the envelope sender", "relay", "prvs", True),
    ]
    assert answer["verdicts"][0]["reply"] == (
        "550 5.7.1 <bob@example.com>: bounce to an address we never signed (unsigned)"
    )


# ---------------------------------------------------------------- messages

BOUNCE = """\
Return-Path: <>
Delivered-To: bob@example.com
X-Original-To: other@example.com
From: MAILER-DAEMON@mx.example.net
To: bob@example.com
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

Your message could not be delivered.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net

Original-Recipient: rfc822; carol@example.net
Final-Recipient: rfc822; carol@example.net
Action: failed
Status: 5.1.1

--B
Content-Type: text/rfc822-headers

From: bob@example.com
To: carol@example.net
Message-ID: <forged-in-our-name@example.com>

--B--
"""


def test_a_bounce_message_to_an_unsigned_address(explain: Explain) -> None:
    path = explain.message(BOUNCE)
    code, out, err = explain(str(path))
    assert (code, err) == (1, "")
    lines = out.splitlines()
    assert f"message: {path}" in lines
    assert "sender: <> (from Return-Path: a bounce)" in lines
    assert "recipient: bob@example.com (from Delivered-To)" in lines
    assert "dsn original-recipient: rfc822; carol@example.net" in lines
    assert "dsn returned message-id: <forged-in-our-name@example.com>" in lines
    assert (
        "  verdict: reject (550 5.7.1 <bob@example.com>: bounce to an address we never signed (unsigned))"
        in lines
    )
    assert "outbound" not in out  # a message is explained for the role that received it


def test_a_bounce_message_to_our_tag_passes(explain: Explain) -> None:
    path = explain.message(BOUNCE.replace("Delivered-To: bob@example.com", f"Delivered-To: <{EXIM_TAG}>"))
    code, out, _ = explain(str(path))
    assert code == 0
    assert f"recipient: {EXIM_TAG} (from Delivered-To)" in out
    assert "verdict: relay to user@example.com" in out


def test_a_message_that_is_not_a_bounce(explain: Explain) -> None:
    path = explain.message(
        "Return-Path: <alice@example.net>\nX-Original-To: bob@example.com\nTo: Other <other@example.com>\n"
        "Subject: hello\n\nhi\n"
    )
    code, out, _ = explain(str(path))
    assert code == 0
    assert "sender: <alice@example.net> (from Return-Path)" in out
    assert "recipient: bob@example.com (from X-Original-To)" in out
    assert "inbound, sender <alice@example.net>:" in out
    assert "verdict: relay to bob@example.com (the next hop answers the RCPT)" in out
    assert "dsn" not in out


def test_a_message_on_standard_input(explain: Explain) -> None:
    code, out, _ = explain("-", stdin=BOUNCE.encode())
    assert code == 1
    assert "message: standard input" in out
    assert "sender: <> (from Return-Path: a bounce)" in out


def test_a_message_without_return_path_is_explained_for_both_senders(explain: Explain) -> None:
    path = explain.message("To: Bob <bob@example.com>, carol@example.com\nSubject: x\n\nbody\n")
    code, out, _ = explain(str(path))
    assert code == 1
    assert "recipient: bob@example.com (from To)" in out
    assert "sender: unknown: no Return-Path header" in out
    assert "inbound, null sender (a bounce):" in out and "inbound, any other sender:" in out


@pytest.mark.parametrize("name", ["missing.eml", "folder"])
def test_an_unreadable_message_is_one_line_and_exit_2(explain: Explain, name: str) -> None:
    (explain.folder / "folder").mkdir()
    path = explain.folder / name
    code, out, err = explain(str(path))
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert err.startswith(f"batv-gateway: error: {path}: cannot read the message: ")


def test_a_message_without_any_recipient_is_a_usage_error(explain: Explain) -> None:
    path = explain.message("Return-Path: <>\nSubject: x\n\nbody\n")
    code, out, err = explain(str(path))
    assert (code, out) == (2, "")
    assert "no Delivered-To, X-Original-To or To address" in err


def test_usage_errors(explain: Explain) -> None:
    code, _, err = explain("--listen", "127.0.0.1:25", "bob@example.com")
    assert code == 2 and "--listen: explain listens nowhere" in err
    code, _, err = explain("--sender", "a@@b", "bob@example.com")
    assert code == 2 and err.startswith("batv-gateway: usage error: --sender: ")


def test_help_names_what_it_takes_from_where(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--help"]) == 0
    out = capsys.readouterr().out
    for words in ("Delivered-To", "X-Original-To", "Return-Path", "exit status", "--sender", "--json"):
        assert words in out


# ---------------------------------------------------------------- as operators run it


def test_python_dash_m_gateway_explain(tmp_path: Path) -> None:
    keyring = tmp_path / "keyring.toml"
    when = datetime(2024, 1, 1, tzinfo=UTC)
    keystore.save(
        keyring, keystore.KeyringFile(Keyring((Key(1, ACTIVE, KeyState.ACTIVE, when, when),)), 1, when)
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "gateway", "explain", "--keyring", str(keyring), "--domain", "example.com",
            "--now", NOW]  # fmt: skip

    def run(address: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*argv, address], capture_output=True, text=True, env=env, cwd=tmp_path, check=False
        )

    done = run(EXIM_TAG)
    assert (done.returncode, done.stderr) == (0, "")
    assert "hash: matches" in done.stdout
    refused = run("bob@example.com")
    assert refused.returncode == 1
    assert "(unsigned))" in refused.stdout
    for output in (done.stdout, refused.stdout):
        assert base64.b64encode(ACTIVE).decode() not in output and ACTIVE.hex() not in output


def test_the_replies_explain_names_are_what_the_gateway_answers_over_smtp(explain: Explain) -> None:
    """The same keyring and domains in a real gateway: each refusal explain predicts for a bounce is the
    reply a client gets at RCPT, to the character."""
    from tests.smtp_peers import FakeNextHop, RawClient, gateway_config, gateway_port, run, running_gateway

    now = str(int(time.time()))
    today = int(now) // 86400
    addresses = [
        "bob@example.com",  # unsigned
        "bob@example.net",  # relay denied
        "bob@@example.com",  # malformed
        "<>",  # the null address
        forge(exim_style(1, ACTIVE, today + 7, "bob@example.com")),  # bad hash
        exim_style(3, RETIRED, today + 7, "bob@example.com"),  # unknown key (retired)
    ]
    predicted = []
    for address in addresses:
        code, out, _ = explain("--json", "--sender", "<>", address, now=now)
        assert code == 1, address
        predicted.append(json.loads(out)["verdicts"][0]["reply"])

    async def answers() -> list[str]:
        keyring = keystore.load(explain.keyring).keyring
        got = []
        async with FakeNextHop() as hop:
            cfg = gateway_config(hop.port, srs_alias="fwd.example.com")
            async with running_gateway(cfg, keyring) as gw:
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                for address in addresses:
                    assert (await client.cmd("MAIL FROM:<>"))[0] == 250
                    code, text = await client.cmd(f"RCPT TO:<{address.strip('<>')}>")
                    got.append(f"{code} {text}")
                    assert (await client.cmd("RSET"))[0] == 250
                await client.close()
        return got

    assert run(answers()) == predicted
