"""
Tests for slow HTTP clients of the web gateway (L{pfo3.web.http.BoundedChannel}):
one that sends its request a byte at a time is cut off in time, one that
does not read its responses holds one response in memory, and neither
delays other clients.  In memory: the real site over L{StringTransport}s
on a fake clock.
"""

from __future__ import annotations

import json
from typing import List

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pfo3.testing import FakeReactor, make_server
from pfo3.web import Gateway, WebSite, make_site
from pfo3.web.testing import Response, http, request_bytes


class FullBufferTransport(StringTransport):
    """
    A transport whose write buffer is "full" past C{limit} bytes: like a
    socket's, it then pauses its producer (the HTTP connection) until the
    client reads (L{read}).
    """

    def __init__(self, limit: int) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "10.0.0.9", 40000))
        self.limit = limit
        self.full = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if not self.full and len(self.io.getvalue()) > self.limit and self.producer:
            self.full = True
            self.producer.pauseProducing()

    def read(self) -> bytes:
        """
        The client reads everything written so far; the buffer drains.
        """
        data = self.value()
        self.clear()
        if self.full:
            self.full = False
            assert self.producer is not None
            self.producer.resumeProducing()
        return data


def responses(data: bytes) -> List[Response]:
    out = []
    for raw in data.split(b"HTTP/1.1 ")[1:]:
        out.append(Response(b"HTTP/1.1 " + raw))
    return out


class SlowClientTests(SynchronousTestCase):
    """
    Slow HTTP clients are bounded, and do not disturb others.
    """

    def setUp(self) -> None:
        self.clock = FakeReactor()
        self.factory = make_server(reactor=self.clock)
        self.site = self.make_site(request_timeout=30)

    def make_site(self, request_timeout: float, idle_timeout: float = 20) -> WebSite:
        return make_site(Gateway(self.factory.orchestrator, self.factory.gate),
                         reactor=self.clock, idle_timeout=idle_timeout,
                         request_timeout=request_timeout)

    def connect(self, site: WebSite, transport: StringTransport) -> None:
        protocol = site.buildProtocol(transport.getPeer())
        assert protocol is not None
        protocol.makeConnection(transport)
        self.protocol = protocol

    def test_slow_body_is_cut_off_in_time(self) -> None:
        """
        A client that sends its body a byte every 10 s (which resets the
        20 s idle timeout each time) gets 408 and codigo timeout once 30 s
        have passed since its first byte, and its connection closes; a
        client that comes meanwhile is answered at once.
        """
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.8", 40000))
        self.connect(self.site, transport)
        body = json.dumps({"tipo": "uppercase", "contenido": "x"}).encode()
        head = request_bytes("POST", "/tareas", body)[: -len(body)]
        self.protocol.dataReceived(head)
        for i in range(2):
            self.clock.advance(10)
            self.protocol.dataReceived(body[i:i + 1])
            _, other = http(self.site, "POST", "/tareas", {"tipo": "uppercase", "contenido": "y"})
            assert other is not None
            self.assertEqual(other.json()["resultado"], "Y")
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        self.clock.advance(10)
        response = Response(transport.value())
        self.assertEqual(response.status, 408)
        self.assertEqual(response.json()["codigo"], "timeout")
        self.assertIn("30 s", response.json()["mensaje"])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.factory.orchestrator.completed, 2)

    def test_slow_headers_are_cut_off_too(self) -> None:
        """
        A request line and headers sent a byte every 10 s are cut off the
        same way.
        """
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.8", 40000))
        self.connect(self.site, transport)
        for byte in b"GET /tipos HTTP/1.1\r\n":
            self.protocol.dataReceived(bytes([byte]))
            self.clock.advance(10)
            if transport.value():
                break
        self.assertEqual(Response(transport.value()).status, 408)
        self.assertTrue(transport.disconnecting)

    def test_timely_requests_on_a_kept_alive_connection(self) -> None:
        """
        The limit is per request: a kept-alive connection whose requests
        each arrive whole in time lives longer than it, and its deadline
        does not run while it is idle between requests (the idle timeout
        does).
        """
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.8", 40000))
        self.connect(self.site, transport)
        for _ in range(4):
            self.protocol.dataReceived(request_bytes("GET", "/tipos"))
            self.assertEqual(Response(transport.value()).status, 200)
            transport.clear()
            self.clock.advance(15)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), self.clock.seconds() + 5)

    def test_no_request_timeout(self) -> None:
        """
        With a request timeout of 0, a slow request is bounded by nothing
        but the idle timeout.
        """
        site = self.make_site(request_timeout=0)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.8", 40000))
        self.connect(site, transport)
        for byte in b"GET /tipos HTTP/1.1\r\n":
            self.protocol.dataReceived(bytes([byte]))
            self.clock.advance(10)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)

    def test_client_that_does_not_read_holds_one_response(self) -> None:
        """
        A client that pipelines 50 requests and does not read: once a
        response fills its write buffer, nothing more is answered (nor
        read) until it reads; then the next one is.  Other clients are
        answered meanwhile.
        """
        transport = FullBufferTransport(limit=100)
        self.connect(self.site, transport)
        self.protocol.dataReceived(request_bytes("GET", "/tipos") * 50)
        self.assertEqual(len(responses(transport.value())), 1)
        self.assertEqual(transport.producerState, "paused")
        self.clock.advance(5)
        self.assertEqual(len(responses(transport.value())), 1)
        _, other = http(self.site, "GET", "/tipos")
        assert other is not None
        self.assertEqual(other.status, 200)
        answered = []
        for _ in range(60):
            answered += responses(transport.read())
        self.assertEqual([r.status for r in answered], [200] * 50)
        self.assertEqual(transport.producerState, "producing")

    def test_client_that_does_not_read_task_replies(self) -> None:
        """
        The same with tasks that finish later: the replies of pipelined
        tasks are not produced while the client does not read; once it
        does, they are.
        """
        transport = FullBufferTransport(limit=10)
        self.connect(self.site, transport)
        body = json.dumps({"tipo": "sleep", "contenido": 1}).encode()
        self.protocol.dataReceived(request_bytes("POST", "/tareas", body) * 3)
        self.clock.advance(1)
        self.assertEqual(len(responses(transport.value())), 1)
        self.clock.advance(5)
        self.assertEqual(len(responses(transport.value())), 1)
        self.assertEqual(self.factory.orchestrator.completed, 1)
        answered = responses(transport.read())
        for _ in range(4):
            self.clock.advance(1)
            answered += responses(transport.read())
        self.assertEqual([r.json()["estado"] for r in answered], ["ok"] * 3)

    def test_client_that_does_not_read_is_dropped_when_idle(self) -> None:
        """
        A client that stopped reading is closed by the idle timeout (20 s
        here), and aborted 15 s later if it still does not read.
        """
        transport = FullBufferTransport(limit=10)
        self.connect(self.site, transport)
        self.protocol.dataReceived(request_bytes("GET", "/tipos") * 3)
        self.clock.advance(20)
        self.assertTrue(transport.disconnecting)
