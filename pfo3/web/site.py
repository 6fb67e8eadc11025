"""
The web site of one server: the dashboard (C{/}), the HTTP API, the
WebSocket endpoint (C{/ws}) and the dashboard's live feed (C{/panel/ws}).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Dict, Optional, Set, Tuple, cast

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerProtocol
from autobahn.websocket.protocol import PreparedMessage
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.web import server
from twisted.web.resource import Resource

from pfo3 import wire
from pfo3.errors import Pfo3Error, UnknownOperation
from pfo3.web.gateway import Gateway
from pfo3.web.http import API, DEFAULT_REQUEST_TIMEOUT, BoundedChannel, BoundedRequest
from pfo3.web.ws import TaskWebSocketFactory, TaskWebSocketProtocol

#: The dashboard's files: name → content type.
STATIC = {
    "index.html": b"text/html; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
    "style.css": b"text/css; charset=utf-8",
}

#: The dashboard loads nothing from elsewhere and sends nothing elsewhere.
CSP = (b"default-src 'self'; connect-src 'self'; img-src 'self' data:; "
       b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

#: Seconds between two snapshots on C{/panel/ws}.
PANEL_INTERVAL = 1.0


class StaticFile(Resource):
    """
    One file of the dashboard, read from the package once.
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.body = resources.files("pfo3.web").joinpath("static", name).read_bytes()
        self.content_type = STATIC[name]

    def render_GET(self, request: server.Request) -> bytes:
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            return b""
        request.setHeader(b"Content-Type", self.content_type)
        request.setHeader(b"Content-Security-Policy", CSP)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Cache-Control", b"no-cache")
        return self.body


class Static(Resource):
    """
    C{/static/NAME}: the dashboard's script and style sheet.
    """

    def __init__(self) -> None:
        super().__init__()
        for name in STATIC:
            if name != "index.html":
                self.putChild(name.encode(), StaticFile(name))


class PanelFeed(TaskWebSocketFactory):
    """
    C{/panel/ws}: a WebSocket that receives the dashboard's figures
    (L{pfo3.web.panel.Panel.snapshot}) every L{PANEL_INTERVAL} seconds.

    Its connections go through the connection gate like any other (they
    count against C{--max-connections} and the per-peer limit and, on a
    server that requires tokens, must authenticate within
    C{--auth-timeout}), and receive figures only once authenticated there.
    The figures are computed and framed once per interval for all of them,
    and skipped for a connection whose client does not read them.

    @ivar subscribers: The connections the figures are sent to.
    """

    def __init__(self, gateway: Gateway, reactor: Any = None,
                 ping_interval: float = 0.0) -> None:
        super().__init__(gateway, reactor, ping_interval)
        self.protocol = PanelProtocol
        self.subscribers: Set[PanelProtocol] = set()
        self._loop = LoopingCall(self.push)
        self._loop.clock = gateway.clock
        self._last: Optional[PreparedMessage] = None

    def subscribe(self, p: PanelProtocol) -> None:
        """
        Send the figures to C{p} from now on, starting with the latest.
        """
        self.subscribers.add(p)
        if self._loop.running:
            if self._last is not None:
                p.send_prepared(self._last)
        else:
            self._loop.start(PANEL_INTERVAL, now=True)

    def unsubscribe(self, p: PanelProtocol) -> None:
        """
        Send C{p} no more figures.
        """
        self.subscribers.discard(p)
        if not self.subscribers and self._loop.running:
            self._loop.stop()
            self._last = None

    def push(self) -> None:
        """
        Compute the figures once and send them to every subscriber.
        """
        snapshot = self.gateway.panel.snapshot()
        message = self._last = self.prepareMessage(
            json.dumps(snapshot, ensure_ascii=False).encode("utf-8"))
        for p in list(self.subscribers):
            p.send_prepared(message)


