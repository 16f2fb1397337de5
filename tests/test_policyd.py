"""The policy delegation server: the request codec, decisions from the one policy, the guess limiter, the
wire, and a private Postfix loaded with deploy/postfix/policy-main.cf refusing a forged bounce at RCPT."""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import re
import signal
import smtplib
import socket
import stat
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from postfix_instance import (
    DEPLOY_POSTFIX,
    PostfixInstance,
    ServerThread,
    SmtpSink,
    load_snippet,
    private_root,
)
from prometheus_client import CollectorRegistry
from test_socketmap import Command, assert_stopped_last, socket_config, spool_socket, today, write_keyring

from gateway.core import prvs
from gateway.core.keyring import Key, Keyring, KeyState
from gateway.edge.relay import PolicyHolder
from gateway.ops import config as config_module
from gateway.ops.redisstore import RedisBudget, RedisState
from gateway.ops.state import budget_rules
from gateway.policy.guard import Penalty
from gateway.policy.guessbudget import BudgetRule, LocalBudget
from gateway.policy.policy import Action, Policy, PolicySettings, Reason
from gateway.postfix.policyd import (
    DUNNO,
    PolicyAnswer,
    PolicyCounters,
    PolicyEvent,
    PolicyService,
    ProtocolError,
    RequestReader,
    Verb,
    decide,
    start_policyd,
)
from tests.redis_server import RedisServer
from tests.smtp_peers import run

TODAY = 20_000
KEYRING = Keyring((Key(4, b"p" * 32, KeyState.ACTIVE),))
SETTINGS = PolicySettings(
    local_domains=frozenset({"example.org", "observed.example"}),
    signed_domains=frozenset({"example.org", "observed.example"}),
    observe_domains=frozenset({"observed.example"}),
)
HOLDER = PolicyHolder(Policy(SETTINGS, KEYRING))
TAG = prvs.sign("user@example.org", KEYRING, TODAY)
FORGED = "prvs=4000000000=user@example.org"


def request(**attrs: str) -> dict[str, str]:
    base = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": "192.0.2.7",
        "sender": "",
        "recipient": "user@example.org",
        "instance": "1a2b.5f3e.1",
    }
    return base | attrs


def wire(attrs: dict[str, str]) -> bytes:
    return "".join(f"{k}={v}\n" for k, v in attrs.items()).encode() + b"\n"


# --- the request codec ---------------------------------------------------------------------------------


def test_requests_are_split_however_the_bytes_arrive() -> None:
    reader = RequestReader()
    got = []
    for octet in wire(request()) + wire(request(recipient="b@example.org")):
        reader.feed(bytes([octet]))
        while (attrs := reader.next()) is not None:
            got.append(attrs)
    assert [a["recipient"] for a in got] == ["user@example.org", "b@example.org"]
    assert got[0]["sender"] == "" and got[0]["protocol_state"] == "RCPT"


def test_a_value_may_hold_an_equals_sign() -> None:
    reader = RequestReader()
    reader.feed(b"ccert_subject=CN=x,O=y\n\n")
    assert reader.next() == {"ccert_subject": "CN=x,O=y"}


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"no equals sign\n", "name=value"),
        (b"=value\n", "name=value"),
        (b"name=\xff\n", "not UTF-8"),
        (b"a=" + b"x" * 100 + b"\n", "over 64 octets"),
        (b"a=" + b"x" * 100, "over 64 octets"),  # refused before its newline arrives
        (b"".join(b"a%d=1\n" % n for n in range(11)), "over 10 attributes"),
        (b"".join(b"a=%d\n" % n for n in range(60)), "over 200 octets"),
    ],
)
def test_broken_requests_are_protocol_errors(data: bytes, why: str) -> None:
    reader = RequestReader(max_line=64, max_request=200, max_attributes=10)
    reader.feed(data)
    with pytest.raises(ProtocolError, match=why):
        reader.next()


# --- decisions: the policy's, translated ---------------------------------------------------------------


def answer_for(**attrs: str) -> PolicyAnswer:
    return decide(HOLDER, request(**attrs), TODAY).answer


