"""sd_notify: tell systemd when the gateway is ready, reloading and stopping.

The protocol (sd_notify(3)) is one datagram of `KEY=VALUE` lines to the AF_UNIX socket named in
`$NOTIFY_SOCKET`; a name starting with `@` is in the abstract namespace. Without the variable (not under
systemd, or not `Type=notify`) every call does nothing, so the same code runs in a container or a test.

Reloading follows `Type=notify-reload` (systemd 253+): `RELOADING=1` carries `MONOTONIC_USEC`, the
CLOCK_MONOTONIC time in microseconds, so systemd can tell this reload from an older one; `READY=1` after
it ends the reload. Older systemd ignores the extra field.

A failed send is logged once and never raised: systemd being unreachable must not stop the mail.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

_log = logging.getLogger("gateway.sdnotify")


def _socket_address(name: str) -> str | None:
    if not name:
        return None
    if name.startswith("@"):
        # Abstract namespace: the kernel name starts with a NUL byte instead of the @.
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    # sd_notify(3) also allows vsock: addresses; a gateway never runs in such a VM guest, so refuse quietly.
    return None


class Notifier:
    """Sends sd_notify messages; a no-op when there is no notify socket."""

    def __init__(
        self,
        socket_name: str | None = None,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if socket_name is None:
            socket_name = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET", "")
        self._address = _socket_address(socket_name)
        self._monotonic_ns = monotonic_ns
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Sends one message; True if it was sent."""
        if self._address is None:
            return False
        # One field per line: a newline inside a value (a STATUS text) would start a forged field.
        payload = "\n".join(
            f"{key}={' '.join(str(value).splitlines())}" for key, value in fields.items()
        ).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                _log.warning("cannot notify systemd: %s", exc.strerror or exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"READY": 1}
        if status:
            fields["STATUS"] = status
        return self.notify(**fields)

    def reloading(self) -> bool:
        return self.notify(RELOADING=1, MONOTONIC_USEC=self._monotonic_ns() // 1000)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)
