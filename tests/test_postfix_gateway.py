"""deploy/postfix/gateway-*.cf: Postfix relaying outbound mail through the gateway, and behind it inbound.

The snippets are loaded as shipped into a private Postfix instance (tests/postfix_instance.py); only
their documented addresses are swapped for free loopback ports. They pass `postfix check`, and mail goes
the whole way: submission -> Postfix -> gateway (signs) -> Postfix -> smtp-sink, and
gateway (checks the tag) -> Postfix -> smtp-sink.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from postfix_instance import DEPLOY_POSTFIX, PostfixInstance, SmtpSink, free_port, load_snippet, private_root

from gateway.core import prvs
from gateway.ops import keystore

REPO = Path(__file__).resolve().parent.parent
OUTBOUND = DEPLOY_POSTFIX / "gateway-outbound-master.cf"
INBOUND = DEPLOY_POSTFIX / "gateway-inbound-master.cf"


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    with private_root(keep_log_in=tmp_path) as path:
        yield path


def test_outbound_snippet_passes_postfix_check(root: Path) -> None:
    pf = PostfixInstance(root / "pf")
    pf.add_master(load_snippet(OUTBOUND))
    assert pf.check() == ""
    services = pf.postconf("-M")
    assert "batv-out" in services and "127.0.0.1:10026" in services
    assert (
        pf.postconf("-P", "submission/inet/content_filter").split(" = ")[1].strip()
        == "batv-out:[127.0.0.1]:10587"
    )


def test_inbound_snippet_passes_postfix_check(root: Path) -> None:
    pf = PostfixInstance(root / "pf")
    pf.add_master(load_snippet(INBOUND))
    assert pf.check() == ""
    params = pf.postconf(
        "-P",
        "127.0.0.1:10025/inet/mynetworks",
        "127.0.0.1:10025/inet/smtpd_relay_restrictions",
        "127.0.0.1:10025/inet/smtpd_authorized_xforward_hosts",
    )
    assert "mynetworks =" in params and "reject_unauth_destination" in params
    assert "smtpd_authorized_xforward_hosts = 127.0.0.0/8" in params


class Gateway:
    """`batv-gateway serve` as a subprocess, up when it says READY=1 (sd_notify)."""

    def __init__(self, folder: Path, config: str) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "gateway.toml").write_text(config)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(folder / "notify"))
        self.notify.settimeout(20)
        with (folder / "gateway.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(folder / "gateway.toml")],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "NOTIFY_SOCKET": str(folder / "notify")},
                cwd=REPO,
            )
        try:
            ready = self.notify.recv(4096)
        except TimeoutError:
            self.stop()
            raise AssertionError(f"the gateway did not start:\n{self.log()}") from None
        assert ready.startswith(b"READY=1"), ready

    def log(self) -> str:
        return (self.folder / "gateway.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.notify.close()


def test_mail_goes_through_postfix_and_the_gateway_both_ways(root: Path) -> None:
    now = datetime.now(UTC)
    keyring = root / "keyring.toml"
    kf = keystore.new_keyring(now)
    keystore.save(keyring, kf)
    submission, gateway_out, reinject, gateway_in, postfix_in = (free_port() for _ in range(5))
    with SmtpSink(root / "sink") as sink:
        pf = PostfixInstance(
            root / "pf",
            relayhost=f"[127.0.0.1]:{sink.port}",  # "the internet", for mail the users send
            main={
                # Our own domain; its mailboxes live on "the internet" too, to be seen in the sink.
                "relay_domains": "example.com",
                "transport_maps": f"inline:{{example.com=smtp:[127.0.0.1]:{sink.port}}}",
            },
        )
        pf.add_master(
            load_snippet(
                OUTBOUND,
                {
                    "submission inet": f"127.0.0.1:{submission} inet",
                    "[127.0.0.1]:10587": f"[127.0.0.1]:{gateway_out}",
                    "127.0.0.1:10026": f"127.0.0.1:{reinject}",
                },
            )
        )
        pf.add_master(load_snippet(INBOUND, {"127.0.0.1:10025": f"127.0.0.1:{postfix_in}"}))
        assert pf.check() == ""
        pf.start()
        gateway: Gateway | None = None
        try:
            gateway = Gateway(
                root / "gateway",
                f"""
[gateway]
hostname = "gw.test"
keyring = "{keyring}"
local_domains = ["example.com"]

[[listener]]
name = "mx"
role = "inbound"
listen = "127.0.0.1:{gateway_in}"
next_hop = "127.0.0.1:{postfix_in}"

[[listener]]
name = "relay"
role = "outbound"
listen = "127.0.0.1:{gateway_out}"
next_hop = "127.0.0.1:{reinject}"
""",
            )
            # Outbound: a user submits; the message reaches "the internet" with a signed return path.
            with smtplib.SMTP("127.0.0.1", submission, timeout=30, source_address=("127.0.0.3", 0)) as client:
                client.sendmail("alice@example.com", ["bob@remote.test"], b"Subject: out\r\n\r\nhello\r\n")
            (out,) = sink.wait_for_messages(1, timeout=30)
            assert prvs.is_prvs(out.mail_from) and out.mail_from.endswith("=alice@example.com")
            assert out.rcpts == ("bob@remote.test",)
            day = int(time.time()) // 86400
            assert prvs.verify(out.mail_from, kf.keyring, day).verdict is prvs.PrvsVerdict.VALID
            # Postfix told the gateway who submitted (XFORWARD), and the gateway told the reinjection.
            pf.wait_for_log(
                r"postfix/batv-reinject/smtpd\[\d+\]: [0-9A-F]+: client=\S+, orig_client=\S*\[127\.0\.0\.3\]"
            )

            # Inbound: the genuine bounce to that return path reaches alice's mailbox, untagged...
            # (sent from another loopback address: Postfix must log that client, not the gateway)
            with smtplib.SMTP("127.0.0.1", gateway_in, timeout=30, source_address=("127.0.0.2", 0)) as client:
                client.sendmail("<>", [out.mail_from], b"Subject: bounce\r\n\r\nundeliverable\r\n")
            messages = sink.wait_for_messages(2, timeout=30)
            bounce = messages[-1]
            assert bounce.mail_from == "" and bounce.rcpts == ("alice@example.com",)
            # ... and Postfix, told by XFORWARD, logs the real client next to the gateway.
            pf.wait_for_log(
                r"postfix/batv-in/smtpd\[\d+\]: [0-9A-F]+: client=\S+, orig_client=unknown\[127\.0\.0\.2\]"
            )
            # ... and a forged one is refused at RCPT by the gateway; Postfix never sees it.
            with smtplib.SMTP("127.0.0.1", gateway_in, timeout=30) as client:
                client.ehlo()
                assert client.mail("<>")[0] == 250
                code, text = client.rcpt("prvs=0123abcdef=alice@example.com")
                assert code == 550 and b"5.7.1" in text
                # Relaying through the inbound listener is refused too.
                assert client.rcpt("someone@remote.test")[0] == 554
            assert len(sink.messages()) == 2
            assert pf.queue_ids() == []
        finally:
            if gateway is not None:
                gateway.stop()
            pf.stop()
