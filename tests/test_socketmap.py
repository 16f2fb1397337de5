"""The socketmap and tcp_table servers: the codecs, the two maps over the one policy, the wire, and real
Postfix asking them (`postmap -q`, and a private instance loaded with deploy/postfix/ rewriting mail)."""

from __future__ import annotations

import grp
import os
import re
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from postfix_instance import (
    DEPLOY_POSTFIX,
    PostfixError,
    PostfixInstance,
    ServerThread,
    SmtpSink,
    free_port,
    live_children,
    load_snippet,
    parse_main_cf,
    private_root,
)

from gateway.cli.postfix import map_service
from gateway.core import prvs, srs
from gateway.core.keyring import Key, Keyring, KeyState
from gateway.edge.relay import PolicyHolder
from gateway.ops import config as gateway_config
from gateway.ops import keystore
from gateway.policy.policy import Policy, PolicySettings
from gateway.postfix.socketmap import (
    DEFAULT_CACHE_SIZE,
    Answer,
    FastForward,
    MapService,
    NetstringReader,
    ProtocolError,
    Status,
    lookup,
    netstring,
    parse_request,
    parse_tcp_request,
    start_socketmap,
    start_tcp_table,
    tcp_decode,
    tcp_encode,
)

TODAY = 20_000
KEYRING = Keyring((Key(3, b"s" * 32, KeyState.ACTIVE), Key(1, b"o" * 32, KeyState.VERIFY)))
ALIAS = "fwd.example.net"
SETTINGS = PolicySettings(
    local_domains=frozenset({"example.org"}),
    signed_domains=frozenset({"example.org"}),
    srs_alias=ALIAS,
    exempt_senders=frozenset({"list-bounces@example.org"}),
)
POLICY = Policy(SETTINGS, KEYRING)
SRS_OPTIONS = SETTINGS.srs_options


def answer(name: str, key: str, policy: Policy = POLICY) -> Answer:
    return lookup(policy, name, key, TODAY)


# --- the netstring codec -------------------------------------------------------------------------------


def test_netstrings_are_split_however_the_bytes_arrive() -> None:
    stream = netstring(b"forward a@b.example") + netstring(b"reverse c@d.example") + netstring(b"")
    reader = NetstringReader(64)
    got = []
    for octet in stream:  # one byte at a time: the worst a TCP peer can do
        reader.feed(bytes([octet]))
        while (payload := reader.next()) is not None:
            got.append(payload)
    assert got == [b"forward a@b.example", b"reverse c@d.example", b""]
    assert reader.buffered == 0


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"65:", "over the limit"),  # the length alone is refused: the body is never buffered
        (b"123456", "not a netstring length"),  # more digits than the limit can have
        (b"x:", "not a netstring length"),
        (b":abc,", "not a netstring length"),
        (b"-1:", "not a netstring length"),
        (b"3:abc;", "not terminated by a comma"),
    ],
)
def test_broken_netstrings_are_protocol_errors(data: bytes, why: str) -> None:
    reader = NetstringReader(64)
    reader.feed(data)
    with pytest.raises(ProtocolError, match=why):
        reader.next()


@settings(max_examples=500, derandomize=True, deadline=None)
@given(
    data=st.one_of(
        st.builds(netstring, st.binary(max_size=80)),
        st.builds(lambda a, b: netstring(a) + b, st.binary(max_size=20), st.binary(min_size=1, max_size=8)),
        st.builds(lambda n, body: b"%s:%s," % (n, body),
                  st.from_regex(rb"[0-9]{0,4}|0+[0-9]{1,3}", fullmatch=True), st.binary(max_size=70)),
        st.binary(max_size=20),
    )
)  # fmt: skip
@example(data=b"0064:" + b"x" * 64 + b",")  # leading zeros beyond the digits the limit has
@example(data=b"65:" + b"x" * 65 + b",")  # over the limit
def test_a_whole_netstring_is_taken_at_once_exactly_when_the_reader_would_take_it(data: bytes) -> None:
    fast = NetstringReader(64).whole(data)
    reader = NetstringReader(64)
    reader.feed(data)
    try:
        general = reader.next()
    except ProtocolError:
        general = None
    # Exactly one whole netstring and nothing after it: taken at once; anything else is left to the reader.
    assert fast == (general if general is not None and reader.buffered == 0 else None)


def test_a_request_is_a_map_name_a_space_and_a_key() -> None:
    assert parse_request(b"forward user@example.org") == ("forward", "user@example.org")
    for bad in (b"forward", b"forward ", b" user@example.org", b"forward \xff@x"):
        with pytest.raises(ProtocolError):
            parse_request(bad)


def test_tcp_table_encoding_round_trips_and_refuses_bad_escapes() -> None:
    text = "a b%c\u00e9\x01@x"
    encoded = tcp_encode(text)
    assert encoded == b"a%20b%25c%C3%A9%01@x"
    assert tcp_decode(encoded) == text
    assert parse_tcp_request(b"get user%40example.org") == "user@example.org"
    for bad in (b"get a%zz", b"get a%4", b"get %ff", b"put a b", b"get ", b"GET a@b"):
        with pytest.raises(ProtocolError):
            parse_tcp_request(bad)


# --- the maps over the policy --------------------------------------------------------------------------


def test_forward_signs_a_sender_in_a_signed_domain_with_prvs() -> None:
    got = answer("forward", "user@example.org")
    assert got.status is Status.OK and got.data.startswith("prvs=3")
    checked = prvs.verify(got.data, KEYRING, TODAY)
    assert checked.verdict is prvs.PrvsVerdict.VALID and checked.address == "user@example.org"
    assert got.data == prvs.sign("user@example.org", KEYRING, TODAY), "the same tag the outbound role makes"


