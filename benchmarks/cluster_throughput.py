"""
Throughput of the deploy/cluster.py cluster: pfo3-bench through HAProxy
(two orchestrators behind it) against pfo3-bench straight to one
orchestrator's direct TLS port, in interleaved rounds of the same run, and
the text of op stats of each orchestrator captured while HAProxy carries
the load.

    python benchmarks/cluster_throughput.py [--dir DIR] [--seconds 3] [--rounds 2] [--json]

With --dir naming a running cluster it measures that one; otherwise it
starts a cluster in a temporary folder and stops it afterwards.  Every task
goes through RabbitMQ to the two workers either way, with TLS and a JWT on
every connection.  The machine may be shared and noisy: compare the ratio of
the same run, not figures from different runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SCRIPT = ROOT / "deploy" / "cluster.py"


def bench(endpoint: str, token: str, seconds: float, connections: int, inflight: int,
          wait: bool = True) -> Any:
    """
    Run pfo3-bench against C{endpoint}; return its JSON report, or the
    process when C{wait} is false.
    """
    env = dict(os.environ, PFO3_TOKEN=token)
    cmd = [str(BIN / "pfo3-bench"), "-e", endpoint, "-c", str(connections), "-i", str(inflight),
           "-d", str(seconds), "-P", "2", "-q", "-j"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"pfo3-bench failed: {err}")
    return json.loads(out)


def op_stats(state: Dict[str, Any], name: str, token: str) -> Dict[str, Any]:
    """
    @return: Orchestrator C{name}'s reply to op stats, over its direct port.
    """
    tls = ssl.create_default_context(cafile=str(Path(state["tls"]["ca_dir"]) / "ca.pem"))
    raw = socket.create_connection(("127.0.0.1", state["ports"][f"{name}_direct"]), timeout=10)
    with tls.wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(json.dumps({"op": "auth", "token": token}).encode() + b"\n"
                     + json.dumps({"op": "stats"}).encode() + b"\n")
        lines = sock.makefile("rb")
        auth = json.loads(lines.readline())
        if auth.get("estado") != "ok":
            raise RuntimeError(f"op auth refused: {auth}")
        reply: Dict[str, Any] = json.loads(lines.readline())
        return reply


def during_load(state: Dict[str, Any], token: str, before: int,
                seconds: float) -> Dict[str, Any]:
    """
    @return: Both orchestrators' op stats, taken once the load through
        HAProxy has reached o1 (its task total rose past C{before}: the load
        generator takes a while to start) and a moment into it.
    """
    deadline = time.monotonic() + seconds
    while (op_stats(state, "o1", token)["resultado"]["total"] <= before
           and time.monotonic() < deadline):
        time.sleep(0.05)
    time.sleep(min(0.5, seconds / 4))
    return {name: op_stats(state, name, token) for name in ("o1", "o2")}


def measure(state: Dict[str, Any], seconds: float, rounds: int, connections: int,
            inflight: int) -> Dict[str, Any]:
    token = subprocess.run(
        [str(BIN / "pfo3-token"), "--sub", "bench", "--secret-file", state["jwt_secret_file"]],
        check=True, capture_output=True, text=True).stdout.strip()
    front, direct = state["urls"]["front"], state["urls"]["o1"]
    runs: Dict[str, List[Dict[str, Any]]] = {"haproxy": [], "direct": []}
    stats: Dict[str, Any] = {}
    for r in range(rounds):
        order = ("haproxy", "direct") if r % 2 == 0 else ("direct", "haproxy")
        for kind in order:
            endpoint = front if kind == "haproxy" else direct
            if kind == "haproxy" and not stats:
                before = op_stats(state, "o1", token)["resultado"]["total"]
                proc = bench(endpoint, token, seconds, connections, inflight, wait=False)
                stats = during_load(state, token, before, seconds)
                out, err = proc.communicate(timeout=seconds + 60)
                if proc.returncode != 0:
                    raise RuntimeError(f"pfo3-bench failed: {err}")
                runs[kind].append(json.loads(out))
            else:
                runs[kind].append(bench(endpoint, token, seconds, connections, inflight))
    ratios = [h["throughput"] / d["throughput"]
              for h, d in zip(runs["haproxy"], runs["direct"]) if d["throughput"]]

    def total(kind: str, field: str) -> Any:
        return sum(run[field] if not isinstance(run[field], dict) else len(run[field])
                   for run in runs[kind])

    return {
        "seconds": seconds, "rounds": rounds, "connections": connections, "inflight": inflight,
        "haproxy": {"throughput": [run["throughput"] for run in runs["haproxy"]],
                    "ok": total("haproxy", "ok"),
                    "error_count": total("haproxy", "error_count")},
        "direct": {"throughput": [run["throughput"] for run in runs["direct"]],
                   "ok": total("direct", "ok"),
                   "error_count": total("direct", "error_count")},
        "ratios": [round(x, 3) for x in ratios],
        "ratio_median": round(statistics.median(ratios), 3) if ratios else None,
        "stats": stats["o1"],
        "stats_o2": stats["o2"],
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="a running cluster's folder (default: start one)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(argv)
    own = args.dir is None
    directory = Path(args.dir or tempfile.mkdtemp(prefix="pfo3-cluster-"))
    if own:
        subprocess.run([sys.executable, str(SCRIPT), "up", "--dir", str(directory)],
                       check=True, stdout=sys.stderr)
    try:
        state = json.loads((directory / "cluster.json").read_text())
        result = measure(state, args.seconds, args.rounds, args.connections, args.inflight)
    finally:
        if own:
            subprocess.run([sys.executable, str(SCRIPT), "down", "--dir", str(directory)],
                           stdout=sys.stderr)
    h, d = result["haproxy"]["throughput"], result["direct"]["throughput"]
    print(f"through HAProxy, 2 orchestrators: {', '.join(f'{x:.0f}' for x in h)} tasks/s",
          file=sys.stderr if args.json else sys.stdout)
    print(f"one orchestrator directly:        {', '.join(f'{x:.0f}' for x in d)} tasks/s",
          file=sys.stderr if args.json else sys.stdout)
    print(f"ratio per round: {result['ratios']} (median {result['ratio_median']})",
          file=sys.stderr if args.json else sys.stdout)
    print("op stats of o1 during the HAProxy load:\n" + json.dumps(result["stats"], indent=2),
          file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
