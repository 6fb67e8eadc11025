"""
The comparison suite: pfo3 against the seed architecture and the asyncio floor.

    python benchmarks/run_suite.py            # full run, about 14 minutes
    python benchmarks/run_suite.py --quick    # about 4 minutes, fewer rounds

Every system runs as its own subprocess on a free loopback port for the whole
load phase; the load runs are interleaved (round 1: A B C at each load level,
round 2: B C A, ...), so slow drift of a noisy machine hits every system
alike.  A system runs at every load level unless it names the levels where
it adds something (the variants of pfo3: at 64x8 and 64x1 only).  Each run
is one C{pfo3-bench --json} subprocess; the server's CPU time (user +
system, over all its processes) is read with psutil before and after.  Then
come the sleep bursts and the idle-connection memory test, each on fresh
server processes, and, when py-spy is installed, profiles of pfo3 and of the
floor under the target load, of pfo3 under a sleep burst and of pfo3 over
TLS without pipelining.  The results go
to C{benchmarks/results/latest.json} and are rendered into
C{docs/benchmarks.md} and C{docs/benchmarks.png}, which the suite alone
writes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import profile_summary  # noqa: E402
import report  # noqa: E402
from systems import DEFAULT_SYSTEMS, REPO, SYSTEMS, System, baseline, by_name  # noqa: E402

#: (connections, requests in flight per connection) per load level: 64x1 is
#: where the seed's clients live (they never pipeline).
LEVELS: List[Tuple[int, int]] = [(1, 1), (64, 1), (16, 8), (64, 8), (256, 8)]
TARGET_LEVEL = (64, 8)
#: Seconds a load run costs beyond its duration (starting pfo3-bench, connecting).
RUN_OVERHEAD_S = 1.0
BURST = 10_000
BURST_SLEEP = 1.0
BURST_CONNECTIONS = 100
IDLE_CONNECTIONS = 10_000


def level_name(level: Sequence[int]) -> str:
    """
    @return: C{"64x8"} for C{(64, 8)}.
    """
    return f"{level[0]}x{level[1]}"


def free_port() -> int:
    """
    @return: A loopback TCP port that was free a moment ago.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile(wanted: int) -> int:
    """
    Raise this process's open-file limit (inherited by the servers).

    @return: The soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Running:
    """
    The processes of one system, started on a port.
    """

    def __init__(self, system: System, logdir: str) -> None:
        self.system = system
        self.port = free_port()
        self.endpoint = system.endpoint(self.port)
        env = dict(os.environ)
        env.update(system.env)
        self.procs: List[subprocess.Popen[bytes]] = []
        for i, argv in enumerate(system.commands(self.port)):
            log = open(os.path.join(logdir, f"{system.name}-{self.port}-{i}.log"), "wb")
            self.procs.append(subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=logdir))
            log.close()
        self.watchers: List[subprocess.Popen[bytes]] = []
        try:
            self._wait_ready()
            for i, argv in enumerate(system.watchers(self.port)):
                log = open(os.path.join(logdir, f"{system.name}-{self.port}-w{i}.log"), "wb")
                self.watchers.append(subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=logdir))
                log.close()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"{self.system.name} exited before listening")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:
                    s = raw
                    if self.system.tls_ca is not None:
                        context = ssl.create_default_context(cafile=self.system.tls_ca())
                        s = context.wrap_socket(raw, server_hostname="localhost")
                    s.sendall(b'{"op": "ping"}\n')
                    if s.recv(4096):
                        return
            except OSError:  # ssl.SSLError included
                time.sleep(0.1)
        raise RuntimeError(f"{self.system.name} did not listen on {self.port}")

    def _processes(self) -> List[psutil.Process]:
        found: List[psutil.Process] = []
        for p in self.procs:
            try:
                proc = psutil.Process(p.pid)
                found.append(proc)
                found.extend(proc.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        return found

    def cpu(self) -> float:
        """
        @return: User + system CPU seconds of all its processes so far.
        """
        total = 0.0
        for proc in self._processes():
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def rss(self) -> int:
        """
        @return: Resident memory of the listening process, in bytes.
        """
        return int(psutil.Process(self.procs[0].pid).memory_info().rss)

    def stop(self) -> None:
        """
        Stop every process, its watchers first: SIGTERM, then SIGKILL
        after 10 s.
        """
        for p in [*self.watchers, *self.procs]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [*self.watchers, *self.procs]:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def bench(port: int, args: Sequence[str], timeout: float = 120.0,
          endpoint: Optional[str] = None) -> Dict[str, Any]:
    """
    Run one C{pfo3-bench --json} against a loopback port, or the client
    C{endpoint} given.
    """
    argv = [sys.executable, "-m", "pfo3.bench", "-e", endpoint or f"tcp:127.0.0.1:{port}",
            "--json", "-q", *args]
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(argv, capture_output=True, env=env, timeout=timeout)
    lines = done.stdout.decode().strip().splitlines()
    if not lines:
        raise RuntimeError(f"pfo3-bench printed nothing: {done.stderr.decode()[-2000:]}")
    summary: Dict[str, Any] = json.loads(lines[-1])
    summary["exit_status"] = done.returncode
    return summary


def measured(running: Running, args: Sequence[str], timeout: float = 120.0) -> Dict[str, Any]:
    """
    Run C{pfo3-bench} (with the system's own extra options) and read the
    server's CPU time around it.
    """
    before = running.cpu()
    summary = bench(running.port, [*args, *running.system.bench_args], timeout,
                    running.endpoint)
    cpu = running.cpu() - before
    summary["server_cpu_s"] = cpu
    replies = summary["replies"]
    summary["server_cpu_us_per_task"] = cpu / replies * 1e6 if replies else None
    return summary


def load_phase(
    systems: List[System], levels: List[Tuple[int, int]], rounds: int, duration: float,
    logdir: str,
) -> List[Dict[str, Any]]:
    """
    Interleaved load runs: every level, every system, rotated each round.
    """
    runs: List[Dict[str, Any]] = []
    running = {s.name: Running(s, logdir) for s in systems}
    try:
        for s in systems:  # warm-up, not recorded
            measured(running[s.name], ["-c", "64", "-i", "8", "-d", "1"])
        for r in range(rounds):
            order = systems[r % len(systems):] + systems[:r % len(systems)]
            for level in levels:
                for s in order:
                    if not s.runs_at(level_name(level)):
                        continue
                    summary = measured(running[s.name], [
                        "-c", str(level[0]), "-i", str(level[1]), "-d", str(duration)])
                    lat = summary["latency_ms"]
                    run = {
                        "round": r, "level": level_name(level), "system": s.name,
                        "throughput": summary["throughput"], "p50_ms": lat["p50"],
                        "p90_ms": lat["p90"], "p99_ms": lat["p99"], "max_ms": lat["max"],
                        "replies": summary["replies"], "errors": summary["error_count"],
                        "unanswered": summary["unanswered"],
                        "server_cpu_us_per_task": summary["server_cpu_us_per_task"],
                        "client_cpu_s": summary["client_cpu_s"],
                        "elapsed_s": summary["elapsed_s"],
                    }
                    runs.append(run)
                    print(f"  round {r + 1}/{rounds} {run['level']:>6} {s.name:<11} "
                          f"{run['throughput']:9.0f}/s  p99 {run['p99_ms']:8.2f} ms  "
                          f"cpu {run['server_cpu_us_per_task'] or 0:6.1f} us/task  "
                          f"errors {run['errors']}", flush=True)
    finally:
        for r_ in running.values():
            r_.stop()
    return runs


def burst_phase(
    systems: List[System], rounds: int, size: int, seconds: float, logdir: str
) -> List[Dict[str, Any]]:
    """
    Sleep bursts, interleaved; a system with a C{burst_limit} runs a smaller
    burst whose wall time is scaled linearly to C{size}.
    """
    out: List[Dict[str, Any]] = []
    systems = [s for s in systems if s.burst]
    running = {s.name: Running(s, logdir) for s in systems}
    try:
        for r in range(rounds):
            for s in systems:
                n = size if s.burst_limit is None else min(size, s.burst_limit)
                conns = min(n, BURST_CONNECTIONS)
                summary = measured(running[s.name], [
                    "--burst", str(n), "--burst-sleep", str(seconds), "-c", str(conns)],
                    timeout=seconds * n + 120)
                wall = summary["elapsed_s"]
                entry = {
                    "round": r, "system": s.name, "burst": n, "connections": conns,
                    "sleep_s": seconds, "wall_s": wall, "replies": summary["replies"],
                    "errors": summary["error_count"],
                    "extrapolated_to": size if n < size else None,
                    "wall_s_for_size": wall * size / n,
                }
                out.append(entry)
                note = f" (extrapolated from {n})" if n < size else ""
                print(f"  burst round {r + 1}/{rounds} {s.name:<9} {n} x {seconds:g} s: "
                      f"{wall:.3f} s, {summary['replies']} replies; for {size}: "
                      f"{entry['wall_s_for_size']:.1f} s{note}", flush=True)
    finally:
        for r_ in running.values():
            r_.stop()
    return out


def hold_connections(port: int, n: int) -> List[socket.socket]:
    """
    Open C{n} connections one by one, each answered a ping (so the server
    has set it up completely), and keep them open.
    """
    socks: List[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(s)
            s.sendall(b'{"op": "ping"}\n')
            if not s.recv(4096):
                raise RuntimeError("connection closed before the ping was answered")
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def memory_phase(systems: List[System], n: int, logdir: str) -> List[Dict[str, Any]]:
    """
    RSS of each system's fresh server before and while it holds C{n} idle
    connections.
    """
    out: List[Dict[str, Any]] = []
    for s in systems:
        if not s.idle_memory:
            continue
        running = Running(s, logdir)
        try:
            measured(running, ["-c", "16", "-i", "8", "-d", "1"])  # warm, as in use
            time.sleep(0.5)
            before = running.rss()
            socks = hold_connections(running.port, n)
            try:
                time.sleep(1.0)
                during = running.rss()
            finally:
                for sock in socks:
                    sock.close()
            entry = {"system": s.name, "connections": n, "rss_before": before,
                     "rss_during": during, "bytes_per_connection": (during - before) / n}
            out.append(entry)
            print(f"  memory {s.name:<9} {before / 2**20:.1f} MiB -> {during / 2**20:.1f} MiB "
                  f"with {n} idle connections: "
                  f"{entry['bytes_per_connection'] / 1024:.2f} KiB each", flush=True)
        finally:
            running.stop()
    return out


def profile_phase(system: System, name: str, load_args: Sequence[str], logdir: str,
                  outdir: str, seconds: float, lead: float) -> Optional[Dict[str, Any]]:
    """
    py-spy profile of a fresh server of a system while C{pfo3-bench
    LOAD_ARGS} runs; sampling starts C{lead} seconds after the load and
    lasts C{seconds}.
    """
    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(pyspy):
        print("  py-spy not found: no profile", flush=True)
        return None
    os.makedirs(outdir, exist_ok=True)
    raw = os.path.join(outdir, f"{system.name}-{name}.raw")
    if os.path.exists(raw):
        os.remove(raw)
    running = Running(system, logdir)
    spylog = open(os.path.join(logdir, f"py-spy-{name}.log"), "wb")
    try:
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO
        if lead < 0:
            spy = subprocess.Popen([pyspy, "record", "--pid", str(running.procs[0].pid), "-d",
                                    str(math.ceil(seconds)), "-r", "250", "-f", "raw", "-o", raw],
                                   stdout=spylog, stderr=subprocess.STDOUT)
            time.sleep(-lead)
        load = subprocess.Popen(
            [sys.executable, "-m", "pfo3.bench", "-e", running.endpoint, "-q",
             "--json", *load_args, *system.bench_args], stdout=subprocess.PIPE, env=env)
        if lead >= 0:
            time.sleep(lead)
            spy = subprocess.Popen([pyspy, "record", "--pid", str(running.procs[0].pid), "-d",
                                    str(math.ceil(seconds)), "-r", "250", "-f", "raw", "-o", raw],
                                   stdout=spylog, stderr=subprocess.STDOUT)
        stdout, _ = load.communicate(timeout=seconds + 120)
        spy.wait(timeout=seconds + 60)
    finally:
        running.stop()
        spylog.close()
    if not os.path.exists(raw):
        with open(spylog.name, encoding="utf-8", errors="replace") as f:
            print(f"  py-spy wrote nothing: {f.read().strip()[-500:]}", flush=True)
        return None
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    print(f"  profiled {system.name} under {name}: {summary['throughput']:.0f}/s, "
          f"{summary['elapsed_s']:.3f} s", flush=True)
    return {"system": system.name, "name": name, "load": " ".join(load_args),
            "markdown": profile_summary.as_markdown(raw, 15),
            "layers": profile_summary.layers(raw),
            "raw": os.path.basename(raw), "throughput": summary["throughput"],
            "elapsed_s": summary["elapsed_s"]}


def machine() -> Dict[str, Any]:
    """
    @return: What the report says about where it ran.
    """
    import twisted

    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "pfo3",
                                "twisted", "benchmarks/*.py"],
                               capture_output=True, text=True).stdout.strip()
        if dirty:
            commit += " + uncommitted changes"
    except OSError:
        commit = ""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "twisted": twisted.__version__, "platform": platform.platform(),
        "commit": commit,
    }


def parse_levels(text: str) -> List[Tuple[int, int]]:
    """
    @param text: Comma-separated levels, C{"64x8,64x1"}.
    @return: The levels as C{(connections, in flight)}, in the suite's order.
    @raise SystemExit: for a level the suite does not know.
    """
    known = {level_name(lv): lv for lv in LEVELS}
    wanted = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in known]
    if unknown or not wanted:
        raise SystemExit(f"unknown load levels {unknown}; known: {', '.join(known)}")
    return [lv for lv in LEVELS if level_name(lv) in wanted]


def load_runs(systems: Sequence[System], levels: Sequence[Tuple[int, int]]) -> int:
    """
    @return: How many load runs one round makes.
    """
    return sum(1 for lv in levels for s in systems if s.runs_at(level_name(lv)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Run the suite and write the report.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 rounds of 2 s, smaller bursts: a smoke run")
    parser.add_argument("--rounds", type=int, help="load rounds (default 5, quick 2)")
    parser.add_argument("--duration", type=float, help="seconds per run (default 4, quick 2)")
    parser.add_argument("--systems", default=",".join(s.name for s in DEFAULT_SYSTEMS),
                        help="comma-separated systems (default: %(default)s; also known: "
                             + ",".join(s.name for s in SYSTEMS if s not in DEFAULT_SYSTEMS)
                             + ")")
    parser.add_argument("--levels", default=",".join(level_name(lv) for lv in LEVELS),
                        help="comma-separated load levels, CONNECTIONSxINFLIGHT "
                             "(default: %(default)s)")
    parser.add_argument("--skip", default="",
                        help="phases to skip: comma-separated of load,burst,memory,profile")
    parser.add_argument("--results", default=os.path.join(HERE, "results", "latest.json"))
    parser.add_argument("--markdown", default=os.path.join(REPO, "docs", "benchmarks.md"))
    parser.add_argument("--chart", default=os.path.join(REPO, "docs", "benchmarks.png"))
    parser.add_argument("--baseline", metavar="CHECKOUT",
                        help="also run pfo3 from this other checkout (e.g. a worktree of an "
                             "earlier commit) as system 'pfo3-base', for before/after ratios")
    parser.add_argument("--render-only", action="store_true",
                        help="only re-render the report from --results")
    args = parser.parse_args(argv)
    if args.render_only:
        with open(args.results, encoding="utf-8") as f:
            results = json.load(f)
        report.write(results, args.markdown, args.chart)
        return 0

    rounds = args.rounds or (2 if args.quick else 5)
    duration = args.duration or (2.0 if args.quick else 4.0)
    skip = {x for x in args.skip.split(",") if x}
    levels = parse_levels(args.levels)
    systems = by_name([x for x in args.systems.split(",") if x])
    if args.baseline:
        systems.insert(1, baseline(args.baseline))
    unavailable = {}
    for s in list(systems):
        why = s.available()
        if why is not None:
            unavailable[s.name] = why
            systems.remove(s)
            print(f"skipping {s.name}: {why}", flush=True)
    names = [level_name(lv) for lv in levels]
    for s in list(systems):
        if not any(s.runs_at(n) for n in names):
            systems.remove(s)
            print(f"skipping {s.name}: it runs only at {', '.join(s.levels or ())}", flush=True)
    nofile = raise_nofile(IDLE_CONNECTIONS + 1000)
    idle = min(IDLE_CONNECTIONS, nofile - 500) if not args.quick else 2000
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    results: Dict[str, Any] = {
        "meta": machine(), "quick": args.quick, "rounds": rounds, "duration_s": duration,
        "nofile": nofile, "levels": names,
        "target_level": level_name(TARGET_LEVEL),
        "systems": [{"name": s.name, "label": s.label, "description": s.description}
                    for s in systems],
        "unavailable": unavailable,
        "runs": [], "burst": [], "memory": [], "profiles": [],
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pfo3-suite-") as logdir:
        if "load" not in skip:
            n = load_runs(systems, levels)
            print(f"load: {rounds} rounds of {n} runs ({len(levels)} levels, {len(systems)} "
                  f"systems), {duration:g} s each: about "
                  f"{rounds * n * (duration + RUN_OVERHEAD_S) / 60:.0f} min", flush=True)
            results["runs"] = load_phase(systems, levels, rounds, duration, logdir)
        if "burst" not in skip:
            size, secs = (2000, 1.0) if args.quick else (BURST, BURST_SLEEP)
            print(f"sleep burst: {size} x {secs:g} s", flush=True)
            results["burst"] = burst_phase(systems, 1 if args.quick else 3, size, secs, logdir)
            results["burst_size"] = size
        if "memory" not in skip:
            print(f"memory: {idle} idle connections", flush=True)
            results["memory"] = memory_phase(systems, idle, logdir)
        known = {s.name: s for s in systems}
        if "profile" not in skip and "pfo3" in known:
            outdir = os.path.dirname(os.path.abspath(args.results))
            target = level_name(TARGET_LEVEL)
            load = ["-c", str(TARGET_LEVEL[0]), "-i", str(TARGET_LEVEL[1]), "-d", "11"]
            print(f"profile: pfo3 and the floor at {target}, pfo3 under a sleep burst, "
                  "pfo3 over TLS at 64x1", flush=True)
            profiles = [
                profile_phase(known["pfo3"], target, load, logdir, outdir,
                              seconds=8.0, lead=1.5),
                profile_phase(known["pfo3"], "burst", [
                    "--burst", str(BURST), "--burst-sleep", str(BURST_SLEEP),
                    "-c", str(BURST_CONNECTIONS)],
                    logdir, outdir, seconds=4.0, lead=-1.0),
            ]
            if "floor" in known:
                profiles.append(profile_phase(known["floor"], target, load, logdir, outdir,
                                              seconds=8.0, lead=1.5))
            if "pfo3-tls" in known:
                profiles.append(profile_phase(known["pfo3-tls"], "64x1",
                                              ["-c", "64", "-i", "1", "-d", "11"], logdir,
                                              outdir, seconds=8.0, lead=1.5))
            results["profiles"] = [p for p in profiles if p is not None]
    results["suite_seconds"] = round(time.monotonic() - started, 1)
    with open(args.results, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    report.write(results, args.markdown, args.chart)
    print(f"done in {results['suite_seconds']:.0f} s: {args.markdown}, {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