def test_forward_gives_a_foreign_sender_srs0_and_an_srs0_sender_srs1() -> None:
    first = answer("forward", "joe@foreign.test")
    assert first.status is Status.OK and first.data.startswith("SRS0=") and first.data.endswith("@" + ALIAS)
    back = srs.reverse(first.data, KEYRING.srs_secrets(), TODAY, SRS_OPTIONS)
    assert back.address == "joe@foreign.test"
    theirs = "SRS0=abcd=TT=orig.test=joe@other-forwarder.test"
    second = answer("forward", theirs)
    assert second.status is Status.OK and second.data.startswith("SRS1=")
    assert srs.reverse(second.data, KEYRING.srs_secrets(), TODAY, SRS_OPTIONS).address == (
        "SRS0=abcd=TT=orig.test=joe@other-forwarder.test"
    )


@pytest.mark.parametrize(
    "key",
    [
        "user",  # Postfix's partial keys for local addresses
        "@example.org",
        "user@",
        "list-bounces@example.org",  # an exempt sender
        "someone@" + ALIAS,  # already in the alias domain
        "no spaces allowed@example.org",  # not an address
        "a@b@c",
    ],
)
def test_forward_leaves_alone_what_the_outbound_role_leaves_alone(key: str) -> None:
    assert answer("forward", key) == Answer(Status.NOTFOUND)


def test_forward_leaves_an_already_tagged_sender_alone() -> None:
    tagged = prvs.sign("user@example.org", KEYRING, TODAY)
    assert answer("forward", tagged) == Answer(Status.NOTFOUND)
    srs0 = srs.forward("joe@foreign.test", ALIAS, KEYRING.srs_secrets(), TODAY, SRS_OPTIONS)
    assert answer("forward", srs0) == Answer(Status.NOTFOUND)


def test_forward_without_an_active_key_is_temp_so_postfix_keeps_the_mail() -> None:
    verify_only = Policy(SETTINGS, Keyring((Key(1, b"o" * 32, KeyState.VERIFY),)))
    got = answer("forward", "user@example.org", verify_only)
    assert got.status is Status.TEMP and "keys unavailable" in got.data
    # Reversing needs no active key: bounces to tags made before still come home.
    made_before = prvs.sign("user@example.org", Keyring((Key(1, b"o" * 32),)), TODAY)
    assert answer("reverse", made_before, verify_only) == Answer(Status.OK, "user@example.org")


def test_forward_of_an_address_too_long_to_tag_is_notfound_not_a_crash() -> None:
    key = "a" * 64 + "@" + ".".join(["d" * 60] * 3) + ".org"
    assert answer("forward", key) == Answer(Status.NOTFOUND)


def test_reverse_strips_a_valid_tag_and_reverses_a_valid_srs_address() -> None:
    tagged = prvs.sign("user@example.org", KEYRING, TODAY - 2)
    assert answer("reverse", tagged) == Answer(Status.OK, "user@example.org")
    srs0 = srs.forward("Joe@foreign.test", ALIAS, KEYRING.srs_secrets(), TODAY, SRS_OPTIONS)
    assert answer("reverse", srs0) == Answer(Status.OK, "Joe@foreign.test")
    # Postfix lowercases canonical-map keys; the SRS hash is checked without regard to case.
    assert answer("reverse", srs0.lower()) == Answer(Status.OK, "joe@foreign.test")


@pytest.mark.parametrize(
    "key",
    [
        "user@example.org",  # untagged
        "prvs=3000000000=user@example.org",  # forged
        "prvs=9123456789=user@example.org",  # unknown key id
        "SRS0=xxxx=TT=foreign.test=joe@" + ALIAS,  # forged SRS
        "user",
        "@example.org",
    ],
)
def test_reverse_is_notfound_for_anything_not_validly_tagged(key: str) -> None:
    assert answer("reverse", key) == Answer(Status.NOTFOUND)


def test_reverse_refuses_an_expired_tag() -> None:
    old = prvs.sign("user@example.org", KEYRING, TODAY - 30)
    assert answer("reverse", old) == Answer(Status.NOTFOUND)


def test_an_unknown_map_name_is_perm() -> None:
    got = answer("canonical", "user@example.org")
    assert got.status is Status.PERM and "forward and reverse" in got.data


def test_wire_forms_of_answers() -> None:
    assert Answer(Status.OK, "a@b").netstring() == b"6:OK a@b,"
    assert Answer(Status.NOTFOUND).netstring() == b"9:NOTFOUND ,"
    assert Answer(Status.OK, "a b@c").tcp_table() == b"200 a%20b@c\n"
    assert Answer(Status.NOTFOUND).tcp_table() == b"500 not%20found\n"
    assert Answer(Status.TEMP, "later").tcp_table() == b"400 later\n"
    assert Answer(Status.PERM, "bad request").tcp_table() == b"500 bad%20request\n"


# --- the fast path answers exactly what the general path answers ----------------------------------------

_ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
_LONG_DOMAIN = "d" * 63 + "." + "e" * 63 + "." + "f" * 50 + ".org"  # 182 octets: a tag may not fit
_LABEL_CHARS = "abzAZ09_-"


