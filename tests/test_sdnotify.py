"""gateway/ops/sdnotify.py: READY, RELOADING (with MONOTONIC_USEC) and STOPPING reach $NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.ops.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def receive(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def test_ready_reloading_stopping(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier(environ={"NOTIFY_SOCKET": path}, monotonic_ns=lambda: 123_456_789_000)
    assert notifier.enabled
    assert notifier.ready(status="serving 2 listeners")
    assert receive(sock) == {"READY": "1", "STATUS": "serving 2 listeners"}
    assert notifier.reloading()
    assert receive(sock) == {"RELOADING": "1", "MONOTONIC_USEC": "123456789"}
    assert notifier.stopping()
    assert receive(sock) == {"STOPPING": "1"}


def test_status_cannot_smuggle_a_field(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    Notifier(socket_name=path).status("reload refused\nREADY=1")
    assert receive(sock) == {"STATUS": "reload refused READY=1"}


def test_abstract_socket() -> None:
    name = f"batv-test-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier(socket_name="@" + name).stopping()
        assert receive(sock) == {"STOPPING": "1"}


def test_no_socket_is_a_no_op() -> None:
    notifier = Notifier(environ={})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert Notifier(socket_name="vsock:2:1234").enabled is False


def test_unreachable_socket_warns_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(socket_name=str(tmp_path / "gone"))
    with caplog.at_level(logging.WARNING, logger="gateway.sdnotify"):
        assert notifier.ready() is False
        assert notifier.stopping() is False
    assert len([r for r in caplog.records if r.name == "gateway.sdnotify"]) == 1
