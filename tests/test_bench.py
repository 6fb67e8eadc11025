"""
Tests of C{pfo3-bench} (L{pfo3.bench}) and of the comparison suite's pieces.

The command-line tests run C{python -m pfo3.bench} against a real C{twistd
pfo3} (and against the suite's baseline servers) on a free loopback port and
check that the figures it prints agree with each other; they assert nothing
about speed.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from pfo3 import bench, load

from .conftest import (
    ROOT,
    RunningServer,
    TLSFiles,
    free_port,
    server_env,
    start_server,
    wait_for_port,
)

BENCHMARKS = ROOT / "benchmarks"


def run_bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """
    Run C{python -m pfo3.bench ARGS} and capture its output.
    """
    return subprocess.run(
        [sys.executable, "-m", "pfo3.bench", *args],
        capture_output=True, text=True, env=server_env(), timeout=timeout,
    )


def bench_json(port: int, *args: str) -> Dict[str, Any]:
    """
    Run C{pfo3-bench --json} against a port; it must exit with 0.
    """
    done = run_bench("-e", f"tcp:127.0.0.1:{port}", "--json", *args)
    assert done.returncode == 0, done.stderr
    summary: Dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


def assert_consistent(summary: Dict[str, Any], requests: int) -> None:
    """
    Every request was answered ok and the percentiles are ordered.
    """
    assert summary["sent"] == requests
    assert summary["replies"] == requests
    assert summary["ok"] == requests
    assert summary["errors"] == {}
    assert summary["unanswered"] == 0
    assert summary["unmatched"] == 0
    assert summary["connect_errors"] == 0
    lat = summary["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert summary["elapsed_s"] > 0
    assert summary["throughput"] == pytest.approx(
        summary["replies"] / summary["elapsed_s"], rel=1e-3)


@pytest.fixture
def baseline(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[int]:
    """
    One of the suite's baseline servers (C{request.param} names its script)
    on a free port; always killed.
    """
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, str(BENCHMARKS / request.param), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, proc=proc)
        yield port
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


# --- against a real server ----------------------------------------------------

@pytest.mark.integration
def test_count_run_json_is_consistent(server: RunningServer) -> None:
    """
    C{--count 2000 --json} against pfo3 sends exactly 2000 requests, gets
    2000 ok replies and no errors, and reports ordered percentiles and a
    throughput equal to replies over elapsed time.
    """
    summary = bench_json(server.port, "--count", "2000", "-c", "8", "-i", "8")
    assert_consistent(summary, 2000)
    assert summary["mode"] == "count"
    assert summary["connections"] == summary["connected"] == 8


@pytest.mark.integration
def test_human_report(server: RunningServer) -> None:
    """
    Without C{--json} the report names the replies, throughput, the four
    latency figures, and exits with 0; no progress line when not on a
    terminal.
    """
    done = run_bench("-e", f"tcp:127.0.0.1:{server.port}", "-n", "500", "-c", "2")
    assert done.returncode == 0, done.stderr
    assert "500 sent, 500 replies (500 ok, 0 errors, 0 unanswered)" in done.stdout
    assert "replies/s" in done.stdout
    for word in ("p50", "p90", "p99", "max"):
        assert word in done.stdout
    assert "\r" not in done.stderr


@pytest.mark.integration
def test_duration_run_stops_by_itself(server: RunningServer) -> None:
    """
    C{--duration 1} stops sending after about a second and waits for the
    requests in flight: everything sent is answered.
    """
    started = time.monotonic()
    summary = bench_json(server.port, "--duration", "1", "-c", "4", "-i", "4")
    assert time.monotonic() - started < 30
    assert summary["mode"] == "duration"
    assert summary["replies"] > 0
    assert_consistent(summary, summary["sent"])


@pytest.mark.integration
def test_mix_of_task_types(server: RunningServer) -> None:
    """
    A mix of text tasks, a code and short sleeps is answered ok throughout.
    """
    summary = bench_json(
        server.port, "--mix", "uppercase:3,reverse:1,3:1", "--tipo", "sleep=0.001:1",
        "--size", "100", "-n", "600", "-c", "4",
    )
    assert_consistent(summary, 600)
    assert summary["mix"][0].startswith("uppercase=")


@pytest.mark.integration
def test_errors_counted_by_code(server: RunningServer) -> None:
    """
    Requests pfo3 refuses are counted under their C{codigo}; every request is
    still answered and matched to its slot.
    """
    summary = bench_json(server.port, "--mix", "nope:1,uppercase:1", "-n", "400", "-c", "2")
    assert summary["replies"] == summary["sent"] == 400
    assert summary["errors"] == {"tipo_desconocido": 200}
    assert summary["ok"] == 200
    assert summary["error_count"] == 200
    assert summary["unmatched"] == 0


@pytest.mark.integration
def test_sleep_burst(server: RunningServer) -> None:
    """
    C{--burst 300 --burst-sleep 0.2} sends all 300 sleeps at once (spread
    over the connections) and reports when all were answered.
    """
    summary = bench_json(server.port, "--burst", "300", "--burst-sleep", "0.2", "-c", "10")
    assert_consistent(summary, 300)
    assert summary["mode"] == "burst"
    assert summary["inflight"] == 30
    assert summary["elapsed_s"] >= 0.2


@pytest.mark.integration
def test_several_load_processes_merge(server: RunningServer) -> None:
    """
    C{--procs 2} splits connections and count over two processes and merges
    their counts and histograms into one consistent report.
    """
    summary = bench_json(server.port, "--procs", "2", "-c", "4", "-n", "1000")
    assert_consistent(summary, 1000)
    assert summary["procs"] == 2
    assert summary["connected"] == 4


@pytest.mark.integration
def test_unix_endpoint(tmp_path: Path) -> None:
    """
    A C{unix:} client endpoint works: pfo3 listening on a UNIX socket answers
    every request.
    """
    path = tmp_path / "pfo3.sock"
    running = start_server(tmp_path, unix=path)
    try:
        done = run_bench("-e", f"unix:{path}", "-n", "500", "-c", "4", "--json")
        assert done.returncode == 0, done.stderr
        assert_consistent(json.loads(done.stdout), 500)
    finally:
        running.stop()


@pytest.mark.integration
def test_tls_endpoint(tmp_path: Path) -> None:
    """
    A C{tls:} client endpoint works against pfo3 behind an C{ssl:} server
    endpoint, with the certificate checked against C{trustRoots}: requests
    go through the TLS layer, not around it.
    """
    tls = TLSFiles(tmp_path)
    port = free_port()
    running = start_server(tmp_path, port=port, endpoint=tls.endpoint(port))
    try:
        done = run_bench("-e", f"tls:localhost:{port}:trustRoots={tls.ca_dir}",
                         "-n", "500", "-c", "4", "--json")
        assert done.returncode == 0, done.stderr
        assert_consistent(json.loads(done.stdout), 500)
    finally:
        running.stop()


@pytest.mark.integration
def test_nothing_listening_exits_nonzero() -> None:
    """
    When nothing listens, pfo3-bench says it could not connect and exits
    with 1 (in both report formats).
    """
    port = free_port()
    for extra in ([], ["--json"]):
        done = run_bench("-e", f"tcp:127.0.0.1:{port}", "-n", "10", "-c", "2", *extra)
        assert done.returncode == 1
        assert "could not connect" in done.stderr


@pytest.mark.integration
def test_nothing_listening_with_procs_exits_nonzero() -> None:
    """
    With several load processes, a failed connection still ends the run with
    exit status 1 instead of waiting.
    """
    done = run_bench("-e", f"tcp:127.0.0.1:{free_port()}", "-n", "10", "-c", "2", "-P", "2")
    assert done.returncode == 1
    assert "could not connect" in done.stderr


@pytest.mark.integration
def test_silent_server_exits_nonzero() -> None:
    """
    A server that accepts connections but never answers: after C{--timeout}
    seconds without a reply pfo3-bench gives up, reports the requests as
    unanswered and exits with 1.
    """
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        done = run_bench("-e", f"tcp:127.0.0.1:{port}", "-n", "5", "-c", "1", "--timeout", "1",
                         "--json")
    assert done.returncode == 1
    assert "no replies" in done.stderr
    summary = json.loads(done.stdout)
    assert summary["sent"] == summary["unanswered"] == 5
    assert summary["replies"] == 0


@pytest.mark.integration
@pytest.mark.parametrize("baseline", ["seed_server.py", "asyncio_floor.py"], indirect=True)
def test_baselines_speak_the_protocol(baseline: int) -> None:
    """
    The suite's seed-architecture and asyncio-floor servers answer the same
    load (text tasks and sleeps) with ok replies matched by tarea_id.
    """
    summary = bench_json(baseline, "--mix", "uppercase:4,word_count:1,sleep=0.001:1",
                         "-n", "300", "-c", "3", "-i", "4")
    assert_consistent(summary, 300)


# --- command line -------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("args", [
    ["-c", "0"], ["--inflight", "0"], ["--count", "0"], ["--duration", "0"],
    ["--mix", "uppercase:0"], ["--mix", ","], ["--burst", "10", "--mix", "uppercase"],
    ["--procs", "3", "-c", "2"],
])
def test_bad_options_exit_2(args: List[str]) -> None:
    """
    Invalid options are reported with the usage text and exit status 2,
    without connecting anywhere.
    """
    done = run_bench(*args)
    assert done.returncode == 2
    assert "pfo3-bench:" in done.stderr


@pytest.mark.integration
def test_help_and_version() -> None:
    """
    C{--help} shows the usage line and every load option; C{--version} names
    pfo3's version; both exit with 0.
    """
    from pfo3 import __version__

    done = run_bench("--help")
    assert done.returncode == 0
    assert done.stdout.startswith("Usage: pfo3-bench [options]")
    for option in ("--endpoint", "--connections", "--inflight", "--duration", "--count",
                   "--mix", "--tipo", "--size", "--procs", "--burst", "--json"):
        assert option in done.stdout
    done = run_bench("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"pfo3-bench (pfo3) {__version__}"


def test_options_plans_split_the_work() -> None:
    """
    The connections and the count are split over the load processes, each
    starting at a different place in the mix's cycle.
    """
    options = bench.Options()
    options.parseOptions(["-c", "5", "-n", "101", "-P", "2", "-e", "unix:/tmp/x.sock"])
    plans = options.plans()
    assert [p.connections for p in plans] == [3, 2]
    assert [p.count for p in plans] == [51, 50]
    assert [p.offset for p in plans] == [0, 3]
    assert {p.endpoint for p in plans} == {"unix:/tmp/x.sock"}


# --- pieces -------------------------------------------------------------------


def test_parse_mix() -> None:
    """
    C{TIPO[=CONTENIDO][:WEIGHT]}: contenido is JSON when it parses, text
    otherwise; sleeps default to a short sleep, other tasks to the text.
    """
    kinds = load.parse_mix(["uppercase:80,sleep=0.01:20", "reverse=hola: mundo", "espera"],
                            text="abc")
    assert kinds == [
        load.Kind("uppercase", "abc", 80),
        load.Kind("sleep", 0.01, 20),
        load.Kind("reverse", "hola: mundo", 1),
        load.Kind("espera", load.DEFAULT_SLEEP, 1),
    ]
    assert load.parse_mix(['1="123":2']) == [load.Kind("1", "123", 2)]
    for bad in ["", "uppercase:0", "=x"]:
        with pytest.raises(ValueError):
            load.parse_mix([bad])


def test_schedule_is_proportional_and_spread() -> None:
    """
    The mix's cycle holds each kind in proportion to its (reduced) weight,
    and the rarer kind is not bunched together.
    """
    kinds = [load.Kind("a", "", 80), load.Kind("b", "", 20)]
    cycle = load.schedule(kinds)
    assert sorted(cycle) == [0, 0, 0, 0, 1]
    cycle = load.schedule([load.Kind("a", "", 1), load.Kind("b", "", 1)])
    assert cycle in ([0, 1], [1, 0])
    cycle = load.schedule([load.Kind("a", "", 2), load.Kind("b", "", 3)])
    assert cycle.count(1) == 3 and cycle.count(0) == 2
    assert "00" not in "".join(map(str, cycle))


def test_make_text() -> None:
    """
    C{--size} text has exactly the size asked for.
    """
    assert load.make_text(0) == ""
    assert load.make_text(4) == "hola"
    assert len(load.make_text(1000)) == 1000


def test_percentile_and_merge() -> None:
    """
    Percentiles read the histogram's bucket middles in rank order; merged
    histograms add their counts.
    """
    hist: Dict[int, int] = {}
    assert load.percentile(hist, 0.5) == 0.0
    load.merge_hist(hist, {10: 50, 100: 49})
    load.merge_hist(hist, {1000: 1})
    assert load.percentile(hist, 0.5) == pytest.approx(10.5 * load.BUCKET)
    assert load.percentile(hist, 0.99) == pytest.approx(100.5 * load.BUCKET)
    assert load.percentile(hist, 1.0) == pytest.approx(1000.5 * load.BUCKET)


def test_result_merge() -> None:
    """
    Merging results adds counts and error codes, keeps the longest elapsed
    time and the first connection error.
    """
    a = load.Result(connections=2, connected=2, sent=10, replies=10, ok=9,
                     errors={"ocupado": 1}, elapsed=1.0, hist={5: 10})
    b = load.Result(connections=1, connected=0, connect_errors=1, connect_error="refused",
                     errors={"ocupado": 2, "timeout": 1}, elapsed=2.0, hist={5: 1})
    a.merge(b)
    assert (a.connections, a.connected, a.connect_errors) == (3, 2, 1)
    assert a.errors == {"ocupado": 3, "timeout": 1}
    assert a.elapsed == 2.0
    assert a.connect_error == "refused"
    assert a.hist == {5: 11}
    assert a.summary()["unanswered"] == 0


def test_split() -> None:
    """
    Work splits into parts differing by at most one that add up.
    """
    assert load.split(10, 3) == [4, 3, 3]
    assert load.split(2, 4) == [1, 1, 0, 0]


def test_report_ratios_are_paired_within_rounds() -> None:
    """
    The suite's report compares systems by the median of their ratios within
    each round, so a round where the machine was slow for everyone does not
    skew the comparison.
    """
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import report
    finally:
        sys.path.remove(str(BENCHMARKS))
    runs = []
    for rnd, scale in enumerate([1.0, 0.5, 1.0]):
        for system, tput, p99, cpu in [("pfo3", 90.0, 10.0, 9.0), ("floor", 100.0, 20.0, 10.0),
                                       ("seed", 10.0, 100.0, 50.0)]:
            runs.append({"round": rnd, "level": "64x8", "system": system,
                         "throughput": tput * scale, "p50_ms": 1.0, "p90_ms": 2.0,
                         "p99_ms": p99 / scale, "max_ms": 200.0, "replies": 100, "errors": 0,
                         "unanswered": 0, "server_cpu_us_per_task": cpu,
                         "client_cpu_s": 1.0, "elapsed_s": 1.0})
    results = {"runs": runs, "levels": ["64x8"], "target_level": "64x8", "rounds": 3,
               "duration_s": 1.0, "quick": True,
               "meta": {"date": "d", "cpus": 2, "python": "3", "twisted": "t", "commit": "c"},
               "systems": [{"name": n, "label": n, "description": n}
                           for n in ("pfo3", "seed", "floor")],
               "burst": [], "memory": [], "profile": None}
    r = report.ratios(results, "64x8", "pfo3")
    assert r["throughput_vs_floor"] == pytest.approx(0.9)
    assert r["cpu_vs_floor"] == pytest.approx(0.9)
    assert r["p99_vs_seed"] == pytest.approx(0.1)
    text = report.markdown(results)
    assert "| throughput ÷ floor | >= 0.85 | 0.90 | met |" in text
    assert "| p99 latency ÷ seed architecture | <= 0.2 | 0.10 | met |" in text