@st.composite
def forward_keys(draw: st.DrawFn) -> str:
    """Keys near the fast path's edge: plain senders in our domains and foreign ones, look-alike tags,
    bad dots, long parts, the alias in any case, trailing dots, quotes, non-ASCII, partial keys."""
    local = draw(
        st.one_of(
            st.text(_ATEXT + ".", min_size=1, max_size=12),
            st.sampled_from(["user", "a.b", "Joe", "list-bounces", "x" * 64, "x" * 65, "postmaster"]),
            st.integers(40, 70).map(lambda n: "y" * n),
            st.builds(
                lambda tag, rest: tag + rest,
                st.sampled_from(
                    ["prvs=", "PRVS=", "prvs=3123abcdef=", "SRS0=", "srs1+", "SRS0-", "Srs1=", "srs2="]
                ),
                st.text(_ATEXT + ".", max_size=12),
            ),
            st.just('"a b"'),
            st.just("\u00e9t\u00e9"),
            st.text(min_size=1, max_size=6),
        )
    )
    domain = draw(
        st.one_of(
            st.sampled_from(
                [
                    "example.org",
                    "EXAMPLE.org",
                    "foreign.test",
                    "fwd.example.net",
                    "FWD.Example.NET",
                    "example.org.",
                    "exempt.test",
                    "signed2.test",
                    "ex\u00e4mple.test",
                    "[192.0.2.1]",
                ]
            ),
            st.lists(st.text(_LABEL_CHARS, min_size=1, max_size=8), min_size=1, max_size=3).map(".".join),
            st.builds(lambda n: ".".join(["d" * 63] * n) + ".test", st.integers(1, 4)),
            st.just(_LONG_DOMAIN),
            st.just("x" * 64 + ".test"),
        )
    )
    form = draw(st.sampled_from(["plain", "plain", "plain", "partial", "no-at", "two-at"]))
    if form == "partial":
        return draw(st.sampled_from([local, "@" + domain, local + "@"]))
    if form == "no-at":
        return local + domain
    if form == "two-at":
        return f"{local}@x@{domain}"
    return f"{local}@{domain}"


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    active = draw(st.booleans()) or draw(st.booleans())
    keyring = Keyring((Key(3, b"s" * 32, KeyState.ACTIVE if active else KeyState.VERIFY),
                       Key(1, b"o" * 32, KeyState.VERIFY)))  # fmt: skip
    options = srs.SrsOptions(
        separator=draw(st.sampled_from(["=", "+", "-"])),
        hash_length=(length := draw(st.integers(1, 27))),
        hash_min=length,
        always_rewrite=draw(st.booleans()),
        base64url=draw(st.booleans()),
    )
    settings_ = PolicySettings(
        local_domains=frozenset({"example.org"}),
        signed_domains=frozenset(
            draw(st.sets(st.sampled_from(["example.org", "Signed2.test", "fwd.example.net", _LONG_DOMAIN])))
        ),
        srs_alias=draw(st.sampled_from([ALIAS, "FWD.example.net.", None, "bounces@fwd.example.net",
                                        "fwd.ex\u00e4mple.net", "not a domain"])),
        srs_options=options,
        lifetime_days=draw(st.sampled_from([7, 0, 999, 1000, -1])),
        exempt_senders=frozenset(draw(st.sets(st.sampled_from(
            ["list-bounces@example.org", "exempt.test", "Joe@foreign.test", "user@EXAMPLE.org"])))),
    )  # fmt: skip
    return Policy(settings_, keyring)


@settings(max_examples=1500, derandomize=True, deadline=None)
@given(policy=policies(), key=forward_keys(), day=st.integers(0, 60000))
@example(policy=POLICY, key="user@example.org", day=TODAY)
@example(policy=POLICY, key="joe@foreign.test", day=TODAY)
@example(  # the alias given as an address: a sender in its domain is answered as it is, not rewritten
    policy=Policy(replace(SETTINGS, srs_alias="bounces@" + ALIAS), KEYRING), key="joe@" + ALIAS, day=TODAY
)
@example(  # a tag that would not fit in RFC 5321's path
    policy=Policy(replace(SETTINGS, signed_domains=frozenset({_LONG_DOMAIN})), KEYRING),
    key="y" * 56 + "@" + _LONG_DOMAIN,
    day=TODAY,
)
@example(policy=POLICY, key="a" * 40 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + ".org", day=TODAY)
def test_the_fast_path_gives_the_general_paths_reply_byte_for_byte(
    policy: Policy, key: str, day: int
) -> None:
    general = lookup(policy, "forward", key, day)
    fast = FastForward(policy, day)(key.encode())
    if fast is not None:
        assert general.status is Status.OK and fast == general.data.encode()
    # And over the wire: what a connection is answered, first (computed) and again (cached).
    svc = MapService(PolicyHolder(policy), clock=lambda: day * 86400 + 5)
    for _ in range(2):
        assert svc.socketmap_reply(b"forward " + key.encode()) == general.netstring()
        assert svc.tcp_reply("forward", b"get " + tcp_encode(key)) == general.tcp_table()
        raw = b"get " + key.encode()  # as Postfix sends most keys: no %XX, as nothing needs it
        if b"%" not in raw:
            assert svc.tcp_reply("forward", raw) == general.tcp_table()


def test_the_fast_path_takes_the_common_senders() -> None:
    fast = FastForward(POLICY, TODAY)
    assert fast(b"user@example.org") == prvs.sign("user@example.org", KEYRING, TODAY).encode()
    assert (
        fast(b"Joe.Smith@Foreign.test")
        == srs.forward("Joe.Smith@Foreign.test", ALIAS, KEYRING.srs_secrets(), TODAY, SRS_OPTIONS).encode()
    )
    for declined in (b"list-bounces@example.org", b"someone@" + ALIAS.encode(), b"prvs=x@example.org",
                     b'"a b"@foreign.test', b"user", b"\xc3\xa9@foreign.test"):  # fmt: skip
        assert fast(declined) is None, declined


