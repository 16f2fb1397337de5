"""The strict config: every key of the example loads, and every mistake names the file and the key."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from pathlib import Path

import pytest

from gateway.core.errors import ConfigError
from gateway.ops import config
from gateway.ops.config import HostPort, Role
from gateway.policy.policy import InvalidTagAction

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "gateway.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_the_example_config_loads_with_every_key() -> None:
    cfg = config.load(EXAMPLE)
    assert cfg.hostname == "mx.example.com"
    assert cfg.policy.local_domains == {"example.com", "example.org"}
    assert cfg.policy.srs_alias == "fwd.example.com"
    assert [lc.role for lc in cfg.listeners] == [Role.INBOUND, Role.OUTBOUND]
    mx, relay = cfg.listeners
    assert mx.listen == HostPort("0.0.0.0", 25)
    assert mx.limits.max_sessions == 200  # the listener's own table overrides [limits]
    assert relay.limits.max_sessions == 100
    assert mx.tls_cert is None
    assert relay.trusted == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert cfg.metrics.listen == HostPort("127.0.0.1", 9425)
    assert cfg.socketmap.tcp_forward is None
    assert cfg.socketmap.cache_size == 65536
    assert cfg.policy.bounce_grace is True


def test_the_embedded_default_needs_no_file() -> None:
    cfg = config.default()
    assert cfg.keyring_path == Path("keys/keyring.toml")
    assert cfg.lifetime_days == 7
    assert cfg.policy.srs_options.max_age == 21
    assert cfg.listeners == ()


def test_signed_domains_default_to_local_domains(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, '[gateway]\nlocal_domains = ["Example.COM"]\n'))
    assert cfg.policy.signed_domains == {"example.com"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[gateway]\nkeyrnig = 'x'\n", '[gateway] unknown key "keyrnig"; did you mean "keyring"?'),
        ("[gatway]\n", 'unknown table "gatway"; did you mean "gateway"?'),
        ("[batv]\nlifetime_days = 'seven'\n", "[batv] lifetime_days: expected a whole number, got 'seven'"),
        ("[batv]\nlifetime_days = true\n", "[batv] lifetime_days: expected a whole number, got True"),
        ("[batv]\nlifetime_days = 0\n", "[batv] lifetime_days: expected a whole number from 1 to 365, got 0"),
        ("[srs]\nseparator = '_'\n", "[srs] separator: expected one of '=', '+', '-', got '_'"),
        ("[srs]\nhash_length = 4\nhash_min = 6\n", "[srs] hash_min: must not exceed hash_length (4)"),
        (
            "[policy]\ninvalid_tag_with_sender = 'bounce'\n",
            "expected one of 'accept', 'reject', got 'bounce'",
        ),
        ("[policy]\nbounce_grace = 'no'\n", "[policy] bounce_grace: expected true or false"),
        ("[[listener]]\nrole = 'inbound'\nlisten = '127.0.0.1:25'\n", "[listener 1] next_hop: is required"),
        ("[[listener]]\nrole = 'sideways'\n", "[listener 1] role: expected one of 'inbound', 'outbound'"),
        (
            "[[listener]]\nlisten = 'localhost'\nnext_hop = '127.0.0.1:1'\n",
            "[listener 1] listen: 'localhost' is not HOST:PORT",
        ),
        (
            "[[listener]]\nlisten = '127.0.0.1:1'\nnext_hop = '127.0.0.1:2'\ntrusted = ['10.0.0.0/33']\n",
            "[listener 1] trusted: '10.0.0.0/33' is not a network in CIDR form",
        ),
        (
            "[[listener]]\nlisten = '127.0.0.1:1'\nnext_hop = '127.0.0.1:2'\ntls_cert = 'c.pem'\n",
            "tls_cert and tls_key go together",
        ),
        (
            "[[listener]]\nlisten = '127.0.0.1:1'\nnext_hop = '127.0.0.1:2'\n"
            "[listener.limits]\nmax_sesions = 3\n",
            '[listener 1.limits] unknown key "max_sesions"; did you mean "max_sessions"?',
        ),
        (
            "[limits]\nsoft_error_limit = 30\n",
            "[limits] hard_error_limit: must not be below soft_error_limit",
        ),
        ("[log]\nformat = 'xml'\n", "[log] format: expected 'logfmt' or 'json'"),
        (
            "[socketmap]\ncache_size = -1\n",
            "[socketmap] cache_size: expected a whole number from 0 to 16777216, got -1",
        ),
        ("[srs]\nalways_rewrite = true\n", "[srs] always_rewrite: needs [srs] alias"),
        ("[gateway\n", "not valid TOML"),
    ],
)
def test_each_mistake_is_one_line_naming_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    message = str(caught.value)
    assert message.startswith(str(path))
    assert expected in message
    assert "\n" not in message


def test_a_missing_file_says_how_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml")


def test_flags_override_the_file() -> None:
    cfg = config.with_flags(
        config.load(EXAMPLE),
        role=Role.OUTBOUND,
        listen="127.0.0.1:2600",
        keyring="/tmp/k.toml",
        domains=["example.net"],
        srs_alias="srs.example.net",
        trusted=["192.0.2.0/24"],
    )
    assert cfg.keyring_path == Path("/tmp/k.toml")
    assert cfg.policy.signed_domains == {"example.net"} == cfg.policy.local_domains
    assert cfg.policy.srs_alias == "srs.example.net"
    (listener,) = cfg.listeners
    assert listener.role is Role.OUTBOUND
    assert listener.listen == HostPort("127.0.0.1", 2600)
    assert listener.next_hop == HostPort("127.0.0.1", 10026)  # from the file's outbound listener
    assert listener.trusted == (ipaddress.ip_network("192.0.2.0/24"),)


def test_flags_alone_make_a_listener() -> None:
    cfg = config.with_flags(config.default(), listen="[::1]:2525", next_hop="127.0.0.1:2526")
    (listener,) = cfg.listeners
    assert listener.role is Role.INBOUND
    assert listener.listen == HostPort("::1", 2525)
    assert str(listener.listen) == "[::1]:2525"


def test_a_bad_flag_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--listen: 'nowhere' is not HOST:PORT"):
        config.with_flags(config.default(), listen="nowhere")
    with pytest.raises(ConfigError, match="--trusted"):
        config.with_flags(config.default(), trusted=["not-a-net"])


def test_invalid_tag_action_is_typed(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, "[policy]\ninvalid_tag_with_sender = 'reject'\n"))
    assert cfg.policy.invalid_tag_with_sender is InvalidTagAction.REJECT


def test_an_unknown_key_lists_what_the_table_allows_and_the_closest(tmp_path: Path) -> None:
    """The allowed keys are the schema's, not only those the file happens to hold."""
    path = write(tmp_path, "[[listener]]\nlisten = '127.0.0.1:1'\nnext_hop = '127.0.0.1:2'\noberve = true\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert str(caught.value) == (
        f'{path}: [listener 1] unknown key "oberve"; did you mean "observe"? allowed: limits, listen, name, '
        "next_hop, observe, role, tls_cert, tls_key, trusted (see deploy/gateway.example.toml)"
    )


