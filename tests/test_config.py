"""The strict config: every key of the example loads, and every mistake names the file and the key."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from gateway import config
from gateway.config import HostPort, Role
from gateway.errors import ConfigError
from gateway.policy import InvalidTagAction

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
        ("[gateway]\nkeyrnig = 'x'\n", "[gateway] keyrnig: unknown key"),
        ("[gatway]\n", "gatway: unknown table"),
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
            "[listener 1.limits] max_sesions: unknown key",
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


def test_the_grace_window_is_on_by_default_and_one_key_turns_it_off(tmp_path: Path) -> None:
    assert config.default().policy.bounce_grace is True
    assert config.load(write(tmp_path, "[policy]\nbounce_grace = false\n")).policy.bounce_grace is False