# --- the servers, over sockets ---------------------------------------------------------------------------


def service(**kw: object) -> MapService:
    return MapService(PolicyHolder(POLICY), clock=lambda: TODAY * 86400 + 3600, **kw)  # type: ignore[arg-type]


def test_replies_are_cached_per_policy_and_day_and_the_cache_is_bounded() -> None:
    now = [TODAY * 86400.0]
    holder = PolicyHolder(POLICY)
    svc = MapService(holder, clock=lambda: now[0], cache_size=10)
    request = b"forward user@example.org"
    first = svc.socketmap_reply(request)
    assert svc.socketmap_reply(request) is first, "a repeated lookup is served from the cache"
    odd = b'forward "odd one"@foreign.test'  # the general path's replies are kept too
    assert svc.socketmap_reply(odd) is svc.socketmap_reply(odd)
    now[0] += 86400  # a new day: a new day stamp in the tag
    tagged = prvs.sign("user@example.org", KEYRING, TODAY + 1).encode()
    assert svc.socketmap_reply(request) == netstring(b"OK " + tagged)
    rotated = Keyring((Key(5, b"r" * 32, KeyState.ACTIVE),))
    holder.replace(Policy(SETTINGS, rotated))  # what a reload does
    assert svc.socketmap_reply(request).startswith(b"35:OK prvs=5")
    assert svc.tcp_reply("forward", b"get user@example.org").startswith(b"200 prvs=5")
    for n in range(100):
        svc.socketmap_reply(b"forward user%d@example.org" % n)
        svc.tcp_reply("forward", b"get user%d@example.org" % n)
    day = svc.current()
    assert len(day.socketmap) <= 10 and len(day.tcp["forward"]) <= 10
    holder.replace(Policy(SETTINGS, Keyring((Key(1, b"o" * 32, KeyState.VERIFY),))))
    assert b":TEMP " in svc.socketmap_reply(request)
    assert svc.tcp_reply("forward", b"get user@example.org").startswith(b"400 ")
    assert request not in svc.current().socketmap, "TEMP is never kept"
    assert b"get user@example.org" not in svc.current().tcp["forward"]


def test_the_config_sizes_the_reply_cache(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("[socketmap]\nmax_request = 256\ncache_size = 0\n")
    svc = map_service(gateway_config.load(path), PolicyHolder(POLICY))
    assert svc.max_request == 256
    request = b"forward user@example.org"
    assert svc.socketmap_reply(request) == svc.socketmap_reply(request)
    assert svc.tcp_reply("forward", b"get user@example.org").startswith(b"200 prvs=")
    day = svc.current()
    assert len(day.socketmap) == 0 and len(day.tcp["forward"]) == 0, "cache_size = 0 keeps no reply"
    assert map_service(gateway_config.default(), PolicyHolder(POLICY)).cache_size == DEFAULT_CACHE_SIZE


def socketmap_server(svc: MapService) -> ServerThread:
    return ServerThread(lambda: start_socketmap(svc, "127.0.0.1", 0), svc.close_connections)


def tcp_server(svc: MapService, name: str) -> ServerThread:
    return ServerThread(lambda: start_tcp_table(svc, name, "127.0.0.1", 0), svc.close_connections)


def read_netstrings(sock: socket.socket, count: int) -> list[bytes]:
    reader = NetstringReader(1 << 16)
    got: list[bytes] = []
    while len(got) < count:
        data = sock.recv(65536)
        if not data:
            break
        reader.feed(data)
        while (payload := reader.next()) is not None:
            got.append(payload)
    return got


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def test_pipelined_lookups_are_answered_in_order_on_one_connection() -> None:
    svc = service()
    with socketmap_server(svc) as srv, socket.create_connection(("127.0.0.1", srv.port)) as s:
        tagged = prvs.sign("user@example.org", KEYRING, TODAY)
        s.sendall(
            netstring(b"forward user@example.org")
            + netstring(b"reverse " + tagged.encode())
            + netstring(b"reverse user@example.org")
            + netstring(b"nonsense")  # framed garbage: PERM, and the stream goes on
            + netstring(b"forward joe@foreign.test")
        )
        got = read_netstrings(s, 5)
        assert got[0] == b"OK " + tagged.encode()
        assert got[1] == b"OK user@example.org"
        assert got[2] == b"NOTFOUND "
        assert got[3].startswith(b"PERM ")
        assert got[4].startswith(b"OK SRS0=")


def test_a_broken_stream_gets_perm_and_is_closed_and_the_server_lives_on() -> None:
    svc = service(max_request=256)
    with socketmap_server(svc) as srv:
        for garbage in (b"GET / HTTP/1.0\r\n\r\n", b"99999:", b"5:hello;", b"\x00\x01\x02\x03"):
            with socket.create_connection(("127.0.0.1", srv.port)) as s:
                s.sendall(garbage)
                reply = read_netstrings(s, 1)
                assert reply and reply[0].startswith(b"PERM "), garbage
                assert closed_by_peer(s)
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(netstring(b"reverse user@example.org"))
            assert read_netstrings(s, 1) == [b"NOTFOUND "]
        assert srv.call(lambda: len(svc.connections)) <= 1


def test_tcp_table_answers_line_by_line_and_refuses_garbage() -> None:
    svc = service(max_request=64)
    with tcp_server(svc, "forward") as srv, socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"get user@example.org\nput a b\nget postmaster\r\nget joe%40foreign.test\n")
        f = s.makefile("rb")
        first = f.readline()
        assert first == b"200 " + prvs.sign("user@example.org", KEYRING, TODAY).encode() + b"\n"
        assert f.readline().startswith(b"500 ")
        assert f.readline() == b"500 not%20found\n"
        assert f.readline().startswith(b"200 SRS0=")
        s.sendall(b"get " + b"x" * 1000)  # no newline, over the bound
        assert f.readline().startswith(b"500 request%20line%20over")
        assert f.readline() == b""


