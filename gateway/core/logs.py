"""Log lines an operator can grep: one line per decision, logfmt or JSON, on stderr.

Every record the gateway logs goes through the standard `logging` module to one stderr handler, so journald
and container runtimes collect it. `DecisionLog` turns a decision event from the SMTP edge into one record
whose fields (session id, client IP, role, sender, recipient, verdict, reason, key id, next-hop reply,
duration) the formatter renders as `key=value` pairs or as one JSON object. `TransactionLog` writes one more
line per message (`event=transaction`): its verdict and the next hop's reply to the final dot, whose
"queued as ..." is what ties our session id to the next hop's own log.

Why the escaping matters: the envelope sender and recipient come from the internet. A hostile client can put
a quote, a space, an `=`, a CR/LF or a Unicode line separator into a quoted local part; written raw, that
would end one log line and forge another, or add a fake `verdict=relay` pair to a line. Every value is
therefore rendered as one token: quoted when it holds anything but plain characters, with each quote,
backslash and non-printable character escaped, and cut at `MAX_VALUE_CHARS`.

What never reaches a log line: a key's secret (events carry the key id only), message content (events carry
the envelope only), or a password. This module has no access to any of them, on purpose.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, Protocol

# RFC 5321 caps a path at 256 octets; a reply text line at 512. Anything longer is cut so one client
# cannot blow up a line (or the disk) with a huge value.
MAX_VALUE_CHARS = 600
DECISION_LOGGER = "gateway.decision"
# The attribute on a LogRecord that carries the structured fields (logging's `extra=`).
FIELDS_ATTR = "batv_fields"


class LogFormat(enum.Enum):
    LOGFMT = "logfmt"
    JSON = "json"


def _is_plain(ch: str) -> bool:
    # Plain: printable, not a space and none of the characters logfmt gives a meaning to. Non-ASCII letters
    # stay readable (SMTPUTF8 addresses), but str.isprintable() is False for U+2028/U+2029/U+0085 and other
    # separators, so those are escaped too.
    return ch.isprintable() and ch not in ' ="\\'


def _escape_char(ch: str) -> str:
    if ch == '"':
        return '\\"'
    if ch == "\\":
        return "\\\\"
    if ch == "\n":
        return "\\n"
    if ch == "\r":
        return "\\r"
    if ch == "\t":
        return "\\t"
    if ch.isprintable():  # a space, or = (only reached inside quotes)
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _clip(text: str) -> str:
    if len(text) > MAX_VALUE_CHARS:
        return text[:MAX_VALUE_CHARS] + "..."
    return text


def render_value(value: object) -> str:
    """One logfmt value: bare when it is plain, otherwise double-quoted with escapes. Never spans a line."""
    if type(value) is int:  # a count or a key id: digits only (bool and IntEnum are other types)
        return _clip(str(value))
    text = value if type(value) is str else to_text(value)
    if len(text) > MAX_VALUE_CHARS:
        text = _clip(text)
    # The same test as `all(_is_plain(ch) ...)`, in C: str.isprintable() is per character too (and False
    # for U+2028 and the other separators); every decision line takes this path once per value.
    if (
        text
        and text.isprintable()
        and " " not in text
        and "=" not in text
        and '"' not in text
        and "\\" not in text
    ):
        return text
    if text.isprintable():  # a space, an = or a quote, but nothing to spell out: the two escapes only
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return '"' + "".join(_escape_char(ch) for ch in text) + '"'


def to_text(value: object) -> str:
    """The text of a field: an enum's value, a reply's wire form, a float in a fixed short form."""
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") or "0"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _json_value(value: object) -> object:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return round(value, 6)
    return _clip(to_text(value))


@functools.lru_cache(maxsize=256)  # keys are our own few field names: cached, rendered once each
def _key(name: str) -> str:
    # Keys are ours, not the client's, but a key must never be able to break the format either.
    return "".join(ch if ch.isascii() and (ch.isalnum() or ch in "_-.") else "_" for ch in name) or "_"


# "key=" for each field name seen: a dict lookup per field of a line, cheaper than the lru_cache's call.
_prefixes: dict[str, str] = {}


def format_logfmt(fields: Mapping[str, object]) -> str:
    parts = []
    prefixes = _prefixes
    for name, value in fields.items():
        if value is not None:
            prefix = prefixes.get(name)
            if prefix is None:
                if len(prefixes) < 256:  # bounded as _key's cache is
                    prefixes[name] = prefix = _key(name) + "="
                else:
                    prefix = _key(name) + "="
            parts.append(prefix + render_value(value))
    return " ".join(parts)


def format_json(fields: Mapping[str, object]) -> str:
    # ensure_ascii: every control character and line separator comes out as a \\u escape, so a line is a line.
    return json.dumps(
        {_key(k): _json_value(v) for k, v in fields.items() if v is not None},
        ensure_ascii=True,
        separators=(",", ":"),
    )


class StructuredFormatter(logging.Formatter):
    """Renders every record, decision or not, as one logfmt or JSON line.

    A record's fields are: ts, level, logger, msg (for records with a message), then the structured fields a
    caller passed as `extra={FIELDS_ATTR: {...}}`. The text of an exception is escaped into the `exc` field,
    so a traceback stays on one line too.
    """

    def __init__(self, fmt: LogFormat = LogFormat.LOGFMT) -> None:
        super().__init__()
        self.log_format = fmt

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        message = record.getMessage()
        if message:
            fields["msg"] = message
        extra = getattr(record, FIELDS_ATTR, None)
        if isinstance(extra, Mapping):
            for key, value in extra.items():
                fields.setdefault(str(key), value)
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if self.log_format is LogFormat.JSON:
            return format_json(fields)
        return format_logfmt(fields)


_last_second: list[tuple[int, str]] = [(-1, "")]  # the last whole second rendered: one strftime a second


def _timestamp(created: float) -> str:
    # RFC 3339 UTC with milliseconds: sorts as text, and every log shipper parses it.
    whole = int(created)
    second, seconds = _last_second[0]
    if second != whole:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _last_second[0] = (whole, seconds)
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the lines of one turn of the event loop together.

    A busy gateway logs a decision line per message; written one by one, each line is a write(2) and a
    flush. Here the lines made while the event loop runs its callbacks go out in one write at the end of
    that turn (a call_soon), which is milliseconds at most. Lines at WARNING and above, and lines logged
    where no event loop runs (start-up, the CLI, other threads), are written at once, with whatever is
    held before them, so order is kept. What is held is written by flush(), which logging.shutdown()
    calls at exit.
    """

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._held: list[str] = []
        self._flush_loop: asyncio.AbstractEventLoop | None = None  # where a flush is set to run

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._held.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        if record.levelno < logging.WARNING:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                # Compared by loop, not by a flag: a flush set on a loop that has since stopped never runs.
                if self._flush_loop is not loop:
                    self._flush_loop = loop
                    loop.call_soon(self.flush)
                return
        self._write_held()

    def _write_held(self) -> None:
        held = self._held
        if held:
            text = "\n".join(held) + "\n"
            held.clear()
            try:
                self.stream.write(text)
                self.stream.flush()
            except Exception:
                # As logging.Handler.handleError would: report on stderr (if raiseExceptions), never raise.
                if logging.raiseExceptions:
                    sys.stderr.write("--- logging error: the log stream could not be written\n")

    def flush(self) -> None:
        self.acquire()
        try:
            self._flush_loop = None
            self._write_held()
        finally:
            self.release()


