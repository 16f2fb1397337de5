"""Prometheus metrics, and the small HTTP endpoint that serves them with the health checks.

Every server owns a private `CollectorRegistry` (never prometheus-client's global one), so two gateways in one
process, as in the tests, count separately.

With `[gateway] workers = N` (workers.supervise) and an endpoint, the counts are prometheus-client's
multiprocess mode: the main process makes a private folder (`shared_folder`, mode 0700, removed when it
exits) and switches the value class before it forks; every worker's counters, gauges and histograms then
live in its own mmap file there, and whichever worker answers a scrape adds up every file
(`Metrics(shared=folder)`). A dead worker's counts stay in the sum (they happened); its live gauges (open
sessions, the last reload) go with it (`process_gone`). Open sessions are sampled into the shared gauge
every second (`refresh`), since a gauge read by a function only exists in the process that owns the
function. The keyring gauges are read at scrape time from the answering worker's keyring: every worker
reloads on the same SIGHUP.

The endpoint is a few lines of asyncio, not prometheus-client's threaded WSGI server: it lives and dies with
the event loop that serves the mail, so shutdown and tests leave no thread behind. It answers
- `GET /metrics`: the Prometheus text format;
- `GET /healthz`: 200 while the process's event loop answers at all (a liveness probe);
- `GET /readyz`: 200 while the gateway wants new sessions, 503 before its listeners are up and while it
  drains on shutdown (a readiness probe; a load balancer stops sending new clients). A [state] store that
  is away does not make it 503 (tag verdicts need no store; the budgets fall back to the process's own):
  the body says so on a line of its own: `state store redis: unavailable (the budgets answer locally)`.
The [state] store is asked (a PING, or an SQLite read) when /metrics or /readyz is asked, so
`batv_state_store_up` is as fresh as the scrape.
It binds to loopback by default: the counters tell who mails whom how often, which is not for the internet.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import glob
import itertools
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.utils import floatToGoString

from ..core.keyring import Keyring, KeyState

NAMESPACE = "batv"
# SMTP transactions take milliseconds to minutes (a slow client, a big message): buckets cover both.
TRANSACTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# A next-hop reply on a LAN takes a millisecond; RFC 5321 lets the final reply to DATA take 10 minutes.
REPLY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 600.0)
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 10.0
SESSIONS_SAMPLE_INTERVAL = 1.0  # seconds between two samples of the open sessions (shared counts only)

_log = logging.getLogger("gateway.metrics")


class StateStore(Protocol):
    """What the endpoint asks of state.Stores (not imported: the Postfix services need no store)."""

    backend: str

    async def available(self) -> bool: ...


def _label(value: object) -> str:
    if value is None:
        return ""
    enum_value = getattr(value, "value", None)
    return str(enum_value) if enum_value is not None else str(value)


class _KeyringCollector:
    """Reports the active key id and its age at scrape time, from the keyring in force and a clock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.keyring: Keyring | None = None
        self.generation: int | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        keyring = self.keyring
        active_id = GaugeMetricFamily(
            f"{NAMESPACE}_keyring_active_key_id", "Id (0-9) of the key that signs; -1 when none is active"
        )
        age = GaugeMetricFamily(
            f"{NAMESPACE}_keyring_active_key_age_seconds", "Seconds since the active key was created"
        )
        keys = GaugeMetricFamily(
            f"{NAMESPACE}_keyring_keys", "Keys in the keyring by state", labels=["state"]
        )
        generation = GaugeMetricFamily(
            f"{NAMESPACE}_keyring_generation",
            "The keyring file's generation (+1 on every change): equal on every host of an MX group",
        )
        if self.generation is not None:
            generation.add_metric([], self.generation)
        if keyring is not None:
            if keyring.has_active:
                active = keyring.active
                active_id.add_metric([], active.id)
                age.add_metric([], max(0.0, self._clock() - active.created.timestamp()))
            else:
                active_id.add_metric([], -1)
            for state in KeyState:
                keys.add_metric([state.value], sum(1 for k in keyring.keys if k.state is state))
        yield active_id
        yield age
        yield keys
        yield generation