def test_an_unknown_key_like_no_other_gets_the_list_alone(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, "[log]\nzzz = 1\n"))
    message = str(caught.value)
    assert '[log] unknown key "zzz"; allowed: format, level (' in message
    assert "did you mean" not in message


def test_every_key_of_the_example_is_allowed_where_it_stands() -> None:
    """The schema the errors list is the one the example documents: no table allows less than it shows."""
    data = tomllib.loads(EXAMPLE.read_text())
    for table, values in data.items():
        rows = values if isinstance(values, list) else [values]
        for row in rows:
            for key in row:
                misspelt = {**row, key + "x": 1}
                broken = {**data, table: [misspelt] if isinstance(values, list) else misspelt}
                with pytest.raises(ConfigError) as caught:
                    config.parse(broken, "example")
                assert f'did you mean "{key}"?' in str(caught.value)


def test_hostname_comes_from_the_host_and_warns_when_it_is_not_qualified() -> None:
    cfg = config.parse({}, "gateway.toml", fqdn=lambda: "localhost")
    assert cfg.hostname == "localhost"
    (warning,) = cfg.warnings
    assert warning.startswith("gateway.toml: [gateway] hostname: not set")
    assert 'greet and say EHLO as "localhost"' in warning and "\n" not in warning
    bare = config.parse({}, "gateway.toml", fqdn=lambda: "vm")
    assert bare.warnings == (warning.replace('"localhost"', '"vm"'),)
    qualified = config.parse({}, "gateway.toml", fqdn=lambda: "mx1.example.com")
    assert qualified.hostname == "mx1.example.com" and qualified.warnings == ()


