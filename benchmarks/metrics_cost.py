"""
What --metrics costs: the suite's C{pfo3-metrics} system (pfo3 with
--metrics, scraped once a second during the load, as a Prometheus would)
against C{pfo3} without it, at 64x8 and 64x1, and nothing else.

    python benchmarks/metrics_cost.py [--rounds 5] [--duration 4] [--out DIR]

A shorthand for C{run_suite.py --systems pfo3,pfo3-metrics --levels
64x8,64x1 --skip burst,memory,profile}: it writes its results, report and
chart into C{DIR} (a new temporary folder by default; never the documents'
own), then prints the report's two metrics targets (issue 13 asks for at
least 0.9x the throughput, paired by round).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import run_suite  # noqa: E402


def suite_arguments(rounds: int, duration: float, out: str) -> List[str]:
    """
    @return: The arguments of the suite run that measures the metrics cost.
    """
    return ["--systems", "pfo3,pfo3-metrics", "--levels", "64x8,64x1",
            "--skip", "burst,memory,profile", "--rounds", str(rounds),
            "--duration", str(duration),
            "--results", os.path.join(out, "metrics.json"),
            "--markdown", os.path.join(out, "metrics.md"),
            "--chart", os.path.join(out, "metrics.png")]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--out", help="folder for the results (default: a new temporary one)")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="pfo3-metrics-cost-")
    os.makedirs(out, exist_ok=True)
    status = run_suite.main(suite_arguments(args.rounds, args.duration, out))
    with open(os.path.join(out, "metrics.md"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("| --metrics"):
                print(line.rstrip())
    return status


if __name__ == "__main__":
    raise SystemExit(main())