def setup(
    fmt: LogFormat = LogFormat.LOGFMT, level: int | str = logging.INFO, stream: IO[str] | None = None
) -> None:
    """Route the `gateway` loggers to one stderr handler with the structured formatter.

    Idempotent: a second call (a reload that changed the log format) replaces the handler it installed.
    It also stops logging from looking up the thread and process of every record (logging.logThreads
    and friends, process-wide): the formatter never shows them, and on a decision line per message the
    lookups cost more than the line's own fields.
    """
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logger = logging.getLogger("gateway")
    for handler in list(logger.handlers):
        if getattr(handler, "_batv_handler", False):
            logger.removeHandler(handler)
            handler.flush()
    handler = BatchingStreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(StructuredFormatter(fmt))
    handler._batv_handler = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    # Our handler writes the line; the root logger must not write it a second time in another format.
    logger.propagate = False


class LogSettings(Protocol):
    """The config's [log] table (config.LogConfig), validated there: a known format, a level name."""

    @property
    def format(self) -> str: ...
    @property
    def level(self) -> str: ...


def setup_from(settings: LogSettings) -> None:
    """setup() as the config's [log] table says (at start-up, and again on a reload that changed it)."""
    setup(LogFormat(settings.format), settings.level.upper())


def log_fields(logger: logging.Logger, level: int, message: str, /, **fields: object) -> None:
    """Log one record with structured fields (the non-decision events: reloads, startup, shutdown)."""
    logger.log(level, message, extra={FIELDS_ATTR: fields})


