"""
The dashboard's figures: a snapshot of what the server is doing.

L{Panel} reads the orchestrator's public counters (C{active},
C{completed}: every task, whatever protocol brought it) and adds its own,
kept by the web gateway: the latency of the tasks it carried, the workers
that ran them and its recent errors.  L{Panel.snapshot} is what C{GET /panel}
answers and what C{/ws/panel} pushes every second.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from typing import Any, Deque, Dict, List, Optional, Tuple

from twisted.internet.interfaces import IReactorTime

from pfo3.orchestrator import Orchestrator

#: Latencies kept for the percentiles (the most recent tasks).
LATENCY_WINDOW = 2048
#: Errors kept for the "recent errors" list.
RECENT_ERRORS = 20
#: Seconds over which tasks per second are averaged.
RATE_WINDOW = 10.0


def percentile(sorted_values: List[float], q: float) -> float:
    """
    @param sorted_values: At least one value, in ascending order.
    @param q: A fraction, C{0 < q <= 1}.
    @return: The nearest-rank percentile C{q} of C{sorted_values}.
    """
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


class Panel:
    """
    Counters of the web gateway, and the snapshot the dashboard shows.

    @ivar requests: Requests and messages the gateway answered, by channel
        (C{"http"}, C{"ws"}).
    """

    def __init__(self, orchestrator: Orchestrator, clock: IReactorTime) -> None:
        self.orchestrator = orchestrator
        self.clock = clock
        self.requests: Counter[str] = Counter()
        self.websockets = 0
        self._latencies: Deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._workers: Counter[str] = Counter()
        self._errors: Deque[Dict[str, Any]] = deque(maxlen=RECENT_ERRORS)
        self._samples: Deque[Tuple[float, int]] = deque()

    def answered(self, channel: str, started: float, worker: Any = None,
                 codigo: Optional[str] = None) -> None:
        """
        The gateway answered one request that came over C{channel}.

        @param started: When it arrived (the clock's seconds).
        @param worker: Who ran its task, for a task that succeeded.
        @param codigo: Its error code, for an error.
        """
        now = self.clock.seconds()
        self.requests[channel] += 1
        self._latencies.append(now - started)
        if worker is not None:
            self._workers[str(worker)] += 1
        if codigo is not None:
            self._errors.appendleft({"hora": now, "codigo": codigo, "canal": channel})

    def rate(self) -> float:
        """
        @return: Tasks answered per second over the last L{RATE_WINDOW}
            seconds (every protocol), sampled on each call.
        """
        now = self.clock.seconds()
        completed = self.orchestrator.completed
        samples = self._samples
        if not samples or now - samples[-1][0] >= 0.25:
            samples.append((now, completed))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW:
            samples.popleft()
        then, before = samples[0]
        if now <= then:
            return 0.0
        return (completed - before) / (now - then)

    def snapshot(self) -> Dict[str, Any]:
        """
        @return: The dashboard's figures, as JSON-ready values; latencies
            in milliseconds, over the gateway's most recent tasks.
        """
        orch = self.orchestrator
        latencies = sorted(self._latencies)
        latency: Dict[str, Optional[float]] = {"p50": None, "p90": None, "p99": None,
                                               "max": None}
        if latencies:
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
                latency[name] = round(percentile(latencies, q) * 1000, 3)
        return {
            "tareas_por_segundo": round(self.rate(), 2),
            "en_curso": orch.active,
            "completadas": orch.completed,
            "latencia_ms": latency,
            "trabajadores": dict(self._workers),
            "errores": list(self._errors),
            "web": {"http": self.requests["http"], "ws": self.requests["ws"],
                    "websockets_abiertos": self.websockets},
            "apagando": orch.draining,
        }
