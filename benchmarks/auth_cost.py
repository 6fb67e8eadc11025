"""
What authentication costs: the same load against an open pfo3 and against
one that requires a JWT, sent once per connection (C{op: auth}) or with every
request (a C{token} field), in interleaved rounds of the same run.

    python benchmarks/auth_cost.py [--rounds 5] [--duration 3] [--json out.json]

Prints throughput and server CPU per task of each way, and their ratios to
the open server, per round and as medians of the paired ratios.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from paired import Way, arguments, pfo3_system, report, run_rounds  # noqa: E402
from run_suite import Running  # noqa: E402

LEVELS = [(64, 8), (16, 1), (1, 1)]


def main() -> int:
    args = arguments(__doc__)

    import jwt

    tmp = tempfile.mkdtemp(prefix="pfo3-auth-cost-")
    secret = os.urandom(32).hex()
    secret_file = os.path.join(tmp, "secret")
    with open(secret_file, "w") as f:
        f.write(secret)
    token = jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600}, secret.encode(),
                       algorithm="HS256")
    open_server = Running(pfo3_system("open", []), tmp)
    jwt_server = Running(pfo3_system("jwt", ["--jwt-secret-file", secret_file]), tmp)
    ways: List[Way] = [
        Way("open", open_server),
        Way("op: auth per connection", jwt_server, ["--token", token, "--auth", "connection"]),
        Way("token in every request", jwt_server, ["--token", token, "--auth", "request"]),
    ]
    try:
        runs = run_rounds(ways, LEVELS, args.rounds, args.duration)
    finally:
        open_server.stop()
        jwt_server.stop()
    return report(runs, ways, LEVELS, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