def test_an_idle_connection_is_closed() -> None:
    svc = service(idle_timeout=0.2)
    with socketmap_server(svc) as srv, socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(netstring(b"reverse user@example.org"))
        assert read_netstrings(s, 1) == [b"NOTFOUND "]
        assert closed_by_peer(s)


# --- real Postfix: postmap -q --------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    with private_root(keep_log_in=tmp_path) as path:
        yield path


@pytest.fixture
def postfix_config(root: Path) -> PostfixInstance:
    """A private instance's config (not started): what postmap -c needs, as /etc/postfix has no main.cf."""
    return PostfixInstance(root / "pf").configure()


def assert_postmap_round_trips(postfix: PostfixInstance, forward_table: str, reverse_table: str) -> None:
    """What postmap sees through either kind of table: a signed sender, an SRS0 sender, both reversed, and
    an untagged recipient left alone."""
    tagged = postfix.postmap_query("user@example.org", forward_table)
    assert tagged == prvs.sign("user@example.org", KEYRING, TODAY)
    forwarded = postfix.postmap_query("joe@foreign.test", forward_table)
    assert forwarded is not None and forwarded.startswith("SRS0=")
    assert postfix.postmap_query(tagged, reverse_table) == "user@example.org"
    assert postfix.postmap_query(forwarded, reverse_table) == "joe@foreign.test"
    assert postfix.postmap_query("user@example.org", reverse_table) is None


def test_postmap_queries_both_socketmap_maps(postfix_config: PostfixInstance) -> None:
    svc = service()
    with socketmap_server(svc) as srv:
        table = f"socketmap:inet:127.0.0.1:{srv.port}"
        assert_postmap_round_trips(postfix_config, f"{table}:forward", f"{table}:reverse")
        assert postfix_config.postmap_query("prvs=3000000000=user@example.org", f"{table}:reverse") is None
        with pytest.raises(PostfixError, match="permanent error"):
            postfix_config.postmap_query("user@example.org", f"{table}:nosuchmap")


def test_postmap_sees_temp_when_no_key_can_sign(postfix_config: PostfixInstance) -> None:
    holder = PolicyHolder(Policy(SETTINGS, Keyring((Key(1, b"o" * 32, KeyState.VERIFY),))))
    svc = MapService(holder, clock=lambda: TODAY * 86400)
    with socketmap_server(svc) as srv:
        with pytest.raises(PostfixError, match="temporary error"):
            postfix_config.postmap_query("user@example.org", f"socketmap:inet:127.0.0.1:{srv.port}:forward")


def test_postmap_queries_the_tcp_table_ports(postfix_config: PostfixInstance) -> None:
    svc = service()
    with tcp_server(svc, "forward") as fwd, tcp_server(svc, "reverse") as rev:
        assert_postmap_round_trips(postfix_config, f"tcp:127.0.0.1:{fwd.port}", f"tcp:127.0.0.1:{rev.port}")
        assert postfix_config.postmap_query("postmaster", f"tcp:127.0.0.1:{fwd.port}") is None


# --- the command, and Postfix rewriting real mail through it -------------------------------------------


def write_keyring(path: Path) -> keystore.KeyringFile:
    kf = keystore.new_keyring(datetime.now(UTC))
    keystore.save(path, kf)
    return kf


