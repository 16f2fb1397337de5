"""guard.py: the error tally (Postfix soft/hard error limits) and the per-client failed-guess limiter."""

from __future__ import annotations

import time

import pytest

from gateway.core import prvs, replies
from gateway.edge.nexthop import NextHopReply
from gateway.policy.guard import (
    ErrorTally,
    GuardSettings,
    GuessLimiter,
    Penalty,
    client_error,
    client_network,
)
from gateway.policy.guessbudget import BudgetRule, LocalBudget
from tests.smtp_peers import (
    FakeNextHop,
    RawClient,
    gateway_config,
    gateway_port,
    make_keyring,
    run,
    running_gateway,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_errors_below_the_soft_limit_cost_nothing() -> None:
    tally = ErrorTally(GuardSettings(soft_error_limit=3, hard_error_limit=6, error_sleep_time=2.0))
    assert [tally.error() for _ in range(3)] == [Penalty()] * 3


def test_only_the_clients_own_errors_count() -> None:
    tally = ErrorTally(GuardSettings(soft_error_limit=0, hard_error_limit=2, error_sleep_time=2.0))
    from_next_hop = [
        NextHopReply(452, ("4.5.3 Error: too many recipients",)),
        NextHopReply(451, ("4.3.0 <x@example.com>: Temporary lookup failure",)),
        replies.NEXT_HOP_DOWN,
        replies.NEXT_HOP_PROTOCOL,
        replies.NEXT_HOP_CANNOT_CARRY,
    ]
    assert [tally.reply(reply) for reply in from_next_hop] == [Penalty()] * len(from_next_hop)
    assert tally.reply(replies.TOO_MANY_ERRORS) == Penalty()  # 421: we close anyway
    assert tally.reply(replies.OK) == Penalty() and tally.errors == 0
    assert tally.reply(replies.bounce_refused("bob@example.com", "unsigned")) == Penalty(2.0)
    assert tally.errors == 1
    # A next hop's 5xx is a refusal the client earned (a harvest of unknown users): it counts.
    unknown = NextHopReply(550, ("5.1.1 <x@example.com>: Recipient address rejected",))
    assert tally.reply(unknown) == Penalty(0.0, disconnect=True)
    assert tally.errors == 2
    assert not client_error(NextHopReply(452, ("4.5.3 too many",))) and client_error(replies.BAD_SEQUENCE)


def test_errors_past_the_soft_limit_sleep_and_the_hard_limit_disconnects() -> None:
    tally = ErrorTally(GuardSettings(soft_error_limit=3, hard_error_limit=6, error_sleep_time=2.0))
    penalties = [tally.error() for _ in range(6)]
    # Postfix: sleep when errors > soft limit; disconnect when errors >= hard limit.
    assert penalties[3] == Penalty(2.0) and penalties[4] == Penalty(2.0)
    assert penalties[5] == Penalty(0.0, disconnect=True)


def test_guesses_within_the_burst_are_answered_at_once_then_one_per_interval() -> None:
    clock = FakeClock()
    limiter = GuessLimiter(GuardSettings(guess_rate=1.0, guess_burst=3, max_guess_delay=100), clock)
    delays = [limiter.failed_guess("192.0.2.1").delay for _ in range(6)]
    assert delays == [0.0, 0.0, 0.0, 1.0, 2.0, 3.0]


def test_guess_slots_come_back_with_time() -> None:
    clock = FakeClock()
    limiter = GuessLimiter(GuardSettings(guess_rate=2.0, guess_burst=1, max_guess_delay=100), clock)
    assert limiter.failed_guess("192.0.2.1").delay == 0.0
    assert limiter.failed_guess("192.0.2.1").delay == 0.5
    clock.now += 10
    assert limiter.failed_guess("192.0.2.1").delay == 0.0


def test_a_client_that_would_wait_too_long_is_disconnected_and_not_scheduled() -> None:
    clock = FakeClock()
    limiter = GuessLimiter(GuardSettings(guess_rate=1.0, guess_burst=1, max_guess_delay=2.0), clock)
    assert [limiter.failed_guess("192.0.2.1").delay for _ in range(3)] == [0.0, 1.0, 2.0]
    assert limiter.failed_guess("192.0.2.1") == Penalty(0.0, disconnect=True)
    # The refused guess took no slot: after one interval the client waits 2 s again, not 3.
    clock.now += 1.0
    assert limiter.failed_guess("192.0.2.1").delay == 2.0


def test_clients_are_limited_separately_and_ipv6_by_its_64() -> None:
    clock = FakeClock()
    limiter = GuessLimiter(GuardSettings(guess_rate=1.0, guess_burst=1, max_guess_delay=100), clock)
    assert limiter.failed_guess("192.0.2.1").delay == 0.0
    assert limiter.failed_guess("192.0.2.2").delay == 0.0
    assert limiter.failed_guess("2001:db8:1:2::1").delay == 0.0
    assert limiter.failed_guess("2001:db8:1:2:ffff::9").delay == 1.0  # same /64
    assert limiter.failed_guess("2001:db8:1:3::1").delay == 0.0


def test_client_network() -> None:
    assert client_network("192.0.2.7") == "192.0.2.7"
    assert client_network("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_network("2001:db8::1") == "2001:db8::/64"
    assert client_network("not-an-ip") == "not-an-ip"


def test_rate_zero_turns_the_limiter_off() -> None:
    limiter = GuessLimiter(GuardSettings(guess_rate=0.0), FakeClock())
    assert not limiter.enabled
    assert all(limiter.failed_guess("192.0.2.1") == Penalty() for _ in range(1000))


def test_the_table_forgets_clients_whose_schedule_has_run_out() -> None:
    clock = FakeClock()
    limiter = GuessLimiter(GuardSettings(guess_rate=1000.0, guess_burst=1), clock)
    for n in range(GuessLimiter._PRUNE_EVERY - 1):
        limiter.failed_guess(f"10.0.{n // 256}.{n % 256}")
    assert len(limiter) == GuessLimiter._PRUNE_EVERY - 1
    clock.now += 10
    limiter.failed_guess("192.0.2.1")
    assert len(limiter) == 1


@pytest.mark.parametrize(
    "kwargs", [{"hard_error_limit": 0}, {"error_sleep_time": -1}, {"guess_rate": -1}, {"guess_burst": 0}]
)
def test_impossible_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        GuardSettings(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ end to end


def forged_tags(address: str, count: int) -> list[str]:
    today = int(time.time()) // 86400
    good = prvs.sign(address, make_keyring(), today)
    head, code, local = good.split("=", 2)
    return [f"{head}={code[:4]}{n:06x}={local}" for n in range(count) if f"{code[:4]}{n:06x}" != code]


def test_a_client_that_keeps_guessing_tags_is_slowed_and_then_disconnected() -> None:
    slept: list[float] = []

    async def record(seconds: float) -> None:
        slept.append(seconds)

    async def body() -> None:
        limits = {
            "soft_error_limit": 2,
            "hard_error_limit": 6,
            "error_sleep_time": 0.5,
            "guess_rate": 1.0,
            "guess_burst": 2,
        }
        clock = FakeClock()  # frozen: the limiter sees every guess at the same instant
        async with FakeNextHop() as hop:
            cfg = gateway_config(hop.port, limits=limits)
            async with running_gateway(cfg, guess_clock=clock, sleep=record) as gw:
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                await client.cmd("MAIL FROM:<>")
                answers = [await client.cmd(f"RCPT TO:<{tag}>") for tag in forged_tags("bob@example.com", 6)]
                assert [code for code, _ in answers] == [550] * 6
                assert all("bad-hash" in text for _, text in answers)
                assert await client.rest() == f"{replies.TOO_MANY_ERRORS}\r\n".encode()
                await client.close()
            assert [c for c in hop.commands if c in ("MAIL", "RCPT")] == []
        # Guesses 1-2 are the burst; then one answered guess a second (1, 2, 3, 4 s on the frozen clock),
        # plus the tarpit's 0.5 s for errors 3-5 (past the soft limit of 2). Error 6 reaches the hard limit:
        # its answer still waits for its guess slot, then the client is disconnected.
        assert slept == [1.5, 2.5, 3.5, 4.0]

    run(body())


def test_the_guess_limit_holds_across_sessions_of_one_client() -> None:
    slept: list[float] = []

    async def record(seconds: float) -> None:
        slept.append(seconds)

    async def body() -> None:
        limits = {"soft_error_limit": 10, "hard_error_limit": 20, "guess_rate": 1.0, "guess_burst": 1}
        async with FakeNextHop() as hop:
            cfg = gateway_config(hop.port, limits=limits)
            async with running_gateway(cfg, guess_clock=FakeClock(), sleep=record) as gw:
                for tag in forged_tags("bob@example.com", 3):
                    client = await RawClient.connect(gateway_port(gw))
                    await client.ehlo()
                    await client.cmd("MAIL FROM:<>")
                    assert (await client.cmd(f"RCPT TO:<{tag}>"))[0] == 550
                    await client.cmd("QUIT")
                    await client.close()
        assert slept == [1.0, 2.0]

    run(body())


def test_a_guess_over_the_clients_budget_is_never_answered() -> None:
    async def record(seconds: float) -> None:
        pass

    async def body() -> None:
        # No tarpit, a huge hard limit: only the guess limiter acts. Its wait may not exceed 0 s here,
        # so the second guess (which would have to wait a second) gets 421 instead of its answer.
        limits = {"soft_error_limit": 100, "hard_error_limit": 200, "guess_rate": 1.0, "guess_burst": 1}
        async with FakeNextHop() as hop:
            cfg = gateway_config(hop.port, limits=limits)
            async with running_gateway(cfg, guess_clock=FakeClock(), sleep=record) as gw:
                strict = LocalBudget(BudgetRule("guess-budget", rate=1.0, burst=1, max_delay=0.0))
                for listener in gw.listeners:
                    listener.context.guesses = strict
                client = await RawClient.connect(gateway_port(gw))
                await client.ehlo()
                await client.cmd("MAIL FROM:<>")
                first, second = forged_tags("bob@example.com", 2)
                assert (await client.cmd(f"RCPT TO:<{first}>"))[0] == 550
                client.send(f"RCPT TO:<{second}>")
                assert await client.rest() == f"{replies.TOO_MANY_ERRORS}\r\n".encode()
                await client.close()

    run(body())