class PanelProtocol(TaskWebSocketProtocol):
    """
    One dashboard's live feed.  It accepts C{{"op": "auth", "token": ...}}
    (what a browser can send) and C{{"op": "ping"}}; any other request is
    answered C{op_desconocida}.  A binary message closes it (1003).
    """

    factory: PanelFeed
    _subscribed = False

    def onOpen(self) -> None:
        super().onOpen()
        self._subscribe()

    def _subscribe(self) -> None:
        """
        Start receiving figures, once the gate let the connection in and,
        where tokens are required, it authenticated.
        """
        if self._subscribed or not self._opened or self._refused or self._finishing:
            return
        if (self.session.authenticated
                or not self.factory.gateway.orchestrator.authenticator.required):
            self._subscribed = True
            self.factory.subscribe(self)

    def _handle(self, payload: bytes, started: float) -> None:
        if not payload or payload.isspace():
            return
        session = self.session
        try:
            request = wire.decode_request(payload, session.orchestrator.registry)
            if type(request) is not wire.ControlRequest or request.op not in ("auth", "ping"):
                raise UnknownOperation(
                    'El canal del panel solo acepta {"op": "auth", "token": ...} y '
                    '{"op": "ping"}.', getattr(request, "tarea_id", None))
            reply = session.handle(request)
            if type(reply) is Deferred:
                # No reply to give: the connection is closing (the gate's
                # limit of refused tokens was reached on an earlier line).
                return
            line = wire.encode_reply(cast(wire.Reply, reply))
        except Pfo3Error as e:
            line = wire.encode_error(e)
        self._send_line(line)
        self._subscribe()

    def send_prepared(self, message: PreparedMessage) -> None:
        """
        Send the figures in C{message}, unless the client is not reading
        what was sent before: it gets the next ones once it does.
        """
        if self.state == WebSocketServerProtocol.STATE_OPEN and not self._write_paused:
            self.sendPreparedMessage(message)

    def finish(self) -> None:
        self.factory.unsubscribe(self)
        super().finish()

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        self.factory.unsubscribe(self)
        super().onClose(wasClean, code, reason)


class WebSite(server.Site):
    """
    The site: bounded request bodies and slow clients
    (L{pfo3.web.http.BoundedChannel}), no access log (the tasks have their
    own, C{--log-tasks}).

    @ivar max_body: Longest request body kept, in bytes.
    @ivar request_timeout: Seconds a client has to send a whole request.
    """

    requestFactory = BoundedRequest

    def __init__(self, root: Resource, gateway: Gateway, timeout: float,
                 reactor: Any = None,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        super().__init__(root, timeout=timeout or None, reactor=reactor)
        self.gateway = gateway
        self.max_body = gateway.max_message
        self.request_timeout = request_timeout
        self.ws: Optional[TaskWebSocketFactory] = None
        self.panel: Optional[PanelFeed] = None

    def protocol(self) -> BoundedChannel:  # type: ignore[override]
        # HTTP/1.1 only: no HTTP/2 negotiation wrapper (pfo3 does not
        # install h2).
        channel = BoundedChannel()
        channel.request_timeout = self.request_timeout
        return channel

    def log(self, request: Any) -> None:
        pass


def root_resource(gateway: Gateway, reactor: Any = None,
                  ping_interval: float = 0.0) -> Tuple[Resource, TaskWebSocketFactory, PanelFeed]:
    """
    @return: The resource tree of the site, the factory of its WebSocket
        connections and that of its dashboard's live feeds.
    """
    root = Resource()
    root.putChild(b"", StaticFile("index.html"))
    root.putChild(b"static", Static())
    children: Dict[bytes, Resource] = {}
    for name, make in API.items():
        children[name] = make(gateway)
        root.putChild(name, children[name])
    ws = TaskWebSocketFactory(gateway, reactor, ping_interval=ping_interval)
    root.putChild(b"ws", WebSocketResource(ws))
    panel = PanelFeed(gateway, reactor, ping_interval=ping_interval)
    children[b"panel"].putChild(b"ws", WebSocketResource(panel))
    return root, ws, panel


def make_site(gateway: Gateway, reactor: Any = None, idle_timeout: float = 0.0,
              ping_interval: float = 0.0,
              request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> WebSite:
    """
    The site to listen with (C{--web ENDPOINT}).

    @param idle_timeout: Close HTTP connections idle this long (C{0}:
        never).
    @param ping_interval: Ping WebSocket clients this often and drop those
        that do not answer (C{0}: no pings).
    @param request_timeout: Seconds a client has to send a whole HTTP
        request once it started (C{0}: no limit).
    """
    root, ws, panel = root_resource(gateway, reactor, ping_interval)
    site = WebSite(root, gateway, idle_timeout, reactor, request_timeout)
    site.ws = ws
    site.panel = panel
    return site


class WebService(MultiService):
    """
    The C{--web} endpoints of a server (child services), serving one site.

    Stopping it stops listening and asks every WebSocket connection to
    finish: it reads no more and closes (1001) once its tasks in flight are
    answered, while the server drains (L{pfo3.service.TaskServerService}).
    """

    def __init__(self, site: WebSite) -> None:
        super().__init__()
        self.site = site

    def stopService(self) -> Deferred[None]:
        d: Deferred[None] = super().stopService()
        for factory in (self.site.ws, self.site.panel):
            if factory is not None:
                for protocol in list(factory.protocols):
                    protocol.finish()
        return d
