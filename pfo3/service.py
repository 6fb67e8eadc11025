"""
The server as a Twisted service, with a graceful stop.
"""

from __future__ import annotations

import gc
from typing import Any, Optional

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from pfo3.orchestrator import Orchestrator
from pfo3.protocol import TaskFactory

log = Logger(namespace="pfo3")


class TaskServerService(MultiService):
    """
    The listening endpoints (child services), the thread pool and the
    orchestrator of one pfo3 server.

    Stopping it (SIGTERM, SIGINT or C{reactor.stop()} under C{twistd}) stops
    accepting connections, refuses new tasks with C{apagando}, lets the tasks
    in flight finish and deliver their replies for up to C{shutdown_timeout}
    seconds, cancels what is left (those clients get C{apagando}), closes the
    connections once their last replies are written, and stops the thread
    pool (unless blocking tasks are still running on it: joining it would
    wait for them without limit).
    """

    def __init__(
        self,
        factory: TaskFactory,
        threadpool: Any,
        clock: Any,
        shutdown_timeout: float = 10.0,
        gc_threshold: int = 0,
    ) -> None:
        """
        @param gc_threshold: When positive, tune the process's garbage
            collector at start: freeze the objects that exist once the server
            is set up (imports, configuration), so full collections no longer
            walk them, and collect the youngest generation every
            C{gc_threshold} allocations instead of Python's 700.  Tasks in
            flight (a Deferred, a timer and their callbacks each) otherwise
            trigger full collections that walk every live object: on a burst
            of 10,000 sleeps that was a third of a second of pauses
            (C{docs/execution.md}).  C{0} leaves the collector alone.
        """
        super().__init__()
        self.factory = factory
        self.orchestrator: Orchestrator = factory.orchestrator
        self.threadpool = threadpool
        self.clock = clock
        self.shutdown_timeout = shutdown_timeout
        self._sweeper: Optional[LoopingCall] = None
        self.gc_threshold = gc_threshold

    def startService(self) -> None:
        if self.gc_threshold > 0:
            gc.collect()
            gc.freeze()
            gc.set_threshold(self.gc_threshold, *gc.get_threshold()[1:])
        self.threadpool.start()
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
            workers=self.threadpool.max, timeout=orch.timeout,
            tipos=", ".join(t.name for t in orch.registry),
        )

    def stopService(self) -> Deferred[None]:
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        d: Deferred[Any] = maybeDeferred(super().stopService)
        d.addCallback(lambda _: self._drain())
        d.addBoth(self._close)
        return d

    def _drain(self) -> Deferred[None]:
        orch = self.orchestrator
        if orch.active:
            log.info(
                "pfo3 stopping: waiting up to {deadline}s for {active} tasks in flight",
                deadline=self.shutdown_timeout, active=orch.active,
            )
        d = orch.drain()
        d.addTimeout(self.shutdown_timeout, self.clock)

        def late(f: Failure) -> None:
            f.trap(TimeoutError)
            log.warn(
                "pfo3 stopping: cancelling {active} tasks still running after {deadline}s",
                active=orch.active, deadline=self.shutdown_timeout,
            )
            orch.cancel_all()

        return d.addErrback(late)

    def _close(self, result: Any) -> Deferred[Any]:
        # Wait for the connections to close: the reactor's own shutdown would
        # drop them with their last replies still unwritten.
        d = self.factory.close_all()
        return d.addCallback(self._finish, result)

    def _finish(self, ignored: None, result: Any) -> Any:
        stuck = getattr(self.orchestrator.executor, "running", 0)
        if stuck:
            # Joining the pool would wait for them without limit.
            log.warn(
                "pfo3 stopping: not waiting for {stuck} blocking tasks still running",
                stuck=stuck,
            )
        else:
            self.threadpool.stop()
        log.info("pfo3 stopped after {completed} tasks", completed=self.orchestrator.completed)
        return result
