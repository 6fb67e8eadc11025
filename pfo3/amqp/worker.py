"""
The worker process of the distributed mode (C{twistd pfo3-worker}).

It consumes the task queue, at most C{capacity} unacknowledged messages at
a time (the channel's prefetch; each one task or a batch), runs each task
with the very same task registry and L{LocalExecutor} as local mode (so
C{sleep} is a timer here too), and answers on the task's C{reply_to},
echoing the task's record key when it has one (C{pfo3.amqp.messages}: so
that the orchestrator started again after a crash can record the
outcome).  It acknowledges a task only once the
broker confirmed its reply: a worker that dies before that leaves the task
to be delivered again, to another worker (at least once); the orchestrator
drops the duplicate reply.  A task delivered too many times is
dead-lettered by the broker; workers consume the dead letters and answer
their clients C{reintentos_agotados}.

Tasks come one to a message or in batches (C{pfo3.amqp.batches}); a batch
is acknowledged once each of its tasks is answered, and a batch delivered
again goes back to the queue split into messages of its own (a task that
kills its workers is then dead-lettered alone).  The replies of one
reactor turn to one orchestrator go out as one batch.

Cancellations (published by an orchestrator that gave up on a task) drop a
task not yet started and cancel a running one; a task whose message expired
is never delivered.  On stop (SIGTERM) the worker stops consuming, finishes
and acknowledges what it holds (within the shutdown timeout), and exits.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Optional, Union

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from pfo3.amqp import messages
from pfo3.amqp.batches import Batcher, Part, SharedAck
from pfo3.amqp.connection import (
    QUEUE_FULL,
    Broker,
    Delivery,
    IChannel,
    OrderedAcks,
    Refused,
    Unroutable,
)
from pfo3.amqp.topology import DEATH_REASON, Topology
from pfo3.errors import Busy, DeliveryLimit, InternalError, Pfo3Error, TaskTimeout
from pfo3.executor import IExecutor
from pfo3.store import ABANDONED, ERROR, OK
from pfo3.tally import Tally, estado_of
from pfo3.tasks import TaskRegistry
from pfo3.wire import RefArg

log = Logger(namespace="pfo3.worker")

#: Correlation ids of cancelled tasks remembered, in case their message
#: arrives after the cancellation.
MAX_CANCELLED = 100_000


class _Held:
    """
    A task this worker received and has not acknowledged.
    """

    __slots__ = ("delivery", "channel", "work", "cancelled", "timer", "identity", "tipo",
                 "started", "tarea_id")

    def __init__(
        self, delivery: Delivery, channel: Union[IChannel, Part], started: float = 0.0,
    ) -> None:
        self.identity = ""
        #: Its id in its orchestrator's store (L{None}: not recorded), echoed
        #: in the reply with C{identity}.
        self.tarea_id: Optional[str] = None
        self.tipo = "-"
        self.started = started
        self.delivery = delivery
        self.channel = channel
        self.work: Optional[Deferred[Any]] = None
        self.cancelled = False
        self.timer: Any = None


class WorkerService(Service):
    """
    Consumes tasks from the broker and runs them locally.

    @ivar held: Tasks received and not yet acknowledged, by correlation id.
    @ivar completed: Tasks answered since start.
    """

    def __init__(
        self, reactor: Any, url: str, topology: Topology, registry: TaskRegistry,
        executor: IExecutor, name: str, capacity: int = 64, timeout: float = 30.0,
        shutdown_timeout: float = 10.0, broker: Optional[Broker] = None,
    ) -> None:
        """
        @param capacity: Messages held at once (the channel's prefetch):
            each one task or a batch of inline tasks
            (C{pfo3.amqp.batches}).
        @param timeout: Seconds a task may run here before it is cancelled
            (its orchestrator has answered C{timeout} by then).
        @param broker: A connection to use instead of a new one to C{url}
            (its setup must be L{setup}).
        """
        self.reactor = reactor
        self.topology = topology
        self.registry = registry
        self.executor = executor
        self.worker_name = name
        self.capacity = capacity
        self.timeout = timeout
        self.shutdown_timeout = shutdown_timeout
        self.broker = broker or Broker(reactor, url, topology, self.setup, prefetch=capacity)
        self.broker.on_lost(self._lost)
        self.held: Dict[str, _Held] = {}
        self.completed = 0
        # What the worker's metrics read (pfo3.tally, pfo3.metrics).
        self.tally = Tally()
        self.started = reactor.seconds()
        self._unacked = 0  # replies published and not yet confirmed
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._consumers: List[str] = []
        self._channel: Optional[IChannel] = None
        self._acks: Optional[OrderedAcks] = None
        self._stopping = False
        self._idle: List[Deferred[None]] = []
        self._replies = Batcher(reactor, lambda: self._channel)

    def startService(self) -> None:
        super().startService()
        self.executor.start()
        self.broker.startService()
        log.info("pfo3-worker {name} started: {workers} threads, holds up to {capacity} tasks, "
                 "task types: {tipos}", name=self.worker_name, workers=self.executor.workers,
                 capacity=self.capacity, tipos=", ".join(t.name for t in self.registry))

    def setup(self, raw_channel: Any, channel: IChannel) -> Deferred[Any]:
        """
        Bind a private queue to the cancellation exchange and consume it,
        the dead letters and the tasks (each time a connection is made).
        """
        # Acknowledgements go out once per reactor turn, several at once
        # where the order of delivery allows (every consumer starts here).
        channel = self._acks = OrderedAcks(channel, self.reactor)
        self._channel = channel
        self._consumers = []
        t = self.topology
        d: Deferred[Any] = raw_channel.queue_declare("", exclusive=True, auto_delete=True)

        def bind(frame: Any) -> Deferred[Any]:
            queue = frame.method.queue
            b: Deferred[Any] = raw_channel.queue_bind(queue, t.cancellations, routing_key="")
            return b.addCallback(lambda _: channel.consume(
                queue, lambda m: self._on_cancel(channel, m)))

        d.addCallback(bind)
        d.addCallback(lambda _: channel.consume(t.dead, lambda m: self._on_dead(channel, m)))
        d.addCallback(self._consuming)
        d.addCallback(lambda _: channel.consume(t.tasks, lambda m: self._on_task(channel, m)))
        return d.addCallback(self._consuming)

    def _consuming(self, tag: str) -> None:
        self._consumers.append(tag)

    # -- tasks ----------------------------------------------------------------

    def _on_task(self, channel: IChannel, delivery: Delivery) -> None:
        if self._stopping:
            # Arriving while stopping: back to the queue, for another worker.
            log.debug("Dropping task {id}: stopping", id=delivery.correlation_id)
            channel.reject(delivery.tag, requeue=True)
            return
        items, batch = messages.items_of(delivery.body, delivery.correlation_id)
        if not batch:
            self._start(channel, delivery, items[0][1])
            return
        if delivery.redelivered and len(items) > 1:
            self._split(channel, delivery, items)
            return
        shared = SharedAck(channel, len(items))
        for correlation_id, item in items:
            self._start(shared.part(), _item(delivery, correlation_id), item)

    def _split(self, channel: IChannel, delivery: Delivery, items: List[messages.Item]) -> None:
        """
        A batch delivered again (a worker may have died of one of its
        tasks): its tasks go back to the queue each as a message of its own,
        and the batch is acknowledged once the broker has them all.  Each
        lives as long again as the batch had to live: a late reply is
        dropped by its orchestrator.  A task the queue refuses (it is full)
        is answered C{ocupado}; one that cannot go back as it came (not
        readable) is answered its error here.  If the channel closes first,
        the batch is delivered again, and split again.  The publishes count
        as replies in flight (a stopping worker waits for them).
        """
        log.info("A batch of {n} tasks came again; its tasks go back one by one",
                 n=len(items))
        shared = SharedAck(channel, len(items))
        for correlation_id, item in items:
            part, one = shared.part(), _item(delivery, correlation_id)
            if correlation_id in self._cancelled:
                part.ack(delivery.tag)
                continue
            if isinstance(item, messages.BadMessage):
                self._start(part, one, item)  # answered its error
                continue
            try:
                body = messages.encode_item(item)
            except ValueError as e:  # JSON that cannot be written back (NaN)
                self._start(part, one, messages.BadMessage(str(e)))
                continue
            self._unacked += 1
            d = channel.publish(self.topology.tasks, body, correlation_id,
                                reply_to=delivery.reply_to, expiration=delivery.expiration)
            d.addCallbacks(lambda _, part=part: part.ack(delivery.tag), self._not_split,
                           errbackArgs=(channel, part, one))
            d.addBoth(self._published)

    def _not_split(self, f: Failure, channel: IChannel, part: Part, one: Delivery) -> None:
        if f.check(Refused):
            self._fail(_Held(one, part), Busy(QUEUE_FULL))
        elif channel is self._channel:
            # Not a lost channel: the broker would not take it (no task
            # queue).  Answered, so that the batch is settled.
            log.error("Task {id} of a batch could not go back to the queue: {why}",
                      id=one.correlation_id, why=f.getErrorMessage())
            self._fail(_Held(one, part), InternalError(
                "Error interno: la tarea no pudo volver a la cola del broker."))
        else:
            log.warn("Could not put task {id} of a batch back in the queue ({why}); the "
                     "batch will be delivered again", id=one.correlation_id,
                     why=f.getErrorMessage())

    def _published(self, ignored: Any) -> None:
        self._unacked -= 1
        self._check_idle()

    def _start(
        self, channel: Union[IChannel, Part], delivery: Delivery,
        task: Union[Dict[str, Any], messages.BadMessage],
    ) -> None:
        """
        Run a task (C{task}: the message's object, or what is wrong with it).
        """
        correlation_id = delivery.correlation_id or ""
        if correlation_id in self._cancelled:
            # Given up on before it started.
            log.debug("Dropping task {id}: cancelled", id=correlation_id)
            channel.ack(delivery.tag)
            return
        held = _Held(delivery, channel, self.reactor.seconds())
        try:
            tipo, contenido, held.identity, held.tarea_id = messages.task_of(task)
            held.tipo = str(tipo)
            tasktype = self.registry.lookup(tipo)
            # Content in an object is read and validated by the executor
            # (pfo3.blobs.executor.BlobExecutor), not here.
            arg = contenido if type(contenido) is RefArg else tasktype.validate(contenido)
            outcome = self.executor.run(tasktype, arg, held.identity)
        except Pfo3Error as e:
            self._count(held, ERROR)
            self._fail(held, e)
            return
        except messages.BadMessage as e:
            log.error("Dropping an unreadable task message {id}: {why}", id=correlation_id,
                      why=e)
            self._count(held, ERROR)
            self._fail(held, InternalError("Error interno: mensaje de tarea ilegible."))
            return
        except Exception:
            log.failure("Task {id} raised an unexpected exception", id=correlation_id,
                        identity=held.identity or "-")
            self._count(held, ERROR)
            self._fail(held, InternalError("Error interno al ejecutar la tarea."))
            return
        if type(outcome) is tuple:
            self._succeeded(outcome, held)
            return
        work: Deferred[Any] = outcome  # type: ignore[assignment]
        held.work = work
        held.timer = self.reactor.callLater(self.timeout, self._expire, held)
        self.held[correlation_id] = held
        work.addCallbacks(self._succeeded, self._failed, callbackArgs=(held,),
                          errbackArgs=(held,))

    def _succeeded(self, outcome: Any, held: _Held) -> None:
        self._settle(held)
        if held.cancelled:
            held.channel.ack(held.delivery.tag)
            return
        self._count(held, OK)
        worker = f"{self.worker_name}/{outcome[1]}"
        try:
            body = messages.encode_result(outcome[0], worker, held.identity, held.tarea_id)
        except ValueError:
            log.failure("Task {id}: result is not JSON", id=held.delivery.correlation_id)
            self._fail(held, InternalError(
                "Error interno: el resultado no se puede enviar como JSON."))
            return
        self._answer(held, body)

    def _failed(self, failure: Failure, held: _Held) -> None:
        self._settle(held)
        if held.cancelled:
            held.channel.ack(held.delivery.tag)
            return
        self._count(held, estado_of(failure.value))
        if failure.check(Pfo3Error):
            error = failure.value
        else:
            log.failure("Task {id} raised an unexpected exception", failure,
                        id=held.delivery.correlation_id, identity=held.identity or "-")
            error = InternalError("Error interno al ejecutar la tarea.")
        self._fail(held, error)

    def _settle(self, held: _Held) -> None:
        self.held.pop(held.delivery.correlation_id or "", None)
        if held.timer is not None and held.timer.active():
            held.timer.cancel()

    def _expire(self, held: _Held) -> None:
        held.timer = None
        self._cancel(held, TaskTimeout(
            f"La tarea superó el límite de {self.timeout:g} s en el worker."))

    def _cancel(self, held: _Held, reason: Optional[Pfo3Error] = None) -> None:
        held.cancelled = reason is None
        if held.work is not None and not held.work.called:
            try:
                held.work.cancel()
            except Exception:
                log.failure("Cancelling task {id} raised", id=held.delivery.correlation_id)
        if reason is None:
            self._count(held, ABANDONED)
        if reason is not None and held.delivery.correlation_id in self.held:
            self._settle(held)
            held.cancelled = True  # its late outcome is ignored
            self._count(held, estado_of(reason))
            self._fail(held, reason)

    def _fail(self, held: _Held, error: Pfo3Error) -> None:
        """
        Answer that the task failed with C{error}.
        """
        self._answer(held, messages.encode_failure(error, held.identity, held.tarea_id))

    def _answer(self, held: _Held, body: bytes) -> None:
        """
        Publish the reply, then acknowledge the task once the broker has the
        reply: if this process dies in between, the task is delivered again.
        """
        delivery, channel = held.delivery, held.channel
        self.completed += 1
        if not delivery.reply_to:
            channel.ack(delivery.tag)
            self._check_idle()
            return
        self._unacked += 1
        d = self._replies.publish(delivery.reply_to, body, delivery.correlation_id or "",
                                  persistent=False)

        def published(_: Any) -> None:
            channel.ack(delivery.tag)

        def not_published(f: Failure) -> None:
            if f.check(Unroutable):
                channel.ack(delivery.tag)  # its orchestrator is gone for good
            else:
                log.warn("Reply to {id} not confirmed ({why}); the task will be delivered "
                         "again", id=delivery.correlation_id, why=f.getErrorMessage())

        d.addCallbacks(published, not_published)
        d.addBoth(self._published)

    def _count(self, held: _Held, estado: str) -> None:
        now = self.reactor.seconds()
        self.tally.ended(held.tipo, estado, now - held.started, now)

    # -- cancellations and dead letters -----------------------------------------

    def _on_cancel(self, channel: IChannel, delivery: Delivery) -> None:
        channel.ack(delivery.tag)
        correlation_id = delivery.body.decode("ascii", "replace")
        log.debug("Cancelled: {id}", id=correlation_id)
        self._cancelled[correlation_id] = None
        while len(self._cancelled) > MAX_CANCELLED:
            self._cancelled.popitem(last=False)
        held = self.held.get(correlation_id)
        if held is not None:
            self._cancel(held)

    def _on_dead(self, channel: IChannel, delivery: Delivery) -> None:
        reason = delivery.headers.get(DEATH_REASON)
        if isinstance(reason, bytes):
            reason = reason.decode()
        if reason != "delivery_limit":
            channel.ack(delivery.tag)  # expired (nobody waits for it) or rejected
            return
        items, batch = messages.items_of(delivery.body, delivery.correlation_id)
        log.warn("Task {id} dead-lettered after too many deliveries",
                 id=", ".join(c for c, _ in items))
        shared = SharedAck(channel, len(items)) if batch else None
        for correlation_id, item in items:
            held = _Held(_item(delivery, correlation_id),
                         channel if shared is None else shared.part())
            try:
                held.identity, held.tarea_id = messages.task_of(item)[2:]
            except messages.BadMessage:
                pass  # answered all the same; nothing to record by
            self._fail(held, DeliveryLimit(
                f"La tarea se entregó {self.topology.delivery_limit + 1} veces sin terminar "
                "(su worker se detuvo cada vez) y se descartó."))

    # -- life ---------------------------------------------------------------------

    def _lost(self) -> None:
        # The broker delivers the unacknowledged tasks again, to whoever
        # consumes next; what runs here now would be answered twice.
        self._channel = None
        for held in list(self.held.values()):
            self._cancel(held)
        self.held.clear()
        self._check_idle()

    def _check_idle(self) -> None:
        if not self.held and not self._unacked and self._idle:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        channel = self.broker.channel
        cancels: List[Deferred[Any]] = []
        if channel is not None:
            for tag in self._consumers:
                cancels.append(channel.cancel(tag).addErrback(lambda _: None))
        d: Deferred[Any] = DeferredList(cancels)
        d.addCallback(lambda _: self._drained())
        d.addCallback(lambda _: self._flush_acks())
        d.addCallback(lambda _: self.broker.stopService())
        d.addBoth(lambda _: self.executor.stop())
        d.addBoth(lambda _: log.info("pfo3-worker {name} stopped after {n} tasks",
                                      name=self.worker_name, n=self.completed))
        return d

    def _flush_acks(self) -> None:
        # Before the connection closes: an ack written after its close is
        # lost, and the task would run again elsewhere.
        if self._acks is not None:
            self._acks.flush()

    def _drained(self) -> Deferred[None]:
        if not self.held and not self._unacked:
            return succeed(None)
        log.info("pfo3-worker stopping: finishing {n} tasks", n=len(self.held))
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        d.addTimeout(self.shutdown_timeout, self.reactor)
        return d.addErrback(lambda _: None)


def _item(batch: Delivery, correlation_id: str) -> Delivery:
    """
    @return: The delivery of one task of a batch, as its worker sees it: the
        batch's, under the task's correlation id.
    """
    return Delivery(batch.tag, b"", correlation_id, batch.reply_to, batch.headers,
                    batch.redelivered, batch.expiration)
