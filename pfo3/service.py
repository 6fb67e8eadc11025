"""
The server as a Twisted service, with a graceful stop.
"""

from __future__ import annotations

import gc
from typing import Any, Callable, Optional

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from pfo3.executor import IExecutor
from pfo3.logs import JSONLogsOnParent
from pfo3.orchestrator import Orchestrator
from pfo3.protocol import TaskFactory
from pfo3.signals import SecondSignal
from pfo3.stats import ServerStats

log = Logger(namespace="pfo3")

#: Seconds that clients get to take their last replies once every task has
#: been answered or cancelled; connections still open then are dropped.
CLOSE_GRACE = 5.0

#: Seconds the results store gets to write what is pending at stop.
STORE_FLUSH_TIMEOUT = 5.0


def count(n: int, noun: str) -> str:
    """
    @return: C{"1 task"}, C{"2 tasks"}: a number with its noun, for logs.
    """
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class TaskServerService(JSONLogsOnParent, MultiService):
    """
    The listening endpoints (child services), the executor and the
    orchestrator of one pfo3 server.

    Stopping it (SIGTERM, SIGINT or C{reactor.stop()} under C{twistd}) stops
    accepting connections and refuses new tasks with C{apagando}; every
    connection finishes the tasks it has in flight, writes their replies and
    closes.  Tasks still running after C{shutdown_timeout} seconds, or at
    once on a second SIGTERM/SIGINT, are cancelled (those clients get
    C{apagando}).  Background tasks (sent with C{"esperar": false}) are
    waited for the same way, connection or not.  Then the results store
    writes what is pending (for up to L{STORE_FLUSH_TIMEOUT} seconds) and the
    executor stops.
    """

    def __init__(
        self,
        factory: TaskFactory,
        executor: IExecutor,
        clock: Any,
        shutdown_timeout: float = 10.0,
        gc_threshold: int = 0,
        handle_signals: bool = False,
        stats: Optional[ServerStats] = None,
        metrics: Optional[IService] = None,
    ) -> None:
        """
        @param executor: Started with the service and stopped last.
        @param gc_threshold: When positive, tune the process's garbage
            collector at start: freeze the objects that exist once the server
            is set up (imports, configuration), so full collections no longer
            walk them, and collect the youngest generation every
            C{gc_threshold} allocations instead of Python's 700.  Tasks in
            flight (a Deferred, a timer and their callbacks each) otherwise
            trigger full collections that walk every live object: on a burst
            of 10,000 sleeps that was a third of a second of pauses
            (C{docs/execution.md}).  C{0} leaves the collector alone.
        @param handle_signals: While stopping, take over SIGTERM and SIGINT
            (in the main thread only): a second one cancels the tasks still
            running at once instead of stopping the reactor a second time.
        @param stats: What C{op: stats} answers (by default the
            orchestrator's and the connections' counts).
        @param metrics: The C{--metrics} HTTP listener: started first and
            stopped last, so that C{/healthz} answers 503 while the server
            drains.
        """
        super().__init__()
        self.factory = factory
        self.orchestrator: Orchestrator = factory.orchestrator
        self.executor = executor
        self.clock = clock
        self.shutdown_timeout = shutdown_timeout
        self.gc_threshold = gc_threshold
        self.handle_signals = handle_signals
        self._sweeper: Optional[LoopingCall] = None
        self._second_signal = SecondSignal(self.hurry, self._call_from_thread)
        self._hurried = False
        self.stats = stats if stats is not None else ServerStats(factory)
        self.orchestrator.summary = self.stats
        self.metrics = metrics

    def privilegedStartService(self) -> None:
        if self.metrics is not None:
            self.metrics.privilegedStartService()
        super().privilegedStartService()

    def startService(self) -> None:
        if self.metrics is not None and not self.metrics.running:
            self.metrics.startService()
        if self.gc_threshold > 0:
            gc.collect()
            gc.freeze()
            gc.set_threshold(self.gc_threshold, *gc.get_threshold()[1:])
        self.executor.start()
        store = self.orchestrator.store
        if store is not None:
            store.start()
        super().startService()
        idle = self.factory.idle_timeout
        if idle:
            self._sweeper = LoopingCall(self.factory.close_idle)
            self._sweeper.clock = self.clock
            self._sweeper.start(max(idle / 4, 0.25), now=False)
        orch = self.orchestrator
        log.info(
            "pfo3 started: {workers} worker threads, task timeout {timeout}s, "
            "task types: {tipos}",
            workers=self.executor.workers, timeout=orch.timeout,
            tipos=", ".join(t.name for t in orch.registry),
        )
        log.info("pfo3 {auth}", auth=orch.authenticator.describe())

    def stopService(self) -> Deferred[None]:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        if self.handle_signals:
            self._second_signal.take()  # a second signal hurries the stop
        d: Deferred[Any] = maybeDeferred(super().stopService)
        d.addCallback(lambda _: self._drain())
        d.addBoth(self._stop_store)
        d.addBoth(self._stop_executor)
        d.addBoth(self._stop_metrics)
        return d

    def _drain(self) -> Deferred[None]:
        orch = self.orchestrator
        orch.drain()
        if orch.active:
            log.info(
                "pfo3 stopping: waiting up to {deadline}s for {tasks} in flight",
                deadline=self.shutdown_timeout, active=orch.active,
                tasks=count(orch.active, "task"),
            )
        d = self.factory.finish_all()
        # Then the background tasks, which no connection waits for.
        d.addCallback(lambda _: orch.drain())
        d.addTimeout(self.shutdown_timeout, self.clock)
        return d.addErrback(self._late)

    def _late(self, f: Failure) -> Deferred[None]:
        f.trap(TimeoutError)
        self._cancel_remaining(f"after {self.shutdown_timeout:g}s")
        return self._closed_within_grace()

    def _cancel_remaining(self, when: str) -> None:
        orch = self.orchestrator
        if orch.active:
            log.warn(
                "pfo3 stopping: cancelling {tasks} still running {when}",
                active=orch.active, when=when, tasks=count(orch.active, "task"),
            )
        orch.cancel_all()

    def _closed_within_grace(self) -> Deferred[None]:
        d = self.factory.closed()
        d.addTimeout(CLOSE_GRACE, self.clock)

        def abort(f: Failure) -> None:
            f.trap(TimeoutError)
            log.warn(
                "pfo3 stopping: dropping {connections} that did not take their "
                "last replies", n=len(self.factory.protocols),
                connections=count(len(self.factory.protocols), "connection"),
            )
            self.factory.abort_all()

        return d.addErrback(abort)

    def _stop_store(self, result: Any) -> Deferred[Any]:
        """
        Let the store write what is pending, for a bounded time; whatever
        happens, go on stopping.
        """
        store = self.orchestrator.store
        if store is None:
            return succeed(result)
        d: Deferred[Any] = maybeDeferred(store.stop)
        d.addTimeout(STORE_FLUSH_TIMEOUT, self.clock)

        def failed(f: Failure) -> None:
            log.error(
                "pfo3 stopping: the results store did not finish writing "
                "({pending} updates pending): {error}",
                pending=store.pending, error=f.getErrorMessage() or f.type.__name__,
            )

        d.addErrback(failed)
        return d.addCallback(lambda _: result)

    def _stop_executor(self, result: Any) -> Deferred[Any]:
        executor = self.executor
        if executor.running:
            log.warn(
                "pfo3 stopping: not waiting for {tasks} still running",
                stuck=executor.running, tasks=count(executor.running, "blocking task"),
            )
        d: Deferred[Any] = maybeDeferred(executor.stop)
        return d.addBoth(self._stopped, result)

    def _stopped(self, ignored: Any, result: Any) -> Any:
        self._second_signal.give_back()
        completed = self.orchestrator.completed
        log.info("pfo3 stopped after {tasks}", completed=completed,
                 tasks=count(completed, "task"))
        return result

    def _stop_metrics(self, result: Any) -> Deferred[Any]:
        metrics = self.metrics
        if metrics is None or not metrics.running:
            return succeed(result)
        d: Deferred[Any] = maybeDeferred(metrics.stopService)
        return d.addBoth(lambda _: result)

    # -- a second SIGTERM/SIGINT while stopping ----------------------------------

    @staticmethod
    def _call_from_thread(f: Callable[[], None]) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(f)  # type: ignore[attr-defined]

    def hurry(self) -> None:
        """
        Stop waiting for the tasks in flight: cancel them now (their clients
        get C{apagando}).  What a second SIGTERM or SIGINT does while the
        server stops.
        """
        if self._hurried:
            return
        self._hurried = True
        log.info("pfo3 stopping: second signal, not waiting for tasks in flight")
        self._cancel_remaining("(second signal)")
