"""
The web site of one server: the dashboard (C{/}), the HTTP API, the
WebSocket endpoint (C{/ws}) and the dashboard's live feed (C{/panel/ws}).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Dict, Optional, Tuple

from autobahn.twisted.resource import WebSocketResource
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.web import server
from twisted.web.resource import Resource

from pfo3.web.gateway import Gateway
from pfo3.web.http import API, BoundedRequest
from pfo3.web.ws import CLOSE_UNSUPPORTED, TaskWebSocketFactory, TaskWebSocketProtocol

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
    Messages from the client are ignored; a binary one closes it (1003).
    """

    def __init__(self, gateway: Gateway, reactor: Any = None) -> None:
        super().__init__(gateway, reactor)
        self.protocol = PanelProtocol


class PanelProtocol(TaskWebSocketProtocol):
    """
    One dashboard's live feed.
    """

    _loop: Optional[LoopingCall] = None

    def onOpen(self) -> None:
        self._opened = True
        loop = self._loop = LoopingCall(self._push)
        loop.clock = self.factory.gateway.clock
        loop.start(PANEL_INTERVAL, now=True)

    def _push(self) -> None:
        snapshot = self.factory.gateway.panel.snapshot()
        self.sendMessage(json.dumps(snapshot, ensure_ascii=False).encode("utf-8"))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.close(CLOSE_UNSUPPORTED, "text messages only")

    def onClose(self, wasClean: bool, code: Optional[int], reason: Optional[str]) -> None:
        self._opened = False
        if self._loop is not None and self._loop.running:
            self._loop.stop()


class WebSite(server.Site):
    """
    The site: bounded request bodies, no access log (the tasks have their
    own, C{--log-tasks}).

    @ivar max_body: Longest request body kept, in bytes.
    """

    requestFactory = BoundedRequest

    def __init__(self, root: Resource, gateway: Gateway, timeout: float,
                 reactor: Any = None) -> None:
        super().__init__(root, timeout=timeout or None, reactor=reactor)
        self.gateway = gateway
        self.max_body = gateway.max_message
        self.ws: Optional[TaskWebSocketFactory] = None

    def log(self, request: Any) -> None:
        pass


def root_resource(gateway: Gateway, reactor: Any = None,
                  ping_interval: float = 0.0) -> Tuple[Resource, TaskWebSocketFactory]:
    """
    @return: The resource tree of the site, and the factory of its
        WebSocket connections.
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
    children[b"panel"].putChild(b"ws", WebSocketResource(PanelFeed(gateway, reactor)))
    return root, ws


def make_site(gateway: Gateway, reactor: Any = None, idle_timeout: float = 0.0,
              ping_interval: float = 0.0) -> WebSite:
    """
    The site to listen with (C{--web ENDPOINT}).

    @param idle_timeout: Close HTTP connections idle this long (C{0}:
        never).
    @param ping_interval: Ping WebSocket clients this often and drop those
        that do not answer (C{0}: no pings).
    """
    root, ws = root_resource(gateway, reactor, ping_interval)
    site = WebSite(root, gateway, idle_timeout, reactor)
    site.ws = ws
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
        if self.site.ws is not None:
            for protocol in list(self.site.ws.protocols):
                protocol.finish()
        return d
