"""
Variants of one pfo3 under the same load, in interleaved rounds of one run,
and the ratios of each to the first, paired within a round (the machines
are noisy: a ratio of two runs taken side by side means more than either
figure).  Used by C{auth_cost.py}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

from run_suite import Running, bench, measured
from systems import REPO, System, _twistd


def pfo3_system(name: str, extra: Sequence[str]) -> System:
    """
    @return: C{twistd pfo3} of this checkout with C{extra} options, on the
        port the suite gives it.
    """
    def commands(port: int) -> List[List[str]]:
        return [_twistd() + ["-n", "--pidfile=", "pfo3", "--port",
                             f"tcp:{port}:interface=127.0.0.1", *extra]]

    return System(name, name, f"pfo3 {' '.join(extra)}", commands, env={"PYTHONPATH": REPO})


@dataclass
class Way:
    """
    One variant: a running server, the load generator's extra options, and
    what runs beside each of its runs (a scraper, say).
    """

    name: str
    running: Running
    bench_args: List[str] = field(default_factory=list)
    during: Optional[Callable[[], ContextManager[Any]]] = None


def run_rounds(
    ways: Sequence[Way], levels: Sequence[Tuple[int, int]], rounds: int, duration: float,
) -> List[Dict[str, Any]]:
    """
    Every level, every way, the order of the ways rotated each round.

    @return: One dict per run: round, level, way, throughput, errors,
        server CPU per task (µs), p99 (ms).
    """
    runs: List[Dict[str, Any]] = []
    for w in ways:  # warm-up, not recorded
        bench(w.running.port, ["-c", "64", "-i", "8", "-d", "1", *w.bench_args])
    for r in range(rounds):
        order = list(ways[r % len(ways):]) + list(ways[:r % len(ways)])
        for level in levels:
            for w in order:
                load = ["-c", str(level[0]), "-i", str(level[1]), "-d", str(duration),
                        *w.bench_args]
                with (w.during() if w.during is not None else contextlib.nullcontext()):
                    s = measured(w.running, load)
                run = {"round": r, "level": f"{level[0]}x{level[1]}", "way": w.name,
                       "throughput": s["throughput"], "errors": s["error_count"],
                       "cpu_us": s["server_cpu_us_per_task"],
                       "p99_ms": s["latency_ms"]["p99"]}
                runs.append(run)
                print(f"  round {r + 1} {run['level']:>5} {w.name:<26} "
                      f"{run['throughput']:9.0f}/s  {run['cpu_us'] or 0:6.1f} us/task  "
                      f"errors {run['errors']}", flush=True)
    return runs


def print_ratios(runs: List[Dict[str, Any]], ways: Sequence[Way],
                 levels: Sequence[Tuple[int, int]]) -> None:
    """
    Print, per level, the median over rounds of each way's throughput and
    CPU per task divided by the first way's in the same round.
    """
    base = ways[0].name
    print(f"\nmedian of paired ratios to '{base}' (same round, same level):")
    print(f"{'level':>6} {'way':<26} {'tasks/s':>8} {'CPU/task':>9}")
    for level in levels:
        key = f"{level[0]}x{level[1]}"
        first = {r["round"]: r for r in runs if r["level"] == key and r["way"] == base}
        for w in ways[1:]:
            mine = [r for r in runs if r["level"] == key and r["way"] == w.name]
            tput = statistics.median(r["throughput"] / first[r["round"]]["throughput"]
                                     for r in mine)
            cpu = statistics.median(r["cpu_us"] / first[r["round"]]["cpu_us"] for r in mine)
            print(f"{key:>6} {w.name:<26} {tput:8.2f} {cpu:9.2f}")


def arguments(doc: str) -> argparse.Namespace:
    """
    @return: The options every paired benchmark takes: C{--rounds},
        C{--duration}, C{--json}.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--json", help="Write every run here.")
    return parser.parse_args()


def report(runs: List[Dict[str, Any]], ways: Sequence[Way],
           levels: Sequence[Tuple[int, int]], json_path: Optional[str]) -> int:
    """
    Write the runs to C{json_path} (if any), print the paired ratios.

    @return: The exit status: 1 if any run saw an error reply.
    """
    if json_path:
        with open(json_path, "w") as f:
            json.dump(runs, f, indent=1)
    print_ratios(runs, ways, levels)
    return 1 if any(r["errors"] for r in runs) else 0
