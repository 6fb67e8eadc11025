"""
Orchestration: the policy between a decoded request and its executor.

An L{Orchestrator} is shared by every connection of a server; each connection
gets a L{Session} from it.  A session takes a decoded request
(L{pfo3.wire.TaskRequest} or L{pfo3.wire.ControlRequest}) and answers with a
reply object (L{pfo3.wire.TaskResult}, L{pfo3.wire.ControlResult}): at once
when the task ran inline, or as a L{Deferred} of it.  A refusal raises, and a
failed task fails its Deferred with, a L{pfo3.errors.Pfo3Error}: this module
is the one place where an unexpected exception, a timeout or a shutdown
becomes an error code.  Nothing here knows about bytes or sockets.

A task's reply is a Deferred of the session's own, separate from the
executor's: a timeout or a shutdown answers the client at once, then gives up
on the work (cancels the executor's Deferred), whatever that work or its
canceller then do.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple, Union

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from pfo3 import wire
from pfo3.auth import ANONYMOUS_IDENTITY, IAuthenticator, Identity, OpenAuthenticator, RateLimiter
from pfo3.blobs.requests import BlobPolicy, blob_request
from pfo3.errors import (
    Busy,
    DuplicateTaskId,
    ExceedsTimeout,
    Forbidden,
    InternalError,
    MissingToken,
    Pfo3Error,
    ShuttingDown,
    TaskIdInUse,
    TaskNotFound,
    TaskTimeout,
    error_from_reply,
)
from pfo3.executor import IExecutor
from pfo3.store import (
    ABANDONED,
    ANONYMOUS,
    ERROR,
    OK,
    REPLAYABLE,
    RUNNING,
    TIMEOUT,
    IStore,
    Record,
)
from pfo3.tally import Tally, estado_of
from pfo3.tasks import TaskRegistry

#: What L{Session.handle} answers: a reply, or a Deferred of one.
MaybeDeferredReply = Union[wire.Reply, "Deferred[wire.Reply]"]

log = Logger(namespace="pfo3")


class Orchestrator:
    """
    Limits, timeouts and bookkeeping shared by all connections.

    @ivar active: Tasks accepted and not yet answered, over all connections.
    @ivar draining: Once true, new tasks are refused with C{apagando}.
    @ivar completed: Tasks answered since start.
    """

    def __init__(
        self,
        registry: TaskRegistry,
        executor: IExecutor,
        clock: IReactorTime,
        timeout: float = 30.0,
        max_tasks: int = 50_000,
        log_every: int = 0,
        store: Optional[IStore] = None,
        authenticator: Optional[IAuthenticator] = None,
        rate: float = 0.0,
        blobs: Optional[BlobPolicy] = None,
    ) -> None:
        """
        @param registry: The task types accepted.
        @param executor: Runs the tasks (see L{pfo3.executor.IExecutor}).
        @param clock: Drives task timeouts.
        @param timeout: Seconds a task may take before it is cancelled.  A
            task that declares its duration must declare less than this.
        @param max_tasks: Tasks in flight over all connections (counting
            blocking work still running after its client was answered) past
            which new ones are refused with C{ocupado}.
        @param log_every: Log one structured event for every N-th task
            (C{0}: none; C{1}: all).  Off by default: an event per task costs
            more than an inline task.
        @param store: Records every task (L{None}: recording off); it also
            answers C{op: estado} and durable resubmissions.
        @param authenticator: Checks tokens (L{None}: an open server, see
            L{pfo3.auth}).
        @param rate: Tasks per second each identity may start when its
            token sets no C{tasa} (C{0}: unlimited).
        @param blobs: Object storage for large contents and results
            (L{None}: off; C{docs/blobs.md}).  With a C{store} too, the
            objects a record holds are deleted when the store forgets it.
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
        self.store = store
        self._authenticator: IAuthenticator = authenticator or OpenAuthenticator()
        self.limiter = RateLimiter(clock.seconds, rate)
        self.blobs = blobs
        if store is not None and blobs is not None:
            store.on_forget = blobs.forget
        # Durable tasks (sent with "esperar") of this orchestrator not yet
        # answered, by (owner, tarea_id): a resubmission attaches to them.
        self._jobs: Dict[Tuple[str, str], _Durable] = {}
        self._counter = itertools.count(1)
        self._sessions: Set[Session] = set()
        self._idle: List[Deferred[None]] = []
        # Task timeouts: every task gets the same timeout, so deadlines come
        # in the order tasks are accepted.  One queue and one timer serve
        # them all, instead of a DelayedCall and closures per task.
        self._deadlines: Deque[Tuple[float, _Task]] = deque()
        self._timer: Optional[IDelayedCall] = None
        self._expiring = False
        # What op: stats and the metrics read (pfo3.tally, pfo3.stats).
        self.tally = Tally()
        self.started = clock.seconds()
        self.summary: Callable[[], Any] = self.task_summary

    @property
    def authenticator(self) -> IAuthenticator:
        """
        Checks tokens; fixed when the orchestrator is made, so that no
        session can start before it.
        """
        return self._authenticator

    @property
    def guarded(self) -> bool:
        """
        Whether every task goes through the identity checks, even without a
        token of its own (see L{Session._authorize}).
        """
        return bool(self._authenticator.required or self.limiter.rate)

    def session(
        self, peer: Callable[[], str] = lambda: "-", owner: str = ANONYMOUS
    ) -> Session:
        """
        @param peer: Describes the client in logs.  Called only when a log
            event needs it, so that it can see an address learnt after the
            connection was made (the PROXY protocol header).
        @param owner: Whose tasks these are in the store: the authenticated
            identity, L{ANONYMOUS} without authentication.
        @return: A new session for one connection.
        """
        s = Session(self, peer, owner)
        self._sessions.add(s)
        return s

    def _watch(self, task: _Task) -> None:
        """
        Give up on C{task} with a timeout error if it is still pending in
        C{timeout} seconds.
        """
        self._deadlines.append((self.clock.seconds() + self.timeout, task))
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
            # Re-read the queue each time: answering a task may finish others
            # (and compact the queue) or accept new ones.
            while self._deadlines and self._deadlines[0][0] <= now:
                task = self._deadlines.popleft()[1]
                if not task.done:
                    task.session._give_up(task, TaskTimeout(
                        f"La tarea superó el límite de {self.timeout:g} s y fue cancelada.",
                        task.request.tarea_id,
                    ))
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
            self._deadlines = deque(e for e in self._deadlines if not e[1].done)

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
        Give up on every task still in flight (their clients get
        C{apagando}).
        """
        for s in list(self._sessions):
            s.cancel_all(ShuttingDown("El servidor se está apagando; la tarea fue cancelada."))

    def task_summary(self) -> Dict[str, Any]:
        """
        @return: What C{op: stats} answers when nothing wider (the server's
            connections, the broker: L{pfo3.stats}) replaced L{summary}.
        """
        from pfo3.stats import orchestrator_summary

        return orchestrator_summary(self)


class _Task:
    """
    A task in flight: its request, the executor's Deferred (C{work}) and the
    Deferred of its reply.
    """

    __slots__ = ("request", "session", "work", "reply", "done", "sampled", "started", "record",
                 "owner")

    def __init__(
        self, request: wire.TaskRequest, session: Session, work: Deferred[Any],
        sampled: bool, started: float, record: Optional[Record], owner: str,
    ) -> None:
        self.owner = owner
        self.request = request
        self.session = session
        self.work = work
        self.reply: Deferred[wire.Reply] = Deferred()
        self.done = False
        self.sampled = sampled
        self.started = started
        self.record = record


class Session:
    """
    The tasks of one connection.

    @ivar owner: Whose tasks these are (see L{pfo3.store.ANONYMOUS}): the
        identity the connection authenticated as.  A request with a token of
        its own belongs to that token's identity instead.
    @ivar identity: The identity established for the whole connection
        (C{op: auth} or a client certificate), if any.
    @ivar authenticated: Whether this connection proved an identity yet
        (by C{op: auth}, a certificate or a request's own token).
    @ivar on_authenticated: Called once, when it first does.
    @ivar closed: The connection is gone; replies are no longer given.
    @ivar inflight: Tasks of this connection accepted and not yet answered:
        its tasks running, the durable tasks it waits for and its store
        lookups (C{op: estado}) not yet answered.
    """

    def __init__(
        self, orchestrator: Orchestrator, peer: Callable[[], str], owner: str = ANONYMOUS
    ) -> None:
        self.orchestrator = orchestrator
        self.owner = owner
        self.identity: Optional[Identity] = None
        self.authenticated = False
        self.on_authenticated: Optional[Callable[[], None]] = None
        self._token: Optional[str] = None
        self._guarded = orchestrator.guarded
        self._peer = peer
        self._peer_text: Optional[str] = None
        self._pending: Dict[str, _Task] = {}
        # Durable tasks whose reply this connection waits for.
        self._waiting: Dict[str, Deferred[wire.Reply]] = {}
        # A count kept as each of them starts and ends, not a property that
        # adds them up: the protocol reads it for every line it handles.
        self.inflight = 0
        self.closed = False

    @property
    def peer(self) -> str:
        """
        The client, as logs show it.
        """
        return self._peer()

    def _recorded_peer(self) -> str:
        # The address learnt first (a PROXY header comes before any task).
        text = self._peer_text
        if text is None:
            text = self._peer_text = self._peer()
        return text

    def handle(self, request: wire.Request) -> MaybeDeferredReply:
        """
        Answer one decoded request.

        @return: The reply, or a Deferred firing with it or failing with a
            L{Pfo3Error}.
        @raise Pfo3Error: if the request is refused or its task failed at
            once.
        """
        if type(request) is not wire.TaskRequest:
            if type(request) is not wire.ControlRequest:
                return blob_request(self, request)  # op subir, contenido_ref, refs
            return self._control(request)
        owner = self.owner
        if self._guarded or request.token is not None:
            owner = self._authorize(request)
        if request.esperar is not None:
            return self._durable(request, owner)
        tarea_id = request.tarea_id
        if tarea_id in self._pending or tarea_id in self._waiting:
            raise DuplicateTaskId(
                f"Ya hay una tarea en curso con tarea_id {tarea_id!r} en esta conexión.",
                tarea_id,
            )
        return self._start(request, owner)

    # -- identity -----------------------------------------------------------

    def _identify(self, request: wire.Request) -> Identity:
        """
        @return: Who sends C{request}: its own token's identity, else the
            connection's, else (on an open server) the anonymous one.
        @raise Pfo3Error: C{token_faltante}, C{token_invalido} or
            C{token_expirado}.
        """
        token = request.token or self._token
        authenticator = self.orchestrator.authenticator
        try:
            if token is not None:
                identity = authenticator.authenticate(token)
            elif self.identity is not None:
                return self.identity
            elif authenticator.required:
                raise MissingToken(
                    "Este servidor exige autenticación: envíe {\"op\": \"auth\", "
                    "\"token\": ...} o un campo 'token' con la solicitud.")
            else:
                return ANONYMOUS_IDENTITY
        except Pfo3Error as e:
            e.tarea_id = request.tarea_id
            raise
        if not self.authenticated:
            self._authenticated()
        return identity

    def _authorize(self, request: wire.TaskRequest) -> str:
        """
        Check that the sender of C{request} may run it now.

        @return: The owner of the task: its sender's identity.
        @raise Pfo3Error: C{token_*}, C{prohibido} or C{tasa_excedida}.
        """
        identity = self._identify(request)
        if not identity.allows(request.tasktype):
            raise Forbidden(
                f"La identidad {identity.name!r} no puede ejecutar tareas de tipo "
                f"{request.tasktype.name!r}.", request.tarea_id)
        self.orchestrator.limiter.take(identity, request.tarea_id)
        return identity.name

    def set_identity(self, identity: Identity, token: Optional[str] = None) -> None:
        """
        Make C{identity} the connection's: its tasks are its, checked
        against its restrictions.

        @param token: The token that proved it, checked again (expiry) with
            each request; L{None} for an identity that does not expire
            while connected (a client certificate).
        """
        self.identity = identity
        self._token = token
        self.owner = identity.name
        self._guarded = True
        if not self.authenticated:
            self._authenticated()

    def _authenticated(self) -> None:
        self.authenticated = True
        callback, self.on_authenticated = self.on_authenticated, None
        if callback is not None:
            callback()

    def _start(
        self, request: wire.TaskRequest, owner: str, durable: Optional[_Durable] = None
    ) -> MaybeDeferredReply:
        """
        Admit a task, then run it, recording it in the store.

        Admission and start are one call, not two: this runs for every task.

        @param owner: Whose task it is.
        @param durable: The durable task this is, told once it is admitted
            (L{_Durable.admitted}), before it runs; L{None} for a plain task.
        @raise Pfo3Error: if the task is refused before it runs (shutting
            down, too many tasks, declared too long), or failed at once.
        """
        orch = self.orchestrator
        tarea_id = request.tarea_id
        if orch.draining:
            raise ShuttingDown("El servidor se está apagando y no acepta tareas nuevas.", tarea_id)
        busy = orch.active + orch.executor.abandoned
        if busy >= orch.max_tasks:
            raise Busy(
                f"Servidor ocupado: {busy} tareas en curso. Reintente más tarde.", tarea_id)
        tasktype = request.tasktype
        if tasktype.duration is not None:
            try:
                duration = float(tasktype.duration(request.arg))
            except Exception:
                raise self._as_error(Failure(), request)
            if duration >= orch.timeout:
                raise ExceedsTimeout(
                    f"La tarea duraría {duration:g} s; debe durar menos que el "
                    f"límite de {orch.timeout:g} s.",
                    tarea_id,
                )
        huella = None
        if durable is not None:
            huella = durable.huella
            durable.admitted(self)
        store = orch.store
        sampled = False
        started = 0.0
        if orch.log_every:
            sampled = next(orch._counter) % orch.log_every == 0
            started = orch.clock.seconds()
        try:
            outcome = orch.executor.run(
                tasktype, request.arg, owner, None if store is None else tarea_id,
                None if durable is None else durable.taken)
        except Exception:
            orch.completed += 1
            error = self._as_error(Failure(), request)
            orch.tally.other[(tasktype.name, estado_of(error))] += 1
            if sampled:
                self._log_task(request, None, error.codigo, started, owner)
            if store is not None:
                now = orch.clock.seconds()
                store.record(Record(
                    owner, tarea_id, tasktype.name, request.arg, ERROR,
                    self._recorded_peer(), now, now, now, None, None, error.codigo,
                    error.mensaje, huella,
                ))
            raise error
        if type(outcome) is tuple:
            orch.completed += 1
            orch.tally.ok[tasktype.name] += 1
            if sampled:
                self._log_task(request, outcome[1], "ok", started, owner)
            if store is not None:
                store.record_done(
                    owner, tarea_id, tasktype.name, request.arg, outcome[0], outcome[1],
                    self._peer_text or self._recorded_peer(), orch.clock.seconds(), huella,
                )
            return wire.TaskResult(tarea_id, outcome[0], outcome[1])

        work: Deferred[Any] = outcome  # type: ignore[assignment]
        record = None
        if store is not None:
            now = orch.clock.seconds()
            record = Record(
                owner, tarea_id, tasktype.name, request.arg, RUNNING,
                self._recorded_peer(), now, now, None, None, None, None, None, huella,
            )
            store.record(record)
        if not sampled:
            started = orch.clock.seconds()
        task = _Task(request, self, work, sampled, started, record, owner)
        orch.active += 1
        self._pending[tarea_id] = task
        self.inflight += 1
        orch._watch(task)
        work.addCallbacks(self._work_ok, self._work_failed, callbackArgs=(task,),
                          errbackArgs=(task,))
        return task.reply

    def _control(self, request: wire.ControlRequest) -> MaybeDeferredReply:
        op = request.op
        if op == "ping":
            return wire.ControlResult(request.tarea_id, "pong")
        if op == "auth":
            return self._auth(request)
        owner = self.owner
        if self._guarded or request.token is not None:
            owner = self._identify(request).name
        if op == "estado":
            return self._estado(request, owner)
        if op == "stats":
            return self._stats(request)
        return wire.ControlResult(request.tarea_id, self.orchestrator.registry.describe())

    def _auth(self, request: wire.ControlRequest) -> wire.ControlResult:
        """
        C{op: auth}: the token's identity becomes the connection's.
        """
        token = request.token
        assert token is not None  # the wire refuses op: auth without one
        identity = self._identify(request)
        self.set_identity(identity, token)
        return wire.ControlResult(request.tarea_id, {
            "identidad": identity.name or None, "expira": identity.expira,
        })

    def _estado(self, request: wire.ControlRequest, owner: str) -> MaybeDeferredReply:
        """
        The recorded state of one of C{owner}'s tasks: a durable task in
        flight here, else what the store has.
        """
        tarea_id = request.tarea_id
        assert tarea_id is not None
        orch = self.orchestrator
        job = orch._jobs.get((owner, tarea_id))
        if job is not None:
            return wire.StateResult(tarea_id, job.describe())
        store = orch.store
        if store is None:
            raise _not_found(tarea_id)

        def found(record: Optional[Record]) -> wire.Reply:
            if record is None:
                raise _not_found(tarea_id)
            return wire.StateResult(tarea_id, record.describe())

        d: Deferred[Any] = store.get(owner, tarea_id)
        d.addCallback(found)
        if not d.called:
            self.inflight += 1
            d.addBoth(self._looked_up)
        return d

    def _looked_up(self, result: Any) -> Any:
        self.inflight -= 1
        return result

    def _durable(self, request: wire.TaskRequest, owner: str) -> Deferred[wire.Reply]:
        """
        A task sent with C{esperar}: it belongs to its owner, not to this
        connection.  A resubmission of one in flight here attaches to it;
        one the store holds as finished gets the recorded reply.
        """
        tarea_id = request.tarea_id
        if tarea_id in self._pending or tarea_id in self._waiting:
            raise DuplicateTaskId(
                f"Ya hay una tarea en curso con tarea_id {tarea_id!r} en esta conexión.",
                tarea_id,
            )
        orch = self.orchestrator
        if orch.draining:
            raise ShuttingDown("El servidor se está apagando y no acepta tareas nuevas.", tarea_id)
        huella = fingerprint(request)
        key = (owner, tarea_id)
        job = orch._jobs.get(key)
        new = job is None
        if job is None:
            job = orch._jobs[key] = _Durable(orch, key, request, self._peer, huella)
        elif job.huella != huella:
            raise _in_use(tarea_id)
        d = job.wait(bool(request.esperar))
        if new:
            job.start()
        if not d.called:
            self._waiting[tarea_id] = d
            self.inflight += 1
            d.addBoth(self._unwait, tarea_id)
        return d

    def _unwait(self, result: Any, tarea_id: str) -> Any:
        if self._waiting.pop(tarea_id, None) is not None:
            self.inflight -= 1
        return result

    def _work_ok(self, outcome: Any, task: _Task) -> None:
        if not task.done:
            request = task.request
            self._finish(task, wire.TaskResult(request.tarea_id, outcome[0], outcome[1]))

    def _work_failed(self, failure: Failure, task: _Task) -> None:
        if not task.done:
            self._finish(task, self._as_error(failure, task.request))
        # else: given up on (timeout, client gone, shutdown) and answered
        # already; the cancellation or a late failure ends here.

    def _finish(self, task: _Task, reply: Union[wire.Reply, Pfo3Error, None]) -> None:
        """
        Account for a task that is over, then give its reply (none when
        C{reply} is L{None}).
        """
        task.done = True
        request = task.request
        del self._pending[request.tarea_id]
        self.inflight -= 1
        orch = self.orchestrator
        record = task.record
        if record is not None and orch.store is not None:
            record.terminada = orch.clock.seconds()
            if isinstance(reply, wire.TaskResult):
                record.estado = OK
                record.resultado = reply.resultado
                record.worker = reply.worker
            elif reply is None:
                record.estado = ABANDONED
            else:
                assert isinstance(reply, Pfo3Error)
                record.codigo = reply.codigo
                record.mensaje = reply.mensaje
                if isinstance(reply, TaskTimeout):
                    record.estado = TIMEOUT
                elif isinstance(reply, ShuttingDown):
                    record.estado = ABANDONED
                else:
                    record.estado = ERROR
            orch.store.record(record)
        # Last: once no task is in flight, a stopping server flushes the store.
        orch._finished()
        now = orch.clock.seconds()
        orch.tally.ended(request.tasktype.name, estado_of(reply), now - task.started, now)
        if task.sampled:
            if isinstance(reply, wire.TaskResult):
                self._log_task(request, reply.worker, "ok", task.started, task.owner)
            else:
                estado = reply.codigo if isinstance(reply, Pfo3Error) else "abandonada"
                self._log_task(request, None, estado, task.started, task.owner)
        if reply is None:
            return
        if isinstance(reply, Pfo3Error):
            task.reply.errback(Failure(reply))
        else:
            task.reply.callback(reply)

    def _give_up(self, task: _Task, reason: Optional[Pfo3Error]) -> None:
        """
        Answer C{task} with C{reason} (nothing when L{None}) and cancel its
        work.  A canceller that raises is logged: it cannot keep the task
        from being answered nor stop later timeouts.
        """
        self._finish(task, reason)
        try:
            task.work.cancel()
        except Exception:
            log.failure(
                "Cancelling task {tarea_id} ({tipo}) raised an exception",
                tarea_id=task.request.tarea_id, tipo=task.request.tasktype.name,
                peer=self.peer,
            )

    def _as_error(self, failure: Failure, request: wire.TaskRequest) -> Pfo3Error:
        """
        The one place where a failed task becomes a protocol error: a
        L{Pfo3Error} is the task's own; anything else is logged with its
        traceback and becomes C{error_interno}.
        """
        tarea_id = request.tarea_id
        error = failure.value
        if isinstance(error, Pfo3Error):
            if error.tarea_id is None:
                error.tarea_id = tarea_id
            return error
        log.failure(
            "Task {tarea_id} ({tipo}) raised an unexpected exception",
            failure, tarea_id=tarea_id, tipo=request.tasktype.name, peer=self.peer,
        )
        return InternalError("Error interno al ejecutar la tarea.", tarea_id)

    def _log_task(
        self, request: wire.TaskRequest, worker: Any, estado: str, started: float, owner: str
    ) -> None:
        log.info(
            "tarea {tarea_id} tipo={tipo} worker={worker} estado={estado} "
            "duracion={duration:.6f}s peer={peer} identidad={identity}",
            tarea_id=request.tarea_id, tipo=request.tasktype.name, worker=worker,
            estado=estado, duration=max(0.0, self.orchestrator.clock.seconds() - started),
            peer=self.peer, identity=owner or "-",
        )

    def cancel_all(self, reason: Optional[Pfo3Error] = None) -> None:
        """
        Give up on every task of this session still in flight.

        @param reason: The error their clients get; L{None} to answer nothing
            (the connection is gone).
        """
        for task in list(self._pending.values()):
            if not task.done:
                why = None
                if reason is not None:
                    why = type(reason)(reason.mensaje, task.request.tarea_id)
                self._give_up(task, why)

    def close(self) -> None:
        """
        The connection is gone: give up on its tasks, answering nothing.
        Durable tasks it waited for go on (their replies go nowhere).
        """
        self.closed = True
        self.inflight -= len(self._waiting)
        self._waiting.clear()
        self.cancel_all()
        self.orchestrator._sessions.discard(self)

    def _stats(self, request: wire.ControlRequest) -> MaybeDeferredReply:
        """
        C{op: stats}: the server's summary (L{Orchestrator.summary}), which
        may take a round trip to the broker.
        """
        summary = self.orchestrator.summary()
        if type(summary) is not Deferred:
            return wire.ControlResult(request.tarea_id, summary)
        d: Deferred[Any] = summary
        d.addCallback(lambda s: wire.ControlResult(request.tarea_id, s))
        if not d.called:
            self.inflight += 1
            d.addBoth(self._looked_up)
        return d


def fingerprint(request: wire.TaskRequest) -> str:
    """
    @return: What identifies a durable task besides its C{tarea_id}: its
        C{tipo} and C{contenido}, hashed.
    """
    text = json.dumps([request.tasktype.name, request.arg], sort_keys=True,
                      ensure_ascii=False, default=repr)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _not_found(tarea_id: str) -> TaskNotFound:
    return TaskNotFound(f"No hay registro de la tarea {tarea_id!r}.", tarea_id)


def _in_use(tarea_id: str) -> TaskIdInUse:
    return TaskIdInUse(
        f"La tarea {tarea_id!r} ya existe con otro tipo o contenido; use otro tarea_id.",
        tarea_id,
    )


def replay(record: Record) -> Union[wire.TaskResult, Pfo3Error]:
    """
    @return: The reply recorded for a finished task: the same shape as the
        first reply (C{resultado}, or C{resultado_ref} for a result stored as
        an object), from every store.
    """
    if record.estado == OK:
        return wire.TaskResult(record.tarea_id, record.resultado, record.worker)
    return error_from_reply(
        {"codigo": record.codigo, "mensaje": record.mensaje, "tarea_id": record.tarea_id})


class _Durable:
    """
    A durable task (sent with C{esperar}) of this orchestrator, from its
    first submission until it is answered: it runs once, in a session of its
    own that no connection closes, and every client that submitted it (or
    resubmitted it meanwhile) gets the reply.

    @ivar ran: Whether it was admitted and started here (as opposed to
        refused, or answered from the store).
    """

    def __init__(
        self, orchestrator: Orchestrator, key: Tuple[str, str], request: wire.TaskRequest,
        peer: Callable[[], str], huella: str,
    ) -> None:
        self.orchestrator = orchestrator
        self.key = key
        self.request = request
        self.peer = peer
        self.huella = huella
        self.ran = False
        self.safe = False
        self.record: Optional[Record] = None
        self._accepted: List[Deferred[wire.Reply]] = []
        self._final: List[Deferred[wire.Reply]] = []
        self._session: Optional[Session] = None

    def describe(self) -> Dict[str, Any]:
        """
        @return: Its state for C{op: estado}.
        """
        if self.record is not None:
            return self.record.describe()
        return {"estado": RUNNING if self.ran else "aceptada",
                "tipo": self.request.tasktype.name}

    def wait(self, esperar: bool) -> Deferred[wire.Reply]:
        """
        @param esperar: C{False} to be answered C{aceptada} once it runs.
        @return: A Deferred of this client's reply.
        """
        d: Deferred[wire.Reply] = Deferred()
        if esperar:
            self._final.append(d)
        elif self.safe:
            d.callback(wire.AcceptedResult(self.request.tarea_id))
        else:
            self._accepted.append(d)
        return d

    def start(self) -> None:
        """
        Look for an earlier run in the store, then replay it or run.
        """
        store = self.orchestrator.store
        if store is None:
            self._run()
            return
        d = store.get(*self.key)
        d.addCallbacks(self._found, self._lookup_failed)

    def _lookup_failed(self, failure: Failure) -> None:
        log.warn("Durable task {tarea_id}: store lookup failed ({error}); running it",
                 tarea_id=self.request.tarea_id, error=failure.getErrorMessage())
        self._run()

    def _found(self, record: Optional[Record]) -> None:
        if record is not None and record.huella is not None:
            if record.huella != self.huella:
                self._answer(_in_use(self.request.tarea_id))
                return
            if record.estado in REPLAYABLE:
                reply = replay(record)
                policy = self.orchestrator.blobs
                if (policy is not None and type(reply) is wire.TaskResult
                        and type(reply.resultado) is wire.ResultRef):
                    # The recorded URL may have expired: sign it again.
                    tarea_id, worker = reply.tarea_id, reply.worker
                    d = policy.refresh(reply.resultado)
                    d.addCallback(lambda ref: self._answer(wire.TaskResult(tarea_id, ref, worker)))
                    return
                self._answer(reply)
                return
        self._run()

    def _run(self) -> None:
        orch = self.orchestrator
        request = self.request
        session = Session(orch, self.peer, self.key[0])
        try:
            reply = session._start(request, self.key[0], self)
        except Pfo3Error as e:
            self._answer(e)
            return
        if type(reply) is not Deferred:
            self._answer(reply)  # type: ignore[arg-type]
            return
        task = session._pending.get(request.tarea_id)
        self.record = task.record if task is not None else None
        reply.addCallbacks(self._answer, self._failed)

    def taken(self) -> None:
        """
        The executor has the task in its safekeeping (in distributed mode:
        the broker confirmed it): the clients that asked not to wait are
        answered C{aceptada} now, not before.
        """
        self.safe = True
        accepted, self._accepted = self._accepted, []
        for d in accepted:
            d.callback(wire.AcceptedResult(self.request.tarea_id))

    def admitted(self, session: Session) -> None:
        """
        The task was admitted and runs now, in C{session}.
        """
        self.ran = True
        self.orchestrator._sessions.add(session)
        self._session = session

    def _failed(self, failure: Failure) -> None:
        error = failure.value
        if not isinstance(error, Pfo3Error):
            log.failure("Durable task {tarea_id} failed unexpectedly", failure,
                        tarea_id=self.request.tarea_id)
            error = InternalError("Error interno al ejecutar la tarea.", self.request.tarea_id)
        self._answer(error)

    def _answer(self, reply: Union[wire.Reply, Pfo3Error]) -> None:
        """
        Answer every client of this task: those that asked not to wait and
        are still waiting (the executor never said it had the task) get
        C{aceptada} if it ran here and succeeded, the recorded reply or the
        refusal otherwise; the others get its reply.
        """
        orch = self.orchestrator
        if orch._jobs.get(self.key) is self:
            del orch._jobs[self.key]
        if self._session is not None:
            orch._sessions.discard(self._session)
        accepted, self._accepted = self._accepted, []
        final, self._final = self._final, []
        tarea_id = self.request.tarea_id
        for d in accepted:
            if self.ran and not isinstance(reply, Pfo3Error):
                d.callback(wire.AcceptedResult(tarea_id))
            else:
                _give(d, reply)
        for d in final:
            _give(d, reply)


def _give(d: Deferred[wire.Reply], reply: Union[wire.Reply, Pfo3Error]) -> None:
    if isinstance(reply, Pfo3Error):
        d.errback(Failure(reply))
    else:
        d.callback(reply)
