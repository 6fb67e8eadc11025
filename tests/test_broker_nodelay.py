"""
The broker connection turns Nagle's algorithm off (L{pfo3.amqp.connection.no_delay}).
"""

from __future__ import annotations

import socket
from typing import Any, List

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from pfo3.amqp.connection import Broker, no_delay
from pfo3.amqp.topology import Topology


class _RecordingTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__()
        self.no_delay: List[bool] = []

    def setTcpNoDelay(self, enabled: bool) -> None:  # noqa: N802
        self.no_delay.append(enabled)


class _Connection:
    """
    The part of pika's C{TwistedProtocolConnection} that L{Broker} prepares.
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.ready: Deferred[Any] = Deferred()


class NoDelayTests(SynchronousTestCase):
    def test_sets_no_delay(self) -> None:
        """
        A transport that has C{setTcpNoDelay} gets it turned on.
        """
        transport = _RecordingTransport()
        no_delay(transport)
        self.assertEqual(transport.no_delay, [True])

    def test_transport_without_it(self) -> None:
        """
        A transport without C{setTcpNoDelay} (a UNIX socket, a test double)
        is left alone, without an error.
        """
        no_delay(StringTransport())

    def test_real_socket(self) -> None:
        """
        On a real TCP transport the socket ends up with C{TCP_NODELAY} set.
        """
        server = socket.socket()
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client = socket.create_connection(server.getsockname())
        self.addCleanup(client.close)
        client.setblocking(False)
        transport = tcp.Connection(client, Protocol(), MemoryReactorClock())
        self.assertEqual(client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)
        no_delay(transport)
        self.assertEqual(client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)

    def test_broker_connection(self) -> None:
        """
        L{Broker} turns Nagle off on each new connection to the broker, as
        soon as it is made (before the AMQP handshake finishes): with it on,
        a publish written after an ack waits for the broker's delayed ACK,
        about 40 ms per task.
        """
        broker = Broker(MemoryReactorClock(), "amqp://guest:guest@127.0.0.1:5672/%2F",
                        Topology("t"), lambda raw, channel: Deferred())
        transport = _RecordingTransport()
        broker._prepare(_Connection(transport))
        self.assertEqual(transport.no_delay, [True])
