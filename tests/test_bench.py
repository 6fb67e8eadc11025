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
def test_tls_endpoint_with_several_load_processes(tmp_path: Path) -> None:
    """
    Over TLS, C{--procs 2} runs two load processes that each verify the
    server's certificate, and their figures merge as over TCP.
    """
    tls = TLSFiles(tmp_path)
    port = free_port()
    running = start_server(tmp_path, port=port, endpoint=tls.endpoint(port))
    try:
        done = run_bench("-e", f"tls:localhost:{port}:trustRoots={tls.ca_dir}",
                         "-n", "400", "-c", "4", "-i", "1", "--procs", "2", "--json")
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert_consistent(summary, 400)
        assert summary["procs"] == 2
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
@pytest.mark.parametrize(
    "baseline", ["seed_server.py", "asyncio_floor.py", "asyncio_floor_plain.py"], indirect=True)
def test_baselines_speak_the_protocol(baseline: int) -> None:
    """
    The suite's seed-architecture, asyncio-floor and plain asyncio servers
    answer the same load (text tasks and sleeps) with ok replies matched by
    tarea_id.
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
    assert "| throughput ÷ floor | 64x8 | >= 0.85 | 0.90 | met |" in text
    assert "| throughput ÷ floor, round two | 64x8 | >= 1 | 0.90 | missed |" in text
    assert "| p99 latency ÷ seed architecture | 64x8 | <= 0.2 | 0.10 | met |" in text
    assert "| p99 latency ÷ seed architecture | 64x1 | <= 1 | – | – |" in text


# --- the suite's floor, systems and report -------------------------------------


def _benchmark_module(name: str) -> Any:
    """
    Import a module of C{benchmarks/} (which is not a package).
    """
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def _exchange(port: int, lines: List[bytes], replies: int) -> List[Dict[str, Any]]:
    """
    Send C{lines} on one connection and read C{replies} reply lines.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"".join(line + b"\n" for line in lines))
        got = b""
        while got.count(b"\n") < replies:
            chunk = s.recv(65536)
            assert chunk, f"connection closed after {got!r}"
            got += chunk
    return [json.loads(line) for line in got.splitlines()]


@pytest.mark.integration
@pytest.mark.parametrize("baseline", ["asyncio_floor.py"], indirect=True)
def test_floor_answers_every_line_as_pfo3_does(baseline: int) -> None:
    """
    The floor's fast path answers the expected requests, and everything
    else gets the reply pfo3 gives it: a result for names, codes and
    aliases as pfo3 reads them, pfo3's error code for each bad line (bad
    JSON, bad UTF-8, not an object, a bad tarea_id, a tipo missing,
    unknown or of the wrong type, contenido missing or of the wrong type,
    too long a sleep, an unknown op), an escaped lone surrogate, nothing
    for blank lines; every reply is one JSON line.
    """
    lines = [
        b'{"tarea_id": "a", "tipo": "uppercase", "contenido": "hola \xc3\xb1"}',
        b'{"tarea_id": "b", "tipo": 1, "contenido": "x"}',
        b'{"tarea_id": "c", "tipo": " Invertir ", "contenido": "abc"}',
        b'{"tarea_id": "d", "tipo": "contar", "contenido": "a b  c"}\r',
        b'{"tarea_id": "e", "tipo": true, "contenido": "x"}',
        b'{"tarea_id": "f", "tipo": [1], "contenido": "x"}',
        b'{"tarea_id": "g", "tipo": "uppercase", "contenido": 5}',
        b'{"tarea_id": "h", "tipo": "uppercase"}',
        b'{"tarea_id": "i", "contenido": "x"}',
        b'{"tarea_id": "j", "tipo": "sleep", "contenido": 30}',
        b'{"tarea_id": "k", "tipo": "1", "contenido": "\\ud800"}',
        b'{"tarea_id": "l", "tipo": "1", "contenido": NaN}',
        b'{"tarea_id": "", "tipo": "1", "contenido": "x"}',
        b'[1]', b'{"x": ', b'\xff', b'', b'  ', b'{"op": "ping"}', b'{"op": "nada"}',
        b'{"tipo": "1", "contenido": "sin id"}',
        b'{"tarea_id": "m", "tipo": "espera", "contenido": "0.01"}',
    ]
    replies = _exchange(baseline, lines, 20)
    by_id = {r.get("tarea_id"): r for r in replies}
    assert by_id["a"]["resultado"] == "HOLA Ñ"
    assert by_id["b"]["resultado"] == "X"
    assert by_id["c"]["resultado"] == "cba"
    assert by_id["d"]["resultado"] == 3
    assert by_id["k"]["resultado"] == "\ud800"
    assert by_id["m"]["resultado"] == "Esperé 0.01 segundos"
    assert all(by_id[t]["estado"] == "ok" and by_id[t]["worker"] == 0 for t in "abcdkm")
    codes = {t: by_id[t]["codigo"] for t in "efghij"}
    assert codes == {"e": "tipo_desconocido", "f": "tipo_desconocido",
                     "g": "contenido_invalido", "h": "contenido_faltante",
                     "i": "tipo_faltante", "j": "excede_timeout"}
    anonymous = [r.get("codigo") or r["resultado"] for r in replies if r.get("tarea_id") is None]
    assert anonymous == ["json_invalido", "tarea_id_invalido", "no_es_objeto", "json_invalido",
                         "utf8_invalido", "pong", "op_desconocida"]
    [generated] = [r for r in replies if r.get("resultado") == "SIN ID"]
    assert generated["tarea_id"]


