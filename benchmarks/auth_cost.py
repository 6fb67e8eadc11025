"""
What authentication costs: the same load against an open pfo3 and against
one that requires a JWT, sent once per connection (C{op: auth}) or with every
request (a C{token} field), in interleaved rounds of the same run.

    python benchmarks/auth_cost.py [--rounds 5] [--duration 3] [--json out.json]

Prints throughput and server CPU per task of each way, and their ratios to
the open server, per round and as medians of the paired ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from run_suite import Running, bench, measured  # noqa: E402
from systems import REPO, System, _twistd  # noqa: E402

LEVELS = [(64, 8), (16, 1), (1, 1)]


def server(name: str, extra: List[str]) -> System:
    def commands(port: int) -> List[List[str]]:
        return [_twistd() + ["-n", "--pidfile=", "pfo3", "--port",
                             f"tcp:{port}:interface=127.0.0.1", *extra]]

    return System(name, name, f"pfo3 {' '.join(extra)}", commands, env={"PYTHONPATH": REPO})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--json", help="Write every run here.")
    args = parser.parse_args()

    import jwt

    tmp = tempfile.mkdtemp(prefix="pfo3-auth-cost-")
    secret = os.urandom(32).hex()
    secret_file = os.path.join(tmp, "secret")
    with open(secret_file, "w") as f:
        f.write(secret)
    token = jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600}, secret.encode(),
                       algorithm="HS256")
    open_server = Running(server("open", []), tmp)
    jwt_server = Running(server("jwt", ["--jwt-secret-file", secret_file]), tmp)
    ways: List[Tuple[str, Running, List[str]]] = [
        ("open", open_server, []),
        ("op: auth per connection", jwt_server, ["--token", token, "--auth", "connection"]),
        ("token in every request", jwt_server, ["--token", token, "--auth", "request"]),
    ]
    runs: List[Dict[str, Any]] = []
    try:
        for _, running, extra in ways:  # warm-up
            bench(running.port, ["-c", "64", "-i", "8", "-d", "1", *extra])
        for r in range(args.rounds):
            order = ways[r % len(ways):] + ways[:r % len(ways)]
            for level in LEVELS:
                for name, running, extra in order:
                    s = measured(running, ["-c", str(level[0]), "-i", str(level[1]),
                                           "-d", str(args.duration), *extra])
                    run = {"round": r, "level": f"{level[0]}x{level[1]}", "way": name,
                           "throughput": s["throughput"], "errors": s["error_count"],
                           "cpu_us": s["server_cpu_us_per_task"],
                           "p99_ms": s["latency_ms"]["p99"]}
                    runs.append(run)
                    print(f"  round {r + 1} {run['level']:>5} {name:<26} "
                          f"{run['throughput']:9.0f}/s  {run['cpu_us'] or 0:6.1f} us/task  "
                          f"errors {run['errors']}", flush=True)
    finally:
        open_server.stop()
        jwt_server.stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    print("\nmedian of paired ratios to the open server (same round, same level):")
    print(f"{'level':>6} {'way':<26} {'tasks/s':>8} {'CPU/task':>9}")
    for level in LEVELS:
        key = f"{level[0]}x{level[1]}"
        base = {r["round"]: r for r in runs if r["level"] == key and r["way"] == "open"}
        for name, _, _ in ways[1:]:
            mine = [r for r in runs if r["level"] == key and r["way"] == name]
            tput = statistics.median(r["throughput"] / base[r["round"]]["throughput"]
                                     for r in mine)
            cpu = statistics.median(r["cpu_us"] / base[r["round"]]["cpu_us"] for r in mine)
            print(f"{key:>6} {name:<26} {tput:8.2f} {cpu:9.2f}")
    return 1 if any(r["errors"] for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