class Command:
    """`batv-gateway ARGS` as a subprocess; the ports and socket files it bound are read from its
    'listening' log lines."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.listening: dict[str, int] = {}  # serves=... → port
        self.paths: dict[str, Path] = {}  # serves=... → socket file

    def wait_listening(self, count: int) -> dict[str, int]:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 20
        while len(self.listening) + len(self.paths) < count:
            line = self.proc.stderr.readline()
            if not line or time.monotonic() > deadline:
                raise AssertionError(f"the command did not start: {''.join(self.lines)}")
            self.lines.append(line)
            found = re.search(r'listen=127\.0\.0\.1:(\d+) serves="?([^"\n]+)"?', line)
            if found:
                self.listening[found.group(2)] = int(found.group(1))
            found = re.search(r'listen="?unix:([^" ]+)"? serves="?([^"\n]+)"?', line)
            if found:
                self.paths[found.group(2)] = Path(found.group(1))
        return self.listening

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)  # raises if orphaned workers still hold stderr
        return self.proc.returncode, "".join(self.lines) + err


def assert_stopped_last(log: str) -> None:
    """The command's last line after a clean SIGTERM is serve's, said once: by the main process, once its
    workers are gone and its socket files removed."""
    lines = log.strip().splitlines()
    assert [line for line in lines if "msg=stopped" in line] == lines[-1:], log
    stopped = r"ts=\S+ level=info logger=gateway.postfix msg=stopped event=stop status=0"
    assert re.fullmatch(stopped, lines[-1]), log


def today() -> int:
    return int(time.time()) // 86400


def test_the_command_serves_socketmap_and_tcp_table_and_reloads_on_sighup(
    root: Path, postfix_config: PostfixInstance
) -> None:
    keyring_path = root / "keyring.toml"
    kf = write_keyring(keyring_path)
    cmd = Command(
        "socketmap",
        "--listen", "127.0.0.1:0",
        "--tcp-forward", "127.0.0.1:0",
        "--tcp-reverse", "127.0.0.1:0",
        "--keyring", str(keyring_path),
        "--domain", "example.org",
        "--srs-alias", ALIAS,
    )  # fmt: skip
    try:
        ports = cmd.wait_listening(3)
        table = f"socketmap:inet:127.0.0.1:{ports['maps forward, reverse']}"
        tagged = postfix_config.postmap_query("user@example.org", f"{table}:forward")
        assert tagged is not None and tagged.startswith("prvs=0")
        assert prvs.verify(tagged, kf.keyring, today()).verdict is prvs.PrvsVerdict.VALID
        assert postfix_config.postmap_query(tagged, f"tcp:127.0.0.1:{ports['map reverse']}") == (
            "user@example.org"
        )
        via_tcp = postfix_config.postmap_query("joe@foreign.test", f"tcp:127.0.0.1:{ports['map forward']}")
        assert via_tcp is not None and via_tcp.endswith("@" + ALIAS)

        # A new active key, then SIGHUP: new tags carry its id, old tags still reverse.
        now = datetime.now(UTC)
        added, key = keystore.add_key(kf, now)
        rotated = keystore.activate(added, key.id, now)
        keystore.save(keyring_path, rotated)
        os.kill(cmd.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            fresh = postfix_config.postmap_query("user@example.org", f"{table}:forward")
            if (fresh is not None and fresh.startswith(f"prvs={key.id}")) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert fresh is not None and fresh.startswith(f"prvs={key.id}"), "the reloaded keyring signs"
        assert postfix_config.postmap_query(tagged, f"{table}:reverse") == "user@example.org"
    finally:
        code, log = cmd.stop()
    assert code == 0, log
    assert "reload applied" in log
    for key in rotated.keyring.keys:
        assert key.secret.hex() not in log


def spool_socket(root: Path, name: str) -> Path:
    """Where deploy/postfix/ puts a socket file, in the private instance at root / "pf": `batv/NAME` in
    its queue directory (unix:batv/NAME in the snippets), the folder the service's and Postfix's group's."""
    folder = root / "pf" / "spool" / "batv"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.chown(folder, group="postfix")
    folder.chmod(0o750)
    return folder / name


def socket_config(root: Path, table: str, path: Path, extra: str = "") -> Path:
    """A config whose [socketmap] or [policyd] listens on the socket file `path`, group postfix."""
    config = root / f"{table}.toml"
    config.write_text(
        f'[gateway]\nkeyring = "{root / "keyring.toml"}"\nlocal_domains = ["example.org"]\n{extra}'
        f'[srs]\nalias = "{ALIAS}"\n'
        f'[{table}]\nlisten = "unix:{path}"\nsocket_mode = "0660"\nsocket_group = "postfix"\n'
    )
    return config


@pytest.mark.parametrize("snippet", ["socketmap-main.cf", "tcp_table-main.cf"])
def test_postfix_rewrites_mail_with_the_deploy_snippet(root: Path, snippet: str) -> None:
    """A deploy/postfix/ snippet in a private Postfix: outgoing mail gets a signed return path (prvs for our
    domain, SRS for a foreign sender), and a genuine bounce to a tagged address reaches the bare address.
    socketmap-main.cf as shipped: socketmap:unix:batv/socketmap, a socket file in the queue directory."""
    keyring_path = root / "keyring.toml"
    kf = write_keyring(keyring_path)
    if snippet == "socketmap-main.cf":
        config = socket_config(root, "socketmap", spool_socket(root, "socketmap"))
        cmd = Command("socketmap", "--config", str(config))
    else:
        cmd = Command("socketmap", "--listen", "127.0.0.1:0", "--tcp-forward", "127.0.0.1:0",
                      "--tcp-reverse", "127.0.0.1:0", "--keyring", str(keyring_path),
                      "--domain", "example.org", "--srs-alias", ALIAS)  # fmt: skip
    try:
        ports = cmd.wait_listening(1 if snippet == "socketmap-main.cf" else 3)
        where = {
            "127.0.0.1:10001": f"127.0.0.1:{ports.get('map forward')}",
            "127.0.0.1:10002": f"127.0.0.1:{ports.get('map reverse')}",
        }
        text = (DEPLOY_POSTFIX / snippet).read_text()
        with SmtpSink(root / "sink") as sink:
            pf = PostfixInstance(root / "pf", relayhost=f"[127.0.0.1]:{sink.port}")
            pf.add_main(load_snippet(DEPLOY_POSTFIX / snippet, {k: v for k, v in where.items() if k in text}))
            if snippet == "socketmap-main.cf":
                assert pf.main["sender_canonical_maps"] == "socketmap:unix:batv/socketmap:forward"
            with pf, smtplib.SMTP("127.0.0.1", pf.smtp_port) as client:
                body = b"From: User <user@example.org>\r\nSubject: out\r\n\r\nhello\r\n"
                client.sendmail("user@example.org", ["friend@remote.test"], body)
                client.sendmail("joe@foreign.test", ["friend@remote.test"], b"Subject: fwd\r\n\r\nhi\r\n")
                tag = prvs.sign("user@example.org", kf.keyring, today())
                client.sendmail("", [tag], b"Subject: bounce\r\n\r\nDSN\r\n")
                got = sink.wait_for_messages(3)
    finally:
        code, log = cmd.stop()
    assert code == 0, log
    by_subject = {re.search(r"^Subject: (\w+)", m.data, re.M).group(1): m for m in got}  # type: ignore[union-attr]
    out = by_subject["out"]
    assert out.mail_from == tag and out.rcpts == ("friend@remote.test",)
    assert "From: User <user@example.org>" in out.data, "headers are never rewritten"
    fwd = by_subject["fwd"]
    assert fwd.mail_from.startswith("SRS0=") and fwd.mail_from.endswith("@" + ALIAS)
    assert srs.reverse(fwd.mail_from, kf.keyring.srs_secrets(), today(), SRS_OPTIONS).address == (
        "joe@foreign.test"
    )
    bounce = by_subject["bounce"]
    assert bounce.mail_from == "" and bounce.rcpts == ("user@example.org",)