def test_a_bounce_to_an_unsigned_address_is_refused_with_the_policys_reply() -> None:
    got = answer_for()
    assert got.verb is Verb.REPLY
    assert got.wire() == (
        b"action=550 5.7.1 <user@example.org>: bounce to an address we never signed (unsigned)\n\n"
    )


def test_a_bounce_to_a_forged_tag_is_refused_and_counts_as_a_guess() -> None:
    decision = decide(HOLDER, request(recipient=FORGED), TODAY)
    assert decision.answer.verb is Verb.REPLY and str(decision.answer.reply).startswith("550 5.7.1")
    assert decision.verdict is not None and decision.verdict.failed_guess
    assert decision.verdict.reason is Reason.BAD_HASH


@pytest.mark.parametrize(
    "attrs",
    [
        {"recipient": TAG},  # a genuine bounce
        {"recipient": "postmaster@example.org"},  # RFC 5321 4.5.1
        {"recipient": "abuse@example.org"},
        {"sender": "someone@elsewhere.test"},  # not a bounce
        {"recipient": "friend@elsewhere.test"},  # not ours: relaying is Postfix's decision
        {"protocol_state": "MAIL"},
        {"protocol_state": "DATA"},
        {"request": "something_else"},
        {"recipient": "not an address"},
        {"sender": "<<broken"},
    ],
)
def test_everything_else_is_dunno_so_postfix_rules_still_apply(attrs: dict[str, str]) -> None:
    assert answer_for(**attrs) == DUNNO
    assert DUNNO.wire() == b"action=DUNNO\n\n"


def test_observe_mode_accepts_and_marks_with_a_header() -> None:
    decision = decide(HOLDER, request(recipient=FORGED), TODAY, observe=True)
    assert decision.answer == PolicyAnswer(Verb.PREPEND, text="X-BATV-Observe: would-reject reason=bad-hash")
    assert decision.answer.wire() == b"action=PREPEND X-BATV-Observe: would-reject reason=bad-hash\n\n"
    assert decision.verdict is not None and decision.verdict.action is Action.RELAY
    # A domain in observe_domains is observed whatever the server's mode.
    domain = decide(HOLDER, request(recipient="user@observed.example"), TODAY)
    assert domain.answer.verb is Verb.PREPEND


def test_the_grace_window_after_signing_began_is_the_same_here() -> None:
    began = Keyring(KEYRING.keys, signing_began=datetime.fromtimestamp(TODAY * 86400, UTC))
    holder = PolicyHolder(Policy(SETTINGS, began))
    inside = decide(holder, request(), TODAY + 6)
    assert inside.answer == DUNNO
    assert inside.verdict is not None and inside.verdict.reason is Reason.GRACE
    assert decide(holder, request(), TODAY + 7).answer.verb is Verb.REPLY
    assert decide(holder, request(recipient=FORGED), TODAY).answer.verb is Verb.REPLY


# --- the server, over sockets ---------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.events: list[PolicyEvent] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)  # held answers are recorded, not waited for

    def event(self, event: PolicyEvent) -> None:
        self.events.append(event)


def server(svc: PolicyService) -> ServerThread:
    return ServerThread(lambda: start_policyd(svc, "127.0.0.1", 0), svc.close_connections)


def ask(sock: socket.socket, *requests: dict[str, str]) -> list[str]:
    sock.sendall(b"".join(wire(r) for r in requests))
    f = sock.makefile("rb")
    answers = []
    for _ in requests:
        line = f.readline()
        assert f.readline() == b"\n", "every answer ends with an empty line"
        answers.append(line.decode().rstrip("\n"))
    return answers


def service(rec: Recorder, **kw: object) -> PolicyService:
    return PolicyService(
        HOLDER,
        clock=lambda: TODAY * 86400 + 60,
        sleep=rec.sleep,
        on_decision=rec.event,
        **kw,  # type: ignore[arg-type]
    )