@pytest.mark.integration
@pytest.mark.parametrize("baseline", ["asyncio_floor.py"], indirect=True)
def test_floor_keeps_unfinished_lines(baseline: int) -> None:
    """
    A request cut anywhere, even inside a UTF-8 character, is answered once
    its end arrives, and requests in one chunk are answered in order.
    """
    line = '{"tarea_id": "x", "tipo": "uppercase", "contenido": "ñandú"}\n'.encode()
    with socket.create_connection(("127.0.0.1", baseline), timeout=10) as s:
        for i in range(len(line)):
            s.sendall(line[i:i + 1])
            time.sleep(0.001)
        s.sendall(line.replace(b'"x"', b'"y"') * 2)
        got = b""
        while got.count(b"\n") < 3:
            chunk = s.recv(65536)
            assert chunk
            got += chunk
    replies = [json.loads(r) for r in got.splitlines()]
    assert [(r["tarea_id"], r["resultado"]) for r in replies] == [
        ("x", "ÑANDÚ"), ("y", "ÑANDÚ"), ("y", "ÑANDÚ")]


def test_floor_tunes_the_collector_as_pfo3_does() -> None:
    """
    The floor's collector threshold is the default of C{twistd pfo3
    --gc-threshold}, so a change to one shows up here.
    """
    from pfo3.tap import Options

    floor = _benchmark_module("asyncio_floor")
    assert floor.DEFAULT_GC_THRESHOLD == Options()["gc-threshold"]


def test_processes_system_follows_twistd_help() -> None:
    """
    The C{--processes 2} system is available exactly when C{twistd pfo3
    --help} lists C{--processes}, not when the word appears elsewhere.
    """
    systems = _benchmark_module("systems")
    assert systems.has_processes_option("      --processes=   Serve from N processes.")
    assert not systems.has_processes_option("for 'twistd pfo3-worker' processes to run,")
    assert systems.PFO3_P2.commands(9000)[0][-2:] == ["--processes", "2"]
    assert systems.PFO3_P2.bench_args == systems.PFO3_P1.bench_args == ("--procs", "2")


