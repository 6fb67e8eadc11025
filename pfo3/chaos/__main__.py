"""
C{python -m pfo3.chaos fuzz|soak}: the robustness suite's command line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
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
    f.add_argument("--broker", action="store_true",
                   help="run the server in distributed mode, with a worker, on RabbitMQ")
    f.add_argument("--json", type=Path, help="also write the figures to this file")
    f.add_argument("--doc", type=Path, help="put the figures in this Markdown file "
                   "(docs/reliability.md), between its chaos:fuzz markers")
    s = sub.add_parser("soak", help="mixed load with faults injected on a schedule")
    s.add_argument("--duration", type=float, default=60.0, help="seconds of load (60)")
    s.add_argument("--seed", type=int, default=1, help="random seed (1)")
    s.add_argument("--clients", type=int, default=4, help="client connections at once (4)")
    s.add_argument("--no-broker", action="store_true",
                   help="run without RabbitMQ and workers (local mode only)")
    s.add_argument("--no-blobs", action="store_true",
                   help="without object storage (by default a SeaweedFS started for the "
                   "run serves tasks that use it, and is killed in the fault schedule)")
    s.add_argument("--json", type=Path, help="also write the figures to this file")
    s.add_argument("--doc", type=Path, help="put the ledger in this Markdown file "
                   "(docs/reliability.md), between its chaos:soak markers")
    args = parser.parse_args(argv)
    if args.command == "fuzz":
        from pfo3.chaos import fuzz

        figures = fuzz.fuzz(lines=args.lines, seed=args.seed, concurrency=args.concurrency,
                            batch=args.batch, broker=args.broker)
        text = fuzz.report(figures)
        command = (f"fuzz --lines {args.lines} --seed {args.seed} "
                   f"--concurrency {args.concurrency} --batch {args.batch}"
                   + (" --broker" if args.broker else ""))
    else:
        from pfo3.chaos import soak

        figures = soak.soak(duration=args.duration, seed=args.seed, clients=args.clients,
                            broker=not args.no_broker, blobs=not args.no_blobs)
        text = soak.report(figures)
        command = (f"soak --duration {args.duration:g} --seed {args.seed} "
                   f"--clients {args.clients}" + (" --no-broker" if args.no_broker else "")
                   + (" --no-blobs" if args.no_blobs else ""))
    print(text, flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n")
    if args.doc is not None:
        update_doc(args.doc, args.command, text, command)
    return 0 if figures["ok"] else 1


def commit() -> Optional[str]:
    """
    @return: The short hash of the commit this pfo3 was checked out at,
        with a C{+} when files tracked in the checkout have changed since;
        L{None} outside a git checkout.
    """
    import pfo3

    root = Path(pfo3.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=30)
        if head.returncode != 0:
            return None
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                 cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+" if changed.stdout.strip() else "")


def update_doc(path: Path, name: str, text: str, command: str) -> None:
    """
    Replace what lies between C{<!-- chaos:NAME -->} and
    C{<!-- /chaos:NAME -->} in a Markdown file with C{text} as a code
    block, stamped with the date, the commit of the code that ran (see
    L{commit}) and the command with every parameter of the run.
    """
    start, end = f"<!-- chaos:{name} -->", f"<!-- /chaos:{name} -->"
    doc = path.read_text()
    if start not in doc or end not in doc:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    at = commit()
    where = f", at commit `{at}`" if at else ", outside a git checkout"
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\nRun of {stamp}{where} (`python -m pfo3.chaos {command}`):"
                    f"\n\n```\n{text}\n```\n{end}{tail}")


if __name__ == "__main__":
    sys.exit(main())
