"""
C{python -m pfo3.chaos fuzz}: the robustness suite's command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    """
    Run the fuzz or the soak, print its figures, and return 0 when every
    check passed (1 otherwise).
    """
    parser = argparse.ArgumentParser(prog="python -m pfo3.chaos", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fuzz", help="mutated and random lines against a real server")
    f.add_argument("--lines", type=int, default=100_000, help="lines to send (100000)")
    f.add_argument("--seed", type=int, default=1, help="random seed (1)")
    f.add_argument("--concurrency", type=int, default=6, help="connections at once (6)")
    f.add_argument("--batch", type=int, default=200, help="lines per connection (200)")
    f.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    from pfo3.chaos import fuzz

    figures = fuzz.fuzz(lines=args.lines, seed=args.seed, concurrency=args.concurrency,
                        batch=args.batch)
    print(fuzz.report(figures), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n")
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
