"""gateway/policy/explain.py: the words for every verdict, and the envelope taken from a saved message."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from gateway.core.errors import UsageError
from gateway.core.keyring import Keyring
from gateway.policy import explain
from gateway.policy.policy import Policy, PolicySettings, Reason

TODAY = 19723  # 2024-01-01
POLICY = Policy(
    PolicySettings(local_domains=frozenset({"example.com"}), signed_domains=frozenset({"example.com"})),
    Keyring.from_secrets([(0, b"k" * 32)]),
)


def test_every_reason_has_its_words() -> None:
    assert set(explain.WHY) == set(Reason)
    assert all(words and not words.endswith(".") for words in explain.WHY.values())


def test_the_recipient_comes_from_delivered_to_then_x_original_to_then_to() -> None:
    headers = [
        "Delivered-To: first@example.com",
        "Delivered-To: earlier@example.com",
        "X-Original-To: <orig@example.com>",
        "To: Someone <to@example.com>, other@example.com",
    ]
    got = explain.read_envelope(("\r\n".join(headers) + "\r\n\r\nbody\r\n").encode())
    assert (got.recipient, got.recipient_from) == ("first@example.com", "Delivered-To")
    got = explain.read_envelope(("\r\n".join(headers[2:]) + "\r\n\r\n").encode())
    assert (got.recipient, got.recipient_from) == ("orig@example.com", "X-Original-To")
    got = explain.read_envelope(("\r\n".join(headers[3:]) + "\r\n\r\n").encode())
    assert (got.recipient, got.recipient_from) == ("to@example.com", "To")
    assert explain.read_envelope(b"Subject: x\r\n\r\n").recipient is None


def test_the_sender_comes_from_return_path() -> None:
    assert explain.read_envelope(b"Return-Path: <>\r\n\r\n").sender == ""
    assert explain.read_envelope(b"Return-Path: <a@example.net>\r\n\r\n").sender == "a@example.net"
    assert explain.read_envelope(b"Subject: x\r\n\r\n").sender is None


def test_a_header_with_raw_utf8_reads_as_text() -> None:
    got = explain.read_envelope("Delivered-To: jos\u00e9@example.com\r\n\r\n".encode())
    assert got.recipient == "jos\u00e9@example.com"
    got = explain.read_envelope(b"Delivered-To: jos\xe9@example.com\r\n\r\n")  # Latin-1: not UTF-8
    assert got.recipient == "jos\ufffd@example.com"


def test_a_dsn_that_returns_the_whole_message() -> None:
    dsn = (
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        b"--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n"
        b"Final-Recipient: rfc822; carol@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
        b"--B\r\nContent-Type: message/rfc822\r\n\r\nMessage-ID: <m1@example.com>\r\nSubject: s\r\n\r\nhi\r\n"
        b"--B--\r\n"
    )
    assert explain.read_envelope(dsn).dsn == (
        ("dsn final-recipient", "rfc822; carol@example.net"),
        ("dsn action", "failed"),
        ("dsn status", "5.1.1"),
        ("dsn returned message-id", "<m1@example.com>"),
    )


def test_a_message_without_a_recipient_cannot_be_explained() -> None:
    with pytest.raises(UsageError, match="give the recipient ADDRESS instead"):
        explain.explain_message(explain.read_envelope(b"Return-Path: <>\r\n\r\n"), POLICY, TODAY, source="m")


def test_an_unreadable_return_path_shows_both_senders() -> None:
    envelope = explain.read_envelope(b"Return-Path: <a@@b>\r\nDelivered-To: bob@example.com\r\n\r\n")
    got = explain.explain_message(envelope, POLICY, TODAY, source="m")
    assert dict(got.facts)["sender"].startswith("unknown: the Return-Path is not an address")
    assert [v.reason for v in got.verdicts] == ["unsigned", "not-bounce"]
    assert not got.passes


def test_outbound_verdicts_do_not_decide_whether_the_mail_passes() -> None:
    no_key = Policy(POLICY.settings, Keyring.from_secrets([]))
    got = explain.explain_address("postmaster@example.com", no_key, TODAY)
    assert [(v.inbound, v.passes, v.reason) for v in got.verdicts] == [
        (True, True, "exempt"),
        (True, True, "not-bounce"),
        (False, False, "no-active-key"),
    ]
    assert got.verdicts[2].outcome == "tempfail (451 4.3.5 Signing keys unavailable, try again later)"
    assert got.passes


def test_an_untagged_bounce_in_the_grace_window_is_explained_as_grace() -> None:
    began = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)  # TODAY
    keyring = dataclasses.replace(Keyring.from_secrets([(0, b"k" * 32)]), signing_began=began)
    policy = Policy(POLICY.settings, keyring)
    (bounce, _, _) = explain.explain_address("bob@example.com", policy, TODAY).verdicts
    assert (bounce.reason, bounce.passes) == ("grace", True)
    assert "signing began less than a tag's lifetime ago" in bounce.why
    (later, _, _) = explain.explain_address("bob@example.com", policy, TODAY + 30).verdicts
    assert (later.reason, later.passes) == ("unsigned", False)


def test_an_untagged_bounce_with_the_ledger_on_is_explained_as_decided_at_the_end_of_data() -> None:
    (bounce, other, _) = explain.explain_address("bob@example.com", POLICY, TODAY, ledger=True).verdicts
    assert (bounce.action, bounce.reason, bounce.passes, bounce.reply) == ("defer", "ledger", True, None)
    assert bounce.outcome.startswith("accept the RCPT and relay to bob@example.com; the message is decided")
    assert "explain cannot see" in bounce.outcome
    assert "Message-ID ledger is on" in bounce.why
    assert other.reason == "not-bounce"
    # A failed tag is never the ledger's to decide.
    forged = "prvs=0804000000=bob@example.com"
    (refused, _, _) = explain.explain_address(forged, POLICY, TODAY, ledger=True).verdicts
    assert (refused.action, refused.passes) == ("reject", False)
