"""The strict TOML config, loaded into frozen objects.

Strict means: an unknown key, a wrong type or an impossible combination stops start-up with one line that
names the file, the key and what would be accepted (hypercorn and mta-sts-resolver accept a misspelt key
silently; a mail gateway must not). Every key is documented in deploy/gateway.example.toml.
"""

from __future__ import annotations

import difflib
import enum
import grp
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from ..core.errors import ConfigError
from ..core.srs import SrsOptions
from ..policy.policy import InvalidTagAction, PolicySettings

DEFAULT_KEYRING = Path("keys/keyring.toml")
# Where [gateway] hostname comes from when it is not set; a module attribute so tests can replace it.
host_fqdn: Callable[[], str] = socket.getfqdn
LOOPBACK = ("127.0.0.0/8", "::1/128")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
E = TypeVar("E", bound=enum.Enum)


class Role(enum.Enum):
    INBOUND = "inbound"  # the MX side: refuses backscatter, strips tags
    OUTBOUND = "outbound"  # the relay hop: signs return paths


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, where: str = "address") -> HostPort:
        """HOST:PORT, [IPv6]:PORT."""
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"{where}: {text!r} is not HOST:PORT (for example 127.0.0.1:2525)")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


UNIX_PATH_MAX = 107  # octets: Linux's sockaddr_un holds 108 with the terminating NUL


@dataclass(frozen=True)
class UnixPath:
    """A unix-domain socket to listen on: `unix:/ABSOLUTE/PATH` (the socketmap and policy services)."""

    path: Path

    @classmethod
    def parse(cls, text: str, where: str = "address") -> UnixPath:
        path = text.removeprefix("unix:")
        example = "for example unix:/var/spool/postfix/batv/policy"
        if not path.startswith("/") or path.endswith("/") or "\0" in path:
            raise ConfigError(f"{where}: {text!r} is not unix:/ABSOLUTE/PATH to a socket file ({example})")
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise ConfigError(
                f"{where}: {text!r} is over the {UNIX_PATH_MAX} octets a unix socket path may have"
                " (choose a shorter folder)"
            )
        return cls(Path(path))

    def __str__(self) -> str:
        return f"unix:{self.path}"


Listen = HostPort | UnixPath


def parse_listen(text: str, where: str = "address") -> Listen:
    """HOST:PORT, [IPv6]:PORT or unix:/PATH (what the socketmap and policy services listen on)."""
    if text.startswith("unix:"):
        return UnixPath.parse(text, where)
    try:
        return HostPort.parse(text, where)
    except ConfigError:
        raise ConfigError(
            f"{where}: {text!r} is not HOST:PORT (for example 127.0.0.1:10030)"
            " or unix:/PATH (for example unix:/var/spool/postfix/batv/socketmap)"
        ) from None


# The socket file's mode when none is configured: the service's user and group, nobody else.
DEFAULT_SOCKET_MODE = 0o660
_OCTAL_MODE = re.compile(r"0?[0-7]{3}")


