"""
A smoke test of C{benchmarks/web_cost.py}, the benchmark behind
C{docs/web.md}'s figures (TCP, WebSocket and HTTP under the same load
shapes, in interleaved rounds, with ratios to TCP paired per round): its
functions against one real C{twistd -n pfo3 --web}, and its command line,
for a fraction of a second each.  It checks that every task is answered
and every figure is there, never how fast: the figures come from a long
run on a quiet machine.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest

from .test_web_process import Web, start_web

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

#: Small shapes: the real ones are 8x1 and 1x50.
SHAPES = [((2, 1), ("tcp", "ws", "http")), ((1, 5), ("tcp", "ws"))]


@pytest.fixture(scope="module")
def web_cost() -> Iterator[Any]:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import web_cost

        yield web_cost
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    running = start_web(tmp_path)
    try:
        yield running
    finally:
        running.server.stop()


def test_rounds_measure_every_protocol(web_cost: Any, web: Web) -> None:
    """
    run_rounds runs each shape over each of its protocols: every task is
    answered ok, and every run has tasks/s, p50, p99 and the server's CPU
    per task; summarize gives each protocol its medians and its ratios to
    TCP of the same round (TCP's own are 1).
    """
    server = psutil.Process(web.server.proc.pid)

    def cpu() -> float:
        times = server.cpu_times()
        return float(times.user + times.system)

    ports = web_cost.Ports(web.server.port, web.port)
    runs = web_cost.run_rounds(ports, rounds=2, duration=0.2, cpu=cpu, shapes=SHAPES)
    assert sorted((r["round"], r["shape"], r["protocol"]) for r in runs) == sorted(
        (r, f"{c}x{w}", p) for r in range(2) for (c, w), ps in SHAPES for p in ps)
    for run in runs:
        assert run["errors"] == 0, run["first_error"]
        assert run["tasks"] > 0
        assert run["throughput"] > 0
        assert 0 < run["p50_ms"] <= run["p99_ms"]
        assert run["cpu_us"] is not None and run["cpu_us"] >= 0
    summary = web_cost.summarize(runs)
    assert [(row["shape"], row["protocol"]) for row in summary] == [
        ("2x1", "tcp"), ("2x1", "ws"), ("2x1", "http"), ("1x5", "tcp"), ("1x5", "ws")]
    for row in summary:
        assert row["rounds"] == 2
        for key in ("throughput", "p50_ms", "p99_ms", "cpu_us", "throughput_vs_tcp",
                    "p99_ms_vs_tcp"):
            assert row[key] is not None and row[key] > 0, (row, key)
        if row["protocol"] == "tcp":
            assert row["throughput_vs_tcp"] == row["p99_ms_vs_tcp"] == 1.0
    table = web_cost.markdown(summary, {
        "rounds": 2, "duration": 0.2, "commit": "abc", "date": "today", "cpus": 2,
        "load": 1.0, "python": "3", "twisted": "26"})
    assert "| 2x1 | HTTP |" in table and "| 1x5 | WebSocket |" in table


def test_http_has_no_pipelined_shape(web_cost: Any, web: Web) -> None:
    """
    HTTP is not run with more than one task in flight per connection.
    """
    with pytest.raises(ValueError):
        web_cost.measure("http", web_cost.Ports(web.server.port, web.port), (1, 5), 0.1)


def test_rewrite_doc(web_cost: Any, tmp_path: Path) -> None:
    """
    --doc replaces only what lies between the markers of docs/web.md, and
    refuses a file without them.
    """
    doc = tmp_path / "web.md"
    shutil.copy(ROOT / "docs" / "web.md", doc)
    before = doc.read_text(encoding="utf-8")
    web_cost.rewrite_doc(str(doc), "NEW FIGURES\n")
    after = doc.read_text(encoding="utf-8")
    head, _, rest = before.partition(web_cost.BEGIN)
    _, _, tail = rest.partition(web_cost.END)
    assert after == head + web_cost.BEGIN + "\nNEW FIGURES\n" + web_cost.END + tail
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    with pytest.raises(ValueError):
        web_cost.rewrite_doc(str(plain), "x")


def test_command_line(web_cost: Any, tmp_path: Path) -> None:
    """
    The script's command line starts its own server, runs a round, writes
    --json and rewrites --doc's figures, and exits 0 (no error replies).
    """
    doc = tmp_path / "web.md"
    shutil.copy(ROOT / "docs" / "web.md", doc)
    out = tmp_path / "web.json"
    status = web_cost.main(["--rounds", "1", "--duration", "0.2", "--json", str(out),
                            "--doc", str(doc)])
    assert status == 0
    data = json.loads(out.read_text())
    assert {(r["shape"], r["protocol"]) for r in data["runs"]} == {
        ("8x1", "tcp"), ("8x1", "ws"), ("8x1", "http"), ("1x50", "tcp"), ("1x50", "ws")}
    assert all(r["errors"] == 0 for r in data["runs"])
    assert "| 8x1 | HTTP |" in doc.read_text(encoding="utf-8")