class DecisionEvent(Protocol):
    """What the SMTP edge reports per decision; `decision_fields` reads exactly these attributes."""

    @property
    def session(self) -> str: ...
    @property
    def client(self) -> str: ...
    @property
    def role(self) -> object: ...
    @property
    def sender(self) -> object: ...
    @property
    def recipient(self) -> object: ...
    @property
    def action(self) -> object: ...
    @property
    def reason(self) -> object: ...
    @property
    def key_id(self) -> int | None: ...
    @property
    def next_hop_reply(self) -> object: ...
    @property
    def duration(self) -> float | None: ...
    @property
    def would_reject(self) -> object: ...


def _sender_text(sender: object) -> str:
    # The null sender is logged as "<>", so that it can be grepped and is never an empty, missing field.
    if sender is None:
        return "<>"
    text = str(sender)
    return text if text else "<>"


def decision_fields(event: DecisionEvent) -> dict[str, object]:
    """The fields of one decision line, in a fixed order (grep- and eye-friendly)."""
    return {
        "event": "decision",
        "session": event.session,
        "client": event.client,
        "role": event.role,
        "sender": _sender_text(event.sender),
        "rcpt": event.recipient,
        "verdict": event.action,
        "reason": event.reason,
        "key_id": event.key_id,
        "would_reject": event.would_reject,
        "next_hop": event.next_hop_reply,
        "duration": event.duration,
    }


class TransactionEvent(Protocol):
    """How a message ended, from the relay: `transaction_fields` reads exactly these attributes."""

    @property
    def session(self) -> str: ...
    @property
    def client(self) -> str: ...
    @property
    def role(self) -> object: ...
    @property
    def sender(self) -> object: ...
    @property
    def recipients(self) -> int: ...
    @property
    def action(self) -> object: ...
    @property
    def next_hop_reply(self) -> object: ...
    @property
    def reply(self) -> object: ...
    @property
    def duration(self) -> float | None: ...


def transaction_fields(event: TransactionEvent) -> dict[str, object]:
    """The fields of one message's line: `next_hop` is the next hop's reply to the final dot as it gave it
    (its queue id in it), or our 4xx when it could not be talked to; `reply` is what our client was told,
    when that is not the same text."""
    return {
        "event": "transaction",
        "session": event.session,
        "client": event.client,
        "role": event.role,
        "sender": _sender_text(event.sender),
        "rcpts": event.recipients,
        "verdict": event.action,
        "next_hop": event.next_hop_reply,
        "reply": event.reply,
        "duration": event.duration,
    }


class _EventLog:
    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger if logger is not None else logging.getLogger(DECISION_LOGGER)

    def _write(self, fields: Callable[[Any], dict[str, object]], event: Any) -> None:
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        # logger.info() would also walk the stack for the caller's file and line (findCaller), which a
        # decision line does not show: the record is made and handled directly, one per message.
        record = logger.makeRecord(
            logger.name,
            logging.INFO,
            __file__,
            0,
            "",
            (),
            None,
            extra={FIELDS_ATTR: fields(event)},
        )
        logger.handle(record)


class DecisionLog(_EventLog):
    """The edge's `on_decision` callback that writes one line per decision."""

    def __call__(self, event: DecisionEvent) -> None:
        self._write(decision_fields, event)


class TransactionLog(_EventLog):
    """One line per message, on the decision logger: the relay writes it when a transaction ends."""

    def __call__(self, event: TransactionEvent) -> None:
        self._write(transaction_fields, event)


def fan_out(*callbacks: Callable[[Any], None]) -> Callable[[Any], None]:
    """One `on_decision` callback that calls each of several (the log line, the metrics).

    A failing observer is logged and skipped: watching the mail must never stop the mail.
    """
    failures = logging.getLogger("gateway.ops")

    def on_decision(event: Any) -> None:
        for callback in callbacks:
            try:
                callback(event)
            except Exception:
                failures.exception("a decision observer failed")

    return on_decision
