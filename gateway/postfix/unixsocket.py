"""Unix-domain listening sockets for the socketmap and policy services (`listen = "unix:/PATH"`).

A port on 127.0.0.1 answers every local process, so any local user could ask the socketmap's `forward`
map for a valid tag and forge a bounce that the policy service lets through. A socket file answers only
those its mode and group let in: Postfix's group, as postsrsd 2 does it.

The socket file's life, as mature daemons handle it:
- At start, a socket file left by a process that died is removed (nothing answers on it); a path that a
  live server answers on is refused, and so is a path that is not a socket at all: neither is ours to
  remove.
- It is bound under a umask that lets only its owner in, then given its group and mode, and only then
  listened on: until listen() nobody can connect, so there is no moment with the wrong permissions.
- On a clean shutdown it is removed, unless the path is no longer the file we bound (a newer server
  replaced it): removing that would cut the newer server off.

`[gateway] workers = N` (socketmap only): SO_REUSEPORT has no unix-socket counterpart, so the main
process binds the socket file once before the fork and every worker accepts on that one inherited socket;
only the main process removes the file.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import GatewayError

log = logging.getLogger("gateway.unixsocket")

BACKLOG = 1024  # as the TCP listeners (workers.bind)
_PROBE_TIMEOUT = 1.0  # seconds: a live server accepts at once (the kernel does, before accept())


class ListenError(GatewayError):
    """A socket file the service cannot take. The message names the path and what to do."""


@dataclass
class UnixListener:
    """A bound, listening socket file, and the file's identity to remove it by on shutdown."""

    path: Path
    sock: socket.socket
    _inode: tuple[int, int]

    def remove(self) -> None:
        """Close the socket and remove its file, if the path is still the file we bound."""
        self.sock.close()
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) != self._inode:
            log.warning("%s: the socket file was replaced by another; left in place", self.path)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def group_id(name: str | None) -> int:
    """The gid of a group name; -1 (keep the process's own group) for None."""
    if name is None:
        return -1
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ListenError(f"no group named {name!r} on this host") from None


def clear_stale(path: Path) -> None:
    """Remove a socket file that nothing answers on; refuse a live one, or anything but a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{path}: exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_PROBE_TIMEOUT)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # left by a process that is gone (or removed meanwhile)
    except OSError as exc:
        raise ListenError(f"{path}: cannot tell whether a server answers on it: {exc.strerror}") from None
    else:
        raise ListenError(
            f"{path}: another server answers on this socket (is the service already running?); stop it first"
        )
    finally:
        probe.close()
    log.info("%s: removing a stale socket file left by a process that is gone", path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def listen(path: Path, mode: int, group: str | None = None) -> UnixListener:
    """Bind and listen on the socket file `path` with `mode` and `group` (see the module docstring)."""
    gid = group_id(group)
    if not path.parent.is_dir():
        raise ListenError(
            f"{path}: the folder {path.parent} does not exist; create it (owned by the service's user, "
            "searchable by the group that connects)"
        )
    clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        # The umask is the process's, not the thread's: this runs at start-up, before anything else does.
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        bound = True
        st = os.lstat(path)
        try:
            if gid != -1:
                os.chown(path, -1, gid)
        except PermissionError:
            raise ListenError(
                f"{path}: cannot give the socket to group {group!r}: the service's user must be a member of "
                "it (SupplementaryGroups= in a systemd unit)"
            ) from None
        os.chmod(path, mode)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException as exc:
        sock.close()
        if bound:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if isinstance(exc, OSError):
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(f"{path}: in use (another server took it just now)") from None
            raise ListenError(f"{path}: cannot listen: {exc.strerror}") from None
        raise
    return UnixListener(path, sock, (st.st_dev, st.st_ino))
