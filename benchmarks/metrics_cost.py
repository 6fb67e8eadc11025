"""
What --metrics costs: the same load against pfo3 without it and against
pfo3 with --metrics scraped once a second (as a Prometheus would, more
often than its usual 15 s), in interleaved rounds of the same run.

    python benchmarks/metrics_cost.py [--rounds 5] [--duration 3] [--json out.json]

Prints throughput and server CPU per task of each, and the ratios of the
scraped server to the plain one, per round and as medians of the paired
ratios (issue 13 asks for at least 0.9x the throughput).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from run_suite import Running, bench, free_port, measured  # noqa: E402
from systems import REPO, System, _twistd  # noqa: E402

LEVELS = [(64, 8), (16, 1)]


def server(name: str, extra: List[str]) -> System:
    def commands(port: int) -> List[List[str]]:
        return [_twistd() + ["-n", "--pidfile=", "pfo3", "--port",
                             f"tcp:{port}:interface=127.0.0.1", *extra]]

    return System(name, name, f"pfo3 {' '.join(extra)}", commands, env={"PYTHONPATH": REPO})


class Scraper:
    """
    GET /metrics every C{interval} seconds on a thread, while running.
    """

    def __init__(self, port: int, interval: float = 1.0) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.scrapes = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    r.read()
                self.scrapes += 1
            except Exception:
                self.failures += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> Scraper:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--json", help="Write every run here.")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="pfo3-metrics-cost-")
    mport = free_port()
    plain = Running(server("plain", []), tmp)
    metered = Running(server("metrics", ["--metrics", f"tcp:{mport}:interface=127.0.0.1"]), tmp)
    scraper = Scraper(mport)
    ways: List[Tuple[str, Running, Optional[Scraper]]] = [
        ("no --metrics", plain, None),
        ("--metrics, scraped 1/s", metered, scraper),
    ]
    runs: List[Dict[str, Any]] = []
    try:
        for _, running, _ in ways:  # warm-up
            bench(running.port, ["-c", "64", "-i", "8", "-d", "1"])
        for r in range(args.rounds):
            order = ways[r % len(ways):] + ways[:r % len(ways)]
            for level in LEVELS:
                for name, running, scrapes in order:
                    load = ["-c", str(level[0]), "-i", str(level[1]), "-d", str(args.duration)]
                    if scrapes is None:
                        s = measured(running, load)
                    else:
                        with scrapes:
                            s = measured(running, load)
                    run = {"round": r, "level": f"{level[0]}x{level[1]}", "way": name,
                           "throughput": s["throughput"], "errors": s["error_count"],
                           "cpu_us": s["server_cpu_us_per_task"],
                           "p99_ms": s["latency_ms"]["p99"]}
                    runs.append(run)
                    print(f"  round {r + 1} {run['level']:>5} {name:<24} "
                          f"{run['throughput']:9.0f}/s  {run['cpu_us'] or 0:6.1f} us/task  "
                          f"errors {run['errors']}", flush=True)
    finally:
        plain.stop()
        metered.stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    print(f"\nscrapes: {scraper.scrapes} answered, {scraper.failures} failed")
    print("median of paired ratios to the server without --metrics (same round, same level):")
    print(f"{'level':>6} {'way':<24} {'tasks/s':>8} {'CPU/task':>9}")
    for level in LEVELS:
        key = f"{level[0]}x{level[1]}"
        base = {r["round"]: r for r in runs if r["level"] == key and r["way"] == ways[0][0]}
        for name, _, _ in ways[1:]:
            mine = [r for r in runs if r["level"] == key and r["way"] == name]
            tput = statistics.median(r["throughput"] / base[r["round"]]["throughput"]
                                     for r in mine)
            cpu = statistics.median(r["cpu_us"] / base[r["round"]]["cpu_us"] for r in mine)
            print(f"{key:>6} {name:<24} {tput:8.2f} {cpu:9.2f}")
    return 1 if any(r["errors"] for r in runs) or scraper.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