def test_one_connection_answers_many_requests_and_logs_each_decision() -> None:
    rec = Recorder()
    with server(service(rec)) as srv, socket.create_connection(("127.0.0.1", srv.port)) as s:
        got = ask(
            s,
            request(),
            request(recipient=TAG),
            request(sender="a@elsewhere.test", recipient="b@example.org"),
            request(protocol_state="MAIL"),
        )
    assert got[0].startswith("action=550 5.7.1 <user@example.org>")
    assert got[1:] == ["action=DUNNO"] * 3
    # One event per recipient the policy judged (not for the MAIL-stage request).
    assert [(e.recipient, e.action, e.reason) for e in rec.events] == [
        ("user@example.org", Action.REJECT, Reason.UNSIGNED),
        (TAG, Action.RELAY, Reason.VALID_PRVS),
        ("b@example.org", Action.RELAY, Reason.NOT_BOUNCE),
    ]
    assert rec.events[0].sender is None and rec.events[0].client == "192.0.2.7"
    assert rec.events[1].key_id == 4


def test_failed_guesses_are_slowed_and_then_the_client_is_disconnected() -> None:
    rec = Recorder()
    limiter = LocalBudget(BudgetRule("guess-budget", rate=1.0, burst=1, max_delay=1.5, network_factor=0))
    with server(service(rec, guesses=limiter)) as srv, socket.create_connection(("127.0.0.1", srv.port)) as s:
        forged = request(recipient=FORGED)
        got = ask(
            s, forged, forged, request(), forged, request(client_address="198.51.100.9", recipient=FORGED)
        )
    assert got[0].startswith("action=550 5.7.1") and got[1].startswith("action=550 5.7.1")
    assert len(rec.sleeps) == 1 and 0.5 < rec.sleeps[0] <= 1.0, "the second guess is held about 1 s"
    assert got[2].startswith("action=550 5.7.1"), "an unsigned address is backscatter, not a guess"
    assert got[3] == "action=421 4.7.0 Too many errors, closing connection", "421: Postfix disconnects"
    assert got[4].startswith("action=550 5.7.1"), "another client has its own allowance"


def test_observe_mode_prepends_one_header_per_message() -> None:
    rec = Recorder()
    with server(service(rec, observe=True)) as srv, socket.create_connection(("127.0.0.1", srv.port)) as s:
        got = ask(
            s,
            request(recipient=FORGED),
            request(recipient="other@example.org"),  # same message (instance)
            request(recipient=FORGED, instance="next.message"),
        )
    assert got == [
        "action=PREPEND X-BATV-Observe: would-reject reason=bad-hash",
        "action=DUNNO",
        "action=PREPEND X-BATV-Observe: would-reject reason=bad-hash",
    ]
    assert rec.sleeps == [], "observe mode never holds an answer"
    assert all(e.would_reject is not None for e in rec.events)


def test_garbage_gets_defer_if_permit_and_is_closed_and_the_server_lives_on() -> None:
    rec = Recorder()
    svc = service(rec)
    with server(svc) as srv:
        for garbage in (b"GET / HTTP/1.0\r\n\r\n", b"x=" + b"y" * 70000, b"a=\xff\n\n"):
            with socket.create_connection(("127.0.0.1", srv.port)) as s:
                s.sendall(garbage)
                f = s.makefile("rb")
                assert f.readline() == b"action=DEFER_IF_PERMIT 4.3.5 malformed policy request\n"
                assert f.readline() == b"\n"
                assert f.readline() == b"", "closed after the answer"
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            assert ask(s, request(recipient=TAG)) == ["action=DUNNO"]


