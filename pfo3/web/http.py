"""
The HTTP API: C{POST /tareas}, C{GET /tareas/{tarea_id}}, C{GET /tipos}.

Each HTTP request is one L{pfo3.orchestrator.Session}, closed once it is
answered (a plain task whose client disconnects is given up on, as on TCP).
Bodies and replies are the TCP protocol's JSON objects; an error is the
protocol's error object with the HTTP status of L{pfo3.web.status}.  An
C{Authorization: Bearer <JWT>} header authenticates the request as
C{{"op": "auth"}} would a connection.  CORS headers are sent only to the
origins given with C{--web-cors}.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, Optional, Set, Union

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from pfo3 import wire
from pfo3.errors import (
    InternalError,
    InvalidTaskId,
    InvalidUTF8,
    LineTooLong,
    Pfo3Error,
    TaskTimeout,
)
from pfo3.orchestrator import MaybeDeferredReply, Session
from pfo3.web.gateway import Gateway, bearer_token, missing_token
from pfo3.web.status import http_status

JSON = b"application/json; charset=utf-8"


class BoundedRequest(server.Request):
    """
    A request that keeps at most its site's C{max_body} bytes of body: the
    rest is counted and dropped, and the resource answers 413.

    @ivar too_large: The body was longer than the limit.
    """

    too_large = False
    received = 0

    def handleContentChunk(self, data: bytes) -> None:
        self.received += len(data)
        limit = getattr(getattr(self.channel, "site", None), "max_body", None)
        if limit is not None and self.received > limit:
            self.too_large = True
            return
        super().handleContentChunk(data)


#: Seconds a client has to send a whole request (line, headers, body) once
#: its first byte arrived.
DEFAULT_REQUEST_TIMEOUT = 30.0


class BoundedChannel(http.HTTPChannel):
    """
    An HTTP connection whose slow clients cost a bounded amount.

      - A client that sends its request slowly (a byte now and then, which
        resets the idle timeout each time) is bounded in B{time}: from its
        first byte, a request must arrive whole within C{request_timeout}
        seconds, or it is answered C{408} and the connection closes.  Its
        memory is bounded already (headers by C{twisted.web}, the body by
        L{BoundedRequest}): what it would hold for ever is a connection.
      - A client that does not read its responses is bounded in B{memory}:
        once a response fills the transport's write buffer, the connection
        reads and answers nothing more (not even requests it already
        pipelined) until the client reads, so it holds one response,
        however many requests it sent.  Its time is then that of any idle
        connection: C{--idle-timeout}, then C{twisted.web}'s 15 s before it
        is aborted.  (C{twisted.web} alone would go on answering the
        pipelined requests into the write buffer without end.)

    @ivar request_timeout: Seconds to receive one request (C{0}: no limit).
    """

    request_timeout = DEFAULT_REQUEST_TIMEOUT
    _deadline: Optional[IDelayedCall] = None

    def dataReceived(self, data: bytes) -> None:
        if data and not self.paused:
            self._start_deadline()
        super().dataReceived(data)

    def _start_deadline(self) -> None:
        """
        A request starts arriving: give it C{request_timeout} seconds.
        """
        if self._deadline is None and self.request_timeout and not self._handlingRequest:
            self._deadline = self.callLater(self.request_timeout, self._too_slow)

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        super().allContentReceived()

    def _cancel_deadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _too_slow(self) -> None:
        """
        The request did not arrive whole in time: answer 408 and close.
        """
        self._deadline = None
        if self.transport is None:
            return
        body = wire.encode_error(TaskTimeout(
            f"La petición no llegó completa en {self.request_timeout:g} s; "
            "se cierra la conexión."))
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: " + JSON +
            b"\r\nContent-Length: " + str(len(body)).encode() +
            b"\r\nConnection: close\r\n\r\n" + body)
        self.setTimeout(None)
        self.timeoutConnection()

    def requestDone(self, request: server.Request) -> None:
        if self._waitingForTransport and self.persistent:
            # The client does not read: parse nothing more of what it sent
            # (C{LineReceiver} keeps it) and stop reading it until it does.
            self.paused = True
            self._networkProducer.pauseProducing()
        super().requestDone(request)

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self._waitingForTransport = False
            super().dataReceived(b"")  # the requests it held
            if self.paused or self._waitingForTransport:
                return  # their responses filled the buffer again
            if self._buffer:
                self._start_deadline()  # the start of a request
        super().resumeProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)


def header(request: server.Request, name: bytes) -> Optional[str]:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def peer_of(request: server.Request) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", None) or "-"
    port = getattr(address, "port", None)
    return f"{host}:{port}" if port is not None else str(host)


class JSONResource(Resource):
    """
    A resource of the API: CORS, authentication, one session per request.

    @cvar route: Its path, as C{docs/openapi.json} names it.
    """

    route: ClassVar[str] = ""

    @classmethod
    def methods(cls) -> Set[str]:
        """
        @return: The HTTP methods it answers, lower case, as OpenAPI names
            them (besides C{OPTIONS}, the CORS preflight, and C{HEAD},
            which C{twisted.web} answers for every resource).
        """
        return {name[len("render_"):].lower() for name in dir(cls)
                if name.startswith("render_") and name not in ("render_OPTIONS", "render_HEAD")}

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.gateway = gateway

    def render_OPTIONS(self, request: server.Request) -> bytes:
        """
        A CORS preflight: allowed for the C{--web-cors} origins only.
        """
        self.cors(request)
        request.setResponseCode(204)
        return b""

    def cors(self, request: server.Request) -> None:
        origin = header(request, b"origin")
        if self.gateway.cors_allows(origin):
            assert origin is not None
            request.setHeader(b"Access-Control-Allow-Origin", origin.encode("latin-1"))
            request.setHeader(b"Access-Control-Allow-Methods", b"GET, POST, OPTIONS")
            request.setHeader(b"Access-Control-Allow-Headers", b"Authorization, Content-Type")
            request.setHeader(b"Access-Control-Max-Age", b"600")
        request.setHeader(b"Vary", b"Origin")

    def serve(self, request: server.Request,
              build: Callable[[Session], wire.Request]) -> Union[bytes, int]:
        """
        Answer C{request} with the reply of one protocol request.

        @param build: Makes the protocol request (or raises a L{Pfo3Error}).
        """
        gateway = self.gateway
        started = gateway.clock.seconds()
        self.cors(request)
        request.setHeader(b"Content-Type", JSON)
        request.setHeader(b"Cache-Control", b"no-store")
        session = gateway.orchestrator.session(lambda: peer_of(request))
        try:
            token = bearer_token(header(request, b"authorization"))
            if token is not None:
                session.handle(wire.ControlRequest("auth", None, token))
            reply: MaybeDeferredReply = session.handle(build(session))
        except Pfo3Error as e:
            session.close()
            return self._error(request, e, started)
        if not isinstance(reply, Deferred):
            session.close()
            return self._ok(request, reply, started)
        d: Deferred[Any] = reply
        request.notifyFinish().addErrback(lambda _: session.close())

        def answered(body: bytes) -> None:
            session.close()
            if not request._disconnected and not request.finished:
                request.write(body)
                request.finish()

        d.addCallbacks(lambda r: self._ok(request, r, started),
                       lambda f: self._failed(request, f, started))
        d.addCallback(answered)
        return server.NOT_DONE_YET

    def _ok(self, request: server.Request, reply: wire.Reply, started: float) -> bytes:
        try:
            body = wire.encode_reply(reply)
        except Pfo3Error as e:
            return self._error(request, e, started)
        request.setResponseCode(202 if type(reply) is wire.AcceptedResult else 200)
        self.gateway.panel.answered("http", started, worker=getattr(reply, "worker", None))
        return body

    def _failed(self, request: server.Request, failure: Failure, started: float) -> bytes:
        error = failure.value
        if not isinstance(error, Pfo3Error):
            error = InternalError("Error interno al ejecutar la tarea.")
        return self._error(request, error, started)

    def _error(self, request: server.Request, error: Pfo3Error, started: float) -> bytes:
        status = http_status(error)
        request.setResponseCode(status)
        if status == 401:
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="pfo3"')
        elif status in (429, 503):
            request.setHeader(b"Retry-After", b"1")
        self.gateway.panel.answered("http", started, codigo=error.codigo)
        return wire.encode_error(error)


class TareasResource(JSONResource):
    """
    C{POST /tareas}: a request of the TCP protocol as the body; the reply
    when its task ends (202 and C{aceptada} for C{"esperar": false}).
    """

    route = "/tareas"

    def getChild(self, path: bytes, request: server.Request) -> Resource:
        if not path:
            return self
        return TareaResource(self.gateway, path)

    def render_POST(self, request: server.Request) -> Union[bytes, int]:
        def build(session: Session) -> wire.Request:
            if getattr(request, "too_large", False):
                raise LineTooLong(
                    f"Cuerpo demasiado largo: el máximo es {self.gateway.max_message} bytes.")
            assert request.content is not None
            body = request.content.read()
            if len(body) > self.gateway.max_message:
                raise LineTooLong(
                    f"Cuerpo demasiado largo: el máximo es {self.gateway.max_message} bytes.")
            return wire.decode_request(body, session.orchestrator.registry)

        return self.serve(request, build)


class TareaResource(JSONResource):
    """
    C{GET /tareas/{tarea_id}}: the recorded state of one of the caller's
    tasks, as C{{"op": "estado"}} answers it.
    """

    route = "/tareas/{tarea_id}"
    isLeaf = True

    def __init__(self, gateway: Gateway, tarea_id: bytes) -> None:
        super().__init__(gateway)
        self.tarea_id = tarea_id

    def render_GET(self, request: server.Request) -> Union[bytes, int]:
        def build(session: Session) -> wire.Request:
            if request.postpath:
                raise InvalidTaskId("La ruta es /tareas/{tarea_id}.")
            try:
                tarea_id = self.tarea_id.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidUTF8("tarea_id no es UTF-8 válido.")
            if len(tarea_id) > wire.MAX_TASK_ID:
                raise InvalidTaskId(
                    f"'tarea_id' debe ser un texto de 1 a {wire.MAX_TASK_ID} caracteres.")
            return wire.ControlRequest("estado", tarea_id)

        return self.serve(request, build)


class TiposResource(JSONResource):
    """
    C{GET /tipos}: the task types, as C{{"op": "tipos"}} answers them.
    """

    route = "/tipos"
    isLeaf = True

    def render_GET(self, request: server.Request) -> Union[bytes, int]:
        return self.serve(request, lambda session: wire.ControlRequest("tipos", None))


class PanelResource(JSONResource):
    """
    C{GET /panel}: the dashboard's figures (L{pfo3.web.panel.Panel}); on a
    server that requires tokens, for a bearer of a valid one only (as
    C{/panel/ws}).
    """

    route = "/panel"

    def render_GET(self, request: server.Request) -> bytes:
        gateway = self.gateway
        self.cors(request)
        request.setHeader(b"Content-Type", JSON)
        request.setHeader(b"Cache-Control", b"no-store")
        authenticator = gateway.orchestrator.authenticator
        if authenticator.required:
            try:
                token = bearer_token(header(request, b"authorization"))
                if token is None:
                    raise missing_token()
                authenticator.authenticate(token)
            except Pfo3Error as e:
                return self._error(request, e, gateway.clock.seconds())
        return wire.encode_control(None, gateway.panel.snapshot())


#: Every resource of the API (C{docs/openapi.json} describes each).
RESOURCES = (TareasResource, TareaResource, TiposResource, PanelResource)

#: The API's resources at the root, by the first segment of their path.
API: Dict[bytes, Callable[[Gateway], JSONResource]] = {
    b"tareas": TareasResource,
    b"tipos": TiposResource,
    b"panel": PanelResource,
}