@dataclass(frozen=True)
class Limits:
    """Per-listener limits. Defaults follow Postfix's, and RFC 5321 4.5.3.2 for the timeouts."""

    message_size_limit: int = 10_240_000  # Postfix message_size_limit; 552 5.3.4 past it
    recipient_limit: int = 1000  # Postfix smtpd_recipient_limit; 452 4.5.3 past it
    command_line_limit: int = 2048  # Postfix line_length_limit; RFC 3461 parameters make 512 too few
    # RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with its CRLF (Exim 4.95+ refuses longer
    # ones too). Past it: 500 5.5.2 after DATA, the next-hop transaction dropped. 0 = no limit.
    line_length_limit: int = 1000
    command_timeout: float = 300.0  # Postfix smtpd_timeout; RFC 5321 4.5.3.2.7 gives 5 minutes
    data_timeout: float = 300.0  # between DATA chunks from the client
    next_hop_connect_timeout: float = 30.0  # Postfix smtp_connect_timeout
    # The client waits 5 minutes for our reply to its RCPT (RFC 5321 4.5.3.2.3), and behind that reply
    # may stand the next hop's connect, greeting and EHLO, MAIL and RCPT: 30 + 3 x 80 = 270 s fits.
    # Postfix's smtpd_proxy_timeout, the same in-session situation, is 100 s.
    next_hop_command_timeout: float = 80.0
    next_hop_data_block_timeout: float = 180.0  # RFC 5321 4.5.3.2.5: 3 minutes per data block
    # RFC 5321 4.5.3.2.6 gives the client 10 minutes to wait for the reply to the final dot. We give the
    # next hop half of that, so the client always hears our answer before it gives up.
    next_hop_data_done_timeout: float = 300.0
    max_sessions: int = 100  # Postfix default_process_limit
    max_sessions_per_client: int = 50  # Postfix smtpd_client_connection_count_limit
    soft_error_limit: int = 10  # Postfix smtpd_soft_error_limit: past it, each error is delayed
    hard_error_limit: int = 20  # Postfix smtpd_hard_error_limit: past it, the session is closed
    error_sleep_time: float = 1.0  # Postfix smtpd_error_sleep_time
    guess_rate: float = 1.0  # failed tag checks answered per second per client IP (0 = no limit)
    guess_burst: int = 5
    shutdown_deadline: float = 30.0  # SIGTERM: how long in-flight transactions may take to finish
    # Idle next-hop connections kept for reuse (0 = a new one each time), per listener and process. As
    # many as sessions may run at once: a smaller pool closes the surplus after each transaction, and
    # the next one pays connect, greeting and EHLO again (bench/README.md: +50% msgs/s at 100 sessions).
    # Idle ones still age out after a few seconds (nexthop.NextHopPool.idle_time).
    next_hop_pool_size: int = 100


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    role: Role
    listen: HostPort
    next_hop: HostPort
    observe: bool = False
    trusted: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in LOOPBACK)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class LogConfig:
    format: str = "logfmt"  # or "json"
    level: str = "info"


@dataclass(frozen=True)
class MetricsConfig:
    listen: HostPort | None = None  # None: no metrics endpoint


@dataclass(frozen=True)
class SocketmapConfig:
    listen: Listen = HostPort("127.0.0.1", 10030)
    tcp_forward: HostPort | None = None  # tcp_table(5), as postsrsd 1.x's forward port
    tcp_reverse: HostPort | None = None
    max_request: int = 4096
    cache_size: int = 65536  # replies kept, about two hundred bytes each; 0: none
    socket_mode: int = DEFAULT_SOCKET_MODE  # for a unix: listen address
    socket_group: str | None = None  # None: the service's own group


@dataclass(frozen=True)
class PolicydConfig:
    listen: Listen = HostPort("127.0.0.1", 10031)
    observe: bool = False  # accept what enforce mode would refuse; log it and PREPEND a header
    socket_mode: int = DEFAULT_SOCKET_MODE
    socket_group: str | None = None
    metrics_listen: HostPort | None = None  # the policy service's own /metrics endpoint; None: none


class StateBackend(enum.Enum):
    SQLITE = "sqlite"  # one host: a file beside the keyring, shared by its workers
    REDIS = "redis"  # a fleet: every host and worker on one Redis


@dataclass(frozen=True)
class StateConfig:
    """[state]: where the ledger and the shared budgets live (gateway/ops/state.py makes the stores)."""

    backend: StateBackend = StateBackend.SQLITE
    path: Path | None = None  # sqlite: None is state.sqlite beside the keyring
    url: str | None = field(default=None, repr=False)  # redis: may hold a password; state.redact it
    key_prefix: str = "batv:"
    connect_timeout: float = 0.5
    command_timeout: float = 0.5
    retry_after: float = 5.0  # seconds before a budget asks a store that was away again
    guess_network_factor: int = 4  # a /24 or /48 gets this many times one client's guess budget
    null_sender_rate: float = 0.0  # null-sender messages a second per client network; 0 = off
    null_sender_burst: int = 10