def test_a_hostname_in_the_file_does_not_ask_the_host() -> None:
    def no_lookup() -> str:
        raise AssertionError("the host's name was looked up")

    cfg = config.parse({"gateway": {"hostname": "mx.example.com"}}, "gateway.toml", fqdn=no_lookup)
    assert cfg.hostname == "mx.example.com" and cfg.warnings == ()


@pytest.mark.parametrize("name", ["localhost", "localhost.localdomain", "vm", "mx.example.com."])
def test_qualified_names(name: str) -> None:
    assert config.qualified(name) is (name == "mx.example.com.")


INBOUND = {"listener": [{"name": "mx", "listen": "127.0.0.1:1", "next_hop": "127.0.0.1:2"}]}


def test_an_inbound_listener_without_a_local_domain_is_refused(tmp_path: Path) -> None:
    """Without one, every RCPT would get 554 Relay access denied."""
    path = write(tmp_path, "[[listener]]\nname = 'mx'\nlisten = '127.0.0.1:1'\nnext_hop = '127.0.0.1:2'\n")
    with pytest.raises(ConfigError) as caught:
        config.check_listeners(config.load(path))
    message = str(caught.value)
    assert message.startswith(f'{path}: listener "mx" (inbound) has no local domain')
    assert "554 5.7.1 Relay access denied" in message and "[gateway] local_domains" in message
    assert "\n" not in message


def test_a_domain_from_the_file_or_a_flag_is_enough() -> None:
    for cfg in (
        config.parse({**INBOUND, "gateway": {"local_domains": ["example.com"]}}),
        config.parse({**INBOUND, "gateway": {"signed_domains": ["example.com"]}}),
        config.with_flags(config.parse(INBOUND), domains=["example.com"]),
        config.parse({"listener": [{**INBOUND["listener"][0], "role": "outbound"}]}),
    ):
        config.check_listeners(cfg)


def test_the_grace_window_is_on_by_default_and_one_key_turns_it_off(tmp_path: Path) -> None:
    assert config.default().policy.bounce_grace is True
    assert config.load(write(tmp_path, "[policy]\nbounce_grace = false\n")).policy.bounce_grace is False


