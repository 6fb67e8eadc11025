"""
The summary that C{{"op": "stats"}} answers, and the broker probe it and
the metrics share.

Everything here reads counters that the server keeps anyway
(L{pfo3.tally.Tally}, the orchestrator's tasks in flight, the factory's
connections, the executor's threads, the store's backlog); nothing is
computed per task.  In distributed mode the broker's queue is asked for its
depth with a passive C{queue_declare} (one round trip), at most once per
L{BrokerProbe.max_age} seconds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pfo3.tally import Tally

if TYPE_CHECKING:
    from pfo3.orchestrator import Orchestrator
    from pfo3.protocol import TaskFactory

log = Logger(namespace="pfo3")

#: Seconds a broker probe waits for the broker's answer.
PROBE_TIMEOUT = 2.0


@dataclass
class Counts:
    """
    What a server counted, read at one moment: its L{Tally} and the levels
    (tasks in flight, connections, threads) beside it.  One process's, or
    (L{pfo3.processes.counts}) every process's added up.
    """

    tally: Tally
    in_flight: int
    connections: Optional[int]
    threads: int
    running: int
    abandoned: int
    store_pending: Optional[int]
    store_dropped: Optional[int]
    draining: bool
    started: float


def counts_of(orch: Orchestrator, connections: Optional[int] = None) -> Counts:
    """
    @return: What C{orch} (and the C{connections} open to it) counted.
    """
    executor = orch.executor
    store = orch.store
    return Counts(
        tally=orch.tally, in_flight=orch.active, connections=connections,
        threads=executor.workers, running=executor.running, abandoned=executor.abandoned,
        store_pending=None if store is None else store.pending,
        store_dropped=None if store is None else store.dropped,
        draining=orch.draining, started=orch.started,
    )


def summary_of(counts: Counts, now: float) -> Dict[str, Any]:
    """
    @return: The summary of C{counts}: tasks by type and state, error lines
        by code, tasks in flight, recent latency, uptime, the executor's
        threads and the store's backlog.
    """
    tally = counts.tally
    tareas: Dict[str, Dict[str, int]] = {}
    for (tipo, estado), n in sorted(tally.by_outcome().items()):
        tareas.setdefault(tipo, {})[estado] = n
    return {
        "tareas": tareas,
        "total": tally.total(),
        "en_curso": counts.in_flight,
        "conexiones": counts.connections,
        "errores": dict(sorted(tally.errors.items())),
        "latencia": tally.percentiles(now),
        "segundos_activo": round(now - counts.started, 3),
        "apagando": counts.draining,
        "ejecutor": {
            "hilos": counts.threads,
            "ocupados": counts.running,
            "abandonadas": counts.abandoned,
        },
        "store": None if counts.store_pending is None else {
            "pendientes": counts.store_pending, "descartadas": counts.store_dropped or 0},
    }


def orchestrator_summary(orch: Orchestrator, connections: Optional[int] = None) -> Dict[str, Any]:
    """
    @return: The summary (L{summary_of}) of what C{orch} counted.
    """
    return summary_of(counts_of(orch, connections), orch.clock.seconds())


class BrokerProbe:
    """
    The state of the broker's task queue, as one orchestrator (or worker)
    sees it: whether it is connected, how many tasks wait in the queue, how
    many consumers (worker channels) it has, and how old the oldest task
    this process still waits for is.

    @ivar depth: Tasks waiting in the queue at the last probe (L{None}:
        never probed, or the broker was unreachable).
    @ivar consumers: Consumers of the queue at the last probe.
    @ivar checked: When the last probe answered.
    """

    max_age = 1.0

    def __init__(self, broker: Any, queue: str, clock: IReactorTime,
                 oldest: Optional[Any] = None) -> None:
        """
        @param broker: A L{pfo3.amqp.connection.Broker} (or its in-memory
            double): its C{channel} is L{None} while disconnected.
        @param queue: The task queue's name.
        @param oldest: Returns the age in seconds of the oldest task this
            process published and still waits for (L{None}: none), when it
            knows (an orchestrator's L{pfo3.amqp.executor.AMQPExecutor}).
        """
        self.broker = broker
        self.queue = queue
        self.clock = clock
        self.oldest = oldest
        self.depth: Optional[int] = None
        self.consumers: Optional[int] = None
        self.checked: Optional[float] = None
        self._waiters: List[Deferred[None]] = []

    @property
    def connected(self) -> bool:
        return self.broker.channel is not None

    def refresh(self) -> Deferred[None]:
        """
        Ask the broker for the queue's depth, unless the last answer is
        fresher than L{max_age}.  Never fails: an unreachable broker leaves
        C{depth} at L{None}.
        """
        channel = self.broker.channel
        now = self.clock.seconds()
        if channel is None:
            self.depth = self.consumers = None
            return succeed(None)
        if self.checked is not None and now - self.checked < self.max_age:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            d: Deferred[Tuple[int, int]] = channel.queue_depth(self.queue)
            d.addTimeout(PROBE_TIMEOUT, self.clock)
            d.addCallbacks(self._answered, self._failed)
            d.addBoth(self._done)
        return waiter

    def _answered(self, counts: Tuple[int, int]) -> None:
        self.depth, self.consumers = counts
        self.checked = self.clock.seconds()

    def _failed(self, failure: Failure) -> None:
        log.info("Could not read the depth of {queue}: {error}", queue=self.queue,
                 error=failure.getErrorMessage() or failure.type.__name__)
        self.depth = self.consumers = None

    def _done(self, result: Any) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(None)

    def oldest_age(self) -> Optional[float]:
        """
        @return: An approximation of the age of the oldest task in the
            queue: 0 when the queue is empty, else the age of the oldest
            task this process published and has no reply for yet (queued or
            running: an upper bound of its own tasks' wait); L{None} when
            unknown.
        """
        if self.depth is None:
            return None
        if self.depth == 0:
            return 0.0
        if self.oldest is None:
            return None
        age: Optional[float] = self.oldest()
        return age if age is not None else 0.0

    def describe(self) -> Dict[str, Any]:
        """
        @return: The broker's part of C{op: stats}.
        """
        age = self.oldest_age()
        return {
            "conectado": self.connected,
            "cola": self.depth,
            "consumidores": self.consumers,
            "antiguedad": None if age is None else round(age, 3),
        }


class ServerStats:
    """
    The whole server's summary: the orchestrator's, its connections, and
    the broker's state in distributed mode.  It becomes the orchestrator's
    L{pfo3.orchestrator.Orchestrator.summary}.
    """

    def __init__(self, factory: TaskFactory, probe: Optional[BrokerProbe] = None) -> None:
        self.factory = factory
        self.orchestrator = factory.orchestrator
        self.probe = probe

    def healthy(self) -> Tuple[bool, str]:
        """
        @return: Whether the server takes tasks, and why not.
        """
        if self.orchestrator.draining:
            return False, "draining"
        if self.probe is not None and not self.probe.connected:
            return False, "broker down"
        return True, "ok"

    def counts(self) -> Counts:
        """
        @return: What this server counted, now.
        """
        return counts_of(self.orchestrator, len(self.factory.protocols))

    def snapshot(self) -> Dict[str, Any]:
        """
        @return: The summary with what is known of the broker now.
        """
        summary = summary_of(self.counts(), self.orchestrator.clock.seconds())
        if self.probe is not None:
            summary["broker"] = self.probe.describe()
        return summary

    def __call__(self) -> Any:
        """
        @return: The summary, or (distributed mode) a Deferred of it once
            the broker answered the probe.
        """
        if self.probe is None:
            return self.snapshot()
        return self.probe.refresh().addCallback(lambda _: self.snapshot())


class OldestPublished:
    """
    The publish times of the tasks an orchestrator waits for, oldest first,
    so that the age of the oldest one is known without a scan.
    """

    def __init__(self, clock: IReactorTime, pending: Dict[str, Any]) -> None:
        """
        @param pending: The executor's tasks waiting for a reply, by
            correlation id (entries leave it when answered).
        """
        self.clock = clock
        self.pending = pending
        self.queue: Deque[Tuple[float, str]] = deque()

    def published(self, correlation_id: str) -> None:
        q = self.queue
        q.append((self.clock.seconds(), correlation_id))
        if len(q) > 2 * len(self.pending) + 1024:
            pending = self.pending
            self.queue = deque(e for e in q if e[1] in pending)

    def __call__(self) -> Optional[float]:
        """
        @return: Seconds since the oldest task still waited for was
            published (L{None}: none).
        """
        q = self.queue
        pending = self.pending
        while q and q[0][1] not in pending:
            q.popleft()
        if not q:
            return None
        return self.clock.seconds() - q[0][0]
