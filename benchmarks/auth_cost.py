"""
What authentication costs: the same load against an open pfo3 and against
one that requires a JWT, sent once per connection (C{op: auth}) or with every
request (a C{token} field), in interleaved rounds of the same run; then what
one token check costs in the server's authenticator, when the token was
seen before (a cache hit: what a client that repeats its token pays) and
when every request carries a token never seen (a full signature check).

    python benchmarks/auth_cost.py [--rounds 5] [--duration 3] [--json out.json]
                                   [--checks 20000] [--checks-only]

Prints throughput and server CPU per task of each way, and their ratios to
the open server, per round and as medians of the paired ratios; then the
microseconds per check of each kind of token check.

The load generator sends one token per process, so the throughput rounds'
per-request mode is all cache hits after the first request; the fresh-token
figures come from the authenticator itself, fed tokens minted before the
timed loop (more of them than its cache holds, so none is a hit).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from paired import Way, pfo3_system, report, run_rounds  # noqa: E402
from run_suite import Running  # noqa: E402

LEVELS = [(64, 8), (16, 1), (1, 1)]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--json", help="Write every run here.")
    parser.add_argument("--checks", type=int, default=20_000,
                        help="Token checks timed per kind (at least the cache size, 4096, "
                             "plus one).")
    parser.add_argument("--checks-only", action="store_true",
                        help="Time the token checks only, without the throughput rounds.")
    return parser.parse_args()


def _per_check(check: Callable[[str], Any], tokens: List[str]) -> float:
    """
    @return: Microseconds per call of C{check} over C{tokens}, the median of
        three passes.
    """
    times = []
    for _ in range(3):
        started = time.perf_counter()
        for t in tokens:
            check(t)
        times.append((time.perf_counter() - started) / len(tokens) * 1e6)
    return statistics.median(times)


def token_checks(n: int) -> Dict[str, Dict[str, float]]:
    """
    Time L{pfo3.auth.JWTAuthenticator.authenticate} for HS256, RS256 and
    ES256: one token over and over, and C{n} distinct tokens minted in
    advance.

    @return: Per algorithm, microseconds per check of each kind.
    """
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from pfo3.auth import JWTAuthenticator

    exp = int(time.time()) + 3600
    secret = os.urandom(32)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())

    def pem(key: Any) -> bytes:
        return bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    setups = {
        "HS256": (secret, JWTAuthenticator.from_secret(secret)),
        "RS256": (rsa_key, JWTAuthenticator.from_public_key(pem(rsa_key))),
        "ES256": (ec_key, JWTAuthenticator.from_public_key(pem(ec_key))),
    }
    figures: Dict[str, Dict[str, float]] = {}
    for algorithm, (signing, auth) in setups.items():
        # Minted here, before any timing: distinct subjects, so distinct tokens.
        fresh = [jwt.encode({"sub": f"bench{i}", "exp": exp}, signing, algorithm=algorithm)
                 for i in range(n)]
        if len(fresh) <= auth._cache_size:
            raise SystemExit(f"--checks must exceed the cache size ({auth._cache_size})")
        same = [fresh[0]] * n
        auth.authenticate(fresh[0])
        figures[algorithm] = {
            "cache_hit_us": _per_check(auth.authenticate, same),
            # In order, more tokens than the cache holds: each one was
            # evicted before it comes round again.
            "full_check_us": _per_check(auth.authenticate, fresh),
        }
        print(f"  {algorithm}: same token {figures[algorithm]['cache_hit_us']:7.2f} us/check, "
              f"a new token each time {figures[algorithm]['full_check_us']:7.2f} us/check",
              flush=True)
    return figures


def main() -> int:
    args = arguments()

    import jwt

    status = 0
    runs: List[Dict[str, Any]] = []
    if not args.checks_only:
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
        status = report(runs, ways, LEVELS, None)
    print("\ntoken checks in the authenticator (median of 3 passes):")
    checks = token_checks(args.checks)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "token_checks": checks}, f, indent=1)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
