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

import os
import sys
import tempfile
import threading
import urllib.request
from typing import Any, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from paired import Way, arguments, pfo3_system, report, run_rounds  # noqa: E402
from run_suite import Running, free_port  # noqa: E402

LEVELS = [(64, 8), (16, 1)]


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
    args = arguments(__doc__)

    tmp = tempfile.mkdtemp(prefix="pfo3-metrics-cost-")
    mport = free_port()
    plain = Running(pfo3_system("plain", []), tmp)
    metered = Running(pfo3_system("metrics", ["--metrics", f"tcp:{mport}:interface=127.0.0.1"]),
                      tmp)
    scraper = Scraper(mport)
    ways: List[Way] = [
        Way("no --metrics", plain),
        Way("--metrics, scraped 1/s", metered, during=lambda: scraper),
    ]
    try:
        runs = run_rounds(ways, LEVELS, args.rounds, args.duration)
    finally:
        plain.stop()
        metered.stop()
    print(f"\nscrapes: {scraper.scrapes} answered, {scraper.failures} failed")
    return report(runs, ways, LEVELS, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
