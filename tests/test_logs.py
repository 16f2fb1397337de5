"""gateway/core/logs.py: one grep-able line per decision, and no way for a client to forge a line."""

from __future__ import annotations

import asyncio
import enum
import io
import json
import logging
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core import logs
from gateway.core.logs import LogFormat, StructuredFormatter


class FakeRole(enum.Enum):
    INBOUND = "inbound"


class FakeAction(enum.Enum):
    RELAY = "relay"
    REJECT = "reject"


@dataclass(frozen=True)
class Event:
    session: str = "a1b2c3"
    client: str = "192.0.2.7"
    role: object = FakeRole.INBOUND
    sender: object = None
    recipient: object = "bob@example.com"
    action: object = FakeAction.REJECT
    reason: object = "unsigned"
    key_id: int | None = None
    next_hop_reply: object = None
    duration: float | None = 0.0125
    would_reject: object = None


def parse_logfmt(line: str) -> dict[str, str]:
    """A strict logfmt reader: the inverse of render_value, refusing anything it did not expect."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(line):
        eq = line.index("=", i)
        key = line[i:eq]
        assert key and " " not in key
        assert key not in fields, f"duplicate field {key}"
        i = eq + 1
        if line[i] == '"':
            i += 1
            value = []
            while line[i] != '"':
                if line[i] == "\\":
                    nxt = line[i + 1]
                    simple = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}
                    if nxt in simple:
                        value.append(simple[nxt])
                        i += 2
                    else:
                        width = {"x": 2, "u": 4, "U": 8}[nxt]
                        value.append(chr(int(line[i + 2 : i + 2 + width], 16)))
                        i += 2 + width
                else:
                    value.append(line[i])
                    i += 1
            i += 1
            fields[key] = "".join(value)
        else:
            end = line.find(" ", i)
            end = len(line) if end == -1 else end
            fields[key] = line[i:end]
            i = end
        if i < len(line):
            assert line[i] == " "
            i += 1
    return fields


def test_decision_line_has_every_field_in_logfmt(log_stream: io.StringIO) -> None:
    logs.DecisionLog()(Event(key_id=3, next_hop_reply="250 2.1.5 Ok"))
    lines = log_stream.getvalue().splitlines()
    assert len(lines) == 1
    fields = parse_logfmt(lines[0])
    assert fields["event"] == "decision"
    assert fields["session"] == "a1b2c3"
    assert fields["client"] == "192.0.2.7"
    assert fields["role"] == "inbound"
    assert fields["sender"] == "<>"
    assert fields["rcpt"] == "bob@example.com"
    assert fields["verdict"] == "reject"
    assert fields["reason"] == "unsigned"
    assert fields["key_id"] == "3"
    assert fields["next_hop"] == "250 2.1.5 Ok"
    assert fields["duration"] == "0.0125"
    assert fields["level"] == "info"
    assert fields["ts"].endswith("Z")


def test_decision_line_in_json(log_stream: io.StringIO) -> None:
    logs.setup(LogFormat.JSON, stream=log_stream)
    logs.DecisionLog()(Event(sender="alice@example.org", key_id=None))
    (line,) = log_stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["sender"] == "alice@example.org"
    assert record["verdict"] == "reject"
    assert record["duration"] == 0.0125
    assert "key_id" not in record  # absent, not "None"


HOSTILE = [
    'x" verdict=relay reason="valid-prvs@example.com',
    "x\r\nts=2020-01-01 level=info event=decision verdict=relay\r\n@example.com",
    "x\u2028verdict=relay@example.com",
    "x\u0085y\x00z\x1b[31m@example.com",
    'a\\" verdict=relay@example.com',
    "",
    "=",
]


@pytest.mark.parametrize("address", HOSTILE)
def test_hostile_address_cannot_forge_a_line_or_a_field(log_stream: io.StringIO, address: str) -> None:
    logs.DecisionLog()(Event(recipient=address, sender=address or None))
    text = log_stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    line = text[:-1]
    assert "\r" not in line and "\u2028" not in line and "\u0085" not in line and "\x00" not in line
    fields = parse_logfmt(line)
    assert fields["rcpt"] == address
    assert fields["verdict"] == "reject"


@pytest.mark.parametrize("address", HOSTILE)
def test_hostile_address_in_json_stays_one_record(log_stream: io.StringIO, address: str) -> None:
    logs.setup(LogFormat.JSON, stream=log_stream)
    logs.DecisionLog()(Event(recipient=address))
    (line,) = log_stream.getvalue().splitlines()
    assert line.isascii()
    record = json.loads(line)
    assert record["rcpt"] == address and record["verdict"] == "reject"


@given(st.text())
def test_render_value_round_trips_and_is_one_token(text: str) -> None:
    rendered = logs.render_value(text)
    assert len(rendered.splitlines()) <= 1 and "\n" not in rendered
    parsed = parse_logfmt("k=" + rendered)
    expected = text if len(text) <= logs.MAX_VALUE_CHARS else text[: logs.MAX_VALUE_CHARS] + "..."
    assert parsed == {"k": expected}


def test_long_values_are_cut(log_stream: io.StringIO) -> None:
    logs.DecisionLog()(Event(recipient="a" * 100_000 + "@example.com"))
    line = log_stream.getvalue()
    assert len(line) < 2 * logs.MAX_VALUE_CHARS


def test_exceptions_stay_on_one_line(log_stream: io.StringIO) -> None:
    log = logging.getLogger("gateway.test")
    try:
        raise RuntimeError("boom\nlevel=info forged")
    except RuntimeError:
        log.exception("it failed")
    lines = log_stream.getvalue().splitlines()
    assert len(lines) == 1
    fields = parse_logfmt(lines[0])
    assert fields["level"] == "error" and fields["msg"] == "it failed"
    assert "Traceback" in fields["exc"] and "forged" in fields["exc"]


def test_log_fields_and_formatter_keep_reserved_fields(log_stream: io.StringIO) -> None:
    logs.log_fields(
        logging.getLogger("gateway.reload"), logging.WARNING, "refused", level="info", path="/x y"
    )
    fields = parse_logfmt(log_stream.getvalue().strip())
    assert fields["level"] == "warning"  # a caller's field cannot overwrite the record's own
    assert fields["path"] == "/x y"


def test_setup_twice_keeps_one_handler(log_stream: io.StringIO) -> None:
    logs.setup(LogFormat.JSON, stream=log_stream)
    logs.setup(LogFormat.LOGFMT, stream=log_stream)
    logging.getLogger("gateway.x").info("hello")
    assert len(log_stream.getvalue().splitlines()) == 1


def test_formatter_key_names_are_sanitised() -> None:
    record = logging.LogRecord("gateway", logging.INFO, __file__, 1, "", None, None)
    setattr(record, logs.FIELDS_ATTR, {"bad key=x": 1})
    line = StructuredFormatter(LogFormat.LOGFMT).format(record)
    assert "bad_key_x=1" in line


def test_fan_out_survives_a_failing_observer(log_stream: io.StringIO) -> None:
    seen: list[object] = []

    def broken(event: object) -> None:
        raise ValueError("observer bug")

    on_decision = logs.fan_out(broken, seen.append)
    on_decision(Event())
    assert seen == [Event()]
    assert "a decision observer failed" in log_stream.getvalue()


def _reference_render(text: str) -> str:
    """render_value as first written, one character at a time: the fast paths must agree with it."""
    text = logs._clip(text)
    if text and all(logs._is_plain(ch) for ch in text):
        return text
    return '"' + "".join(logs._escape_char(ch) for ch in text) + '"'


@given(st.text(alphabet=st.sampled_from('ab= "\\\n\r\t\x00\u2028é\U0001f600.@<>'), max_size=40) | st.text())
def test_the_fast_render_paths_agree_with_the_per_character_rule(text: str) -> None:
    assert logs.render_value(text) == _reference_render(text)


def test_timestamps_across_a_second_boundary_keep_their_own_second() -> None:
    assert logs._timestamp(86399.75) == "1970-01-01T23:59:59.750Z"
    assert logs._timestamp(86400.0) == "1970-01-02T00:00:00.000Z"
    assert logs._timestamp(86399.5) == "1970-01-01T23:59:59.500Z"


class CountingStream(io.StringIO):
    """A log log_stream that counts its writes: each write is a write(2) on a real log_stream."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def batching_logger(out: io.StringIO) -> logging.Logger:
    logger = logging.getLogger("gateway.test-batching")
    logger.handlers[:] = [logs.BatchingStreamHandler(out)]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_lines_of_one_loop_turn_leave_in_one_write_in_order() -> None:
    out = CountingStream()
    log = batching_logger(out)

    async def body() -> None:
        log.info("one")
        log.info("two")
        assert out.getvalue() == ""  # held until the loop has run this turn's callbacks
        await asyncio.sleep(0)
        assert out.getvalue() == "one\ntwo\n"
        assert out.writes == 1

    asyncio.run(body())