def test_systems_run_at_their_levels() -> None:
    """
    The variants of pfo3 run only at 64x8 and 64x1, the others everywhere;
    the suite counts the runs of a round accordingly and refuses unknown
    levels.
    """
    systems = _benchmark_module("systems")
    run_suite = _benchmark_module("run_suite")
    assert systems.PFO3.runs_at("1x1") and systems.SEED.runs_at("64x1")
    for variant in (systems.PFO3_POOL, systems.PFO3_TLS, systems.PFO3_P2,
                    systems.PFO3_METRICS, systems.FLOOR_PLAIN):
        assert variant.runs_at("64x8") and variant.runs_at("64x1")
        assert not variant.runs_at("256x8")
    levels = run_suite.parse_levels("64x8,1x1")
    assert levels == [(1, 1), (64, 8)]
    assert run_suite.load_runs([systems.PFO3, systems.PFO3_TLS], levels) == 3
    with pytest.raises(SystemExit):
        run_suite.parse_levels("64x9")


def test_metrics_system_is_scraped_on_its_own_port() -> None:
    """
    The metrics variant is pfo3 with --metrics on a loopback port of its
    own, different for each server, and its watcher scrapes that port's
    /metrics once a second; pfo3 itself has no watcher.
    """
    systems = _benchmark_module("systems")
    argv = systems.PFO3_METRICS.commands(9000)[0]
    assert argv[:-2] == systems.PFO3.commands(9000)[0]
    assert argv[-2] == "--metrics"
    endpoint = argv[-1]
    port = int(endpoint.split(":")[1])
    assert endpoint == f"tcp:{port}:interface=127.0.0.1" and port != 9000
    assert systems.PFO3_METRICS.commands(9000)[0][-1] == endpoint  # the same, asked again
    assert systems.PFO3_METRICS.commands(9001)[0][-1] != endpoint
    (scraper,) = systems.PFO3_METRICS.watchers(9000)
    assert scraper[1].endswith("scrape.py")
    assert scraper[2:] == [f"http://127.0.0.1:{port}/metrics", "--interval", "1"]
    assert systems.PFO3.watchers(9000) == []
    assert systems.PFO3_METRICS in systems.DEFAULT_SYSTEMS


def test_metrics_cost_is_a_suite_run() -> None:
    """
    benchmarks/metrics_cost.py runs the suite on pfo3 and pfo3-metrics only,
    at the two levels of the variants, load phase only, writing nowhere
    but the folder it is given.
    """
    metrics_cost = _benchmark_module("metrics_cost")
    systems = _benchmark_module("systems")
    argv = metrics_cost.suite_arguments(3, 2.5, "/somewhere")
    options = dict(zip(argv[::2], argv[1:][::2]))
    assert [s.name for s in systems.by_name(options["--systems"].split(","))] == [
        "pfo3", "pfo3-metrics"]
    assert options["--levels"] == ",".join(systems.VARIANT_LEVELS)
    assert options["--skip"] == "burst,memory,profile"
    assert (options["--rounds"], options["--duration"]) == ("3", "2.5")
    assert all(options[o].startswith("/somewhere/")
               for o in ("--results", "--markdown", "--chart"))


@pytest.mark.integration
def test_metrics_system_runs_under_the_suite(tmp_path: Path) -> None:
    """
    The suite starts pfo3 with --metrics and, once it listens, the scraper
    beside it; the load is answered, the scraper's scrapes are answered
    during it, and its CPU time is not counted as the server's.
    """
    import psutil

    systems = _benchmark_module("systems")
    run_suite = _benchmark_module("run_suite")
    running = run_suite.Running(systems.PFO3_METRICS, str(tmp_path))
    try:
        (watcher,) = running.watchers
        assert watcher.pid not in {p.pid for p in running._processes()}
        summary = run_suite.measured(running, ["-n", "20000", "-c", "4", "-i", "4"])
        time.sleep(1.5)  # at least one scrape after the first
        assert psutil.Process(watcher.pid).is_running()
    finally:
        running.stop()
    assert_consistent(summary, 20000)
    assert watcher.returncode == 0
    (log,) = tmp_path.glob("pfo3-metrics-*-w0.log")
    answered = int(log.read_text().split(": ")[1].split()[0])
    assert answered >= 2, log.read_text()