def test_state_defaults_to_sqlite_and_a_redis_url_is_read(tmp_path: Path) -> None:
    assert config.default().state == config.StateConfig()
    # The example shows the defaults, but for the SQLite file, in the unit's StateDirectory.
    example = config.load(EXAMPLE).state
    in_state_directory = Path("/var/lib/batv-gateway/state.sqlite")
    assert example == dataclasses.replace(config.StateConfig(), path=in_state_directory)
    text = '[state]\nbackend = "redis"\nurl = "rediss://:pw@redis.example.com:6380/2"\nkey_prefix = "mx:"\n'
    state = config.load(write(tmp_path, text)).state
    assert state.backend is config.StateBackend.REDIS and state.url == "rediss://:pw@redis.example.com:6380/2"
    assert state.key_prefix == "mx:" and state.connect_timeout == 0.5
    assert "pw" not in repr(state)  # a config printed whole keeps the password out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('backend = "redis"', '[state] url: is required with backend = "redis"'),
        ('backend = "memcached"', "[state] backend: expected one of 'sqlite', 'redis'"),
        ('url = "redis://10.0.0.5"', '[state] url: applies to backend = "redis" only'),
        ('backend = "redis"\nurl = "http://:s3cr3t@10.0.0.5/"', "must start with redis://, rediss:// or unix://"),
        ('backend = "redis"\nurl = "redis://:s3cr3t@10.0.0.5:63x9/0"', "is not a URL with a valid port"),
        ('backend = "redis"\nurl = "unix://relative.sock?password=s3cr3t"', "needs an absolute socket path"),
        ('backend = "redis"\nurl = "redis:///0"', "names no host"),
        ('backend = "redis"\nurl = "redis://h/0"\npath = "/var/lib/x"', "[state] path: is the SQLite file"),
        ('key_prefix = "{batv}:"', "[state] key_prefix: '{batv}:': use printable ASCII without spaces"),
        ("command_timeout = 0", "[state] command_timeout: must be more than 0 seconds"),
        ("null_sender_burst = 0", "[state] null_sender_burst: expected a whole number at least 1"),
        ("retries = 3", '[state] unknown key "retries"'),
    ],
)
def test_state_mistakes_name_the_key_and_never_the_password(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, f"[state]\n{text}\n")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and expected in message
    assert "s3cr3t" not in message and "\n" not in message


def test_the_ledger_table_defaults_and_its_file_next_to_the_keyring() -> None:
    cfg = config.parse({"gateway": {"keyring": "/etc/batv-gateway/keyring.toml"}}, "<t>")
    assert cfg.ledger == config.LedgerConfig(enabled=True, days=30, max_replies=20, path=None)
    assert cfg.ledger_path == Path("/etc/batv-gateway/ledger.sqlite")
    table = {"enabled": False, "days": 7, "max_replies": 3, "path": "/var/l.db"}
    cfg = config.parse({"ledger": table}, "<t>")
    assert cfg.ledger == config.LedgerConfig(False, 7, 3, Path("/var/l.db"))
    assert cfg.ledger_path == Path("/var/l.db")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"days": 0}, "<t>: [ledger] days: expected a whole number from 1 to 365, got 0"),
        ({"max_replies": 0}, "<t>: [ledger] max_replies: expected a whole number from 1 to 1000000, got 0"),
        ({"enabled": "yes"}, "<t>: [ledger] enabled: expected true or false, got 'yes'"),
        ({"dayz": 3}, '<t>: [ledger] unknown key "dayz"'),
    ],
)
def test_the_ledger_table_is_strict(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse({"ledger": table}, "<t>")
    assert str(caught.value).startswith(message)


def test_workers_auto_is_one_per_cpu_this_process_may_use(tmp_path: Path) -> None:
    auto = config.load(write(tmp_path, '[gateway]\nworkers = "auto"\n'))
    assert auto.workers == min(config.MAX_WORKERS, len(os.sched_getaffinity(0))) >= 1 and auto.workers_auto
    # "auto" is the default (issue 14: fast by default).
    assert (config.default().workers, config.default().workers_auto) == (auto.workers, True)
    three = config.load(write(tmp_path, "[gateway]\nworkers = 3\n"))
    assert (three.workers, three.workers_auto) == (3, False)
    for wrong in ['"all"', "0", "65"]:
        with pytest.raises(ConfigError, match=r"\[gateway\] workers: expected a whole number from 1 to 64"):
            config.load(write(tmp_path, f"[gateway]\nworkers = {wrong}\n"))
    with pytest.raises(ConfigError, match=r'or "auto", got \'all\''):
        config.load(write(tmp_path, '[gateway]\nworkers = "all"\n'))