def test_a_warning_is_written_at_once_after_what_is_held() -> None:
    out = CountingStream()
    log = batching_logger(out)

    async def body() -> None:
        log.info("held")
        log.warning("now")
        assert out.getvalue() == "held\nnow\n"

    asyncio.run(body())


def test_without_an_event_loop_a_line_is_written_at_once() -> None:
    out = CountingStream()
    batching_logger(out).info("start-up")
    assert out.getvalue() == "start-up\n"


def test_a_flush_set_on_a_loop_that_stopped_holds_nothing_back_later() -> None:
    out = CountingStream()
    log = batching_logger(out)

    async def log_and_stop() -> None:
        log.info("last words")  # its flush is set on this loop, which stops before running it
        asyncio.get_running_loop().stop()

    loop = asyncio.new_event_loop()
    loop.run_until_complete(log_and_stop())
    loop.close()
    assert out.getvalue() == ""
    log.info("after")  # no loop: written at once, with what was held
    assert out.getvalue() == "last words\nafter\n"

    async def next_loop() -> None:
        log.info("next")
        await asyncio.sleep(0)
        assert out.getvalue().endswith("next\n")

    asyncio.run(next_loop())


@dataclass(frozen=True)
class MessageEvent:
    session: str = "a1b2c3"
    client: str = "192.0.2.7"
    role: object = FakeRole.INBOUND
    sender: object = "alice@example.org"
    recipients: int = 2
    action: object = FakeAction.RELAY
    next_hop_reply: object = "250 2.0.0 Ok: queued as 4XyZ12"
    reply: object = None
    duration: float | None = 0.5


def test_transaction_line_carries_the_next_hops_reply_to_the_final_dot(log_stream: io.StringIO) -> None:
    logs.TransactionLog()(MessageEvent())
    (line,) = log_stream.getvalue().splitlines()
    assert line.endswith(
        "event=transaction session=a1b2c3 client=192.0.2.7 role=inbound sender=alice@example.org rcpts=2"
        ' verdict=relay next_hop="250 2.0.0 Ok: queued as 4XyZ12" duration=0.5'
    )


def test_a_hostile_next_hop_reply_cannot_forge_a_field_or_a_line(log_stream: io.StringIO) -> None:
    text = '250 2.0.0 Ok: queued as X1 "x" verdict=forged\r\nts=0 event=transaction\u2028'
    logs.TransactionLog()(MessageEvent(next_hop_reply=text, reply="451 4.5.0 x=y"))
    (line,) = log_stream.getvalue().splitlines()
    fields = parse_logfmt(line)
    assert fields["next_hop"] == text and fields["reply"] == "451 4.5.0 x=y"
    assert fields["verdict"] == "relay" and fields["event"] == "transaction"
