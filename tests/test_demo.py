"""`batv-gateway demo`: the story it tells must be the story that happened.

It runs twice: in-process through cli.main(["demo"]) and as a subprocess (`python -m gateway demo`). Each
run must show, from what its sinks really received: the outbound MAIL FROM signed with a prvs tag, the
bounce to that tag accepted and arriving with the tag stripped, the bounce to the bare address refused with
550 at RCPT with nothing arriving; then the commands to run it for real. The throwaway keyring's folder
must be gone afterwards.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli.main import main
from gateway.ops import demo

REPO = Path(__file__).resolve().parent.parent
TAG = re.compile(r"prvs=(\d)(\d{3})([0-9a-f]{6})=alice@example\.com")


def check_story(out: str) -> None:
    # 1. signed on the way out: the internet got the tag, and the client got 250s for its transaction.
    signed = re.search(
        r"^     the internet received: MAIL FROM:<(\S+)>  RCPT TO:<bob@example\.net>$", out, re.M
    )
    assert signed is not None, out
    tag = signed.group(1)
    assert TAG.fullmatch(tag), tag
    assert f"The return path is signed: {tag}" in out
    assert "alice's MTA > MAIL FROM:<alice@example.com>" in out

    # 2. the genuine bounce: sent to the tag with a null sender, accepted, delivered to the bare address.
    scene2 = out.split("\n2. ", 1)[1].split("\n3. ", 1)[0]
    assert f"bob's MTA > RCPT TO:<{tag}>" in scene2
    assert re.search(r"bob's MTA > RCPT TO:<[^\n]*\n\s+gateway < 250 ", scene2), scene2
    assert "your mail server received: MAIL FROM:<>  RCPT TO:<alice@example.com>" in scene2
    assert "prvs=" not in scene2.split("your mail server received:", 1)[1].splitlines()[0]

    # 3. the forged bounce: refused with 550 at RCPT, and nothing arrived.
    scene3 = out.split("\n3. ", 1)[1].split("\nThat is BATV.", 1)[0]
    assert "some MTA > RCPT TO:<alice@example.com>" in scene3
    assert re.search(
        r"gateway < 550 5\.7\.1 <alice@example\.com>: bounce to an address we never signed", scene3
    )
    assert "your mail server received nothing." in scene3
    assert "DATA" not in scene3

    # Then the commands for real.
    assert "batv-gateway serve --role outbound" in out
    assert "batv-gateway serve --role inbound" in out

    folder = re.search(r"a throwaway one in (\S+) ", out)
    assert folder is not None
    assert not Path(folder.group(1)).exists(), "the throwaway keyring was left behind"


def test_demo_in_process(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    print(out)
    check_story(out)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_demo_as_a_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "demo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_story(proc.stdout)
    assert proc.stderr == ""


def test_demo_is_in_the_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "--help"], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert "demo" in proc.stdout


def test_the_sink_undoes_dot_stuffing_and_records_the_null_sender() -> None:
    """The demo's own sink, on its own: what it records is what the story prints."""
    import asyncio

    async def body() -> list[demo.Delivery]:
        sink = demo.Sink("sink")
        await sink.start()
        try:
            steps = await asyncio.to_thread(
                demo.send, sink.port, "client.test", "", ["a@example.com"], "Subject: x\n\n.leading dot\n"
            )
            assert [s.code for s in steps] == [250, 250, 250]
        finally:
            await sink.close()
        return sink.deliveries

    (got,) = asyncio.run(body())
    assert got.mail_from == "" and got.rcpts == ["a@example.com"]
    assert got.data.endswith(b"\r\n.leading dot\r\n")
