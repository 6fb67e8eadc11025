"""
Executors run a task somewhere and say which worker ran it.

L{IExecutor} is the seam: the orchestrator holds one and never knows which.
An executor's C{run(tasktype, arg)} returns the outcome C{(resultado, worker)}
either directly (a task that ran inline, synchronously) or as a L{Deferred}.
Returning plain values on the inline path is deliberate: a Deferred per task
costs more than an inline task itself (C{docs/execution.md}).

Cancelling the Deferred of a task means its caller gave up on it (timeout,
client gone, shutdown).  Work not yet started is then dropped; a blocking
function already running cannot be stopped (Python cannot interrupt a
thread), so it is counted in L{IExecutor.abandoned} until it returns, and the
orchestrator counts it against its limits.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any, Callable, Optional, Tuple, Union

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface, implementer

from pfo3.tasks import ASYNC, INLINE, TaskType

#: The C{worker} of a task that ran in the reactor thread (inline or async).
REACTOR_WORKER = 0

Outcome = Tuple[Any, Any]
MaybeDeferredOutcome = Union[Outcome, "Deferred[Outcome]"]


class IExecutor(Interface):
    """
    Runs tasks and reports who ran them.
    """

    workers: int = Attribute("How many tasks it can run at once (for logs).")
    running: int = Attribute(
        "Blocking task functions running now, abandoned ones included."
    )
    abandoned: int = Attribute(
        "Blocking task functions still running whose caller gave up on them."
    )

    def run(
        tasktype: TaskType, arg: Any, identity: str = "",  # noqa: N805
        tarea_id: Optional[str] = None, accepted: Optional[Callable[[], None]] = None,
    ) -> MaybeDeferredOutcome:
        """
        Run one task.

        @param arg: C{contenido} as the task type's validator returned it.
        @param identity: Who sent it (empty: anonymous), for executors that
            pass it on (to a worker's logs, in distributed mode).
        @param tarea_id: Its id in the caller's store when the caller records
            it there (L{None}: not recorded).  With C{identity}, the key of
            its record: an executor whose caller may die before the outcome
            comes back (distributed mode) sends it along, so that another
            process can record the outcome.
        @param accepted: Called once, when the task is in the executor's
            safekeeping: at once (before C{run} returns) by an executor that
            runs it in this process; once the broker confirmed it by the
            distributed one.  Not called if the task is refused first (the
            Deferred fails, or C{run} raises).
        @return: C{(resultado, worker)}, or a Deferred of it.  Cancelling the
            Deferred gives up on the task.  Exceptions of a task run
            synchronously propagate to the caller.
        """

    def start() -> None:
        """
        Get ready to run tasks (start threads, connect to a broker...).
        """

    def stop() -> Deferred[None]:
        """
        Release what L{start} took, once no task is expected any more.

        @return: A Deferred firing once stopped.
        """


class _Job:
    """
    One blocking task handed to the thread pool.
    """

    __slots__ = ("func", "arg", "started", "cancelled")

    def __init__(self, func: Callable[[Any], Any], arg: Any) -> None:
        self.func = func
        self.arg = arg
        self.started = False
        self.cancelled = False


@implementer(IExecutor)
class LocalExecutor:
    """
    Runs tasks in this process.

    C{INLINE} tasks run in the reactor thread and report worker
    L{REACTOR_WORKER} (C{0}); C{ASYNC} tasks too.  C{THREAD} tasks run on the
    thread pool and report the pool thread's number, C{1} to C{N}, as the
    seed's worker threads did.

    @ivar inline: When false, C{INLINE} tasks go to the thread pool too.
    """

    def __init__(self, reactor: Any, threadpool: Any, inline: bool = True) -> None:
        """
        @param reactor: Provides C{IReactorTime} and C{IReactorFromThreads}.
        @param threadpool: A L{twisted.python.threadpool.ThreadPool} or
            anything with its C{start}, C{stop}, C{max} and
            C{callInThreadWithCallback}; L{start} and L{stop} start and stop
            it.
        """
        self.reactor = reactor
        self.threadpool = threadpool
        self.inline = inline
        self._local = threading.local()
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        # Plain attributes, written under the lock by pool threads: the
        # orchestrator reads C{abandoned} for every task.
        self.running = 0
        self.abandoned = 0

    @property
    def workers(self) -> int:
        return int(self.threadpool.max)

    def start(self) -> None:
        self.threadpool.start()

    def stop(self) -> Deferred[None]:
        """
        Stop the thread pool, unless blocking functions are still running on
        it: joining it would wait for them without limit (its threads do
        not keep the process alive, see L{DaemonThreadPool}).
        """
        if not self.running:
            self.threadpool.stop()
        return succeed(None)

    def run(
        self, tasktype: TaskType, arg: Any, identity: str = "", tarea_id: Optional[str] = None,
        accepted: Optional[Callable[[], None]] = None,
    ) -> MaybeDeferredOutcome:
        if accepted is not None:
            accepted()
        mode = tasktype.mode
        if mode == INLINE and self.inline:
            return tasktype.run(arg), REACTOR_WORKER
        if mode == ASYNC:
            d: Deferred[Any] = tasktype.run(self.reactor, arg)
            return d.addCallback(_with_worker, REACTOR_WORKER)
        return self._in_pool(tasktype.run, arg)

    def _in_pool(self, func: Callable[[Any], Any], arg: Any) -> Deferred[Outcome]:
        job = _Job(func, arg)
        d: Deferred[Outcome] = Deferred(lambda _: self._give_up(job))
        reactor = self.reactor

        def done(ok: bool, result: Any) -> None:
            reactor.callFromThread(_deliver, d, ok, result)

        self.threadpool.callInThreadWithCallback(done, self._in_thread, job)
        return d

    def _give_up(self, job: _Job) -> None:
        # Runs in the reactor thread; the pool thread reads the flags under
        # the same lock, so a job is either dropped before it starts or
        # counted as abandoned until it returns.
        with self._lock:
            job.cancelled = True
            if job.started:
                self.abandoned += 1

    def _in_thread(self, job: _Job) -> Optional[Outcome]:
        with self._lock:
            if job.cancelled:
                return None
            job.started = True
            self.running += 1
        try:
            number = getattr(self._local, "number", None)
            if number is None:
                number = self._local.number = next(self._numbers)
            return job.func(job.arg), number
        finally:
            with self._lock:
                self.running -= 1
                if job.cancelled:
                    self.abandoned -= 1


def _deliver(d: Deferred[Outcome], ok: bool, result: Any) -> None:
    if d.called:
        return  # given up on: cancelled, and answered already
    if ok:
        d.callback(result)
    else:
        assert isinstance(result, Failure)
        d.errback(result)


class DaemonThreadPool(ThreadPool):
    """
    A thread pool whose threads do not keep the process alive.

    A blocking task still running when the server stops (past its timeout
    and the shutdown deadline) cannot be interrupted; with daemon threads
    the server can still exit instead of waiting for it forever.
    """

    def threadFactory(self, *args: Any, **kwargs: Any) -> threading.Thread:  # type: ignore[override]
        return threading.Thread(*args, daemon=True, **kwargs)


def _with_worker(result: Any, worker: Any) -> Outcome:
    return result, worker
