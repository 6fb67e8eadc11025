"""
Orchestration: the policy between a decoded request and its executor.

An L{Orchestrator} is shared by every connection of a server; each connection
gets a L{Session} from it.  A session takes a request line and answers with the
reply line: at once (bytes) when the task ran inline or was refused, or as a
L{Deferred} that fires with the reply line (or with L{None} when the
connection went away and nobody is left to answer).  Nothing here knows about
sockets; errors travel as typed exceptions and become wire errors in one place,
L{Session._failed}.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple, Union

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pfo3 import wire
from pfo3.errors import (
    Busy,
    DuplicateTaskId,
    ExceedsTimeout,
    InternalError,
    Pfo3Error,
    ShuttingDown,
    TaskTimeout,
)
from pfo3.tasks import TaskRegistry

ReplyLine = Union[bytes, "Deferred[Optional[bytes]]"]

log = Logger(namespace="pfo3")


class Orchestrator:
    """
    Limits, timeouts and bookkeeping shared by all connections.

    @ivar active: Tasks accepted and not yet answered, over all connections.
    @ivar draining: Once true, new tasks are refused with C{apagando}.
    """

    def __init__(
        self,
        registry: TaskRegistry,
        executor: Any,
        clock: IReactorTime,
        timeout: float = 30.0,
        max_tasks: int = 50_000,
        log_every: int = 0,
    ) -> None:
        """
        @param registry: The task types accepted.
        @param executor: Has C{run(tasktype, arg)} (see L{pfo3.executor}).
        @param clock: Drives task timeouts.
        @param timeout: Seconds a task may take before it is cancelled.
        @param max_tasks: Tasks in flight over all connections past which
            new ones are refused with C{ocupado}.
        @param log_every: Log one structured event for every N-th task
            (C{0}: none; C{1}: all).  Off by default: an event per task costs
            more than an inline task.
        """
        self.registry = registry
        self.executor = executor
        self.clock = clock
        self.timeout = timeout
        self.max_tasks = max_tasks
        self.log_every = log_every
        self.active = 0
        self.draining = False
        self.completed = 0
        self._counter = itertools.count(1)
        self._sessions: Set[Session] = set()
        self._idle: List[Deferred[None]] = []
        # Task timeouts: every task gets the same timeout, so deadlines come
        # in the order tasks are accepted.  One queue and one timer serve
        # them all, instead of a DelayedCall and closures per task.
        self._deadlines: Deque[Tuple[float, Deferred[Any], Session, str]] = deque()
        self._timer: Optional[IDelayedCall] = None
        self._expiring = False

    def session(self, peer: Callable[[], str] = lambda: "-") -> Session:
        """
        @param peer: Describes the client in logs.  Called only when a log
            event needs it, so that it can see an address learnt after the
            connection was made (the PROXY protocol header).
        @return: A new session for one connection.
        """
        s = Session(self, peer)
        self._sessions.add(s)
        return s

    def _watch(self, d: Deferred[Any], session: Session, tarea_id: str) -> None:
        """
        Cancel C{d} with a timeout error if it is still pending in C{timeout}
        seconds.
        """
        self._deadlines.append((self.clock.seconds() + self.timeout, d, session, tarea_id))
        self._schedule()

    def _schedule(self) -> None:
        """
        Keep exactly one timer, for the earliest deadline, while there are
        deadlines; none otherwise.  L{_expire} calls it once it is done, so
        tasks accepted while it runs (a timeout frees a paused connection,
        which reads its next lines) do not start a second timer.
        """
        if self._expiring:
            return
        if not self._deadlines:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        elif self._timer is None:
            delay = max(0.0, self._deadlines[0][0] - self.clock.seconds())
            self._timer = self.clock.callLater(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._expiring = True
        try:
            now = self.clock.seconds()
            # Re-read the queue each time: cancelling fires callbacks that may
            # finish tasks (and compact the queue) or accept new ones.
            while self._deadlines and self._deadlines[0][0] <= now:
                _, d, session, tarea_id = self._deadlines.popleft()
                if session._pending.get(tarea_id) is d:
                    session._cancel_reasons[tarea_id] = TaskTimeout(
                        f"La tarea superó el límite de {self.timeout:g} s y fue cancelada.",
                        tarea_id,
                    )
                    d.cancel()
        finally:
            self._expiring = False
        self._schedule()

    def _finished(self) -> None:
        self.active -= 1
        self.completed += 1
        if self.active == 0:
            self._deadlines.clear()
            self._schedule()
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)
        elif len(self._deadlines) > 2 * self.active + 1024:
            # Forget the deadlines of tasks that are done, so the queue stays
            # proportional to the tasks in flight (amortised O(1) per task).
            self._deadlines = deque(
                e for e in self._deadlines if e[2]._pending.get(e[3]) is e[1]
            )

    def drain(self) -> Deferred[None]:
        """
        Refuse new tasks from now on.

        @return: A Deferred that fires once no task is in flight.
        """
        self.draining = True
        if self.active == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def cancel_all(self) -> None:
        """
        Cancel every task still in flight (their clients get C{apagando}).
        """
        for s in list(self._sessions):
            s.cancel_all(ShuttingDown("El servidor se está apagando; la tarea fue cancelada."))


class Session:
    """
    The tasks of one connection.

    @ivar inflight: Tasks of this connection accepted and not yet answered.
    """

    def __init__(self, orchestrator: Orchestrator, peer: Callable[[], str]) -> None:
        self.orchestrator = orchestrator
        self._peer = peer
        self._pending: Dict[str, Deferred[Any]] = {}
        self._cancel_reasons: Dict[str, Pfo3Error] = {}
        self.closed = False

    @property
    def peer(self) -> str:
        """
        The client, as logs show it.
        """
        return self._peer()

    @property
    def inflight(self) -> int:
        return len(self._pending)

    def handle(self, line: bytes) -> ReplyLine:
        """
        Answer one request line.

        @return: The reply line, or a Deferred firing with it (or with
            L{None} if the session was closed meanwhile).
        """
        orch = self.orchestrator
        try:
            request = wire.decode_request(line, orch.registry)
        except Pfo3Error as e:
            cause = e.__cause__
            if isinstance(e, InternalError) and cause is not None:
                log.failure(
                    "Validating task {tarea_id} raised an unexpected exception",
                    Failure(cause, type(cause), cause.__traceback__),
                    tarea_id=e.tarea_id, peer=self.peer,
                )
            return wire.encode_error(e)
        if type(request) is wire.ControlRequest:
            return self._control(request)
        assert type(request) is wire.TaskRequest
        tarea_id = request.tarea_id
        if tarea_id in self._pending:
            return wire.encode_error(DuplicateTaskId(
                f"Ya hay una tarea en curso con tarea_id {tarea_id!r} en esta conexión.",
                tarea_id,
            ))
        if orch.draining:
            return wire.encode_error(ShuttingDown(
                "El servidor se está apagando y no acepta tareas nuevas.", tarea_id))
        if orch.active >= orch.max_tasks:
            return wire.encode_error(Busy(
                f"Servidor ocupado: {orch.active} tareas en curso. Reintente más tarde.",
                tarea_id,
            ))
        tasktype = request.tasktype
        if tasktype.duration is not None:
            try:
                duration = float(tasktype.duration(request.arg))
            except Exception:
                return self._failed(Failure(), request) or b""
            if duration > orch.timeout:
                return wire.encode_error(ExceedsTimeout(
                    f"La tarea duraría {duration:g} s, más que el "
                    f"límite de {orch.timeout:g} s.",
                    tarea_id,
                ))
        sampled = False
        started = 0.0
        if orch.log_every:
            sampled = next(orch._counter) % orch.log_every == 0
            started = orch.clock.seconds()
        try:
            outcome = orch.executor.run(tasktype, request.arg)
        except Exception:
            orch.completed += 1
            return self._failed(Failure(), request) or b""
        if type(outcome) is tuple:
            orch.completed += 1
            return self._succeeded(outcome, request, sampled, started) or b""

        d: Deferred[Any] = outcome
        orch.active += 1
        self._pending[tarea_id] = d
        orch._watch(d, self, tarea_id)
        args = (request, sampled, started)
        return d.addCallbacks(
            self._async_ok, self._async_failed, callbackArgs=args, errbackArgs=args
        )

    def _async_ok(
        self, outcome: Any, request: wire.TaskRequest, sampled: bool, started: float
    ) -> Optional[bytes]:
        self._done(request.tarea_id)
        return self._succeeded(outcome, request, sampled, started)

    def _async_failed(
        self, failure: Failure, request: wire.TaskRequest, sampled: bool, started: float
    ) -> Optional[bytes]:
        self._done(request.tarea_id)
        return self._failed(failure, request, sampled, started)

    def _control(self, request: wire.ControlRequest) -> bytes:
        if request.op == "ping":
            return wire.encode_control(request.tarea_id, "pong")
        return wire.encode_control(request.tarea_id, self.orchestrator.registry.describe())

    def _succeeded(
        self, outcome: Any, request: wire.TaskRequest, sampled: bool = False,
        started: float = 0.0,
    ) -> Optional[bytes]:
        if self.closed:
            return None
        try:
            reply = wire.encode_ok(request.tarea_id, outcome[0], outcome[1])
        except Exception:
            return self._failed(Failure(), request, sampled, started)
        if sampled:
            self._log_task(request, outcome[1], "ok", started)
        return reply

    def _failed(
        self, failure: Failure, request: wire.TaskRequest, sampled: bool = False,
        started: float = 0.0,
    ) -> Optional[bytes]:
        """
        The one place where a failed task becomes a wire error.
        """
        tarea_id = request.tarea_id
        error: Pfo3Error
        # A task pfo3 cancelled (timeout, shutdown) gets the reason recorded
        # before cancelling, whatever exception its canceller raised.
        reason = self._cancel_reasons.pop(tarea_id, None)
        if reason is not None:
            error = reason
        elif self.closed and failure.check(CancelledError):
            return None  # cancelled because its client left: nobody to tell
        elif failure.check(Pfo3Error):
            error = failure.value
        else:
            log.failure(
                "Task {tarea_id} ({tipo}) raised an unexpected exception",
                failure, tarea_id=tarea_id, tipo=request.tasktype.name, peer=self.peer,
            )
            error = InternalError("Error interno al ejecutar la tarea.", tarea_id)
        if sampled:
            self._log_task(request, None, error.codigo, started)
        if self.closed:
            return None
        return wire.encode_error(error, tarea_id)

    def _done(self, tarea_id: str) -> None:
        del self._pending[tarea_id]
        self.orchestrator._finished()

    def _log_task(
        self, request: wire.TaskRequest, worker: Any, estado: str, started: float
    ) -> None:
        log.info(
            "tarea {tarea_id} tipo={tipo} worker={worker} estado={estado} "
            "duracion={duration:.6f}s peer={peer}",
            tarea_id=request.tarea_id, tipo=request.tasktype.name, worker=worker,
            estado=estado, duration=self.orchestrator.clock.seconds() - started,
            peer=self.peer,
        )

    def cancel_all(self, reason: Optional[Pfo3Error] = None) -> None:
        """
        Cancel every task of this session still in flight.

        @param reason: The error their clients get; L{None} to answer nothing
            (the connection is gone).
        """
        for tarea_id, d in list(self._pending.items()):
            if reason is not None:
                self._cancel_reasons[tarea_id] = type(reason)(reason.mensaje, tarea_id)
            d.cancel()

    def close(self) -> None:
        """
        The connection is gone: cancel its tasks and drop their results.
        """
        self.closed = True
        self.cancel_all()
        self.orchestrator._sessions.discard(self)