@dataclass(frozen=True)
class MilterConfig:
    """`batv-gateway milter` (milterd.py): where it listens, and what makes a transaction outbound."""

    listen: Listen = HostPort("127.0.0.1", 10032)
    socket_mode: int = DEFAULT_SOCKET_MODE
    socket_group: str | None = None
    outbound_daemons: tuple[str, ...] = ("ORIGINATING",)  # {daemon_name} values of the submission service
    trusted: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in LOOPBACK)
    authenticated_outbound: bool = True  # {auth_authen} set: the client authenticated


@dataclass(frozen=True)
class LedgerConfig:
    """[ledger]: the Message-ID ledger (docs/ledger.md). On when the keyring has a ledger secret."""

    enabled: bool = True
    days: int = 30  # how long a sent message may be answered
    max_replies: int = 20  # messages one ledgered Message-ID vouches for
    path: Path | None = None  # None: ledger.sqlite next to the keyring


@dataclass(frozen=True)
class Config:
    path: Path | None
    hostname: str
    keyring_path: Path
    lifetime_days: int
    policy: PolicySettings
    listeners: tuple[ListenerConfig, ...]
    limits: Limits = field(default_factory=Limits)
    workers: int = 1
    # [gateway] workers = "auto", given or by default: the gateway's choice, not the operator's, so serve may
    # run fewer when more cannot start (state.workers_that_start).
    workers_auto: bool = False
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    socketmap: SocketmapConfig = field(default_factory=SocketmapConfig)
    policyd: PolicydConfig = field(default_factory=PolicydConfig)
    state: StateConfig = field(default_factory=StateConfig)
    milter: MilterConfig = field(default_factory=MilterConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    # One line each, naming the file and the key: what loads but is probably not what the operator wants.
    # check-config prints them and serve logs them at start-up.
    warnings: tuple[str, ...] = ()

    @property
    def srs_max_age_days(self) -> int:
        return self.policy.srs_options.max_age

    @property
    def ledger_path(self) -> Path:
        """The ledger's SQLite file: [ledger] path, else ledger.sqlite in the keyring's folder."""
        return self.ledger.path or self.keyring_path.parent / "ledger.sqlite"


class _Table:
    """One TOML table, read key by key; whatever is left unread at the end is an unknown key."""

    def __init__(self, origin: str, name: str, data: Any) -> None:
        self.origin, self.name = origin, name
        if not isinstance(data, dict):
            raise self.error(None, f"must be a table, not {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.used: set[str] = set()
        # Every key the parser asks for, present or not: parse() asks for each key of the schema before
        # done(), so this is what the table allows.
        self.asked: set[str] = set()

    def error(self, key: str | None, what: str) -> ConfigError:
        where = f"[{self.name}]" + (f" {key}" if key else "")
        return ConfigError(f"{self.origin}: {where}: {what}")

    def _get(self, key: str, types: type | tuple[type, ...], expected: str) -> Any:
        self.used.add(key)
        self.asked.add(key)
        value = self.data[key]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise self.error(key, f"expected {expected}, got {value!r}")
        if not isinstance(value, types):
            raise self.error(key, f"expected {expected}, got {value!r}")
        return value

    def has(self, key: str) -> bool:
        self.asked.add(key)
        return key in self.data

    def string(self, key: str, default: str) -> str:
        self.asked.add(key)
        return str(self._get(key, str, "a string")) if key in self.data else default

    def boolean(self, key: str, default: bool) -> bool:
        self.asked.add(key)
        return bool(self._get(key, bool, "true or false")) if key in self.data else default

    def integer(self, key: str, default: int, low: int = 0, high: int | None = None) -> int:
        self.asked.add(key)
        if key not in self.data:
            return default
        value = int(self._get(key, int, "a whole number"))
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise self.error(key, f"expected a whole number {bound}, got {value}")
        return value

    def number(self, key: str, default: float, low: float = 0.0) -> float:
        self.asked.add(key)
        if key not in self.data:
            return default
        value = float(self._get(key, (int, float), "a number"))
        if value < low:
            raise self.error(key, f"expected a number of at least {low}, got {value}")
        return value

    def strings(self, key: str, default: Sequence[str] = ()) -> tuple[str, ...]:
        self.asked.add(key)
        if key not in self.data:
            return tuple(default)
        value = self._get(key, list, "a list of strings")
        if not all(isinstance(v, str) for v in value):
            raise self.error(key, f"expected a list of strings, got {value!r}")
        return tuple(value)

    def choice(self, key: str, enum_type: type[E], default: E) -> E:
        self.asked.add(key)
        if key not in self.data:
            return default
        value = self._get(key, str, "a string")
        try:
            return enum_type(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in enum_type)
            raise self.error(key, f"expected one of {allowed}, got {value!r}") from None

    def hostport(self, key: str, default: HostPort | None) -> HostPort | None:
        self.asked.add(key)
        if key not in self.data:
            return default
        text = self.string(key, "")
        if text == "":
            return None
        try:
            return HostPort.parse(text)
        except ConfigError as exc:
            raise self.error(key, str(exc).split(": ", 1)[-1]) from None

    def listen(self, key: str, default: Listen) -> Listen:
        """HOST:PORT or unix:/PATH, with the socket file's `socket_mode` and `socket_group` beside it."""
        text = self.string(key, "") if key in self.data else ""
        if text == "":
            return default
        try:
            return parse_listen(text)
        except ConfigError as exc:
            raise self.error(key, str(exc).split(": ", 1)[-1]) from None

    def socket_file(self, listen: Listen) -> tuple[int, str | None]:
        """`socket_mode` (an octal string, "0660") and `socket_group` (a group name) for a unix: listen
        address; refused with a TCP one, where they would silently mean nothing."""
        mode, group = DEFAULT_SOCKET_MODE, None
        for key in ("socket_mode", "socket_group"):
            if self.has(key) and not isinstance(listen, UnixPath):
                raise self.error(key, f"applies to a unix:/PATH listen address only, not {listen}")
        if "socket_mode" in self.data:
            text = self._get("socket_mode", str, 'an octal mode in quotes, such as "0660"')
            if not _OCTAL_MODE.fullmatch(text):
                raise self.error(
                    "socket_mode", f'expected an octal mode in quotes, such as "0660", got {text!r}'
                )
            mode = int(text, 8)
            if mode & 0o002:
                raise self.error(
                    "socket_mode",
                    f"{text!r} lets every local user connect, which a unix socket is there to prevent:"
                    ' use "0660" and socket_group',
                )
            if mode & 0o600 != 0o600:
                raise self.error("socket_mode", f"{text!r} must give the service's own user read and write")
        if "socket_group" in self.data:
            group = self._get("socket_group", str, "a group name")
            try:
                grp.getgrnam(group)
            except KeyError:
                raise self.error(
                    "socket_group", f"no group named {group!r} on this host (Postfix's is usually 'postfix')"
                ) from None
        return mode, group

    def path(self, key: str, default: Path | None) -> Path | None:
        text = self.string(key, "" if default is None else str(default))
        return Path(text) if text else None

    def networks(self, key: str, default: Iterable[str]) -> tuple[IPNetwork, ...]:
        out = []
        for text in self.strings(key, tuple(default)):
            try:
                out.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise self.error(
                    key, f"{text!r} is not a network in CIDR form (for example 10.0.0.0/8)"
                ) from None
        return tuple(out)

    def table(self, key: str) -> _Table:
        self.used.add(key)
        self.asked.add(key)
        return _Table(self.origin, f"{self.name}.{key}" if self.name else key, self.data.get(key, {}))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise unknown_error(self.origin, f"[{self.name}]", "key", unknown[0], sorted(self.asked))


def unknown_error(origin: str, where: str, kind: str, name: str, allowed: Sequence[str]) -> ConfigError:
    """`gateway.toml: [inbound] unknown key "oberve"; did you mean "observe"? allowed: ...`: a misspelling
    is the usual cause, so the closest allowed name comes first, then the whole list."""
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f'; did you mean "{close[0]}"?' if close else ";"
    where = f"{where} " if where else ""
    return ConfigError(
        f'{origin}: {where}unknown {kind} "{name}"{hint} allowed: {", ".join(allowed) or "none"}'
        " (see deploy/gateway.example.toml)"
    )


_TOP = (
    *("gateway", "batv", "srs", "policy", "limits", "listener", "log", "metrics", "socketmap", "policyd"),
    *("state", "milter", "ledger"),
)


def _limits(table: _Table, base: Limits) -> Limits:
    values: dict[str, Any] = {}
    for f in fields(Limits):
        current = getattr(base, f.name)
        if isinstance(current, int):
            values[f.name] = table.integer(f.name, current)
        else:
            values[f.name] = table.number(f.name, current)
    table.done()
    if values["hard_error_limit"] < values["soft_error_limit"]:
        raise table.error("hard_error_limit", "must not be below soft_error_limit")
    return Limits(**values)


_KEY_PREFIX = re.compile(r"[!-~]*")  # printable ASCII, no space


def _state(table: _Table) -> StateConfig:
    from .state import redact, url_problem  # state.py imports redis only when it makes a Redis store

    backend = table.choice("backend", StateBackend, StateBackend.SQLITE)
    path = table.path("path", None)
    url = table.string("url", "") or None
    if backend is StateBackend.REDIS:
        if url is None:
            raise table.error("url", 'is required with backend = "redis" (for example "redis://10.0.0.5:6379/0")')
        problem = url_problem(url)
        if problem:
            raise table.error("url", f"{redact(url, url)!r} {problem}")
        if path is not None:
            raise table.error("path", 'is the SQLite file: leave it out with backend = "redis"')
    elif url is not None:
        raise table.error("url", 'applies to backend = "redis" only: set backend = "redis", or leave url out')
    prefix = table.string("key_prefix", StateConfig.key_prefix)
    if not _KEY_PREFIX.fullmatch(prefix) or "{" in prefix or "}" in prefix:
        raise table.error(
            "key_prefix", f"{prefix!r}: use printable ASCII without spaces or braces (braces are Redis"
            ' Cluster hash tags), for example "batv:"'
        )
    values: dict[str, Any] = {}
    for key in ("connect_timeout", "command_timeout", "retry_after", "null_sender_rate"):
        values[key] = table.number(key, getattr(StateConfig, key))
    for key in ("connect_timeout", "command_timeout"):
        if values[key] <= 0:
            raise table.error(key, f"must be more than 0 seconds (for example {getattr(StateConfig, key)})")
    state = StateConfig(
        backend=backend,
        path=path,
        url=url,
        key_prefix=prefix,
        guess_network_factor=table.integer("guess_network_factor", StateConfig.guess_network_factor, 0, 256),
        null_sender_burst=table.integer("null_sender_burst", StateConfig.null_sender_burst, 1),
        **values,
    )
    table.done()
    return state


MAX_WORKERS = 64


def cpus() -> int:
    """`workers = "auto"`: the CPUs this process may run on, at least 1. Its affinity rather than every CPU
    of the machine (os.cpu_count), so that a cpuset or systemd's CPUAffinity= narrows it; a cgroup CPU
    quota (a container's CPU limit) is not seen, so a container sets a number."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _workers(gw: _Table) -> tuple[int, bool]:
    """The number of workers, and whether it is "auto" (the default: one per CPU, issue 14)."""
    if not gw.has("workers") or isinstance(gw.data["workers"], str):
        if gw.string("workers", "auto") != "auto":
            expected = f'a whole number from 1 to {MAX_WORKERS} or "auto"'
            raise gw.error("workers", f"expected {expected}, got {gw.data['workers']!r}")
        return min(MAX_WORKERS, cpus()), True
    return gw.integer("workers", 1, 1, MAX_WORKERS), False


def qualified(hostname: str) -> bool:
    """A name other mail servers can check: it has a dot and is not localhost (RFC 5321 4.1.1.1, 4.1.3)."""
    name = hostname.lower().rstrip(".")
    return "." in name and name != "localhost" and not name.startswith("localhost.")


def parse(
    data: dict[str, Any],
    origin: str = "<config>",
    path: Path | None = None,
    fqdn: Callable[[], str] | None = None,
) -> Config:
    """`fqdn`: where the hostname comes from when [gateway] hostname is not set (default: host_fqdn)."""
    root = _Table(origin, "", data)
    warnings: list[str] = []
    for key in data:
        if key not in _TOP:
            raise unknown_error(origin, "", "table", key, _TOP)

    gw = root.table("gateway")
    hostname = gw.string("hostname", "")
    if not hostname:
        hostname = (fqdn or host_fqdn)()
        if not qualified(hostname):
            # socket.getfqdn() gives "localhost" (or the bare host name) on a host whose name is not
            # set up, and a greeting or EHLO as that is refused or scored as spam by many peers.
            warnings.append(
                f"{origin}: [gateway] hostname: not set, and this host has no fully qualified name, so the "
                f'gateway would greet and say EHLO as "{hostname}"; set [gateway] hostname = "mx.example.com"'
            )
    keyring_path = gw.path("keyring", DEFAULT_KEYRING) or DEFAULT_KEYRING
    local = gw.strings("local_domains")
    signed = gw.strings("signed_domains", local) if gw.has("signed_domains") else local
    workers, workers_auto = _workers(gw)
    gw.done()

    batv = root.table("batv")
    # The day stamp wraps every 1000 days; a lifetime near that would make every stamp look current.
    lifetime = batv.integer("lifetime_days", 7, 1, 365)
    batv.done()

    st = root.table("srs")
    alias = st.string("alias", "") or None
    separator = st.string("separator", "=")
    if separator not in ("=", "+", "-"):
        raise st.error("separator", f"expected one of '=', '+', '-', got {separator!r}")
    hash_length = st.integer("hash_length", 4, 1, 27)
    hash_min = st.integer("hash_min", hash_length, 1, 27)
    if hash_min > hash_length:
        raise st.error("hash_min", f"must not exceed hash_length ({hash_length})")
    srs_options = SrsOptions(
        separator=separator,
        hash_length=hash_length,
        hash_min=hash_min,
        max_age=st.integer("max_age_days", 21, 1, 1023),
        always_rewrite=st.boolean("always_rewrite", False),
        base64url=st.boolean("base64url", False),
    )
    st.done()

    po = root.table("policy")
    settings = PolicySettings(
        local_domains=frozenset(local),
        signed_domains=frozenset(signed),
        srs_alias=alias,
        srs_options=srs_options,
        lifetime_days=lifetime,
        exempt_local_parts=frozenset(po.strings("exempt_local_parts", ("postmaster", "abuse"))),
        exempt_recipients=frozenset(po.strings("exempt_recipients")),
        exempt_senders=frozenset(po.strings("exempt_senders")),
        observe_domains=frozenset(po.strings("observe_domains")),
        invalid_tag_with_sender=po.choice(
            "invalid_tag_with_sender", InvalidTagAction, InvalidTagAction.ACCEPT
        ),
        skip_local_recipients=po.boolean("skip_local_recipients", False),
        bounce_grace=po.boolean("bounce_grace", True),
    )
    po.done()

    limits = _limits(root.table("limits"), Limits())

    listeners = []
    root.used.add("listener")
    raw_listeners = data.get("listener", [])
    if not isinstance(raw_listeners, list):
        raise root.error("listener", "expected [[listener]] tables (an array of tables)")
    for n, raw in enumerate(raw_listeners):
        lt = _Table(origin, f"listener {n + 1}", raw)
        role = lt.choice("role", Role, Role.INBOUND)
        listen = lt.hostport("listen", None)
        next_hop = lt.hostport("next_hop", None)
        if listen is None or next_hop is None:
            missing = "listen" if listen is None else "next_hop"
            raise lt.error(missing, "is required (HOST:PORT)")
        tls_cert, tls_key = lt.path("tls_cert", None), lt.path("tls_key", None)
        if (tls_cert is None) != (tls_key is None):
            raise lt.error("tls_cert" if tls_cert is None else "tls_key", "tls_cert and tls_key go together")
        listeners.append(
            ListenerConfig(
                name=lt.string("name", f"{role.value}-{n + 1}"),
                role=role,
                listen=listen,
                next_hop=next_hop,
                observe=lt.boolean("observe", False),
                trusted=lt.networks("trusted", LOOPBACK),
                tls_cert=tls_cert,
                tls_key=tls_key,
                limits=_limits(lt.table("limits"), limits),
            )
        )
        lt.done()
    names = [listener.name for listener in listeners]
    if len(set(names)) != len(names):
        raise root.error("listener", "two listeners have the same name")

    lg = root.table("log")
    fmt = lg.string("format", "logfmt")
    if fmt not in ("logfmt", "json"):
        raise lg.error("format", f"expected 'logfmt' or 'json', got {fmt!r}")
    level = lg.string("level", "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise lg.error("level", f"expected 'debug', 'info', 'warning' or 'error', got {level!r}")
    lg.done()

    mt = root.table("metrics")
    metrics = MetricsConfig(mt.hostport("listen", None))
    mt.done()

    sm = root.table("socketmap")
    sm_listen = sm.listen("listen", SocketmapConfig.listen)
    sm_mode, sm_group = sm.socket_file(sm_listen)
    socketmap = SocketmapConfig(
        listen=sm_listen,
        tcp_forward=sm.hostport("tcp_forward", None),
        tcp_reverse=sm.hostport("tcp_reverse", None),
        max_request=sm.integer("max_request", 4096, 64, 1 << 20),
        cache_size=sm.integer("cache_size", 65536, 0, 1 << 24),
        socket_mode=sm_mode,
        socket_group=sm_group,
    )
    sm.done()

    pd = root.table("policyd")
    pd_listen = pd.listen("listen", PolicydConfig.listen)
    pd_mode, pd_group = pd.socket_file(pd_listen)
    policyd = PolicydConfig(
        pd_listen,
        observe=pd.boolean("observe", False),
        socket_mode=pd_mode,
        socket_group=pd_group,
        metrics_listen=pd.hostport("metrics_listen", None),
    )
    pd.done()
    state = _state(root.table("state"))

    mi = root.table("milter")
    mi_listen = mi.listen("listen", MilterConfig.listen)
    mi_mode, mi_group = mi.socket_file(mi_listen)
    milter = MilterConfig(
        mi_listen,
        socket_mode=mi_mode,
        socket_group=mi_group,
        outbound_daemons=mi.strings("outbound_daemons", MilterConfig.outbound_daemons),
        trusted=mi.networks("trusted", LOOPBACK),
        authenticated_outbound=mi.boolean("authenticated_outbound", True),
    )
    mi.done()

    ld = root.table("ledger")
    ledger = LedgerConfig(
        enabled=ld.boolean("enabled", True),
        days=ld.integer("days", LedgerConfig.days, 1, 365),
        max_replies=ld.integer("max_replies", LedgerConfig.max_replies, 1, 1_000_000),
        path=ld.path("path", None),
    )
    ld.done()
    root.done()

    if settings.srs_options.always_rewrite and alias is None:
        raise ConfigError(f"{origin}: [srs] always_rewrite: needs [srs] alias")
    return Config(
        path=path,
        hostname=hostname,
        keyring_path=keyring_path,
        lifetime_days=lifetime,
        policy=settings,
        listeners=tuple(listeners),
        limits=limits,
        workers=workers,
        workers_auto=workers_auto,
        log=LogConfig(fmt, level),
        metrics=metrics,
        socketmap=socketmap,
        policyd=policyd,
        state=state,
        milter=milter,
        ledger=ledger,
        warnings=tuple(warnings),
    )


def check_listeners(config: Config) -> None:
    """What a listener needs from the rest of the config, checked once flags are applied (serve, and
    check-config): an inbound listener with no domain of ours would answer every RCPT with
    554 5.7.1 Relay access denied."""
    origin = str(config.path) if config.path is not None else "<embedded default>"
    for listener in config.listeners:
        if listener.role is Role.INBOUND and not config.policy.our_domains:
            raise ConfigError(
                f'{origin}: listener "{listener.name}" (inbound) has no local domain, so it would refuse '
                'every recipient with 554 5.7.1 Relay access denied; set [gateway] local_domains = '
                '["example.com"] (or give --domain)'
            )


def load(path: Path) -> Config:
    """Read and check a config file. Every error names the file and the key."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file (give --config FILE, or copy deploy/gateway.example.toml)"
        ) from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied (the gateway's user must be able to read it)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(data, str(path), path)


def default() -> Config:
    """The embedded default: nothing configured, loopback only, a development keyring under keys/."""
    return parse({}, "<embedded default>")


# `batv-gateway serve` with no config file: both roles on loopback only, for trying the gateway out.
# Mail for example.com comes in on 2525, mail to sign goes out on 2587, and both go on to 2526.
EMBEDDED_SERVE: dict[str, Any] = {
    "gateway": {"hostname": "localhost", "local_domains": ["example.com"]},
    "srs": {"alias": "fwd.example.com"},
    "listener": [
        {"name": "inbound", "role": "inbound", "listen": "127.0.0.1:2525", "next_hop": "127.0.0.1:2526"},
        {"name": "outbound", "role": "outbound", "listen": "127.0.0.1:2587", "next_hop": "127.0.0.1:2526"},
    ],
    "metrics": {"listen": "127.0.0.1:9425"},
}


def embedded_serve() -> Config:
    """The embedded default of serve: see EMBEDDED_SERVE."""
    return parse(EMBEDDED_SERVE, "<embedded default>")


def with_flags(
    config: Config,
    *,
    role: Role | None = None,
    listen: str | None = None,
    next_hop: str | None = None,
    keyring: str | None = None,
    domains: Sequence[str] = (),
    srs_alias: str | None = None,
    trusted: Sequence[str] = (),
) -> Config:
    """Apply the quick-start flags of serve, socketmap and policy. Flags override the file.

    --domain replaces both the local and the signed domains. Any of --role, --listen, --next-hop or
    --trusted replaces the file's listeners with one listener, taking what the flags leave out from the
    file's first listener of that role, or from the defaults.
    """
    policy = config.policy
    if domains:
        policy = replace(policy, local_domains=frozenset(domains), signed_domains=frozenset(domains))
    if srs_alias is not None:
        policy = replace(policy, srs_alias=srs_alias or None)
    config = replace(config, policy=policy)
    if keyring is not None:
        config = replace(config, keyring_path=Path(keyring))
    if role is None and listen is None and next_hop is None and not trusted:
        return config
    role = role or (config.listeners[0].role if config.listeners else Role.INBOUND)
    base = next((lc for lc in config.listeners if lc.role is role), None)
    defaults = {
        Role.INBOUND: ("127.0.0.1:2525", "127.0.0.1:2526"),
        Role.OUTBOUND: ("127.0.0.1:2587", "127.0.0.1:2526"),
    }
    try:
        listen_hp = (
            HostPort.parse(listen, "--listen")
            if listen
            else (base.listen if base else HostPort.parse(defaults[role][0]))
        )
        hop_hp = (
            HostPort.parse(next_hop, "--next-hop")
            if next_hop
            else (base.next_hop if base else HostPort.parse(defaults[role][1]))
        )
        nets = tuple(ipaddress.ip_network(t, strict=False) for t in trusted) if trusted else None
    except ValueError as exc:
        raise ConfigError(f"--trusted: {exc}") from None
    listener = ListenerConfig(
        name=base.name if base else role.value,
        role=role,
        listen=listen_hp,
        next_hop=hop_hp,
        observe=base.observe if base else False,
        trusted=nets if nets is not None else (base.trusted if base else ListenerConfig.trusted),
        tls_cert=base.tls_cert if base else None,
        tls_key=base.tls_key if base else None,
        limits=base.limits if base else config.limits,
    )
    return replace(config, listeners=(listener,))
