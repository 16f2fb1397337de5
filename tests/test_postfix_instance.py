"""The private Postfix instance and smtp-sink helpers start, work and stop without leaving anything behind."""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from postfix_instance import (
    PostfixInstance,
    SmtpSink,
    load_snippet,
    parse_main_cf,
    private_root,
    zombie_children,
)


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    with private_root(keep_log_in=tmp_path) as path:
        yield path


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_starts_listens_on_loopback_and_stops_without_leftovers(root: Path) -> None:
    pf = PostfixInstance(root / "pf")
    pf.start()
    try:
        assert pf.processes(), "master and its daemons run with their working folder in the instance"
        assert port_open(pf.smtp_port)
        with smtplib.SMTP("127.0.0.1", pf.smtp_port) as client:
            code, banner = client.ehlo("client.test")
            assert code == 250 and banner.startswith(b"mx.test")
        listening = pf.postconf("-h", "inet_interfaces").strip()
        assert listening == "127.0.0.1"
        assert str(root) in pf.postconf("-h", "queue_directory")
    finally:
        pf.stop()
    assert pf.processes() == []
    assert pf.stopped_pids, "stop() saw master and its daemons"
    assert not set(pf.stopped_pids) & set(zombie_children()), "the adopted Postfix daemons were reaped"
    assert not any(Path(f"/proc/{pid}").exists() for pid in pf.stopped_pids)
    assert not port_open(pf.smtp_port)
    assert "daemon started" in pf.log_text()
    assert not pf.running


def test_base_config_passes_postfix_check_without_warnings(root: Path) -> None:
    pf = PostfixInstance(root / "pf")
    assert pf.check() == ""


def test_relays_to_smtp_sink_and_two_instances_coexist(root: Path) -> None:
    with SmtpSink(root / "sink") as sink:
        first = PostfixInstance(root / "a", relayhost=f"[127.0.0.1]:{sink.port}")
        second = PostfixInstance(root / "b", hostname="other.test", relayhost=f"[127.0.0.1]:{sink.port}")
        with first, second:
            assert first.smtp_port != second.smtp_port
            for pf, sender in ((first, "one@a.test"), (second, "two@b.test")):
                with smtplib.SMTP("127.0.0.1", pf.smtp_port) as client:
                    client.sendmail(sender, ["rcpt@remote.test"], b"Subject: hi\r\n\r\nbody\r\n")
            got = sink.wait_for_messages(2)
        assert first.processes() == [] and second.processes() == []
    assert sorted(m.mail_from for m in got) == ["one@a.test", "two@b.test"]
    assert all(m.rcpts == ("rcpt@remote.test",) for m in got)
    assert all("Subject: hi" in m.data for m in got)


def test_extra_main_and_master_lines_are_applied(root: Path) -> None:
    pf = PostfixInstance(root / "pf", main={"message_size_limit": "12345"})
    pf.add_main("# a comment\nsmtpd_helo_required =\n    yes\n")
    port = 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pf.add_master(f"127.0.0.1:{port} inet n - n - - smtpd\n  -o smtpd_banner=second")
    with pf:
        assert pf.postconf("-h", "message_size_limit").strip() == "12345"
        assert pf.postconf("-h", "smtpd_helo_required").strip() == "yes"
        with socket.create_connection(("127.0.0.1", port)) as s:
            assert s.makefile("rb").readline().startswith(b"220 second")
        with smtplib.SMTP("127.0.0.1", pf.smtp_port) as client:
            code, _ = client.docmd("MAIL FROM:<a@b.test>")
            assert code == 503, "smtpd_helo_required from the snippet is in force"


def test_sink_refuses_what_it_is_told_to(root: Path) -> None:
    with SmtpSink(root / "sink", reject_hard=("RCPT",)) as sink, smtplib.SMTP("127.0.0.1", sink.port) as c:
        c.ehlo("client.test")
        c.mail("a@b.test")
        code, _ = c.rcpt("x@y.test")
        assert 500 <= code < 600
    assert not port_open(sink.port)


def test_parse_main_cf_follows_postfix_rules() -> None:
    text = "# comment\na = 1\nb = x,\n  y\n\n   # indented comment\na = 2\nc =\n"
    assert parse_main_cf(text) == {"a": "2", "b": "x, y", "c": ""}
    with pytest.raises(ValueError, match=r"not a main\.cf setting"):
        parse_main_cf("no equals sign here\n")


def test_load_snippet_refuses_a_replacement_that_does_not_apply(tmp_path: Path) -> None:
    snippet = tmp_path / "main.cf"
    snippet.write_text("x = inet:127.0.0.1:10030\n")
    assert load_snippet(snippet, {"127.0.0.1:10030": "127.0.0.1:5"}) == "x = inet:127.0.0.1:5\n"
    with pytest.raises(ValueError, match="disagree"):
        load_snippet(snippet, {"127.0.0.1:9": "127.0.0.1:5"})
