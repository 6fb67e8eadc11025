"""
The connection to RabbitMQ, and the small channel interface the executor
and the worker use.

L{IChannel} is the seam: L{PikaChannel} implements it over pika's Twisted
adapter, and L{pfo3.testing.MemoryBroker} in memory for unit tests.
L{Broker} is a service that keeps one connection up: it reconnects with
backoff (L{ClientService}) whenever the connection is lost or cannot be
made, declares the topology each time, and tells its user (the executor or
the worker) when a channel is ready and when it is gone.

An C{amqps://} URL connects over TLS, verifying the broker's certificate and
host name; the certificate authorities to trust and a client certificate
come from pika's C{ssl_options} URL parameter, which L{broker_url} writes
from C{--broker-ca}, C{--broker-cert} and C{--broker-key} (see
C{docs/security.md}).
"""

from __future__ import annotations

import ast
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pika
from pika.adapters.twisted_connection import TwistedChannel, TwistedProtocolConnection
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import endpoints, tcp
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from pfo3.amqp.topology import Topology
from pfo3.sending import SendNow

log = Logger(namespace="pfo3.amqp")


class Delivery:
    """
    A message delivered to a consumer.
    """

    __slots__ = ("tag", "body", "correlation_id", "reply_to", "headers", "redelivered",
                 "expiration")

    def __init__(
        self, tag: int, body: bytes, correlation_id: Optional[str], reply_to: Optional[str],
        headers: Optional[Dict[str, Any]], redelivered: bool,
        expiration: Optional[float] = None,
    ) -> None:
        """
        @param expiration: The seconds its publisher gave it to live (not
            what is left of them).
        """
        self.tag = tag
        self.body = body
        self.correlation_id = correlation_id
        self.reply_to = reply_to
        self.headers = headers or {}
        self.redelivered = redelivered
        self.expiration = expiration


class IChannel(Interface):
    """
    What the distributed mode needs of an AMQP channel in confirm mode.
    """

    def publish(
        routing_key: str, body: bytes, correlation_id: str,  # noqa: N805
        reply_to: Optional[str] = None, expiration: Optional[float] = None,
        persistent: bool = True, exchange: str = "",
    ) -> Deferred[None]:
        """
        Publish a message.

        @param expiration: Seconds after which the broker drops it.
        @return: A Deferred firing once the broker confirmed it; failing if
            the broker refused it (a full queue), could not route it, or the
            channel closed first.
        """

    def consume(queue: str, on_message: Callable[[Delivery], None]) -> Deferred[str]:  # noqa: N805
        """
        Start consuming C{queue}; C{on_message} gets each delivery.

        @return: A Deferred firing with the consumer tag.
        """

    def cancel(consumer_tag: str) -> Deferred[None]:  # noqa: N805
        """
        Stop a consumer.
        """

    def ack(tag: int, multiple: bool = False) -> None:  # noqa: N805
        """
        Acknowledge a delivery.

        @param multiple: Acknowledge every delivery of this channel up to
            and including C{tag} too.
        """

    def reject(tag: int, requeue: bool) -> None:  # noqa: N805
        """
        Refuse a delivery: back to its queue, or dead-lettered.
        """


class Unroutable(Exception):
    """
    The broker confirmed a message it could not route to any queue.
    """


class Refused(Exception):
    """
    The broker refused a message (a full queue that rejects publishes).
    """


#: What a task the full task queue refused (L{Refused}) is answered, as
#: C{ocupado}.
QUEUE_FULL = "La cola de tareas del broker está llena. Reintente más tarde."


#: Sets of message properties a L{PikaChannel} keeps, one per kind of
#: message it publishes (reply queue, persistence, expiry): three in
#: practice (tasks, cancellations, replies).
_MAX_PROPERTIES = 64


def _translate(failure: Failure) -> Failure:
    from pika.exceptions import NackError, UnroutableError

    if failure.check(NackError):
        return Failure(Refused(str(failure.value)))
    if failure.check(UnroutableError):
        return Failure(Unroutable(str(failure.value)))
    return failure