class _Histogram:
    """A histogram by one label, kept in plain ints and exposed at scrape time.

    prometheus_client's Histogram takes a lock and walks its buckets in Python on every observation;
    the engine makes six per message (five next-hop replies and the transaction), all on the event
    loop's thread, which is also where the scrape runs. Here an observation is a bisect and two adds.
    The exposition is the same: `_bucket` (cumulative, le="+Inf" included), `_count`, `_sum`.
    """

    def __init__(self, name: str, documentation: str, label: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self._bounds = tuple(float(b) for b in buckets)
        # The le values exactly as prometheus_client writes them ("0.0005", "1.0", "+Inf").
        self._les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._counts: dict[str, list[int]] = {}  # label value -> per-bucket (not cumulative) counts
        self._sums: dict[str, float] = {}

    def observe(self, label_value: str, amount: float) -> None:
        counts = self._counts.get(label_value)
        if counts is None:
            counts = self._counts[label_value] = [0] * (len(self._bounds) + 1)
            self._sums[label_value] = 0.0
        counts[bisect.bisect_left(self._bounds, amount)] += 1  # the first bucket whose le >= amount
        self._sums[label_value] += amount

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for label_value, counts in list(self._counts.items()):
            cumulative = list(itertools.accumulate(counts))
            family.add_metric(
                [label_value], list(zip(self._les, cumulative, strict=True)), self._sums[label_value]
            )
        yield family


class _SharedHistogram:
    """`_Histogram`'s one call on prometheus-client's Histogram, whose values the multiprocess mode can
    keep in the shared files (plain ints in one process cannot be added up by another)."""

    def __init__(self, name: str, documentation: str, label: str, buckets: tuple[float, ...]) -> None:
        self._histogram = Histogram(name, documentation, [label], buckets=buckets, registry=None)
        self._children: dict[str, Any] = {}

    def observe(self, label_value: str, amount: float) -> None:
        child = self._children.get(label_value)
        if child is None:
            child = self._children[label_value] = self._histogram.labels(label_value)
        child.observe(amount)


def shared_folder() -> Path:
    """Before the workers are forked: a private folder for their counts, and every metric made from now
    on in this process and its children keeps its value there. prometheus-client picks its value class
    when it is first imported (from PROMETHEUS_MULTIPROC_DIR); it is set here as well, since this module
    has imported it long before the config said how many workers there are."""
    folder = Path(tempfile.mkdtemp(prefix="batv-metrics-"))  # mode 0700
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    return folder


def remove_shared_folder(folder: Path) -> None:
    """When the main process leaves: the counts die with the service, as one process's would."""
    shutil.rmtree(folder, ignore_errors=True)


def process_gone(folder: Path, pid: int) -> None:
    """A worker has exited: its live gauges leave the sums (its counters stay)."""
    mark_process_dead(pid, str(folder))  # type: ignore[no-untyped-call]


class _WorkersCollector(MultiProcessCollector):
    """The sum of every worker's files, as prometheus-client's own collector gives it, less the files of a
    worker that is starting: prometheus-client creates a worker's file empty and sizes it a moment later, and
    reading it in between raises struct.error, which took down a starting worker (its registry collects as
    it registers) or a scrape. Such a file holds no value yet, so leaving it out loses nothing."""

    def collect(self) -> Any:
        files = []
        for name in glob.glob(os.path.join(self._path, "*.db")):
            with contextlib.suppress(FileNotFoundError):
                if os.path.getsize(name) >= _FILE_HEADER:
                    files.append(name)
        return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call]


_FILE_HEADER = 8  # octets: a worker's file starts with the count of octets it uses