@pytest.mark.integration
def test_tls_system_runs_under_the_suite(tmp_path: Path) -> None:
    """
    The suite starts pfo3 on an C{ssl:} port with a throwaway certificate,
    sees it ready over TLS and loads it through a verifying C{tls:}
    endpoint: every request answered, the server's CPU time read.
    """
    systems = _benchmark_module("systems")
    run_suite = _benchmark_module("run_suite")
    running = run_suite.Running(systems.PFO3_TLS, str(tmp_path))
    try:
        assert running.endpoint.startswith(f"tls:localhost:{running.port}:trustRoots=")
        # Enough tasks for a few hundred milliseconds of server CPU: the
        # kernel counts a process's CPU time in ticks of 10 ms.
        summary = run_suite.measured(running, ["-n", "3000", "-c", "3", "-i", "8"])
    finally:
        running.stop()
    assert_consistent(summary, 3000)
    assert summary["server_cpu_us_per_task"] > 0


def test_profile_notes_quote_no_figures() -> None:
    """
    The hand-written notes on the profiles hold no numbers: every figure on
    the benchmarks page is the suite's, from the run it reports.
    """
    text = (BENCHMARKS / "profile-notes.md").read_text(encoding="utf-8")
    assert not any(ch.isdigit() for ch in text.replace("pfo3", ""))


def test_report_sections_for_tls_and_processes() -> None:
    """
    The report compares pfo3 over TLS with pfo3 over TCP (paired ratios),
    checks the TLS targets, and says why the two-process comparison is
    missing when the system could not run.
    """
    report = _benchmark_module("report")
    runs = []
    for rnd in range(3):
        for level, tls_cpu in (("64x8", 11.0), ("64x1", 40.0)):
            for system, cpu in (("pfo3", 10.0), ("pfo3-tls", tls_cpu)):
                runs.append({"round": rnd, "level": level, "system": system,
                             "throughput": 1000.0, "p50_ms": 1.0, "p90_ms": 2.0,
                             "p99_ms": 3.0, "max_ms": 4.0, "replies": 100, "errors": 0,
                             "unanswered": 0, "server_cpu_us_per_task": cpu,
                             "client_cpu_s": 1.0, "elapsed_s": 1.0})
    results = {"runs": runs, "levels": ["64x1", "64x8"], "target_level": "64x8",
               "rounds": 3, "duration_s": 1.0, "quick": True,
               "meta": {"date": "d", "cpus": 2, "python": "3", "twisted": "t",
                        "commit": "abc1234"},
               "systems": [{"name": n, "label": n, "description": n}
                           for n in ("pfo3", "pfo3-tls")],
               "unavailable": {"pfo3-p2": "no --processes here"},
               "burst": [], "memory": [], "profiles": []}
    text = report.markdown(results)
    assert "pfo3 at commit `abc1234`" in text
    assert "| over TLS: server CPU per task ÷ over TCP | 64x8 | <= 1.2 | 1.10 | met |" in text
    assert "| over TLS: server CPU per task ÷ over TCP | 64x1 | <= 1.5 | 4.00 | missed |" in text
    assert "| 64x1 | 1,000 | 1,000 | 1.00 | 10.0 | 40.0 | 4.00 | 3.00 | 3.00 |" in text
    assert "Not measured in this run: no --processes here." in text
    assert "| --metrics scraped 1/s: throughput ÷ without | 64x8 | >= 0.9 | – | – |" in text


