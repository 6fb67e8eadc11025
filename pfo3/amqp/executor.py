"""
The orchestrator's executor in distributed mode: tasks go to RabbitMQ and
their replies come back on this orchestrator's own reply queue.

A task is accepted only once the broker confirmed it (publisher confirms);
until then a refusal (a full task queue: C{ocupado}) or a lost connection
(C{broker_no_disponible}) fails it at once.  Its reply is matched by
correlation id; a second reply for the same task (a worker that died after
answering, redelivered) finds nobody waiting and is dropped.  Giving up on a
task (timeout, client gone, shutdown) tells the workers through the
cancellation exchange, and its message expires in the queue with the task
timeout, so work nobody waits for is not started.
"""

from __future__ import annotations

import itertools
import os
import socket
from typing import Any, Dict, Optional, Set

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pfo3.amqp import messages
from pfo3.amqp.connection import AckBatch, Broker, Delivery, IChannel, Refused, Unroutable
from pfo3.amqp.topology import Topology
from pfo3.errors import BrokerUnavailable, Busy, InternalError, Pfo3Error
from pfo3.executor import IExecutor, MaybeDeferredOutcome
from pfo3.stats import OldestPublished
from pfo3.tasks import TaskType

log = Logger(namespace="pfo3.amqp")


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
        clock: Optional[IReactorTime] = None,
    ) -> None:
        """
        @param broker: The connection to use; its setup must be
            L{AMQPExecutor.setup} (see L{from_url}).
        @param name: This orchestrator's name: its reply queue's.
        @param task_ttl: Seconds a task message may wait in the queue (the
            task timeout: after it, nobody waits for the reply).
        @param clock: When given, the publish time of each task is kept so
            that C{oldest} can tell the oldest one's age (for the metrics),
            and the replies handled in one reactor turn are acknowledged
            together (L{AckBatch}); without it, each one at once.
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
        if clock is not None:
            self.oldest = OldestPublished(clock, self._pending)
            self._acks = AckBatch(clock)
        broker.on_lost(self._lost)

    @classmethod
    def from_url(
        cls, reactor: Any, url: str, topology: Topology, task_ttl: float, name: str = "",
    ) -> AMQPExecutor:
        """
        An executor with its own L{Broker} connection to C{url}.
        """
        holder: Dict[str, AMQPExecutor] = {}
        broker = Broker(reactor, url, topology, lambda raw, ch: holder["e"].setup(raw, ch))
        executor = holder["e"] = cls(broker, topology, name or default_name(), task_ttl,
                                     clock=reactor)
        return executor

    def start(self) -> None:
        self.broker.startService()

    def stop(self) -> Deferred[None]:
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

    def run(self, tasktype: TaskType, arg: Any, identity: str = "") -> MaybeDeferredOutcome:
        channel = self.broker.channel
        if channel is None:
            raise BrokerUnavailable(
                "No hay conexión con el broker de tareas; reintente en unos segundos.")
        body = messages.encode_task(tasktype.name, arg, identity)
        correlation_id = f"{self._id_prefix}{next(self._ids):x}"
        d: Deferred[Any] = Deferred(lambda _: self._give_up(correlation_id))
        self._pending[correlation_id] = d
        self._unconfirmed.add(correlation_id)
        if self.oldest is not None:
            self.oldest.published(correlation_id)
        confirmed = channel.publish(
            self.topology.tasks, body, correlation_id, reply_to=self.reply_queue,
            expiration=self.task_ttl)
        confirmed.addCallbacks(self._confirmed, self._refused,
                               callbackArgs=(correlation_id,), errbackArgs=(correlation_id,))
        return d

    def _confirmed(self, ignored: None, correlation_id: str) -> None:
        self._unconfirmed.discard(correlation_id)

    def _refused(self, failure: Failure, correlation_id: str) -> None:
        self._unconfirmed.discard(correlation_id)
        d = self._pending.pop(correlation_id, None)
        if d is None:
            return
        if failure.check(Refused):
            d.errback(Busy(
                "La cola de tareas del broker está llena. Reintente más tarde."))
        elif failure.check(Unroutable):
            d.errback(BrokerUnavailable("El broker no tiene la cola de tareas."))
        else:
            d.errback(BrokerUnavailable(
                "Se perdió la conexión con el broker antes de que confirmara la tarea."))

    def _on_reply(self, channel: IChannel, delivery: Delivery) -> None:
        # Every delivery on this channel is a reply, acknowledged here in
        # the order it came: safe to acknowledge several at once.
        if self._acks is not None:
            self._acks.ack(channel, delivery.tag)
        else:
            channel.ack(delivery.tag)
        d = self._pending.pop(delivery.correlation_id or "", None)
        if d is None:
            return  # a duplicate, or a task given up on
        try:
            outcome = messages.decode_reply(delivery.body)
        except messages.BadMessage as e:
            log.error("Unreadable reply for {id}: {why}", id=delivery.correlation_id, why=e)
            d.errback(InternalError("Error interno: respuesta ilegible de un worker."))
            return
        if isinstance(outcome, Pfo3Error):
            d.errback(outcome)
        else:
            d.callback(outcome)

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
