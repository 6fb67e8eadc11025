"""
Fakes for testing pfo3 and code that uses it, without threads or sockets.

  - L{SynchronousThreadPool}: runs "threaded" work at once, in the caller.
  - L{FakeReactor}: a L{Clock} that also runs C{callFromThread} at once, so
    L{deferToThreadPool} works with the pool above.
  - L{make_server}: a server factory wired to those fakes.
  - L{connect_in_memory}: a client protocol connected to a server factory
    through in-memory transports, driven by an L{IOPump}.
  - L{MemoryBroker}: RabbitMQ as the distributed mode uses it, in memory,
    for L{pfo3.amqp.executor.AMQPExecutor} and
    L{pfo3.amqp.worker.WorkerService}.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from pfo3.amqp.connection import Delivery, IChannel, Refused, Unroutable
from pfo3.amqp.topology import DEATH_REASON, Topology
from pfo3.auth import IAuthenticator
from pfo3.executor import LocalExecutor
from pfo3.gate import Gate
from pfo3.orchestrator import Orchestrator
from pfo3.protocol import DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_LINE, TaskFactory
from pfo3.store import IStore
from pfo3.tasks import TaskRegistry, default_registry


class SynchronousThreadPool:
    """
    A stand-in for L{twisted.python.threadpool.ThreadPool} that runs each
    call immediately in the calling thread.
    """

    max = 1

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, Any], None], f: Callable[..., Any],
        *args: Any, **kwargs: Any,
    ) -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class FakeReactor(Clock):
    """
    A fake clock whose C{callFromThread} runs the call at once.
    """

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


def make_server(
    registry: Optional[TaskRegistry] = None,
    reactor: Optional[FakeReactor] = None,
    timeout: float = 30.0,
    max_tasks: int = 50_000,
    max_line: int = DEFAULT_MAX_LINE,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
    inline: bool = True,
    idle_timeout: float = 0.0,
    store: Optional[IStore] = None,
    authenticator: Optional[IAuthenticator] = None,
    rate: float = 0.0,
    gate: Optional[Gate] = None,
) -> TaskFactory:
    """
    A real pfo3 server factory running on fakes: time moves only when the
    test calls C{factory.orchestrator.clock.advance}, and blocking tasks run
    synchronously.

    @param store: Records the tasks (a L{pfo3.store.MemoryStore} on the same
        fake clock, typically); none by default.
    @param authenticator: Checks tokens (see L{pfo3.auth}); an open server
        by default.
    @param rate: The default tasks per second of each identity.
    @param gate: The connection limits (see L{pfo3.gate}); their defaults,
        with authentication as C{authenticator} requires, otherwise.
    """
    if reactor is None:
        reactor = FakeReactor()
    if registry is None:
        registry = default_registry(entry_points=False)
    executor = LocalExecutor(reactor, SynchronousThreadPool(), inline=inline)
    orchestrator = Orchestrator(
        registry, executor, reactor, timeout=timeout, max_tasks=max_tasks, store=store,
        authenticator=authenticator, rate=rate)
    return TaskFactory(orchestrator, max_line, max_inflight, idle_timeout, gate=gate)


def connect_in_memory(
    server_factory: TaskFactory, client: Protocol
) -> Tuple[Protocol, iosim.IOPump]:
    """
    Connect C{client} to a new server protocol over in-memory transports.

    @return: The server protocol and the pump; call C{pump.flush()} to move
        bytes both ways.
    """
    server = server_factory.buildProtocol(None)
    server_transport = iosim.FakeTransport(server, isServer=True)
    client_transport = iosim.FakeTransport(client, isServer=False)
    pump = iosim.connect(server, server_transport, client, client_transport, greet=True)
    return server, pump


# -- the distributed mode's broker, in memory ------------------------------------


class _Frame:
    def __init__(self, queue: str) -> None:
        self.method = self
        self.queue = queue


class _Message:
    __slots__ = ("body", "correlation_id", "reply_to", "headers", "tag", "deliveries")

    def __init__(self, body: bytes, correlation_id: Optional[str], reply_to: Optional[str],
                 headers: Optional[Dict[str, Any]] = None) -> None:
        self.body = body
        self.correlation_id = correlation_id
        self.reply_to = reply_to
        self.headers = headers or {}
        self.tag = 0
        self.deliveries = 0


@implementer(IChannel)
class MemoryChannel:
    """
    An L{IChannel} (and the few declarations of pika's channel that the
    distributed mode makes) over a L{MemoryBroker}.
    """

    def __init__(self, broker: MemoryBroker, prefetch: int = 0) -> None:
        self.broker = broker
        self.prefetch = prefetch
        self.open = True

    # pika's declarations, as the executor and the worker use them
    def queue_declare(self, queue: str, **kwargs: Any) -> Deferred[Any]:
        if not queue:
            queue = f"amq.gen-{next(self.broker._names)}"
        self.broker.declare(queue)
        return succeed(_Frame(queue))

    def queue_depth(self, queue: str) -> Deferred[Tuple[int, int]]:
        """
        @return: The messages waiting in C{queue} and its consumers, as
            L{pfo3.amqp.connection.PikaChannel.queue_depth} does.
        """
        return succeed(self.broker.depth(queue))

    def queue_bind(self, queue: str, exchange: str, routing_key: str = "") -> Deferred[Any]:
        self.broker.bindings.setdefault(exchange, []).append(queue)
        return succeed(None)

    # IChannel
    def publish(
        self, routing_key: str, body: bytes, correlation_id: str,
        reply_to: Optional[str] = None, expiration: Optional[float] = None,
        persistent: bool = True, exchange: str = "",
    ) -> Deferred[None]:
        if not self.open:
            return fail(ConnectionDone("channel closed"))
        return self.broker._publish(exchange, routing_key, _Message(
            body, correlation_id, reply_to), self)

    def consume(self, queue: str, on_message: Callable[[Delivery], None]) -> Deferred[str]:
        tag = f"ctag-{next(self.broker._names)}"
        self.broker.consumers[tag] = (queue, self, on_message)
        self.broker._dispatch()
        return succeed(tag)

    def cancel(self, consumer_tag: str) -> Deferred[None]:
        self.broker.consumers.pop(consumer_tag, None)
        return succeed(None)

    def ack(self, tag: int, multiple: bool = False) -> None:
        if self.open:
            tags = [tag]
            if multiple:
                tags = sorted(t for t, (_, _, channel) in self.broker.unacked.items()
                              if t <= tag and channel is self)
            for t in tags:
                self.broker.unacked.pop(t, None)
                self.broker.acked.append(t)
            self.broker._dispatch()

    def reject(self, tag: int, requeue: bool) -> None:
        if self.open:
            queue, message, _ = self.broker.unacked.pop(tag)
            if requeue:
                self.broker.queues[queue].appendleft(message)
                self.broker._dispatch()


class MemoryBroker:
    """
    A broker in memory, with the interface of L{pfo3.amqp.connection.Broker}
    that the executor and the worker use (C{channel}, C{on_lost},
    C{startService}, C{stopService}): queues, fanout exchanges, delivery
    limits and dead letters, confirms that the test may hold back, and a
    lost connection on demand.  Several executors and workers may share one
    broker; each gets its own view with L{view}.

    @ivar queues: Messages waiting, by queue name.
    @ivar unacked: Messages delivered and not acknowledged, by delivery tag.
    @ivar max_length: Per queue, the length past which publishes are
        refused.
    @ivar hold_confirms: While true, publishes wait in C{held_confirms}.
    """

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.queues: Dict[str, Deque[_Message]] = {}
        self.bindings: Dict[str, List[str]] = {}
        self.consumers: Dict[str, Tuple[str, MemoryChannel, Callable[[Delivery], None]]] = {}
        self.unacked: Dict[int, Tuple[str, _Message, MemoryChannel]] = {}
        self.acked: List[int] = []
        self.max_length: Dict[str, int] = {}
        self.hold_confirms = False
        #: The confirms held back, each with the channel that waits for it.
        self.held_confirms: List[Tuple[Optional[MemoryChannel], Deferred[None]]] = []
        self._names = itertools.count(1)
        self._tags = itertools.count(1)
        self._views: List[MemoryBrokerView] = []
        self.declare(topology.tasks)
        self.declare(topology.dead)
        self.bindings[topology.dead] = [topology.dead]
        self.max_length[topology.tasks] = topology.max_backlog

    def declare(self, queue: str) -> None:
        self.queues.setdefault(queue, deque())

    def depth(self, queue: str) -> Tuple[int, int]:
        """
        @return: The messages waiting in C{queue} and how many consumers
            it has.
        """
        consumers = sum(1 for q, _, _ in self.consumers.values() if q == queue)
        return len(self.queues[queue]), consumers

    def view(
        self, setup: Callable[[Any, IChannel], Deferred[Any]], prefetch: int = 0,
    ) -> MemoryBrokerView:
        """
        @param setup: As for L{pfo3.amqp.connection.Broker}.
        @param prefetch: As for L{pfo3.amqp.connection.Broker}: deliveries
            each consumer may hold unacknowledged (C{0}: no limit).
        @return: A connection to this broker for one executor or worker.
        """
        v = MemoryBrokerView(self, setup, prefetch)
        self._views.append(v)
        return v

    def _publish(
        self, exchange: str, routing_key: str, message: _Message,
        channel: Optional[MemoryChannel] = None,
    ) -> Deferred[None]:
        if exchange:
            for name in self.bindings.get(exchange, []):
                self.queues[name].append(message)
        else:
            queue = self.queues.get(routing_key)
            if queue is None:
                return fail(Unroutable(routing_key))
            if len(queue) >= self.max_length.get(routing_key, 1 << 60):
                return fail(Refused(routing_key))
            queue.append(message)
        d: Deferred[None] = Deferred()
        if self.hold_confirms:
            self.held_confirms.append((channel, d))
        else:
            d.callback(None)
        self._dispatch()
        return d

    def release_confirms(self) -> None:
        """
        Confirm every publish held back.
        """
        held, self.held_confirms = self.held_confirms, []
        for _, d in held:
            d.callback(None)

    def _dispatch(self) -> None:
        # Until nothing moves: a dead letter may feed a consumer already
        # passed over.
        moved = True
        while moved:
            moved = self._dispatch_once()

    def _dispatch_once(self) -> bool:
        moved = False
        for tag, (queue, channel, on_message) in list(self.consumers.items()):
            waiting = self.queues.get(queue)
            while waiting and tag in self.consumers and channel.open and (
                not channel.prefetch or channel.prefetch > sum(
                    1 for q, _, ch in self.unacked.values() if ch is channel and q == queue)
            ):
                message = waiting.popleft()
                moved = True
                if queue == self.topology.tasks and (
                    message.deliveries > self.topology.delivery_limit
                ):
                    message.headers = {DEATH_REASON: "delivery_limit"}
                    self.queues[self.topology.dead].append(message)
                    continue
                message.tag = next(self._tags)
                redelivered = message.deliveries > 0
                message.deliveries += 1
                self.unacked[message.tag] = (queue, message, channel)
                on_message(Delivery(message.tag, message.body, message.correlation_id,
                                    message.reply_to, message.headers, redelivered))
        return moved

    def _lose(self, channel: MemoryChannel) -> None:
        channel.open = False
        for ctag, (_, ch, _) in list(self.consumers.items()):
            if ch is channel:
                del self.consumers[ctag]
        for tag, (queue, message, ch) in list(self.unacked.items()):
            if ch is channel:
                del self.unacked[tag]
                self.queues[queue].appendleft(message)
        # The confirms this channel waits for fail; the others' still wait.
        lost = [d for ch, d in self.held_confirms if ch is channel]
        self.held_confirms = [(ch, d) for ch, d in self.held_confirms if ch is not channel]
        for d in lost:
            d.errback(ConnectionDone("connection lost"))
        self._dispatch()


class MemoryBrokerView:
    """
    One process's connection to a L{MemoryBroker}.
    """

    def __init__(self, broker: MemoryBroker,
                 setup: Callable[[Any, IChannel], Deferred[Any]], prefetch: int = 0) -> None:
        self.broker = broker
        self.setup = setup
        self.prefetch = prefetch
        self.channel: Optional[MemoryChannel] = None
        self._lost: List[Callable[[], None]] = []

    def on_lost(self, callback: Callable[[], None]) -> None:
        self._lost.append(callback)

    def startService(self) -> None:
        self.connect()

    def stopService(self) -> Deferred[None]:
        if self.channel is not None:
            self.broker._lose(self.channel)
            self.channel = None
        return succeed(None)

    def connect(self) -> None:
        """
        (Re)connect: a new channel, set up by its user.
        """
        channel = MemoryChannel(self.broker, self.prefetch)
        self.setup(channel, channel).addCallback(lambda _: setattr(self, "channel", channel))

    def lose(self) -> None:
        """
        The connection drops: unacknowledged deliveries go back to their
        queues, unconfirmed publishes fail, the user is told.
        """
        if self.channel is not None:
            self.broker._lose(self.channel)
            self.channel = None
        for callback in list(self._lost):
            callback()
