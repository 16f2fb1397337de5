"""The one policy, as the three front ends see it: verdicts for each envelope address."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.core import prvs, srs
from gateway.core.addresses import parse_address
from gateway.core.keyring import Key, Keyring, KeyState
from gateway.policy.policy import Action, InvalidTagAction, Policy, PolicySettings, Reason

TODAY = 20_000
OLD = Key(1, b"o" * 32, KeyState.VERIFY)
NEW = Key(2, b"n" * 32, KeyState.ACTIVE)
KEYRING = Keyring((OLD, NEW))
SETTINGS = PolicySettings(
    local_domains=frozenset({"example.com", "plain.example"}),
    signed_domains=frozenset({"example.com"}),
    srs_alias="fwd.example.com",
    exempt_recipients=frozenset({"lists.example.com", "owner@example.com"}),
    exempt_senders=frozenset({"list-bounces@example.com"}),
    observe_domains=frozenset(),
)
NULL = None
SOMEONE = parse_address("someone@elsewhere.example")


def policy(**changes: object) -> Policy:
    from dataclasses import replace

    return Policy(replace(SETTINGS, **changes), KEYRING)  # type: ignore[arg-type]


def rcpt(text: str) -> object:
    return parse_address(text)


def signed(address: str, today: int = TODAY) -> str:
    return prvs.sign(address, KEYRING, today, 7)


def test_a_valid_bounce_is_relayed_with_the_tag_stripped() -> None:
    v = policy().inbound_rcpt(NULL, parse_address(signed("bob@example.com")), TODAY)
    assert (v.action, v.address, v.reason, v.key_id) == (
        Action.RELAY,
        "bob@example.com",
        Reason.VALID_PRVS,
        2,
    )
    assert v.reply is None and not v.failed_guess


def test_a_tag_from_a_verify_only_key_is_still_valid() -> None:
    tag = prvs.sign("bob@example.com", Keyring((Key(1, b"o" * 32),)), TODAY, 7)
    v = policy().inbound_rcpt(NULL, parse_address(tag), TODAY + 3)
    assert v.action is Action.RELAY and v.key_id == 1


@pytest.mark.parametrize(
    ("address", "reason", "guess"),
    [
        ("bob@example.com", Reason.UNSIGNED, False),
        ("prvs=2003abcdef=bob@example.com", Reason.BAD_HASH, True),
        ("prvs=9003abcdef=bob@example.com", Reason.UNKNOWN_KEY, True),
    ],
)
def test_forged_and_unsigned_bounces_are_refused(address: str, reason: Reason, guess: bool) -> None:
    v = policy().inbound_rcpt(NULL, parse_address(address), TODAY)
    assert v.action is Action.REJECT
    assert v.reason is reason
    assert v.failed_guess is guess
    assert v.reply is not None
    assert (v.reply.code, v.reply.status) == (550, "5.7.1")
    assert str(v.reply) == f"550 5.7.1 <{address}>: bounce to an address we never signed ({reason.value})"


def test_an_expired_tag_is_refused_but_is_not_a_guess() -> None:
    v = policy().inbound_rcpt(NULL, parse_address(signed("bob@example.com", TODAY - 8)), TODAY)
    assert (v.action, v.reason, v.failed_guess) == (Action.REJECT, Reason.EXPIRED, False)


@pytest.mark.parametrize("local", ["postmaster", "Abuse", "owner"])
def test_exempt_recipients_take_any_bounce(local: str) -> None:
    v = policy().inbound_rcpt(NULL, parse_address(f"{local}@example.com"), TODAY)
    assert (v.action, v.reason) == (Action.RELAY, Reason.EXEMPT)


def test_an_exempt_domain_takes_any_bounce() -> None:
    v = policy(
        local_domains=frozenset({"example.com", "lists.example.com"}),
        signed_domains=frozenset({"example.com", "lists.example.com"}),
    ).inbound_rcpt(NULL, parse_address("x@lists.example.com"), TODAY)
    assert v.reason is Reason.EXEMPT


def test_a_bounce_to_an_unsigned_local_domain_passes() -> None:
    v = policy().inbound_rcpt(NULL, parse_address("bob@plain.example"), TODAY)
    assert (v.action, v.reason) == (Action.RELAY, Reason.NOT_SIGNED_DOMAIN)


@pytest.mark.parametrize(
    "address",
    [
        "bob@elsewhere.example",
        "bob%elsewhere.example@example.com",
        "elsewhere.example!bob@example.com",
        '"bob@elsewhere.example"@example.com',
    ],
)
def test_relaying_and_sender_specified_routing_are_refused(address: str) -> None:
    v = policy().inbound_rcpt(SOMEONE, parse_address(address), TODAY)  # type: ignore[arg-type]
    assert v.action is Action.REJECT
    assert v.reply is not None and (v.reply.code, v.reply.status) == (554, "5.7.1")


def test_observe_mode_accepts_and_reports_the_would_reject() -> None:
    for p, observe in ((policy(), True), (policy(observe_domains=frozenset({"example.com"})), False)):
        v = p.inbound_rcpt(NULL, parse_address("bob@example.com"), TODAY, observe=observe)
        assert (v.action, v.reason, v.address) == (Action.RELAY, Reason.UNSIGNED, "bob@example.com")
        assert v.would_reject is not None and v.would_reject.code == 550


def test_replies_to_a_tag_get_it_stripped_and_an_invalid_one_is_configurable() -> None:
    good = policy().inbound_rcpt(SOMEONE, parse_address(signed("bob@example.com")), TODAY)  # type: ignore[arg-type]
    assert (good.action, good.address) == (Action.RELAY, "bob@example.com")
    forged = parse_address("prvs=2003abcdef=bob@example.com")
    accepted = policy().inbound_rcpt(SOMEONE, forged, TODAY)  # type: ignore[arg-type]
    assert (accepted.action, accepted.address, accepted.reason) == (
        Action.RELAY,
        "bob@example.com",
        Reason.TAG_INVALID_ACCEPTED,
    )
    refused = policy(invalid_tag_with_sender=InvalidTagAction.REJECT).inbound_rcpt(SOMEONE, forged, TODAY)  # type: ignore[arg-type]
    assert refused.action is Action.REJECT and refused.failed_guess


def test_plain_mail_passes_untouched() -> None:
    v = policy().inbound_rcpt(SOMEONE, parse_address("bob@example.com"), TODAY)  # type: ignore[arg-type]
    assert (v.action, v.address, v.reason) == (Action.RELAY, "bob@example.com", Reason.NOT_BOUNCE)


def test_a_valid_srs_bounce_is_reversed_and_a_forged_one_refused() -> None:
    forwarded = srs.forward(
        "alice@remote.example", "fwd.example.com", KEYRING.srs_secrets(), TODAY, srs.SrsOptions()
    )
    v = policy().inbound_rcpt(NULL, parse_address(forwarded), TODAY + 1)
    assert (v.action, v.address, v.reason) == (Action.RELAY, "alice@remote.example", Reason.VALID_SRS)
    forged = forwarded.replace(forwarded[5:9], "AAAA" if forwarded[5:9] != "AAAA" else "BBBB", 1)
    v = policy().inbound_rcpt(NULL, parse_address(forged), TODAY + 1)
    assert (v.action, v.reason) == (Action.REJECT, Reason.BAD_HASH)
    assert v.address == forged  # a forged SRS address is never decoded


def test_outbound_signs_our_senders_and_srs_rewrites_foreign_ones() -> None:
    p = policy()
    ours = p.outbound_sender(parse_address("bob@example.com"), TODAY)
    assert ours.reason is Reason.PRVS and ours.key_id == 2
    assert ours.address == signed("bob@example.com")
    foreign = p.outbound_sender(parse_address("alice@remote.example"), TODAY)
    assert foreign.reason is Reason.SRS0 and foreign.address.startswith("SRS0=")
    assert foreign.address.endswith("@fwd.example.com")
    again = p.outbound_sender(parse_address("SRS0=abcd=IL=remote.example=alice@other.example"), TODAY)
    assert again.reason is Reason.SRS1 and again.address.startswith("SRS1=")


@pytest.mark.parametrize(
    ("sender", "reason"),
    [
        (None, Reason.NULL_SENDER),
        ("prvs=1234567890=bob@example.com", Reason.ALREADY_TAGGED),
        ("SRS0=abcd=IL=remote.example=alice@fwd.example.com", Reason.ALREADY_TAGGED),
        ("carol@fwd.example.com", Reason.ALIAS_DOMAIN),
    ],
)
def test_outbound_leaves_these_senders_alone(sender: str | None, reason: Reason) -> None:
    address = parse_address(sender) if sender else None
    v = policy().outbound_sender(address, TODAY)
    assert v.reason is reason
    assert v.address == (sender or "")


def test_rewrite_exemptions() -> None:
    p = policy(skip_local_recipients=True)
    bob = parse_address("bob@example.com")
    assert p.rewrite_exemption(None, bob) is Reason.NULL_SENDER
    assert p.rewrite_exemption(parse_address("list-bounces@example.com"), SOMEONE) is Reason.EXEMPT_SENDER  # type: ignore[arg-type]
    assert p.rewrite_exemption(bob, parse_address("x@lists.example.com")) is Reason.EXEMPT_RECIPIENT
    assert p.rewrite_exemption(bob, parse_address("carol@plain.example")) is Reason.LOCAL_RECIPIENT
    assert p.rewrite_exemption(bob, SOMEONE) is None  # type: ignore[arg-type]
    assert policy().rewrite_exemption(bob, parse_address("carol@plain.example")) is None
    v = p.outbound_sender(bob, TODAY, Reason.LOCAL_RECIPIENT)
    assert (v.address, v.reason) == ("bob@example.com", Reason.LOCAL_RECIPIENT)


def test_outbound_without_an_active_key_is_a_temporary_failure() -> None:
    p = Policy(SETTINGS, Keyring((Key(1, b"o" * 32, KeyState.VERIFY),)))
    v = p.outbound_sender(parse_address("bob@example.com"), TODAY)
    assert v.action is Action.TEMPFAIL
    assert v.reply is not None and (v.reply.code, v.reply.status) == (451, "4.3.5")


def test_reverse_recipient_for_the_socketmap() -> None:
    p = policy()
    assert p.reverse_recipient(parse_address(signed("bob@example.com")), TODAY) == "bob@example.com"
    assert p.reverse_recipient(parse_address("prvs=2003abcdef=bob@example.com"), TODAY) is None
    assert p.reverse_recipient(parse_address("bob@example.com"), TODAY) is None
    forwarded = srs.forward(
        "alice@remote.example", "fwd.example.com", KEYRING.srs_secrets(), TODAY, srs.SrsOptions()
    )
    assert p.reverse_recipient(parse_address(forwarded), TODAY) == "alice@remote.example"


def test_an_srs_sender_of_another_forwarder_in_a_signed_domain_is_left_alone() -> None:
    sender = parse_address("SRS0=abcd=IL=remote.example=alice@example.com")
    v = policy().outbound_sender(sender, TODAY)
    assert (v.action, v.address, v.reason) == (Action.RELAY, str(sender), Reason.NOT_REWRITTEN)


def test_a_quoted_sender_is_forwarded_as_srs0() -> None:
    v = policy().outbound_sender(parse_address('"alice smith"@remote.example'), TODAY)
    assert v.reason is Reason.SRS0
    assert v.address.startswith('"SRS0=')


# ---------------------------------------------------------------- the grace window after signing began

# Signing began one hour into day TODAY: the window is days TODAY to TODAY + 6 (lifetime_days = 7).
BEGAN = datetime.fromtimestamp(TODAY * 86400 + 3600, UTC)
SIGNING_SINCE_TODAY = Keyring((OLD, NEW), signing_began=BEGAN)


def grace_policy(**changes: object) -> Policy:
    from dataclasses import replace

    return Policy(replace(SETTINGS, **changes), SIGNING_SINCE_TODAY)  # type: ignore[arg-type]


@pytest.mark.parametrize("today", [TODAY, TODAY + 6])
def test_a_bounce_to_an_untagged_address_is_accepted_in_the_grace_window(today: int) -> None:
    v = grace_policy().inbound_rcpt(NULL, parse_address("bob@example.com"), today)
    assert (v.action, v.reason, v.address) == (Action.RELAY, Reason.GRACE, "bob@example.com")
    assert v.reply is None and v.would_reject is None and not v.failed_guess


@pytest.mark.parametrize("today", [TODAY + 7, TODAY + 400])
def test_after_the_grace_window_a_bounce_to_an_untagged_address_is_refused(today: int) -> None:
    v = grace_policy().inbound_rcpt(NULL, parse_address("bob@example.com"), today)
    assert (v.action, v.reason) == (Action.REJECT, Reason.UNSIGNED)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("prvs=2003abcdef=bob@example.com", Reason.BAD_HASH),
        ("prvs=9003abcdef=bob@example.com", Reason.UNKNOWN_KEY),
        ("SRS0=abcd@fwd.example.com", Reason.MALFORMED),
        (prvs.sign("bob@example.com", SIGNING_SINCE_TODAY, TODAY - 8, 7), Reason.EXPIRED),
        ("SRS0=xxxx=ZZ=elsewhere.example=bob@fwd.example.com", Reason.BAD_HASH),
    ],
)
def test_the_grace_window_never_covers_a_tag_that_fails(address: str, reason: Reason) -> None:
    v = grace_policy().inbound_rcpt(NULL, parse_address(address), TODAY)
    assert (v.action, v.reason) == (Action.REJECT, reason)


def test_without_the_setting_or_a_recorded_start_there_is_no_grace_window() -> None:
    for p in (grace_policy(bounce_grace=False), policy()):
        v = p.inbound_rcpt(NULL, parse_address("bob@example.com"), TODAY)
        assert (v.action, v.reason) == (Action.REJECT, Reason.UNSIGNED)


def test_observe_mode_still_reports_an_untagged_bounce_in_the_grace_window() -> None:
    for p, observe in (
        (grace_policy(), True),
        (grace_policy(observe_domains=frozenset({"example.com"})), False),
    ):
        v = p.inbound_rcpt(NULL, parse_address("bob@example.com"), TODAY, observe=observe)
        assert (v.action, v.reason) == (Action.RELAY, Reason.UNSIGNED)
        assert v.would_reject is not None


def test_the_grace_window_changes_nothing_but_untagged_bounces() -> None:
    p = grace_policy()
    assert p.inbound_rcpt(SOMEONE, parse_address("bob@example.com"), TODAY).reason is Reason.NOT_BOUNCE  # type: ignore[arg-type]
    assert p.inbound_rcpt(NULL, parse_address("bob@plain.example"), TODAY).reason is Reason.NOT_SIGNED_DOMAIN
    assert p.inbound_rcpt(NULL, parse_address("postmaster@example.com"), TODAY).reason is Reason.EXEMPT
    valid = p.inbound_rcpt(NULL, parse_address(signed("bob@example.com")), TODAY)
    assert (valid.reason, valid.address) == (Reason.VALID_PRVS, "bob@example.com")


# ---------------------------------------------------------------- the Message-ID ledger (deferred to DATA)


def test_with_the_ledger_a_bounce_to_an_untagged_address_is_deferred_not_refused() -> None:
    v = policy().inbound_rcpt(NULL, parse_address("bob@example.com"), TODAY, ledger=True)
    assert (v.action, v.address, v.reason, v.reply) == (Action.DEFER, "bob@example.com", Reason.LEDGER, None)
    # A front end that cannot read the message (the policy service) never asks: refused as before.
    v = policy().inbound_rcpt(NULL, parse_address("bob@example.com"), TODAY)
    assert (v.action, v.reason) == (Action.REJECT, Reason.UNSIGNED)


def test_the_grace_window_comes_before_the_ledger() -> None:
    v = grace_policy().inbound_rcpt(NULL, parse_address("bob@example.com"), TODAY, ledger=True)
    assert (v.action, v.reason) == (Action.RELAY, Reason.GRACE)


GOOD_TAG = signed("bob@example.com")  # prvs=KDDDHHHHHH=bob@example.com


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        (GOOD_TAG[:14] + ("0" if GOOD_TAG[14] != "0" else "1") + GOOD_TAG[15:], Reason.BAD_HASH),
        ("prvs=0" + GOOD_TAG[6:], Reason.UNKNOWN_KEY),
        (signed("bob@example.com", TODAY - 30), Reason.EXPIRED),
    ],
)
def test_the_ledger_never_vouches_for_a_tag_that_fails(address: str, reason: Reason) -> None:
    v = policy().inbound_rcpt(NULL, parse_address(address), TODAY, ledger=True)
    assert (v.action, v.reason) == (Action.REJECT, reason)


def test_the_ledger_defers_only_bounces_to_signed_domains() -> None:
    p = policy()
    assert p.inbound_rcpt(NULL, parse_address("bob@plain.example"), TODAY, ledger=True).reason is (
        Reason.NOT_SIGNED_DOMAIN
    )
    assert (
        p.inbound_rcpt(SOMEONE, parse_address("bob@example.com"), TODAY, ledger=True).reason
        is Reason.NOT_BOUNCE
    )
    assert (
        p.inbound_rcpt(NULL, parse_address("postmaster@example.com"), TODAY, ledger=True).reason
        is Reason.EXEMPT
    )


def test_in_observe_mode_the_ledger_still_defers_and_observes_says_so() -> None:
    p = policy(observe_domains=frozenset({"example.com"}))
    v = p.inbound_rcpt(NULL, parse_address("bob@example.com"), TODAY, ledger=True)
    assert v.action is Action.DEFER
    assert p.observes(parse_address("bob@example.com")) and not policy().observes(
        parse_address("bob@example.com")
    )
    assert policy().observes(parse_address("bob@example.com"), observe=True)


def test_the_ledger_keys_come_from_the_keyring() -> None:
    assert policy().ledger_keys is None
    with_secret = Policy(SETTINGS, Keyring((OLD, NEW), ledger_secret=b"l" * 32))
    assert with_secret.ledger_keys is not None
