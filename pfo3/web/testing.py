"""
An in-memory client of pfo3's web site (L{pfo3.web}), for tests: raw
HTTP/1.1 and WebSocket frames over a L{StringTransport}, so that a test
drives the real C{twisted.web} site, autobahn and the orchestrator without
sockets.  With L{pfo3.testing.make_server}::

    factory = make_server()
    site = web_site(factory)
    _, response = http(site, "POST", "/tareas", {"tipo": "upper", "contenido": "x"})
    ws = WebSocket(site)
    ws.send_json({"tarea_id": "a", "tipo": "sleep", "contenido": 1})
    factory.orchestrator.clock.advance(1)
    ws.replies()   # [{"estado": "ok", ...}]
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from pfo3.protocol import TaskFactory
from pfo3.web import Gateway, WebSite, make_site

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def web_site(factory: TaskFactory, **gateway: Any) -> WebSite:
    """
    The web site of C{factory}'s server (see L{pfo3.testing.make_server}),
    on its fake reactor.
    """
    orch = factory.orchestrator
    return make_site(Gateway(orch, factory.gate, **gateway), reactor=orch.clock)


class Connection:
    """
    One client connection to C{site}.
    """

    def __init__(self, site: WebSite, host: str = "10.0.0.1") -> None:
        address = IPv4Address("TCP", host, 40000)
        self.protocol = site.buildProtocol(address)
        self.transport = StringTransport(peerAddress=address)
        # autobahn hands the connection over by setting transport.protocol.
        self.transport.protocol = self.protocol  # type: ignore[attr-defined]
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        """
        Deliver C{data} from the client to the server.
        """
        # The protocol may change once the connection is a WebSocket.
        self.transport.protocol.dataReceived(data)  # type: ignore[attr-defined]

    def take(self) -> bytes:
        """
        @return: What the server wrote since the last call.
        """
        data = self.transport.value()
        self.transport.clear()
        return data

    def close(self) -> None:
        """
        The client goes away.
        """
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.transport.protocol.connectionLost(Failure(ConnectionDone()))  # type: ignore


def request_bytes(method: str, path: str, body: bytes = b"",
                  headers: Optional[Dict[str, str]] = None) -> bytes:
    """
    @return: An HTTP/1.1 request to C{pfo3.test}, with a C{Content-Length}
        when it has a body.
    """
    lines = [f"{method} {path} HTTP/1.1", "Host: pfo3.test"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Response:
    """
    A parsed HTTP response.
    """

    def __init__(self, raw: bytes) -> None:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers: Dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if self.headers.get("transfer-encoding") == "chunked":
            body = b""
            while rest:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                if size == 0:
                    break
                body += rest[:size]
                rest = rest[size + 2:]
            self.body = body
        else:
            self.body = rest[: int(self.headers.get("content-length", len(rest)))]

    def json(self) -> Dict[str, Any]:
        """
        @return: The body, decoded as a JSON object.
        """
        obj = json.loads(self.body)
        assert isinstance(obj, dict)
        return obj


def http(site: WebSite, method: str, path: str, body: Any = b"",
         headers: Optional[Dict[str, str]] = None) -> Tuple[Connection, Optional[Response]]:
    """
    Send one request on a new connection.

    @param body: Bytes, or an object sent as JSON.
    @return: The connection and the response, L{None} while it is pending.
    """
    if not isinstance(body, bytes):
        body = json.dumps(body).encode("utf-8")
    c = Connection(site)
    c.send(request_bytes(method, path, body, headers))
    raw = c.transport.value()
    return c, (Response(raw) if raw else None)


# -- WebSocket ---------------------------------------------------------------------


def frame(payload: bytes, opcode: int = 1, fin: bool = True) -> bytes:
    """
    A masked client frame (RFC 6455, section 5.2).
    """
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def parse_frames(data: bytes) -> List[Tuple[int, bytes]]:
    """
    @return: The server's frames in C{data}: (opcode, payload).
    """
    frames = []
    while data:
        opcode = data[0] & 0x0F
        n = data[1] & 0x7F
        i = 2
        if n == 126:
            n = struct.unpack("!H", data[2:4])[0]
            i = 4
        elif n == 127:
            n = struct.unpack("!Q", data[2:10])[0]
            i = 10
        frames.append((opcode, data[i:i + n]))
        data = data[i + n:]
    return frames


class WebSocket(Connection):
    """
    A WebSocket client connection to C{site}'s C{path}.

    @ivar handshake: The server's answer to the upgrade request.
    """

    def __init__(self, site: WebSite, path: str = "/ws",
                 headers: Optional[Dict[str, str]] = None, host: str = "10.0.0.1") -> None:
        super().__init__(site, host)
        all_headers = {"Upgrade": "websocket", "Connection": "Upgrade",
                       "Sec-WebSocket-Key": KEY, "Sec-WebSocket-Version": "13"}
        all_headers.update(headers or {})
        self.send(request_bytes("GET", path, headers=all_headers))
        raw = self.take()
        head, _, rest = raw.partition(b"\r\n\r\n")
        self.handshake = Response(head + b"\r\n\r\n")
        self._pending = rest

    def send_text(self, text: str) -> None:
        """
        Send a text message.
        """
        self.send(frame(text.encode("utf-8")))

    def send_json(self, obj: Any) -> None:
        """
        Send C{obj} as a JSON text message.
        """
        self.send_text(json.dumps(obj))

    def frames(self) -> List[Tuple[int, bytes]]:
        """
        @return: The frames received since the last call.
        """
        data, self._pending = self._pending + self.take(), b""
        return parse_frames(data)

    def replies(self) -> List[Dict[str, Any]]:
        """
        The JSON text messages received since the last call (each must be
        one).
        """
        out = []
        for opcode, payload in self.frames():
            assert opcode == 1, (opcode, payload)
            out.append(json.loads(payload))
        return out

    def close_code(self) -> Optional[int]:
        """
        @return: The code of the close frame received, if any.
        """
        for opcode, payload in self.frames():
            if opcode == 8:
                return int(struct.unpack("!H", payload[:2])[0])
        return None
