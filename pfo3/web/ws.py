"""
The WebSocket endpoint (C{/ws}): the TCP protocol's JSON messages, one
text message per request or reply.

Each connection gets its own L{pfo3.orchestrator.Session}, as a TCP
connection does, and the same rules: requests are pipelined and replies are
sent as tasks finish; the connection gate (L{pfo3.gate.Gate}) counts it
against C{--max-connections} and, on a server that requires tokens, gives
it C{--auth-timeout} seconds to authenticate, by the upgrade request's
C{Authorization: Bearer} header, C{{"op": "auth"}} or a request's own
C{token}.  Backpressure works as on TCP: past C{max_inflight} tasks in
flight, or while the client does not read its replies, the server stops
reading the connection.

What is refused, and how (C{docs/web.md}):

  - invalid JSON, an invalid request, a refused task: the protocol's error
    message, and the connection goes on;
  - a binary message: close code 1003 (unsupported data);
  - a message longer than the limit: close code 1009 (message too big), by
    autobahn, before it is buffered whole;
  - text that is not UTF-8: close code 1007, by autobahn;
  - a refusal of the gate: its error message, then close code 1013 (try
    again later) or 1008 (policy violation: not authenticated in time).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Optional, Tuple, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pfo3 import wire
from pfo3.auth import Identity
from pfo3.errors import InternalError, Pfo3Error, TooManyConnections
from pfo3.orchestrator import Session
from pfo3.web.gateway import Gateway, bearer_token
from pfo3.web.status import http_status

log = Logger(namespace="pfo3")

#: Close codes (RFC 6455, section 7.4.1).
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_TRY_LATER = 1013


@implementer(IPushProducer)
class _WriteWatch:
    """
    The connection's push producer: its transport says when its write buffer
    is full (the client does not read), so the connection stops handling
    requests until it drains.
    """

    def __init__(self, protocol: TaskWebSocketProtocol) -> None:
        self.protocol = protocol

    def pauseProducing(self) -> None:
        self.protocol._write_paused = True
        self.protocol._update_reading()

    def resumeProducing(self) -> None:
        self.protocol._write_paused = False
        self.protocol._drive()

    def stopProducing(self) -> None:
        self.protocol._held.clear()


class TaskWebSocketProtocol(WebSocketServerProtocol):
    """
    One WebSocket client: JSON text messages in, JSON text messages out.
    """

    factory: TaskWebSocketFactory
    session: Session
    transport: Any  # the HTTP connection's: a push producer and consumer
    maxMessagePayloadSize: int  # set by autobahn from the factory's options
    #: Set by the gate when it must see the connection before it goes on.
    on_first_data: Optional[Callable[[Any], bool]] = None

    def __init__(self) -> None:
        super().__init__()
        self._held: Deque[Tuple[bytes, float]] = deque()
        self._driving = False
        self._write_paused = False
        self._read_paused = False
        self._opened = False
        self._refused = False
        self._finishing = False
        self._header_identity: Optional[Tuple[Identity, str]] = None

    # -- connection life ----------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> None:
        """
        The upgrade request: check its origin and its bearer token.

        @raise ConnectionDeny: 403 for an origin not allowed; the error's
            status (401) for a bad token.
        """
        gateway = self.factory.gateway
        headers = request.headers
        if not gateway.origin_allowed(headers.get("origin"), headers.get("host")):
            raise ConnectionDeny(403, "Origin not allowed (see --web-cors)")
        try:
            token = bearer_token(headers.get("authorization"))
            if token is not None:
                identity = gateway.orchestrator.authenticator.authenticate(token)
                self._header_identity = (identity, token)
        except Pfo3Error as e:
            raise ConnectionDeny(http_status(e), f"{e.codigo}: {e.mensaje}")

    def onOpen(self) -> None:
        gateway = self.factory.gateway
        self._opened = True
        self.session = gateway.orchestrator.session(self._peer)
        self.factory.protocols.add(self)
        gateway.panel.websockets += 1
        transport = self.transport
        try:
            transport.unregisterProducer()
        except Exception:
            pass
        transport.registerProducer(_WriteWatch(self), True)
        gateway.gate.connected(cast(Any, self))
        if self._refused:
            return
        hook, self.on_first_data = self.on_first_data, None
        if hook is not None and not hook(self):
            return
        if self._header_identity is not None:
            self.session.set_identity(*self._header_identity)

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        if not self._opened:
            return
        self._opened = False
        self._held.clear()
        self.session.close()
        gateway = self.factory.gateway
        gateway.gate.disconnected(cast(Any, self))
        gateway.panel.websockets -= 1
        self.factory.protocols.discard(self)

    def refuse(self, error: Pfo3Error) -> None:
        """
        Answer C{error} and close (the gate's refusals).
        """
        if self._refused:
            return
        self._refused = True
        self._held.clear()
        self._send_line(wire.encode_error(error))
        code = CLOSE_TRY_LATER if isinstance(error, TooManyConnections) else CLOSE_POLICY
        self.close(code, error.codigo)

    def close(self, code: int, reason: str) -> None:
        """
        Start the closing handshake with C{code} (any code of RFC 6455,
        which autobahn's C{sendClose} restricts to 1000 and 3000-4999).

        @param reason: ASCII text of at most 123 characters.
        """
        if self.state == WebSocketServerProtocol.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("ascii")[:123])

    def finish(self) -> None:
        """
        The server is stopping: read no more, and close (1001, going away)
        once every request already received is answered.
        """
        self._finishing = True
        if self._opened:
            self._drive()

    def _peer(self) -> str:
        peer = self.transport.getPeer()
        host = getattr(peer, "host", None) or "-"
        port = getattr(peer, "port", None)
        return f"{host}:{port}" if port is not None else str(host)

    # -- input ----------------------------------------------------------------

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._refused or not self._opened:
            return
        if isBinary:
            self._refused = True
            self._held.clear()
            self.close(CLOSE_UNSUPPORTED, "text messages only: one JSON object each")
            return
        self._held.append((payload, self.factory.gateway.clock.seconds()))
        self._drive()

    def _drive(self) -> None:
        """
        Handle held messages while the limits allow.
        """
        if self._driving:
            return
        self._driving = True
        held = self._held
        try:
            while held and not self._write_paused and self._opened and not self._refused and (
                self.session.inflight < self.factory.gateway.max_inflight
            ):
                payload, started = held.popleft()
                self._handle(payload, started)
        finally:
            self._driving = False
        self._update_reading()
        if self._finishing and not held and not self.session.inflight:
            self.close(CLOSE_GOING_AWAY, "server shutting down")

    def _handle(self, payload: bytes, started: float) -> None:
        if not payload or payload.isspace():
            return  # as a blank line on TCP: no reply
        session = self.session
        try:
            reply = session.handle(wire.decode_request(payload, session.orchestrator.registry))
        except Pfo3Error as e:
            self._error(e, started)
            return
        if type(reply) is Deferred:
            reply.addCallbacks(self._reply, self._failed, callbackArgs=(started,),
                               errbackArgs=(started,))
        else:
            self._reply(reply, started)  # type: ignore[arg-type]

    def _update_reading(self) -> None:
        if not self._opened or self.transport is None:
            return
        want_pause = self._finishing or bool(self._held) or self._write_paused or (
            self.session.inflight >= self.factory.gateway.max_inflight)
        if want_pause != self._read_paused:
            self._read_paused = want_pause
            if want_pause:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    # -- output ----------------------------------------------------------------

    def _reply(self, reply: wire.Reply, started: float) -> None:
        try:
            line = wire.encode_reply(reply)
        except Pfo3Error as e:
            self._error(e, started)
            return
        self.factory.gateway.panel.answered(
            "ws", started, worker=getattr(reply, "worker", None))
        self._sent(line)

    def _failed(self, failure: Failure, started: float) -> None:
        error = failure.value
        if not isinstance(error, Pfo3Error):
            log.failure("Unexpected failure of a task", failure, peer=self._peer())
            error = InternalError("Error interno al ejecutar la tarea.")
        self._error(error, started)

    def _error(self, error: Pfo3Error, started: float) -> None:
        cause = error.__cause__
        if isinstance(error, InternalError) and cause is not None:
            log.failure("Task {tarea_id}: unexpected exception",
                        Failure(cause, type(cause), cause.__traceback__),
                        tarea_id=error.tarea_id, peer=self._peer())
        self.factory.gateway.panel.answered("ws", started, codigo=error.codigo)
        self._sent(wire.encode_error(error))

    def _sent(self, line: bytes) -> None:
        self._send_line(line)
        if (self._read_paused or self._finishing) and not self._driving:
            self._drive()

    def _send_line(self, line: bytes) -> None:
        if self.state != WebSocketServerProtocol.STATE_OPEN:
            return
        # autobahn applies its message limit to what it sends too; the limit
        # is for requests: a reply may be longer than the request it answers.
        limit, self.maxMessagePayloadSize = self.maxMessagePayloadSize, 0
        try:
            self.sendMessage(line[:-1], isBinary=False)
        finally:
            self.maxMessagePayloadSize = limit


class TaskWebSocketFactory(WebSocketServerFactory):
    """
    Builds a L{TaskWebSocketProtocol} per connection, with bounded messages
    and no compression.

    @ivar protocols: The open connections.
    """

    protocol: Any = TaskWebSocketProtocol

    def __init__(self, gateway: Gateway, reactor: Any = None,
                 ping_interval: float = 0.0) -> None:
        """
        @param ping_interval: Ping every client this often (seconds) and
            drop one that does not answer within as long; C{0}: no pings.
        """
        super().__init__(reactor=reactor)
        self.gateway = gateway
        self.protocols: set[TaskWebSocketProtocol] = set()
        options: dict[str, Any] = {}
        if ping_interval:
            options.update(autoPingInterval=ping_interval, autoPingTimeout=ping_interval)
        self.setProtocolOptions(
            maxMessagePayloadSize=gateway.max_message,
            maxFramePayloadSize=gateway.max_message,
            # No permessage-deflate: replies are small, and an inflated
            # message is where decompression bombs live.
            perMessageCompressionAccept=lambda offers: None,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
            # A protocol error (an oversize message: 1009; text that is
            # not UTF-8: 1007) is answered with a close frame, not a drop.
            failByDrop=False,
            **options,
        )