@implementer(IChannel)
class PikaChannel:
    """
    L{IChannel} over a pika Twisted channel in confirm mode.
    """

    def __init__(
        self, channel: TwistedChannel, on_closed: Callable[[], None] = lambda: None,
    ) -> None:
        """
        @param on_closed: Called when a consumer stops because the channel
            closed (the broker closes a channel on a protocol error).
        """
        self._channel = channel
        self._on_closed = on_closed
        self._properties: Dict[Tuple[Optional[str], bool, Optional[float]],
                               pika.BasicProperties] = {}

    def _properties_for(
        self, reply_to: Optional[str], persistent: bool, expiration: Optional[float],
    ) -> pika.BasicProperties:
        """
        @return: The properties of a message with these settings, built
            once: only the correlation id differs from one message to the
            next, and pika encodes the properties as it publishes, so the
            caller sets it on the shared instance just before.
        """
        key = (reply_to, persistent, expiration)
        properties = self._properties.get(key)
        if properties is None:
            if len(self._properties) >= _MAX_PROPERTIES:
                self._properties.clear()
            properties = self._properties[key] = pika.BasicProperties(
                content_type="application/json", reply_to=reply_to,
                delivery_mode=2 if persistent else 1,
                expiration=None if expiration is None else str(max(1, round(expiration * 1000))),
            )
        return properties

    def publish(
        self, routing_key: str, body: bytes, correlation_id: str,
        reply_to: Optional[str] = None, expiration: Optional[float] = None,
        persistent: bool = True, exchange: str = "",
    ) -> Deferred[None]:
        properties = self._properties_for(reply_to, persistent, expiration)
        properties.correlation_id = correlation_id
        d: Deferred[Any] = self._channel.basic_publish(
            exchange, routing_key, body, properties, mandatory=bool(not exchange))
        return d.addCallbacks(lambda _: None, _translate)

    def consume(self, queue: str, on_message: Callable[[Delivery], None]) -> Deferred[str]:
        def started(result: Any) -> str:
            queue_object, tag = result
            _pump(queue_object, on_message, self._stopped)
            return str(tag)

        d: Deferred[Any] = self._channel.basic_consume(queue=queue, auto_ack=False)
        return d.addCallback(started)

    def cancel(self, consumer_tag: str) -> Deferred[None]:
        d: Deferred[Any] = self._channel.basic_cancel(consumer_tag)
        return d.addCallback(lambda _: None)

    def _stopped(self) -> None:
        if not self._channel.is_open:
            self._on_closed()

    def ack(self, tag: int, multiple: bool = False) -> None:
        if self._channel.is_open:
            self._channel.basic_ack(tag, multiple)

    def reject(self, tag: int, requeue: bool) -> None:
        if self._channel.is_open:
            self._channel.basic_reject(tag, requeue=requeue)

    def queue_depth(self, queue: str) -> Deferred[Tuple[int, int]]:
        """
        @return: A Deferred of the messages ready in C{queue} and its
            consumers (a passive C{queue_declare}: the queue must exist, as
            the task queue does once the topology is declared).
        """
        d: Deferred[Any] = self._channel.queue_declare(queue, passive=True)
        return d.addCallback(
            lambda frame: (frame.method.message_count, frame.method.consumer_count))


