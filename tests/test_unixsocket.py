"""Socket files for the socketmap and policy services: the `unix:/PATH` config values, and the file's life
(mode and group, a stale file replaced, a live one or a non-socket refused, removed only while ours)."""

from __future__ import annotations

import grp
import logging
import os
import pwd
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.core.errors import ConfigError
from gateway.ops import config
from gateway.ops.config import HostPort, UnixPath, parse_listen
from gateway.postfix import unixsocket
from gateway.postfix.unixsocket import ListenError

NOGROUP = grp.getgrnam("nogroup").gr_gid
DAEMON = grp.getgrnam("daemon").gr_gid
NOBODY = pwd.getpwnam("nobody").pw_uid


@pytest.fixture
def folder() -> Iterator[Path]:
    # Short: a socket path has at most 107 octets, and pytest's tmp_path can be long.
    path = Path(tempfile.mkdtemp(prefix="batv-us-"))
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def connects(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        try:
            client.connect(str(path))
        except ConnectionRefusedError:
            return False
    return True


# --- the config ---------------------------------------------------------------------------------------


def test_listen_takes_host_port_or_a_unix_path() -> None:
    assert parse_listen("127.0.0.1:10030") == HostPort("127.0.0.1", 10030)
    assert parse_listen("unix:/var/spool/postfix/batv/policy") == UnixPath(
        Path("/var/spool/postfix/batv/policy")
    )
    assert str(UnixPath(Path("/run/x/sock"))) == "unix:/run/x/sock"
    cfg = config.parse(
        {
            "socketmap": {
                "listen": "unix:/run/batv/socketmap",
                "socket_mode": "0640",
                "socket_group": "nogroup",
            },
            "policyd": {"listen": "unix:/run/batv/policy"},
        },
        "gw.toml",
    )
    assert cfg.socketmap.listen == UnixPath(Path("/run/batv/socketmap"))
    assert (cfg.socketmap.socket_mode, cfg.socketmap.socket_group) == (0o640, "nogroup")
    assert (cfg.policyd.socket_mode, cfg.policyd.socket_group) == (0o660, None), "the defaults"
    assert config.default().policyd.listen == HostPort("127.0.0.1", 10031), "the quick start stays on TCP"


@pytest.mark.parametrize(
    ("table", "why"),
    [
        ({"listen": "unix:"}, "[socketmap] listen: 'unix:' is not unix:/ABSOLUTE/PATH"),
        ({"listen": "unix:batv/socketmap"}, "'unix:batv/socketmap' is not unix:/ABSOLUTE/PATH"),
        ({"listen": "unix:/run/batv/"}, "is not unix:/ABSOLUTE/PATH to a socket file"),
        ({"listen": "unix:/" + "d" * 107}, "over the 107 octets a unix socket path may have"),
        ({"listen": "unix/run/sock"}, "is not HOST:PORT (for example 127.0.0.1:10030) or unix:/PATH"),
        ({"listen": "127.0.0.1:10030", "socket_mode": "0660"}, "socket_mode: applies to a unix:/PATH listen"),
        (
            {"socket_group": "postfix"},
            "[socketmap] socket_group: applies to a unix:/PATH listen address only",
        ),
        (
            {"listen": "unix:/run/s", "socket_mode": 660},
            'socket_mode: expected an octal mode in quotes, such as "0660"',
        ),
        ({"listen": "unix:/run/s", "socket_mode": "0999"}, "expected an octal mode in quotes"),
        ({"listen": "unix:/run/s", "socket_mode": "04660"}, "expected an octal mode in quotes"),
        ({"listen": "unix:/run/s", "socket_mode": "0666"}, "lets every local user connect"),
        ({"listen": "unix:/run/s", "socket_mode": "0060"}, "must give the service's own user read and write"),
        (
            {"listen": "unix:/run/s", "socket_group": "no-such-group-here"},
            "no group named 'no-such-group-here'",
        ),
        (
            {"listen": "unix:/run/s", "socket_owner": "x"},
            '[socketmap] unknown key "socket_owner"; did you mean "socket_mode"? allowed: cache_size, listen,'
            " max_request, socket_group, socket_mode, tcp_forward, tcp_reverse",
        ),
    ],
)
def test_bad_unix_listen_values_are_refused_naming_file_and_key(table: dict[str, object], why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse({"socketmap": table}, "/etc/batv-gateway/gateway.toml")
    message = str(caught.value)
    assert message.startswith("/etc/batv-gateway/gateway.toml: [socketmap] ")
    assert why in message


def test_the_policy_table_is_checked_the_same_way() -> None:
    with pytest.raises(
        ConfigError, match=r"gw\.toml: \[policyd\] socket_mode: .* lets every local user connect"
    ):
        config.parse({"policyd": {"listen": "unix:/run/p", "socket_mode": "0662"}}, "gw.toml")
    with pytest.raises(
        ConfigError, match=r"gw\.toml: \[policyd\] metrics_listen: 'unix:/x' is not HOST:PORT"
    ):
        config.parse({"policyd": {"metrics_listen": "unix:/x"}}, "gw.toml")


def test_the_commands_refuse_a_bad_unix_listen_flag() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "policy", "--listen", "unix:relative/sock", "--keyring", "k.toml"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert run.returncode == 2
    assert "--listen: 'unix:relative/sock' is not unix:/ABSOLUTE/PATH" in run.stderr


# --- the socket file --------------------------------------------------------------------------------


def test_the_socket_file_gets_its_mode_and_group_and_is_removed_on_shutdown(folder: Path) -> None:
    path = folder / "sock"
    listener = unixsocket.listen(path, 0o640, "nogroup")
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert st.st_gid == NOGROUP
        assert connects(path)
    finally:
        listener.remove()
    assert not path.exists(), "removed on shutdown"


def test_the_file_is_closed_to_others_from_bind_until_it_has_its_group_and_mode(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen from inside: right after bind() the file is the owner's alone (the umask), and by listen(),
    before which nobody can connect, it has its group and mode."""
    path = folder / "sock"
    seen: dict[str, tuple[int, int]] = {}
    bind, listen = socket.socket.bind, socket.socket.listen

    def spy(step: str, call: Callable[..., None]) -> Callable[..., None]:
        def wrapped(self: socket.socket, *args: object) -> None:
            call(self, *args)
            if self.family == socket.AF_UNIX:
                st = os.lstat(path)
                seen[step] = (stat.S_IMODE(st.st_mode), st.st_gid)

        return wrapped

    monkeypatch.setattr(socket.socket, "bind", spy("bind", bind))
    monkeypatch.setattr(socket.socket, "listen", spy("listen", listen))
    unixsocket.listen(path, 0o660, "nogroup").remove()
    assert seen["bind"] == (0o600, os.getgid())
    assert seen["listen"] == (0o660, NOGROUP)


def as_user(uid: int, gid: int, act: Callable[[], int]) -> int:
    """`act()`'s result, run in a forked child dropped to uid/gid with no other groups (a fork, not a new
    interpreter: the interpreter may live where another uid cannot run it)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            code = act()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def connect_code(path: Path) -> Callable[[], int]:
    def act() -> int:
        try:
            return 0 if connects(path) else 1
        except PermissionError:
            return 2

    return act


def test_only_the_group_can_connect(folder: Path) -> None:
    folder.chmod(0o755)
    path = folder / "sock"
    listener = unixsocket.listen(path, 0o660, "nogroup")
    try:
        assert as_user(NOBODY, NOGROUP, connect_code(path)) == 0
        assert as_user(NOBODY, DAEMON, connect_code(path)) == 2, "outside the group: EACCES"
    finally:
        listener.remove()


def test_a_user_outside_the_group_cannot_give_the_socket_to_it(folder: Path) -> None:
    folder.chmod(0o777)
    path = folder / "sock"
    read_fd, write_fd = os.pipe()

    def act() -> int:
        try:
            unixsocket.listen(path, 0o660, "postfix")
        except ListenError as exc:
            os.write(write_fd, str(exc).encode())
            return 3
        return 0

    code = as_user(NOBODY, NOGROUP, act)
    os.close(write_fd)
    with os.fdopen(read_fd) as fh:
        error = fh.read()
    assert code == 3
    assert "cannot give the socket to group 'postfix'" in error
    assert "SupplementaryGroups=" in error
    assert not path.exists(), "a socket that could not get its group is not left behind"


def test_a_stale_socket_file_is_replaced(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = folder / "sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # as a process that died: the file stays, nothing answers on it
    assert path.exists() and not connects(path)
    with caplog.at_level(logging.INFO, "gateway.unixsocket"):
        listener = unixsocket.listen(path, 0o660)
    try:
        assert connects(path)
        assert "removing a stale socket file" in caplog.text
    finally:
        listener.remove()


def test_a_socket_a_live_server_answers_on_is_refused(folder: Path) -> None:
    path = folder / "sock"
    first = unixsocket.listen(path, 0o660)
    try:
        with pytest.raises(ListenError, match="another server answers on this socket"):
            unixsocket.listen(path, 0o660)
        assert connects(path), "the first server keeps its socket"
    finally:
        first.remove()


def test_a_path_that_is_not_a_socket_is_refused_and_left_alone(folder: Path) -> None:
    path = folder / "sock"
    path.write_text("not a socket")
    with pytest.raises(ListenError, match="exists and is not a socket"):
        unixsocket.listen(path, 0o660)
    assert path.read_text() == "not a socket"


def test_a_missing_folder_is_refused_with_what_to_do(folder: Path) -> None:
    with pytest.raises(ListenError, match=r"the folder .*/nowhere does not exist; create it"):
        unixsocket.listen(folder / "nowhere" / "sock", 0o660)


def test_a_socket_file_replaced_by_a_newer_server_is_not_removed(folder: Path) -> None:
    path = folder / "sock"
    old = unixsocket.listen(path, 0o660)
    path.unlink()  # as an operator would, to start a second server on the path
    new = unixsocket.listen(path, 0o660)
    try:
        old.remove()
        assert connects(path), "the newer server's file is still there"
    finally:
        new.remove()
    assert not path.exists()