def test_postfix_signs_only_submitted_mail_with_the_master_cf_snippet(root: Path) -> None:
    """deploy/postfix/socketmap-master.cf as its README says: the submission service's own cleanup signs;
    mail arriving on port 25 keeps its sender; main.cf keeps only the recipient_canonical lines."""
    keyring_path = root / "keyring.toml"
    kf = write_keyring(keyring_path)
    cmd = Command(
        "socketmap", "--config", str(socket_config(root, "socketmap", spool_socket(root, "socketmap")))
    )
    try:
        cmd.wait_listening(1)
        submission = free_port()
        with SmtpSink(root / "sink") as sink:
            pf = PostfixInstance(root / "pf", relayhost=f"[127.0.0.1]:{sink.port}")
            main = load_snippet(DEPLOY_POSTFIX / "socketmap-main.cf")
            pf.main.update(
                {k: v for k, v in parse_main_cf(main).items() if k.startswith("recipient_canonical_")}
            )
            pf.add_master(
                load_snippet(
                    DEPLOY_POSTFIX / "socketmap-master.cf",
                    {"submission inet": f"127.0.0.1:{submission} inet"},
                )
            )
            assert pf.check() == ""
            with pf:
                with smtplib.SMTP("127.0.0.1", submission) as client:
                    client.sendmail(
                        "user@example.org", ["friend@remote.test"], b"Subject: submitted\r\n\r\nx\r\n"
                    )
                with smtplib.SMTP("127.0.0.1", pf.smtp_port) as client:
                    client.sendmail(
                        "user@example.org", ["friend@remote.test"], b"Subject: relayed\r\n\r\nx\r\n"
                    )
                    client.sendmail(
                        "joe@foreign.test", ["friend@remote.test"], b"Subject: inbound\r\n\r\nx\r\n"
                    )
                got = sink.wait_for_messages(3)
    finally:
        code, log = cmd.stop()
    assert code == 0, log
    by_subject = {re.search(r"^Subject: (\w+)", m.data, re.M).group(1): m for m in got}  # type: ignore[union-attr]
    assert by_subject["submitted"].mail_from == prvs.sign("user@example.org", kf.keyring, today())
    assert by_subject["relayed"].mail_from == "user@example.org"
    assert by_subject["inbound"].mail_from == "joe@foreign.test"