class Metrics:
    """Every metric of one gateway, in its own registry (or, `shared`, in the workers' folder)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
        shared: Path | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.shared = shared
        if shared is not None and not getattr(values.ValueClass, "_multiprocess", False):
            raise RuntimeError("Metrics(shared=...) needs metrics.shared_folder() first, before the fork")
        # Shared: the metrics are made unregistered (their values are in the files) and the registry
        # exposes the sum of every worker's files instead.
        r: CollectorRegistry | None = self.registry if shared is None else None
        if shared is not None:
            _WorkersCollector(self.registry, str(shared))  # type: ignore[no-untyped-call]
        self.decisions = Counter(
            f"{NAMESPACE}_decisions",
            "Decisions per recipient or transaction, by listener role, verdict and reason",
            ["role", "verdict", "reason"],
            registry=r,
        )
        self.would_reject = Counter(
            f"{NAMESPACE}_would_reject",
            "Observe mode: mail accepted that enforce mode would have refused, by role and reason",
            ["role", "reason"],
            registry=r,
        )
        self.srs = Counter(
            f"{NAMESPACE}_srs_rewrites",
            "SRS per recipient: reverse = an SRS address reversed inbound, forward = relayed outbound"
            " with an SRS0/SRS1 sender",
            ["direction"],
            registry=r,
        )
        self.next_hop_errors = Counter(
            f"{NAMESPACE}_next_hop_errors",
            "Next-hop failures by kind (connect, timeout, broken, protocol, ...)",
            ["kind"],
            registry=r,
        )
        self.ledger_records = Counter(
            f"{NAMESPACE}_ledger_records",
            "Outbound messages the next hop took, by what the Message-ID ledger did with them (recorded, "
            "no-message-id, headers-too-big, no-address, store-unavailable)",
            ["outcome"],
            registry=r,
        )
        histogram = _Histogram if shared is None else _SharedHistogram
        self.transaction_seconds = histogram(
            f"{NAMESPACE}_transaction_seconds",
            "Time from MAIL FROM to the final reply of a transaction",
            "role",
            TRANSACTION_BUCKETS,
        )
        self.next_hop_reply_seconds = histogram(
            f"{NAMESPACE}_next_hop_reply_seconds",
            "Time the next hop took to answer a command, by command",
            "command",
            REPLY_BUCKETS,
        )
        if r is not None:
            r.register(self.transaction_seconds)  # type: ignore[arg-type]
            r.register(self.next_hop_reply_seconds)  # type: ignore[arg-type]
        # The multiprocess modes say how the workers' values add up; one process ignores them.
        self.open_sessions = Gauge(
            f"{NAMESPACE}_open_sessions",
            "Client SMTP sessions open now, by role",
            ["role"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.reloads = Counter(f"{NAMESPACE}_reloads", "Reload attempts by result", ["result"], registry=r)
        self.last_reload_success = Gauge(
            f"{NAMESPACE}_last_reload_success",
            "1 if the last reload was applied, 0 if it was refused",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.last_reload_timestamp = Gauge(
            f"{NAMESPACE}_last_reload_timestamp_seconds",
            "Unix time of the last reload attempt",
            registry=r,
            multiprocess_mode="livemax",
        )
        # [state]: whether the store answered the last probe (the most recent worker's answer counts:
        # they all ask the same store), and the budget charges answered locally while it was away.
        self.state_store_up = Gauge(
            f"{NAMESPACE}_state_store_up",
            "1 if the [state] store (sqlite, redis) answered when last asked, 0 if it was away",
            ["backend"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.state_fallbacks = Counter(
            f"{NAMESPACE}_state_fallbacks",
            "Budget charges answered by the process's own budget while the [state] store was away, by check",
            ["check"],
            registry=r,
        )
        self.state: StateStore | None = None
        self._session_counts: dict[str, Callable[[], float]] = {}
        self._keyring = _KeyringCollector(clock)
        self.registry.register(self._keyring)
        self._clock = clock
        # A process that has not reloaded yet has, by definition, a config that loaded.
        self.last_reload_success.set(1)
        # The labelled children of the per-message metrics, kept: labels() validates and looks them up
        # under a lock on every call, several times per message. Bounded: every label value is ours (a
        # role, verdict, reason or command), never the client's.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._decision_labels: dict[tuple[object, object, object], tuple[str, ...]] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # --- the edge's callbacks ---------------------------------------------------------------------

    def on_decision(self, event: Any) -> None:
        """Counts one decision event (the same event the log line is made from: logs.DecisionEvent)."""
        key = (getattr(event, "role", None), event.action, event.reason)
        labels = self._decision_labels.get(key)
        if labels is None:  # our own enums and strings: a few dozen combinations at most
            labels = self._decision_labels[key] = tuple(_label(value) for value in key)
        role, verdict, reason = labels
        self._child(self.decisions, role, verdict, reason).inc()
        if getattr(event, "would_reject", None) is not None:
            self._child(self.would_reject, role, reason).inc()
        # An SRS address reversed at RCPT, or a sender SRS-rewritten on the way out.
        if verdict == "relay" and reason == "valid-srs":
            self.srs.labels("reverse").inc()
        elif verdict == "relay" and reason in ("srs0", "srs1"):
            self.srs.labels("forward").inc()

    def count_sessions(self, role: object, count: Callable[[], float]) -> None:
        """The open-sessions gauge of a role reads `count()` at scrape time (the listeners' own sets), or
        shared, at each `refresh`."""
        if self.shared is None:
            self.open_sessions.labels(_label(role)).set_function(count)
        else:
            self._session_counts[_label(role)] = count
            self.refresh()

    def refresh(self) -> None:
        """Shared counts: this worker's open sessions into its file (ops.py calls it every second)."""
        for role, count in self._session_counts.items():
            self._child(self.open_sessions, role).set(count())

    def next_hop_error(self, kind: object) -> None:
        self.next_hop_errors.labels(_label(kind)).inc()

    def next_hop_reply(self, command: str, seconds: float) -> None:
        # The commands are the gateway's own (MAIL, RCPT, DATA, ...), so the label set stays small;
        # the reply to the final dot is "DOT".
        label = "DOT" if command == "end of data" else command.upper()
        self.next_hop_reply_seconds.observe(label, seconds)

    def transaction_done(self, role: object, seconds: float) -> None:
        self.transaction_seconds.observe(_label(role), seconds)

    def ledger_record(self, outcome: str, count: int = 1) -> None:
        self._child(self.ledger_records, outcome).inc(count)

    def srs_rewrite(self, direction: str) -> None:
        self.srs.labels(direction).inc()

    # --- the [state] store ------------------------------------------------------------------------

    def watch_state(self, stores: Any) -> None:
        """Count `stores`' fallbacks and probe it at each scrape (state.Stores; serve's worker calls it)."""
        self.state = stores
        for budget in (stores.guess_budget, stores.null_sender_rate):
            budget.on_fallback = self.state_fallback
        # Seen at once in a scrape, before any charge has fallen back.
        for check in (stores.guess_budget.rule.check, stores.null_sender_rate.rule.check):
            self.state_fallbacks.labels(check)

    def state_fallback(self, check: str) -> None:
        self._child(self.state_fallbacks, check).inc()

    async def probe_state(self) -> bool | None:
        """Ask the store now and set the gauge: whether it answered; None when there is no store."""
        if self.state is None:
            return None
        up = await self.state.available()
        self._child(self.state_store_up, self.state.backend).set(1 if up else 0)
        return up

    # --- the reloader's callbacks -----------------------------------------------------------------

    def set_keyring(self, keyring: Keyring, generation: int | None = None) -> None:
        self._keyring.keyring = keyring
        self._keyring.generation = generation

    def reload_done(self, ok: bool) -> None:
        self.reloads.labels("ok" if ok else "refused").inc()
        self.last_reload_success.set(1 if ok else 0)
        self.last_reload_timestamp.set(self._clock())

    def exposition(self) -> bytes:
        self.refresh()
        return bytes(generate_latest(self.registry))


class MetricsServer:
    """GET /metrics, /healthz and /readyz on one address (loopback by default)."""

    def __init__(self, metrics: Metrics, ready: Callable[[], bool] = lambda: True) -> None:
        self.metrics = metrics
        self._ready = ready
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(
        self, host: str = "127.0.0.1", port: int = 9425, sock: socket.socket | None = None
    ) -> None:
        """Listen on host:port, or on `sock`: bound and listening already, shared by the workers (any of
        them answers: the counts are the same)."""
        # limit=: a request head longer than that is an error (LimitOverrunError), never a big buffer.
        if sock is not None:
            self._server = await asyncio.start_server(self._handle_client, sock=sock, limit=MAX_REQUEST_HEAD)
        else:
            self._server = await asyncio.start_server(
                self._handle_client, host, port, limit=MAX_REQUEST_HEAD
            )

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _handle_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await asyncio.wait_for(self._serve_one(reader, writer), REQUEST_TIMEOUT)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await self._respond(writer, 400, b"bad request\n")
            return
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            await self._respond(writer, 405, b"method not allowed\n", extra=b"Allow: GET, HEAD\r\n")
            return
        body: bytes
        status = 200
        content_type = "text/plain; charset=utf-8"
        if target == "/metrics":
            await self.metrics.probe_state()
            body = self.metrics.exposition()
            content_type = CONTENT_TYPE_LATEST
        elif target == "/healthz":
            body = b"ok\n"
        elif target == "/readyz":
            ready = self._ready()
            status, body = (200, b"ready\n") if ready else (503, b"not ready\n")
            up = await self.metrics.probe_state()
            if up is not None and self.metrics.state is not None:
                # A detail, not a verdict: we degrade (local budgets), we do not stop taking mail.
                how = "available" if up else "unavailable (the budgets answer locally)"
                body += f"state store {self.metrics.state.backend}: {how}\n".encode()
        else:
            status, body = 404, b"not found\n"
        await self._respond(writer, status, body, content_type, head_only=method == "HEAD")

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        extra: bytes = b"",
        head_only: bool = False,
    ) -> None:
        reasons = {
            200: "OK",
            400: "Bad Request",
            404: "Not Found",
            405: "Method Not Allowed",
            503: "Service Unavailable",
        }
        head = (
            f"HTTP/1.1 {status} {reasons.get(status, 'Error')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
        ).encode("ascii")
        writer.write(head + extra + b"\r\n" + (b"" if head_only else body))
        await writer.drain()
