"""
Framing: the line protocol that carries requests and replies.

L{TaskProtocol} splits the byte stream into lines, decodes each with
L{pfo3.wire}, hands the request to its connection's
L{pfo3.orchestrator.Session} and writes the replies, in the order the tasks
finish.  When the client ends its input (C{shutdown(SHUT_WR)}, C{nc -N}) or
the server shuts down, the connection finishes the tasks in flight, writes
their replies and only then closes.  It keeps memory bounded in both directions: it stops
reading while the connection has C{max_inflight} tasks in flight or while the
transport's write buffer is full (it is the transport's push producer), and a
line longer than C{max_line} is answered with an error and skipped without
being buffered.  Lines are split by L{pfo3.framing.LineSplitter}; the bytes
that unfinished lines hold over all connections are bounded by the factory's
L{pfo3.framing.BufferBudget}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, List, Optional, Set

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper
from twisted.python.components import registerAdapter
from twisted.python.failure import Failure
from zope.interface import implementer

from pfo3 import wire
from pfo3.errors import BufferFull, InternalError, LineTooLong, Pfo3Error
from pfo3.framing import DEFAULT_MAX_BUFFERED, OVER_BUDGET, TOO_LONG, BufferBudget, LineSplitter
from pfo3.gate import Gate
from pfo3.orchestrator import Orchestrator, Session
from pfo3.sending import writers_for

log = Logger(namespace="pfo3")

DEFAULT_MAX_LINE = 1024 * 1024
DEFAULT_MAX_INFLIGHT = 1000

#: Seconds a connection being closed may take to send its last bytes (and,
#: over TLS, to answer the close_notify) before it is dropped: a client
#: that stops reading, or never completes a TLS handshake, does not keep
#: its socket.
CLOSE_GRACE = 10.0
#: The same, for a connection refused by the limits.
REFUSE_GRACE = 2.0

#: Stands in the queue of held lines for a line that was too long.
_TOO_LONG = None


@implementer(IPushProducer, IHalfCloseableProtocol)
class TaskProtocol(LineOnlyReceiver):
    """
    One client connection: JSON lines in, JSON lines out.

    Lines end with C{\\n}; a C{\\r} before it is ignored and blank lines are
    skipped, so C{nc}, C{telnet} and the seed's client all work.
    """

    delimiter = b"\n"
    MAX_LENGTH = DEFAULT_MAX_LINE
    max_inflight = DEFAULT_MAX_INFLIGHT
    factory: TaskFactory
    session: Session
    transport: Any  # a transport that is also a push producer and consumer
    #: Called with the first bytes received, before they are read; the
    #: connection goes on only if it returns true (see L{pfo3.gate.Gate}).
    on_first_data: Optional[Callable[[TaskProtocol], bool]] = None
    #: Writes to the transport: every line this protocol writes goes
    #: through it, or, for a reply ready on its own, through C{_send_soon}
    #: (L{pfo3.sending.writers_for}).
    _send: Callable[[bytes], None]
    _send_soon: Callable[[bytes], None]

    def __init__(self) -> None:
        self._held: List[Optional[bytes]] = []
        self._out: List[bytes] = []
        self._driving = False
        self._write_paused = False
        self._read_paused = False
        self._input_done = False
        self._finishing = False
        self._splitter = LineSplitter(DEFAULT_MAX_LINE)
        self._dropping: Optional[IDelayedCall] = None

    # -- connection life ----------------------------------------------------

    def connectionMade(self) -> None:
        self.session = self.factory.orchestrator.session(self._peer)
        self.last_active = self.factory.clock.seconds()
        self.factory.protocols.add(self)
        self.transport.registerProducer(self, True)
        self._send, self._send_soon = writers_for(self.transport)
        self.factory.gate.connected(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._dropping is not None and self._dropping.active():
            self._dropping.cancel()
        self._splitter.release()
        self._held.clear()
        self.session.close()
        self.factory.gate.disconnected(self)
        self.factory._lost(self)

    def refuse(self, error: Pfo3Error) -> None:
        """
        Answer C{error} and close, reading nothing more.
        """
        if self.transport.disconnecting:
            return
        self._held.clear()
        self._send(self._error_line(error))
        self.close(REFUSE_GRACE)

    def readConnectionLost(self) -> None:
        """
        The client ended its input: a last line without its C{\\n} still
        counts; then answer every task and close.
        """
        if self._input_done:
            return
        self._input_done = True
        tail = self._splitter.take_tail()
        if tail:
            self._held.append(tail)
        self.finish()

    def writeConnectionLost(self) -> None:
        """
        Nothing more can be written: no reply can be given.
        """
        self.transport.loseConnection()

    def finish(self) -> None:
        """
        Read no more; close once every line already received is answered.
        """
        self._finishing = True
        self._drive()

    def _finish_if_done(self) -> None:
        if self._finishing and not self._held and not self.session.inflight:
            self.close()

    def close(self, grace: float = CLOSE_GRACE) -> None:
        """
        Close the connection once the replies already written are sent, or
        drop it if that takes more than C{grace} seconds.

        The protocol stops being the transport's producer first: a transport
        with a registered producer does not finish closing (TLS waits for it
        to unregister; TCP asks a paused producer for more data instead).
        Reading resumes too: TLS closes only once it reads the client's
        answer to its close_notify.
        """
        if self.transport.disconnecting:
            return
        self.transport.unregisterProducer()
        if self._read_paused and not self._input_done:
            self._read_paused = False
            self.transport.resumeProducing()
        self.transport.loseConnection()
        self._dropping = self.factory.clock.callLater(grace, self._drop)

    def _drop(self) -> None:
        log.info("Dropping connection from {peer}: it did not close in time",
                 peer=self.session.peer)
        self.transport.abortConnection()

    def is_idle(self, since: float) -> bool:
        """
        @return: Whether nothing happened on this connection since C{since}:
            no task in flight, nothing received or answered meanwhile, and
            the server waiting for the client to send (not paused because
            the client does not read its replies: that client is slow, not
            idle).
        """
        return (
            self.last_active <= since and not self.session.inflight and not self._held
            and not self._read_paused and not self.transport.disconnecting
        )

    def _peer(self) -> str:
        peer = self.transport.getPeer()
        host = getattr(peer, "host", None) or getattr(peer, "name", None) or "-"
        port = getattr(peer, "port", None)
        return f"{host}:{port}" if port is not None else str(host)

    # -- IPushProducer: the transport tells us its write buffer is full ---------

    def pauseProducing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._write_paused = False
        self._drive()

    def stopProducing(self) -> None:
        self._held.clear()

    # -- input ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.on_first_data is not None:
            hook, self.on_first_data = self.on_first_data, None
            if not hook(self):
                return
        self.last_active = self.factory.clock.seconds()
        splitter = self._splitter
        self._held.extend(splitter.feed(data))
        refused = splitter.refused
        if refused is TOO_LONG:
            self._held.append(_TOO_LONG)
        self._drive()
        if refused is OVER_BUDGET:
            self._refuse_over_budget()

    def _refuse_over_budget(self) -> None:
        """
        Answer the line that the server-wide budget of unfinished lines
        refused (the splitter drops the rest of it).
        """
        budget = self.factory.budget
        log.info("Refused a line from {peer}: unfinished lines hold {used} bytes, "
                 "limit {limit}", peer=self.session.peer, used=budget.used, limit=budget.limit)
        self._send(self._error_line(BufferFull(
            "Línea rechazada: el servidor ya retiene el máximo de bytes de líneas "
            f"sin terminar ({budget.limit}). Reintente más tarde."
        )))

    def lineReceived(self, line: bytes) -> None:
        """
        Handle one complete line (as if it had arrived with its delimiter).
        """
        self._held.append(line)
        self._drive()

    def _drive(self) -> None:
        """
        Handle held lines while the limits allow, then write what is ready.
        """
        if self._driving:
            return
        self._driving = True
        held = self._held
        out = self._out
        session = self.session
        registry = session.orchestrator.registry
        limit = self.max_inflight
        max_length = self.MAX_LENGTH
        # Looked up once per read rather than once per line.
        decode = wire.decode_request
        handle = session.handle
        encode = wire.encode_reply
        i = 0  # lines taken from held
        try:
            # A for loop, not indexing: held may grow (or be cleared) while
            # a line is handled, and a list's iterator sees it.
            for line in held:
                if self._write_paused or session.inflight >= limit:
                    break
                if self.transport.disconnecting:
                    held.clear()
                    i = 0
                    break
                i += 1
                if line is not None and line[-1:] == b"\r":
                    line = line[:-1]
                if line is None or len(line) > max_length:
                    out.append(self._error_line(LineTooLong(
                        f"Línea demasiado larga: el máximo es {max_length} bytes."
                    )))
                    continue
                if not line or line.isspace():
                    continue
                try:
                    reply = handle(decode(line, registry))
                    if type(reply) is Deferred:
                        reply.addCallbacks(self._reply, self._reply_failed)
                    else:
                        out.append(encode(reply, max_length))  # type: ignore[arg-type]
                except Pfo3Error as e:
                    out.append(self._error_line(e))
        finally:
            del held[:i]
            self._driving = False
            if out:
                self._out = []
                self._send(b"".join(out))
        self._update_reading()
        if self._finishing:
            self._finish_if_done()

    def _update_reading(self) -> None:
        if self._input_done or not self.connected:
            return  # a transport that saw the end of input must not read again
        want_pause = bool(self._held) or self._write_paused or (
            self.session.inflight >= self.max_inflight
        )
        if want_pause != self._read_paused:
            self._read_paused = want_pause
            if want_pause:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _error_line(self, error: Pfo3Error) -> bytes:
        """
        The one place where errors become lines; an internal error's cause
        is logged here with its traceback.
        """
        self.factory.orchestrator.tally.errors[error.codigo] += 1
        cause = error.__cause__
        if isinstance(error, InternalError) and cause is not None:
            log.failure(
                "Task {tarea_id}: unexpected exception",
                Failure(cause, type(cause), cause.__traceback__),
                tarea_id=error.tarea_id, peer=self.session.peer,
            )
        return wire.encode_error(error)

    # -- output -----------------------------------------------------------------

    def _reply(self, reply: wire.Reply) -> None:
        try:
            line = wire.encode_reply(reply, self.MAX_LENGTH)
        except Pfo3Error as e:
            line = self._error_line(e)
        self._write(line)

    def _reply_failed(self, failure: Failure) -> None:
        error = failure.value
        if not isinstance(error, Pfo3Error):
            log.failure("Unexpected failure of a task", failure, peer=self.session.peer)
            error = InternalError("Error interno al ejecutar la tarea.")
        self._write(self._error_line(error))

    def _write(self, line: bytes) -> None:
        self.last_active = self.factory.clock.seconds()
        if not self.connected:
            return
        if self._driving:
            self._out.append(line)
            return
        self._send_soon(line)
        if self._read_paused or self._finishing:
            self._drive()


if TYPE_CHECKING:
    _FactoryBase = Factory[TaskProtocol]
else:
    _FactoryBase = Factory


class TaskFactory(_FactoryBase):
    """
    Builds a L{TaskProtocol} per connection, all sharing one orchestrator.

    @ivar protocols: The open connections (closed at shutdown).
    @ivar budget: The bytes held by the unfinished lines of all connections.
    """

    protocol = TaskProtocol
    noisy = False

    def __init__(
        self,
        orchestrator: Orchestrator,
        max_line: int = DEFAULT_MAX_LINE,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        idle_timeout: float = 0.0,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        gate: Optional[Gate] = None,
    ) -> None:
        """
        @param idle_timeout: L{close_idle} closes connections that have had
            no task in flight and sent nothing for this many seconds
            (C{0}: never).
        @param max_buffered: Bytes that the unfinished lines of all
            connections may hold together (L{budget}); past it, a connection
            whose unfinished line grows beyond a few KiB is answered
            C{buffer_lleno} and the rest of that line is dropped.
        @param gate: The connection limits (L{None}: L{pfo3.gate.Gate}'s
            defaults, and authentication as the orchestrator requires).
        """
        self.orchestrator = orchestrator
        self.clock = orchestrator.clock
        self.max_line = max_line
        self.max_inflight = max_inflight
        self.idle_timeout = idle_timeout
        self.budget = BufferBudget(max_buffered)
        self.gate = gate if gate is not None else Gate(
            self.clock, auth_required=orchestrator.authenticator.required)
        self.protocols: Set[TaskProtocol] = set()
        self._all_closed: List[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> TaskProtocol:
        p = TaskProtocol()
        p.factory = self
        p.MAX_LENGTH = self.max_line
        p._splitter = LineSplitter(self.max_line, self.budget)
        p.max_inflight = self.max_inflight
        return p

    def _lost(self, protocol: TaskProtocol) -> None:
        self.protocols.discard(protocol)
        if not self.protocols and self._all_closed:
            waiters, self._all_closed = self._all_closed, []
            for d in waiters:
                if not d.called:  # not cancelled by a timeout
                    d.callback(None)

    def close_idle(self) -> int:
        """
        Close the connections idle for C{idle_timeout} (see
        L{TaskProtocol.is_idle}).

        @return: How many were closed.
        """
        if not self.idle_timeout:
            return 0
        cutoff = self.clock.seconds() - self.idle_timeout
        idle = [p for p in self.protocols if p.is_idle(cutoff)]
        for p in idle:
            log.info("Closing connection from {peer}: idle for {idle_timeout}s",
                     peer=p.session.peer, idle_timeout=self.idle_timeout)
            p.close()
        return len(idle)

    def finish_all(self) -> Deferred[None]:
        """
        Ask every connection to finish: read no more, answer what it has
        received, write the replies, then close.

        @return: A Deferred that fires once every connection is closed.
        """
        for p in list(self.protocols):
            p.finish()
        return self.closed()

    def closed(self) -> Deferred[None]:
        """
        @return: A Deferred that fires once no connection is open.
        """
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._all_closed.append(d)
        return d

    def abort_all(self) -> None:
        """
        Drop every connection now, written or not.
        """
        for p in list(self.protocols):
            p.transport.abortConnection()


def _half_close_through_proxy(wrapper: HAProxyProtocolWrapper) -> Optional[IHalfCloseableProtocol]:
    """
    The protocol behind a C{haproxy:} endpoint's wrapper, when it handles
    half-closed connections.

    The wrapper does not declare L{IHalfCloseableProtocol} itself, so a
    client's end of input (which HAProxy passes on) would close the whole
    connection before the replies are written.  With this adapter the
    transport hands C{readConnectionLost} to the L{TaskProtocol} behind it.
    """
    return IHalfCloseableProtocol(wrapper.wrappedProtocol, None)


registerAdapter(_half_close_through_proxy, HAProxyProtocolWrapper, IHalfCloseableProtocol)
