"""
Executors run a task somewhere and say which worker ran it.

An executor's C{run(tasktype, arg)} returns the outcome C{(resultado, worker)}
either directly (a task that ran inline, synchronously) or as a L{Deferred}.
Returning plain values on the inline path is deliberate: a Deferred per task
costs more than an inline task itself (C{docs/execution.md}).
"""

from __future__ import annotations

import itertools
import threading
from typing import Any, Callable, Tuple, Union

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from pfo3.tasks import ASYNC, INLINE, TaskType

#: The C{worker} of a task that ran in the reactor thread (inline or async).
REACTOR_WORKER = 0

Outcome = Tuple[Any, Any]
MaybeDeferredOutcome = Union[Outcome, "Deferred[Outcome]"]


class LocalExecutor:
    """
    Runs tasks in this process.

    C{INLINE} tasks run in the reactor thread and report worker
    L{REACTOR_WORKER} (C{0}); C{ASYNC} tasks too.  C{THREAD} tasks run on the
    thread pool through L{deferToThreadPool} and report the pool thread's
    number, C{1} to C{N}, as the seed's worker threads did.

    @ivar inline: When false, C{INLINE} tasks go to the thread pool too.
    """

    def __init__(self, reactor: Any, threadpool: Any, inline: bool = True) -> None:
        """
        @param reactor: Provides C{IReactorTime} and C{IReactorFromThreads}.
        @param threadpool: A started L{twisted.python.threadpool.ThreadPool}
            or anything with its C{callInThreadWithCallback}.
        """
        self.reactor = reactor
        self.threadpool = threadpool
        self.inline = inline
        self._local = threading.local()
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._running = 0

    @property
    def running(self) -> int:
        """
        Blocking tasks handed to the pool whose function has not returned,
        including those whose callers gave up on them (timeout, client gone):
        Python cannot stop a thread.
        """
        return self._running

    def _in_thread(self, func: Callable[[Any], Any], arg: Any) -> Outcome:
        try:
            number = getattr(self._local, "number", None)
            if number is None:
                number = self._local.number = next(self._numbers)
            return func(arg), number
        finally:
            with self._lock:
                self._running -= 1

    def run(self, tasktype: TaskType, arg: Any) -> MaybeDeferredOutcome:
        """
        Run one task.

        @return: C{(resultado, worker)}, or a Deferred of it.  Exceptions of
            an inline task propagate to the caller.
        """
        mode = tasktype.mode
        if mode == INLINE and self.inline:
            return tasktype.run(arg), REACTOR_WORKER
        if mode == ASYNC:
            d: Deferred[Any] = tasktype.run(self.reactor, arg)
            return d.addCallback(_with_worker, REACTOR_WORKER)
        with self._lock:
            self._running += 1
        return deferToThreadPool(self.reactor, self.threadpool, self._in_thread, tasktype.run, arg)


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
