"""
Scrape a Prometheus endpoint as a Prometheus server would: one GET a
second (more often than its usual 15 s), until stopped.  The suite runs it
beside the C{pfo3-metrics} system (C{benchmarks/systems.py}).

    python benchmarks/scrape.py URL [--interval 1]

On SIGTERM it stops and prints how many scrapes were answered and how many
failed (a server not yet listening counts as a failure).
"""

from __future__ import annotations

import argparse
import signal
import threading
import urllib.request
from typing import Any, Tuple


def scrape(url: str, interval: float, stop: threading.Event) -> Tuple[int, int]:
    """
    GET C{url} every C{interval} seconds until C{stop} is set.

    @return: C{(answered, failed)}.
    """
    answered = failed = 0
    while not stop.is_set():
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                r.read()
            answered += 1
        except OSError:  # URLError, a refused or reset connection, a timeout
            failed += 1
        stop.wait(interval)
    return answered, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    stop = threading.Event()

    def stopped(*_: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGINT, stopped)
    answered, failed = scrape(args.url, args.interval, stop)
    print(f"scrapes of {args.url}: {answered} answered, {failed} failed", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