class AckBatch:
    """
    Acknowledges deliveries with one multiple ack per reactor turn instead
    of one ack each.

    Only for a consumer that acknowledges every delivery of its channel as
    it handles it, in order of delivery (the orchestrator's replies): a
    multiple ack up to the last tag handled acknowledges exactly the
    deliveries handled since the previous one.  The ack goes out in the
    next reactor turn; if the channel is gone by then it is not sent, as
    with an immediate ack on a closed channel, and the broker delivers
    those messages again.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._channel: Optional[IChannel] = None
        self._tag = 0
        self._call: Optional[IDelayedCall] = None

    def ack(self, channel: IChannel, tag: int) -> None:
        """
        Acknowledge C{tag} of C{channel}, and every earlier delivery of that
        channel, soon.
        """
        if channel is not self._channel:
            self.flush()
            self._channel = channel
        self._tag = tag
        if self._call is None:
            self._call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        """
        Send the pending acknowledgement now.
        """
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.ack(self._tag, multiple=True)


@implementer(IChannel)
class OrderedAcks:
    """
    An L{IChannel} whose acknowledgements of one reactor turn go out at its
    end, as one multiple ack for those that come first in the order of
    delivery and one ack each for the others (for the worker, whose tasks
    finish out of order).

    A multiple ack up to a tag settles every delivery of the channel up to
    it, so it may only cover deliveries this channel was told to settle:
    every consumer of the channel is started through this wrapper, which
    records each delivery's tag in order, and the multiple ack reaches only
    up to the first delivery neither acknowledged nor rejected.  Rejections
    go out at once.  If the channel is gone by the end of the turn the acks
    are not sent, as with an immediate ack on a closed channel: the broker
    delivers those messages again.
    """

    def __init__(self, channel: IChannel, clock: IReactorTime) -> None:
        self._channel = channel
        self._clock = clock
        #: Tags delivered, in order, from the first one not known settled.
        self._delivered: Deque[int] = deque()
        #: Tags in C{_delivered} settled already (acknowledged one by one,
        #: or rejected).
        self._settled: Set[int] = set()
        self._ready: List[int] = []
        self._call: Optional[IDelayedCall] = None

    def publish(
        self, routing_key: str, body: bytes, correlation_id: str,
        reply_to: Optional[str] = None, expiration: Optional[float] = None,
        persistent: bool = True, exchange: str = "",
    ) -> Deferred[None]:
        return self._channel.publish(
            routing_key, body, correlation_id, reply_to, expiration, persistent, exchange)

    def consume(self, queue: str, on_message: Callable[[Delivery], None]) -> Deferred[str]:
        delivered = self._delivered

        def record(delivery: Delivery) -> None:
            delivered.append(delivery.tag)
            on_message(delivery)

        return self._channel.consume(queue, record)

    def cancel(self, consumer_tag: str) -> Deferred[None]:
        return self._channel.cancel(consumer_tag)

    def ack(self, tag: int, multiple: bool = False) -> None:
        if multiple:
            raise ValueError("OrderedAcks chooses when to acknowledge several at once")
        self._ready.append(tag)
        if self._call is None:
            self._call = self._clock.callLater(0, self.flush)

    def reject(self, tag: int, requeue: bool) -> None:
        self._settled.add(tag)
        self._channel.reject(tag, requeue)

    def flush(self) -> None:
        """
        Send the acknowledgements of this turn now.
        """
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        if not self._ready:
            return
        ready = set(self._ready)
        self._ready = []
        delivered, settled = self._delivered, self._settled
        last = 0
        while delivered:
            tag = delivered[0]
            if tag in ready:
                ready.discard(tag)
                last = tag
            elif tag in settled:
                settled.discard(tag)
            else:
                break
            delivered.popleft()
        if last:
            self._channel.ack(last, multiple=True)
        for tag in sorted(ready):
            settled.add(tag)
            self._channel.ack(tag)


def _pump(
    queue_object: Any, on_message: Callable[[Delivery], None], stopped: Callable[[], None],
) -> None:
    """
    Hand every message of a pika consumer queue to C{on_message}, until the
    queue closes (consumer cancelled, channel or connection gone).
    """
    def got(message: Any) -> None:
        props, method = message.properties, message.method
        try:
            on_message(Delivery(
                method.delivery_tag, message.body, props.correlation_id, props.reply_to,
                props.headers, bool(method.redelivered),
                None if props.expiration is None else int(props.expiration) / 1000))
        except Exception:
            log.failure("Handling a message from the broker failed")
        _pump(queue_object, on_message, stopped)

    def closed(f: Failure) -> None:
        log.debug("Consumer stopped: {why}", why=f.getErrorMessage())
        stopped()

    queue_object.get().addCallbacks(got, closed)


#: The keys of pika's C{ssl_options} URL parameter that pfo3 reads (pika's
#: own spellings, C{cafile} being its alias of C{ca_certs}).
TLS_KEYS = ("ca_certs", "cafile", "certfile", "keyfile", "server_hostname")


def _split_tls(url: str) -> Tuple[str, Optional[Dict[str, str]]]:
    """
    @return: C{url} without its C{ssl_options} query parameter, and that
        parameter's settings (L{None} for an C{amqp://} URL, a dictionary,
        perhaps empty, for C{amqps://}).
    @raise ValueError: for a URL that is not C{amqp://} or C{amqps://}, or
        C{ssl_options} that are not a dictionary of L{TLS_KEYS} to texts.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"the broker URL must start with amqp:// or amqps://, not {url!r}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    raw = [value for name, value in query if name == "ssl_options"]
    rest = [(name, value) for name, value in query if name != "ssl_options"]
    if parts.scheme == "amqp":
        if raw:
            raise ValueError("ssl_options (or --broker-ca, --broker-cert, --broker-key) "
                             "need an amqps:// broker URL")
        return url, None
    settings: Dict[str, str] = {}
    for text in raw:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"ssl_options is not a dictionary: {text!r}")
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ValueError(f"ssl_options is not a dictionary of texts: {text!r}")
        unknown = sorted(set(value) - set(TLS_KEYS))
        if unknown:
            raise ValueError(f"ssl_options: {', '.join(unknown)} not supported; "
                             f"pfo3 reads {', '.join(TLS_KEYS)}")
        settings.update(value)
    if "keyfile" in settings and "certfile" not in settings:
        raise ValueError("a client key (keyfile, --broker-key) needs its certificate "
                         "(certfile, --broker-cert)")
    return urlunsplit(parts._replace(query=urlencode(rest))), settings


def broker_url(
    url: str, ca: Optional[str] = None, cert: Optional[str] = None, key: Optional[str] = None,
) -> str:
    """
    @return: C{url} with the TLS files to use written into its
        C{ssl_options} parameter (pika's), so that the URL alone says how
        to connect.
    @param ca: The certificate authorities that sign the broker's
        certificate (a PEM file, or a folder of C{*.pem}); L{None}: the
        system's.
    @param cert: A client certificate to present (PEM), for a broker that
        asks for one.
    @param key: Its private key (PEM); L{None}: in the same file.
    @raise ValueError: see L{_split_tls}.
    """
    base, settings = _split_tls(url)
    extra = {name: value for name, value in
             (("ca_certs", ca), ("certfile", cert), ("keyfile", key)) if value}
    if not extra:
        return url
    if settings is None:
        raise ValueError("--broker-ca, --broker-cert and --broker-key need an amqps:// "
                         "broker URL")
    settings.update(extra)
    parts = urlsplit(base)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query.append(("ssl_options", repr(settings)))
    return urlunsplit(parts._replace(query=urlencode(query)))


def parameters(url: str) -> pika.URLParameters:
    """
    @return: pika's connection parameters for an C{amqp://} or C{amqps://}
        URL (its C{ssl_options} are pfo3's to read: see L{client_tls}).
    @raise ValueError: for anything else.
    """
    base, _ = _split_tls(url)
    return pika.URLParameters(base)


def client_tls(url: str) -> Any:
    """
    The TLS settings of a connection to the broker at C{url}: the broker's
    certificate must be signed by the configured authorities (else the
    system's) and name the host connected to (or C{server_hostname});
    a client certificate is presented when configured.

    @return: Twisted's client TLS options, or L{None} for C{amqp://}.
    @raise ValueError: for files that cannot be read or do not match.
    """
    from OpenSSL.SSL import Error as OpenSSLError
    from twisted.internet import ssl
    from twisted.internet.error import VerifyError

    from pfo3.tlsid import load_authorities

    base, settings = _split_tls(url)
    if settings is None:
        return None
    kw: Dict[str, Any] = {}
    ca = settings.get("ca_certs") or settings.get("cafile")
    if ca:
        kw["trustRoot"] = ssl.trustRootFromCertificates(load_authorities(ca))
    cert = settings.get("certfile")
    if cert:
        key = settings.get("keyfile") or cert
        try:
            with open(cert, "rb") as f:
                cert_pem = f.read()
            with open(key, "rb") as f:
                key_pem = f.read()
        except OSError as e:
            raise ValueError(f"cannot read {e.filename}: {e.strerror}")
        try:
            kw["clientCertificate"] = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        except VerifyError:
            raise ValueError(f"the client certificate {cert} does not match the key {key}")
        except (OpenSSLError, ValueError) as e:
            raise ValueError(f"cannot read the client certificate {cert} and key {key}: {e}")
    host = settings.get("server_hostname") or pika.URLParameters(base).host
    return ssl.optionsForClientTLS(host, **kw)


def _endpoint(reactor: Any, params: pika.URLParameters, tls: Any) -> Any:
    host, port = params.host, params.port
    if tls is not None:
        return endpoints.wrapClientTLS(
            tls, endpoints.HostnameEndpoint(reactor, host.encode("idna"), port, timeout=10))
    return endpoints.HostnameEndpoint(reactor, host.encode("idna"), port, timeout=10)


def no_delay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off on the broker connection, as pika's own
    socket adapters do (its Twisted adapter leaves the socket to Twisted).
    With it on, a small frame written while the previous one is not yet
    acknowledged (a publish after an ack, which the broker answers with
    nothing) waits for the broker's delayed ACK: about 40 ms per task.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            log.failure("Could not set TCP_NODELAY on the broker connection")


class TurnWriter:
    """
    The transport pika writes to on a TCP connection: what it writes during
    one reactor turn goes out in one send at the end of that turn.

    pika writes each frame on its own (three for a publish), and a TCP
    transport (L{twisted.internet.tcp.Client}) only buffers each write,
    registers for writability (an C{epoll_ctl}), sends when the next poll
    says it may, and unregisters (another C{epoll_ctl}).  Here the frames of
    a turn are joined and sent by a delayed call of 0 s, which runs right
    after the turn's I/O, while the transport holds nothing; what the socket
    does not take, and everything after it, goes through the transport's own
    buffered C{write}, which keeps the order and the reporting of errors
    (as L{pfo3.sending.SendNow} does for the clients' connections).  Every
    other attribute is the transport's.
    """

    def __init__(self, transport: Any, clock: IReactorTime) -> None:
        self.transport = transport
        self._clock = clock
        self._pending: List[bytes] = []
        self._call: Optional[IDelayedCall] = None
        self._send = SendNow(transport).write

    def write(self, data: bytes) -> None:
        """
        Send C{data} at the end of this reactor turn.
        """
        self._pending.append(data)
        if self._call is None:
            self._call = self._clock.callLater(0, self.flush)

    def writeSequence(self, data: List[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def flush(self) -> None:
        """
        Send what was written this turn now.
        """
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending = []
        self._send(data)

    def loseConnection(self) -> None:
        self.flush()
        self.transport.loseConnection()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _PikaConnection(TwistedProtocolConnection):
    """
    pika's Twisted connection, writing through a L{TurnWriter} on TCP.
    """

    def __init__(self, params: pika.URLParameters, clock: IReactorTime) -> None:
        super().__init__(params)
        self._clock = clock
        self._params = params

    def makeConnection(self, transport: Any) -> None:
        if type(transport) is tcp.Client:
            transport = TurnWriter(transport, self._clock)
        super().makeConnection(transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        why = _tls_failure(reason)
        if why is not None:
            log.error(
                "TLS with the broker at {host}:{port} failed: {why} (check --broker-ca, "
                "the broker certificate's host names, --broker-cert and --broker-key)",
                host=self._params.host, port=self._params.port, why=why)
        super().connectionLost(reason)


def _tls_failure(reason: Failure) -> Optional[str]:
    """
    @return: Why the TLS layer ended a connection (a refused certificate,
        a name that does not match, an alert from the broker), or L{None}
        if it was not TLS.
    """
    from OpenSSL.SSL import Error as OpenSSLError
    from service_identity import VerificationError

    if reason.check(VerificationError):
        return f"the broker's certificate does not name this host ({reason.value})"
    if reason.check(OpenSSLError):
        errors = reason.value.args[0] if reason.value.args else None
        if isinstance(errors, list):
            texts = [str(e[-1]) for e in errors if isinstance(e, tuple) and e]
            if texts:
                return ", ".join(texts)
        return str(reason.value)
    return None


class _PikaFactory(Factory):
    noisy = False

    def __init__(self, params: pika.URLParameters, clock: IReactorTime) -> None:
        self.params = params
        self.clock = clock

    def buildProtocol(self, addr: Any) -> TwistedProtocolConnection:
        p = _PikaConnection(self.params, self.clock)
        p.factory = self
        return p


def _then(ignored: Any, step: Callable[[], Deferred[Any]]) -> Deferred[Any]:
    return step()


class Broker(Service):
    """
    One connection to the broker, kept up.

    @ivar channel: The ready channel, or L{None} while disconnected.
    """

    def __init__(
        self, reactor: Any, url: str, topology: Topology,
        setup: Callable[[TwistedChannel, IChannel], Deferred[Any]],
        prefetch: int = 0,
    ) -> None:
        """
        @param setup: Called with each new channel (pika's, and as an
            L{IChannel}) once the topology is declared: declares its own
            queues and starts its consumers.
        @param prefetch: Unacknowledged deliveries the channel may hold
            (C{0}: no limit, for a publisher).
        """
        self.reactor = reactor
        self.url = url
        self.topology = topology
        self.setup = setup
        self.prefetch = prefetch
        self.channel: Optional[IChannel] = None
        self._lost_callbacks: List[Callable[[], None]] = []
        self._ready_waiters: List[Deferred[IChannel]] = []
        params = self._params = parameters(url)
        self._service = ClientService(
            _endpoint(reactor, params, client_tls(url)), _PikaFactory(params, reactor),
            retryPolicy=backoffPolicy(initialDelay=0.25, maxDelay=5.0, factor=2.0),
            clock=reactor, prepareConnection=self._prepare,
        )
        self._connection: Optional[TwistedProtocolConnection] = None

    def on_lost(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback} each time the channel is lost.
        """
        self._lost_callbacks.append(callback)

    def when_ready(self) -> Deferred[IChannel]:
        """
        @return: A Deferred firing with the channel once one is ready.
        """
        if self.channel is not None:
            return succeed(self.channel)
        d: Deferred[IChannel] = Deferred()
        self._ready_waiters.append(d)
        return d

    def startService(self) -> None:
        super().startService()
        self._service.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        connection = self._connection
        if connection is not None and connection.is_open:
            closed = connection.close()
            d: Deferred[Any] = closed if isinstance(closed, Deferred) else succeed(None)
            d.addTimeout(5, self.reactor)
            d.addErrback(lambda _: None)
            return DeferredList([d, self._service.stopService()]).addCallback(lambda _: None)
        return self._service.stopService()

    def _prepare(self, connection: TwistedProtocolConnection) -> Deferred[Any]:
        no_delay(connection.transport)
        ready = connection.ready
        if ready is None:
            raise RuntimeError("connection already failed")
        d: Deferred[Any] = ready
        d.addCallback(lambda _: connection.channel())
        d.addCallback(self._declare)
        d.addCallback(self._ready, connection)
        return d

    def _declare(self, channel: TwistedChannel) -> Deferred[Any]:
        t = self.topology
        steps: List[Callable[[], Deferred[Any]]] = [
            lambda: channel.exchange_declare(t.dead, exchange_type="fanout", durable=True),
            lambda: channel.queue_declare(
                t.dead, durable=True, arguments={"x-queue-type": "quorum"}),
            lambda: channel.queue_bind(t.dead, t.dead, routing_key=""),
            lambda: channel.queue_declare(
                t.tasks, durable=True, arguments=t.task_queue_arguments()),
            lambda: channel.exchange_declare(
                t.cancellations, exchange_type="fanout", durable=True),
            lambda: channel.confirm_delivery(),
        ]
        if self.prefetch:
            steps.append(lambda: channel.basic_qos(prefetch_count=self.prefetch))
        d: Deferred[Any] = succeed(None)
        for step in steps:
            d.addCallback(_then, step)
        return d.addCallback(lambda _: channel)

    def _ready(self, channel: TwistedChannel, connection: TwistedProtocolConnection) -> Any:
        wrapped = PikaChannel(channel, lambda: self._channel_closed(connection))
        d = self.setup(channel, wrapped)

        def up(_: Any) -> None:
            self._connection = connection
            self.channel = wrapped
            closed = connection.closed
            if closed is not None:
                closed.addBoth(self._down, connection)
            log.info("Connected to the broker at {host}:{port}",
                     host=self._params.host, port=self._params.port)
            waiters, self._ready_waiters = self._ready_waiters, []
            for w in waiters:
                w.callback(wrapped)

        return d.addCallback(up)

    def _channel_closed(self, connection: TwistedProtocolConnection) -> None:
        # A channel the broker closed (a protocol error) does not come back
        # by itself: close the connection, and the service reconnects.
        if connection.is_open:
            log.warn("The broker closed the channel; reconnecting")
            connection.close()

    def _down(self, reason: Any, connection: TwistedProtocolConnection) -> None:
        if self._connection is not connection:
            return
        self._connection = None
        self.channel = None
        if self.running:
            log.warn("Lost the broker connection ({reason}); reconnecting",
                     reason=getattr(reason, "args", reason))
        for callback in list(self._lost_callbacks):
            try:
                callback()
            except Exception:
                log.failure("A broker-lost callback failed")
