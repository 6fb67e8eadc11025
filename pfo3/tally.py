"""
Plain counters of the tasks a server (or a worker) ran, read when someone
asks: C{op: stats} and the Prometheus collector of L{pfo3.metrics}.

Counting costs a task a dictionary increment (and, for a task that was not
answered inline, one clock reading and a bisection): no locks, no objects.
Everything else (percentiles, the text of a scrape) is computed from these
numbers at the moment they are read, off the task path.

A task answered inline, in the call that accepted it, takes under a
microsecond (C{docs/execution.md}): its duration is not measured, it is
counted in the histogram's first bucket with a duration of 0.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict, deque
from typing import Any, DefaultDict, Deque, Dict, List, Optional, Sequence, Tuple

from pfo3.errors import Pfo3Error, ShuttingDown, TaskTimeout
from pfo3.store import ABANDONED, ERROR, OK, TIMEOUT

#: Upper bounds (seconds) of the task duration histogram's buckets: from
#: what a thread-pool task costs to the default timeout and past it.
BUCKETS: Tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)

#: Durations of the last tasks not answered inline, kept for percentiles.
RECENT = 4096

#: Seconds of the window that C{op: stats} computes percentiles over.
WINDOW = 60.0


def estado_of(reply: Any) -> str:
    """
    @return: The recorded state (L{pfo3.store}'s names) of a task given
        C{reply}: a success, a L{Pfo3Error}, or L{None} for a task given up
        on without an answer (its client went away).
    """
    if reply is None or isinstance(reply, ShuttingDown):
        return ABANDONED
    if isinstance(reply, TaskTimeout):
        return TIMEOUT
    if isinstance(reply, Pfo3Error):
        return ERROR
    return OK


class Tally:
    """
    What a server counted since it started.

    @ivar ok: Tasks that succeeded, by task type name (the inline path
        increments it directly).
    @ivar other: Tasks that ended otherwise, and tasks that did not run
        inline, by (task type name, state).
    @ivar errors: Error lines answered, by C{codigo}.
    @ivar buckets: Tasks timed, per L{BUCKETS} bucket (not cumulative; the
        last one is past the largest bound).
    @ivar timed: Tasks timed (those not answered inline).
    @ivar total_seconds: Their durations, added up.
    @ivar recent: (when it ended, how long it took) of the last L{RECENT}
        timed tasks.
    """

    def __init__(self, bounds: Sequence[float] = BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.ok: DefaultDict[str, int] = defaultdict(int)
        self.other: DefaultDict[Tuple[str, str], int] = defaultdict(int)
        self.errors: DefaultDict[str, int] = defaultdict(int)
        self.buckets: List[int] = [0] * (len(self.bounds) + 1)
        self.timed = 0
        self.total_seconds = 0.0
        self.recent: Deque[Tuple[float, float]] = deque(maxlen=RECENT)

    def ended(self, tipo: str, estado: str, duration: float, now: float) -> None:
        """
        Count a task that was not answered inline, with its duration (none
        below zero: the wall clock may have been set back while it ran).
        """
        if duration < 0.0:
            duration = 0.0
        self.other[(tipo, estado)] += 1
        self.buckets[bisect_left(self.bounds, duration)] += 1
        self.timed += 1
        self.total_seconds += duration
        self.recent.append((now, duration))

    def by_outcome(self) -> Dict[Tuple[str, str], int]:
        """
        @return: Tasks by (task type name, state), every source added up.
        """
        counts: Dict[Tuple[str, str], int] = dict(self.other)
        for tipo, n in list(self.ok.items()):
            key = (tipo, OK)
            counts[key] = counts.get(key, 0) + n
        return counts

    def total(self) -> int:
        """
        @return: Tasks counted, all outcomes.
        """
        return sum(self.ok.values()) + sum(self.other.values())

    def histogram(self) -> Tuple[List[Tuple[str, int]], int, float]:
        """
        @return: The cumulative buckets (upper bound as Prometheus writes
            it, count), the count and the sum of the duration histogram;
            inline tasks are in the first bucket with a duration of 0.
        """
        untimed = self.total() - self.timed
        cumulative: List[Tuple[str, int]] = []
        running = untimed
        for bound, n in zip(self.bounds, self.buckets):
            running += n
            cumulative.append((_bound(bound), running))
        running += self.buckets[-1]
        cumulative.append(("+Inf", running))
        return cumulative, running, self.total_seconds

    def percentiles(self, now: float, window: float = WINDOW) -> Dict[str, Any]:
        """
        @return: How many timed tasks ended in the last C{window} seconds
            and their p50, p90, p99 and maximum durations (L{None} when
            there were none).
        """
        since = now - window
        durations = sorted(d for t, d in list(self.recent) if t >= since)
        summary: Dict[str, Any] = {"ventana": window, "tareas": len(durations)}
        for name, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99)):
            summary[name] = _quantile(durations, q)
        summary["max"] = durations[-1] if durations else None
        return summary

    def as_json(self, now: float, window: float = WINDOW) -> Dict[str, Any]:
        """
        @return: These counts as JSON-able data, with the durations of the
            last C{window} seconds only (what L{percentiles} reads), for
            another process to add up with L{add_json}.
        """
        since = now - window
        return {
            "ok": dict(self.ok),
            "other": [[tipo, estado, n] for (tipo, estado), n in list(self.other.items())],
            "errors": dict(self.errors),
            "buckets": list(self.buckets),
            "timed": self.timed,
            "total_seconds": self.total_seconds,
            "recent": [[t, d] for t, d in list(self.recent) if t >= since],
        }

    def add_json(self, data: Dict[str, Any]) -> None:
        """
        Add the counts of another tally, as L{as_json} wrote them, to these.
        """
        for tipo, n in data["ok"].items():
            self.ok[tipo] += n
        for tipo, estado, n in data["other"]:
            self.other[(tipo, estado)] += n
        for codigo, n in data["errors"].items():
            self.errors[codigo] += n
        self.buckets = [a + b for a, b in zip(self.buckets, data["buckets"])]
        self.timed += data["timed"]
        self.total_seconds += data["total_seconds"]
        self.recent.extend((t, d) for t, d in data["recent"])


def _bound(bound: float) -> str:
    return repr(float(bound))


def _quantile(ordered: List[float], q: float) -> Optional[float]:
    """
    @return: The C{q} quantile of sorted values (nearest rank), L{None} for
        none.
    """
    if not ordered:
        return None
    rank = max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.999999) - 1))
    return ordered[rank]
