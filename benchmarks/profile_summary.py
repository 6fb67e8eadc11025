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
from typing import Dict, Iterator, List, Tuple

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


#: Which code a frame's file belongs to, tried in order: the servers' own
#: code, then their event loops and transports.
PACKAGES = (
    ("pfo3", ("/pfo3/",)),
    ("floor", ("/asyncio_floor",)),
    ("twisted", ("/twisted/",)),
    ("asyncio", ("/asyncio/", "/selectors.py", "/socket.py", "/ssl.py")),
    ("json", ("/json/",)),
    ("pyopenssl", ("/OpenSSL/",)),
)

#: The layers a profile is split into: what the server itself does per
#: task, and the event loop, transports and system calls under it.
LAYERS = {"pfo3": "server", "floor": "server", "twisted": "loop", "asyncio": "loop"}


def package(frame: str) -> str:
    """
    @return: Which code a raw py-spy frame belongs to: C{pfo3}, C{floor}
        (C{benchmarks/asyncio_floor*.py}), C{twisted}, C{asyncio} (with
        C{selectors}, C{socket} and C{ssl}), C{json}, C{pyopenssl} or
        C{other}.
    """
    where = "/" + frame.rpartition(" (")[2]
    for name, marks in PACKAGES:
        if any(mark in where for mark in marks):
            return name
    return "other"


#: The functions in which an event loop waits for its sockets (C{epoll_wait}).
POLLS = ("EPollReactor.doPoll", "EpollSelector.select")


def layers(path: str) -> Dict[str, float]:
    """
    Split a profile's samples by what their innermost frame is doing.

    @return: The shares of the samples in the C{server} layer (the server's
        own code, pfo3 or the floor; a C function's time counts to its Python
        caller, so the JSON scanner's does too), the C{poll} (the event
        loop's C{epoll_wait}: py-spy counts a thread there as busy from the
        moment it is runnable, so on a loaded machine this includes time
        spent waiting for a CPU), the rest of the C{loop} layer (Twisted or
        asyncio: the event loop, transports and their system calls), and
        C{other}.
    """
    counts: Counter[str] = Counter()
    for leaf, n in _leaves(path):
        if leaf.partition(" (")[0] in POLLS:
            counts["poll"] += n
        else:
            counts[LAYERS.get(package(leaf), "other")] += n
    total = sum(counts.values())
    return {k: (counts[k] / total if total else 0.0)
            for k in ("server", "loop", "poll", "other")}


def by_package(path: str) -> List[Tuple[str, float]]:
    """
    @return: Shares of the samples whose innermost frame is in each package.
    """
    counts: Counter[str] = Counter()
    for leaf, n in _leaves(path):
        counts[package(leaf)] += n
    total = sum(counts.values())
    return [(name, n / total) for name, n in counts.most_common()] if total else []


def _leaves(path: str) -> Iterator[Tuple[str, int]]:
    """
    @return: The innermost frame of each stack of a collapsed profile, as
        written, with its samples.
    """
    with open(path, encoding="utf-8") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack and count.isdigit():
                yield stack.split(";")[-1], int(count)


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