def test_report_metrics_target() -> None:
    """
    The metrics target is the median over rounds of the throughput with
    --metrics divided by the throughput without it in the same round, at
    64x8 and at 64x1, with the comparison's own section.
    """
    report = _benchmark_module("report")
    runs = []
    # Round by round: 0.95, 0.80, 0.92 at 64x8 (median 0.92); 0.85 each at 64x1.
    for rnd, (plain, metered) in enumerate([(1000.0, 950.0), (2000.0, 1600.0),
                                            (500.0, 460.0)]):
        for level, factor in (("64x8", 1.0), ("64x1", 0.85 * plain / metered)):
            for system, throughput in (("pfo3", plain), ("pfo3-metrics", metered * factor)):
                runs.append({"round": rnd, "level": level, "system": system,
                             "throughput": throughput, "p50_ms": 1.0, "p90_ms": 2.0,
                             "p99_ms": 3.0, "max_ms": 4.0, "replies": 100, "errors": 0,
                             "unanswered": 0, "server_cpu_us_per_task": 10.0,
                             "client_cpu_s": 1.0, "elapsed_s": 1.0})
    results = {"runs": runs, "levels": ["64x1", "64x8"], "target_level": "64x8",
               "rounds": 3, "duration_s": 1.0, "quick": True,
               "meta": {"date": "d", "cpus": 2, "python": "3", "twisted": "t",
                        "commit": "abc1234"},
               "systems": [{"name": n, "label": n, "description": n}
                           for n in ("pfo3", "pfo3-metrics")],
               "unavailable": {}, "burst": [], "memory": [], "profiles": []}
    text = report.markdown(results)
    assert "| --metrics scraped 1/s: throughput ÷ without | 64x8 | >= 0.9 | 0.92 | met |" in text
    assert ("| --metrics scraped 1/s: throughput ÷ without | 64x1 | >= 0.9 | 0.85 | missed |"
            in text)
    assert "## Metrics" in text
    assert "| 64x8 | 1,000 | 950 | 0.92 |" in text


def test_profile_layers(tmp_path: Path) -> None:
    """
    A profile's samples are split by their innermost frame: the server's
    own code (pfo3 or the floor), the event loop's wait in C{epoll}, the
    rest of the event loop (Twisted or asyncio), and anything else.
    """
    summary = _benchmark_module("profile_summary")
    raw = tmp_path / "p.raw"
    raw.write_text(
        "run (twisted/internet/base.py:1);doPoll (twisted/internet/epollreactor.py:2);"
        "_drive (pfo3/protocol.py:3) 5\n"
        "run (twisted/internet/base.py:1);EPollReactor.doPoll "
        "(twisted/internet/epollreactor.py:4) 2\n"
        "run (asyncio/base_events.py:1);EpollSelector.select (selectors.py:5) 1\n"
        "run (asyncio/base_events.py:1);data_received (asyncio_floor.py:6) 1\n"
        "run (asyncio/base_events.py:1);write (asyncio/selector_events.py:7) 1\n",
        encoding="utf-8")
    assert summary.layers(str(raw)) == pytest.approx(
        {"server": 0.6, "loop": 0.1, "poll": 0.3, "other": 0.0})


def test_default_suite_stays_bounded() -> None:
    """
    The default run's load phase (every default system at its levels, five
    rounds of four seconds and the per-run overhead) fits in twelve minutes,
    which leaves the bursts, the idle connections and the profiles room
    within the suite's quarter of an hour; the variants of pfo3 run at two
    levels only.
    """
    systems = _benchmark_module("systems")
    run_suite = _benchmark_module("run_suite")
    runs = run_suite.load_runs(systems.DEFAULT_SYSTEMS, run_suite.LEVELS)
    assert runs * 5 * (4 + run_suite.RUN_OVERHEAD_S) <= 12 * 60
    everywhere = [s.name for s in systems.DEFAULT_SYSTEMS if s.levels is None]
    assert everywhere == ["pfo3", "seed", "floor"]


@pytest.mark.integration
def test_system_load_options_reach_the_load_generator(tmp_path: Path) -> None:
    """
    A system's own load options reach every run against it: the
    one-process reference of the two-process comparison is loaded by two
    load processes whose figures are merged.
    """
    systems = _benchmark_module("systems")
    run_suite = _benchmark_module("run_suite")
    running = run_suite.Running(systems.PFO3_P1, str(tmp_path))
    try:
        summary = run_suite.measured(running, ["-n", "400", "-c", "4", "-i", "2"])
    finally:
        running.stop()
    assert_consistent(summary, 400)
    assert summary["procs"] == 2
