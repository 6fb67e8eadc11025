"""
The orchestrator's executor in distributed mode: tasks go to RabbitMQ and
their replies come back on this orchestrator's own reply queue.

A task is accepted only once the broker confirmed it (publisher confirms);
until then a refusal (a full task queue: C{ocupado}) or a lost connection
(C{broker_no_disponible}) fails it at once.  The inline tasks of one
reactor turn go out as one batch (C{pfo3.amqp.batches}), and a worker's
replies may come back batched too.  A reply is matched by
correlation id; a second reply for the same task (a worker that died after
answering, redelivered) finds nobody waiting and is dropped.  Giving up on a
task (timeout, client gone, shutdown) tells the workers through the
cancellation exchange, and its message expires in the queue with the task
timeout, so work nobody waits for is not started.

A task recorded in the store carries its record's key (its identity and
C{tarea_id}), and its reply echoes it.  A reply nobody here waits for is
then an orphan: most often a late duplicate, or the reply to a task this
orchestrator gave up on, both recorded already; but after a C{kill -9}, the
replies to the tasks the dead process had published wait in its reply
queue, and the process started again under the same name finds them there.
Its executor records the outcome of each one whose record is still
C{en_curso} in the shared store, and acknowledges it only once the store
wrote it.  A late reply to a task of this very process (its correlation id
has this executor's prefix) needs no look in the store: this process
recorded how that task ended.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pfo3.amqp import messages
from pfo3.amqp.batches import Batcher
from pfo3.amqp.connection import (
    QUEUE_FULL,
    AckBatch,
    Broker,
    Delivery,
    IChannel,
    Refused,
    Unroutable,
)
from pfo3.amqp.topology import Topology
from pfo3.errors import BrokerUnavailable, Busy, InternalError, Pfo3Error
from pfo3.executor import IExecutor, MaybeDeferredOutcome
from pfo3.stats import OldestPublished
from pfo3.store import OK, RUNNING, IStore, Record
from pfo3.tally import estado_of
from pfo3.tasks import INLINE, TaskType
from pfo3.wire import RefArg

log = Logger(namespace="pfo3.amqp")

#: Seconds before an orphan reply whose outcome the store could not take
#: goes back to the reply queue, to be tried again.
ORPHAN_RETRY = 1.0


def default_name() -> str:
    """
    @return: A name for this process, unique among those on the broker:
        host name and process id.
    """
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}"


@implementer(IExecutor)
class AMQPExecutor:
    """
    Runs tasks on the workers that consume from the broker.

    @ivar workers: Always C{0}: this process runs nothing itself.
    """

    workers = 0
    running = 0
    abandoned = 0

    def __init__(
        self, broker: Broker, topology: Topology, name: str, task_ttl: float,
        clock: Optional[IReactorTime] = None, store: Optional[IStore] = None,
    ) -> None:
        """
        @param broker: The connection to use; its setup must be
            L{AMQPExecutor.setup} (see L{from_url}).
        @param name: This orchestrator's name: its reply queue's.
        @param task_ttl: Seconds a task message may wait in the queue (the
            task timeout: after it, nobody waits for the reply).
        @param clock: When given, the publish time of each task is kept so
            that C{oldest} can tell the oldest one's age (for the metrics),
            the inline tasks of one reactor turn are published as one
            batch (L{Batcher}), and the replies handled in one turn are
            acknowledged together (L{AckBatch}); without it, each one at
            once.
        @param store: The store the orchestrator records its tasks in, when
            it outlives this process (a database): the outcomes of orphan
            replies (see the module's docstring) are recorded there, and
            task messages carry their record's key for that.  L{None}
            (no store, or one in memory that dies with the process): they
            carry none, and orphan replies are dropped.
        """
        self.broker = broker
        self.topology = topology
        self.name = name
        self.reply_queue = topology.replies(name)
        self.task_ttl = task_ttl
        self._pending: Dict[str, Deferred[Any]] = {}
        self._unconfirmed: Set[str] = set()
        # Correlation ids: a random prefix per executor (so per process and
        # per start) and a counter, instead of a uuid4 per task.
        self._id_prefix = os.urandom(8).hex() + "."
        self._ids = itertools.count(1)
        self.oldest: Optional[OldestPublished] = None
        self._acks: Optional[AckBatch] = None
        self._tasks: Optional[Batcher] = None
        self.store = store
        self._clock = clock
        #: Keys of the orphan replies being recorded now.
        self._recovering: Set[Tuple[str, str]] = set()
        #: Orphan replies not yet settled: while there are any, replies are
        #: acknowledged one by one (a multiple ack would settle them too).
        self._orphans = 0
        if clock is not None:
            self.oldest = OldestPublished(clock, self._pending)
            self._acks = AckBatch(clock)
            self._tasks = Batcher(clock, lambda: self.broker.channel)
        broker.on_lost(self._lost)

    @classmethod
    def from_url(
        cls, reactor: Any, url: str, topology: Topology, task_ttl: float, name: str = "",
        store: Optional[IStore] = None,
    ) -> AMQPExecutor:
        """
        An executor with its own L{Broker} connection to C{url}.
        """
        holder: Dict[str, AMQPExecutor] = {}
        broker = Broker(reactor, url, topology, lambda raw, ch: holder["e"].setup(raw, ch))
        executor = holder["e"] = cls(broker, topology, name or default_name(), task_ttl,
                                     clock=reactor, store=store)
        return executor

    def start(self) -> None:
        self.broker.startService()

    def stop(self) -> Deferred[None]:
        if self._tasks is not None:
            self._tasks.flush()
        if self._acks is not None:
            self._acks.flush()
        return self.broker.stopService()

    def setup(self, raw_channel: Any, channel: IChannel) -> Deferred[Any]:
        """
        Declare this orchestrator's reply queue and consume it (each time a
        connection is made).
        """
        # Durable: a broker restart keeps it, so replies to tasks redelivered
        # after the restart find it even before this orchestrator is back.
        d: Deferred[Any] = raw_channel.queue_declare(
            self.reply_queue, durable=True,
            arguments=self.topology.reply_queue_arguments())
        return d.addCallback(
            lambda _: channel.consume(self.reply_queue, lambda m: self._on_reply(channel, m)))

    def run(
        self, tasktype: TaskType, arg: Any, identity: str = "", tarea_id: Optional[str] = None,
        accepted: Optional[Callable[[], None]] = None,
    ) -> MaybeDeferredOutcome:
        channel = self.broker.channel
        if channel is None:
            raise BrokerUnavailable(
                "No hay conexión con el broker de tareas; reintente en unos segundos.")
        # The record's key travels only if this executor can complete the
        # record (its successor under this name reads the same reply queue).
        body = messages.encode_task(
            tasktype.name, arg, identity, None if self.store is None else tarea_id)
        correlation_id = f"{self._id_prefix}{next(self._ids):x}"
        d: Deferred[Any] = Deferred(lambda _: self._give_up(correlation_id))
        self._pending[correlation_id] = d
        self._unconfirmed.add(correlation_id)
        if self.oldest is not None:
            self.oldest.published(correlation_id)
        # Only tasks that run inline on the worker (microseconds, no thread,
        # no timer) share a message: those that wait or block go one to a
        # message, so that the workers' prefetch spreads them.
        publish: Callable[..., Deferred[None]] = channel.publish
        if self._tasks is not None and tasktype.mode == INLINE and type(arg) is not RefArg:
            publish = self._tasks.publish
        confirmed = publish(self.topology.tasks, body, correlation_id,
                            reply_to=self.reply_queue, expiration=self.task_ttl)
        confirmed.addCallbacks(self._confirmed, self._refused,
                               callbackArgs=(correlation_id, accepted),
                               errbackArgs=(correlation_id,))
        return d

    def _confirmed(
        self, ignored: None, correlation_id: str, accepted: Optional[Callable[[], None]],
    ) -> None:
        self._unconfirmed.discard(correlation_id)
        if accepted is not None:
            accepted()

    def _refused(self, failure: Failure, correlation_id: str) -> None:
        self._unconfirmed.discard(correlation_id)
        d = self._pending.pop(correlation_id, None)
        if d is None:
            return
        if failure.check(Refused):
            d.errback(Busy(QUEUE_FULL))
        elif failure.check(Unroutable):
            d.errback(BrokerUnavailable("El broker no tiene la cola de tareas."))
        else:
            d.errback(BrokerUnavailable(
                "Se perdió la conexión con el broker antes de que confirmara la tarea."))

    def _ack(self, channel: IChannel, tag: int) -> None:
        # Every delivery on this channel is a reply, acknowledged here in
        # the order it came (orphans aside): safe to acknowledge several at
        # once while no orphan is unsettled.
        if self._acks is not None and not self._orphans:
            self._acks.ack(channel, tag)
        else:
            channel.ack(tag)

    def _on_reply(self, channel: IChannel, delivery: Delivery) -> None:
        items, _ = messages.items_of(delivery.body, delivery.correlation_id)
        orphans: List[Tuple[Tuple[str, str], Deferred[Any]]] = []
        for correlation_id, reply in items:
            d = self._pending.pop(correlation_id, None)
            if d is None:
                orphan = self._orphan(correlation_id, reply)
                if orphan is not None:
                    orphans.append(orphan)
                continue
            outcome = _outcome(correlation_id, reply)
            if isinstance(outcome, Pfo3Error):
                d.errback(outcome)
            else:
                d.callback(outcome)
        if orphans:
            self._settle_orphans(channel, delivery, orphans)
        else:
            self._ack(channel, delivery.tag)

    # -- orphan replies ---------------------------------------------------------

    def _orphan(
        self, correlation_id: str, reply: Union[Dict[str, Any], messages.BadMessage],
    ) -> Optional[Tuple[Tuple[str, str], Deferred[Any]]]:
        """
        A reply nobody here waits for: record its outcome if its task's
        record is still running.

        @return: Its record's key and a Deferred firing once the store wrote
            the outcome (failing if it could not), or L{None}: nothing to
            record.
        """
        store = self.store
        if store is None or correlation_id.startswith(self._id_prefix):
            # Nowhere to record it, or a task of this process's: answered or
            # given up on, and recorded so, here (no need to ask the store).
            return None
        key = messages.key_of(reply)
        if key is None or key in self._recovering:
            # Not recorded, or a duplicate of one being recorded now.
            return None
        self._recovering.add(key)
        d = store.get(*key)
        d.addCallback(self._record_orphan, store, correlation_id, reply)
        return key, d

    def _settle_orphans(
        self, channel: IChannel, delivery: Delivery,
        orphans: List[Tuple[Tuple[str, str], Deferred[Any]]],
    ) -> None:
        """
        Acknowledge a reply (or batch of replies) with orphans in it once
        the store wrote their outcomes; if it could not, give the delivery
        back to the reply queue to be tried again.
        """
        if self._acks is not None:
            self._acks.flush()  # the replies before it, settled first
        self._orphans += 1
        keys = [key for key, _ in orphans]

        def settle() -> None:
            # Until here no multiple ack may cover this delivery, nor may
            # another delivery of the same task be taken for a duplicate.
            for key in keys:
                self._recovering.discard(key)
            self._orphans -= 1

        def recorded(_: Any) -> None:
            channel.ack(delivery.tag)
            settle()

        def again() -> None:
            settle()
            if channel is self.broker.channel:
                channel.reject(delivery.tag, requeue=True)
            # else: the channel is gone, and the broker delivers it again.

        def not_recorded(f: Failure) -> None:
            log.warn("Could not record the outcome of task {tarea_id} ({why}); trying again "
                     "in {retry:g} s", tarea_id=", ".join(key[1] for key in keys),
                     why=f.value.subFailure.getErrorMessage(), retry=ORPHAN_RETRY)
            if self._clock is None:
                again()
            else:
                self._clock.callLater(ORPHAN_RETRY, again)

        d: Deferred[Any] = gatherResults([d for _, d in orphans], consumeErrors=True)
        d.addCallbacks(recorded, not_recorded)

    def _record_orphan(
        self, record: Optional[Record], store: IStore, correlation_id: str,
        reply: Union[Dict[str, Any], messages.BadMessage],
    ) -> Optional[Deferred[None]]:
        """
        Record the outcome C{reply} carries in C{record}, unless the store
        has none (purged, or never written) or a finished one (a late
        duplicate, a task given up on): those stay as they are.

        @return: A Deferred firing once the store wrote it (failing if it
            could not), or L{None}.
        """
        if record is None:
            return None
        if record.estado != RUNNING:
            # Finished: by a reply before this one, or by this very one on
            # an earlier attempt whose write may still be queued.
            return store.flush()
        outcome = _outcome(correlation_id, reply)
        record.terminada = self._clock.seconds() if self._clock is not None else time.time()
        if isinstance(outcome, Pfo3Error):
            record.estado = estado_of(outcome)
            record.codigo = outcome.codigo
            record.mensaje = outcome.mensaje
        else:
            record.estado = OK
            record.resultado, record.worker = outcome
        store.record(record)
        log.info("Recorded task {tarea_id} ({estado}), published before this orchestrator "
                 "started", tarea_id=record.tarea_id, estado=record.estado)
        return store.flush()

    def _give_up(self, correlation_id: str) -> None:
        self._pending.pop(correlation_id, None)
        self._unconfirmed.discard(correlation_id)
        channel = self.broker.channel
        if channel is not None:
            channel.publish(
                "", correlation_id.encode("ascii"), correlation_id, persistent=False,
                exchange=self.topology.cancellations,
            ).addErrback(lambda f: None)  # best effort: the message expires anyway

    def _lost(self) -> None:
        # Tasks the broker confirmed stay queued (durable): their replies
        # wait in the reply queue until this orchestrator reconnects.
        # pika fails the unconfirmed ones itself (see _refused).
        if self._unconfirmed:
            log.warn("{n} tasks not confirmed by the broker when the connection was lost",
                     n=len(self._unconfirmed))


def _outcome(correlation_id: str, reply: Union[Dict[str, Any], messages.BadMessage]) -> Any:
    """
    @return: What a reply says: C{(resultado, worker)}, or the task's
        L{Pfo3Error}, or L{InternalError} for a reply that cannot be read
        (logged).
    """
    try:
        return messages.reply_of(reply)
    except messages.BadMessage as e:
        log.error("Unreadable reply for {id}: {why}", id=correlation_id, why=e)
        return InternalError("Error interno: respuesta ilegible de un worker.")