def test_postmap_asks_the_command_on_its_socket_file(root: Path, postfix_config: PostfixInstance) -> None:
    """socketmap:unix:PATH:NAME, as deploy/postfix/README.md checks it: the file has the configured mode and
    group, a second server on the same path is refused, and the file is gone after SIGTERM."""
    kf = write_keyring(root / "keyring.toml")
    folder = root / "run"
    folder.mkdir()
    config = socket_config(root, "socketmap", folder / "socketmap")
    cmd = Command("socketmap", "--config", str(config))
    try:
        cmd.wait_listening(1)
        path = cmd.paths["maps forward, reverse"]
        assert path == folder / "socketmap"
        st = os.lstat(path)
        assert (stat.S_ISSOCK(st.st_mode), stat.S_IMODE(st.st_mode)) == (True, 0o660)
        assert st.st_gid == grp.getgrnam("postfix").gr_gid
        table = f"socketmap:unix:{path}"
        tagged = postfix_config.postmap_query("user@example.org", f"{table}:forward")
        assert tagged == prvs.sign("user@example.org", kf.keyring, today())
        forwarded = postfix_config.postmap_query("joe@foreign.test", f"{table}:forward")
        assert forwarded is not None and forwarded.endswith("@" + ALIAS)
        assert postfix_config.postmap_query(tagged, f"{table}:reverse") == "user@example.org"
        assert postfix_config.postmap_query(forwarded, f"{table}:reverse") == "joe@foreign.test"
        assert postfix_config.postmap_query("user@example.org", f"{table}:reverse") is None

        second = subprocess.run(
            [sys.executable, "-m", "gateway", "socketmap", "--config", str(config)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert second.returncode == 2
        assert f"{path}: another server answers on this socket" in second.stderr
        assert postfix_config.postmap_query("user@example.org", f"{table}:forward") == tagged
    finally:
        code, log = cmd.stop()
    assert code == 0, log
    assert not path.exists(), "the socket file is removed on shutdown"


def test_a_socket_file_left_by_a_killed_command_is_replaced_at_the_next_start(
    root: Path, postfix_config: PostfixInstance
) -> None:
    write_keyring(root / "keyring.toml")
    folder = root / "run"
    folder.mkdir()
    config = socket_config(root, "socketmap", folder / "socketmap")
    killed = Command("socketmap", "--config", str(config))
    killed.wait_listening(1)
    killed.proc.kill()  # nothing runs on SIGKILL: the file stays behind
    killed.stop()
    assert (folder / "socketmap").exists()
    cmd = Command("socketmap", "--config", str(config))
    try:
        cmd.wait_listening(1)
        table = f"socketmap:unix:{folder / 'socketmap'}:forward"
        tagged = postfix_config.postmap_query("user@example.org", table)
        assert tagged is not None and tagged.startswith("prvs=")
    finally:
        code, log = cmd.stop()
    assert code == 0, log
    assert "removing a stale socket file" in log


def test_workers_accept_on_one_socket_file_that_only_the_main_process_removes(
    root: Path, postfix_config: PostfixInstance
) -> None:
    kf = write_keyring(root / "keyring.toml")
    folder = root / "run"
    folder.mkdir()
    path = folder / "socketmap"
    cmd = Command("socketmap", "--config", str(socket_config(root, "socketmap", path, "workers = 3\n")))
    try:
        cmd.wait_listening(1)
        deadline = time.monotonic() + 10
        while len(live_children(cmd.proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        workers = live_children(cmd.proc.pid)
        assert len(workers) == 2, "the main process and two workers"
        table = f"socketmap:unix:{path}:forward"
        # Each postmap is a new connection, taken by whichever process accepts first.
        tags = {postfix_config.postmap_query("user@example.org", table) for _ in range(6)}
        assert tags == {prvs.sign("user@example.org", kf.keyring, today())}
        os.kill(workers[0], signal.SIGTERM)  # one worker leaves: the others serve on, the file stays
        deadline = time.monotonic() + 10
        while workers[0] in live_children(cmd.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert path.exists()
        assert {postfix_config.postmap_query("user@example.org", table) for _ in range(3)} == tags
    finally:
        code, log = cmd.stop()
    assert code == 0, log
    assert not path.exists()
    assert live_children(cmd.proc.pid) == []
    assert_stopped_last(log)


def test_workers_share_the_sockets_and_all_reload_on_sighup(
    root: Path, postfix_config: PostfixInstance
) -> None:
    keyring_path = root / "keyring.toml"
    kf = write_keyring(keyring_path)
    config = root / "gateway.toml"
    config.write_text(
        f'[gateway]\nkeyring = "{keyring_path}"\nlocal_domains = ["example.org"]\nworkers = 3\n'
        f'[srs]\nalias = "{ALIAS}"\n[socketmap]\nlisten = "127.0.0.1:0"\n'
    )
    cmd = Command("socketmap", "--config", str(config))
    try:
        port = cmd.wait_listening(1)["maps forward, reverse"]
        deadline = time.monotonic() + 10
        while len(live_children(cmd.proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)  # the workers are forked just after the sockets are bound and announced
        assert len(live_children(cmd.proc.pid)) == 2, "the main process and two workers"
        table = f"socketmap:inet:127.0.0.1:{port}:forward"
        tags = {postfix_config.postmap_query("user@example.org", table) for _ in range(6)}
        assert tags == {prvs.sign("user@example.org", kf.keyring, today())}

        now = datetime.now(UTC)
        added, key = keystore.add_key(kf, now)
        keystore.save(keyring_path, keystore.activate(added, key.id, now))
        os.kill(cmd.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 15
        while True:
            # Each postmap is a new connection, taken by whichever process accepts first.
            seen = {postfix_config.postmap_query("user@example.org", table) for _ in range(9)}
            if all(t is not None and t.startswith(f"prvs={key.id}") for t in seen):
                break
            assert time.monotonic() < deadline, f"not every worker reloaded: {seen}"
            time.sleep(0.1)
        workers = live_children(cmd.proc.pid)
    finally:
        code, log = cmd.stop()
    assert code == 0, log
    assert log.count("reload applied") >= 3, "the main process and each worker reloaded"
    assert all(not Path(f"/proc/{pid}").exists() or live_children(pid) == [] for pid in workers)
    assert live_children(cmd.proc.pid) == []


def test_a_signal_during_start_up_still_stops_every_worker(root: Path) -> None:
    keyring_path = root / "keyring.toml"
    write_keyring(keyring_path)
    config = root / "gateway.toml"
    config.write_text(
        f'[gateway]\nkeyring = "{keyring_path}"\nlocal_domains = ["example.org"]\nworkers = 3\n'
        '[socketmap]\nlisten = "127.0.0.1:0"\n'
    )
    for first in (signal.SIGHUP, signal.SIGTERM):
        cmd = Command("socketmap", "--config", str(config))
        try:
            cmd.wait_listening(1)
            os.kill(cmd.proc.pid, first)  # before the event loops are up: remembered, then handled
            if first is signal.SIGHUP:
                os.kill(cmd.proc.pid, signal.SIGTERM)
        finally:
            code, log = cmd.stop()
        assert code == 0, log
        assert log.count("shutting down") == 3, log


def test_the_commands_refuse_bad_flags_and_a_missing_keyring(root: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=30, check=False
        )

    missing = run("socketmap", "--listen", "127.0.0.1:0", "--keyring", str(root / "none.toml"))
    assert missing.returncode == 2 and "none.toml" in missing.stderr
    bad = run("policy", "--listen", "nowhere", "--keyring", str(root / "none.toml"))
    assert bad.returncode == 2 and "--listen" in bad.stderr and "HOST:PORT" in bad.stderr
    helped = run("socketmap", "--help")
    assert helped.returncode == 0 and "--tcp-forward" in helped.stdout and "--srs-alias" in helped.stdout
