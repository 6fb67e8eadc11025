"""
Summarise a C{py-spy record --format raw} profile (collapsed stacks).

Prints the functions with the most samples on top of the stack (self) and
the most samples anywhere in the stack (inclusive), as shares of all samples.

    python benchmarks/profile_summary.py pfo3.raw [--top 25]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from typing import List, Tuple

_LINE = re.compile(r":\d+\)$")


def frame_name(frame: str) -> str:
    """
    @return: C{"function (file)"} of a py-spy frame C{"function (file:line)"},
        the line number dropped so a function's samples add up; the file is
        cut to its last two path components.
    """
    frame = _LINE.sub(")", frame.strip())
    if " (" in frame:
        func, _, where = frame.partition(" (")
        parts = where.rstrip(")").split("/")
        frame = f"{func} ({'/'.join(parts[-2:])})"
    return frame


def package(frame: str) -> str:
    """
    @return: Which code a raw py-spy frame belongs to: C{pfo3}, C{twisted},
        C{json} or C{other}.
    """
    where = frame.rpartition(" (")[2]
    for name in ("pfo3", "twisted", "json"):
        if f"/{name}/" in where or where.startswith(f"{name}/"):
            return name
    return "other"


def by_package(path: str) -> List[Tuple[str, float]]:
    """
    @return: Shares of the samples whose innermost frame is in each package.
    """
    counts: Counter[str] = Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            counts[package(stack.split(";")[-1])] += int(count)
    total = sum(counts.values())
    return [(name, n / total) for name, n in counts.most_common()] if total else []


def read_stacks(path: str) -> List[Tuple[List[str], int]]:
    """
    @return: C{(frames from root to leaf, samples)} per line of the file.
    """
    stacks: List[Tuple[List[str], int]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            try:
                n = int(count)
            except ValueError:
                continue
            stacks.append(([frame_name(x) for x in stack.split(";") if x], n))
    return stacks


def summarise(
    stacks: List[Tuple[List[str], int]], top: int = 25
) -> Tuple[int, List[Tuple[str, float]], List[Tuple[str, float]]]:
    """
    @return: C{(total samples, [(function, self share)], [(function,
        inclusive share)])}, each list sorted by share, at most C{top} long;
        frames found in (nearly) every sample are left out of the inclusive
        list.
    """
    total = sum(n for _, n in stacks)
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for frames, n in stacks:
        if not frames:
            continue
        own[frames[-1]] += n
        for name in set(frames):
            incl[name] += n
    # frames on every stack (the reactor's main loop and what calls it) say nothing
    for name in [name for name, n in incl.items() if n >= 0.98 * total]:
        del incl[name]

    def shares(c: Counter[str]) -> List[Tuple[str, float]]:
        return [(name, n / total) for name, n in c.most_common(top)] if total else []

    return total, shares(own), shares(incl)


def as_markdown(path: str, top: int = 25) -> str:
    """
    @return: Two Markdown tables (self and inclusive shares).
    """
    total, own, incl = summarise(read_stacks(path), top)
    out: List[str] = [f"{total} samples.", "", "| self % | package |", "|---:|---|"]
    out += [f"| {share * 100:.1f} | {name} |" for name, share in by_package(path)]
    out += ["", "| self % | function |", "|---:|---|"]
    out += [f"| {share * 100:.1f} | `{name}` |" for name, share in own]
    out += ["", "| inclusive % | function |", "|---:|---|"]
    out += [f"| {share * 100:.1f} | `{name}` |" for name, share in incl]
    return "\n".join(out)


def main() -> None:
    """
    Command line: a raw profile file and C{--top}.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(as_markdown(args.path, args.top))


if __name__ == "__main__":
    main()
