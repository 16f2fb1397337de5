"""CI runs the smoke benchmark: nothing is lost and the harness works. Speed is never asserted here.

The smoke run is `python3 bench/smtp.py --smoke`: a few hundred messages through the limit, the naive
relay, both gateway roles with one and with two workers and (as root) a private Postfix with postsrsd,
plus a small forged-bounce flood, one round each, and a one-second paced latency run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "smtp.py"


def load_bench() -> ModuleType:
    # bench/ is a directory of scripts, not a package: load the harness by path.
    spec = importlib.util.spec_from_file_location("bench_smtp", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_smtp"] = module  # dataclasses look their module up while building the classes
    spec.loader.exec_module(module)
    return module


def test_smoke_benchmark_loses_nothing(tmp_path: Path) -> None:
    bench = load_bench()
    report = tmp_path / "smoke.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--json", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    data = json.loads(report.read_text())
    assert data["problems"] == []

    ran = {(s["case"], s["system"]) for s in data["summaries"]}
    # A private Postfix instance needs root; the harness says so and leaves it out otherwise.
    relays = [s for s in bench.RELAY_SYSTEMS if s != "postfix" or os.geteuid() == 0]
    for case in bench.SMOKE_CASES:
        systems = bench.FLOOD_SYSTEMS if case.flood else relays
        assert {(case.name, system) for system in systems} <= ran, f"{case.name}: a system did not run"

    # Every latency system answered every paced message with a 250.
    latency = {row["system"]: row for row in data["latency"]}
    assert set(latency) == {s for s in bench.LATENCY_SYSTEMS if s in relays}
    for row in latency.values():
        assert row["problems"] == [], row
        assert row["samples"] == round(row["offered"]), row
        assert row["median_ms"] is not None and row["p99_ms"] >= row["median_ms"], row

    floods = {c.name for c in bench.SMOKE_CASES if c.flood}
    for s in data["summaries"]:
        assert s["sent"] > 0
        assert s["lost"] == 0, s
        if s["case"] in floods:
            # Every forged bounce was refused at RCPT and none reached the next hop.
            assert (s["refused"], s["delivered"]) == (s["sent"], 0), s
        else:
            assert s["delivered"] == s["sent"], s
            assert s["refused"] == 0, s


def test_harness_reports_a_lost_message(tmp_path: Path) -> None:
    """The count check can fail: a next hop that refuses every RCPT delivers nothing, a reported problem."""
    bench = load_bench()
    case = bench.Case("1 KiB, 2 sessions", 1024, 2, 5)
    sink = bench.Sink("refusing-sink", tmp_path, reject_rcpt=True)
    try:
        sink.wait_ready()
        target = bench.Target("limit", sink.port, sink, bench.SENDER, bench.RECIPIENT, None)
        run = bench.measure(target, case, case.messages, 0)
    finally:
        sink.stop()
    assert run.delivered == 0
    assert any("the sink received 0" in p for p in run.problems), run.problems
    summary = bench.summarise(case, ["limit"], [run], {})[0]
    assert summary.lost == case.messages


def test_paced_client_reports_a_refusal(tmp_path: Path) -> None:
    """The latency client counts only answered messages: a next hop that refuses RCPT gives no latency."""
    bench = load_bench()
    sink = bench.Sink("refusing-sink", tmp_path, reject_rcpt=True)
    try:
        sink.wait_ready()
        latencies, errors, _ = bench.run_paced(sink.port, bench.SENDER, bench.RECIPIENT, 20.0, 0.5)
    finally:
        sink.stop()
    assert latencies == []
    assert errors and all(e.startswith("RCPT: 5") for e in errors), errors


def test_paced_client_times_each_message(tmp_path: Path) -> None:
    bench = load_bench()
    sink = bench.Sink("sink", tmp_path)
    try:
        sink.wait_ready()
        latencies, errors, elapsed = bench.run_paced(sink.port, bench.SENDER, bench.RECIPIENT, 40.0, 0.5)
        assert sink.wait_messages(20) == 20
    finally:
        sink.stop()
    assert errors == []
    assert len(latencies) == 20 and all(0 < t < elapsed for t in latencies)
    # Paced: 20 slots at 40 msgs/s take about half a second, not the few milliseconds of a burst.
    assert elapsed >= 0.45