def test_a_failing_policy_costs_one_answer_not_the_server(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        @property
        def policy(self) -> Policy:
            raise RuntimeError("bug")

    svc = PolicyService(Broken(), on_decision=lambda e: None)
    with caplog.at_level(logging.ERROR, "gateway.policyd"), server(svc) as srv:
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            assert (
                ask(s, request(), request())
                == ["action=DEFER_IF_PERMIT 4.3.0 policy service error, try again later"] * 2
            )
    assert "policy decision failed" in caplog.text


def counted(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_the_service_counts_connections_answers_and_errors() -> None:
    registry = CollectorRegistry()
    svc = service(Recorder(), counters=PolicyCounters(registry))
    assert counted(registry, "batv_policy_errors_total", kind="protocol") == 0.0
    with server(svc) as srv:
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            ask(s, request(), request(recipient=TAG), request(recipient=TAG))
            assert srv.call(lambda: registry.get_sample_value("batv_policy_open_connections")) == 1
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert s.makefile("rb").read().startswith(b"action=DEFER_IF_PERMIT")
    assert counted(registry, "batv_policy_connections_total") == 2
    assert counted(registry, "batv_policy_requests_total", action="reply") == 1
    assert counted(registry, "batv_policy_requests_total", action="dunno") == 2
    assert counted(registry, "batv_policy_requests_total", action="defer_if_permit") == 1
    assert counted(registry, "batv_policy_errors_total", kind="protocol") == 1
    assert counted(registry, "batv_policy_errors_total", kind="internal") == 0


def test_a_failure_of_ours_is_counted_as_internal(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        @property
        def policy(self) -> Policy:
            raise RuntimeError("bug")

    registry = CollectorRegistry()
    svc = PolicyService(Broken(), on_decision=lambda e: None, counters=PolicyCounters(registry))
    with caplog.at_level(logging.ERROR, "gateway.policyd"), server(svc) as srv:
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            ask(s, request())
    assert counted(registry, "batv_policy_errors_total", kind="internal") == 1
    assert counted(registry, "batv_policy_requests_total", action="defer_if_permit") == 1


# --- the command: a socket file, its metrics endpoint ----------------------------------------------------


def wait_for_line(cmd: Command, pattern: str) -> re.Match[str]:
    assert cmd.proc.stderr is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = cmd.proc.stderr.readline()
        if not line:
            break
        cmd.lines.append(line)
        if found := re.search(pattern, line):
            return found
    raise AssertionError(f"no line matching {pattern!r}: {''.join(cmd.lines)}")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def policy_with_metrics(root: Path) -> tuple[Command, Path, int]:
    """`batv-gateway policy` on a socket file, with [policyd] metrics_listen on a free port."""
    write_keyring(root / "keyring.toml")
    folder = root / "run"
    folder.mkdir()
    config = root / "policy.toml"
    config.write_text(
        f'[gateway]\nkeyring = "{root / "keyring.toml"}"\nlocal_domains = ["example.org"]\n'
        f'[policyd]\nlisten = "unix:{folder / "policy"}"\nsocket_group = "nogroup"\n'
        'metrics_listen = "127.0.0.1:0"\n'
    )
    cmd = Command("policy", "--config", str(config))
    cmd.wait_listening(1)
    port = int(wait_for_line(cmd, r"metrics=127\.0\.0\.1:(\d+)").group(1))
    return cmd, cmd.paths["enforce mode"], port


def test_the_command_answers_on_its_socket_file_and_counts_on_its_metrics_endpoint(root: Path) -> None:
    cmd, path, port = policy_with_metrics(root)
    try:
        st = os.lstat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == grp.getgrnam("nogroup").gr_gid
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            got = ask(s, request(), request(sender="a@elsewhere.test"))
        assert (
            got[0] == "action=550 5.7.1 <user@example.org>: bounce to an address we never signed (unsigned)"
        )
        assert got[1] == "action=DUNNO"
        metrics = scrape(port)
    finally:
        code, log = cmd.stop()
    assert code == 0, log
    assert not path.exists(), "the socket file is removed on shutdown"
    assert_stopped_last(log)
    assert "batv_policy_connections_total 1.0" in metrics
    assert 'batv_policy_requests_total{action="reply"} 1.0' in metrics
    assert 'batv_policy_requests_total{action="dunno"} 1.0' in metrics
    assert 'batv_decisions_total{reason="unsigned",role="policyd",verdict="reject"} 1.0' in metrics
    assert "batv_keyring_active_key_id 0.0" in metrics


def test_a_second_sigterm_during_shutdown_still_removes_the_socket_file(root: Path) -> None:
    """timeout(1) signals the command, then its process group: the second SIGTERM can land after the event
    loop's handlers are gone, where the default action would kill the process before it cleans up."""
    cmd, path, _ = policy_with_metrics(root)
    try:
        while cmd.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(cmd.proc.pid, signal.SIGTERM)
            time.sleep(0.001)
    finally:
        code, log = cmd.stop()
    assert not path.exists(), log
    # Once it has cleaned up, the interpreter's own exit restores the default action: a SIGTERM then
    # ends it with -15, which is too late to matter.
    assert code in (0, -signal.SIGTERM), log


# --- real Postfix --------------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    with private_root(keep_log_in=tmp_path) as path:
        yield path


def postfix_with_policy(root: Path, sink_port: int) -> PostfixInstance:
    """A private Postfix with deploy/postfix/policy-main.cf as shipped: check_policy_service unix:batv/policy,
    the socket file in its queue directory (spool_socket)."""
    pf = PostfixInstance(
        root / "pf",
        hostname="mx.example.org",
        # Loopback is the test's client: it must not be in mynetworks, or permit_mynetworks skips the check.
        mynetworks="192.0.2.0/24",
        relayhost=f"[127.0.0.1]:{sink_port}",
        main={"relay_domains": "example.org", "smtpd_error_sleep_time": "0"},
    )
    pf.add_main(load_snippet(DEPLOY_POSTFIX / "policy-main.cf"))
    return pf


def test_postfix_refuses_a_forged_bounce_at_rcpt_and_accepts_a_genuine_one(root: Path) -> None:
    kf = write_keyring(root / "keyring.toml")
    cmd = Command("policy", "--config", str(socket_config(root, "policyd", spool_socket(root, "policy"))))
    try:
        cmd.wait_listening(1)
        assert cmd.paths["enforce mode"] == root / "pf" / "spool" / "batv" / "policy"
        with SmtpSink(root / "sink") as sink:
            pf = postfix_with_policy(root, sink.port)
            with pf, smtplib.SMTP("127.0.0.1", pf.smtp_port) as client:
                assert "check_policy_service unix:batv/policy" in pf.postconf(
                    "-h", "smtpd_recipient_restrictions"
                )
                client.ehlo("remote-mta.test")
                assert client.mail("")[0] == 250
                code, text = client.rcpt("user@example.org")
                assert (code, text[:6]) == (550, b"5.7.1 ")
                assert b"bounce to an address we never signed (unsigned)" in text
                code, text = client.rcpt("prvs=0000000000=user@example.org")
                assert (code, text[:6]) == (550, b"5.7.1 "), text
                genuine = prvs.sign("user@example.org", kf.keyring, today())
                assert client.rcpt(genuine)[0] == 250
                assert client.rcpt("postmaster@example.org")[0] == 250
                code, _ = client.data(b"Subject: genuine bounce\r\n\r\nDelivery Status Notification\r\n")
                assert code == 250
                # An ordinary message (non-null sender) to the bare address is not the policy's business.
                client.sendmail("someone@elsewhere.test", ["user@example.org"], b"Subject: hi\r\n\r\nhi\r\n")
                got = sink.wait_for_messages(2)
            log = pf.log_text()
    finally:
        code, gateway_log = cmd.stop()
    assert code == 0, gateway_log
    bounce = next(m for m in got if "genuine bounce" in m.data)
    assert bounce.mail_from == "" and sorted(bounce.rcpts) == sorted([genuine, "postmaster@example.org"])
    assert any(m.mail_from == "someone@elsewhere.test" for m in got)
    assert "NOQUEUE: reject: RCPT from" in log and "<user@example.org>: bounce to an address" in log
    assert "verdict=reject reason=unsigned" in gateway_log and "reason=valid-prvs" in gateway_log
    for key in kf.keyring.keys:
        assert key.secret.hex() not in gateway_log


def test_postfix_that_cannot_open_the_socket_defers_and_the_service_sees_no_request(root: Path) -> None:
    """The socket file without group postfix: smtpd cannot connect, and policy-main.cf's
    smtpd_policy_service_default_action (Postfix's own default) defers the recipient instead of letting a
    forged bounce in. The service is up and asked nothing: what BatvPolicyServiceNotAsked watches."""
    write_keyring(root / "keyring.toml")
    path = spool_socket(root, "policy")
    config = root / "policy.toml"
    config.write_text(
        f'[gateway]\nkeyring = "{root / "keyring.toml"}"\nlocal_domains = ["example.org"]\n'
        f'[policyd]\nlisten = "unix:{path}"\nmetrics_listen = "127.0.0.1:0"\n'  # root's group, not postfix
    )
    cmd = Command("policy", "--config", str(config))
    try:
        cmd.wait_listening(1)
        port = int(wait_for_line(cmd, r"metrics=127\.0\.0\.1:(\d+)").group(1))
        with SmtpSink(root / "sink") as sink:
            pf = postfix_with_policy(root, sink.port)
            with pf, smtplib.SMTP("127.0.0.1", pf.smtp_port) as client:
                client.ehlo("remote-mta.test")
                assert client.mail("")[0] == 250
                code, text = client.rcpt("user@example.org")
                assert (
                    code == 451
                    and text.startswith(b"4.3.5 ")
                    and text.endswith(b"Server configuration problem")
                )
            log = pf.log_text()
        metrics = scrape(port)
    finally:
        code, gateway_log = cmd.stop()
    assert code == 0, gateway_log
    assert "warning: problem talking to server batv/policy: Permission denied" in log, log
    assert 'batv_policy_requests_total{action="reply"} 0.0' in metrics
    assert "batv_policy_connections_total 0.0" in metrics


def test_postfix_in_observe_mode_accepts_and_marks_the_forged_bounce(root: Path) -> None:
    write_keyring(root / "keyring.toml")
    config = socket_config(root, "policyd", spool_socket(root, "policy"))
    cmd = Command("policy", "--observe", "--config", str(config))
    try:
        cmd.wait_listening(1)
        with SmtpSink(root / "sink") as sink:
            pf = postfix_with_policy(root, sink.port)
            with pf, smtplib.SMTP("127.0.0.1", pf.smtp_port) as client:
                client.sendmail(
                    "", ["user@example.org", "other@example.org"], b"Subject: backscatter\r\n\r\nx\r\n"
                )
                (message,) = sink.wait_for_messages(1)
    finally:
        code, gateway_log = cmd.stop()
    assert code == 0, gateway_log
    assert sorted(message.rcpts) == ["other@example.org", "user@example.org"]
    assert message.data.count("X-BATV-Observe: would-reject reason=unsigned") == 1
    assert "would_reject=" in gateway_log


def test_the_command_on_redis_charges_the_guess_budget_the_fleet_shares(
    root: Path, redis_server: RedisServer
) -> None:
    """[state] backend = "redis": the policy service charges the budget every `serve` of the fleet charges.
    A client whose burst a gateway has spent (charged here, as one would) gets 421 at its first guess."""
    kf = write_keyring(root / "keyring.toml")
    folder = root / "run"
    folder.mkdir()
    config = root / "policy.toml"
    config.write_text(
        f'[gateway]\nkeyring = "{root / "keyring.toml"}"\nlocal_domains = ["example.org"]\n'
        "[limits]\nguess_rate = 0.01\nguess_burst = 1\n"
        f'[state]\nbackend = "redis"\nurl = "{redis_server.url}"\n'
        f'[policyd]\nlisten = "unix:{folder / "policy"}"\nsocket_group = "nogroup"\n'
    )
    good = prvs.sign("user@example.org", kf.keyring, today())
    head, code, local = good.split("=", 2)
    forged = f"{head}={code[:4]}{(int(code[4:], 16) + 1) % 0x1000000:06x}={local}"

    async def spend(client: str) -> None:
        state = RedisState(redis_server.url)
        try:
            rule = budget_rules(config_module.load(config))[0]
            assert await RedisBudget(rule, state).charge(client, time.time()) == Penalty()
        finally:
            await state.close()

    run(spend("192.0.2.7"))
    cmd = Command("policy", "--config", str(config))
    try:
        cmd.wait_listening(1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(cmd.paths["enforce mode"]))
            got = ask(s, request(recipient=forged), request(recipient=forged, client_address="198.51.100.9"))
    finally:
        code, log = cmd.stop()
    assert code == 0, log
    assert got[0] == "action=421 4.7.0 Too many errors, closing connection", "the fleet's budget is spent"
    assert got[1].startswith("action=550 5.7.1"), "another client has its own"
